//! An arbiter in process on RocksDB, in event time, fed triggers and outcomes through
//! the same engine the service runs.

#![allow(dead_code)] // each test file uses part of the harness

use std::path::Path;
use std::sync::Arc;

use kairos_arbiter::ArbiterProcessor;
use kairos_core::config::Config;
use kairos_core::contracts::{
    Channel, Contacts, CustomerAction, CustomerActionKind, Decision, MessageCategory, Outcome,
    OutcomeKind, SendCommand, Trigger,
};
use kairos_core::replay::Replayer;
use kairos_core::store::OutboxEntry;
use kairos_core::time::HOUR;

pub const CONFIG: &str = r#"
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
name = "onboarding"
kind = "welcome"
channels = ["email"]
template = "onboarding"
steps = [{ delay = "1d", template = "onboarding_2" }, { delay = "1d", template = "onboarding_3" }]

[[scenarios]]
name = "cart_cascade"
kind = "abandoned_cart"
channels = ["email", "push", "sms"]
template = "cart"
cascade = ["1h", "4h"]

[[scenarios]]
name = "come_back"
kind = "reactivation"
category = "promo"
channels = ["email"]
template = "come_back"
delay = "30d"

[[scenarios]]
name = "weekly_promo"
kind = "welcome"
category = "promo"
channels = ["email"]
template = "promo"
exit_on_purchase = false
"#;

/// A transactional order notice (a scenario the arbiter knows, or it cancels them).
pub const ORDER_STATUS: &str = r#"
[[scenarios]]
name = "order_status"
kind = "order_update"
category = "transactional"
channels = ["email"]
template = "order_status"
"#;

/// A scenario for customers who entered At Risk, cascading from e-mail to push an
/// hour later; it ends when they leave the segment.
pub const WIN_BACK: &str = r#"
[[scenarios]]
name = "win_back"
kind = "segment_entered"
segment = "At Risk"
channels = ["email", "push"]
template = "win_back"
cascade = ["1h"]
"#;

/// Epoch millis of an RFC 3339 instant.
pub fn at(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .expect("RFC 3339")
        .timestamp_millis()
}

/// An arbiter of the configuration `text` on the state in `dir`.
fn open(
    dir: &Path,
    text: &str,
) -> (
    Arc<Config>,
    prometheus::Registry,
    Replayer<ArbiterProcessor>,
) {
    let state_dir = dir.display().to_string();
    let config = Arc::new(
        Config::from_text(
            Path::new("test.toml"),
            text,
            &[("KAIROS__STATE__DIR".into(), state_dir)],
        )
        .expect("test config"),
    );
    let registry = prometheus::Registry::new();
    let processor = ArbiterProcessor::new(config.clone(), &registry);
    let replayer = Replayer::new(processor, &config, &registry).expect("replayer");
    (config, registry, replayer)
}

/// `from` merged into `into` at `at`, as the profile tells the arbiter.
pub fn merged_into(from: &str, into: &str, at: i64) -> CustomerAction {
    CustomerAction {
        merged_into: Some(into.into()),
        ..CustomerAction::new(
            format!("merged-{from}"),
            from.into(),
            CustomerActionKind::merged,
            at,
        )
    }
}

/// 2026-01-05T09:00:00Z, a Monday.
pub const T0: i64 = 1_767_603_600_000;

pub struct Arbiter {
    /// The arbiter's metrics.
    pub registry: prometheus::Registry,
    pub time_zone: Option<String>,
    /// None only while `restart_with` swaps it (the store's lock allows one).
    replayer: Option<Replayer<ArbiterProcessor>>,
    config: Arc<Config>,
    pub decisions: Vec<Decision>,
    pub sends: Vec<SendCommand>,
    /// Customer actions the arbiter emitted (merged ledgers on their way).
    pub actions: Vec<CustomerAction>,
    /// Dead letters, as JSON.
    pub dead_letters: Vec<serde_json::Value>,
    _dir: tempfile::TempDir,
}

impl Arbiter {
    pub fn new() -> Self {
        Self::with_config("")
    }

    /// An arbiter with `extra` appended to the `[arbiter]` section.
    pub fn with_config(extra: &str) -> Self {
        Self::with_config_and_scenarios(extra, "")
    }

    /// An arbiter with further `[[scenarios]]` after the test configuration's.
    pub fn with_scenarios(scenarios: &str) -> Self {
        Self::with_config_and_scenarios("", scenarios)
    }

    /// Both of the above.
    pub fn with_config_and_scenarios(extra: &str, scenarios: &str) -> Self {
        let config = CONFIG.replace("[arbiter]\n", &format!("[arbiter]\n{extra}\n"));
        Self::from_text(&format!("{config}\n{scenarios}"))
    }

