//! Outcomes flow back into the arbiter's state: an unsubscribe, a hard bounce and a
//! spam complaint suppress what they must, in event time, through the same engine
//! the service runs.

use std::path::Path;
use std::sync::Arc;

use kairos_arbiter::ArbiterProcessor;
use kairos_core::config::Config;
use kairos_core::contracts::{
    Channel, Contacts, Decision, DecisionOutcome, MessageCategory, Outcome, OutcomeKind,
    SendCommand, Trigger,
};
use kairos_core::replay::Replayer;
use kairos_core::time::HOUR;

const CONFIG: &str = r#"
[kafka]
partitions = 2

[state]
max_batch_records = 1

[clock]
mode = "event"

[arbiter]
control_group_percent = 0

[[scenarios]]
name = "welcome"
kind = "welcome"
channels = ["email", "push"]
template = "welcome"

[[scenarios]]
name = "weekly_promo"
kind = "welcome"
category = "promo"
channels = ["email"]
template = "promo"
"#;

const T0: i64 = 1_767_603_600_000;

struct Arbiter {
    replayer: Replayer<ArbiterProcessor>,
    config: Arc<Config>,
    decisions: Vec<Decision>,
    sends: Vec<SendCommand>,
    _dir: tempfile::TempDir,
}

impl Arbiter {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let state_dir = dir.path().display().to_string();
        let config = Arc::new(
            Config::from_text(
                Path::new("test.toml"),
                CONFIG,
                &[("KAIROS__STATE__DIR".into(), state_dir)],
            )
            .expect("test config"),
        );
        let registry = prometheus::Registry::new();
        let processor = ArbiterProcessor::new(config.clone(), &registry);
        let replayer = Replayer::new(processor, &config, &registry).expect("replayer");
        Arbiter {
            replayer,
            config,
            decisions: Vec::new(),
            sends: Vec::new(),
            _dir: dir,
        }
    }

    fn push<T: serde::Serialize>(&mut self, topic: &str, customer: &str, value: &T) {
        let topic = self.config.topic(topic);
        let payload = serde_json::to_vec(value).expect("json");
        let mut out = self
            .replayer
            .push(&topic, customer.as_bytes(), &payload)
            .expect("push");
        out.extend(self.replayer.commit().expect("commit"));
        for entry in out.into_iter().filter(|e| !e.changelog) {
            if entry.topic == self.config.topic("decisions") {
                self.decisions
                    .push(serde_json::from_slice(&entry.payload).expect("decision"));
            } else if entry.topic.contains("send.") {
                self.sends
                    .push(serde_json::from_slice(&entry.payload).expect("send command"));
            }
        }
    }

    /// Feeds a trigger and returns its decision.
    fn trigger(
        &mut self,
        id: &str,
        scenario: &str,
        category: MessageCategory,
        at: i64,
    ) -> Decision {
        let t = Trigger {
            trigger_id: id.into(),
            scenario: scenario.into(),
            customer_id: "c1".into(),
            category,
            step: 0,
            template: scenario.into(),
            channels: vec![Channel::email, Channel::push],
            priority: 50,
            fired_at: at,
            valid_until: at + 24 * HOUR,
            cause_event_id: None,
            cause_occurred_at: at,
            contacts: Contacts {
                email: Some("c1@example.com".into()),
                push_token: Some("token-1".into()),
                consented_channels: vec![Channel::email, Channel::push],
                ..Contacts::default()
            },
            variables: "{}".into(),
        };
        self.push("triggers", "c1", &t);
        self.decisions
            .iter()
            .rev()
            .find(|d| d.trigger_id == id)
            .cloned()
            .expect("every trigger gets a decision")
    }

    fn outcome(&mut self, send: &SendCommand, kind: OutcomeKind, at: i64) {
        let o = Outcome {
            outcome_id: format!("{}-{}", send.send_id, kind.as_str()),
            send_id: send.send_id.clone(),
            customer_id: send.customer_id.clone(),
            scenario: send.scenario.clone(),
            channel: send.channel,
            category: send.category,
            kind,
            reason: None,
            occurred_at: at,
        };
        self.push("outcomes", &send.customer_id, &o);
    }

    fn last_send(&self) -> SendCommand {
        self.sends.last().cloned().expect("a send")
    }
}

#[test]
fn an_unsubscribe_moves_later_messages_to_the_next_channel_and_then_suppresses() {
    let mut a = Arbiter::new();
    let first = a.trigger("t1", "welcome", MessageCategory::trigger, T0);
    assert_eq!(first.outcome, DecisionOutcome::sent);
    assert_eq!(first.channel, Some(Channel::email));
    let email = a.last_send();
    a.outcome(&email, OutcomeKind::unsubscribed, T0 + HOUR);

    // E-mail is gone for good; push still has consent.
    let second = a.trigger("t2", "welcome", MessageCategory::trigger, T0 + 2 * HOUR);
    assert_eq!(second.outcome, DecisionOutcome::sent);
    assert_eq!(second.channel, Some(Channel::push));
    let push = a.last_send();
    a.outcome(&push, OutcomeKind::unsubscribed, T0 + 3 * HOUR);

    let third = a.trigger("t3", "welcome", MessageCategory::trigger, T0 + 30 * HOUR);
    assert_eq!(third.outcome, DecisionOutcome::suppressed);
    assert_eq!(third.rule, "unsubscribed");
    assert_eq!(a.sends.len(), 2, "no send after both unsubscribes");
}

#[test]
fn a_hard_bounce_suppresses_the_address_that_bounced() {
    let mut a = Arbiter::new();
    a.trigger("t1", "welcome", MessageCategory::trigger, T0);
    let email = a.last_send();
    assert_eq!(email.address.as_deref(), Some("c1@example.com"));
    a.outcome(&email, OutcomeKind::bounced_hard, T0 + 1);
    let next = a.trigger("t2", "welcome", MessageCategory::trigger, T0 + 2 * HOUR);
    assert_eq!(next.channel, Some(Channel::push), "{next:?}");
}

#[test]
fn a_complaint_stops_promo_but_not_trigger_messages() {
    let mut a = Arbiter::new();
    a.trigger("t1", "welcome", MessageCategory::trigger, T0);
    let email = a.last_send();
    a.outcome(&email, OutcomeKind::complained, T0 + HOUR);
    let promo = a.trigger("p1", "weekly_promo", MessageCategory::promo, T0 + 30 * HOUR);
    assert_eq!(promo.outcome, DecisionOutcome::suppressed);
    assert_eq!(promo.rule, "complaint");
    let service = a.trigger("t2", "welcome", MessageCategory::trigger, T0 + 31 * HOUR);
    assert_eq!(service.outcome, DecisionOutcome::sent);
}

#[test]
fn engagement_outcomes_do_not_suppress() {
    let mut a = Arbiter::new();
    a.trigger("t1", "welcome", MessageCategory::trigger, T0);
    let email = a.last_send();
    for kind in [
        OutcomeKind::delivered,
        OutcomeKind::opened,
        OutcomeKind::clicked,
    ] {
        a.outcome(&email, kind, T0 + HOUR);
    }
    let next = a.trigger("t2", "welcome", MessageCategory::trigger, T0 + 30 * HOUR);
    assert_eq!(next.channel, Some(Channel::email));
}
