//! Feedback: outcomes and decisions flow back into metrics.
//!
//! Outcomes are deduplicated by outcome id (a re-sent record counts once), then counted
//! by channel, scenario, category and kind; decisions by outcome and rule. Labels are
//! bounded: scenario names come from the configuration, never from customer data.

use std::sync::Arc;

use kairos_core::admin::AdminState;
use kairos_core::config::{topics, Config};
use kairos_core::contracts::{Decision, Outcome, OutcomeKind};
use kairos_core::encoding::{decode_internal, Rejection, SchemaRegistry};
use kairos_core::metrics;
use kairos_core::runtime::{Ctx, Processor, Record};
use kairos_core::store::DueTimer;
use kairos_core::time::Millis;
use prometheus::IntCounterVec;

pub enum FeedbackInput {
    Outcome(Box<Outcome>),
    Decision(Box<Decision>),
}

pub struct FeedbackProcessor {
    /// Scenario names from the configuration: the only values a label may take.
    scenarios: std::collections::HashSet<String>,
    outcomes_topic: String,
    decisions_topic: String,
    outcomes: IntCounterVec,
    decisions: IntCounterVec,
}

impl FeedbackProcessor {
    pub fn new(config: &Config, registry: &prometheus::Registry) -> Self {
        let outcomes = metrics::counter_vec(
            registry,
            "kairos_message_outcomes_total",
            "Message outcomes (sent, delivered, opened, clicked, bounced, ...), counted once per outcome id.",
            &["channel", "scenario", "category", "kind"],
        );
        // Start every known series at zero so rates exist before the first event.
        for channel in config.delivery.keys() {
            for s in &config.scenarios {
                for kind in OutcomeKind::ALL {
                    outcomes.with_label_values(&[
                        channel.as_str(),
                        &s.name,
                        s.category.as_str(),
                        kind.as_str(),
                    ]);
                }
            }
        }
        FeedbackProcessor {
            scenarios: config.scenarios.iter().map(|s| s.name.clone()).collect(),
            outcomes_topic: config.topic(topics::OUTCOMES),
            decisions_topic: config.topic(topics::DECISIONS),
            outcomes,
            decisions: metrics::counter_vec(
                registry,
                "kairos_decisions_total",
                "Arbiter decisions seen by feedback, by scenario, outcome and rule.",
                &["scenario", "outcome", "rule"],
            ),
        }
    }
}

impl FeedbackProcessor {
    /// A scenario label that stays bounded whatever arrives on the topics.
    fn scenario_label<'a>(&self, scenario: &'a str) -> &'a str {
        if self.scenarios.contains(scenario) {
            scenario
        } else {
            "other"
        }
    }
}

impl Processor for FeedbackProcessor {
    type Input = FeedbackInput;

    fn name(&self) -> &str {
        "feedback"
    }

    fn inputs(&self) -> Vec<String> {
        vec![self.outcomes_topic.clone(), self.decisions_topic.clone()]
    }

    fn decode(&self, record: &Record<'_>) -> Result<FeedbackInput, Rejection> {
        if record.topic == self.outcomes_topic {
            Ok(FeedbackInput::Outcome(Box::new(decode_internal(
                record.payload,
            )?)))
        } else {
            Ok(FeedbackInput::Decision(Box::new(decode_internal(
                record.payload,
            )?)))
        }
    }

    fn event_time(&self, input: &FeedbackInput) -> Option<Millis> {
        Some(match input {
            FeedbackInput::Outcome(o) => o.occurred_at,
            FeedbackInput::Decision(d) => d.decided_at,
        })
    }

    fn process(&mut self, ctx: &mut Ctx<'_>, input: FeedbackInput) -> anyhow::Result<()> {
        match input {
            FeedbackInput::Outcome(o) => {
                let key = format!("o/{}", o.outcome_id);
                if ctx.get::<Millis>(&key)?.is_some() {
                    return Ok(());
                }
                ctx.put(&key, &o.occurred_at)?;
                self.outcomes
                    .with_label_values(&[
                        o.channel.as_str(),
                        self.scenario_label(&o.scenario),
                        o.category.as_str(),
                        o.kind.as_str(),
                    ])
                    .inc();
            }
            FeedbackInput::Decision(d) => {
                let key = format!("d/{}", d.decision_id);
                if ctx.get::<Millis>(&key)?.is_some() {
                    return Ok(());
                }
                ctx.put(&key, &d.decided_at)?;
                self.decisions
                    .with_label_values(&[
                        self.scenario_label(&d.scenario),
                        d.outcome.as_str(),
                        // Rules are a fixed set in the arbiter; anything else is foreign.
                        if d.rule.len() <= 40
                            && d.rule.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                        {
                            &d.rule
                        } else {
                            "other"
                        },
                    ])
                    .inc();
            }
        }
        Ok(())
    }

    fn on_timer(&mut self, _ctx: &mut Ctx<'_>, _timer: &DueTimer) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Runs feedback until `cancel` fires.
pub async fn run(
    config: Arc<Config>,
    admin: Arc<AdminState>,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let processor = FeedbackProcessor::new(&config, &admin.registry);
    kairos_core::runtime::run(&config, processor, admin, SchemaRegistry::new(None), cancel).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn labels_stay_bounded() {
        let config = Config::from_text(
            Path::new("t.toml"),
            "[[scenarios]]\nname = \"welcome\"\nkind = \"welcome\"\nchannels = [\"email\"]\ntemplate = \"t\"\n",
            &[],
        )
        .unwrap();
        let registry = prometheus::Registry::new();
        let f = FeedbackProcessor::new(&config, &registry);
        assert_eq!(f.scenario_label("welcome"), "welcome");
        assert_eq!(f.scenario_label("customer-42-special"), "other");
    }
}
