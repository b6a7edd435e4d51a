//! The arbiter: decides, per customer and trigger, whether to send now, on which
//! channel, or not at all, and records why.
//!
//! Every trigger yields exactly one decision on the decisions topic; a "sent" decision
//! also yields a send command on the channel's topic. Decisions and send ids are
//! deterministic, so a replayed trigger produces the same records.

use std::sync::Arc;

use kairos_core::admin::AdminState;
use kairos_core::config::{topics, Config};
use kairos_core::contracts::{
    Channel, Decision, DecisionOutcome, MessageCategory, SendCommand, Trigger,
};
use kairos_core::encoding::{decode_internal, Rejection, SchemaRegistry};
use kairos_core::ids::{deterministic_id, stable_fraction};
use kairos_core::metrics;
use kairos_core::runtime::{Ctx, Processor, Record};
use kairos_core::store::DueTimer;
use kairos_core::time::{Millis, DAY};
use prometheus::{Histogram, IntCounterVec};
use serde::{Deserialize, Serialize};

/// Per-customer arbiter state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CustomerLedger {
    /// Recent sends (time, channel, category), newest last; pruned to the cap window.
    pub sends: Vec<(Millis, Channel, MessageCategory)>,
}

/// Marketing messages per rolling day before the frequency cap holds further ones.
const DAILY_CAP: usize = 2;

pub struct ArbiterProcessor {
    config: Arc<Config>,
    triggers_topic: String,
    decisions_topic: String,
    decisions: IntCounterVec,
    end_to_end: Histogram,
}

impl ArbiterProcessor {
    pub fn new(config: Arc<Config>, registry: &prometheus::Registry) -> Self {
        ArbiterProcessor {
            triggers_topic: config.topic(topics::TRIGGERS),
            decisions_topic: config.topic(topics::DECISIONS),
            decisions: metrics::counter_vec(
                registry,
                "kairos_arbiter_decisions_total",
                "Arbiter decisions, by outcome and the rule that made them.",
                &["outcome", "rule"],
            ),
            end_to_end: metrics::histogram(
                registry,
                "kairos_end_to_end_latency_seconds",
                "From the customer event that caused a trigger to its send command.",
                vec![
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0,
                ],
            ),
            config,
        }
    }

    fn in_control_group(&self, customer_id: &str) -> bool {
        let pct = f64::from(self.config.arbiter.control_group_percent) / 100.0;
        stable_fraction(&[&self.config.arbiter.control_group_salt, customer_id]) < pct
    }

    fn decide(
        &self,
        ctx: &mut Ctx<'_>,
        t: &Trigger,
        ledger: &mut CustomerLedger,
    ) -> (DecisionOutcome, Option<Channel>, &'static str, String) {
        let now = ctx.now();
        if t.valid_until < now {
            return (
                DecisionOutcome::expired,
                None,
                "valid_until",
                format!("valid until {} but decided at {now}", t.valid_until),
            );
        }
        if t.category != MessageCategory::transactional && self.in_control_group(&t.customer_id) {
            return (
                DecisionOutcome::held_out,
                None,
                "control_group",
                format!(
                    "customer is in the {}% global control group",
                    self.config.arbiter.control_group_percent
                ),
            );
        }
        ledger.sends.retain(|(at, _, _)| now - at < DAY);
        let marketing_sends = ledger
            .sends
            .iter()
            .filter(|(_, _, c)| *c != MessageCategory::transactional)
            .count();
        if t.category != MessageCategory::transactional && marketing_sends >= DAILY_CAP {
            return (
                DecisionOutcome::suppressed,
                None,
                "frequency_cap_daily",
                format!("{marketing_sends} messages in the last 24 h (cap {DAILY_CAP})"),
            );
        }
        let consented = |c: &Channel| t.contacts.consented_channels.contains(c);
        let reachable = |c: &Channel| {
            matches!(c, Channel::in_app | Channel::webhook) || t.contacts.address_for(*c).is_some()
        };
        match t.channels.iter().find(|c| consented(c) && reachable(c)) {
            Some(c) => (
                DecisionOutcome::sent,
                Some(*c),
                "channel_choice",
                format!(
                    "first channel of {:?} with consent and an address",
                    t.channels.iter().map(|c| c.as_str()).collect::<Vec<_>>()
                ),
            ),
            None => (
                DecisionOutcome::suppressed,
                None,
                "no_consented_channel",
                "no channel of the scenario has both consent and an address".to_string(),
            ),
        }
    }
}