    pub fn from_text(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, replayer) = open(dir.path(), text);
        Arbiter {
            registry,
            time_zone: None,
            replayer: Some(replayer),
            config,
            decisions: Vec::new(),
            sends: Vec::new(),
            actions: Vec::new(),
            dead_letters: Vec::new(),
            _dir: dir,
        }
    }

    /// Stops the arbiter and starts it again on its state with the configuration
    /// `text` (a scenario switched off or removed meanwhile).
    pub fn restart_with(&mut self, text: &str) {
        drop(self.replayer.take());
        let (config, registry, replayer) = open(self._dir.path(), text);
        (self.config, self.registry, self.replayer) = (config, registry, Some(replayer));
    }

    fn engine(&mut self) -> &mut Replayer<ArbiterProcessor> {
        self.replayer.as_mut().expect("a running arbiter")
    }

    /// The merged ledger of `from` (its JSON `state`) arriving for c1, as the arbiter
    /// sends it to itself after a merge.
    pub fn merge_in(&mut self, from: &str, state: &str, at: i64) {
        use kairos_core::contracts::{CustomerAction, CustomerActionKind};
        let action = CustomerAction {
            state: Some(state.into()),
            merged_from: Some(from.into()),
            ..CustomerAction::new(
                format!("merge-{from}"),
                "c1".into(),
                CustomerActionKind::merge_in,
                at,
            )
        };
        self.push("customer-actions", "c1", &action);
    }

    pub fn push<T: serde::Serialize>(&mut self, topic: &str, customer: &str, value: &T) {
        let topic = self.config.topic(topic);
        let payload = serde_json::to_vec(value).expect("json");
        let mut out = self
            .engine()
            .push(&topic, customer.as_bytes(), &payload)
            .expect("push");
        out.extend(self.engine().commit().expect("commit"));
        self.collect(out);
    }

    /// Writes a raw state value for `customer`'s partition, as an earlier version of
    /// Kairos would have left it.
    pub fn put_raw_state(&self, customer: &str, key: &str, value: &[u8]) {
        self.store_of(customer)
            .put_now(key.as_bytes(), value)
            .expect("raw write");
    }

    /// When the timer `timer_id` in `customer`'s partition is due, if one is armed.
    pub fn timer_due(&self, customer: &str, timer_id: &str) -> Option<i64> {
        self.store_of(customer)
            .timer_fire_at(&Default::default(), timer_id)
            .expect("timer read")
    }

    /// The store of `customer`'s partition.
    fn store_of(&self, customer: &str) -> &kairos_core::store::PartitionStore {
        let partition =
            kairos_core::replay::partition_for(customer.as_bytes(), self.config.kafka.partitions);
        self.replayer
            .as_ref()
            .expect("a running arbiter")
            .engine
            .store(partition)
            .expect("partition store")
    }

    /// Moves event time to `t`: deferred triggers whose time came are decided.
    pub fn advance_to(&mut self, t: i64) {
        let out = self.engine().advance_to(t).expect("advance");
        self.collect(out);
    }

    fn collect(&mut self, out: Vec<OutboxEntry>) {
        for entry in out.into_iter().filter(|e| !e.changelog) {
            if entry.topic == self.config.topic("decisions") {
                self.decisions
                    .push(serde_json::from_slice(&entry.payload).expect("decision"));
            } else if entry.topic == self.config.topic("customer-actions") {
                self.actions
                    .push(serde_json::from_slice(&entry.payload).expect("customer action"));
            } else if entry.topic == self.config.topic("deadletter") {
                self.dead_letters
                    .push(serde_json::from_slice(&entry.payload).expect("dead letter"));
            } else if entry.topic.contains("send.") {
                self.sends
                    .push(serde_json::from_slice(&entry.payload).expect("send command"));
            }
        }
    }

    /// Feeds a trigger and returns its decision.
    pub fn trigger(
        &mut self,
        id: &str,
        scenario: &str,
        category: MessageCategory,
        at: i64,
    ) -> Decision {
        let t = self.trigger_of(id, scenario, category, at);
        self.push_trigger(&t)
    }

    /// Feeds a trigger built by the test and returns its decision.
    pub fn push_trigger(&mut self, t: &Trigger) -> Decision {
        self.push("triggers", &t.customer_id.clone(), t);
        self.decisions
            .iter()
            .rev()
            .find(|d| d.trigger_id == t.trigger_id)
            .cloned()
            .expect("every trigger gets a decision")
    }

    /// A trigger of customer c1 with e-mail and push, caused at `at`.
    pub fn trigger_of(
        &self,
        id: &str,
        scenario: &str,
        category: MessageCategory,
        at: i64,
    ) -> Trigger {
        Trigger {
            merged_from: Vec::new(),
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
                time_zone: self.time_zone.clone(),
                ..Contacts::default()
            },
            variables: "{}".into(),
        }
    }

    /// Customer c1 bought at `at` (as the profile reports it).
    pub fn purchase(&mut self, id: &str, at: i64) {
        let action = CustomerAction {
            order_id: Some(format!("order-{id}")),
            ..CustomerAction::new(id.into(), "c1".into(), CustomerActionKind::purchase, at)
        };
        self.push("customer-actions", "c1", &action);
    }

    /// Customer c1's till sale at `at`, as the profile reports a receipt (which may
    /// arrive hours after the sale).
    pub fn till_sale(&mut self, id: &str, at: i64) {
        let action = CustomerAction {
            order_id: Some(format!("receipt-{id}")),
            till_sale: true,
            ..CustomerAction::new(id.into(), "c1".into(), CustomerActionKind::purchase, at)
        };
        self.push("customer-actions", "c1", &action);
    }

    /// Customer c1's first visit of a day at `at` (as the profile reports it).
    pub fn visit(&mut self, id: &str, at: i64) {
        let action = CustomerAction::new(id.into(), "c1".into(), CustomerActionKind::visit, at);
        self.push("customer-actions", "c1", &action);
    }

    /// Customer c1 left `segment` at `at` (as the profile reports a transition out of
    /// a segment a `segment_entered` scenario targets).
    pub fn left_segment(&mut self, id: &str, segment: &str, at: i64) {
        let action = CustomerAction {
            segment: Some(segment.into()),
            ..CustomerAction::new(id.into(), "c1".into(), CustomerActionKind::left_segment, at)
        };
        self.push("customer-actions", "c1", &action);
    }

    /// Customer c1's contacts changed at `at` (as the profile reports it).
    pub fn contacts_changed(&mut self, id: &str, contacts: Contacts, at: i64) {
        let action = CustomerAction {
            contacts: Some(contacts),
            ..CustomerAction::new(
                id.into(),
                "c1".into(),
                CustomerActionKind::contacts_changed,
                at,
            )
        };
        self.push("customer-actions", "c1", &action);
    }

    /// Customer c1 was merged into `into` (as the profile reports it).
    pub fn merged_into(&mut self, id: &str, into: &str, at: i64) {
        let action = CustomerAction {
            merged_into: Some(into.into()),
            ..CustomerAction::new(id.into(), "c1".into(), CustomerActionKind::merged, at)
        };
        self.push("customer-actions", "c1", &action);
    }

    /// The profile forgot customer c1 (anonymous, no event within the retention).
    pub fn forgotten(&mut self, id: &str, at: i64) {
        let action = CustomerAction::new(id.into(), "c1".into(), CustomerActionKind::forgotten, at);
        self.push("customer-actions", "c1", &action);
    }

    /// Whether `customer`'s ledger is in the committed state.
    pub fn ledger_stored(&self, customer: &str) -> bool {
        self.store_of(customer)
            .get(
                &kairos_core::store::Pending::default(),
                format!("c/{customer}").as_bytes(),
            )
            .expect("read")
            .is_some()
    }

    /// `customer`'s ledger as committed.
    pub fn stored_ledger(&self, customer: &str) -> Option<kairos_arbiter::CustomerLedger> {
        let bytes = self
            .store_of(customer)
            .get(
                &kairos_core::store::Pending::default(),
                format!("c/{customer}").as_bytes(),
            )
            .expect("read")?;
        Some(kairos_core::encoding::decode_state(&bytes).expect("ledger decodes"))
    }

    /// Customer c1 gave consent on `channel` at `at` (as the profile reports it).
    pub fn opt_in(&mut self, id: &str, channel: Channel, at: i64) {
        let action = CustomerAction {
            channel: Some(channel),
            ..CustomerAction::new(id.into(), "c1".into(), CustomerActionKind::opt_in, at)
        };
        self.push("customer-actions", "c1", &action);
    }

    /// The decisions of one trigger, in order.
    pub fn decisions_of(&self, id: &str) -> Vec<&Decision> {
        self.decisions
            .iter()
            .filter(|d| d.trigger_id == id)
            .collect()
    }

    /// The decisions of one trigger other than deferrals: exactly one is expected.
    pub fn finals_of(&self, id: &str) -> Vec<&Decision> {
        self.decisions
            .iter()
            .filter(|d| {
                d.trigger_id == id && d.outcome != kairos_core::contracts::DecisionOutcome::deferred
            })
            .collect()
    }

    pub fn outcome(&mut self, send: &SendCommand, kind: OutcomeKind, at: i64) {
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
            address: None,
        };
        self.push("outcomes", &send.customer_id, &o);
    }

    pub fn last_send(&self) -> SendCommand {
        self.sends.last().cloned().expect("a send")
    }
}
