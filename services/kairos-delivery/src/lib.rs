//! Delivery workers: one per channel, each consuming its send topic.
//!
//! A worker records every send id it has handled in its partition store, so a send
//! command delivered twice (a re-sent outbox record, a replay) reaches the provider
//! once. Outcomes go to the outcomes topic with deterministic ids.

use std::sync::Arc;

use kairos_core::admin::AdminState;
use kairos_core::config::{topics, Config, DeliveryChannelConfig, ProviderKind};
use kairos_core::contracts::{Channel, Outcome, OutcomeKind, SendCommand};
use kairos_core::encoding::{decode_internal, Rejection, SchemaRegistry};
use kairos_core::ids::deterministic_id;
use kairos_core::metrics;
use kairos_core::runtime::{Ctx, Processor, Record};
use kairos_core::store::DueTimer;
use kairos_core::time::Millis;
use prometheus::{HistogramVec, IntCounterVec};
use serde::{Deserialize, Serialize};

pub mod simulator;

/// An outcome to report later (engagement arrives after delivery).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LaterOutcome {
    send: SendSummary,
    kind: OutcomeKind,
}

/// The part of a send command outcomes need.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SendSummary {
    send_id: String,
    customer_id: String,
    scenario: String,
    channel: Channel,
    category: kairos_core::contracts::MessageCategory,
}

impl From<&SendCommand> for SendSummary {
    fn from(c: &SendCommand) -> Self {
        SendSummary {
            send_id: c.send_id.clone(),
            customer_id: c.customer_id.clone(),
            scenario: c.scenario.clone(),
            channel: c.channel,
            category: c.category,
        }
    }
}

pub struct DeliveryProcessor {
    channel: Channel,
    name: String,
    settings: DeliveryChannelConfig,
    send_topic: String,
    outcomes_topic: String,
    provider_requests: IntCounterVec,
    provider_latency: HistogramVec,
}

impl DeliveryProcessor {
    pub fn new(
        config: &Config,
        channel: Channel,
        settings: DeliveryChannelConfig,
        registry: &prometheus::Registry,
    ) -> Self {
        let processor = DeliveryProcessor {
            channel,
            name: format!("deliver-{}", channel.as_str()),
            send_topic: config.send_topic(channel),
            outcomes_topic: config.topic(topics::OUTCOMES),
            provider_requests: metrics::counter_vec(
                registry,
                "kairos_provider_requests_total",
                "Requests to the delivery provider, by channel, provider and result.",
                &["channel", "provider", "result"],
            ),
            provider_latency: metrics::histogram_vec(
                registry,
                "kairos_provider_request_duration_seconds",
                "Time the delivery provider took to answer a send request.",
                &["channel", "provider"],
                metrics::latency_buckets(),
            ),
            settings,
        };
        // Every series exists from the start, so rates and alerts see zeros, not gaps.
        let provider = processor.provider_name();
        for result in ["accepted", "transient_error", "permanent_error"] {
            processor
                .provider_requests
                .with_label_values(&[channel.as_str(), provider, result]);
        }
        processor
            .provider_latency
            .with_label_values(&[channel.as_str(), provider]);
        processor
    }

    fn provider_name(&self) -> &'static str {
        match self.settings.provider {
            ProviderKind::Simulator => "simulator",
        }
    }

    fn emit_outcome(
        &self,
        ctx: &mut Ctx<'_>,
        send: &SendSummary,
        kind: OutcomeKind,
        reason: Option<String>,
        at: Millis,
    ) {
        let outcome = Outcome {
            outcome_id: deterministic_id(&[&send.send_id, kind.as_str()]),
            send_id: send.send_id.clone(),
            customer_id: send.customer_id.clone(),
            scenario: send.scenario.clone(),
            channel: send.channel,
            category: send.category,
            kind,
            reason,
            occurred_at: at,
        };
        let topic = self.outcomes_topic.clone();
        ctx.emit(&topic, &send.customer_id, &outcome);
    }
}

impl Processor for DeliveryProcessor {
    type Input = SendCommand;

    fn name(&self) -> &str {
        &self.name
    }

    fn inputs(&self) -> Vec<String> {
        vec![self.send_topic.clone()]
    }

    fn outputs(&self) -> Vec<String> {
        vec![self.outcomes_topic.clone()]
    }

    fn decode(&self, record: &Record<'_>) -> Result<SendCommand, Rejection> {
        let cmd: SendCommand = decode_internal(record.payload)?;
        if cmd.channel != self.channel {
            return Err(Rejection::new(
                kairos_core::contracts::DeadLetterReason::invalid_field,
                format!(
                    "send command for channel {} on the {} topic",
                    cmd.channel, self.channel
                ),
            ));
        }
        Ok(cmd)
    }

    fn event_time(&self, cmd: &SendCommand) -> Option<Millis> {
        Some(cmd.created_at)
    }

    fn process(&mut self, ctx: &mut Ctx<'_>, cmd: SendCommand) -> anyhow::Result<()> {
        let key = format!("s/{}", cmd.send_id);
        if ctx.get::<Millis>(&key)?.is_some() {
            return Ok(());
        }
        let now = ctx.now();
        ctx.put(&key, &now)?;
        let send = SendSummary::from(&cmd);
        if cmd.valid_until < now {
            self.emit_outcome(ctx, &send, OutcomeKind::failed, Some("expired".into()), now);
            return Ok(());
        }
        match self.settings.provider {
            ProviderKind::Simulator => {
                let started = std::time::Instant::now();
                let plan = simulator::plan(&self.settings.simulator, &cmd.send_id, now);
                self.provider_requests
                    .with_label_values(&[self.channel.as_str(), "simulator", "accepted"])
                    .inc();
                self.provider_latency
                    .with_label_values(&[self.channel.as_str(), "simulator"])
                    .observe(started.elapsed().as_secs_f64());
                self.emit_outcome(ctx, &send, OutcomeKind::sent, None, now);
                for (kind, at) in plan {
                    if at <= now {
                        self.emit_outcome(ctx, &send, kind, None, now);
                    } else {
                        ctx.schedule(
                            &format!("{}/{}", cmd.send_id, kind.as_str()),
                            at,
                            &LaterOutcome {
                                send: send.clone(),
                                kind,
                            },
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: &DueTimer) -> anyhow::Result<()> {
        let later: LaterOutcome = serde_json::from_slice(&timer.payload)?;
        self.emit_outcome(ctx, &later.send, later.kind, None, timer.fire_at);
        Ok(())
    }
}

/// Runs the delivery worker of `channel` until `cancel` fires.
pub async fn run(
    config: Arc<Config>,
    channel: Channel,
    admin: Arc<AdminState>,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let settings = config.delivery.get(&channel).cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "{}: no [delivery.{}] section configures this channel",
            config.source_file.display(),
            channel
        )
    })?;
    let processor = DeliveryProcessor::new(&config, channel, settings, &admin.registry);
    kairos_core::runtime::run(&config, processor, admin, SchemaRegistry::new(None), cancel).await
}
