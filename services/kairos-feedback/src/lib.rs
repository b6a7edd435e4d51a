//! Feedback: outcomes, decisions and purchases flow back into metrics.
//!
//! Outcomes are deduplicated by outcome id (a re-sent record counts once, so "opened"
//! counts unique opens per send), then counted by channel, scenario, category and kind;
//! decisions by outcome and rule. Purchases convert the customer's touches within the
//! attribution window (every one for its scenario's rate and lift, the last one for
//! the revenue; see `attribution`): a marketing trigger's final decision is a touch in
//! the experiment group the arbiter drew the customer into, whatever it decided (intent
//! to treat: a message stopped by what earlier messages caused, a sunset or an
//! unsubscribe, still counts as treated), so conversions of the two groups, and the
//! incremental lift per scenario, can be compared. Labels are bounded: scenario names
//! come from the configuration, never from customer data.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::Context;
use kairos_core::admin::AdminState;
use kairos_core::config::{topics, Config};
use kairos_core::contracts::{
    Channel, CountedOrder, CustomerEvent, CustomerMerge, Decision, DecisionOutcome, EventType,
    IdentifiedRecord, MessageCategory, OfflineReceipt, OrderStatus, Outcome, OutcomeKind,
    ReceiptKind, DECISION_RULES,
};
use kairos_core::dedup::{Seen, SeenIds};
use kairos_core::encoding::{decode_internal, Rejection, SchemaRegistry};
use kairos_core::metrics;
use kairos_core::runtime::{Ctx, Processor, Record};
use kairos_core::store::DueTimer;
use kairos_core::time::Millis;
use prometheus::{CounterVec, GaugeVec, IntCounterVec, Opts};
use serde::{Deserialize, Serialize};

pub mod attribution;
pub mod expiry;

use attribution::{add_touch, live_touch, Group, SentStep, StoredTouches, Touch};
use expiry::{TouchExpiry, SWEEP_TIMER, TOUCH_PREFIX};

/// Failure reasons a label may take; anything else counts as "other".
const FAILURE_REASONS: [&str; 7] = [
    "expired",
    "template",
    "permanent",
    "retries_exhausted",
    "circuit_open",
    "invalid_address",
    "consent_withdrawn",
];

/// Rates per scenario and channel shown directly on /metrics (process lifetime), so the
/// demo shows them without a Prometheus server; the recording rules compute the same
/// over sliding windows.
const MESSAGE_RATES: [(&str, &[OutcomeKind], &[OutcomeKind]); 7] = [
    ("delivery", &[OutcomeKind::delivered], &[OutcomeKind::sent]),
    ("open", &[OutcomeKind::opened], &[OutcomeKind::delivered]),
    ("click", &[OutcomeKind::clicked], &[OutcomeKind::delivered]),
    (
        "click_to_open",
        &[OutcomeKind::clicked],
        &[OutcomeKind::opened],
    ),
    (
        "unsubscribe",
        &[OutcomeKind::unsubscribed],
        &[OutcomeKind::delivered],
    ),
    (
        "complaint",
        &[OutcomeKind::complained],
        &[OutcomeKind::delivered],
    ),
    (
        "bounce",
        &[OutcomeKind::bounced_hard, OutcomeKind::bounced_soft],
        &[OutcomeKind::sent],
    ),
];

/// A purchase, online or offline, as attribution needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Purchase {
    pub event_id: String,
    /// The order (web) or receipt (till) it is, as the profile counts it: once per
    /// customer, whatever event ids carry it (a producer's retry under a new id, a
    /// receipt file uploaded twice). None for a purchase without an order id.
    pub order_key: Option<String>,
    pub customer_id: String,
    pub occurred_at: Millis,
    pub value: f64,
    pub source: &'static str,
    /// When its record was written to its topic, if known (see `on_purchase`).
    pub written_at: Option<Millis>,
}

/// Timers that delete a merged customer's forwarding note (`~fwd/<customer>`).
const FORWARD_EXPIRY: &str = "~fwd/";

/// Where a merged customer's forwarding note is kept: the merge.
fn forward_key(customer_id: &str) -> String {
    ["fwd/", customer_id].concat()
}

/// Timers of purchases waiting for `feedback.attribution_delay` (`attr/<event id>`).
const PENDING_PURCHASE: &str = "attr/";

/// A purchase waiting to be attributed (a timer's payload).
#[derive(Debug, Serialize, Deserialize)]
#[serde(from = "StoredPendingPurchase")]
pub struct PendingPurchase {
    customer_id: String,
    at: Millis,
    value: f64,
    /// Absent in timers set before purchases could follow a merge (last: stored
    /// positionally, see `encode_state`; read through `StoredPendingPurchase`).
    event_id: String,
}

/// A [`PendingPurchase`] as any version stored it: positionally before `event_id`, with
/// it last (this version) or second (the versions that put it there: a feedback service
/// upgraded with such timers waiting would fail on them for ever, the timer firing
/// again after every failed batch), or with field names (before positional state).
/// Tuples, as an untagged struct variant reads only from a map.
#[derive(Deserialize)]
#[serde(untagged)]
enum StoredPendingPurchase {
    EventIdLast(String, Millis, f64, String),
    NoEventId(String, Millis, f64),
    EventIdSecond(String, String, Millis, f64),
    Named {
        customer_id: String,
        at: Millis,
        value: f64,
        #[serde(default)]
        event_id: String,
    },
}

impl From<StoredPendingPurchase> for PendingPurchase {
    fn from(stored: StoredPendingPurchase) -> Self {
        let (customer_id, at, value, event_id) = match stored {
            StoredPendingPurchase::EventIdLast(customer_id, at, value, event_id)
            | StoredPendingPurchase::EventIdSecond(customer_id, event_id, at, value)
            | StoredPendingPurchase::Named {
                customer_id,
                at,
                value,
                event_id,
            } => (customer_id, at, value, event_id),
            StoredPendingPurchase::NoEventId(customer_id, at, value) => {
                (customer_id, at, value, String::new())
            }
        };
        PendingPurchase {
            customer_id,
            at,
            value,
            event_id,
        }
    }
}

pub enum FeedbackInput {
    Outcome(Box<Outcome>),
    Decision(Box<Decision>),
    Purchase(Purchase),
    /// The identity processor merged `from` into `into` (keyed by `from`): its touches
    /// go to the survivor.
    MergeOut(CustomerMerge),
    /// A merged customer's touches arrive at the survivor.
    TouchesIn(CustomerMerge, Vec<Touch>, Vec<CountedOrder>),
    /// A merged customer's purchase, still waiting when the merge came, arrives at the
    /// survivor to be attributed (counted already).
    PurchaseIn(PendingPurchase),
    /// An order cancelled (its `order_key`, the time): read before its purchase, the
    /// purchase counts for nothing, as in the profile.
    Cancelled(String, Millis),
    /// A customer event that is not a purchase (or one the profile processor
    /// dead-letters: feedback leaves bad input to it).
    Ignored(Option<Millis>),
}

/// Per-scenario tallies behind the lifetime conversion and lift gauges.
#[derive(Debug, Default, Clone, Copy)]
struct ScenarioTally {
    touches: [u64; 2],
    conversions: [u64; 2],
}

/// Prometheus handles of the feedback service.
struct FeedbackMetrics {
    outcomes: IntCounterVec,
    failures: IntCounterVec,
    decisions: IntCounterVec,
    touches: IntCounterVec,
    conversions: IntCounterVec,
    scenario_conversions: IntCounterVec,
    conversion_revenue: CounterVec,
    purchases: IntCounterVec,
    purchase_revenue: CounterVec,
    conversion_rate: GaugeVec,
    lift: GaugeVec,
    message_rates: GaugeVec,
    before_window: IntCounterVec,
}

impl FeedbackMetrics {
    fn new(registry: &prometheus::Registry) -> Self {
        let float_counter = |name: &str, help: &str, labels: &[&str]| {
            metrics::register(
                registry,
                CounterVec::new(Opts::new(name, help), labels).expect("valid counter definition"),
            )
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            metrics::register(
                registry,
                GaugeVec::new(Opts::new(name, help), labels).expect("valid gauge definition"),
            )
        };
        let attribution_labels = &["scenario", "channel", "group"];
        FeedbackMetrics {
            outcomes: metrics::counter_vec(
                registry,
                "kairos_message_outcomes_total",
                "Message outcomes (sent, delivered, opened, clicked, bounced, ...), counted once per send and kind: opened and clicked are unique opens and clicks.",
                &["channel", "scenario", "category", "kind"],
            ),
            failures: metrics::counter_vec(
                registry,
                "kairos_message_failures_total",
                "Failed sends, by channel and reason.",
                &["channel", "reason"],
            ),
            decisions: metrics::counter_vec(
                registry,
                "kairos_decisions_total",
                "Arbiter decisions seen by feedback, by scenario, outcome and rule.",
                &["scenario", "outcome", "rule"],
            ),
            touches: metrics::counter_vec(
                registry,
                "kairos_attribution_touches_total",
                "Touches that can earn a conversion: every final decision of a marketing trigger, by the experiment group it falls in (intent to treat: suppressed, expired and cancelled ones too, channel none unless sent).",
                attribution_labels,
            ),
            conversions: metrics::counter_vec(
                registry,
                "kairos_conversions_total",
                "Touches followed by a purchase within the attribution window (last touch), at most one per touch.",
                attribution_labels,
            ),
            scenario_conversions: metrics::counter_vec(
                registry,
                "kairos_scenario_conversions_total",
                "Touches followed by a purchase within the attribution window, whatever touched the customer since (one per touch): the numerator of the scenario's conversion rate and lift.",
                &["scenario", "group"],
            ),
            conversion_revenue: float_counter(
                "kairos_conversion_revenue_total",
                "Revenue of purchases attributed to the last touch within the attribution window.",
                attribution_labels,
            ),
            purchases: metrics::counter_vec(
                registry,
                "kairos_purchases_total",
                "All purchases, attributed or not, by source (online, offline).",
                &["source"],
            ),
            purchase_revenue: float_counter(
                "kairos_purchase_revenue_total",
                "Revenue of all purchases, by source (online, offline).",
                &["source"],
            ),
            conversion_rate: gauge(
                "kairos_scenario_conversion_rate",
                "Converted touches per touch since this process started, by scenario and group.",
                &["scenario", "group"],
            ),
            lift: gauge(
                "kairos_scenario_lift_ratio",
                "Incremental lift since this process started: treatment conversion rate / control conversion rate - 1 (0 until the control group has a conversion: a lift over a rate of 0 is unknown).",
                &["scenario"],
            ),
            message_rates: gauge(
                "kairos_scenario_message_rate",
                "Message rates since this process started, by scenario, channel and rate (delivery, open, click, click_to_open, unsubscribe, complaint, bounce); at most 1, as engagement with messages delivered before the process started counts without their delivery.",
                &["scenario", "channel", "rate"],
            ),
            before_window: metrics::counter_vec(
                registry,
                "kairos_feedback_records_before_window_total",
                "Outcomes, decisions and purchases not counted because they are older than state.dedup_window (a copy of them may have been counted and its id forgotten), by kind.",
                &["kind"],
            ),
        }
    }
}

pub struct FeedbackProcessor {
    /// Scenario names and channels from the configuration: the only values a label may take.
    scenarios: HashMap<String, Vec<Channel>>,
    window: Millis,
    /// `feedback.attribution_delay`: how long a purchase waits before it is attributed.
    delay: Millis,
    /// `identity.forward_retention`: how long a merged customer's touches are sent on.
    forward_retention: Millis,
    outcomes_topic: String,
    decisions_topic: String,
    offline_topic: String,
    /// Events with their customer resolved, read instead of the raw event topics when
    /// identity resolution is on.
    identified_topic: Option<String>,
    event_topics: HashSet<String>,
    registry: SchemaRegistry,
    /// Purchase values in `profile.currency`, as the profile counts them.
    currencies: kairos_core::input::Currencies,
    metrics: FeedbackMetrics,
    tallies: HashMap<String, ScenarioTally>,
    /// Outcomes per configured scenario and channel, by kind, since the process started.
    outcome_counts: HashMap<(String, Channel), [u64; OutcomeKind::ALL.len()]>,
    changed_outcomes: HashSet<(String, Channel)>,
    /// Ids seen, by [`RecordKind`], kept for `state.dedup_window`.
    seen: [SeenIds; 3],
    /// Sends that failed or bounced hard: they reached nobody, and earn no revenue
    /// for their channel (see [`Touch::reached_channel`]). Kept for the dedup window,
    /// and at least as long as a purchase can come for them.
    unreached: SeenIds,
    touch_expiry: TouchExpiry,
    /// Per partition: the conversion-rate tallies count the touches decided at or
    /// after the first one this process counted there (set then, forgotten when the
    /// partition leaves), and the conversions of those only, so that a touch counted
    /// before a restart or by another instance, converting here, stays out of both.
    /// Kept in memory, not with the touches, so that state stays the same whether the
    /// process was restarted or not. (A touch handed over by a merge may still convert
    /// here uncounted: the rate is capped at 1.)
    tally_since: HashMap<i32, Millis>,
    /// How far ahead of the truth a device may date an event (`clock.max_event_lead`).
    max_event_lead: Millis,
}

/// The records feedback deduplicates by id.
#[derive(Debug, Clone, Copy)]
enum RecordKind {
    Outcome = 0,
    Decision = 1,
    Purchase = 2,
}

impl RecordKind {
    const ALL: [RecordKind; 3] = [
        RecordKind::Outcome,
        RecordKind::Decision,
        RecordKind::Purchase,
    ];

    fn as_str(self) -> &'static str {
        match self {
            RecordKind::Outcome => "outcome",
            RecordKind::Decision => "decision",
            RecordKind::Purchase => "purchase",
        }
    }
}