impl Processor for ArbiterProcessor {
    type Input = Trigger;

    fn name(&self) -> &str {
        "arbiter"
    }

    fn inputs(&self) -> Vec<String> {
        vec![self.triggers_topic.clone()]
    }

    fn decode(&self, record: &Record<'_>) -> Result<Trigger, Rejection> {
        decode_internal(record.payload)
    }

    fn event_time(&self, t: &Trigger) -> Option<Millis> {
        Some(t.fired_at)
    }

    fn process(&mut self, ctx: &mut Ctx<'_>, t: Trigger) -> anyhow::Result<()> {
        // One trigger id, one decision: a re-delivered trigger is ignored.
        let seen_key = format!("t/{}", t.trigger_id);
        if ctx.get::<Millis>(&seen_key)?.is_some() {
            self.decisions
                .with_label_values(&[DecisionOutcome::duplicate.as_str(), "trigger_id"])
                .inc();
            return Ok(());
        }
        ctx.put(&seen_key, &ctx.now())?;
        let ledger_key = format!("c/{}", t.customer_id);
        let mut ledger: CustomerLedger = ctx.get(&ledger_key)?.unwrap_or_default();
        let (outcome, channel, rule, reason) = self.decide(ctx, &t, &mut ledger);
        let now = ctx.now();
        let send_id = channel.map(|c| deterministic_id(&[&t.trigger_id, c.as_str()]));
        if let (Some(c), Some(send_id)) = (channel, &send_id) {
            let cmd = SendCommand {
                send_id: send_id.clone(),
                trigger_id: t.trigger_id.clone(),
                customer_id: t.customer_id.clone(),
                scenario: t.scenario.clone(),
                channel: c,
                category: t.category,
                template: t.template.clone(),
                address: t.contacts.address_for(c),
                variables: t.variables.clone(),
                created_at: now,
                valid_until: t.valid_until,
                cause_occurred_at: t.cause_occurred_at,
                reasons: vec![format!("{rule}: {reason}")],
            };
            let topic = self.config.send_topic(c);
            ctx.emit(&topic, &t.customer_id, &cmd);
            ledger.sends.push((now, c, t.category));
            self.end_to_end
                .observe(((now - t.cause_occurred_at).max(0) as f64) / 1000.0);
        }
        let decision = Decision {
            decision_id: deterministic_id(&[&t.trigger_id, "decision"]),
            trigger_id: t.trigger_id.clone(),
            customer_id: t.customer_id.clone(),
            scenario: t.scenario.clone(),
            category: t.category,
            outcome,
            channel,
            send_id,
            rule: rule.to_string(),
            reason,
            decided_at: now,
        };
        self.decisions
            .with_label_values(&[outcome.as_str(), rule])
            .inc();
        let topic = self.decisions_topic.clone();
        ctx.emit(&topic, &t.customer_id, &decision);
        ctx.put(&ledger_key, &ledger)
    }

    fn on_timer(&mut self, _ctx: &mut Ctx<'_>, _timer: &DueTimer) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Runs the arbiter until `cancel` fires.
pub async fn run(
    config: Arc<Config>,
    admin: Arc<AdminState>,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let processor = ArbiterProcessor::new(config.clone(), &admin.registry);
    let registry = SchemaRegistry::new(None);
    kairos_core::runtime::run(&config, processor, admin, registry, cancel).await
}