impl FeedbackProcessor {
    pub fn new(
        config: &Config,
        registry: SchemaRegistry,
        prometheus: &prometheus::Registry,
    ) -> Self {
        let m = FeedbackMetrics::new(prometheus);
        // Start every known series at zero so rates and dashboards exist before the
        // first event.
        for s in &config.scenarios {
            for channel in config.delivery.keys() {
                for kind in OutcomeKind::ALL {
                    m.outcomes.with_label_values(&[
                        channel.as_str(),
                        &s.name,
                        s.category.as_str(),
                        kind.as_str(),
                    ]);
                }
            }
            for channel in &s.channels {
                let labels = [s.name.as_str(), channel.as_str(), Group::Treatment.as_str()];
                m.touches.with_label_values(&labels);
                m.conversions.with_label_values(&labels);
                m.conversion_revenue.with_label_values(&labels);
                for (rate, _, _) in MESSAGE_RATES {
                    m.message_rates
                        .with_label_values(&[&s.name, channel.as_str(), rate]);
                }
            }
            for group in [Group::Treatment, Group::Control] {
                let unsent = [s.name.as_str(), "none", group.as_str()];
                m.touches.with_label_values(&unsent);
                m.conversions.with_label_values(&unsent);
                m.conversion_revenue.with_label_values(&unsent);
            }
            for group in [Group::Treatment, Group::Control] {
                m.conversion_rate
                    .with_label_values(&[&s.name, group.as_str()]);
                m.scenario_conversions
                    .with_label_values(&[&s.name, group.as_str()]);
            }
            m.lift.with_label_values(&[&s.name]);
            for (outcome, rule) in DECISION_RULES {
                m.decisions
                    .with_label_values(&[&s.name, outcome.as_str(), rule]);
            }
        }
        for channel in config.delivery.keys() {
            for reason in FAILURE_REASONS.iter().chain(&["other"]) {
                m.failures.with_label_values(&[channel.as_str(), reason]);
            }
        }
        for kind in RecordKind::ALL {
            m.before_window.with_label_values(&[kind.as_str()]);
        }
        for source in ["online", "offline"] {
            m.purchases.with_label_values(&[source]);
            m.purchase_revenue.with_label_values(&[source]);
        }
        FeedbackProcessor {
            scenarios: config
                .scenarios
                .iter()
                .map(|s| (s.name.clone(), s.channels.clone()))
                .collect(),
            window: config.feedback.attribution_window.as_millis() as Millis,
            delay: Millis::try_from(config.feedback.attribution_delay.as_millis())
                .unwrap_or(Millis::MAX),
            forward_retention: Millis::try_from(config.identity.forward_retention.as_millis())
                .unwrap_or(Millis::MAX),
            outcomes_topic: config.topic(topics::OUTCOMES),
            decisions_topic: config.topic(topics::DECISIONS),
            offline_topic: config.topic(topics::OFFLINE_EVENTS),
            identified_topic: config
                .identity
                .enabled
                .then(|| config.topic(topics::IDENTIFIED_EVENTS)),
            event_topics: [
                config.topic(topics::SITE_EVENTS),
                config.topic(topics::APP_EVENTS),
            ]
            .into_iter()
            .collect(),
            registry,
            currencies: kairos_core::input::Currencies::new(&config.profile),
            metrics: m,
            tallies: HashMap::new(),
            outcome_counts: HashMap::new(),
            changed_outcomes: HashSet::new(),
            // The same keys as before ids expired (`o/`, `d/`, `p/`), so a store
            // written then still knows what it counted.
            seen: [
                SeenIds::new("o/", "ox", config.state.dedup_window),
                SeenIds::new("d/", "dx", config.state.dedup_window),
                SeenIds::new("p/", "px", config.state.dedup_window),
            ],
            unreached: SeenIds::new(
                "nr/",
                "nrx",
                (config.state.dedup_window)
                    .max(config.feedback.attribution_window + config.feedback.attribution_delay),
            ),
            touch_expiry: TouchExpiry::new(
                config.feedback.attribution_window,
                config.state.dedup_window,
                config.feedback.attribution_delay,
            ),
            tally_since: HashMap::new(),
            max_event_lead: Millis::try_from(config.clock.max_event_lead.as_millis())
                .unwrap_or(Millis::MAX),
        }
    }

    /// A scenario label that stays bounded whatever arrives on the topics.
    fn scenario_label<'a>(&self, scenario: &'a str) -> &'a str {
        if self.scenarios.contains_key(scenario) {
            scenario
        } else {
            "other"
        }
    }

    /// Records the id as seen; false when it was seen before (a redelivered record)
    /// or when the record is older than the deduplication window (counted apart: a
    /// copy of it may have been counted and forgotten).
    fn first_time(
        &self,
        ctx: &mut Ctx<'_>,
        kind: RecordKind,
        id: &str,
        at: Millis,
    ) -> anyhow::Result<bool> {
        match self.seen[kind as usize].check(ctx, id, at)? {
            Seen::First => Ok(true),
            Seen::Again => Ok(false),
            Seen::BeforeWindow => {
                self.metrics
                    .before_window
                    .with_label_values(&[kind.as_str()])
                    .inc();
                Ok(false)
            }
        }
    }

    /// Records an order as counted (a cancellation read before its purchase, an
    /// order counted for a merged customer): not a record of its own, so one older
    /// than the window is left out without counting it as a record not counted.
    fn mark_counted(&self, ctx: &mut Ctx<'_>, id: &str, at: Millis) -> anyhow::Result<()> {
        self.seen[RecordKind::Purchase as usize].check(ctx, id, at)?;
        Ok(())
    }

    fn on_outcome(&mut self, ctx: &mut Ctx<'_>, o: &Outcome) -> anyhow::Result<()> {
        if !self.first_time(ctx, RecordKind::Outcome, &o.outcome_id, o.occurred_at)? {
            return Ok(());
        }
        self.metrics
            .outcomes
            .with_label_values(&[
                o.channel.as_str(),
                self.scenario_label(&o.scenario),
                o.category.as_str(),
                o.kind.as_str(),
            ])
            .inc();
        if self.scenarios.contains_key(&o.scenario) {
            let key = (o.scenario.clone(), o.channel);
            self.outcome_counts.entry(key.clone()).or_default()[outcome_index(o.kind)] += 1;
            self.changed_outcomes.insert(key);
        }
        if o.kind == OutcomeKind::failed {
            self.metrics
                .failures
                .with_label_values(&[o.channel.as_str(), failure_reason(o.reason.as_deref())])
                .inc();
        }
        // Whenever it is read, before or after its decision: the purchase is
        // attributed later, and asks then.
        if matches!(o.kind, OutcomeKind::failed | OutcomeKind::bounced_hard) {
            self.unreached.check(ctx, &o.send_id, o.occurred_at)?;
        }
        Ok(())
    }

    fn on_decision(&mut self, ctx: &mut Ctx<'_>, d: &Decision) -> anyhow::Result<()> {
        if !self.first_time(ctx, RecordKind::Decision, &d.decision_id, d.decided_at)? {
            return Ok(());
        }
        let scenario = self.scenario_label(&d.scenario).to_string();
        // Rules are a fixed set in the arbiter; anything else is foreign.
        let rule = DECISION_RULES
            .iter()
            .find(|(_, r)| *r == d.rule)
            .map_or("other", |(_, r)| *r);
        self.metrics
            .decisions
            .with_label_values(&[&scenario, d.outcome.as_str(), rule])
            .inc();
        // Service messages (order status, receipts) are no marketing touch: they would
        // take conversions from the campaign before them, and have no control group.
        if d.category == MessageCategory::transactional {
            return Ok(());
        }
        // A cascade's next channel is the same message again, not another touch: a
        // held-out customer has one decision for the trigger, so counting each step
        // would divide the treated customers' conversions by up to three.
        let sent_on = d.channel.filter(|_| d.outcome == DecisionOutcome::sent);
        let step = match (sent_on, &d.send_id) {
            (Some(channel), Some(send_id)) => Some(SentStep {
                send_id: send_id.clone(),
                channel,
                at: d.decided_at,
            }),
            _ => None,
        };
        if d.rule == CASCADE_RULE {
            // Its channel earns what the customer buys after it (see
            // `Touch::reached_channel`).
            return match step {
                Some(step) => self.add_cascade_step(ctx, d, step),
                None => Ok(()),
            };
        }
        let group = match (d.group, d.outcome) {
            // The arbiter names the group on each trigger's final decision.
            (Some(g), _) => Group::from(g),
            // Decisions of an arbiter from before groups: sent and held out only.
            (None, DecisionOutcome::sent) if sent_on.is_some() => Group::Treatment,
            (None, DecisionOutcome::held_out) => Group::Control,
            (None, _) => return Ok(()),
        };
        let touch = Touch {
            scenario,
            channel: sent_on,
            at: d.decided_at,
            converted: false,
            group: Some(group),
            message: matches!(d.outcome, DecisionOutcome::sent | DecisionOutcome::held_out),
            decision_id: Some(d.decision_id.clone()),
            counted_by: None,
            lift_converted: false,
            trigger_id: Some(d.trigger_id.clone()),
            steps: step.into_iter().collect(),
        };
        self.metrics
            .touches
            .with_label_values(&touch.labels())
            .inc();
        let since = *self.tally_since.entry(ctx.partition).or_insert(touch.at);
        if touch.at >= since {
            self.tally(&touch.scenario).touches[touch.group().index()] += 1;
            self.refresh_scenario_gauges(&touch.scenario);
        }
        self.keep_touches(ctx, &d.customer_id, vec![touch], false)
    }

    /// Adds a cascade's later message to the touch of its trigger, if the customer's
    /// touches hold it (the trigger's first decision comes before its steps, on the
    /// same partition of the same topic).
    fn add_cascade_step(
        &mut self,
        ctx: &mut Ctx<'_>,
        d: &Decision,
        step: SentStep,
    ) -> anyhow::Result<()> {
        let key = touch_key(&d.customer_id);
        let mut touches = self.touches_of(ctx, &key)?;
        let Some(touch) = touches
            .iter_mut()
            .find(|t| t.trigger_id.as_deref() == Some(d.trigger_id.as_str()))
        else {
            return Ok(());
        };
        if touch.steps.iter().any(|s| s.send_id == step.send_id) {
            return Ok(());
        }
        let at = touch.steps.partition_point(|s| s.at <= step.at);
        touch.steps.insert(at, step);
        ctx.put(&key, &touches)
    }

    /// Adds `new` to `customer`'s touches (each once with `once`: touches handed over
    /// by a merge may come again), or sends them on to the customer it was merged into
    /// (a decision read after the merge, or touches handed over to a customer merged on
    /// since), while the forwarding note lasts.
    fn keep_touches(
        &mut self,
        ctx: &mut Ctx<'_>,
        customer: &str,
        new: Vec<Touch>,
        once: bool,
    ) -> anyhow::Result<()> {
        if let Some(merge) = ctx.get::<CustomerMerge>(&forward_key(customer))? {
            return self.send_touches(ctx, &merge, &new, Vec::new());
        }
        let key = touch_key(customer);
        let mut touches = self.touches_of(ctx, &key)?;
        for touch in new {
            match touches.iter_mut().find(|t| once && t.same_touch(&touch)) {
                Some(known) => {
                    known.converted |= touch.converted;
                    known.lift_converted |= touch.lift_converted;
                }
                None => add_touch(&mut touches, touch, self.window),
            }
        }
        // Touches no purchase can reach any more go; a late one among them too.
        let now = ctx.now();
        touches.retain(|t| self.touch_expiry.expires_at(t.at) > now);
        let Some(newest) = touches.iter().map(|t| t.at).max() else {
            return Ok(());
        };
        ctx.put(&key, &touches)?;
        self.touch_expiry.arm(ctx, newest)
    }

    /// Sends `touches` and `counted_orders` of `merge.from` on to `merge.into`.
    fn send_touches(
        &self,
        ctx: &mut Ctx<'_>,
        merge: &CustomerMerge,
        touches: &[Touch],
        counted_orders: Vec<CountedOrder>,
    ) -> anyhow::Result<()> {
        let Some(topic) = &self.identified_topic else {
            return Ok(());
        };
        let record = IdentifiedRecord::touches_in {
            merge: merge.clone(),
            touches: serde_json::to_value(touches).context("encode a merged customer's touches")?,
            counted_orders,
        };
        ctx.emit(topic, &merge.into, &record);
        Ok(())
    }

    /// The orders and till receipts counted for `customer` and still kept as counted.
    fn counted_orders_of(
        &self,
        ctx: &Ctx<'_>,
        customer: &str,
    ) -> anyhow::Result<Vec<CountedOrder>> {
        let seen = &self.seen[RecordKind::Purchase as usize];
        let mut orders = Vec::new();
        for kind in ORDER_KINDS {
            let prefix = order_key(kind, customer, "");
            for (key, counted_at) in seen.kept_with_prefix(ctx, &prefix)? {
                if let Some(id) = key.strip_prefix(&prefix) {
                    orders.push(CountedOrder {
                        kind: kind.to_string(),
                        id: id.to_string(),
                        counted_at,
                    });
                }
            }
        }
        Ok(orders)
    }

    /// A merged customer's touches and counted orders arrive at the survivor (or go on
    /// to whomever it was merged into since).
    fn take_over(
        &mut self,
        ctx: &mut Ctx<'_>,
        merge: &CustomerMerge,
        touches: Vec<Touch>,
        counted_orders: Vec<CountedOrder>,
    ) -> anyhow::Result<()> {
        if let Some(onward) = ctx.get::<CustomerMerge>(&forward_key(&merge.into))? {
            return self.send_touches(ctx, &onward, &touches, counted_orders);
        }
        for order in counted_orders {
            let key = order_key(&order.kind, &merge.into, &order.id);
            // Kept as counted from its first count; one older than the window is not.
            self.mark_counted(ctx, &key, order.counted_at)?;
        }
        self.keep_touches(ctx, &merge.into, touches, true)
    }

    /// `m.from` was merged into `m.into`: its touches go there (the identified topic,
    /// keyed by the survivor), so a purchase the person makes as the survivor still
    /// finds the messages sent before the merge. A forwarding note (for
    /// `identity.forward_retention`) sends on what comes for `m.from` later: a decision
    /// read after the merge, touches of a merge into it, a purchase still waiting.
    fn hand_over_touches(&mut self, ctx: &mut Ctx<'_>, m: &CustomerMerge) -> anyhow::Result<()> {
        if self.identified_topic.is_none() {
            return Ok(());
        }
        let key = touch_key(&m.from);
        let touches = self.touches_of(ctx, &key)?;
        let counted_orders = self.counted_orders_of(ctx, &m.from)?;
        if !touches.is_empty() {
            ctx.delete(&key);
        }
        if !touches.is_empty() || !counted_orders.is_empty() {
            self.send_touches(ctx, m, &touches, counted_orders)?;
        }
        ctx.put(&forward_key(&m.from), m)?;
        let expires = m
            .occurred_at
            .max(ctx.now())
            .saturating_add(self.forward_retention);
        ctx.schedule(
            &[FORWARD_EXPIRY, m.from.as_str()].concat(),
            expires,
            &m.from,
        )
    }

    /// The customer's touches under `key`, oldest first (none stored: empty).
    fn touches_of(&self, ctx: &Ctx<'_>, key: &str) -> anyhow::Result<Vec<Touch>> {
        Ok(ctx
            .get::<StoredTouches>(key)?
            .map(StoredTouches::into_vec)
            .unwrap_or_default())
    }

    fn on_purchase(&mut self, ctx: &mut Ctx<'_>, p: &Purchase) -> anyhow::Result<()> {
        if !self.first_time(ctx, RecordKind::Purchase, &p.event_id, p.occurred_at)? {
            return Ok(());
        }
        // One without an order id is counted once per customer by its event id, a key
        // that goes with the customer's counted orders to the survivor of a merge: the
        // app's retry of it, read there, adds nothing.
        let order = (p.order_key.clone())
            .unwrap_or_else(|| order_key(EVENT_ORDER_KIND, &p.customer_id, &p.event_id));
        if !self.first_time(ctx, RecordKind::Purchase, &order, p.occurred_at)? {
            return Ok(());
        }
        self.metrics.purchases.with_label_values(&[p.source]).inc();
        self.metrics
            .purchase_revenue
            .with_label_values(&[p.source])
            .inc_by(p.value.max(0.0));
        // Touches are dated by the arbiter's clock, the purchase by the customer's
        // device, which may run ahead (up to `clock.max_event_lead`): a purchase did
        // not happen after it was read, nor after its record was written, so a fast
        // clock neither pushes it out of the window nor puts it after the message it
        // caused (read late, after a backlog or a restart, it would otherwise convert
        // the message it caused itself). The record's time is its producer's: one
        // more than `clock.max_event_lead` before the device's time (a time in
        // seconds, a producer that dates records by something else) is not taken, as
        // no device runs that far ahead.
        let written = p
            .written_at
            .filter(|w| *w >= p.occurred_at.saturating_sub(self.max_event_lead));
        let pending = PendingPurchase {
            customer_id: p.customer_id.clone(),
            event_id: p.event_id.clone(),
            at: p
                .occurred_at
                .min(ctx.now())
                .min(written.unwrap_or(Millis::MAX)),
            value: p.value,
        };
        if self.delay == 0 {
            // As after a wait: sent on if the customer was merged away.
            return self.attribute_pending(ctx, pending);
        }
        // The decisions before it may not be read yet: it waits for them.
        // The event id alone: it is counted once per partition (see `first_time`).
        let timer = [PENDING_PURCHASE, p.event_id.as_str()].concat();
        ctx.schedule(&timer, ctx.now().saturating_add(self.delay), &pending)
    }

    /// A purchase done waiting: attributed, or sent on after the touches of its
    /// customer if the customer was merged away meanwhile (both leave this partition
    /// for the survivor's in that order, so the touches are there first).
    fn attribute_pending(&mut self, ctx: &mut Ctx<'_>, p: PendingPurchase) -> anyhow::Result<()> {
        let Some(merge) = ctx.get::<CustomerMerge>(&forward_key(&p.customer_id))? else {
            return self.attribute(ctx, &p.customer_id, p.at, p.value);
        };
        if let Some(topic) = &self.identified_topic {
            let record = IdentifiedRecord::purchase_in {
                event_id: p.event_id,
                occurred_at: p.at,
                value: p.value,
                merge: merge.clone(),
            };
            ctx.emit(topic, &merge.into, &record);
        }
        Ok(())
    }

    /// Attributes a purchase of `value` at `at` to the customer's touch before it.
    fn attribute(
        &mut self,
        ctx: &mut Ctx<'_>,
        customer_id: &str,
        at: Millis,
        value: f64,
    ) -> anyhow::Result<()> {
        let key = touch_key(customer_id);
        let mut touches = self.touches_of(ctx, &key)?;
        let Some(newest) = touches.iter().map(|t| t.at).max() else {
            return Ok(());
        };
        // Also arms the sweep of a store whose touches were written before they expired.
        self.touch_expiry.arm(ctx, newest)?;
        // Every touch whose window it falls in converts for its scenario's rate and
        // lift, once; the revenue goes to the last touch alone.
        let mut changed = false;
        for touch in touches.iter_mut() {
            if !touch.lift_conversion(at, self.window) {
                continue;
            }
            touch.lift_converted = true;
            changed = true;
            let (scenario, group) = (touch.scenario.clone(), touch.group());
            self.metrics
                .scenario_conversions
                .with_label_values(&[&scenario, group.as_str()])
                .inc();
            let since = self.tally_since.get(&ctx.partition);
            if since.is_some_and(|since| touch.at >= *since) {
                self.tally(&scenario).conversions[group.index()] += 1;
                self.refresh_scenario_gauges(&scenario);
            }
        }
        if let Some(live) = live_touch(&touches, at, self.window) {
            let unreached = &self.unreached;
            let reached =
                touches[live].reached_channel(at, |send_id| unreached.contains(ctx, send_id))?;
            let touch = &mut touches[live];
            let attribution = touch.attribute(at, self.window);
            if attribution.attributed {
                let labels = [
                    touch.scenario.as_str(),
                    reached.map_or("none", |c| c.as_str()),
                    touch.group().as_str(),
                ];
                self.metrics
                    .conversion_revenue
                    .with_label_values(&labels)
                    .inc_by(value.max(0.0));
                if attribution.first_conversion {
                    self.metrics.conversions.with_label_values(&labels).inc();
                    touch.converted = true;
                    changed = true;
                }
            }
        }
        if changed {
            ctx.put(&key, &touches)?;
        }
        Ok(())
    }

    fn tally(&mut self, scenario: &str) -> &mut ScenarioTally {
        self.tallies.entry(scenario.to_string()).or_default()
    }

    fn refresh_scenario_gauges(&self, scenario: &str) {
        let Some(t) = self.tallies.get(scenario) else {
            return;
        };
        let rates = [Group::Treatment, Group::Control].map(|g| {
            let i = g.index();
            let rate = attribution::ratio(t.conversions[i].min(t.touches[i]), t.touches[i]);
            self.metrics
                .conversion_rate
                .with_label_values(&[scenario, g.as_str()])
                .set(rate.unwrap_or(0.0));
            rate
        });
        if let Some(lift) = attribution::lift(rates[0], rates[1]) {
            self.metrics.lift.with_label_values(&[scenario]).set(lift);
        }
    }

    /// Recomputes the message-rate gauges of the scenarios and channels that changed.
    fn refresh_message_rates(&mut self) {
        for (scenario, channel) in std::mem::take(&mut self.changed_outcomes) {
            let Some(counts) = self.outcome_counts.get(&(scenario.clone(), channel)) else {
                continue;
            };
            let count = |kinds: &[OutcomeKind]| -> u64 {
                kinds.iter().map(|k| counts[outcome_index(*k)]).sum()
            };
            for (rate, numerator, denominator) in MESSAGE_RATES {
                // At most 1: a process started mid-campaign (a restart, partitions
                // moved in) reads opens and clicks of messages delivered before it,
                // whose deliveries it never counted. An open without a tracked
                // delivery is one delivered.
                let (numerator, denominator) = (count(numerator), count(denominator));
                if let Some(value) = attribution::ratio(numerator.min(denominator), denominator) {
                    self.metrics
                        .message_rates
                        .with_label_values(&[&scenario, channel.as_str(), rate])
                        .set(value);
                }
            }
        }
    }

    fn decode_purchase_event(&self, payload: &[u8]) -> FeedbackInput {
        // The profile's checks: what it dead-letters (an infinite total, an empty event
        // id) counts nowhere, revenue included.
        let decoded =
            kairos_core::input::decode_customer_event(payload, &self.registry, &self.currencies);
        let Ok(e) = decoded else {
            return FeedbackInput::Ignored(None);
        };
        self.purchase_of_event(e)
    }

    fn purchase_of_event(&self, e: CustomerEvent) -> FeedbackInput {
        match (e.event_type, e.customer_key()) {
            (EventType::purchase, Some(customer_id)) => FeedbackInput::Purchase(Purchase {
                value: e.purchase_value(),
                order_key: e
                    .order
                    .as_ref()
                    .map(|o| order_key("order", &customer_id, &o.order_id)),
                event_id: e.event_id,
                customer_id,
                occurred_at: e.occurred_at,
                source: "online",
                written_at: None,
            }),
            (EventType::order_status, Some(customer_id)) => match &e.order {
                Some(o) if o.status == Some(OrderStatus::cancelled) => FeedbackInput::Cancelled(
                    order_key("order", &customer_id, &o.order_id),
                    e.occurred_at,
                ),
                _ => FeedbackInput::Ignored(Some(e.occurred_at)),
            },
            _ => FeedbackInput::Ignored(Some(e.occurred_at)),
        }
    }

    fn decode_input(&self, record: &Record<'_>) -> Result<FeedbackInput, Rejection> {
        if record.topic == self.outcomes_topic {
            Ok(FeedbackInput::Outcome(Box::new(decode_internal(
                record.payload,
            )?)))
        } else if record.topic == self.decisions_topic {
            Ok(FeedbackInput::Decision(Box::new(decode_internal(
                record.payload,
            )?)))
        } else if Some(record.topic) == self.identified_topic.as_deref() {
            // Checked and normalized by the identity processor already.
            Ok(match decode_internal::<IdentifiedRecord>(record.payload)? {
                IdentifiedRecord::site(e) | IdentifiedRecord::app(e) => self.purchase_of_event(*e),
                IdentifiedRecord::offline(r) => self.purchase_of_receipt(*r),
                IdentifiedRecord::merge(m) => FeedbackInput::MergeOut(m),
                IdentifiedRecord::touches_in {
                    merge,
                    touches,
                    counted_orders,
                } => {
                    let touches = serde_json::from_value(touches).map_err(|e| {
                        Rejection::new(
                            kairos_core::contracts::DeadLetterReason::invalid_field,
                            format!("touches: the merged customer's touches do not decode: {e}"),
                        )
                    })?;
                    FeedbackInput::TouchesIn(merge, touches, counted_orders)
                }
                IdentifiedRecord::purchase_in {
                    merge,
                    event_id,
                    occurred_at,
                    value,
                } => FeedbackInput::PurchaseIn(PendingPurchase {
                    customer_id: merge.into,
                    event_id,
                    at: occurred_at,
                    value,
                }),
                _ => FeedbackInput::Ignored(None),
            })
        } else if record.topic == self.offline_topic {
            Ok(self.decode_receipt(record.payload))
        } else {
            Ok(self.decode_purchase_event(record.payload))
        }
    }

    fn decode_receipt(&self, payload: &[u8]) -> FeedbackInput {
        let decoded = kairos_core::input::decode_receipt(payload, &self.registry, &self.currencies);
        let Ok(r) = decoded else {
            return FeedbackInput::Ignored(None);
        };
        self.purchase_of_receipt(r)
    }

    fn purchase_of_receipt(&self, r: OfflineReceipt) -> FeedbackInput {
        match (r.kind, r.customer_key()) {
            (ReceiptKind::sale, Some(customer_id)) => FeedbackInput::Purchase(Purchase {
                value: r.total,
                order_key: Some(order_key("receipt", &customer_id, &r.receipt_id)),
                event_id: r.event_id,
                customer_id,
                occurred_at: r.occurred_at,
                source: "offline",
                written_at: None,
            }),
            _ => FeedbackInput::Ignored(Some(r.occurred_at)),
        }
    }
}

/// The kinds of [`order_key`]: web orders, till receipts, and purchases without an
/// order id (by event id).
const ORDER_KINDS: [&str; 3] = ["order", "receipt", EVENT_ORDER_KIND];

/// The [`order_key`] kind of a purchase without an order id.
const EVENT_ORDER_KIND: &str = "event";

/// The id under which an order or receipt is counted once (a web order and a till
/// receipt may share a number: each is its own). NUL parts: no event id has one.
fn order_key(kind: &str, customer_id: &str, id: &str) -> String {
    [kind, "\0", customer_id, "\0", id].concat()
}

/// The arbiter's rule of a cascade's later steps (and of their stops).
const CASCADE_RULE: &str = "cascade";

fn outcome_index(kind: OutcomeKind) -> usize {
    OutcomeKind::ALL
        .iter()
        .position(|k| *k == kind)
        .unwrap_or_default()
}

fn touch_key(customer_id: &str) -> String {
    format!("{TOUCH_PREFIX}{customer_id}")
}

/// The bounded label of a failure reason such as "template: missing variable name".
fn failure_reason(reason: Option<&str>) -> &'static str {
    let head = reason
        .unwrap_or("")
        .split(|c: char| c == ':' || c.is_whitespace())
        .next()
        .unwrap_or("");
    FAILURE_REASONS
        .iter()
        .find(|r| **r == head)
        .copied()
        .unwrap_or("other")
}

impl Processor for FeedbackProcessor {
    type Input = FeedbackInput;

    fn name(&self) -> &str {
        "feedback"
    }

    fn inputs(&self) -> Vec<String> {
        let mut topics = vec![self.outcomes_topic.clone(), self.decisions_topic.clone()];
        // With identity resolution on, raw events are keyed by whatever identifier
        // their producer had (a cookie, a card): only the resolved ones are keyed by
        // the customer the touches are kept under.
        match &self.identified_topic {
            Some(identified) => topics.push(identified.clone()),
            None => {
                topics.push(self.offline_topic.clone());
                topics.extend(self.event_topics.iter().cloned());
            }
        }
        topics.sort();
        topics
    }

    fn decode(&self, record: &Record<'_>) -> Result<FeedbackInput, Rejection> {
        let mut input = self.decode_input(record)?;
        if let FeedbackInput::Purchase(p) = &mut input {
            p.written_at = record.written_at;
        }
        Ok(input)
    }

    /// The site, app and offline events it reads for conversions: one too far ahead
    /// of the clock is dead-lettered here as in the profile, not counted as revenue.
    fn is_raw_input(&self, topic: &str) -> bool {
        topic == self.offline_topic || self.event_topics.contains(topic)
    }

    fn event_time(&self, input: &FeedbackInput) -> Option<Millis> {
        match input {
            FeedbackInput::Outcome(o) => Some(o.occurred_at),
            FeedbackInput::Decision(d) => Some(d.decided_at),
            FeedbackInput::Purchase(p) => Some(p.occurred_at),
            FeedbackInput::MergeOut(m) | FeedbackInput::TouchesIn(m, ..) => Some(m.occurred_at),
            FeedbackInput::PurchaseIn(p) => Some(p.at),
            FeedbackInput::Cancelled(_, at) => Some(*at),
            FeedbackInput::Ignored(at) => *at,
        }
    }

    fn process(&mut self, ctx: &mut Ctx<'_>, input: FeedbackInput) -> anyhow::Result<()> {
        match input {
            FeedbackInput::Outcome(o) => self.on_outcome(ctx, &o),
            FeedbackInput::Decision(d) => self.on_decision(ctx, &d),
            FeedbackInput::Purchase(p) => self.on_purchase(ctx, &p),
            FeedbackInput::MergeOut(m) => self.hand_over_touches(ctx, &m),
            // Each once: a re-sent record after a crash adds nothing, and a conversion
            // either side recorded stays.
            FeedbackInput::TouchesIn(m, touches, orders) => {
                self.take_over(ctx, &m, touches, orders)
            }
            FeedbackInput::PurchaseIn(p) => {
                // Once per customer it reaches: a copy re-sent after a crash comes at a
                // new offset, and would add its revenue again.
                let id = ["in:", p.event_id.as_str(), "@", p.customer_id.as_str()].concat();
                if !self.first_time(ctx, RecordKind::Purchase, &id, p.at)? {
                    return Ok(());
                }
                self.attribute_pending(ctx, p)
            }
            FeedbackInput::Cancelled(order, at) => {
                // Kept as counted: the purchase read after it counts for nothing. (One
                // read before it stays counted: counters only go up.)
                self.mark_counted(ctx, &order, at)
            }
            FeedbackInput::Ignored(_) => Ok(()),
        }
    }

    fn on_partition_closed(&mut self, partition: i32) {
        // Back later, its touches may have been counted by another instance meanwhile.
        self.tally_since.remove(&partition);
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: &DueTimer) -> anyhow::Result<()> {
        // The timers are the purchases waiting for their decisions and the sweeps of
        // the touches and of the ids seen.
        if timer.timer_id.starts_with(PENDING_PURCHASE) {
            let p: PendingPurchase = timer.decode()?;
            return self.attribute_pending(ctx, p);
        }
        if let Some(customer) = timer.timer_id.strip_prefix(FORWARD_EXPIRY) {
            ctx.delete(&forward_key(customer));
            return Ok(());
        }
        if timer.timer_id == SWEEP_TIMER {
            return self.touch_expiry.sweep(ctx, timer);
        }
        if timer.timer_id == self.unreached.timer_id() {
            return self.unreached.sweep(ctx, timer);
        }
        match self.seen.iter().find(|s| s.timer_id() == timer.timer_id) {
            Some(seen) => seen.sweep(ctx, timer),
            None => anyhow::bail!("unknown feedback timer {:?}", timer.timer_id),
        }
    }

    fn flush(&mut self, _ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
        self.refresh_message_rates();
        Ok(())
    }
}

/// Runs feedback until `cancel` fires.
pub async fn run(
    config: Arc<Config>,
    admin: Arc<AdminState>,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let registry = SchemaRegistry::new(config.schema_registry.url.clone());
    let processor = FeedbackProcessor::new(&config, registry.clone(), &admin.registry);
    kairos_core::runtime::run(&config, processor, admin, registry, cancel).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Where the tests' clocks start: input times before 2000 are refused.
    const T0: Millis = 20_000 * kairos_core::time::DAY;

    #[test]
    fn labels_stay_bounded() {
        let config = Config::from_text(
            Path::new("t.toml"),
            "[[scenarios]]\nname = \"welcome\"\nkind = \"welcome\"\nchannels = [\"email\"]\ntemplate = \"t\"\n",
            &[],
        )
        .unwrap();
        let registry = prometheus::Registry::new();
        let f = FeedbackProcessor::new(&config, SchemaRegistry::new(None), &registry);
        assert_eq!(f.scenario_label("welcome"), "welcome");
        assert_eq!(f.scenario_label("customer-42-special"), "other");
    }

    #[test]
    fn a_purchase_waiting_from_any_earlier_version_still_reads() {
        /// The purchase a timer payload written as `stored` reads as: its fields.
        fn read(stored: &impl Serialize) -> (String, String, Millis, f64) {
            let bytes = kairos_core::encoding::encode_state(stored).expect("encode");
            let p: PendingPurchase = kairos_core::encoding::decode_state(&bytes).expect("it reads");
            (p.customer_id, p.event_id, p.at, p.value)
        }
        // The timer payload as written before `event_id`: customer, time, value.
        let older = ("c-1".to_string(), T0, 42.5_f64);
        assert_eq!(read(&older), ("c-1".into(), String::new(), T0, 42.5));
        // As the versions that put the event id second wrote it.
        let second = ("c-2".to_string(), "e-9".to_string(), T0 + 1, 7.0_f64);
        assert_eq!(read(&second), ("c-2".into(), "e-9".into(), T0 + 1, 7.0));
        // And as this version writes it.
        let now = PendingPurchase {
            customer_id: "c-3".into(),
            at: T0 + 2,
            value: 1.5,
            event_id: "e-3".into(),
        };
        assert_eq!(read(&now), ("c-3".into(), "e-3".into(), T0 + 2, 1.5));
        // With field names, as state was written before it was positional.
        let mut named = vec![0xC1];
        rmp_serde::encode::write_named(&mut named, &now).expect("encode");
        let p: PendingPurchase = kairos_core::encoding::decode_state(&named).expect("it reads");
        assert_eq!(
            (p.customer_id.as_str(), p.event_id.as_str()),
            ("c-3", "e-3")
        );
    }

    /// Feedback over `config_text`, its state in `dir`, fed by a replayer.
    fn replayer(
        dir: &Path,
        config_text: &str,
    ) -> (
        Config,
        prometheus::Registry,
        kairos_core::replay::Replayer<FeedbackProcessor>,
    ) {
        let config = Config::from_text(
            Path::new("t.toml"),
            config_text,
            &[("KAIROS__STATE__DIR".into(), dir.display().to_string())],
        )
        .expect("config");
        let registry = prometheus::Registry::new();
        let f = FeedbackProcessor::new(&config, SchemaRegistry::new(None), &registry);
        let replayer = kairos_core::replay::Replayer::new(f, &config, &registry).expect("replayer");
        (config, registry, replayer)
    }

    /// In wall-clock mode a site event days ahead of the clock is dead-lettered, not
    /// counted as a conversion; one a few minutes ahead is applied.
    #[test]
    fn a_site_event_days_ahead_of_the_clock_is_dead_lettered() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(dir.path(), "[clock]\nmode = \"wall\"\n");
        let now = kairos_core::time::wall_now();
        let purchase = |id: &str, at: Millis| {
            serde_json::json!({"event_id": id, "event_type": "purchase", "occurred_at": at,
                "customer_id": "c1", "order": {"order_id": id, "total": 10.0}})
            .to_string()
        };
        let site = config.topic(topics::SITE_EVENTS);
        let mut out = replayer
            .push(
                &site,
                b"c1",
                purchase("far", now + 3 * kairos_core::time::DAY).as_bytes(),
            )
            .expect("push");
        out.extend(
            replayer
                .push(&site, b"c1", purchase("near", now + 5 * 60_000).as_bytes())
                .expect("push"),
        );
        out.extend(replayer.commit().expect("commit"));
        let dead: Vec<String> = out
            .iter()
            .filter(|o| o.topic == config.topic(topics::DEAD_LETTER))
            .map(|o| String::from_utf8_lossy(&o.payload).into_owned())
            .collect();
        assert_eq!(dead.len(), 1, "{dead:#?}");
        assert!(
            dead[0].contains("ahead of this machine's clock"),
            "{}",
            dead[0]
        );
        // Only the near one counts as a purchase.
        assert_eq!(
            counter(&registry, "kairos_purchases_total", &["online"]),
            1.0
        );
        assert_eq!(revenue(&registry, "online"), 10.0);
    }

    /// A purchase dated ahead by the customer's device clock is attributed as of when
    /// it was read: the message 71 hours before its reading is within the 72-hour
    /// window, though 73 hours before the time the device gave.
    #[test]
    fn a_purchase_dated_ahead_by_the_device_is_attributed_as_of_its_reading() {
        use kairos_core::time::HOUR;
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(
            dir.path(),
            "[clock]\nmode = \"wall\"\n[feedback]\nattribution_delay = \"0s\"\n\
             [[scenarios]]\nname = \"welcome\"\nkind = \"welcome\"\n\
             channels = [\"email\"]\ntemplate = \"t\"\n",
        );
        let now = kairos_core::time::wall_now();
        push_email_sent(&config, &mut replayer, "c1", "welcome", now - 71 * HOUR);
        let site = config.topic(topics::SITE_EVENTS);
        replayer
            .push(&site, b"c1", &purchase("p1", "c1", now + 2 * HOUR))
            .expect("push");
        replayer.commit().expect("commit");
        assert_eq!(email_conversions(&registry), (1.0, 10.0));
    }

    /// The purchase that caused a message (a Champions welcome) is not its conversion
    /// however late feedback reads it: it is dated by when its record was written, not
    /// by the reading, when the device's clock runs ahead.
    #[test]
    fn a_purchase_read_late_does_not_convert_the_message_it_caused() {
        use kairos_core::time::{MINUTE, SECOND};
        let dir = tempfile::tempdir().expect("temp dir");
        let text = "[clock]\nmode = \"wall\"\n[feedback]\nattribution_delay = \"0s\"\n\
             [[scenarios]]\nname = \"welcome\"\nkind = \"welcome\"\n\
             channels = [\"email\"]\ntemplate = \"t\"\n";
        let (config, registry, mut replayer) = replayer(dir.path(), text);
        let decoder = FeedbackProcessor::new(
            &config,
            SchemaRegistry::new(None),
            &prometheus::Registry::new(),
        );
        let now = kairos_core::time::wall_now();
        // Written half a minute ago; the message it caused was decided just after.
        let written_at = now - 31 * SECOND;
        push_email_sent(&config, &mut replayer, "c1", "welcome", now - 30 * SECOND);
        let site = config.topic(topics::SITE_EVENTS);
        let payload = purchase("p1", "c1", now + 2 * MINUTE);
        let record = Record {
            topic: &site,
            partition: 0,
            offset: 0,
            key: Some(b"c1"),
            payload: &payload,
            written_at: Some(written_at),
        };
        let decoded = decoder.decode(&record).expect("decodes");
        let FeedbackInput::Purchase(p) = &decoded else {
            panic!("not a purchase");
        };
        assert_eq!(p.written_at, Some(written_at));
        replayer
            .push_decoded(&site, b"c1", &payload, Some(decoded))
            .expect("push");
        replayer.commit().expect("commit");
        assert_eq!(revenue(&registry, "online"), 10.0, "counted as revenue");
        assert_eq!(email_conversions(&registry), (0.0, 0.0));
    }

    /// A record time its producer set in seconds (January 1970) is not taken: the
    /// purchase, read at once, still converts the message before it.
    #[test]
    fn a_record_time_further_back_than_max_event_lead_is_not_taken() {
        use kairos_core::time::MINUTE;
        let dir = tempfile::tempdir().expect("temp dir");
        let text = "[clock]\nmode = \"wall\"\n[feedback]\nattribution_delay = \"0s\"\n\
             [[scenarios]]\nname = \"welcome\"\nkind = \"welcome\"\n\
             channels = [\"email\"]\ntemplate = \"t\"\n";
        let (config, registry, mut replayer) = replayer(dir.path(), text);
        let now = kairos_core::time::wall_now();
        push_email_sent(&config, &mut replayer, "c1", "welcome", now - 60 * MINUTE);
        let site = config.topic(topics::SITE_EVENTS);
        let bought_at = now - 10 * MINUTE;
        let decoded = FeedbackInput::Purchase(Purchase {
            event_id: "p1".into(),
            order_key: None,
            customer_id: "c1".into(),
            occurred_at: bought_at,
            value: 10.0,
            source: "online",
            written_at: Some(bought_at / 1000),
        });
        let payload = purchase("p1", "c1", bought_at);
        replayer
            .push_decoded(&site, b"c1", &payload, Some(decoded))
            .expect("push");
        replayer.commit().expect("commit");
        assert_eq!(email_conversions(&registry), (1.0, 10.0));
    }

    /// Pushes each (key, record) of `records` to the identified topic, the last first,
    /// committing each, then every record feedback sends on there, each keyed by its
    /// own key, until none is left; with `hold`, returns what it sends on instead.
    fn push_identified(
        replayer: &mut kairos_core::replay::Replayer<FeedbackProcessor>,
        identified: &str,
        records: Vec<(String, Vec<u8>)>,
        hold: bool,
    ) -> Vec<(String, Vec<u8>)> {
        let mut queue = records;
        let mut held = Vec::new();
        while let Some((key, payload)) = queue.pop() {
            let mut out = replayer
                .push(identified, key.as_bytes(), &payload)
                .expect("push");
            out.extend(replayer.commit().expect("commit"));
            for o in out.into_iter().filter(|o| o.topic == identified) {
                let next = (String::from_utf8(o.key).expect("key"), o.payload);
                if hold {
                    held.push(next);
                } else {
                    queue.push(next);
                }
            }
        }
        held
    }

    /// The sum of counter `name`'s series that have each of `values` as a label value.
    fn counter(registry: &prometheus::Registry, name: &str, values: &[&str]) -> f64 {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                values
                    .iter()
                    .all(|v| m.get_label().iter().any(|l| l.value() == *v))
            })
            .map(|m| m.get_counter().get_value())
            .sum()
    }

    /// Gauge `name`'s series that has each of `values` as a label value, if set.
    fn gauge(registry: &prometheus::Registry, name: &str, values: &[&str]) -> Option<f64> {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric())
            .find(|m| {
                values
                    .iter()
                    .all(|v| m.get_label().iter().any(|l| l.value() == *v))
            })
            .map(|m| m.get_gauge().get_value())
    }

    /// The lift gauge of `scenario`, if set.
    fn lift(registry: &prometheus::Registry, scenario: &str) -> Option<f64> {
        gauge(registry, "kairos_scenario_lift_ratio", &[scenario])
    }

    /// Feeds the decision that sent an e-mail of `scenario` to `customer` at `at`;
    /// returns what feedback wrote.
    fn push_email_sent(
        config: &Config,
        replayer: &mut kairos_core::replay::Replayer<FeedbackProcessor>,
        customer: &str,
        scenario: &str,
        at: Millis,
    ) -> Vec<kairos_core::store::OutboxEntry> {
        let decision = Decision {
            decision_id: format!("d-{customer}-{at}"),
            trigger_id: format!("t-{customer}-{at}"),
            customer_id: customer.into(),
            scenario: scenario.into(),
            category: MessageCategory::trigger,
            outcome: DecisionOutcome::sent,
            channel: Some(Channel::email),
            send_id: Some(format!("s-{customer}-{at}")),
            rule: "channel_choice".into(),
            reason: "test".into(),
            decided_at: at,
            group: None,
        };
        replayer
            .push(
                &config.topic(topics::DECISIONS),
                customer.as_bytes(),
                &serde_json::to_vec(&decision).expect("encode"),
            )
            .expect("push")
    }

    /// A site purchase `id` of 10.0 by `customer` at `at`.
    /// A purchase of 10 at `at` by each of `customers`, on the site topic.
    fn push_purchases(
        config: &Config,
        replayer: &mut kairos_core::replay::Replayer<FeedbackProcessor>,
        customers: &[&str],
        at: Millis,
    ) {
        let site = config.topic(topics::SITE_EVENTS);
        for customer in customers {
            let purchase = purchase(&format!("p-{customer}"), customer, at);
            replayer
                .push(&site, customer.as_bytes(), &purchase)
                .expect("push");
        }
    }

    fn purchase(id: &str, customer: &str, at: Millis) -> Vec<u8> {
        serde_json::json!({"event_id": id, "event_type": "purchase", "occurred_at": at,
            "customer_id": customer, "order": {"order_id": format!("o-{id}"), "total": 10.0}})
        .to_string()
        .into_bytes()
    }

    /// Conversions and attributed revenue on e-mail.
    fn email_conversions(registry: &prometheus::Registry) -> (f64, f64) {
        (
            counter(registry, "kairos_conversions_total", &["email"]),
            counter(registry, "kairos_conversion_revenue_total", &["email"]),
        )
    }

    /// Revenue of `source` as `registry` exposes it.
    fn revenue(registry: &prometheus::Registry, source: &str) -> f64 {
        counter(registry, "kairos_purchase_revenue_total", &[source])
    }

    /// The message rates since the process started: opens of messages delivered
    /// before it (a restart, partitions moved in) never make a rate above 1.
    #[test]
    fn message_rates_stay_at_most_one_for_a_process_started_mid_campaign() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(
            dir.path(),
            "[clock]\nmode = \"event\"\n\
             [[scenarios]]\nname = \"welcome\"\nkind = \"welcome\"\n\
             channels = [\"email\"]\ntemplate = \"t\"\n",
        );
        let outcome = |send: &str, kind: OutcomeKind, at: Millis| Outcome {
            outcome_id: format!("o-{send}-{}", kind.as_str()),
            send_id: send.into(),
            customer_id: "c1".into(),
            scenario: "welcome".into(),
            channel: Channel::email,
            category: MessageCategory::trigger,
            kind,
            reason: None,
            occurred_at: at,
            address: None,
        };
        let outcomes = config.topic(topics::OUTCOMES);
        for (send, kind) in [
            ("s1", OutcomeKind::opened),
            ("s1", OutcomeKind::clicked),
            ("s2", OutcomeKind::opened),
            ("s2", OutcomeKind::clicked),
            ("s5", OutcomeKind::opened),
            ("s3", OutcomeKind::delivered),
            ("s3", OutcomeKind::clicked),
            ("s4", OutcomeKind::delivered),
            ("s4", OutcomeKind::clicked),
        ] {
            let payload = serde_json::to_vec(&outcome(send, kind, T0)).expect("encode");
            replayer.push(&outcomes, b"c1", &payload).expect("push");
        }
        replayer.commit().expect("commit");
        let rate = |name: &str| {
            gauge(
                &registry,
                "kairos_scenario_message_rate",
                &["welcome", "email", name],
            )
        };
        // Three opens and four clicks; two deliveries seen.
        assert_eq!(rate("open"), Some(1.0));
        assert_eq!(rate("click"), Some(1.0));
        assert_eq!(rate("click_to_open"), Some(1.0));
        assert_eq!(rate("unsubscribe"), Some(0.0));
    }

    /// A replayer attributing at once, with a welcome e-mail sent to `c1` at `T0`.
    fn welcomed_c1(
        dir: &std::path::Path,
    ) -> (
        Config,
        prometheus::Registry,
        kairos_core::replay::Replayer<FeedbackProcessor>,
    ) {
        let (config, registry, mut replayer) = replayer(
            dir,
            "[clock]\nmode = \"event\"\n[feedback]\nattribution_delay = \"0s\"\n\
             [[scenarios]]\nname = \"welcome\"\nkind = \"welcome\"\n\
             channels = [\"email\"]\ntemplate = \"t\"\n",
        );
        push_email_sent(&config, &mut replayer, "c1", "welcome", T0);
        (config, registry, replayer)
    }

    /// An order sent again under a new event id (a producer's retry) and a till
    /// receipt uploaded twice count once, as the profile counts them: purchases,
    /// revenue and the conversion's revenue. A web order and a receipt that share a
    /// number are two purchases.
    #[test]
    fn an_order_or_receipt_sent_again_under_a_new_event_id_counts_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = welcomed_c1(dir.path());
        let site = config.topic(topics::SITE_EVENTS);
        let offline = config.topic(topics::OFFLINE_EVENTS);
        let at = T0 + 3_600_000;
        for event_id in ["e1", "e2"] {
            let order = serde_json::json!({"event_id": event_id, "event_type": "purchase",
                "occurred_at": at, "customer_id": "c1",
                "order": {"order_id": "100", "total": 10.0}});
            replayer
                .push(&site, b"c1", order.to_string().as_bytes())
                .expect("push");
        }
        for event_id in ["r1", "r2"] {
            let receipt = serde_json::json!({"event_id": event_id, "receipt_id": "100",
                "kind": "sale", "occurred_at": at, "customer_id": "c1", "store_id": "s1",
                "total": 7.0, "items": [], "currency": "EUR"});
            replayer
                .push(&offline, b"c1", receipt.to_string().as_bytes())
                .expect("push");
        }
        replayer.commit().expect("commit");
        assert_eq!(
            counter(&registry, "kairos_purchases_total", &["online"]),
            1.0
        );
        assert_eq!(
            counter(&registry, "kairos_purchases_total", &["offline"]),
            1.0
        );
        assert_eq!(revenue(&registry, "online"), 10.0);
        assert_eq!(revenue(&registry, "offline"), 7.0);
        // One conversion, with the revenue of both purchases in its window.
        assert_eq!(email_conversions(&registry), (1.0, 17.0));
    }

    /// A purchase the profile dead-letters (an amount no order has, an empty event id)
    /// adds no revenue here either: a total of 1e308 made the counter infinite for good.
    #[test]
    fn purchases_the_profile_rejects_add_no_revenue() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(dir.path(), "[clock]\nmode = \"event\"\n");
        let site = config.topic(topics::SITE_EVENTS);
        let offline = config.topic(topics::OFFLINE_EVENTS);
        let purchase = |id: &str, total: &str| {
            format!(
                r#"{{"event_id":"{id}","event_type":"purchase","occurred_at":{T0},"customer_id":"c1","order":{{"order_id":"{id}","total":{total}}}}}"#
            )
        };
        for line in [
            purchase("ok", "10.0"),
            purchase("huge-1", "1e308"),
            purchase("huge-2", "1e308"),
            purchase("", "5.0"),
            purchase("negative", "-3.0"),
        ] {
            replayer.push(&site, b"c1", line.as_bytes()).expect("push");
        }
        let receipt = |id: &str, total: &str| {
            format!(
                r#"{{"event_id":"{id}","receipt_id":"{id}","kind":"sale","occurred_at":{T0},"customer_id":"c1","store_id":"s1","total":{total},"items":[],"currency":"EUR"}}"#
            )
        };
        for line in [receipt("r-ok", "7.0"), receipt("r-huge", "1e300")] {
            replayer
                .push(&offline, b"c1", line.as_bytes())
                .expect("push");
        }
        replayer.commit().expect("commit");
        assert_eq!(revenue(&registry, "online"), 10.0);
        assert_eq!(revenue(&registry, "offline"), 7.0);
    }

    /// Revenue counts in `profile.currency`, as the profile counts it: an order in
    /// another currency converted, one in a currency without a rate (dead-lettered by
    /// the profile) not at all.
    #[test]
    fn revenue_counts_in_the_profile_s_currency() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(
            dir.path(),
            "[clock]\nmode = \"event\"\n[profile]\ncurrency = \"EUR\"\n\
             [profile.exchange_rates]\nUSD = 0.5\n",
        );
        let site = config.topic(topics::SITE_EVENTS);
        let offline = config.topic(topics::OFFLINE_EVENTS);
        for (id, total, currency) in [("u", 100.0, "USD"), ("e", 10.0, "EUR"), ("j", 1e3, "JPY")] {
            let line = serde_json::json!({"event_id": id, "event_type": "purchase",
                "occurred_at": T0, "customer_id": "c1",
                "order": {"order_id": id, "total": total, "currency": currency}});
            replayer
                .push(&site, b"c1", line.to_string().as_bytes())
                .expect("push");
        }
        let receipt = serde_json::json!({"event_id": "r", "receipt_id": "r", "kind": "sale",
            "occurred_at": T0, "customer_id": "c1", "store_id": "s1", "total": 40.0,
            "items": [], "currency": "USD"});
        replayer
            .push(&offline, b"c1", receipt.to_string().as_bytes())
            .expect("push");
        replayer.commit().expect("commit");
        assert_eq!(revenue(&registry, "online"), 60.0);
        assert_eq!(revenue(&registry, "offline"), 20.0);
    }

    /// A cascade's e-mail, push and SMS are one touch, as the held-out customer's one
    /// decision is: with the same share buying in both groups the lift is zero.
    #[test]
    fn a_cascade_is_one_touch_however_many_channels_it_walks() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(
            dir.path(),
            "[clock]\nmode = \"event\"\n\
             [[scenarios]]\nname = \"cart\"\nkind = \"abandoned_cart\"\n\
             channels = [\"email\", \"push\", \"sms\"]\ntemplate = \"t\"\n",
        );
        let decisions = config.topic(topics::DECISIONS);
        let decision = |customer: &str, step: &str, outcome, channel, rule: &str, at| Decision {
            decision_id: format!("d-{customer}-{step}"),
            trigger_id: format!("t-{customer}"),
            customer_id: customer.into(),
            scenario: "cart".into(),
            category: MessageCategory::trigger,
            outcome,
            channel,
            send_id: channel.map(|_| format!("s-{customer}-{step}")),
            rule: rule.into(),
            reason: "test".into(),
            decided_at: at,
            group: None,
        };
        let hour = 3_600_000;
        for d in [
            decision(
                "c1",
                "0",
                DecisionOutcome::sent,
                Some(Channel::email),
                "sent",
                T0 + hour,
            ),
            decision(
                "c1",
                "1",
                DecisionOutcome::sent,
                Some(Channel::push),
                "cascade",
                T0 + 2 * hour,
            ),
            decision(
                "c1",
                "2",
                DecisionOutcome::sent,
                Some(Channel::sms),
                "cascade",
                T0 + 3 * hour,
            ),
            decision(
                "c2",
                "0",
                DecisionOutcome::held_out,
                None,
                "control_group",
                T0 + hour,
            ),
        ] {
            let payload = serde_json::to_vec(&d).expect("encode");
            replayer
                .push(&decisions, d.customer_id.as_bytes(), &payload)
                .expect("push");
        }
        push_purchases(&config, &mut replayer, &["c1", "c2"], T0 + 4 * hour);
        // Past `feedback.attribution_delay`, which the purchases wait.
        replayer.advance_to(T0 + 5 * hour).expect("advance");
        replayer.commit().expect("commit");
        let by_group = |name: &str, group: &str| counter(&registry, name, &[group]);
        assert_eq!(
            by_group("kairos_attribution_touches_total", "treatment"),
            1.0
        );
        assert_eq!(by_group("kairos_attribution_touches_total", "control"), 1.0);
        assert_eq!(by_group("kairos_conversions_total", "treatment"), 1.0);
        assert_eq!(by_group("kairos_conversions_total", "control"), 1.0);
        assert_eq!(lift(&registry, "cart"), Some(0.0));
        // One touch, but the SMS before the purchase earns it.
        let revenue = |channel: &str| {
            counter(
                &registry,
                "kairos_conversion_revenue_total",
                &["cart", channel],
            )
        };
        assert_eq!((revenue("email"), revenue("sms")), (0.0, 10.0));
    }

    /// Revenue and the channel's conversion go to the last message of the touch that
    /// reached the customer before the purchase: not to a cascade step that failed,
    /// nor to a message that bounced hard or failed, whose touch earns as one that
    /// sent nothing (channel none). The failure may be read before or after its
    /// decision. The touch stays treated for the lift.
    #[test]
    fn revenue_goes_to_the_last_message_that_reached_the_customer() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(
            dir.path(),
            "[clock]\nmode = \"event\"\n\
             [[scenarios]]\nname = \"cart\"\nkind = \"abandoned_cart\"\n\
             channels = [\"email\", \"push\"]\ntemplate = \"t\"\n",
        );
        let hour = 3_600_000;
        let decisions = config.topic(topics::DECISIONS);
        let outcomes = config.topic(topics::OUTCOMES);
        let decision = |customer: &str, step: &str, channel, rule: &str, at| Decision {
            decision_id: format!("d-{customer}-{step}"),
            trigger_id: format!("t-{customer}"),
            customer_id: customer.into(),
            scenario: "cart".into(),
            category: MessageCategory::trigger,
            outcome: DecisionOutcome::sent,
            channel: Some(channel),
            send_id: Some(format!("s-{customer}-{step}")),
            rule: rule.into(),
            reason: "test".into(),
            decided_at: at,
            group: Some(kairos_core::contracts::ExperimentGroup::treatment),
        };
        let failure = |customer: &str, step: &str, channel, kind: OutcomeKind| Outcome {
            outcome_id: format!("o-{customer}-{step}-{}", kind.as_str()),
            send_id: format!("s-{customer}-{step}"),
            customer_id: customer.into(),
            scenario: "cart".into(),
            channel,
            category: MessageCategory::trigger,
            kind,
            reason: Some("test".into()),
            occurred_at: T0 + 2 * hour,
            address: None,
        };
        let push_decision = |r: &mut kairos_core::replay::Replayer<FeedbackProcessor>,
                             d: Decision| {
            let payload = serde_json::to_vec(&d).expect("encode");
            r.push(&decisions, d.customer_id.as_bytes(), &payload)
                .expect("push");
        };
        let push_outcome = |r: &mut kairos_core::replay::Replayer<FeedbackProcessor>,
                            o: Outcome| {
            let payload = serde_json::to_vec(&o).expect("encode");
            r.push(&outcomes, o.customer_id.as_bytes(), &payload)
                .expect("push");
        };
        // a: e-mail, then a push that failed (read after its decision).
        push_decision(
            &mut replayer,
            decision("a", "0", Channel::email, "sent", T0),
        );
        push_decision(
            &mut replayer,
            decision("a", "1", Channel::push, "cascade", T0 + hour),
        );
        push_outcome(
            &mut replayer,
            failure("a", "1", Channel::push, OutcomeKind::failed),
        );
        // b: an e-mail that bounced hard, the bounce read before the decision.
        push_outcome(
            &mut replayer,
            failure("b", "0", Channel::email, OutcomeKind::bounced_hard),
        );
        push_decision(
            &mut replayer,
            decision("b", "0", Channel::email, "sent", T0),
        );
        push_purchases(&config, &mut replayer, &["a", "b"], T0 + 3 * hour);
        replayer.advance_to(T0 + 4 * hour).expect("advance");
        replayer.commit().expect("commit");
        let earned = |channel: &str, group: &str| {
            (
                counter(&registry, "kairos_conversions_total", &[channel, group]),
                counter(
                    &registry,
                    "kairos_conversion_revenue_total",
                    &[channel, group],
                ),
            )
        };
        assert_eq!(earned("email", "treatment"), (1.0, 10.0), "a's e-mail");
        assert_eq!(earned("push", "treatment"), (0.0, 0.0), "a's failed push");
        assert_eq!(earned("none", "treatment"), (1.0, 10.0), "b's bounce");
        assert_eq!(
            counter(
                &registry,
                "kairos_scenario_conversions_total",
                &["cart", "treatment"]
            ),
            2.0
        );
    }

    /// The conversion-rate gauge of `scenario` and `group`, NaN if not set.
    fn conversion_rate(registry: &prometheus::Registry, scenario: &str, group: &str) -> f64 {
        gauge(
            registry,
            "kairos_scenario_conversion_rate",
            &[scenario, group],
        )
        .unwrap_or(f64::NAN)
    }

    /// The rate gauges count since the process started: a touch counted before a
    /// restart that converts after it counts as a conversion, but not in the rate of
    /// the touches counted since (it would take the rate past 1).
    #[test]
    fn a_touch_from_before_a_restart_stays_out_of_the_conversion_rate() {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = "[clock]\nmode = \"event\"\n\
                    [[scenarios]]\nname = \"cart\"\nkind = \"abandoned_cart\"\n\
                    channels = [\"email\"]\ntemplate = \"t\"\n";
        let hour = 3_600_000;
        {
            let (config, _registry, mut replayer) = replayer(dir.path(), text);
            push_email_sent(&config, &mut replayer, "c1", "cart", T0 + hour);
            replayer.commit().expect("commit");
        }
        let (config, registry, mut replayer) = replayer(dir.path(), text);
        push_email_sent(&config, &mut replayer, "c2", "cart", T0 + 2 * hour);
        // Decided before the first touch this process counted, read after it: out of
        // its rate too, touch and conversion alike.
        push_email_sent(&config, &mut replayer, "c3", "cart", T0 + 90 * 60_000);
        push_purchases(&config, &mut replayer, &["c1", "c2", "c3"], T0 + 3 * hour);
        replayer.advance_to(T0 + 4 * hour).expect("advance");
        replayer.commit().expect("commit");
        assert_eq!(email_conversions(&registry).0, 3.0, "all converted");
        assert_eq!(conversion_rate(&registry, "cart", "treatment"), 1.0);
    }

    /// The rate's start is kept per partition: after a restart whose first touch comes
    /// from a partition behind the others, a touch another partition counted before the
    /// restart, converting after it, stays out of the rate.
    #[test]
    fn the_rate_s_start_after_a_restart_is_each_partition_s_own() {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = "[clock]\nmode = \"event\"\n\
                    [[scenarios]]\nname = \"cart\"\nkind = \"abandoned_cart\"\n\
                    channels = [\"email\"]\ntemplate = \"t\"\n";
        let hour = 3_600_000;
        let (ahead, behind) = ("c1", "c2");
        let quiet;
        {
            let (config, _registry, mut replayer) = replayer(dir.path(), text);
            let partition =
                |c: &str| kairos_core::replay::partition_for(c.as_bytes(), config.kafka.partitions);
            assert_ne!(
                partition(ahead),
                partition(behind),
                "the test needs them apart"
            );
            quiet = (3..100)
                .map(|i| format!("c{i}"))
                .find(|c| partition(c) == partition(behind))
                .expect("a customer on the partition behind");
            push_email_sent(&config, &mut replayer, ahead, "cart", T0 + 3 * hour);
            replayer.commit().expect("commit");
        }
        let (config, registry, mut replayer) = replayer(dir.path(), text);
        // The first touches after the restart, from a partition behind.
        push_email_sent(&config, &mut replayer, behind, "cart", T0 + hour);
        push_email_sent(&config, &mut replayer, &quiet, "cart", T0 + hour);
        push_purchases(&config, &mut replayer, &[ahead, behind], T0 + 4 * hour);
        replayer.advance_to(T0 + 5 * hour).expect("advance");
        replayer.commit().expect("commit");
        assert_eq!(email_conversions(&registry).0, 2.0, "both converted");
        assert_eq!(conversion_rate(&registry, "cart", "treatment"), 0.5);
    }

    /// Intent to treat: every final decision of a marketing trigger is a touch in the
    /// group the arbiter names, whatever it decided. Treated customers whose messages
    /// a sunset or an unsubscribe stopped count as treated: with the same share buying
    /// in both groups the lift is zero (counting only the messages sent, it would be
    /// 1.0). Decisions with no group (a deferral, a cascade's stop) are no touch.
    #[test]
    fn lift_compares_the_groups_as_drawn_not_the_messages_sent() {
        use kairos_core::contracts::ExperimentGroup;
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(
            dir.path(),
            "[clock]\nmode = \"event\"\n\
             [[scenarios]]\nname = \"promo\"\nkind = \"reactivation\"\n\
             channels = [\"email\"]\ntemplate = \"t\"\n",
        );
        let decisions = config.topic(topics::DECISIONS);
        let hour = 3_600_000;
        let decision = |customer: &str, outcome, rule: &str, group| Decision {
            decision_id: format!("d-{customer}-{rule}"),
            trigger_id: format!("t-{customer}"),
            customer_id: customer.into(),
            scenario: "promo".into(),
            category: MessageCategory::promo,
            outcome,
            channel: (outcome == DecisionOutcome::sent).then_some(Channel::email),
            send_id: (outcome == DecisionOutcome::sent).then(|| format!("s-{customer}")),
            rule: rule.into(),
            reason: "test".into(),
            decided_at: T0 + hour,
            group,
        };
        let treatment = Some(ExperimentGroup::treatment);
        let control = Some(ExperimentGroup::control);
        for d in [
            decision("t1", DecisionOutcome::sent, "sent", treatment),
            decision("t2", DecisionOutcome::sent, "sent", treatment),
            decision("t3", DecisionOutcome::suppressed, "sunset", treatment),
            decision("t4", DecisionOutcome::suppressed, "unsubscribed", treatment),
            decision("c1", DecisionOutcome::held_out, "control_group", control),
            decision("c2", DecisionOutcome::held_out, "control_group", control),
            decision("c3", DecisionOutcome::held_out, "control_group", control),
            decision(
                "c4",
                DecisionOutcome::suppressed,
                "no_consented_channel",
                control,
            ),
            // Not final, or not a trigger's own decision: no touch.
            decision("t5", DecisionOutcome::deferred, "quiet_hours", None),
            decision("t6", DecisionOutcome::suppressed, "complaint", None),
        ] {
            let payload = serde_json::to_vec(&d).expect("encode");
            replayer
                .push(&decisions, d.customer_id.as_bytes(), &payload)
                .expect("push");
        }
        // One in four buys in each group: a treated one who got nothing among them.
        push_purchases(
            &config,
            &mut replayer,
            &["t3", "c1", "t5", "t6"],
            T0 + 2 * hour,
        );
        replayer.advance_to(T0 + 3 * hour).expect("advance");
        replayer.commit().expect("commit");
        let sample = |name: &str, values: &[&str]| counter(&registry, name, values);
        let touches = "kairos_attribution_touches_total";
        assert_eq!(sample(touches, &["treatment"]), 4.0);
        assert_eq!(sample(touches, &["treatment", "email"]), 2.0);
        assert_eq!(sample(touches, &["treatment", "none"]), 2.0);
        assert_eq!(sample(touches, &["control"]), 4.0);
        let conversions = "kairos_conversions_total";
        assert_eq!(sample(conversions, &["treatment", "none"]), 1.0);
        assert_eq!(sample(conversions, &["control"]), 1.0);
        assert_eq!(lift(&registry, "promo"), Some(0.0));
    }

    /// A message's own effect, a later message only the treated customer gets (a cart
    /// e-mail's click, then a browse-abandonment e-mail), takes the last-touch
    /// conversion and revenue; for the cart scenario's rate and lift the purchase still
    /// converts its touch, as it converts the held-out customer's. Last touch alone
    /// gave the cart a treatment rate of 0 against a control rate of 1: a lift of -1.
    #[test]
    fn a_later_message_the_treated_get_takes_no_conversion_from_the_lift() {
        use kairos_core::contracts::ExperimentGroup;
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(
            dir.path(),
            "[clock]\nmode = \"event\"\n\
             [[scenarios]]\nname = \"cart\"\nkind = \"abandoned_cart\"\n\
             channels = [\"email\"]\ntemplate = \"t\"\n\
             [[scenarios]]\nname = \"browse\"\nkind = \"browse_abandonment\"\n\
             channels = [\"email\"]\ntemplate = \"t\"\n",
        );
        let decisions = config.topic(topics::DECISIONS);
        let hour = 3_600_000;
        let decision = |customer: &str, scenario: &str, at: Millis, sent: bool| Decision {
            decision_id: format!("d-{customer}-{scenario}"),
            trigger_id: format!("t-{customer}-{scenario}"),
            customer_id: customer.into(),
            scenario: scenario.into(),
            category: MessageCategory::trigger,
            outcome: if sent {
                DecisionOutcome::sent
            } else {
                DecisionOutcome::held_out
            },
            channel: sent.then_some(Channel::email),
            send_id: sent.then(|| format!("s-{customer}-{scenario}")),
            rule: if sent { "sent" } else { "scenario_holdout" }.into(),
            reason: "test".into(),
            decided_at: at,
            group: Some(if sent {
                ExperimentGroup::treatment
            } else {
                ExperimentGroup::control
            }),
        };
        for d in [
            decision("ct", "cart", T0, true),
            decision("ct", "browse", T0 + 2 * hour, true),
            decision("cc", "cart", T0, false),
        ] {
            let payload = serde_json::to_vec(&d).expect("encode");
            replayer
                .push(&decisions, d.customer_id.as_bytes(), &payload)
                .expect("push");
        }
        push_purchases(&config, &mut replayer, &["ct", "cc"], T0 + 3 * hour);
        replayer.advance_to(T0 + 4 * hour).expect("advance");
        replayer.commit().expect("commit");
        let scenario_conversions = |scenario: &str, group: &str| {
            counter(
                &registry,
                "kairos_scenario_conversions_total",
                &[scenario, group],
            )
        };
        assert_eq!(scenario_conversions("cart", "treatment"), 1.0);
        assert_eq!(scenario_conversions("cart", "control"), 1.0);
        assert_eq!(scenario_conversions("browse", "treatment"), 1.0);
        assert_eq!(lift(&registry, "cart"), Some(0.0));
        // The revenue and the channel's conversion stay the last touch's.
        let last_touch = |scenario: &str| {
            counter(
                &registry,
                "kairos_conversion_revenue_total",
                &[scenario, "email"],
            )
        };
        assert_eq!((last_touch("browse"), last_touch("cart")), (10.0, 0.0));
        // A second purchase in the window converts nothing again.
        let site = config.topic(topics::SITE_EVENTS);
        replayer
            .push(&site, b"ct", &purchase("again", "ct", T0 + 5 * hour))
            .expect("push");
        replayer.advance_to(T0 + 6 * hour).expect("advance");
        replayer.commit().expect("commit");
        assert_eq!(scenario_conversions("cart", "treatment"), 1.0);
        assert_eq!(last_touch("browse"), 20.0);
    }

    /// A decision that sent and held out nothing counts as a touch but leaves a
    /// message still in its window its purchases: a cancellation the purchase caused,
    /// read before the purchase, and a repeat purchase after it, stay the message's.
    /// Past the message's window, it becomes the customer's touch.
    #[test]
    fn an_unsent_decision_leaves_a_live_message_its_purchases() {
        use kairos_core::contracts::ExperimentGroup;
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(
            dir.path(),
            "[clock]\nmode = \"event\"\n[feedback]\nattribution_window = \"1day\"\n\
             [[scenarios]]\nname = \"cart\"\nkind = \"abandoned_cart\"\n\
             channels = [\"email\"]\ntemplate = \"t\"\n",
        );
        let decisions = config.topic(topics::DECISIONS);
        let site = config.topic(topics::SITE_EVENTS);
        let hour = 3_600_000;
        let push_decision =
            |replayer: &mut kairos_core::replay::Replayer<_>, id: &str, outcome, rule: &str, at| {
                let sent = outcome == DecisionOutcome::sent;
                let d = Decision {
                    decision_id: id.into(),
                    trigger_id: format!("t-{id}"),
                    customer_id: "m1".into(),
                    scenario: "cart".into(),
                    category: MessageCategory::trigger,
                    outcome,
                    channel: sent.then_some(Channel::email),
                    send_id: sent.then(|| format!("s-{id}")),
                    rule: rule.into(),
                    reason: "test".into(),
                    decided_at: at,
                    group: Some(ExperimentGroup::treatment),
                };
                let payload = serde_json::to_vec(&d).expect("encode");
                replayer.push(&decisions, b"m1", &payload).expect("push");
            };
        push_decision(
            &mut replayer,
            "d1",
            DecisionOutcome::sent,
            "channel_choice",
            T0 + hour,
        );
        push_decision(
            &mut replayer,
            "d2",
            DecisionOutcome::cancelled,
            "purchase_exclusion",
            T0 + 3 * hour,
        );
        let push_purchase = |replayer: &mut kairos_core::replay::Replayer<_>, id: &str, at| {
            replayer
                .push(&site, b"m1", &purchase(id, "m1", at))
                .expect("push");
            // Past `feedback.attribution_delay`, which the purchase waits.
            replayer.advance_to(at + 2 * hour).expect("advance");
            replayer.commit().expect("commit");
        };
        // Bought at 2 h (the cancellation at 3 h was read first) and again at 4 h.
        push_purchase(&mut replayer, "p1", T0 + 2 * hour);
        push_purchase(&mut replayer, "p2", T0 + 4 * hour);
        let sample = |name: &str, channel: &str| counter(&registry, name, &[channel]);
        assert_eq!(sample("kairos_attribution_touches_total", "email"), 1.0);
        assert_eq!(sample("kairos_attribution_touches_total", "none"), 1.0);
        assert_eq!(sample("kairos_conversions_total", "email"), 1.0);
        assert_eq!(sample("kairos_conversion_revenue_total", "email"), 20.0);
        assert_eq!(sample("kairos_conversions_total", "none"), 0.0);
        // A sunset at 30 h comes after the message's window: its touch now.
        push_decision(
            &mut replayer,
            "d3",
            DecisionOutcome::suppressed,
            "sunset",
            T0 + 30 * hour,
        );
        push_purchase(&mut replayer, "p3", T0 + 31 * hour);
        assert_eq!(sample("kairos_conversions_total", "none"), 1.0);
    }

    /// Decisions and purchases come on different topics, each read at its own speed:
    /// a purchase waits `feedback.attribution_delay` for the decisions before it. One
    /// read before the message it followed converts it when the message comes within
    /// the delay, not after; one read after a newer message belongs to the one before
    /// it. Purchases and their revenue count when read.
    #[test]
    fn a_purchase_waits_for_the_decisions_before_it() {
        use kairos_core::contracts::ExperimentGroup;
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(
            dir.path(),
            "[clock]\nmode = \"event\"\n\
             [feedback]\nattribution_window = \"1day\"\nattribution_delay = \"10m\"\n\
             [[scenarios]]\nname = \"cart\"\nkind = \"abandoned_cart\"\n\
             channels = [\"email\", \"push\"]\ntemplate = \"t\"\n",
        );
        let decisions = config.topic(topics::DECISIONS);
        let hour = 3_600_000;
        let minute = 60_000;
        let push_decision =
            |replayer: &mut kairos_core::replay::Replayer<_>, customer: &str, channel, at| {
                let d = Decision {
                    decision_id: format!("d-{customer}-{at}"),
                    trigger_id: format!("t-{customer}-{at}"),
                    customer_id: customer.into(),
                    scenario: "cart".into(),
                    category: MessageCategory::trigger,
                    outcome: DecisionOutcome::sent,
                    channel: Some(channel),
                    send_id: Some(format!("s-{customer}-{at}")),
                    rule: "channel_choice".into(),
                    reason: "test".into(),
                    decided_at: at,
                    group: Some(ExperimentGroup::treatment),
                };
                let payload = serde_json::to_vec(&d).expect("encode");
                replayer
                    .push(&decisions, customer.as_bytes(), &payload)
                    .expect("push");
            };
        let push_purchase = |replayer: &mut kairos_core::replay::Replayer<_>, customer: &str| {
            push_purchases(&config, replayer, &[customer], T0 + 2 * hour)
        };
        let sum = |name: &str, values: &[&str]| counter(&registry, name, values);
        // a1 and a2 bought at 2 h after an e-mail at 1 h; the purchases are read first.
        push_purchase(&mut replayer, "a1");
        push_purchase(&mut replayer, "a2");
        // a3 got an e-mail at 1 h, bought at 2 h, and got a push 5 minutes later, read
        // first. (Event time: the delay runs on the clock the input moves.)
        push_decision(&mut replayer, "a3", Channel::email, T0 + hour);
        push_decision(
            &mut replayer,
            "a3",
            Channel::push,
            T0 + 2 * hour + 5 * minute,
        );
        push_purchase(&mut replayer, "a3");
        replayer.commit().expect("commit");
        assert_eq!(sum("kairos_purchases_total", &[]), 3.0);
        assert_eq!(sum("kairos_conversions_total", &[]), 0.0, "all three wait");
        // a1's e-mail comes within the delay; a2's only after it.
        push_decision(&mut replayer, "a1", Channel::email, T0 + hour);
        replayer
            .advance_to(T0 + 2 * hour + 11 * minute)
            .expect("advance");
        push_decision(&mut replayer, "a2", Channel::email, T0 + hour);
        replayer.advance_to(T0 + 4 * hour).expect("advance");
        replayer.commit().expect("commit");
        assert_eq!(
            sum("kairos_conversions_total", &["email"]),
            2.0,
            "a1 and a3"
        );
        assert_eq!(sum("kairos_conversion_revenue_total", &["email"]), 20.0);
        assert_eq!(sum("kairos_conversions_total", &["push"]), 0.0);
        assert_eq!(sum("kairos_attribution_touches_total", &[]), 4.0);
    }

    /// With identity resolution on, purchases come resolved from `identified-events`:
    /// a card-only receipt, resolved to the customer the touch is kept under, converts
    /// it; the raw topics (keyed by any identifier) are not read.
    #[test]
    fn with_identity_on_resolved_purchases_convert_the_customer_s_touch() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(
            dir.path(),
            "[clock]\nmode = \"event\"\n[identity]\nenabled = true\n\
             [[scenarios]]\nname = \"welcome\"\nkind = \"welcome\"\nchannels = [\"email\"]\n\
             template = \"t\"\n",
        );
        let identified = config.topic(topics::IDENTIFIED_EVENTS);
        let inputs = replayer.engine.processor.inputs();
        assert!(inputs.contains(&identified), "{inputs:?}");
        assert!(!inputs.contains(&config.topic(topics::OFFLINE_EVENTS)));
        assert!(!inputs.contains(&config.topic(topics::SITE_EVENTS)));
        let hour = 3_600_000;
        push_email_sent(&config, &mut replayer, "c1", "welcome", T0 + hour);
        // The till only had the card; the identity processor named the customer.
        let receipt: OfflineReceipt = serde_json::from_value(serde_json::json!({
            "event_id": "r-1", "receipt_id": "r-1", "kind": "sale", "occurred_at": T0 + 2 * hour,
            "store_id": "s1", "customer_id": "c1", "loyalty_card": "K1", "total": 12.5,
            "currency": "EUR", "items": []}))
        .expect("receipt");
        let record = IdentifiedRecord::offline(Box::new(receipt));
        replayer
            .push(
                &identified,
                b"c1",
                &serde_json::to_vec(&record).expect("encode"),
            )
            .expect("push");
        replayer.advance_to(T0 + 3 * hour).expect("advance");
        replayer.commit().expect("commit");
        let sum = |name: &str| counter(&registry, name, &[]);
        assert_eq!(sum("kairos_conversions_total"), 1.0);
        assert_eq!(sum("kairos_conversion_revenue_total"), 12.5);
        assert_eq!(revenue(&registry, "offline"), 12.5);
    }

    /// A cart reminder goes to the anonymous visitor who left an e-mail; the visitor
    /// logs in (merged into the customer) and buys: the purchase, resolved to the
    /// customer, converts the reminder. The touches move once, however often the
    /// merge's records come; a reminder read after the merge follows them, until
    /// `identity.forward_retention` is over.
    #[test]
    fn touches_follow_a_merge_to_the_survivor() {
        use kairos_core::time::DAY;
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(
            dir.path(),
            "[clock]\nmode = \"event\"\n[identity]\nenabled = true\nforward_retention = \"10d\"\n\
             [[scenarios]]\nname = \"cart\"\nkind = \"abandoned_cart\"\n\
             channels = [\"email\"]\ntemplate = \"t\"\n",
        );
        let identified = config.topic(topics::IDENTIFIED_EVENTS);
        let hour = 3_600_000;
        push_email_sent(&config, &mut replayer, "anon:v1", "cart", T0 + hour);
        let merge = IdentifiedRecord::merge(CustomerMerge {
            merge_id: "m-1".into(),
            from: "anon:v1".into(),
            into: "c1".into(),
            identifier: "email:v1@example.com".into(),
            occurred_at: T0 + 2 * hour,
        });
        let merge = serde_json::to_vec(&merge).expect("encode");
        let mut handed = Vec::new();
        for _ in 0..2 {
            let mut out = replayer
                .push(&identified, b"anon:v1", &merge)
                .expect("push");
            out.extend(replayer.commit().expect("commit"));
            handed.extend(out.into_iter().filter(|o| o.topic == identified));
        }
        assert_eq!(
            handed.len(),
            1,
            "the second merge record finds nothing to hand over"
        );
        // A second reminder to the visitor, read after the merge: sent on too.
        let mut out = push_email_sent(
            &config,
            &mut replayer,
            "anon:v1",
            "cart",
            T0 + hour + hour / 2,
        );
        out.extend(replayer.commit().expect("commit"));
        handed.extend(out.into_iter().filter(|o| o.topic == identified));
        assert_eq!(handed.len(), 2);
        // The customer's purchase is read before the touches come (they take two
        // hops): it waits for them.
        let purchase = IdentifiedRecord::site(Box::new(
            serde_json::from_slice(&purchase("p-1", "c1", T0 + 3 * hour)).expect("event"),
        ));
        replayer
            .push(
                &identified,
                b"c1",
                &serde_json::to_vec(&purchase).expect("encode"),
            )
            .expect("push");
        for record in [&handed[0], &handed[0], &handed[1]] {
            assert_eq!(record.key, b"c1");
            replayer
                .push(&identified, b"c1", &record.payload)
                .expect("push");
        }
        replayer.advance_to(T0 + 4 * hour).expect("advance");
        replayer.commit().expect("commit");
        assert_eq!(email_conversions(&registry), (1.0, 10.0));
        let stored = |replayer: &kairos_core::replay::Replayer<FeedbackProcessor>,
                      customer: &str| {
            let key = touch_key(customer);
            let p =
                kairos_core::replay::partition_for(customer.as_bytes(), config.kafka.partitions);
            let store = replayer.engine.store(p).expect("open partition");
            store
                .get(&Default::default(), key.as_bytes())
                .expect("read")
                .map(|bytes| {
                    kairos_core::encoding::decode_state::<StoredTouches>(&bytes)
                        .expect("touches")
                        .into_vec()
                })
        };
        assert!(
            stored(&replayer, "anon:v1").is_none(),
            "the merged id keeps no touches"
        );
        let survivor = stored(&replayer, "c1").expect("the survivor's touches");
        assert_eq!(survivor.len(), 2, "each taken over once: {survivor:?}");
        assert!(
            survivor[1].converted,
            "the later reminder, the last before the purchase"
        );
        // Past `identity.forward_retention` the note is gone: a decision for the old id
        // stays there.
        replayer
            .advance_to(T0 + 2 * hour + 11 * DAY)
            .expect("advance");
        let at = T0 + 2 * hour + 11 * DAY;
        let mut late = push_email_sent(&config, &mut replayer, "anon:v1", "cart", at);
        late.extend(replayer.commit().expect("commit"));
        assert!(
            late.iter().all(|o| o.topic != identified),
            "nothing sent on"
        );
        assert_eq!(stored(&replayer, "anon:v1").map(|t| t.len()), Some(1));
    }

    /// A guest buys after a reminder, and logs in before the purchase's
    /// `feedback.attribution_delay` is over: the purchase, counted once, converts the
    /// reminder at the survivor, where the reminder went with the merge.
    #[test]
    fn a_guest_purchase_waiting_when_the_merge_comes_converts_at_the_survivor() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(
            dir.path(),
            "[clock]\nmode = \"event\"\n[identity]\nenabled = true\n\
             [[scenarios]]\nname = \"cart\"\nkind = \"abandoned_cart\"\n\
             channels = [\"email\"]\ntemplate = \"t\"\n",
        );
        let identified = config.topic(topics::IDENTIFIED_EVENTS);
        let hour = 3_600_000;
        push_email_sent(&config, &mut replayer, "anon:v2", "cart", T0 + hour);
        let guest = IdentifiedRecord::site(Box::new(
            serde_json::from_slice(&purchase("p-2", "anon:v2", T0 + 2 * hour)).expect("event"),
        ));
        let merge = IdentifiedRecord::merge(CustomerMerge {
            merge_id: "m-2".into(),
            from: "anon:v2".into(),
            into: "c2".into(),
            identifier: "email:v2@example.com".into(),
            occurred_at: T0 + 2 * hour + 60_000,
        });
        let mut out = Vec::new();
        for record in [guest, merge] {
            let payload = serde_json::to_vec(&record).expect("encode");
            out.extend(
                replayer
                    .push(&identified, b"anon:v2", &payload)
                    .expect("push"),
            );
        }
        out.extend(replayer.advance_to(T0 + 3 * hour).expect("advance"));
        out.extend(replayer.commit().expect("commit"));
        let sent_on: Vec<_> = out.iter().filter(|o| o.topic == identified).collect();
        let kinds: Vec<String> = sent_on
            .iter()
            .map(|o| {
                let v: serde_json::Value = serde_json::from_slice(&o.payload).expect("json");
                v["kind"].as_str().unwrap_or_default().to_string()
            })
            .collect();
        assert_eq!(kinds, ["touches_in", "purchase_in"], "the touches first");
        // The purchase comes twice (re-sent after a crash, at a new offset): its
        // revenue counts once.
        let again = sent_on[1].payload.clone();
        for record in sent_on {
            assert_eq!(record.key, b"c2");
            replayer
                .push(&identified, b"c2", &record.payload)
                .expect("push");
        }
        replayer.push(&identified, b"c2", &again).expect("push");
        replayer.commit().expect("commit");
        assert_eq!(counter(&registry, "kairos_purchases_total", &[]), 1.0);
        assert_eq!(email_conversions(&registry), (1.0, 10.0));
    }

    /// An order whose cancellation is read first counts for nothing, as in the
    /// profile; one cancelled after it was counted stays counted (counters only go up).
    #[test]
    fn an_order_cancelled_before_its_purchase_is_read_counts_for_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = welcomed_c1(dir.path());
        let site = config.topic(topics::SITE_EVENTS);
        let at = T0 + 3_600_000;
        let push = |replayer: &mut kairos_core::replay::Replayer<FeedbackProcessor>,
                    event: serde_json::Value| {
            replayer
                .push(&site, b"c1", event.to_string().as_bytes())
                .expect("push");
        };
        let purchase = |event_id: &str, order_id: &str| {
            serde_json::json!({"event_id": event_id, "event_type": "purchase",
                "occurred_at": at, "customer_id": "c1",
                "order": {"order_id": order_id, "total": 10.0}})
        };
        let cancelled = |event_id: &str, order_id: &str| {
            serde_json::json!({"event_id": event_id, "event_type": "order_status",
                "occurred_at": at + 60_000, "customer_id": "c1",
                "order": {"order_id": order_id, "status": "cancelled"}})
        };
        push(&mut replayer, cancelled("x-1", "o-1"));
        push(&mut replayer, purchase("p-1", "o-1"));
        push(&mut replayer, purchase("p-2", "o-2"));
        push(&mut replayer, cancelled("x-2", "o-2"));
        replayer.commit().expect("commit");
        assert_eq!(counter(&registry, "kairos_purchases_total", &[]), 1.0);
        assert_eq!(email_conversions(&registry), (1.0, 10.0));
    }

    /// A till receipt counted for a loyalty card's profile, uploaded again once the
    /// card was registered (the receipt now resolved to the customer), and a web order
    /// sent again after the guest logged in, count once each: the orders counted for
    /// the merged profile go to the survivor with its touches, and on through a second
    /// merge.
    #[test]
    fn an_order_counted_before_a_merge_counts_once_when_it_comes_again_for_the_survivor() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(
            dir.path(),
            "[clock]\nmode = \"event\"\n[identity]\nenabled = true\n\
             [feedback]\nattribution_delay = \"0s\"\n\
             [[scenarios]]\nname = \"cart\"\nkind = \"abandoned_cart\"\n\
             channels = [\"email\"]\ntemplate = \"t\"\n",
        );
        let identified = config.topic(topics::IDENTIFIED_EVENTS);
        let hour = 3_600_000;
        let receipt = |event_id: &str, customer: &str| {
            let r = serde_json::json!({"event_id": event_id, "receipt_id": "R-1",
                "kind": "sale", "occurred_at": T0, "customer_id": customer,
                "store_id": "s1", "total": 10.0, "currency": "EUR", "items": []});
            IdentifiedRecord::offline(Box::new(serde_json::from_value(r).expect("receipt")))
        };
        let order = |event_id: &str, customer: &str| {
            let e = serde_json::json!({"event_id": event_id, "event_type": "purchase",
                "occurred_at": T0, "customer_id": customer,
                "order": {"order_id": "O-1", "total": 30.0}});
            IdentifiedRecord::site(Box::new(serde_json::from_value(e).expect("order")))
        };
        let merge = |from: &str, into: &str, at| {
            IdentifiedRecord::merge(CustomerMerge {
                merge_id: format!("m-{from}"),
                from: from.into(),
                into: into.into(),
                identifier: "email:ann@example.com".into(),
                occurred_at: at,
            })
        };
        // Pushes each (key, record), then every record they send on, each keyed by its
        // own key, until none is left; `hold` returns what they send on instead.
        let mut run = |records: Vec<(String, Vec<u8>)>, hold: bool| {
            push_identified(&mut replayer, &identified, records, hold)
        };
        let one = |key: &str, record: &IdentifiedRecord| {
            vec![(key.to_string(), serde_json::to_vec(record).expect("encode"))]
        };
        run(one("card:K1", &receipt("r-1", "card:K1")), false);
        run(one("anon:v1", &order("e-1", "anon:v1")), false);
        // The card's profile joins the guest's, whose own merge into the customer is
        // read before the card's orders arrive: they go on to the customer.
        let card_orders = run(
            one("card:K1", &merge("card:K1", "anon:v1", T0 + hour)),
            true,
        );
        run(
            one("anon:v1", &merge("anon:v1", "c1", T0 + 2 * hour)),
            false,
        );
        run(card_orders, false);
        let mut push = |key: &str, record: &IdentifiedRecord| run(one(key, record), false);
        push("c1", &receipt("r-1b", "c1"));
        push("c1", &order("e-1b", "c1"));
        assert_eq!(
            counter(&registry, "kairos_purchases_total", &["offline"]),
            1.0
        );
        assert_eq!(
            counter(&registry, "kairos_purchases_total", &["online"]),
            1.0
        );
        assert_eq!(
            counter(&registry, "kairos_purchase_revenue_total", &[]),
            40.0
        );
        // Another receipt number is another purchase.
        let mut other = receipt("r-2", "c1");
        if let IdentifiedRecord::offline(r) = &mut other {
            r.receipt_id = "R-2".into();
        }
        push("c1", &other);
        assert_eq!(
            counter(&registry, "kairos_purchases_total", &["offline"]),
            2.0
        );
    }

    /// A purchase without an order id, counted for a guest merged since into a
    /// customer on another partition, counts nothing when the app sends it again
    /// (the same event id), now read as the customer's.
    #[test]
    fn a_purchase_without_an_order_sent_again_after_a_merge_counts_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(
            dir.path(),
            "[clock]\nmode = \"event\"\n[identity]\nenabled = true\n\
             [feedback]\nattribution_delay = \"0s\"\n",
        );
        let (guest, customer) = ("anon:v2", "c1");
        let partitions = config.kafka.partitions;
        assert_ne!(
            kairos_core::replay::partition_for(guest.as_bytes(), partitions),
            kairos_core::replay::partition_for(customer.as_bytes(), partitions),
            "the test needs them apart"
        );
        let identified = config.topic(topics::IDENTIFIED_EVENTS);
        let purchase = |customer: &str| {
            let e = serde_json::json!({"event_id": "e-9", "event_type": "purchase",
                "occurred_at": T0, "customer_id": customer,
                "items": [{"product_id": "p-1", "unit_price": 25.0}]});
            IdentifiedRecord::app(Box::new(serde_json::from_value(e).expect("purchase")))
        };
        let merge = IdentifiedRecord::merge(CustomerMerge {
            merge_id: "m-v2".into(),
            from: guest.into(),
            into: customer.into(),
            identifier: "email:bo@example.com".into(),
            occurred_at: T0 + 60_000,
        });
        // Last first; what it sends on (the guest's counted orders) before the rest.
        let records = [
            (customer, purchase(customer)),
            (guest, merge),
            (guest, purchase(guest)),
        ]
        .map(|(key, r)| (key.to_string(), serde_json::to_vec(&r).expect("encode")));
        push_identified(&mut replayer, &identified, records.to_vec(), false);
        assert_eq!(
            counter(&registry, "kairos_purchases_total", &["online"]),
            1.0
        );
        assert_eq!(revenue(&registry, "online"), 25.0);
    }

    /// What feedback keeps and sends on of a touch does not depend on the process that
    /// counted it: two runs hand the same touches to the survivor of a merge, byte for
    /// byte (a number drawn per process was kept with each touch).
    #[test]
    fn touches_handed_over_are_the_same_in_every_run() {
        let handed_over = || {
            let dir = tempfile::tempdir().expect("temp dir");
            let (config, _registry, mut replayer) = replayer(
                dir.path(),
                "[clock]\nmode = \"event\"\n[identity]\nenabled = true\n\
                 [[scenarios]]\nname = \"welcome\"\nkind = \"welcome\"\n\
                 channels = [\"email\"]\ntemplate = \"t\"\n",
            );
            push_email_sent(&config, &mut replayer, "anon:v3", "welcome", T0);
            let merge = IdentifiedRecord::merge(CustomerMerge {
                merge_id: "m-v3".into(),
                from: "anon:v3".into(),
                into: "c1".into(),
                identifier: "email:cy@example.com".into(),
                occurred_at: T0 + 60_000,
            });
            let identified = config.topic(topics::IDENTIFIED_EVENTS);
            let payload = serde_json::to_vec(&merge).expect("encode");
            let mut out = replayer
                .push(&identified, b"anon:v3", &payload)
                .expect("push");
            out.extend(replayer.commit().expect("commit"));
            let sent_on: Vec<Vec<u8>> = (out.into_iter())
                .filter(|o| o.topic == identified)
                .map(|o| o.payload)
                .collect();
            assert_eq!(sent_on.len(), 1, "the touches, once");
            sent_on
        };
        assert_eq!(handed_over(), handed_over());
    }

    /// An outcome counts once however often it comes within `state.dedup_window`; its
    /// id is deleted after the window, and a copy older than the window is counted
    /// apart, not as a new outcome.
    #[test]
    fn outcomes_count_once_and_their_ids_expire_with_the_window() {
        use kairos_core::time::DAY;
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = replayer(
            dir.path(),
            "[clock]\nmode = \"event\"\n[state]\ndedup_window = \"2days\"\n\
             [[scenarios]]\nname = \"welcome\"\nkind = \"welcome\"\nchannels = [\"email\"]\n\
             template = \"t\"\nvalid_for = \"1day\"\n",
        );
        let topic = config.topic(topics::OUTCOMES);
        let t0 = T0;
        let mut push = |id: &str, at: Millis| {
            let outcome = Outcome {
                outcome_id: id.into(),
                send_id: format!("send-{id}"),
                customer_id: "c1".into(),
                scenario: "welcome".into(),
                channel: Channel::email,
                category: MessageCategory::trigger,
                kind: OutcomeKind::delivered,
                reason: None,
                occurred_at: at,
                address: None,
            };
            let payload = serde_json::to_vec(&outcome).expect("encode");
            replayer.push(&topic, b"c1", &payload).expect("push");
            replayer.commit().expect("commit");
        };
        // The sum of a counter's series, those with a label of value `label` only.
        let total = |name: &str, label: Option<&str>| counter(&registry, name, label.as_slice());
        let delivered = || total("kairos_message_outcomes_total", Some("delivered"));
        let before_window = || total("kairos_feedback_records_before_window_total", None);
        push("o1", t0);
        push("o1", t0 + DAY);
        assert_eq!(delivered(), 1.0, "a copy within the window counts once");
        // Four days on, the sweep has deleted o1's id (its timer is feedback's to fire).
        push("o2", t0 + 4 * DAY);
        push("o1", t0);
        assert_eq!(delivered(), 2.0, "o2 counts, the old copy of o1 does not");
        assert_eq!(before_window(), 1.0);
        // A cancellation older than the window is no purchase left out.
        let cancelled = serde_json::json!({"event_id": "x1", "event_type": "order_status",
            "occurred_at": t0, "customer_id": "c1",
            "order": {"order_id": "o-old", "total": 10.0, "status": "cancelled"}});
        let site = config.topic(topics::SITE_EVENTS);
        replayer
            .push(&site, b"c1", cancelled.to_string().as_bytes())
            .expect("push");
        replayer.commit().expect("commit");
        assert_eq!(
            total(
                "kairos_feedback_records_before_window_total",
                Some("purchase")
            ),
            0.0
        );
    }

    /// A touch is kept while a purchase could still be attributed to it (a late one
    /// within `state.dedup_window` included) and deleted by the sweep after that,
    /// without any further input for the customer.
    #[test]
    fn touches_expire_once_no_purchase_can_reach_them() {
        use kairos_core::time::DAY;
        let dir = tempfile::tempdir().expect("temp dir");
        // One partition: its event time is the clock every customer's record sees.
        let (config, registry, mut replayer) = replayer(
            dir.path(),
            "[kafka]\npartitions = 1\n[clock]\nmode = \"event\"\n\
             [state]\ndedup_window = \"2days\"\n\
             [feedback]\nattribution_window = \"3days\"\nattribution_delay = \"0s\"\n\
             [[scenarios]]\nname = \"welcome\"\nkind = \"welcome\"\nchannels = [\"email\"]\n\
             template = \"t\"\nvalid_for = \"1day\"\n",
        );
        let decisions = config.topic(topics::DECISIONS);
        let site = config.topic(topics::SITE_EVENTS);
        let t0 = T0;
        let decision = |customer: &str, at: Millis| Decision {
            decision_id: format!("d-{customer}-{at}"),
            trigger_id: format!("t-{customer}-{at}"),
            customer_id: customer.into(),
            scenario: "welcome".into(),
            category: MessageCategory::trigger,
            outcome: DecisionOutcome::sent,
            channel: Some(Channel::email),
            send_id: Some(format!("s-{customer}-{at}")),
            rule: "sent".into(),
            reason: "test".into(),
            decided_at: at,
            group: None,
        };
        let push_decision =
            |replayer: &mut kairos_core::replay::Replayer<_>, customer: &str, at| {
                let payload = serde_json::to_vec(&decision(customer, at)).expect("encode");
                replayer
                    .push(&decisions, customer.as_bytes(), &payload)
                    .expect("push");
                replayer.commit().expect("commit");
            };
        let push_purchase = |replayer: &mut kairos_core::replay::Replayer<_>, id: &str, at| {
            replayer
                .push(&site, b"c1", &purchase(id, "c1", at))
                .expect("push");
            replayer.commit().expect("commit");
        };
        let touches = |replayer: &kairos_core::replay::Replayer<FeedbackProcessor>| {
            let mut keys = Vec::new();
            for p in replayer.engine.owned() {
                let store = replayer.engine.store(p).expect("open partition");
                for (key, _) in store.scan_state(TOUCH_PREFIX.as_bytes()).expect("scan") {
                    keys.push(String::from_utf8_lossy(&key).into_owned());
                }
            }
            keys.sort();
            keys
        };
        let counter_sum = |name: &str| counter(&registry, name, &[]);
        push_decision(&mut replayer, "c1", t0);
        // Four days on (c2's touch moves the clock), a purchase c1 made two days after
        // its touch arrives, as late as the deduplication window allows.
        push_decision(&mut replayer, "c2", t0 + 4 * DAY);
        push_purchase(&mut replayer, "late", t0 + 2 * DAY);
        assert_eq!(counter_sum("kairos_conversions_total"), 1.0);
        // Five days on, one at the very end of the attribution window still adds its
        // revenue: the touch is there until both windows have passed.
        replayer.advance_to(t0 + 5 * DAY).expect("advance");
        push_purchase(&mut replayer, "edge", t0 + 3 * DAY);
        assert_eq!(counter_sum("kairos_conversion_revenue_total"), 20.0);
        assert_eq!(touches(&replayer), ["t/c1", "t/c2"]);
        // Past c1's touch plus both windows, with no input for c1.
        replayer.advance_to(t0 + 5 * DAY + 1).expect("advance");
        replayer.commit().expect("commit");
        assert_eq!(touches(&replayer), ["t/c2"], "c1's touch expired");
        // c2's touch goes too once its own five days have passed.
        replayer.advance_to(t0 + 10 * DAY).expect("advance");
        replayer.commit().expect("commit");
        assert!(touches(&replayer).is_empty(), "{:?}", touches(&replayer));
    }

    #[test]
    fn failure_reasons_stay_bounded() {
        assert_eq!(failure_reason(Some("template: missing name")), "template");
        assert_eq!(failure_reason(Some("expired")), "expired");
        assert_eq!(
            failure_reason(Some("consent_withdrawn: the customer unsubscribed")),
            "consent_withdrawn"
        );
        assert_eq!(failure_reason(Some("customer 42 said no")), "other");
        assert_eq!(failure_reason(None), "other");
    }
}
