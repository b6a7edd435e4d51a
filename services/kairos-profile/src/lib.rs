//! The profile processor: per-customer state and the sense of occasion.
//!
//! Reads site, app and offline events and product occasions (co-partitioned, keyed by
//! customer id), keeps one profile per customer, evaluates RFM and lifecycle segments
//! and turns the occasions declared in `[[scenarios]]` into triggers. Every wait is a
//! persistent timer in the partition's RocksDB store; hot profiles live in a
//! write-back cache flushed atomically with the offsets at each commit.

use std::sync::Arc;

use anyhow::Context as _;
use kairos_core::config::{
    topics, Config, ScenarioConfig, ScenarioKind, WelcomeCause, NO_RFM_SEGMENT,
};
use kairos_core::contracts::is_reserved_customer_id;
use kairos_core::contracts::{
    Channel, Contacts, CustomerAction, CustomerActionKind, CustomerEvent, CustomerMerge, EventType,
    IdentifiedRecord, IdentifierMoved, InterestKind, LineItem, OfflineReceipt, OrderStatus,
    Outcome, OutcomeKind, Product, ProductInterest, ProductOccasion, ProductOccasionKind,
    ReceiptKind, SegmentKind, SegmentTransition, Trigger,
};
use kairos_core::encoding::{decode_internal, Rejection, SchemaRegistry};
use kairos_core::ids::deterministic_id;
use kairos_core::input;
use kairos_core::metrics;
use kairos_core::runtime::{Ctx, Processor, Record};
use kairos_core::state_cache::StateCache;
use kairos_core::store::DueTimer;
use kairos_core::time::Millis;
use prometheus::IntCounterVec;
use serde::{Deserialize, Serialize};

pub use kairos_core::calendar;
pub mod catalog;
pub mod pipeline;
pub mod profile;
pub mod segments;

use profile::{CustomerProfile, ProductAppeal, PurchaseApplied, Reversal, ReversalKind};

/// A decoded input of the profile processor.
#[derive(Debug, Clone)]
pub enum ProfileInput {
    /// A site or app event, and which of the two.
    Event(Box<CustomerEvent>, input::Source),
    Receipt(Box<OfflineReceipt>),
    Occasion(Box<ProductOccasion>),
    /// Delivery and engagement outcomes: engagement, unsubscribes, bounces, complaints.
    Outcome(Box<Outcome>),
    /// The identity processor merged this customer into another: hand the profile over.
    MergeOut(CustomerMerge),
    /// A merged customer's profile arrives at the survivor, with the triggers it held
    /// and the chain steps it had still to fire.
    MergeIn(Box<MergeIn>),
    /// A merge into this customer is under way (see `IdentifiedRecord::merge_expected`).
    MergeExpected(CustomerMerge),
    /// An identifier of this customer's moved to the customer who presented it.
    IdentifierMoved(IdentifierMoved),
    /// A record of the identified topic that is another service's (feedback's touches
    /// and waiting purchases).
    Ignored,
}

/// A merged customer's profile and what goes with it to the survivor.
#[derive(Debug, Clone)]
pub struct MergeIn {
    merge: CustomerMerge,
    profile: CustomerProfile,
    held: Vec<Trigger>,
    steps: Vec<CarriedStep>,
    /// See `IdentifiedRecord::merge_in`.
    chains_carried: bool,
    returned: Vec<String>,
}

/// A chain step of a merged customer still to fire (see `IdentifiedRecord::merge_in`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedStep {
    fire_at: Millis,
    timer: ScenarioTimer,
}

/// What a scenario timer remembers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct ScenarioTimer {
    scenario: String,
    customer_id: String,
    cause_event_id: String,
    cause_occurred_at: Millis,
    step: usize,
    product: Option<Product>,
    order_id: Option<String>,
    /// The occasion's template variables as a JSON object (a segment trigger's from
    /// and to), for steps that fire later.
    variables: Option<String>,
    /// A post-purchase follow-up's earlier orders whose pending follow-up this one's
    /// took (latest first, a few) with their template variables: when this order is
    /// returned, the one that takes the follow-up back still names what it bought.
    given_way: Vec<(String, String)>,
}

/// Earlier orders a post-purchase follow-up remembers (see `ScenarioTimer::given_way`).
const GIVEN_WAY_KEPT: usize = 3;

/// The skip reason of a price drop smaller, from the price the customer saw, than the
/// scenario's `min_drop_percent`.
const BELOW_MIN_DROP: &str = "below_min_drop";

/// A [`ScenarioTimer`] as written: the same fields in the same order, so the same
/// bytes, borrowed instead of copied into a value that lives only to be encoded.
#[derive(Serialize)]
struct ScenarioTimerRef<'a> {
    scenario: &'a str,
    customer_id: &'a str,
    cause_event_id: &'a str,
    cause_occurred_at: Millis,
    step: usize,
    product: Option<&'a Product>,
    order_id: Option<&'a str>,
    variables: Option<&'a str>,
    given_way: &'a [(String, String)],
}

/// Timer id prefix of the segment review (time-driven segment changes).
const SEGMENT_REVIEW: &str = "~segments";
/// Timers that delete a merged customer's forwarding record (`~forward/<customer>`).
const FORWARD_EXPIRY: &str = "~forward";
/// Timers that end a survivor's wait for a merged profile
/// (`~merge_wait/<survivor>/<merged>`, payload: both ids).
const MERGE_WAIT_EXPIRY: &str = "~merge_wait";
/// How long a survivor holds its triggers for a merged profile, as the arbiter waits
/// for a merged ledger.
const MERGE_WAIT_LIMIT: Millis = kairos_core::contracts::MERGE_WAIT_LIMIT_MS;
/// Timers that forget an anonymous profile no event came for within
/// `identity.anonymous_retention` (`~anonymous/<customer>`).
const ANONYMOUS_EXPIRY: &str = "~anonymous";
/// Timers that delete a return's mark (`~returned/<customer>\0<order>` for the key
/// `rt/<customer>\0<order>`; `~returned/<customer>/<order>` for `ret/...` of earlier
/// versions) once no follow-up of the order can fire any more.
const RETURN_MARK_EXPIRY: &str = "~returned";
/// The scenarios with standing timers (see [`ProfileProcessor::standing`]) the
/// partition's profiles were armed for, by name.
const ARMED_FOR_KEY: &str = "~armed-for";
/// Timers of passes over the partition's profiles that arm a scenario with standing
/// timers added since they were armed (`~arming-pass/<scenario>`). The payload is a
/// [`ScenarioTimer`] naming no configured scenario, the pass's cursor (the last
/// profile key armed, empty at the start) as its cause. (A version without passes
/// dropped it with a warning; scenario timers have a field appended since, which an
/// earlier version refuses: roll forward only, see the README.)
const ARMING_PASS: &str = "~arming-pass";
/// Profiles one firing of an arming pass takes: a batch stays small.
const ARMING_PASS_PAGE: usize = 2_000;
/// When the partition's standing timers were armed for, per scenario: its timing
/// ([`standing_timing`]). A timing changed since (a birthday's `local_time`, a
/// reactivation's `delay`) starts a pass that moves the timers already armed.
const ARMED_TIMING_KEY: &str = "~armed-timing";
/// Timers of passes that move a standing scenario's armed timers to its new timing
/// (`~rearming-pass/<scenario>`; the payload as an arming pass's).
const REARMING_PASS: &str = "~rearming-pass";

/// The segmentation rules the partition's profiles were judged by (a hash of them):
/// rules changed since start a pass that judges every stored profile again.
const SEGMENTED_BY_KEY: &str = "~segmented-by";
/// The timer of that pass (the payload as an arming pass's).
const RESEGMENT_PASS: &str = "~resegment-pass";
/// The reason of the transitions such a pass makes.
const RESEGMENT_REASON: &str = "segmentation rules changed";

/// The scenario an arming pass's timer id names, if it is one, and whether the pass
/// moves armed timers (a changed timing) rather than arming a new scenario.
fn arming_pass_scenario(timer_id: &str) -> Option<(&str, bool)> {
    let pass = |prefix: &str| timer_id.strip_prefix(prefix)?.strip_prefix('/');
    pass(ARMING_PASS)
        .map(|name| (name, false))
        .or_else(|| pass(REARMING_PASS).map(|name| (name, true)))
}

/// What a standing scenario's timers were armed by: a yearly greeting's local time
/// (and the zone of customers without one), a reactivation's delay.
fn standing_timing(s: &ScenarioConfig, default_zone: &str) -> String {
    match is_yearly(s.kind) {
        true => format!("{}|{default_zone}", s.local_time.as_deref().unwrap_or("")),
        false => format!("{}ms", s.delay.as_millis()),
    }
}

/// The payload of arming pass `timer_id` with `cursor`.
fn arming_pass_payload(timer_id: &str, cursor: &str) -> ScenarioTimer {
    ScenarioTimer {
        scenario: timer_id.to_string(),
        customer_id: String::new(),
        cause_event_id: cursor.to_string(),
        cause_occurred_at: 0,
        step: 0,
        product: None,
        order_id: None,
        variables: None,
        given_way: Vec::new(),
    }
}

struct Metrics {
    triggers: metrics::CachedCounterVec,
    skipped: IntCounterVec,
    transitions: metrics::CachedCounterVec,
    duplicates: prometheus::IntCounter,
    /// Merged profiles a survivor stopped waiting for (see `MERGE_WAIT_LIMIT`).
    merge_waits_given_up: prometheus::IntCounter,
    /// Outcomes of customers merged away, sent on to their survivors.
    outcomes_forwarded: prometheus::IntCounter,
    /// Anonymous profiles forgotten after `identity.anonymous_retention`.
    anonymous_expired: prometheus::IntCounter,
    /// Customer events by source and type (receipts: offline, sale or refund).
    events: metrics::CachedCounterVec,
}

impl Metrics {
    /// Counts a trigger of `scenario` not sent, and why.
    fn skip(&self, scenario: &str, reason: &str) {
        self.skipped.with_label_values(&[scenario, reason]).inc();
    }
}

pub struct ProfileProcessor {
    config: Arc<Config>,
    /// The zone of customers without one (`arbiter.default_time_zone`).
    default_zone: chrono_tz::Tz,
    registry: SchemaRegistry,
    /// Orders and receipts into `profile.currency` (identified ones were converted by
    /// the identity processor).
    currencies: input::Currencies,
    site_topic: String,
    app_topic: String,
    offline_topic: String,
    occasions_topic: String,
    outcomes_topic: String,
    triggers_topic: String,
    transitions_topic: String,
    interest_topic: String,
    actions_topic: String,
    /// With identity resolution on, events come resolved from here (else raw).
    identified_topic: Option<String>,
    metrics: Metrics,
    /// Hot profiles, written back when the batch commits.
    profiles: StateCache<CustomerProfile>,
    /// `identity.anonymous_retention` in milliseconds; 0: anonymous profiles are kept
    /// for good.
    anonymous_retention: Millis,
    /// The enabled scenarios of each kind (and the yearly ones switched off, which
    /// keep their timers armed), shared so events do not copy them.
    scenarios_by_kind: Vec<(ScenarioKind, Arc<[ScenarioConfig]>)>,
    /// While a merge is applied: the enabled `segment_entered` scenarios that target a
    /// segment the merged customer was in. The merge moving the survivor into that
    /// segment is no entry for the person, so they do not start again.
    chains_going_on: Vec<String>,
    /// Scenarios whose timers stand for every profile with the date or visit they need,
    /// not started by an event (birthdays, anniversaries, reactivation), by name: one
    /// added to the configuration is armed for the profiles already stored by a pass.
    standing: Vec<String>,
    /// The timing of each of `standing` (name, [`standing_timing`]), sorted.
    standing_timing: Vec<(String, String)>,
    /// A hash of the segmentation rules (`[segments]`), see [`SEGMENTED_BY_KEY`].
    segmented_by: String,
    /// Per partition: whether this process compared `standing` with what the
    /// partition's profiles were armed for.
    standing_checked: Vec<bool>,
}

impl ProfileProcessor {
    pub fn new(config: Arc<Config>, registry: SchemaRegistry, prom: &prometheus::Registry) -> Self {
        let m = Metrics {
            triggers: metrics::cached_counter_vec(
                prom,
                "kairos_triggers_emitted_total",
                "Triggers emitted, by scenario.",
                &["scenario"],
            ),
            skipped: metrics::counter_vec(
                prom,
                "kairos_triggers_skipped_total",
                "Triggers not emitted, by scenario and reason (late: the moment passed by more than the tolerance; left_segment: a delayed segment trigger's customer left the segment before it was due; already_bought, unwished, seen_since, not_wished: a price drop or return to stock the customer no longer needs to hear of).",
                &["scenario", "reason"],
            ),
            transitions: metrics::cached_counter_vec(
                prom,
                "kairos_segment_transitions_total",
                "Segment and lifecycle transitions, by kind, segment left (\"none\": none yet) and segment entered (\"none\" for RFM: no order counts any more).",
                &["kind", "from", "to"],
            ),
            merge_waits_given_up: metrics::counter(
                prom,
                "kairos_profile_merge_waits_given_up_total",
                "Merged profiles that did not reach their survivor within an hour: the survivor's held triggers went out without them.",
            ),
            outcomes_forwarded: metrics::counter(
                prom,
                "kairos_profile_outcomes_forwarded_total",
                "Delivery and engagement outcomes of customers merged away, sent on to their survivors (while identity.forward_retention keeps the forwarding record).",
            ),
            anonymous_expired: metrics::counter(
                prom,
                "kairos_profile_anonymous_profiles_expired_total",
                "Anonymous profiles (named by Kairos after a cookie, device, card or phone) forgotten after identity.anonymous_retention without an event.",
            ),
            duplicates: metrics::counter(
                prom,
                "kairos_duplicate_events_total",
                "Input events dropped because their event id was already seen for the customer.",
            ),
            events: metrics::cached_counter_vec(
                prom,
                "kairos_profile_events_total",
                "Customer events the profile processor read, by source (site, app, offline) and type (event type; sale or refund for till receipts).",
                &["source", "type"],
            ),
        };
        for source in [input::Source::Site, input::Source::App] {
            for t in EventType::ALL {
                m.events.touch(&[source.as_str(), t.as_str()]);
            }
        }
        for kind in ["sale", "refund"] {
            m.events.touch(&[input::Source::Offline.as_str(), kind]);
        }
        // Every transition exists at zero from the start.
        let rfm = &config.segments.rfm;
        let rfm_segments: Vec<&str> = rfm
            .cells
            .iter()
            .map(|c| c.name.as_str())
            .chain([rfm.default_segment.as_str(), NO_RFM_SEGMENT])
            .collect();
        let lifecycle_stages: Vec<&str> = [NO_RFM_SEGMENT]
            .into_iter()
            .chain(segments::LIFECYCLE_STAGES)
            .collect();
        for (kind, names) in [("rfm", &rfm_segments), ("lifecycle", &lifecycle_stages)] {
            for from in names.iter() {
                for to in names
                    .iter()
                    .filter(|to| *to != from && **to != NO_RFM_SEGMENT)
                {
                    m.transitions.touch(&[kind, from, to]);
                }
            }
        }
        for from in rfm_segments.iter().filter(|s| **s != NO_RFM_SEGMENT) {
            m.transitions.touch(&["rfm", from, NO_RFM_SEGMENT]);
        }
        for s in &config.scenarios {
            m.triggers.touch(&[&s.name]);
            m.skipped.with_label_values(&[&s.name, "late"]);
            if matches!(s.kind, ScenarioKind::PriceDrop | ScenarioKind::BackInStock) {
                for reason in ProductAppeal::SKIP_REASONS {
                    m.skipped.with_label_values(&[&s.name, reason]);
                }
            }
            if s.kind == ScenarioKind::SegmentEntered {
                m.skipped.with_label_values(&[&s.name, "left_segment"]);
            }
            let waits_ended: &[&str] = match s.kind {
                ScenarioKind::AbandonedCart => &[SKIP_BOUGHT, SKIP_CART_EMPTIED],
                ScenarioKind::BrowseAbandonment => &[SKIP_BOUGHT, SKIP_CARTED],
                ScenarioKind::PostPurchase => &[SKIP_REFUNDED],
                _ => &[],
            };
            for reason in waits_ended {
                m.skipped.with_label_values(&[&s.name, *reason]);
            }
            if s.kind == ScenarioKind::PriceDrop {
                m.skipped.with_label_values(&[&s.name, BELOW_MIN_DROP]);
            }
        }
        // A yearly scenario switched off is armed all the same: its timers re-arm the
        // next year without firing (see `on_scenario_timer`), so a birthday given
        // while it was off is greeted once it is on again.
        let armed = |s: &&ScenarioConfig| s.enabled || is_yearly(s.kind);
        // Switched off or not: switching a reactivation off and on again is no new
        // scenario (its customers are armed again by their next visit, as before).
        let mut standing: Vec<String> = (config.scenarios.iter())
            .filter(|s| is_yearly(s.kind) || s.kind == ScenarioKind::Reactivation)
            .map(|s| s.name.clone())
            .collect();
        standing.sort();
        let mut standing_timing: Vec<(String, String)> = (config.scenarios.iter())
            .filter(|s| standing.contains(&s.name))
            .map(|s| {
                let timing = standing_timing(s, &config.arbiter.default_time_zone);
                (s.name.clone(), timing)
            })
            .collect();
        standing_timing.sort();
        let segmented_by = deterministic_id(&[&format!("{:?}", config.segments)]);
        let partitions = config.kafka.partitions;
        let mut scenarios_by_kind: Vec<(ScenarioKind, Arc<[ScenarioConfig]>)> = Vec::new();
        for s in config.scenarios.iter().filter(armed) {
            if !scenarios_by_kind.iter().any(|(k, _)| *k == s.kind) {
                let of_kind: Vec<ScenarioConfig> = config
                    .scenarios
                    .iter()
                    .filter(|o| armed(o) && o.kind == s.kind)
                    .cloned()
                    .collect();
                scenarios_by_kind.push((s.kind, of_kind.into()));
            }
        }
        ProfileProcessor {
            scenarios_by_kind,
            default_zone: calendar::zone(Some(&config.arbiter.default_time_zone)),
            anonymous_retention: Millis::try_from(config.identity.anonymous_retention.as_millis())
                .unwrap_or(Millis::MAX),
            site_topic: config.topic(topics::SITE_EVENTS),
            app_topic: config.topic(topics::APP_EVENTS),
            offline_topic: config.topic(topics::OFFLINE_EVENTS),
            occasions_topic: config.topic(topics::PRODUCT_OCCASIONS),
            outcomes_topic: config.topic(topics::OUTCOMES),
            triggers_topic: config.topic(topics::TRIGGERS),
            transitions_topic: config.topic(topics::SEGMENT_TRANSITIONS),
            interest_topic: config.topic(topics::PRODUCT_INTEREST),
            actions_topic: config.topic(topics::CUSTOMER_ACTIONS),
            identified_topic: config
                .identity
                .enabled
                .then(|| config.topic(topics::IDENTIFIED_EVENTS)),
            // Bounded by configuration: ~1-2 KiB per cached profile.
            profiles: StateCache::new(config.state.cache_entries, config.kafka.partitions),
            currencies: input::Currencies::new(&config.profile),
            config,
            registry,
            metrics: m,
            chains_going_on: Vec::new(),
            standing,
            standing_timing,
            segmented_by,
            standing_checked: vec![false; usize::try_from(partitions).unwrap_or(0)],
        }
    }

    /// Compares, once per partition and process, the scenarios with standing timers
    /// with those the partition's profiles were armed for, and starts a pass for each
    /// added one (a birthday greeting added to a running shop greets the customers it
    /// already knows; a reactivation added reaches those already lapsed). A store that
    /// never recorded them is taken as armed for the present ones.
    fn check_standing(&mut self, ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
        let Some(checked) = self.standing_checked_of(ctx.partition) else {
            return Ok(());
        };
        if std::mem::replace(checked, true) {
            return Ok(());
        }
        // Profiles judged by other segmentation rules are judged again; a store from
        // before the rules were recorded is taken as judged by the present ones.
        let segmented_by = ctx.get::<String>(SEGMENTED_BY_KEY)?;
        if segmented_by.as_ref() != Some(&self.segmented_by) {
            if segmented_by.is_some() {
                tracing::info!(
                    partition = ctx.partition,
                    "judging the stored profiles by the changed segmentation rules"
                );
                let timer = [RESEGMENT_PASS, "/segments"].concat();
                ctx.schedule(&timer, ctx.now(), &arming_pass_payload(&timer, ""))?;
            }
            ctx.put(SEGMENTED_BY_KEY, &self.segmented_by)?;
        }
        let armed_for = ctx.get::<Vec<String>>(ARMED_FOR_KEY)?;
        // A store from before timings were kept is taken as armed for the present ones.
        let armed_timing = ctx.get::<Vec<(String, String)>>(ARMED_TIMING_KEY)?;
        if armed_for.as_ref() == Some(&self.standing)
            && armed_timing
                .as_ref()
                .is_none_or(|t| *t == self.standing_timing)
        {
            if armed_timing.is_none() {
                ctx.put(ARMED_TIMING_KEY, &self.standing_timing)?;
            }
            return Ok(());
        }
        for (name, timing) in &self.standing_timing {
            let added = armed_for.as_ref().is_some_and(|a| !a.contains(name));
            let retimed = !added
                && armed_timing
                    .as_ref()
                    .is_some_and(|armed| armed.iter().any(|(n, t)| n == name && t != timing));
            // From the first profile, also when a pass of it was under way: one armed
            // twice gets the same timers.
            let timer = match (added, retimed) {
                (true, _) => {
                    tracing::info!(partition = ctx.partition, scenario = %name, "arming a scenario added to the configuration for the stored profiles");
                    [ARMING_PASS, "/", name].concat()
                }
                (false, true) => {
                    tracing::info!(partition = ctx.partition, scenario = %name, %timing, "moving a scenario's armed timers to its changed timing");
                    [REARMING_PASS, "/", name].concat()
                }
                (false, false) => continue,
            };
            ctx.schedule(&timer, ctx.now(), &arming_pass_payload(&timer, ""))?;
        }
        ctx.put(ARMED_TIMING_KEY, &self.standing_timing)?;
        ctx.put(ARMED_FOR_KEY, &self.standing)
    }

    /// Whether this process compared the standing scenarios for `partition`.
    fn standing_checked_of(&mut self, partition: i32) -> Option<&mut bool> {
        let i = usize::try_from(partition).ok()?;
        self.standing_checked.get_mut(i)
    }

    /// One page of an arming pass: arms its scenario for the next profiles stored,
    /// and fires again while some are left. A pass of a scenario this configuration
    /// lacks (another version's) ends: the one that has it starts it again.
    fn arming_pass(
        &mut self,
        ctx: &mut Ctx<'_>,
        name: &str,
        moves: bool,
        timer: &DueTimer,
    ) -> anyhow::Result<()> {
        let config = self.config.clone();
        let Some(s) = config.scenario(name) else {
            return Ok(());
        };
        self.profile_pass(ctx, timer, |this, ctx, p, now| match moves {
            true => this.move_standing(ctx, s, p, now),
            false => this.arm_standing(ctx, s, p, now),
        })
    }

    /// One page of a pass over the partition's stored profiles (its cursor in the
    /// timer's payload, see [`arming_pass_payload`]): `apply` to each, which says
    /// whether it changed the profile; fires again while some are left.
    fn profile_pass(
        &mut self,
        ctx: &mut Ctx<'_>,
        timer: &DueTimer,
        mut apply: impl FnMut(
            &mut Self,
            &mut Ctx<'_>,
            &mut CustomerProfile,
            Millis,
        ) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let pass: ScenarioTimer = timer
            .decode()
            .with_context(|| format!("timer {} payload does not decode", timer.timer_id))?;
        let after = Some(pass.cause_event_id.as_str()).filter(|c| !c.is_empty());
        let keys = ctx.scan_from("c/", after, ARMING_PASS_PAGE)?;
        let now = ctx.now();
        for (key, _) in &keys {
            let customer = key.strip_prefix("c/").unwrap_or_default();
            let Some(mut p) = self.take(ctx, customer)? else {
                continue;
            };
            match apply(self, ctx, &mut p, now) {
                Ok(true) => self.put(ctx, p)?,
                // Unchanged: not written again.
                Ok(false) => self.profiles.restore(ctx.partition, key.clone(), p),
                Err(e) => {
                    self.profiles.restore(ctx.partition, key.clone(), p);
                    return Err(e);
                }
            }
        }
        if let (ARMING_PASS_PAGE, Some((last, _))) = (keys.len(), keys.last()) {
            let next = arming_pass_payload(&timer.timer_id, last);
            ctx.schedule(&timer.timer_id, now, &next)?;
        }
        Ok(())
    }

    /// Arms scenario `s` (one with standing timers) for a stored profile: the next
    /// birthday or anniversary from `now`; a reactivation from the last activity, at once
    /// for a customer already away longer (the scenario is new: its moment was never
    /// missed), unless one is armed already. True if the profile changed.
    fn arm_standing(
        &self,
        ctx: &mut Ctx<'_>,
        s: &ScenarioConfig,
        p: &mut CustomerProfile,
        now: Millis,
    ) -> anyhow::Result<bool> {
        if is_yearly(s.kind) {
            self.schedule_yearly(ctx, s, p, now)?;
            return Ok(false);
        }
        let armed = ctx.timer_fire_at(&timer_id(&s.name, &p.customer_id))?;
        let (true, Some(last), None) = (
            s.kind == ScenarioKind::Reactivation && s.enabled,
            p.last_active_at(),
            armed,
        ) else {
            return Ok(false);
        };
        schedule_reactivation(ctx, s, p, last, (last + ms(s.delay)).max(now))?;
        Ok(true)
    }

    /// Moves scenario `s`'s timer armed for a stored profile to the scenario's changed
    /// timing: the armed greeting to the new local time on its date (today's, later
    /// than now by the old time and earlier by the new one, goes out at once; a
    /// greeting sent this year already is armed for next year, which stays); a
    /// reactivation's waiting first step to the last activity plus the new delay, at
    /// once if that is past (a later step keeps its time, and one that fired already
    /// is not armed again: its customer was reactivated for this absence). True if
    /// the profile changed.
    fn move_standing(
        &self,
        ctx: &mut Ctx<'_>,
        s: &ScenarioConfig,
        p: &mut CustomerProfile,
        now: Millis,
    ) -> anyhow::Result<bool> {
        let id = timer_id(&s.name, &p.customer_id);
        let armed = ctx.timer_fire_at(&id)?;
        if is_yearly(s.kind) {
            if let Some(armed) = armed {
                // The armed date's moment at the new time: a day either side of it
                // (another zone's date), never before the tolerance allows.
                let day = kairos_core::time::DAY;
                let since =
                    (armed.saturating_sub(2 * day)).max(now.saturating_sub(ms(s.tolerance())));
                self.schedule_yearly(ctx, s, p, since)?;
                // Still due today by the old time, but past by the new one beyond the
                // tolerance: greeted now rather than skipped for a year.
                let moved = ctx.timer_fire_at(&id)?;
                if armed >= now && moved.is_some_and(|m| m > armed + 2 * day) {
                    schedule_step(ctx, s, p, &s.name, now, 0, now, None, None)?;
                }
            }
            return Ok(false);
        }
        // Only a first step waiting (`armed` names it); a later step of a series
        // shares its timer id and keeps its own time.
        let first_step = |at: Millis| p.armed.get(s.name.as_str()) == Some(&at);
        let (Some(armed), Some(last)) = (armed.filter(|&at| first_step(at)), p.last_active_at())
        else {
            return Ok(false);
        };
        let at = (last + ms(s.delay)).max(now);
        if at == armed || !s.enabled {
            return Ok(false);
        }
        schedule_reactivation(ctx, s, p, last, at)?;
        Ok(true)
    }

    /// The enabled scenarios of `kind`, in configuration order.
    fn scenarios(&self, kind: ScenarioKind) -> Arc<[ScenarioConfig]> {
        self.scenarios_by_kind
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| Arc::from([]))
    }

    /// The customer's time zone; `arbiter.default_time_zone` when unknown, as the
    /// arbiter has it (a birthday at ten must not be ten in UTC here and ten in the
    /// default zone for the arbiter's quiet hours and days).
    fn zone_of(&self, p: &CustomerProfile) -> chrono_tz::Tz {
        calendar::zone_or(p.time_zone.as_deref(), self.default_zone)
    }

    /// From when a yearly date moved by a change (a zone, a birthday, a merge) is
    /// armed again: a tolerance before `now`, so a moment the change put behind still
    /// greets late, but not within the local year of the customer's last greeting (the
    /// date's first step, kept in `armed` under the scenario's name). One greeting a
    /// year is what the trigger id (`birthday-2026`) allows a customer; this keeps it
    /// so for a person whose merged profile was greeted under its own id, and for a
    /// zone whose moment comes later than the one greeted.
    fn yearly_rearm_since(&self, s: &ScenarioConfig, p: &CustomerProfile, now: Millis) -> Millis {
        let since = now.saturating_sub(ms(s.tolerance()));
        match p.armed.get(s.name.as_str()) {
            // The greeted occasion's year, not the mark's local year in today's zone:
            // one late on 31 December, judged in a zone further east since, would
            // read as next year's and skip it.
            Some(&greeted) => {
                let zone = self.zone_of(p);
                calendar::occasion_year(greeted, zone, self.yearly_date(s, p))
                    .and_then(|year| calendar::start_of_local_year(year + 1, zone))
                    .map_or(since, |next_year| since.max(next_year - 1))
            }
            None => since,
        }
    }

    /// The customer's birthday or registration anniversary (month and day, in the
    /// customer's zone).
    fn yearly_date(&self, s: &ScenarioConfig, p: &CustomerProfile) -> Option<(u32, u32)> {
        match s.kind {
            ScenarioKind::Birthday => p.birthday.as_deref().and_then(calendar::month_day),
            _ => p
                .registered_at
                .and_then(|r| calendar::local_month_day(r, self.zone_of(p))),
        }
    }

    /// Arms the next birthday or registration anniversary after `after`, in the
    /// customer's zone.
    fn schedule_yearly(
        &self,
        ctx: &mut Ctx<'_>,
        s: &ScenarioConfig,
        p: &CustomerProfile,
        after: Millis,
    ) -> anyhow::Result<()> {
        let tz = self.zone_of(p);
        let date = self.yearly_date(s, p);
        let (Some((month, day)), Some(time)) = (date, s.local_time_of_day()) else {
            ctx.cancel(&timer_id(&s.name, &p.customer_id))?;
            ctx.cancel(&follow_up_timer_id(&s.name, &p.customer_id))?;
            return Ok(());
        };
        // The registration day itself is no anniversary: the first one is a year later.
        let after = match (s.kind, p.registered_at) {
            (ScenarioKind::RegistrationAnniversary, Some(r)) => {
                calendar::start_of_next_local_day(r, tz)
                    .map_or(after, |next_day| after.max(next_day))
            }
            _ => after,
        };
        if let Some(at) = calendar::next_yearly(month, day, time, tz, after) {
            schedule_step(ctx, s, p, &s.name, at, 0, at, None, None)?;
        }
        Ok(())
    }

    /// Takes a profile out of the cache (or the store) for modification; every path
    /// puts it back.
    fn take(
        &mut self,
        ctx: &Ctx<'_>,
        customer_id: &str,
    ) -> anyhow::Result<Option<Box<CustomerProfile>>> {
        self.profiles.take(ctx, &profile_key(customer_id))
    }

    /// Puts a profile back, dirty; arms its anonymous retention if it needs one (on
    /// any path, so a profile stored before the retention existed is armed as soon as
    /// anything touches it).
    fn put(&mut self, ctx: &mut Ctx<'_>, mut p: Box<CustomerProfile>) -> anyhow::Result<()> {
        self.arm_anonymous_expiry(ctx, &mut p)?;
        self.profiles
            .put(ctx.partition, profile_key(&p.customer_id), p);
        Ok(())
    }

    fn apply_event(&mut self, ctx: &mut Ctx<'_>, e: &CustomerEvent) -> anyhow::Result<()> {
        let customer_id = e.customer_key().unwrap_or_default();
        let mut p = self
            .take(ctx, &customer_id)?
            .unwrap_or_else(|| Box::new(CustomerProfile::new(&customer_id, e.occurred_at)));
        if !p.remember_event(&e.event_id, ctx.now()) {
            self.metrics.duplicates.inc();
            self.put(ctx, p)?;
            return Ok(());
        }
        if let Some(c) = &e.consent {
            // Every stated consent goes to the arbiter, whatever the profile holds: an
            // unsubscribe outcome still on its way must not win over a later opt-in,
            // and a withdrawal must stop what is queued or cascading there at once.
            // The arbiter orders them by time.
            let (kind, name) = if c.granted {
                (CustomerActionKind::opt_in, "opt_in")
            } else {
                (CustomerActionKind::opt_out, "opt_out")
            };
            let action = CustomerAction {
                channel: Some(c.channel),
                ..CustomerAction::new(
                    deterministic_id(&[&e.event_id, name]),
                    customer_id.clone(),
                    kind,
                    profile::consent_stated_at(e, ctx.now()),
                )
            };
            ctx.emit(&self.actions_topic, &customer_id, &action);
        }
        self.catch_up_segment_reviews(ctx, &mut p, e.occurred_at)?;
        let birthday_before = (p.birthday.clone(), p.time_zone.clone());
        let subscription_before = p.subscription_ends_at;
        let visited_before = p.last_visit_at;
        // A subscription welcome may have started (rows from before `subscribed_at`
        // know none: their registration was the welcome).
        let subscribed_before = p.subscribed_at.is_some();
        let opted_in_before = p.opted_in_before();
        // Only events that state contacts can change them.
        let contacts_before = (e.email.is_some() || e.phone.is_some() || e.profile.is_some())
            .then(|| addresses_now(&p));
        p.touch(e, ctx.now());
        if let Some(before) = contacts_before {
            self.tell_contacts_changed(ctx, &p, &before, &e.event_id)?;
        }
        let first_opt_in = !opted_in_before
            && e.consent
                .as_ref()
                .is_some_and(|c| c.granted && p.consents.get(&c.channel) == Some(&true));
        if first_opt_in {
            p.subscribed_at = Some(e.occurred_at);
        }
        let mut purchase_changed = false;
        // Why the purchase aggregates changed, for the segment transitions.
        let mut purchase_reason = "purchase";
        // What an order's events read out of order mean for the segments.
        let mut reorder = Reorder::default();
        match e.event_type {
            EventType::registration if p.registered_at.is_none() => {
                p.registered_at = Some(e.occurred_at);
                for s in self.scenarios(ScenarioKind::Welcome).iter() {
                    // One series for a registration and a subscription, whichever
                    // came first.
                    let started = s.welcomes_on(WelcomeCause::Subscription) && subscribed_before;
                    if s.welcomes_on(WelcomeCause::Registration) && !started {
                        schedule_after_event(ctx, s, &p, e, None, None)?;
                    }
                }
                for s in self.scenarios(ScenarioKind::RegistrationAnniversary).iter() {
                    self.schedule_yearly(ctx, s, &p, ctx.now().max(e.occurred_at))?;
                }
            }
            // Topics are consumed independently, so a purchase (say, an offline
            // receipt) may arrive before the cart change it followed. A cart change
            // older than the last purchase belongs to a cart that was bought.
            EventType::add_to_cart | EventType::remove_from_cart
                if !p.bought_since(e.occurred_at) =>
            {
                let cart_changed_before = p.cart_updated_at;
                p.update_cart(e);
                for s in self.scenarios(ScenarioKind::AbandonedCart).iter() {
                    if p.cart.is_empty() {
                        stop_wait(ctx, s, &mut p)?;
                        continue;
                    }
                    // Every cart change restarts the wait. One older than a change
                    // read before it that emptied the cart (and stopped the wait) runs
                    // it from that later change, as in time order.
                    let emptied_later = cart_changed_before
                        .filter(|c| *c > e.occurred_at && !p.waits.contains_key(s.name.as_str()));
                    let since = emptied_later.unwrap_or(e.occurred_at);
                    restart_wait(ctx, s, &mut p, (&e.event_id, since), None)?;
                }
                for s in self.scenarios(ScenarioKind::BrowseAbandonment).iter() {
                    // A cart change after the browsing ends it. One older than the
                    // browsing (another device's topic, arriving late) leaves the
                    // wait to its timer, which looks at the cart as it then stands:
                    // with no change after the view, that is the cart the customer
                    // browsed with, whatever order the changes arrived in.
                    let older = p
                        .waits
                        .get(s.name.as_str())
                        .is_some_and(|w| w.cause_occurred_at > e.occurred_at);
                    if !older {
                        stop_wait(ctx, s, &mut p)?;
                    }
                }
            }
            EventType::product_view => {
                if let Some(product) = &e.product {
                    if p.view(product, e.occurred_at) {
                        self.emit_event_interest(
                            ctx,
                            &customer_id,
                            product,
                            InterestKind::viewed,
                            e,
                        );
                    }
                    // Armed whatever the cart holds now: an older change arriving
                    // later may yet empty it (the timer decides, see
                    // `fire_scenario`).
                    if !p.bought_since(e.occurred_at) {
                        for s in self.scenarios(ScenarioKind::BrowseAbandonment).iter() {
                            restart_wait(
                                ctx,
                                s,
                                &mut p,
                                (&e.event_id, e.occurred_at),
                                Some(product.clone()),
                            )?;
                        }
                    }
                }
            }
            EventType::wishlist_add => {
                if let Some(product) = &e.product {
                    if let Some(added) = p.wishlist_add(product, e.occurred_at) {
                        self.emit_event_interest(
                            ctx,
                            &customer_id,
                            product,
                            InterestKind::wishlisted,
                            e,
                        );
                        if let Some(out) = added.pushed_out {
                            // Its own id: the event already made one interest record.
                            let key = [e.event_id.as_str(), "/interest"].concat();
                            self.drop_wishes(ctx, &customer_id, &[out], &key, e.occurred_at);
                        }
                    }
                }
            }
            EventType::wishlist_remove => {
                if let Some(product) = &e.product {
                    if p.wishlist_remove(&product.product_id, e.occurred_at) {
                        self.emit_event_interest(
                            ctx,
                            &customer_id,
                            product,
                            InterestKind::unwishlisted,
                            e,
                        );
                    }
                }
            }
            EventType::purchase => {
                let order_id = e.order.as_ref().map(|o| o.order_id.clone());
                let latest = p.last_purchase_at;
                // What was bought: the event's items, else the cart it checks out.
                let items = if e.items.is_empty() {
                    &p.cart
                } else {
                    &e.items
                };
                // Its value as feedback counts it: the order's total, else its items
                // (not the cart's prices: no currency is known for them).
                let total = e.purchase_value();
                let bought: Vec<String> = items.iter().map(|i| i.product_id.clone()).collect();
                let order_items = order_items_variables(items);
                let held_before = p.held_before_early_cancellation(order_id.as_deref());
                let applied = p.record_purchase(e.occurred_at, total, false, order_id.clone());
                if applied == PurchaseApplied::CancelledBefore {
                    reorder.restored = held_before;
                }
                if applied == PurchaseApplied::Counted {
                    let order = order_id.as_deref();
                    p.note_bought(bought.iter().map(String::as_str), e.occurred_at, order);
                }
                match applied {
                    // A purchase whose cancellation came first ends what a checkout
                    // ends, as it would have read first; its follow-ups find the order
                    // cancelled when they fire.
                    PurchaseApplied::Counted | PurchaseApplied::CancelledBefore => {
                        let purchase = Purchase {
                            event_id: &e.event_id,
                            at: e.occurred_at,
                            latest_before: latest,
                            order_id,
                            offline: false,
                            order_items,
                        };
                        self.after_purchase(ctx, &mut p, purchase)?;
                        purchase_changed = true;
                    }
                    PurchaseApplied::AlreadyCounted => self.metrics.duplicates.inc(),
                }
            }
            EventType::order_status => {
                // A status re-sent for a recent order (under a new event id) applies
                // once; for an older order the profile cannot tell. A return of an
                // order partly returned is another part (or the rest) of it.
                let noted = e.order.as_ref().and_then(|o| {
                    let st = o.status?;
                    let partly_returned =
                        st == OrderStatus::returned && p.partly_returned(&o.order_id);
                    let seen_before = p.note_status(&o.order_id, st, e.occurred_at) == Some(false);
                    Some((seen_before, partly_returned))
                });
                let status_seen_before = noted.is_some_and(|(seen, _)| seen);
                let repeated = noted.is_some_and(|(seen, partly)| seen && !partly);
                if repeated {
                    self.metrics.duplicates.inc();
                }
                if let Some(order) = e.order.as_ref().filter(|_| !repeated) {
                    match order.status {
                        // A cancelled order is undone like a returned one, and stops
                        // counting as an order.
                        Some(status @ (OrderStatus::returned | OrderStatus::cancelled)) => {
                            let kind = if status == OrderStatus::cancelled {
                                purchase_reason = "cancellation";
                                ReversalKind::Cancellation
                            } else {
                                purchase_reason = "return";
                                ReversalKind::Return
                            };
                            let reversal =
                                p.record_return(&order.order_id, order.total, e.occurred_at, kind);
                            if let Reversal::Applied { known } = reversal {
                                // Only while every order the profile counted is among
                                // its recent ones: then an unknown order is one whose
                                // purchase has not come yet, not an old one.
                                reorder.early_cancellation = !known
                                    && kind == ReversalKind::Cancellation
                                    && p.holds_every_order();
                                // A recent order's follow-up checks its mark in the
                                // profile; an older one's needs a mark of its own.
                                if known {
                                    self.rearm_post_purchase(ctx, &p, &order.order_id)?;
                                } else {
                                    self.cancel_post_purchase(
                                        ctx,
                                        &customer_id,
                                        Some(&order.order_id),
                                    )?;
                                }
                                purchase_changed = true;
                            }
                        }
                        Some(OrderStatus::delivered) => {
                            // Caused by the order's delivery, whatever event said it: a
                            // status re-sent for an order older than the recent ones
                            // (which cannot tell it is a repeat) gives the same survey.
                            let cause = ["delivered:", order.order_id.as_str()].concat();
                            // A later delivery of another order, read first, holds the
                            // survey: in time order it replaced this one's.
                            let later_delivery = p.latest_delivery().is_some_and(|(o, at)| {
                                o.order_id != order.order_id && at > e.occurred_at
                            });
                            // One cancelled or returned (a carrier reporting it anyway)
                            // gets no survey, and the pending one of another order
                            // keeps its place, as for follow-ups.
                            let reversed = p.order_returned(&order.order_id);
                            for s in self
                                .scenarios(ScenarioKind::PostDelivery)
                                .iter()
                                .filter(|_| !later_delivery && !reversed)
                            {
                                // So does one whose survey is pending although the
                                // profile does not know it delivered (its status was
                                // read before its purchase).
                                let pending = carried_step(ctx, &timer_id(&s.name, &customer_id))?;
                                let later_pending = pending.is_some_and(|c| {
                                    c.timer.cause_occurred_at > e.occurred_at
                                        && c.timer.order_id.as_deref() != Some(&order.order_id)
                                });
                                if later_pending {
                                    continue;
                                }
                                let order_id = Some(order.order_id.as_str());
                                let at = e.occurred_at;
                                schedule_after(ctx, s, &p, &cause, at, None, order_id)?;
                            }
                        }
                        _ => {}
                    }
                    for s in self.scenarios(ScenarioKind::OrderUpdate).iter() {
                        let matches = order
                            .status
                            .is_some_and(|st| s.statuses.is_empty() || s.statuses.contains(&st));
                        // One update per order and status (a further partial return
                        // tells nothing new).
                        if matches && !status_seen_before {
                            let mut vars = serde_json::Map::new();
                            vars.insert("order_id".into(), order.order_id.clone().into());
                            vars.insert(
                                "status".into(),
                                serde_json::to_value(order.status).unwrap_or_default(),
                            );
                            // One update per order and status, whatever event said it.
                            let status = order.status.map_or("none", OrderStatus::as_str);
                            let key = format!("order:{}:{status}", order.order_id);
                            self.emit_keyed_trigger(
                                ctx,
                                s,
                                &p,
                                0,
                                &key,
                                &e.event_id,
                                e.occurred_at,
                                e.occurred_at,
                                vars,
                            );
                        }
                    }
                }
            }
            _ => {}
        }
        if first_opt_in {
            for s in self.scenarios(ScenarioKind::Welcome).iter() {
                let started =
                    s.welcomes_on(WelcomeCause::Registration) && p.registered_at.is_some();
                if s.welcomes_on(WelcomeCause::Subscription) && !started {
                    schedule_after_event(ctx, s, &p, e, None, None)?;
                }
            }
        }
        if (p.birthday.clone(), p.time_zone.clone()) != birthday_before {
            // From a tolerance ago: a zone that puts today's moment in the past (New
            // York to Berlin on the birthday morning) still greets, late within the
            // tolerance; a greeting sent already has the same id (one per year), which
            // the arbiter drops.
            let now = ctx.now().max(e.occurred_at);
            for s in self.scenarios(ScenarioKind::Birthday).iter() {
                self.schedule_yearly(ctx, s, &p, self.yearly_rearm_since(s, &p, now))?;
            }
            // The anniversary is a local date and time too: a new zone moves it.
            if p.time_zone != birthday_before.1 && p.registered_at.is_some() {
                for s in self.scenarios(ScenarioKind::RegistrationAnniversary).iter() {
                    self.schedule_yearly(ctx, s, &p, self.yearly_rearm_since(s, &p, now))?;
                }
            }
        }
        if p.subscription_ends_at != subscription_before {
            self.schedule_subscription_ending(ctx, &p, e.occurred_at, true)?;
        }
        if profile::is_visit(e.event_type) {
            self.arm_reactivation(ctx, &mut p)?;
            // Once a day is enough for the arbiter's activity (sunset, reactivation).
            let day = |t: Millis| t.div_euclid(kairos_core::time::DAY);
            if visited_before.is_none_or(|v| day(v) < day(e.occurred_at)) {
                let action = CustomerAction::new(
                    deterministic_id(&[&e.event_id, "visit"]),
                    customer_id.clone(),
                    CustomerActionKind::visit,
                    e.occurred_at,
                );
                ctx.emit(&self.actions_topic, &customer_id, &action);
            }
        }
        if purchase_changed || p.lifecycle.is_none() {
            self.review_segments(
                ctx,
                &mut p,
                if purchase_changed {
                    purchase_reason
                } else {
                    "first event"
                },
                e.occurred_at,
                &reorder,
            )?;
        }
        self.put(ctx, p)?;
        Ok(())
    }

    /// Outcomes only update customers the profile knows; one for an unknown customer
    /// (state lost, a foreign producer) creates nothing. One for a customer merged
    /// away goes on to the survivor while the forwarding record lasts: the message
    /// went out under the old id, and its open, click or unsubscribe is the person's.
    fn apply_outcome(&mut self, ctx: &mut Ctx<'_>, o: &Outcome) -> anyhow::Result<()> {
        let Some(mut p) = self.take(ctx, &o.customer_id)? else {
            if !outcome_concerns_profile(o) {
                return Ok(());
            }
            let forwarded = self.send_on_to_survivor(ctx, &o.customer_id, |survivor| {
                IdentifiedRecord::outcome(Box::new(Outcome {
                    customer_id: survivor.to_string(),
                    ..o.clone()
                }))
            })?;
            if forwarded {
                self.metrics.outcomes_forwarded.inc();
            }
            return Ok(());
        };
        // An unsubscribe or complaint applies however often it comes (see the
        // arbiter's ledger): a second unsubscribe from one message, after a new
        // opt-in, has the same id. Not a hard bounce: a webhook's names no address,
        // and repeated after the customer changed theirs it would mark the new one.
        let suppression = matches!(o.kind, OutcomeKind::unsubscribed | OutcomeKind::complained);
        if p.remember_outcome(&o.outcome_id) || suppression {
            p.apply_outcome(o);
        } else {
            self.metrics.duplicates.inc();
        }
        self.put(ctx, p)?;
        Ok(())
    }

    /// Sends `record` (made for the survivor) on to the customer that `merged`, merged
    /// away, became, while its forwarding record lasts; returns whether it did.
    fn send_on_to_survivor(
        &self,
        ctx: &mut Ctx<'_>,
        merged: &str,
        record: impl FnOnce(&str) -> IdentifiedRecord,
    ) -> anyhow::Result<bool> {
        let (Some(survivor), Some(topic)) = (
            ctx.get::<String>(&forward_key(merged))?,
            &self.identified_topic,
        ) else {
            return Ok(false);
        };
        ctx.emit(topic, &survivor, &record(&survivor));
        Ok(true)
    }

    /// An e-mail or phone the identity processor moved from this customer to the one
    /// who presented it stops being this customer's address, and the arbiter is told
    /// (`contacts_changed`), so a message waiting there does not go to it either. A
    /// customer merged away since hands the move to the survivor, which holds the
    /// address now.
    fn release_identifier(
        &mut self,
        ctx: &mut Ctx<'_>,
        moved: &IdentifierMoved,
    ) -> anyhow::Result<()> {
        let Some(mut p) = self.take(ctx, &moved.from)? else {
            self.send_on_to_survivor(ctx, &moved.from, |survivor| {
                IdentifiedRecord::identifier_moved(IdentifierMoved {
                    from: survivor.to_string(),
                    ..moved.clone()
                })
            })?;
            return Ok(());
        };
        let before = addresses_now(&p);
        if p.release_identifier(&moved.identifier, &moved.to) {
            tracing::info!(customer = %moved.from, identifier = %moved.identifier, holder = %moved.to, "an address moved to the customer who presented it");
            self.tell_contacts_changed(ctx, &p, &before, &moved.move_id)?;
        }
        self.put(ctx, p)?;
        Ok(())
    }

    /// Arms the retention timer of a profile Kairos named after an anonymous
    /// identifier, once: it moves when it fires (see `expire_anonymous`). Due at the
    /// last event plus the retention, which for a profile stored before the retention
    /// existed may be past already: the timer then fires at once and checks.
    fn arm_anonymous_expiry(
        &self,
        ctx: &mut Ctx<'_>,
        p: &mut CustomerProfile,
    ) -> anyhow::Result<()> {
        let retention = self.anonymous_retention;
        // One that absorbed another profile stays, as its node stays in the identity
        // graph (it forwards the merged identifiers).
        if retention == 0
            || p.anonymous_expiry_at.is_some()
            || !p.merged_from.is_empty()
            || !is_reserved_customer_id(&p.customer_id)
        {
            return Ok(());
        }
        let due = p.last_seen_at.saturating_add(retention);
        ctx.schedule(&format!("{ANONYMOUS_EXPIRY}/{}", p.customer_id), due, &())?;
        p.anonymous_expiry_at = Some(due);
        Ok(())
    }

    /// Forgets an anonymous profile no event (nor an opened or clicked message) came
    /// for within the retention, as the identity processor forgets its node: the
    /// profile, its timers, return marks and held triggers go, and the catalog join
    /// drops its wishes (its views age out there on their own). One seen since waits
    /// again from its last event.
    fn expire_anonymous(
        &mut self,
        ctx: &mut Ctx<'_>,
        customer: &str,
        fire_at: Millis,
    ) -> anyhow::Result<()> {
        // A timer armed past due (a profile stored before the retention existed) fires
        // at once: the forgetting happens now, and is dated so for the arbiter. Its ids
        // come from the timer's time, which a firing again after a crash keeps (the
        // wall clock's now does not).
        let now = fire_at.max(ctx.now());
        let Some(mut p) = self.take(ctx, customer)? else {
            return Ok(());
        };
        let retention = self.anonymous_retention;
        // Retention switched off, or the profile absorbed another since it was armed:
        // kept, and not armed again (see `arm_anonymous_expiry`).
        if retention == 0 || !p.merged_from.is_empty() {
            p.anonymous_expiry_at = None;
            self.put(ctx, p)?;
            return Ok(());
        }
        // Opening or clicking a message is the customer's doing too: a subscriber
        // known by an e-mail alone who reads the newsletter is no stale visitor.
        let engaged = p
            .engagement
            .iter()
            .flat_map(|(_, e)| [e.last_opened_at, e.last_clicked_at])
            .flatten()
            .max();
        let due = p
            .last_seen_at
            .max(engaged.unwrap_or(Millis::MIN))
            .saturating_add(retention);
        if due > now {
            ctx.schedule(&format!("{ANONYMOUS_EXPIRY}/{customer}"), due, &())?;
            p.anonymous_expiry_at = Some(due);
            self.put(ctx, p)?;
            return Ok(());
        }
        for s in &self.config.scenarios {
            ctx.cancel(&timer_id(&s.name, customer))?;
            if is_yearly(s.kind) {
                ctx.cancel(&follow_up_timer_id(&s.name, customer))?;
            }
        }
        ctx.cancel(&format!("{SEGMENT_REVIEW}/{customer}"))?;
        for awaited in &p.awaiting_merges {
            ctx.cancel(&format!("{MERGE_WAIT_EXPIRY}/{customer}/{awaited}"))?;
        }
        take_return_marks(ctx, customer)?;
        for (key, _) in held_triggers(ctx, customer)? {
            ctx.delete(&key);
        }
        let id_key = format!("{customer}/expired/{fire_at}");
        self.drop_wishes(ctx, customer, &p.wishlist, &id_key, now);
        self.profiles.remove(ctx.partition, &profile_key(customer));
        ctx.delete(&profile_key(customer));
        // The arbiter forgets the customer's ledger too.
        let action = CustomerAction::new(
            deterministic_id(&[customer, "forgotten", &fire_at.to_string()]),
            customer.to_string(),
            CustomerActionKind::forgotten,
            now,
        );
        ctx.emit(&self.actions_topic, customer, &action);
        self.metrics.anonymous_expired.inc();
        Ok(())
    }

    /// This customer joined another: its timers stop, its profile goes to the survivor
    /// (keyed by it, so it lands in the survivor's partition), and the arbiter is told.
    fn merge_out(&mut self, ctx: &mut Ctx<'_>, m: &CustomerMerge) -> anyhow::Result<()> {
        let mut steps = Vec::new();
        let p = match self.take(ctx, &m.from)? {
            Some(mut p) => {
                for s in &self.config.scenarios {
                    let main = timer_id(&s.name, &m.from);
                    // A reactivation's mark is when its first step fired, or, while
                    // that step waits, when it is due: only a fired one goes to the
                    // survivor (which sends nothing again for that absence).
                    if s.kind == ScenarioKind::Reactivation
                        && carried_step(ctx, &main)?.is_some_and(|c| c.timer.step == 0)
                    {
                        p.armed.remove(s.name.as_str());
                    }
                    // Chains the survivor's profile cannot rebuild go with the merge
                    // (see `rearm_merged_chains` for those it can); a cart or browse
                    // wait's timer says which step is next.
                    if s.kind == ScenarioKind::SegmentEntered
                        || carried_by_slot(s.kind)
                        || s.kind.is_restartable_wait()
                    {
                        steps.extend(carried_step(ctx, &main)?);
                    }
                    ctx.cancel(&main)?;
                    if is_yearly(s.kind) {
                        let follow_up = follow_up_timer_id(&s.name, &m.from);
                        steps.extend(carried_step(ctx, &follow_up)?);
                        ctx.cancel(&follow_up)?;
                    }
                }
                ctx.cancel(&format!("{SEGMENT_REVIEW}/{}", m.from))?;
                ctx.cancel(&format!("{ANONYMOUS_EXPIRY}/{}", m.from))?;
                self.profiles.remove(ctx.partition, &profile_key(&m.from));
                ctx.delete(&profile_key(&m.from));
                // The catalog join knows these wishes under this id, whose occasions
                // find no profile any more: they go (the survivor takes over the ones
                // it keeps, see `merge_in`).
                self.drop_wishes(ctx, &m.from, &p.wishlist, &m.merge_id, m.occurred_at);
                p
            }
            // Nothing known here: the survivor still waits for an answer.
            None => Box::new(CustomerProfile::new(&m.from, m.occurred_at)),
        };
        // Return marks go with it: the carried follow-ups check them when they fire.
        let returned = take_return_marks(ctx, &m.from)?;
        // Triggers held for a merge into `from` still under way go with the profile.
        let mut held = Vec::new();
        for (key, t) in held_triggers(ctx, &m.from)? {
            ctx.delete(&key);
            held.push(t);
        }
        let record = IdentifiedRecord::merge_in {
            merge: m.clone(),
            profile: serde_json::to_value(&p).context("encode a merged profile")?,
            held,
            steps: encode_carried_steps(&steps)?,
            chains_carried: true,
            returned,
        };
        if let Some(topic) = &self.identified_topic {
            ctx.emit(topic, &m.into, &record);
        }
        // A merge into `from` still on its way (its profile sent before this merge was
        // known to the sender) must find the customer `from` became.
        ctx.put(&forward_key(&m.from), &m.into)?;
        let expires = m.occurred_at.max(ctx.now()) + ms(self.config.identity.forward_retention);
        ctx.schedule(&format!("{FORWARD_EXPIRY}/{}", m.from), expires, &m.from)?;
        let action = CustomerAction {
            merged_into: Some(m.into.clone()),
            ..CustomerAction::new(
                deterministic_id(&[&m.merge_id, "merged"]),
                m.from.clone(),
                CustomerActionKind::merged,
                m.occurred_at,
            )
        };
        ctx.emit(&self.actions_topic, &m.from, &action);
        Ok(())
    }

    /// A merged customer's profile joins the survivor's: the sums and the most
    /// restrictive consent (see [`CustomerProfile::absorb`]); a wait the merged one had
    /// and the survivor lacks (an anonymous cart before the login) carries on.
    fn merge_in(&mut self, ctx: &mut Ctx<'_>, input: MergeIn) -> anyhow::Result<()> {
        let MergeIn {
            merge: ref m,
            profile: merged,
            held,
            steps,
            chains_carried,
            returned,
        } = input;
        if let Some(survivor) = ctx.get::<String>(&forward_key(&m.into))? {
            // `into` joined another customer before this profile arrived (Y into X,
            // then X into Z): the profile goes on to that one rather than bringing
            // `into` back to life.
            let record = IdentifiedRecord::merge_in {
                merge: CustomerMerge {
                    into: survivor.clone(),
                    ..m.clone()
                },
                profile: serde_json::to_value(&merged).context("encode a merged profile")?,
                held,
                steps: encode_carried_steps(&steps)?,
                chains_carried,
                returned,
            };
            if let Some(topic) = &self.identified_topic {
                ctx.emit(topic, &survivor, &record);
            }
            return Ok(());
        }
        let mut p = self
            .take(ctx, &m.into)?
            .unwrap_or_else(|| Box::new(CustomerProfile::new(&m.into, merged.first_seen_at)));
        if p.merged_from.contains(&m.from) {
            // A re-sent merge (after a crash): its purchases are in already.
            self.metrics.duplicates.inc();
            self.put(ctx, p)?;
            return Ok(());
        }
        // As for an event: the survivor's reviews due before the merge (read in the
        // backlog of an outage, before their timers) are judged first, for time.
        self.catch_up_segment_reviews(ctx, &mut p, m.occurred_at)?;
        let waits = merged.waits.clone();
        let armed = merged.armed.clone();
        let merged_earlier = merged.merged_from.clone();
        // A wait's carried timer: its next step (a reminder sent already is not sent
        // again). Merge records of earlier versions carry none: step 0 then.
        let (wait_steps, steps): (Vec<CarriedStep>, Vec<CarriedStep>) =
            steps.into_iter().partition(|c| {
                self.config
                    .scenario(&c.timer.scenario)
                    .is_some_and(|s| s.kind.is_restartable_wait())
            });
        let awaited_before = p.awaiting_merges.clone();
        let yearly_before = (p.birthday.clone(), p.time_zone.clone(), p.registered_at);
        let subscription_before = p.subscription_ends_at;
        let merged_views: Vec<(String, Option<f64>, Millis)> = merged
            .recently_viewed
            .iter()
            .map(|v| (v.product_id.to_string(), v.price, v.at))
            .collect();
        let merged_wishes: Vec<Product> = merged.wishlist.clone();
        for order in &returned {
            self.cancel_post_purchase(ctx, &m.into, Some(order))?;
        }
        let held_segments: Vec<String> = merged
            .rfm
            .iter()
            .map(|r| r.segment.clone())
            .chain(merged.lifecycle.clone())
            .collect();
        // Welcome and order steps go with their own slot rules (`rearm_merged_chains`).
        let (slot_steps, steps): (Vec<CarriedStep>, Vec<CarriedStep>) =
            steps.into_iter().partition(|c| {
                self.config
                    .scenario(&c.timer.scenario)
                    .is_some_and(|s| carried_by_slot(s.kind))
            });
        // The person was in these segments already: the merge moving the survivor
        // into one is no entry, so its `segment_entered` chain does not start again.
        // What the merged customer's chain still had to send goes on: later steps
        // are carried below, and a step waiting in the arbiter's queue is handed
        // to the survivor there.
        let chains_going_on: Vec<String> = self
            .scenarios(ScenarioKind::SegmentEntered)
            .iter()
            .filter(|s| held_segments.iter().any(|h| s.targets_segment(h)))
            .map(|s| s.name.clone())
            .collect();
        let chains = MergedChains {
            order: merged
                .latest_order()
                .filter(|o| p.last_purchase_at.is_none_or(|mine| mine < o.at))
                .map(|o| (o.order_id.clone(), o.at)),
            welcome: WelcomeStarts {
                survivor: (p.registered_at, p.subscribed_at),
                merged: (merged.registered_at, merged.subscribed_at),
            },
            carried: chains_carried.then_some(slot_steps),
            survivor_last_purchase: p.last_purchase_at,
            survivor_last_delivery: p.latest_delivery().map(|(_, at)| at),
            delivery: merged
                .latest_delivery()
                .filter(|(_, at)| p.latest_delivery().is_none_or(|(_, mine)| mine < *at))
                .map(|(o, at)| (o.order_id.clone(), at)),
        };
        // The merged customer's yearly dates, and whether a greeting of each could
        // reach it (a consented channel of the scenario's), before its profile goes.
        let merged_dates: Vec<(Option<(u32, u32)>, bool)> = self
            .config
            .scenarios
            .iter()
            .filter(|s| is_yearly(s.kind))
            .map(|s| {
                let reachable = s
                    .channels
                    .iter()
                    .any(|c| merged.consents.get(c).copied().unwrap_or(false));
                (self.yearly_date(s, &merged), reachable)
            })
            .collect();
        let wishes_before = p.wishlist.clone();
        let contacts_before = addresses_now(&p);
        p.absorb(merged);
        // The arbiter's note of this customer's contacts is of before the merge: a
        // message handed over or waiting there goes to the person's addresses now (the
        // merged guest's phone, for an order notice's SMS fallback).
        self.tell_contacts_changed(ctx, &p, &contacts_before, &m.merge_id)?;
        // When the merged customer was last greeted on a yearly date: the person was,
        // and a re-arm below, the survivor's own timer or a zone change later today
        // must not greet again. Only for the date the survivor keeps, and a greeting
        // that could have reached the person.
        let yearly = self.config.scenarios.iter().filter(|s| is_yearly(s.kind));
        for (s, (date, reachable)) in yearly.zip(merged_dates) {
            let name = s.name.as_str();
            let same_date = date.is_some() && date == self.yearly_date(s, &p);
            if let Some(&greeted) = armed.get(name).filter(|_| same_date && reachable) {
                if p.armed.get(name).is_none_or(|&mine| mine < greeted) {
                    p.armed.insert(name.into(), greeted);
                }
            }
        }
        // A wish of the survivor's that the merged customer took off later is off.
        let taken_off: Vec<Product> = wishes_before
            .into_iter()
            .filter(|w| !p.wishlist.iter().any(|x| x.product_id == w.product_id))
            .collect();
        let id_key = [m.merge_id.as_str(), "/survivor"].concat();
        self.drop_wishes(ctx, &m.into, &taken_off, &id_key, m.occurred_at);
        // The catalog join knows these interests under the merged id, whose occasions
        // find no profile any more: the survivor takes them over (a view keeps its own
        // time, so it leaves the audience when it would have).
        for (product_id, price_seen, viewed_at) in merged_views {
            let kept = p
                .recently_viewed
                .iter()
                .any(|v| v.product_id == product_id && v.at == viewed_at);
            if kept {
                self.hand_over_interest(
                    ctx,
                    m,
                    &product_id,
                    price_seen,
                    InterestKind::viewed,
                    viewed_at,
                );
            }
        }
        for wish in merged_wishes {
            if p.wishlist.iter().any(|w| w.product_id == wish.product_id) {
                let at = m.occurred_at;
                self.hand_over_interest(
                    ctx,
                    m,
                    &wish.product_id,
                    wish.price,
                    InterestKind::wishlisted,
                    at,
                );
            }
        }
        p.awaiting_merges.retain(|c| *c != m.from);
        // What the merged customer still waited for, the survivor waits for now, as
        // long as for a merge of its own.
        for awaited in p.awaiting_merges.clone() {
            if !awaited_before.contains(&awaited) {
                schedule_merge_wait(ctx, &p.customer_id, &awaited, m.occurred_at)?;
            }
        }
        // Whom the merged customer had absorbed counts as merged here too: the
        // arbiter may get their ledger after the merged customer's (the two come from
        // different partitions), and the survivor's triggers must wait for it.
        for from in merged_earlier.iter().chain([&m.from]) {
            if !p.merged_from.contains(from) && *from != p.customer_id {
                if p.merged_from.len() >= MERGED_FROM_KEPT {
                    p.merged_from.remove(0);
                }
                p.merged_from.push(from.clone());
            }
        }
        let config = self.config.clone();
        for (name, wait) in waits {
            let Some(s) = config.scenario(&name) else {
                continue;
            };
            let newer = p
                .waits
                .get(&name)
                .is_none_or(|mine| mine.cause_occurred_at < wait.cause_occurred_at);
            if !newer {
                continue;
            }
            // A cart wait needs the cart it waits for; a purchase since ends it.
            if p.bought_since(wait.cause_occurred_at)
                || (s.kind == ScenarioKind::AbandonedCart && p.cart.is_empty())
            {
                continue;
            }
            let carried = wait_steps.iter().find(|c| {
                c.timer.scenario == name.as_str() && c.timer.cause_event_id == wait.cause_event_id
            });
            let (step, fire_at) = match carried {
                Some(c) => (c.timer.step, c.fire_at),
                None => (
                    0,
                    armed
                        .get(&name)
                        .copied()
                        .unwrap_or(wait.cause_occurred_at + ms(s.delay)),
                ),
            };
            arm_wait(ctx, s, &mut p, &wait, step, fire_at)?;
            p.waits.insert(name, wait);
        }
        // The merged customer's timers were cancelled with it: what its profile
        // brought (a birthday, a registration date, a zone, a subscription, visits)
        // is armed again for the survivor.
        let now = ctx.now().max(m.occurred_at);
        if (p.birthday.clone(), p.time_zone.clone(), p.registered_at) != yearly_before {
            for kind in [
                ScenarioKind::Birthday,
                ScenarioKind::RegistrationAnniversary,
            ] {
                for s in self.scenarios(kind).iter() {
                    // As for a zone change in an event: a moment the merge put behind
                    // (the merged zone's morning is over) still greets, late within
                    // the tolerance, unless either profile was greeted since.
                    self.schedule_yearly(ctx, s, &p, self.yearly_rearm_since(s, &p, now))?;
                }
            }
        }
        if p.subscription_ends_at != subscription_before {
            // Not told at once if its lead began before the merge: either profile may
            // have been told already, under the other id.
            self.schedule_subscription_ending(ctx, &p, m.occurred_at, false)?;
        }
        self.rearm_merged_chains(ctx, m, &p, chains, now)?;
        // A reactivation the merged customer got for its absence (its mark: when it
        // fired) is not sent again for the same absence under this id; this
        // profile's own mark stays if later, or if it is a timer still to fire.
        for s in self.scenarios(ScenarioKind::Reactivation).iter() {
            let name = s.name.as_str();
            let Some(fired) = armed.get(name).copied().filter(|f| *f < now) else {
                continue;
            };
            if p.armed.get(name).is_none_or(|mine| *mine < fired) {
                p.armed.insert(name.into(), fired);
            }
        }
        self.arm_reactivation(ctx, &mut p)?;
        self.chains_going_on = chains_going_on;
        let reviewed =
            self.review_segments(ctx, &mut p, "merge", m.occurred_at, &Reorder::default());
        self.chains_going_on.clear();
        reviewed?;
        // After the review, so that a chain the merge's own transition started (for a
        // segment the merged customer had left) holds its place.
        for carried in steps {
            if !self.survivor_runs_chain(ctx, &m.into, &carried)? {
                self.rearm_carried_step(ctx, &p, &carried)?;
            }
        }
        // The merged customer's held triggers are the survivor's now: held on while
        // it waits for other merges, sent with its contacts otherwise.
        for mut t in held {
            t.customer_id = p.customer_id.clone();
            if p.awaiting_merges.is_empty() {
                t.contacts = contacts(&p);
                t.merged_from = p.merged_from.clone();
                ctx.emit(&self.triggers_topic, &p.customer_id, &t);
            } else {
                let key = format!("{}{}", held_prefix(&p.customer_id), t.trigger_id);
                ctx.put(&key, &t)?;
            }
        }
        if p.awaiting_merges.is_empty() {
            self.release_held_triggers(ctx, &p)?;
        }
        self.put(ctx, p)?;
        Ok(())
    }

    /// What waited for merges goes out with the survivor's contacts and consents (the
    /// merged ones' included).
    fn release_held_triggers(&self, ctx: &mut Ctx<'_>, p: &CustomerProfile) -> anyhow::Result<()> {
        for (key, mut t) in held_triggers(ctx, &p.customer_id)? {
            t.contacts = contacts(p);
            t.merged_from = p.merged_from.clone();
            ctx.delete(&key);
            ctx.emit(&self.triggers_topic, &p.customer_id, &t);
        }
        Ok(())
    }

    /// A merged profile that has not come within `MERGE_WAIT_LIMIT`: the survivor no
    /// longer waits for it, and what it held goes out once it waits for nothing else.
    fn give_up_merge_wait(
        &mut self,
        ctx: &mut Ctx<'_>,
        into: &str,
        from: &str,
    ) -> anyhow::Result<()> {
        let Some(mut p) = self.take(ctx, into)? else {
            return Ok(());
        };
        if p.awaiting_merges.iter().any(|c| c == from) {
            tracing::warn!(survivor = into, merged = from, "the merged profile did not come within an hour: its survivor's triggers wait no longer");
            self.metrics.merge_waits_given_up.inc();
            p.awaiting_merges.retain(|c| c != from);
            if p.awaiting_merges.is_empty() {
                self.release_held_triggers(ctx, &p)?;
            }
        }
        self.put(ctx, p)?;
        Ok(())
    }

    /// Whether the survivor has a timer of its own where the carried step would go.
    fn survivor_runs_chain(
        &self,
        ctx: &Ctx<'_>,
        survivor: &str,
        carried: &CarriedStep,
    ) -> anyhow::Result<bool> {
        let Some(s) = self.config.scenario(&carried.timer.scenario) else {
            return Ok(false);
        };
        let id = step_timer_id(s, carried.timer.step, survivor);
        Ok(ctx.timer_fire_at(&id)?.is_some())
    }

    /// Arms a merged customer's chain step for the survivor, at the time it had.
    fn rearm_carried_step(
        &self,
        ctx: &mut Ctx<'_>,
        p: &CustomerProfile,
        carried: &CarriedStep,
    ) -> anyhow::Result<()> {
        let Some(s) = self
            .config
            .scenario(&carried.timer.scenario)
            .filter(|s| s.enabled)
        else {
            return Ok(());
        };
        let t = &carried.timer;
        let step = StepTimer {
            given_way: &t.given_way,
            ..StepTimer::new(
                &t.cause_event_id,
                t.cause_occurred_at,
                t.step,
                carried.fire_at,
            )
        };
        schedule_timer_step(ctx, s, p, t, step)
    }

    /// Re-arms, for the survivor, the chains the merged customer's cancelled timers
    /// carried and its profile can rebuild (see [`MergedChains`]); only what is still
    /// ahead. Their cause is the merge, so their ids are deterministic.
    fn rearm_merged_chains(
        &self,
        ctx: &mut Ctx<'_>,
        m: &CustomerMerge,
        p: &CustomerProfile,
        chains: MergedChains,
        now: Millis,
    ) -> anyhow::Result<()> {
        if let Some(carried) = &chains.carried {
            for c in carried {
                let Some(s) = self.config.scenario(&c.timer.scenario) else {
                    continue;
                };
                let at = c.timer.cause_occurred_at;
                // The survivor's later purchase or delivery, or its own welcome
                // series, holds the scenario's slot, as one customer's would.
                let goes_on = match s.kind {
                    ScenarioKind::PostPurchase => {
                        chains.survivor_last_purchase.is_none_or(|mine| mine < at)
                            && c.timer
                                .order_id
                                .as_deref()
                                .is_none_or(|o| !p.order_returned(o))
                    }
                    ScenarioKind::PostDelivery => {
                        chains.survivor_last_delivery.is_none_or(|mine| mine < at)
                    }
                    ScenarioKind::Welcome => {
                        chains.welcome.start(s, chains.welcome.survivor).is_none()
                    }
                    _ => false,
                };
                if goes_on {
                    self.rearm_carried_step(ctx, p, c)?;
                }
            }
            return Ok(());
        }
        // A record of an earlier version: rebuilt from the merged profile.
        if let Some((order_id, at)) = chains.order {
            // Returned since (in the survivor's history): no follow-up.
            if !p.order_returned(&order_id) {
                for s in self.scenarios(ScenarioKind::PostPurchase).iter() {
                    let due = at + ms(s.delay);
                    if due > now {
                        schedule_step(ctx, s, p, &m.merge_id, at, 0, due, None, Some(&order_id))?;
                    }
                }
            }
        }
        if let Some((order_id, at)) = chains.delivery {
            for s in self.scenarios(ScenarioKind::PostDelivery).iter() {
                let due = at + ms(s.delay);
                if due > now {
                    schedule_step(ctx, s, p, &m.merge_id, at, 0, due, None, Some(&order_id))?;
                }
            }
        }
        for s in self.scenarios(ScenarioKind::Welcome).iter() {
            // The survivor's own series (if its causes start one) holds the slot.
            if chains.welcome.start(s, chains.welcome.survivor).is_some() {
                continue;
            }
            // From the merged customer's first cause this series starts on: steps it
            // was sent since are not sent again.
            let Some(registered) = chains.welcome.start(s, chains.welcome.merged) else {
                continue;
            };
            {
                if s.ends_on_purchase() && p.last_purchase_at.is_some_and(|b| b > registered) {
                    continue;
                }
                // The first step still ahead: the earlier ones went out (or were late)
                // for the merged customer.
                let mut due = registered + ms(s.delay);
                let mut step = 0;
                while due <= now {
                    let Some(next) = s.steps.get(step) else {
                        break;
                    };
                    due += ms(next.delay);
                    step += 1;
                }
                if due > now {
                    schedule_step(ctx, s, p, &m.merge_id, registered, step, due, None, None)?;
                }
            }
        }
        Ok(())
    }

    fn apply_receipt(&mut self, ctx: &mut Ctx<'_>, r: &OfflineReceipt) -> anyhow::Result<()> {
        let customer_id = r.customer_key().unwrap_or_default();
        let mut p = self
            .take(ctx, &customer_id)?
            .unwrap_or_else(|| Box::new(CustomerProfile::new(&customer_id, r.occurred_at)));
        if !p.remember_event(&r.event_id, ctx.now()) {
            self.metrics.duplicates.inc();
            self.put(ctx, p)?;
            return Ok(());
        }
        self.catch_up_segment_reviews(ctx, &mut p, r.occurred_at)?;
        p.last_seen_at = p.last_seen_at.max(r.occurred_at);
        // Only a profile without a number takes the receipt's.
        if let Some(phone) = r.phone.as_ref().filter(|_| p.phone.is_none()) {
            let before = addresses_now(&p);
            p.phone_from_receipt(phone, r.occurred_at);
            self.tell_contacts_changed(ctx, &p, &before, &r.event_id)?;
        }
        match r.kind {
            ReceiptKind::sale => {
                let latest = p.last_purchase_at;
                let active_before = p.last_active_at();
                let held_before = p.held_before_early_cancellation(Some(&r.receipt_id));
                let applied =
                    p.record_purchase(r.occurred_at, r.total, true, Some(r.receipt_id.clone()));
                let reorder = Reorder {
                    restored: match applied {
                        PurchaseApplied::CancelledBefore => held_before,
                        _ => Vec::new(),
                    },
                    ..Reorder::default()
                };
                if applied == PurchaseApplied::Counted {
                    let bought = r.items.iter().map(|i| i.product_id.as_str());
                    p.note_bought(bought, r.occurred_at, Some(&r.receipt_id));
                }
                match applied {
                    PurchaseApplied::Counted | PurchaseApplied::CancelledBefore => {
                        // An offline purchase ends the online cart reminder too.
                        let purchase = Purchase {
                            event_id: &r.event_id,
                            at: r.occurred_at,
                            latest_before: latest,
                            order_id: Some(r.receipt_id.clone()),
                            offline: true,
                            order_items: order_items_variables(&r.items),
                        };
                        self.after_purchase(ctx, &mut p, purchase)?;
                        // A customer back in a store, or seen only there, is away
                        // again from here: armed as a visit arms it. (A receipt
                        // uploaded late, older than the latest activity, changes
                        // nothing: a series under way keeps its step.)
                        if active_before.is_none_or(|a| r.occurred_at > a) {
                            self.arm_reactivation(ctx, &mut p)?;
                        }
                        let reason = "offline purchase";
                        self.review_segments(ctx, &mut p, reason, r.occurred_at, &reorder)?;
                    }
                    PurchaseApplied::AlreadyCounted => self.metrics.duplicates.inc(),
                }
            }
            ReceiptKind::refund => {
                // A till refund names no original receipt: its own total is the amount.
                if p.record_refund(&r.receipt_id, r.total, r.occurred_at)
                    == Reversal::AlreadyReversed
                {
                    self.metrics.duplicates.inc();
                } else {
                    self.end_follow_ups_a_refund_covers(ctx, &p, r.total)?;
                    self.review_segments(
                        ctx,
                        &mut p,
                        "refund",
                        r.occurred_at,
                        &Reorder::default(),
                    )?;
                }
            }
        }
        self.put(ctx, p)?;
        Ok(())
    }

    fn apply_occasion(&mut self, ctx: &mut Ctx<'_>, o: &ProductOccasion) -> anyhow::Result<()> {
        let Some(mut p) = self.take(ctx, &o.customer_id)? else {
            // The join indexes interest under the id it was shown with; a customer
            // merged away since is the survivor now. Sent on under the id the join
            // would give the survivor's own occasion, so one the survivor gets both
            // ways counts once.
            if let Some(survivor) = ctx.get::<String>(&forward_key(&o.customer_id))? {
                let occasion = ProductOccasion {
                    occasion_id: catalog::occasion_id(
                        &o.cause_event_id,
                        &o.product_id,
                        &survivor,
                        o.kind,
                    ),
                    customer_id: survivor.clone(),
                    ..o.clone()
                };
                ctx.emit(&self.occasions_topic, &survivor, &occasion);
            }
            return Ok(());
        };
        if !p.remember_event(&o.occasion_id, ctx.now()) {
            self.metrics.duplicates.inc();
            self.put(ctx, p)?;
            return Ok(());
        }
        let kind = match o.kind {
            ProductOccasionKind::price_drop => ScenarioKind::PriceDrop,
            ProductOccasionKind::back_in_stock => ScenarioKind::BackInStock,
        };
        let wishes_only = kind == ScenarioKind::BackInStock;
        let (price_seen, told_before) =
            match p.product_appeal(&o.product_id, wishes_only, o.occurred_at) {
                ProductAppeal::Wanted { price_seen, told } => (price_seen, told),
                appeal => {
                    let reason = appeal.skip_reason();
                    for s in self.scenarios(kind).iter() {
                        self.metrics.skip(&s.name, reason);
                    }
                    self.put(ctx, p)?;
                    return Ok(());
                }
            };
        // The highest threshold of the scenarios that tell the customer this time.
        let mut told_up_to: Option<f64> = None;
        for s in self.scenarios(kind).iter() {
            let min_drop = s.min_drop();
            // A drop is one to the customer only below the price they saw (the catalog
            // compares with its own prices, which they may not have seen), or the
            // drop they were told of since, by a scenario of this threshold or a
            // higher one: a "big sale" of 30% still measures from what they saw
            // after a 10% drop was told.
            let told = told_before.filter(|t| min_drop <= t.up_to_percent);
            let old_price = match kind {
                ScenarioKind::PriceDrop => (told.map(|t| t.price)).or(price_seen).or(o.old_price),
                _ => o.old_price,
            };
            let drop = match (old_price, o.new_price) {
                (Some(old), Some(new)) => catalog::drop_percent(old, new),
                _ => 0.0,
            };
            if kind == ScenarioKind::PriceDrop && (drop <= 0.0 || drop < min_drop) {
                // Counted, so "why was she not told?" has an answer: the drop from
                // the price she saw is smaller than the scenario's.
                self.metrics.skip(&s.name, BELOW_MIN_DROP);
                continue;
            }
            let mut vars = serde_json::Map::new();
            vars.insert("product_id".into(), o.product_id.clone().into());
            vars.insert("product_name".into(), o.product_name.clone().into());
            vars.insert("old_price".into(), old_price.into());
            vars.insert("new_price".into(), o.new_price.into());
            // The prior price an announced reduction states in the EU (Omnibus).
            vars.insert("lowest_price".into(), o.lowest_price.into());
            // The same news of a product is one offer: a price that goes up and down
            // again, or stock out and in again, is not told again within the arbiter's
            // `offer_repeat_window`, though each change is a catalog update of its own.
            let offer = match (kind, o.new_price) {
                (ScenarioKind::PriceDrop, Some(new)) => format!("{}@{new}", o.product_id),
                _ => format!("{}#{kind:?}", o.product_id),
            };
            vars.insert("offer_id".into(), offer.into());
            // Due when the catalog changed: an occasion processed after an outage is
            // late like any other trigger, and valid for `valid_for` from the change.
            let due = o.occurred_at;
            if self.emit_trigger(ctx, s, &p, 0, &o.occasion_id, o.occurred_at, due, vars) {
                told_up_to = Some(told_up_to.map_or(min_drop, |up_to| up_to.max(min_drop)));
            }
        }
        // A return to stock told with a drop (was 100, now 80) told the drop, as the
        // price-drop scenarios would have: measured from it by each of them.
        let told_drop = match kind {
            ScenarioKind::PriceDrop => told_up_to,
            _ => told_up_to
                .filter(
                    |_| matches!((o.old_price, o.new_price), (Some(old), Some(new)) if new < old),
                )
                .map(|_| {
                    (self.scenarios(ScenarioKind::PriceDrop).iter())
                        .map(|s| s.min_drop())
                        .fold(0.0, f64::max)
                }),
        };
        if let (Some(up_to), Some(new)) = (told_drop, o.new_price) {
            p.note_told_price(&o.product_id, new, o.occurred_at, up_to);
        }
        self.put(ctx, p)?;
        Ok(())
    }

    /// What a purchase ends and starts (see [`Purchase`]).
    fn after_purchase(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut CustomerProfile,
        purchase: Purchase<'_>,
    ) -> anyhow::Result<()> {
        let Purchase {
            event_id,
            at,
            latest_before,
            order_id,
            offline,
            order_items,
        } = purchase;
        // The arbiter drops queued messages the purchase made pointless and pauses promo.
        let action = CustomerAction {
            order_id: order_id.clone(),
            till_sale: offline,
            ..CustomerAction::new(
                deterministic_id(&[event_id, "purchase"]),
                p.customer_id.clone(),
                CustomerActionKind::purchase,
                at,
            )
        };
        ctx.emit(&self.actions_topic, &p.customer_id, &action);
        // A purchase ends the chains that exist to get one.
        for s in self
            .config
            .scenarios
            .iter()
            .filter(|s| s.ends_on_purchase())
        {
            // An online purchase ends a cart or browse wait whatever the device's clock
            // said (the cart is what was bought); a till sale uploaded late only one it
            // came after. A chain's cause time is in its timer, not here: a purchase
            // leaves it to the check when the next step fires (see `fire_scenario`),
            // which ends it if the purchase came after its cause, whichever arrived
            // first (a guest checkout processed after the registration that followed
            // it leaves the welcome series alone, as it does in time order).
            if s.kind == ScenarioKind::Reactivation {
                continue;
            }
            let leave = !s.kind.is_restartable_wait()
                || offline
                    && p.waits
                        .get(s.name.as_str())
                        .is_some_and(|w| w.cause_occurred_at > at);
            if !leave {
                stop_wait(ctx, s, p)?;
            }
        }
        // Returned or cancelled before it came: no follow-up, and the pending one of
        // an earlier order keeps its place.
        if order_id.as_deref().is_some_and(|o| p.order_returned(o)) {
            return Ok(());
        }
        let later_purchase = latest_before.is_some_and(|latest| latest > at);
        for s in self.scenarios(ScenarioKind::PostPurchase).iter() {
            // A later purchase keeps the one follow-up, unless it is pending still for
            // a later order returned or cancelled before this one was read (a till
            // receipt uploaded late): this one takes it then, as the return would
            // have given it back in time order (see `rearm_post_purchase`). One that
            // fired already is not given back.
            let pending = carried_step(ctx, &timer_id(&s.name, &p.customer_id))?;
            if later_purchase {
                let given_back = pending.as_ref().is_some_and(|c| {
                    c.timer.order_id.as_deref().is_some_and(|pending_order| {
                        order_id.as_deref() != Some(pending_order)
                            && p.order_returned(pending_order)
                    })
                });
                if !given_back {
                    continue;
                }
            }
            // The pending follow-up of an earlier order gives way: remembered, with what
            // it bought, in case this order is returned (with those it took the place
            // of; none returned).
            let given_way = match pending.map(|c| c.timer).filter(|t| t.step == 0) {
                Some(t) => {
                    let other = t.order_id.filter(|o| Some(o) != order_id.as_ref());
                    let earlier = other.zip(t.variables);
                    let mut given_way: Vec<_> = (earlier.into_iter().chain(t.given_way))
                        .filter(|(o, _)| !p.order_returned(o))
                        .collect();
                    given_way.truncate(GIVEN_WAY_KEPT);
                    given_way
                }
                None => Vec::new(),
            };
            let timer = StepTimer {
                given_way: &given_way,
                ..StepTimer::new(event_id, at, 0, at + ms(s.delay))
            };
            let (order, items) = (order_id.as_deref(), order_items.as_deref());
            schedule_step_with(ctx, s, p, timer, None, order, items)?;
        }
        Ok(())
    }

    /// When the step `delay` after a step that fired at `fired_at` is due: for a
    /// birthday or anniversary, whole days later at the scenario's local time in the
    /// customer's zone (a week after a 10:00 greeting is 10:00, across a change of
    /// summer time); for the rest, `delay` later.
    fn next_step_due(
        &self,
        s: &ScenarioConfig,
        p: &CustomerProfile,
        fired_at: Millis,
        delay: std::time::Duration,
    ) -> Millis {
        let whole_days = delay
            .as_secs()
            .is_multiple_of(86_400)
            .then_some(delay.as_secs() / 86_400);
        match (is_yearly(s.kind), whole_days, s.local_time_of_day()) {
            (true, Some(days), Some(time)) => {
                calendar::local_days_later(fired_at, self.zone_of(p), days, time)
                    .unwrap_or(fired_at + ms(delay))
            }
            _ => fired_at + ms(delay),
        }
    }

    /// How long after a cart's last change its reminders may still go out: the
    /// longest abandoned-cart chain with its tolerance (0 without one).
    fn cart_reminder_reach(&self) -> Millis {
        self.scenarios(ScenarioKind::AbandonedCart)
            .iter()
            .map(|s| ms(s.chain_reach()))
            .max()
            .unwrap_or(0)
    }

    /// `reversed` (an order the profile holds) was returned or cancelled: if the
    /// pending follow-up is its own, the latest order that still counts takes it back
    /// when it gave way to it (its follow-up was not due yet when the reversed order
    /// was bought: one that went out before is not sent again). Due already, it fires
    /// at once: sent within its tolerance, else counted late.
    fn rearm_post_purchase(
        &self,
        ctx: &mut Ctx<'_>,
        p: &CustomerProfile,
        reversed: &str,
    ) -> anyhow::Result<()> {
        for s in self.scenarios(ScenarioKind::PostPurchase).iter() {
            let pending = carried_step(ctx, &timer_id(&s.name, &p.customer_id))?;
            let Some(pending) = pending.filter(|c| c.timer.order_id.as_deref() == Some(reversed))
            else {
                continue;
            };
            // Not one returned in part either: its follow-up would be skipped.
            let Some(order) = p
                .recent_orders
                .iter()
                .filter(|o| !p.order_returned(&o.order_id))
                .max_by_key(|o| o.at)
            else {
                continue;
            };
            let due = order.at + ms(s.delay);
            let gave_way = due > pending.timer.cause_occurred_at
                || (pending.timer.given_way.iter()).any(|(o, _)| *o == order.order_id);
            if !gave_way {
                continue;
            }
            // Its purchase event is not kept: the order names the cause. What it
            // bought, if it gave way to the returned one.
            let cause = ["order:", order.order_id.as_str()].concat();
            let order_id = Some(order.order_id.as_str());
            let mut given_way = pending.timer.given_way;
            let items = given_way
                .iter()
                .position(|(o, _)| *o == order.order_id)
                .map(|n| given_way.remove(n).1);
            let timer = StepTimer {
                given_way: &given_way,
                ..StepTimer::new(&cause, order.at, 0, due)
            };
            schedule_step_with(ctx, s, p, timer, None, order_id, items.as_deref())?;
        }
        Ok(())
    }

    /// A return cancels the follow-up of the purchase (any pending one when the order
    /// is unknown, as for a till refund).
    fn cancel_post_purchase(
        &mut self,
        ctx: &mut Ctx<'_>,
        customer_id: &str,
        order_id: Option<&str>,
    ) -> anyhow::Result<()> {
        for s in self.scenarios(ScenarioKind::PostPurchase).iter() {
            match order_id {
                None => {
                    ctx.cancel(&timer_id(&s.name, customer_id))?;
                }
                // The pending follow-up may belong to a later order, or the purchase
                // may come after its return: mark this order returned; the timer
                // checks the mark when it fires.
                Some(order) => ctx.put(&return_mark_key(customer_id, order), &true)?,
            }
        }
        if let (Some(order), Some(keep_for)) = (order_id, self.return_mark_lifetime()) {
            // Kept until every follow-up of the order has fired or been skipped as too
            // late (its purchase came before the return), not for ever.
            ctx.schedule(
                &return_mark_expiry(customer_id, order),
                ctx.now().saturating_add(keep_for),
                &(),
            )?;
        }
        Ok(())
    }

    /// A till refund names no original receipt: it ends a pending follow-up whose order
    /// it could be the refund of, one worth at most twice the refund (a €5 refund at a
    /// store is no return of the €500 order whose review request waits), or of an order
    /// the profile no longer knows; counted as `refunded`.
    fn end_follow_ups_a_refund_covers(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &CustomerProfile,
        refunded: f64,
    ) -> anyhow::Result<()> {
        for s in self.scenarios(ScenarioKind::PostPurchase).iter() {
            let id = timer_id(&s.name, &p.customer_id);
            let Some(pending) = carried_step(ctx, &id)? else {
                continue;
            };
            let order_total = (pending.timer.order_id.as_deref())
                .and_then(|o| p.recent_orders.iter().find(|r| r.order_id == o))
                .map(|o| o.total);
            if order_total.is_none_or(|total| 2.0 * refunded.abs() >= total) {
                ctx.cancel(&id)?;
                self.metrics.skip(&s.name, SKIP_REFUNDED);
            }
        }
        Ok(())
    }

    /// How long after a return its mark may still be needed: the longest post-purchase
    /// chain (its delays) plus its tolerance, and a day more. None without such a
    /// scenario.
    fn return_mark_lifetime(&self) -> Option<Millis> {
        self.scenarios(ScenarioKind::PostPurchase)
            .iter()
            .map(|s| ms(s.chain_reach()) + kairos_core::time::DAY)
            .max()
    }

    /// Tells the catalog join, keyed by product, of a customer's interest in it.
    #[allow(clippy::too_many_arguments)]
    fn emit_interest(
        &self,
        ctx: &mut Ctx<'_>,
        interest_id: String,
        customer_id: &str,
        product_id: &str,
        price_seen: Option<f64>,
        kind: InterestKind,
        at: Millis,
    ) {
        let interest = ProductInterest {
            interest_id,
            customer_id: customer_id.to_string(),
            product_id: product_id.to_string(),
            kind,
            price_seen,
            occurred_at: at,
        };
        ctx.emit(&self.interest_topic, product_id, &interest);
    }

    /// Tells the catalog join that `customer` no longer wishes for `wishes` (ids from
    /// `id_key`, which names what caused it), so their occasions stop.
    fn drop_wishes(
        &self,
        ctx: &mut Ctx<'_>,
        customer: &str,
        wishes: &[Product],
        id_key: &str,
        at: Millis,
    ) {
        for wish in wishes {
            let id = deterministic_id(&[id_key, &wish.product_id, "unwished"]);
            let (product_id, price) = (&wish.product_id, wish.price);
            let kind = InterestKind::unwishlisted;
            self.emit_interest(ctx, id, customer, product_id, price, kind, at);
        }
    }

    /// An event's interest in its product.
    fn emit_event_interest(
        &self,
        ctx: &mut Ctx<'_>,
        customer_id: &str,
        product: &Product,
        kind: InterestKind,
        e: &CustomerEvent,
    ) {
        let id = deterministic_id(&[&e.event_id, "interest"]);
        let (product_id, price) = (&product.product_id, product.price);
        self.emit_interest(ctx, id, customer_id, product_id, price, kind, e.occurred_at);
    }

    /// An interest of a merged customer, sent to the catalog join for the survivor.
    fn hand_over_interest(
        &self,
        ctx: &mut Ctx<'_>,
        m: &CustomerMerge,
        product_id: &str,
        price_seen: Option<f64>,
        kind: InterestKind,
        at: Millis,
    ) {
        let id = deterministic_id(&[&m.merge_id, product_id, &format!("{kind:?}")]);
        self.emit_interest(ctx, id, &m.into, product_id, price_seen, kind, at);
    }

    /// Arms the subscription-ending scenarios for the profile's subscription end
    /// (its cause: the end date, so a moved end re-arms and the old timer is moot).
    fn schedule_subscription_ending(
        &self,
        ctx: &mut Ctx<'_>,
        p: &CustomerProfile,
        cause_at: Millis,
        learned_now: bool,
    ) -> anyhow::Result<()> {
        let Some(ends) = p.subscription_ends_at else {
            return Ok(());
        };
        let cause = format!("subscription-{ends}");
        for s in self.scenarios(ScenarioKind::SubscriptionEnding).iter() {
            // An end learned within the reminder's lead (a three-day plan, a sync that
            // reports it late) is told when learned: that moment was never missed.
            // One already past is not told at all (its moment is late).
            let lead_start = ends - ms(s.delay);
            if !learned_now && lead_start <= cause_at {
                // Brought by a merge within the lead: the merged id was told (or its
                // moment passed), so it is not told again under this one, however
                // little late it would be.
                continue;
            }
            let due = if learned_now && cause_at < ends {
                lead_start.max(cause_at)
            } else {
                lead_start
            };
            schedule_step(ctx, s, p, &cause, cause_at, 0, due, None, None)?;
        }
        Ok(())
    }

    fn arm_reactivation(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut CustomerProfile,
    ) -> anyhow::Result<()> {
        let Some(last) = p.last_active_at() else {
            return Ok(());
        };
        for s in self.scenarios(ScenarioKind::Reactivation).iter() {
            // Lazy: an armed timer is left alone; when it fires it checks the latest
            // visit and moves itself if the customer came back. An entry before now
            // is when the first step last fired: activity before that (a receipt
            // uploaded late) began the absence it was for, so nothing is armed again.
            if p.armed
                .get(s.name.as_str())
                .is_some_and(|armed| *armed >= ctx.now() || *armed > last)
            {
                continue;
            }
            schedule_reactivation(ctx, s, p, last, last + ms(s.delay))?;
        }
        Ok(())
    }

    /// Re-evaluates RFM and lifecycle, emits transitions and segment triggers, and arms
    /// the review timer for the next time-driven change. Entering one of `reorder.restored`
    /// is a return to where an early cancellation took the customer from: it is
    /// reported, but fires no `segment_entered` scenario.
    fn review_segments(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut CustomerProfile,
        reason: &str,
        at: Millis,
        reorder: &Reorder,
    ) -> anyhow::Result<()> {
        // An event dated before a review still due (the backlog of an outage, read
        // before the timers it holds back) is judged as of its own time, as in an
        // uninterrupted run: the review then judges its boundary, with reason "time".
        // Only when the profile, the event applied, has no boundary between the two:
        // one dated before a boundary already judged would run the segments back.
        let overdue_after = p
            .armed
            .get(SEGMENT_REVIEW)
            .filter(|due| **due > at && **due <= ctx.now())
            .is_some_and(|due| {
                segments::next_boundary(&self.config.segments, p, at).is_some_and(|b| b >= *due)
            });
        let now = match overdue_after {
            true => at,
            false => ctx.now().max(at),
        };
        self.review_segments_as_of(ctx, p, reason, at, now, reorder)
    }

    /// [`Self::review_segments`] as of `now`: a time-driven review is judged at its
    /// boundary, not when its timer got to fire (after an outage, or a replay's clock
    /// jumping ahead), so a customer passes through every segment on the way, each
    /// transition at its own time and with its own id, as in an uninterrupted run.
    fn review_segments_as_of(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut CustomerProfile,
        reason: &str,
        at: Millis,
        now: Millis,
        reorder: &Reorder,
    ) -> anyhow::Result<()> {
        let cfg = self.config.segments.clone();
        let stage = segments::lifecycle(&cfg.lifecycle, p, now);
        // Transition ids come from the cause's time (the event's, or the review
        // timer's), which a replay reproduces; `now` is the clock's time for an
        // event, and the boundary itself for a time-driven review.
        let cause = Cause { at, now };
        // Both are updated before either transition goes out: a trigger of the one
        // carries the other as it is now (a stage's trigger names the new RFM cell).
        let stage_changed = p.lifecycle.as_deref() != Some(stage.as_str());
        let old_stage = match stage_changed {
            true => p.lifecycle.replace(stage.clone()),
            false => None,
        };
        let score = segments::rfm(&cfg.rfm, p, now);
        let new_segment = score.as_ref().map(|s| s.segment.clone());
        let old_segment = p.rfm.as_ref().map(|s| s.segment.clone());
        p.rfm = score;
        if stage_changed {
            let kind = SegmentKind::lifecycle;
            let entry = Entry {
                reason,
                cause,
                reorder,
            };
            self.transition(ctx, p, kind, old_stage, &stage, entry)?;
        }
        if new_segment != old_segment {
            // No order counts any more (all cancelled): the customer leaves RFM.
            let to = new_segment.as_deref().unwrap_or(NO_RFM_SEGMENT);
            let entry = Entry {
                reason,
                cause,
                reorder,
            };
            self.transition(ctx, p, SegmentKind::rfm, old_segment, to, entry)?;
        }
        if let Some(next) = segments::next_boundary(&cfg, p, now) {
            let armed = p.armed.get(SEGMENT_REVIEW).copied();
            if armed.is_none_or(|a| a <= now || next < a) {
                ctx.schedule(
                    &format!("{SEGMENT_REVIEW}/{}", p.customer_id),
                    next,
                    &p.customer_id,
                )?;
                p.armed.insert(SEGMENT_REVIEW.into(), next);
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn transition(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &CustomerProfile,
        kind: SegmentKind,
        from: Option<String>,
        to: &str,
        entry: Entry<'_>,
    ) -> anyhow::Result<()> {
        let Entry {
            reason,
            cause,
            reorder,
        } = entry;
        let kind_name = match kind {
            SegmentKind::rfm => "rfm",
            SegmentKind::lifecycle => "lifecycle",
        };
        let at = cause.now;
        let t = SegmentTransition {
            transition_id: deterministic_id(&[
                &p.customer_id,
                kind_name,
                to,
                &cause.at.to_string(),
            ]),
            customer_id: p.customer_id.clone(),
            kind,
            from_segment: from,
            to_segment: to.to_string(),
            reason: reason.to_string(),
            occurred_at: at,
        };
        // Segment names come from the configuration, so the labels stay bounded.
        let from_label = t.from_segment.as_deref().unwrap_or(NO_RFM_SEGMENT);
        self.metrics.transitions.inc(&[kind_name, from_label, to]);
        ctx.emit(&self.transitions_topic, &p.customer_id, &t);
        // What a scenario for the segment left still has queued or cascading in the
        // arbiter (held by quiet hours or a cap) is no longer for this customer.
        let segment_scenarios = self.scenarios(ScenarioKind::SegmentEntered);
        // A customer without RFM (before a first purchase, or with every order
        // cancelled) who buys leaves "none".
        let no_rfm = (kind == SegmentKind::rfm).then_some(NO_RFM_SEGMENT);
        if let Some(left) = (t.from_segment.as_deref())
            .or(no_rfm)
            .filter(|_| !reorder.early_cancellation)
            .filter(|left| segment_scenarios.iter().any(|s| s.targets_segment(left)))
        {
            let action = CustomerAction {
                segment: Some(left.to_string()),
                ..CustomerAction::new(
                    deterministic_id(&[&t.transition_id, "left_segment"]),
                    p.customer_id.clone(),
                    CustomerActionKind::left_segment,
                    at,
                )
            };
            ctx.emit(&self.actions_topic, &p.customer_id, &action);
        }
        // The entry is due at its cause (the event's time, or the review timer's),
        // not when it was processed: after a backlog (an outage, a lagging topic) a
        // greeting past its tolerance is skipped as late, as every occasion is. Its
        // cause time stays the transition's, as for the `left_segment` action above:
        // the arbiter compares the two, and a purchase ends only a chain it follows.
        let due_at = cause.at;
        for s in segment_scenarios.iter() {
            if s.targets_segment(to) && reorder.restored.iter().any(|r| r == to) {
                self.metrics.skip(&s.name, "restored");
                continue;
            }
            if s.targets_segment(to) && !self.chains_going_on.contains(&s.name) {
                let mut vars = serde_json::Map::new();
                vars.insert("from_segment".into(), t.from_segment.clone().into());
                vars.insert("to_segment".into(), to.into());
                if s.delay.is_zero() && s.steps.is_empty() {
                    self.emit_trigger(ctx, s, p, 0, &t.transition_id, at, due_at, vars);
                } else {
                    // A wait or a chain: on a timer like every other scenario's, so
                    // it fires when due and a purchase can end it
                    // (`exit_on_purchase`).
                    let vars = serde_json::Value::Object(vars).to_string();
                    let due = due_at + ms(s.delay);
                    let timer = StepTimer::new(&t.transition_id, at, 0, due);
                    schedule_step_with(ctx, s, p, timer, None, None, Some(&vars))?;
                }
            }
        }
        Ok(())
    }

    /// Emits a trigger unless its moment passed by more than the tolerance; returns
    /// whether it was emitted (or held for a merge).
    #[allow(clippy::too_many_arguments)]
    fn emit_trigger(
        &self,
        ctx: &mut Ctx<'_>,
        s: &ScenarioConfig,
        p: &CustomerProfile,
        step: usize,
        cause_event_id: &str,
        cause_occurred_at: Millis,
        due_at: Millis,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> bool {
        self.emit_keyed_trigger(
            ctx,
            s,
            p,
            step,
            cause_event_id,
            cause_event_id,
            cause_occurred_at,
            due_at,
            extra,
        )
    }

    /// [`Self::emit_trigger`] with the trigger id derived from `key` instead of the
    /// cause's event id.
    #[allow(clippy::too_many_arguments)]
    fn emit_keyed_trigger(
        &self,
        ctx: &mut Ctx<'_>,
        s: &ScenarioConfig,
        p: &CustomerProfile,
        step: usize,
        key: &str,
        cause_event_id: &str,
        cause_occurred_at: Millis,
        due_at: Millis,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> bool {
        let now = ctx.now().max(due_at);
        if now - due_at > ms(s.tolerance()) {
            self.metrics.skip(&s.name, "late");
            tracing::debug!(scenario = %s.name, customer = %p.customer_id, late_ms = now - due_at, "trigger skipped: too late");
            return false;
        }
        let Some(template) = s.template_of(step) else {
            return false;
        };
        let trigger = Trigger {
            trigger_id: deterministic_id(&[&s.name, &p.customer_id, key, &step.to_string()]),
            scenario: s.name.clone(),
            customer_id: p.customer_id.clone(),
            category: s.category,
            step: step as i32,
            template: template.to_string(),
            channels: s.channels.clone(),
            priority: s.priority,
            fired_at: now,
            valid_until: due_at + ms(s.valid_for),
            cause_event_id: Some(cause_event_id.to_string()),
            cause_occurred_at,
            contacts: contacts(p),
            // sonic-rs: the same compact JSON as serde_json, faster (see
            // `encode_internal`).
            variables: sonic_rs::to_string(&p.template_variables(&extra)).unwrap_or_default(),
            merged_from: p.merged_from.clone(),
        };
        self.metrics.triggers.inc(&[&s.name]);
        if p.awaiting_merges.is_empty() {
            ctx.emit(&self.triggers_topic, &p.customer_id, &trigger);
        } else {
            // A merge is under way: the merged profile may hold an unsubscribe.
            let key = format!("{}{}", held_prefix(&p.customer_id), trigger.trigger_id);
            if let Err(e) = ctx.put(&key, &trigger) {
                tracing::error!(error = %e, "cannot hold a trigger during a merge");
            }
        }
        true
    }

    fn on_scenario_timer(&mut self, ctx: &mut Ctx<'_>, timer: &DueTimer) -> anyhow::Result<()> {
        let t: ScenarioTimer = timer
            .decode()
            .with_context(|| format!("timer {} payload does not decode", timer.timer_id))?;
        let config = self.config.clone();
        let yearly_off = config
            .scenario(&t.scenario)
            .filter(|s| !s.enabled && is_yearly(s.kind) && t.step == 0);
        if let Some(s) = yearly_off {
            // Switched off for a while (a template being fixed): next year's date is
            // armed all the same, or the customers whose day fell in that while would
            // never be greeted again (only a new date or zone arms one).
            if let Some(p) = self.take(ctx, &t.customer_id)? {
                let armed = self.schedule_yearly(ctx, s, &p, timer.fire_at.saturating_add(1));
                self.put(ctx, p)?;
                armed?;
            }
            return Ok(());
        }
        let Some(s) = config.scenario(&t.scenario).filter(|s| s.enabled) else {
            tracing::warn!(scenario = %t.scenario, "timer for a scenario no longer configured");
            // The profile no longer takes it for armed: were the scenario enabled again,
            // an entry left behind would keep it from ever being armed (reactivation
            // arms only what is not armed).
            if let Some(mut p) = self.take(ctx, &t.customer_id)? {
                if p.armed.get(t.scenario.as_str()) == Some(&timer.fire_at) {
                    p.armed.remove(t.scenario.as_str());
                    p.waits.remove(t.scenario.as_str());
                }
                self.put(ctx, p)?;
            }
            return Ok(());
        };
        let Some(mut p) = self.take(ctx, &t.customer_id)? else {
            return Ok(());
        };
        let result = self.fire_scenario(ctx, s, &mut p, &t, timer);
        self.put(ctx, p)?;
        result
    }

    fn fire_scenario(
        &mut self,
        ctx: &mut Ctx<'_>,
        s: &ScenarioConfig,
        p: &mut CustomerProfile,
        t: &ScenarioTimer,
        timer: &DueTimer,
    ) -> anyhow::Result<()> {
        let mut vars = serde_json::Map::new();
        let restarted;
        let t = if s.kind.is_restartable_wait() {
            p.armed.remove(s.name.as_str());
            // The wait ended (cart emptied, purchase) or was restarted since.
            let Some(w) = p.waits.get(s.name.as_str()).cloned() else {
                return Ok(());
            };
            if t.step == 0 || w.cause_event_id != t.cause_event_id {
                let due = w.cause_occurred_at + ms(s.delay);
                if due > timer.fire_at {
                    arm_wait(ctx, s, p, &w, 0, due)?;
                    return Ok(());
                }
                restarted = ScenarioTimer {
                    cause_event_id: w.cause_event_id,
                    cause_occurred_at: w.cause_occurred_at,
                    step: 0,
                    product: w.product,
                    ..t.clone()
                };
                &restarted
            } else {
                t
            }
        } else {
            t
        };
        let mut cause = t.cause_event_id.clone();
        match s.kind {
            ScenarioKind::AbandonedCart => {
                if p.bought_since(t.cause_occurred_at) {
                    self.metrics.skip(&s.name, SKIP_BOUGHT);
                    return Ok(());
                }
                if p.cart.is_empty() {
                    self.metrics.skip(&s.name, SKIP_CART_EMPTIED);
                    return Ok(());
                }
            }
            ScenarioKind::BrowseAbandonment => {
                if p.bought_since(t.cause_occurred_at) {
                    self.metrics.skip(&s.name, SKIP_BOUGHT);
                    return Ok(());
                }
                // A cart change after the view, or a cart that held something when
                // the customer viewed (with no change since, the cart now is the cart
                // then) changed within the cart chain's reach before it (its reminders
                // due or sent lately, within their tolerance): the cart reminder
                // speaks for the visit. A cart left long before does not silence every
                // browse for good.
                let cart_reach = self.cart_reminder_reach();
                let changed_since = p.cart_updated_at.is_some_and(|c| c >= t.cause_occurred_at);
                let cart_in_reach = !p.cart.is_empty()
                    && p.cart_updated_at
                        .is_some_and(|c| c.saturating_add(cart_reach) >= t.cause_occurred_at);
                if changed_since || cart_in_reach {
                    self.metrics.skip(&s.name, SKIP_CARTED);
                    return Ok(());
                }
                if let Some(product) = &t.product {
                    vars.insert(
                        "product".into(),
                        serde_json::to_value(product).unwrap_or_default(),
                    );
                }
            }
            ScenarioKind::Reactivation => {
                // For a later step: when the first step fired.
                let first_fired = p.armed.remove(s.name.as_str());
                let last = p.last_active_at().unwrap_or(t.cause_occurred_at);
                let due = last + ms(s.delay);
                // The customer came back since: wait from the latest visit. (A later
                // step asks whether they came back since the series' first step went
                // out: its own time is not the first step's delay after anything, the
                // more so once `delay` changed; activity before that step, known late,
                // began the absence it was for.)
                let came_back = match t.step {
                    0 => due > timer.fire_at,
                    _ => last > first_fired.unwrap_or(t.cause_occurred_at),
                };
                if !came_back {
                    // When the first step fired (see `arm_reactivation`), kept through
                    // the later steps and after the last: activity known late that
                    // came before it arms nothing again.
                    let first = if t.step == 0 {
                        Some(timer.fire_at)
                    } else {
                        first_fired
                    };
                    if let Some(first) = first {
                        p.armed.insert(s.name.as_str().into(), first);
                    }
                }
                if came_back {
                    schedule_reactivation(ctx, s, p, last, due.max(timer.fire_at))?;
                    return Ok(());
                }
            }
            // Follow-up steps carry the date's cause ("birthday-2026") and fire on
            // their own day.
            ScenarioKind::Birthday | ScenarioKind::RegistrationAnniversary if t.step > 0 => {
                // A follow-up armed by an earlier version under the yearly timer's own
                // id took its place: next year's date is armed again.
                if *timer.timer_id == *timer_id(&s.name, &p.customer_id) {
                    self.schedule_yearly(ctx, s, p, timer.fire_at)?;
                }
            }
            ScenarioKind::Birthday | ScenarioKind::RegistrationAnniversary => {
                let tz = self.zone_of(p);
                let year = chrono::DateTime::from_timestamp_millis(timer.fire_at)
                    .map(|d| chrono::Datelike::year(&d.with_timezone(&tz)))
                    .unwrap_or(0);
                cause = format!("{}-{year}", s.name);
                // Still the customer's date? (birthday or zone may have changed.) A
                // greeting armed at another hour of it (moved late on purpose when
                // `local_time` changed) is; so is the calendar's own moment, which a
                // DST gap over midnight puts on the next day: re-armed, it would land
                // on this very instant for ever.
                let date = self.yearly_date(s, p);
                let today = calendar::local_month_day(timer.fire_at, tz);
                let same_day = date.is_some()
                    && (date == today || (date == Some((2, 29)) && today == Some((2, 28))));
                let occasion = date
                    .zip(s.local_time_of_day())
                    .and_then(|((month, day), time)| {
                        calendar::next_yearly(month, day, time, tz, timer.fire_at - 1)
                    });
                if !same_day && occasion != Some(timer.fire_at) {
                    // Armed in another zone (the default zone changed, or armed by a
                    // version that took UTC for a customer without one): this year's
                    // moment in the customer's zone may be a tolerance ago at most, as
                    // for a zone change; a greeting sent already has the same id.
                    let since = self.yearly_rearm_since(s, p, timer.fire_at);
                    self.schedule_yearly(ctx, s, p, since)?;
                    return Ok(());
                }
                self.schedule_yearly(ctx, s, p, timer.fire_at)?;
                // Greeted this local year already, under another id (a profile merged
                // in today after its own greeting, whose date this one shared).
                if self.yearly_rearm_since(s, p, timer.fire_at) > timer.fire_at {
                    self.metrics.skip(&s.name, "greeted_this_year");
                    return Ok(());
                }
            }
            ScenarioKind::SubscriptionEnding => {
                let expected = format!("subscription-{}", p.subscription_ends_at.unwrap_or(0));
                if t.cause_event_id != expected {
                    return Ok(());
                }
            }
            ScenarioKind::PostPurchase => {
                if let Some(order) = &t.order_id {
                    let legacy_key = format!("ret/{}/{order}", p.customer_id);
                    // Marks of orders the profile does not hold among its recent ones
                    // (and of every order, before it held them).
                    // Kept for every post-purchase scenario of the order: its expiry
                    // timer deletes it once none can fire any more.
                    let marked = ctx
                        .get::<bool>(&return_mark_key(&p.customer_id, order))?
                        .is_some()
                        || ctx.get::<bool>(&legacy_key)?.is_some();
                    if marked || p.order_returned(order) {
                        return Ok(());
                    }
                }
                // The purchase's items, kept with the timer, with or without an
                // order id.
                if let Some(Ok(serde_json::Value::Object(stored))) =
                    t.variables.as_deref().map(serde_json::from_str)
                {
                    vars = stored;
                }
                if let Some(order) = &t.order_id {
                    vars.insert("order_id".into(), order.clone().into());
                }
            }
            ScenarioKind::PostDelivery => {
                if let Some(order) = &t.order_id {
                    // No survey about an order sent back or cancelled.
                    if p.order_returned(order) {
                        return Ok(());
                    }
                    vars.insert("order_id".into(), order.clone().into());
                }
            }
            ScenarioKind::Welcome => {}
            // A segment trigger with a delay or steps: the transition's variables.
            ScenarioKind::SegmentEntered => {
                if let Some(Ok(serde_json::Value::Object(stored))) =
                    t.variables.as_deref().map(serde_json::from_str)
                {
                    vars = stored;
                }
                // A step due after the customer left the segment is about a place
                // they are no longer in. The transition's kind is not stored: segment
                // and stage names both come from the configuration, so either holding
                // the name means still there.
                let entered = vars
                    .get("to_segment")
                    .and_then(|v| v.as_str())
                    .or(s.segment.as_deref());
                if let Some(entered) = entered {
                    let still_there = p.lifecycle.as_deref() == Some(entered)
                        || p.rfm.as_ref().map_or(NO_RFM_SEGMENT, |r| &r.segment) == entered;
                    if !still_there {
                        self.metrics.skip(&s.name, "left_segment");
                        return Ok(());
                    }
                }
            }
            // Fired directly, never through timers (configuration rejects a delay).
            ScenarioKind::OrderUpdate | ScenarioKind::PriceDrop | ScenarioKind::BackInStock => {
                return Ok(())
            }
        }
        // A purchase after the chain's cause ends it, whichever arrived first (a
        // purchase processed before the registration, a till sale uploaded late). A
        // step due at the cause itself (a welcome at registration) came before it.
        if !s.kind.is_restartable_wait()
            && s.kind != ScenarioKind::Reactivation
            && s.step_ends_on_purchase(t.step as usize)
            && timer.fire_at > t.cause_occurred_at
            && p.last_purchase_at
                .is_some_and(|bought| bought > t.cause_occurred_at)
        {
            return Ok(());
        }
        if s.kind == ScenarioKind::Reactivation {
            if let Some(v) = p.last_visit_at {
                vars.insert(
                    "days_since_visit".into(),
                    ((timer.fire_at - v) / kairos_core::time::DAY).into(),
                );
            }
        }
        let emitted = self.emit_trigger(
            ctx,
            s,
            p,
            t.step,
            &cause,
            t.cause_occurred_at,
            timer.fire_at,
            vars,
        );
        if s.kind.is_restartable_wait() {
            p.wait_step_fired_at
                .insert(s.name.as_str().into(), timer.fire_at);
        }
        if emitted && is_yearly(s.kind) && t.step == 0 {
            // Greeted: see `yearly_rearm_since`.
            p.armed.insert(s.name.as_str().into(), timer.fire_at);
        }
        if !emitted {
            // A step skipped as late ends the chain: no welcome_2 without welcome.
            // (A yearly scenario armed next year's date already.)
            if s.kind.is_restartable_wait() {
                p.waits.remove(s.name.as_str());
            }
            return Ok(());
        }
        // The next step of a chain.
        if s.kind.is_restartable_wait() {
            match (s.steps.get(t.step), p.waits.get(s.name.as_str()).cloned()) {
                (Some(next), Some(w)) => {
                    arm_wait(ctx, s, p, &w, t.step + 1, timer.fire_at + ms(next.delay))?
                }
                _ => {
                    p.waits.remove(s.name.as_str());
                }
            }
        } else if let Some(next) = s.steps.get(t.step) {
            let due = self.next_step_due(s, p, timer.fire_at, next.delay);
            let next_step = StepTimer::new(&cause, t.cause_occurred_at, t.step + 1, due);
            schedule_timer_step(ctx, s, p, t, next_step)?;
        }
        Ok(())
    }

    /// Time-driven segment changes due before an event happened whose review timer
    /// has not fired yet: with the wall clock, the backlog of an outage is read before
    /// the timers it holds back. Judged first, each at its own boundary, so a purchase
    /// 100 days after the last one still finds the customer dormant since day 90, as
    /// in an uninterrupted run. (In event time due timers fire before the event.)
    fn catch_up_segment_reviews(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut CustomerProfile,
        occurred_at: Millis,
    ) -> anyhow::Result<()> {
        let until = occurred_at.min(ctx.now());
        while let Some(due) = p.armed.get(SEGMENT_REVIEW).copied().filter(|&a| a <= until) {
            // Arms the next boundary (always later than `due`) in place of the timer.
            self.review_at_boundary(ctx, p, due)?;
            if !p.armed.contains_key(SEGMENT_REVIEW) {
                // No boundary ahead: the overdue timer must not judge again later.
                ctx.cancel(&format!("{SEGMENT_REVIEW}/{}", p.customer_id))?;
            }
        }
        Ok(())
    }

    fn on_segment_review(
        &mut self,
        ctx: &mut Ctx<'_>,
        customer_id: &str,
        fire_at: Millis,
    ) -> anyhow::Result<()> {
        let Some(mut p) = self.take(ctx, customer_id)? else {
            return Ok(());
        };
        let result = self.review_at_boundary(ctx, &mut p, fire_at);
        self.put(ctx, p)?;
        result
    }

    /// The time-driven review due at `at` (its timer fired, or an event came after
    /// it first), judged as of `at`; it arms the next one.
    fn review_at_boundary(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut CustomerProfile,
        at: Millis,
    ) -> anyhow::Result<()> {
        p.armed.remove(SEGMENT_REVIEW);
        self.review_segments_as_of(ctx, p, "time", at, at, &Reorder::default())
    }
}

/// A purchase just counted, for [`ProfileProcessor::after_purchase`].
struct Purchase<'a> {
    /// The event (or receipt event) that reported it.
    event_id: &'a str,
    at: Millis,
    /// The last purchase known before it: one older than that does not take the
    /// follow-up slot of a newer order.
    latest_before: Option<Millis>,
    order_id: Option<String>,
    /// A till sale: uploaded late, it ends only the waits it came after.
    offline: bool,
    /// What was bought, for the follow-up's template (see [`order_items_variables`]).
    order_items: Option<String>,
}

/// Line items a follow-up's template gets of its order (a review request names what
/// was bought): the first few, so a large order keeps its timer small.
const ORDER_ITEMS_TOLD: usize = 20;

/// `{"order_items": [...]}` of a purchase's items (none for an order without them).
fn order_items_variables(items: &[LineItem]) -> Option<String> {
    if items.is_empty() {
        return None;
    }
    let told = &items[..items.len().min(ORDER_ITEMS_TOLD)];
    Some(serde_json::json!({ "order_items": told }).to_string())
}

/// Arms `step` of the chain a scenario timer `t` belongs to, with the occasion `t`
/// carries (product, order, template variables).
fn schedule_timer_step(
    ctx: &mut Ctx<'_>,
    s: &ScenarioConfig,
    p: &CustomerProfile,
    t: &ScenarioTimer,
    step: StepTimer<'_>,
) -> anyhow::Result<()> {
    schedule_step_with(
        ctx,
        s,
        p,
        step,
        t.product.as_ref(),
        t.order_id.as_deref(),
        t.variables.as_deref(),
    )
}

/// Chains a merge hands over by the scenario's slot rules (a later purchase, delivery
/// or the survivor's own series holds the slot) rather than by the survivor's timers.
fn carried_by_slot(kind: ScenarioKind) -> bool {
    matches!(
        kind,
        ScenarioKind::Welcome | ScenarioKind::PostPurchase | ScenarioKind::PostDelivery
    )
}

/// Carried steps as `merge_in` records hold them.
fn encode_carried_steps(steps: &[CarriedStep]) -> anyhow::Result<Vec<serde_json::Value>> {
    steps
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()
        .context("encode a merged customer's chain steps")
}

/// The merged customer's step due on the timer `timer_id`, if one is armed.
fn carried_step(ctx: &Ctx<'_>, timer_id: &str) -> anyhow::Result<Option<CarriedStep>> {
    Ok(ctx
        .timer_payload::<ScenarioTimer>(timer_id)?
        .map(|(fire_at, timer)| CarriedStep { fire_at, timer }))
}

/// What of a merged customer's chains its profile can rebuild for the survivor
/// ([`ProfileProcessor::rearm_merged_chains`]), each only when the survivor has no
/// newer one of its own.
struct MergedChains {
    /// Its latest order that counts (post-purchase follow-up), if later than the
    /// survivor's last purchase (whose follow-up holds the slot otherwise).
    order: Option<(String, Millis)>,
    /// The welcome series' causes on both sides.
    welcome: WelcomeStarts,
    /// Its latest delivered order (NPS survey), if delivered after the survivor's.
    delivery: Option<(String, Millis)>,
    /// Its welcome, post-purchase and post-delivery steps still to fire, when the merge
    /// carried them (else those chains are rebuilt from the fields above).
    carried: Option<Vec<CarriedStep>>,
    /// The survivor's last purchase and last delivery before the merge.
    survivor_last_purchase: Option<Millis>,
    survivor_last_delivery: Option<Millis>,
}

/// The registration and first opt-in (`(registered_at, subscribed_at)`) of the
/// survivor and of the merged customer, before the merge.
struct WelcomeStarts {
    survivor: (Option<Millis>, Option<Millis>),
    merged: (Option<Millis>, Option<Millis>),
}

impl WelcomeStarts {
    /// When the welcome series `s` started for a customer with these causes: the
    /// earliest one it starts on.
    fn start(
        &self,
        s: &ScenarioConfig,
        (registered, subscribed): (Option<Millis>, Option<Millis>),
    ) -> Option<Millis> {
        let registered = registered.filter(|_| s.welcomes_on(WelcomeCause::Registration));
        let subscribed = subscribed.filter(|_| s.welcomes_on(WelcomeCause::Subscription));
        match (registered, subscribed) {
            (Some(r), Some(x)) => Some(r.min(x)),
            (r, x) => r.or(x),
        }
    }
}

/// When a segment review's cause happened (`at`: the event's time, or the review
/// timer's) and the time it is judged as of (`now`: for an event the later of its time
/// and the clock, for a time-driven review its boundary).
#[derive(Debug, Clone, Copy)]
struct Cause {
    at: Millis,
    now: Millis,
}

/// Why a segment or stage was entered: the review's reason, its cause, and the
/// segments it only restores (see [`ProfileProcessor::review_segments`]).
#[derive(Debug, Clone, Copy)]
struct Entry<'a> {
    reason: &'a str,
    cause: Cause,
    reorder: &'a Reorder,
}

/// What an order's events read out of order mean for a segment review.
#[derive(Debug, Default)]
struct Reorder {
    /// Stages and segments a purchase whose cancellation came first puts the customer
    /// back in (see [`profile::EarlyReversal::held_before`]): no new entry.
    restored: Vec<String>,
    /// The review follows the cancellation of an order not known yet, whose purchase
    /// may still come and put the customer back: leaving a segment then does not end
    /// what the arbiter holds of its scenario (a greeting waiting for the morning).
    early_cancellation: bool,
}

/// Why a cart or browse wait that fired sent nothing: a purchase since its cause, the
/// cart emptied, a cart the cart reminder speaks for.
const SKIP_BOUGHT: &str = "bought";
const SKIP_CART_EMPTIED: &str = "cart_emptied";
const SKIP_CARTED: &str = "carted";
/// A follow-up ended by a till refund that could be its order's.
const SKIP_REFUNDED: &str = "refunded";

fn ms(d: std::time::Duration) -> Millis {
    d.as_millis() as Millis
}

fn profile_key(customer_id: &str) -> String {
    ["c/", customer_id].concat()
}

/// Customers merged into one that its profile names (directly or through a merged
/// one): the arbiter waits for their ledgers, and a merge re-sent after a crash is
/// known by them. Room for chains of merges, which add the merged one's too.
const MERGED_FROM_KEPT: usize = 32;

/// Where a customer merged into another points: to the survivor's id.
/// Whether an outcome changes a profile, so that one for a customer merged away is
/// worth sending on: deliveries, opens, clicks and suppressions. Not a hard bounce
/// that names no address (a provider's webhook): the survivor would take it for its
/// own address, which may not be the one the message went to (the arbiter, which
/// recorded each send's address, suppresses the right one).
fn outcome_concerns_profile(o: &Outcome) -> bool {
    match o.kind {
        OutcomeKind::delivered
        | OutcomeKind::opened
        | OutcomeKind::clicked
        | OutcomeKind::unsubscribed
        | OutcomeKind::complained => true,
        OutcomeKind::bounced_hard => o.address.is_some(),
        _ => false,
    }
}

fn forward_key(customer_id: &str) -> String {
    ["fwd/", customer_id].concat()
}

/// Where triggers wait while a merge into the customer is under way.
fn held_prefix(customer_id: &str) -> String {
    format!("h/{customer_id}/")
}

/// The triggers held for `customer_id` (key, trigger): under its prefix, not those
/// of a customer whose id is this one's, a slash and more (`acme/jane`'s under
/// `h/acme/`), which sit there with a slash before their trigger id.
fn held_triggers(ctx: &mut Ctx<'_>, customer_id: &str) -> anyhow::Result<Vec<(String, Trigger)>> {
    let prefix = held_prefix(customer_id);
    let mut held = ctx.scan::<Trigger>(&prefix)?;
    held.retain(|(key, t)| key[prefix.len()..] == *t.trigger_id);
    Ok(held)
}

/// Where a return mark of `customer`'s `order` is kept. The customer id ends at a NUL,
/// which no id holds, so a customer's marks are not those of one whose id is theirs,
/// a slash and more, as `ret/<customer>/<order>` keys of earlier versions could be.
fn return_mark_key(customer: &str, order: &str) -> String {
    format!("rt/{customer}\0{order}")
}

/// The timer that drops the return mark of `customer`'s `order`.
fn return_mark_expiry(customer: &str, order: &str) -> String {
    format!("{RETURN_MARK_EXPIRY}/{customer}\0{order}")
}

fn timer_id(scenario: &str, customer_id: &str) -> String {
    [scenario, "/", customer_id].concat()
}

/// Birthday and anniversary: armed a year ahead, step after step.
fn is_yearly(kind: ScenarioKind) -> bool {
    matches!(
        kind,
        ScenarioKind::Birthday | ScenarioKind::RegistrationAnniversary
    )
}

/// The timer of a yearly scenario's follow-up steps: its own, so it does not replace
/// next year's date, which step 0 armed under [`timer_id`].
fn follow_up_timer_id(scenario: &str, customer_id: &str) -> String {
    [scenario, "+steps/", customer_id].concat()
}

/// The timer id of step `step` of `s`.
fn step_timer_id(s: &ScenarioConfig, step: usize, customer_id: &str) -> String {
    if step > 0 && is_yearly(s.kind) {
        follow_up_timer_id(&s.name, customer_id)
    } else {
        timer_id(&s.name, customer_id)
    }
}

#[allow(clippy::too_many_arguments)]
fn schedule_step(
    ctx: &mut Ctx<'_>,
    s: &ScenarioConfig,
    p: &CustomerProfile,
    cause_event_id: &str,
    cause_occurred_at: Millis,
    step: usize,
    fire_at: Millis,
    product: Option<&Product>,
    order_id: Option<&str>,
) -> anyhow::Result<()> {
    let timer = StepTimer::new(cause_event_id, cause_occurred_at, step, fire_at);
    schedule_step_with(ctx, s, p, timer, product, order_id, None)
}

/// A step to arm: its cause, number and fire time.
struct StepTimer<'a> {
    cause_event_id: &'a str,
    cause_occurred_at: Millis,
    step: usize,
    fire_at: Millis,
    /// See `ScenarioTimer::given_way`.
    given_way: &'a [(String, String)],
}

impl<'a> StepTimer<'a> {
    fn new(
        cause_event_id: &'a str,
        cause_occurred_at: Millis,
        step: usize,
        fire_at: Millis,
    ) -> Self {
        StepTimer {
            cause_event_id,
            cause_occurred_at,
            step,
            fire_at,
            given_way: &[],
        }
    }
}

/// [`schedule_step`] with the occasion's template `variables` (a JSON object).
fn schedule_step_with(
    ctx: &mut Ctx<'_>,
    s: &ScenarioConfig,
    p: &CustomerProfile,
    timer: StepTimer<'_>,
    product: Option<&Product>,
    order_id: Option<&str>,
    variables: Option<&str>,
) -> anyhow::Result<()> {
    ctx.schedule(
        &step_timer_id(s, timer.step, &p.customer_id),
        timer.fire_at,
        &ScenarioTimerRef {
            scenario: &s.name,
            customer_id: &p.customer_id,
            cause_event_id: timer.cause_event_id,
            cause_occurred_at: timer.cause_occurred_at,
            step: timer.step,
            product,
            order_id,
            variables,
            given_way: timer.given_way,
        },
    )
}

/// Bounds `survivor`'s wait for `merged`'s profile: `MERGE_WAIT_LIMIT` after the merge
/// (or now, if later), the survivor goes on without it (see `give_up_merge_wait`).
/// Deletes `customer`'s return marks and their expiry timers; returns the orders.
fn take_return_marks(ctx: &mut Ctx<'_>, customer: &str) -> anyhow::Result<Vec<String>> {
    let mut returned = Vec::new();
    // Then the marks of earlier versions (gone once their chains' time has passed).
    // A mark's expiry timer is named after its key without the key's own prefix.
    let prefixes = [
        ("rt/", return_mark_key(customer, "")),
        ("ret/", format!("ret/{customer}/")),
    ];
    for (kind, prefix) in prefixes {
        for (key, _) in ctx.scan::<bool>(&prefix)? {
            ctx.delete(&key);
            ctx.cancel(&format!("{RETURN_MARK_EXPIRY}/{}", &key[kind.len()..]))?;
            returned.push(key[prefix.len()..].to_string());
        }
    }
    Ok(returned)
}

fn schedule_merge_wait(
    ctx: &mut Ctx<'_>,
    survivor: &str,
    merged: &str,
    merged_at: Millis,
) -> anyhow::Result<()> {
    ctx.schedule(
        &format!("{MERGE_WAIT_EXPIRY}/{survivor}/{merged}"),
        merged_at.max(ctx.now()).saturating_add(MERGE_WAIT_LIMIT),
        &(survivor, merged),
    )
}

/// Restarts a restartable wait (see [`profile::Wait`]) from its cause, an event's id
/// and the time the wait runs from. Only the profile changes unless the armed timer
/// would fire too late: a view every few seconds costs no timer write.
fn restart_wait(
    ctx: &mut Ctx<'_>,
    s: &ScenarioConfig,
    p: &mut CustomerProfile,
    (cause_event_id, since): (&str, Millis),
    product: Option<Product>,
) -> anyhow::Result<()> {
    // An older event arriving late (another device's topic) does not move the wait
    // back or replace its product: the wait runs from the latest change. Nor does one
    // from before the wait's last step went out (see `wait_step_fired_at`).
    if p.waits
        .get(s.name.as_str())
        .is_some_and(|w| w.cause_occurred_at > since)
        || p.wait_step_fired_at
            .get(s.name.as_str())
            .is_some_and(|fired| *fired > since)
    {
        return Ok(());
    }
    let wait = profile::Wait {
        cause_event_id: cause_event_id.to_string(),
        cause_occurred_at: since,
        product,
    };
    let due = since + ms(s.delay);
    // An entry not after now is stale (its timer fired while the scenario was off).
    if p.armed
        .get(s.name.as_str())
        .is_none_or(|armed| *armed > due || *armed < ctx.now())
    {
        arm_wait(ctx, s, p, &wait, 0, due)?;
    }
    p.waits.insert(s.name.as_str().into(), wait);
    Ok(())
}

/// Arms step `step` of a restartable wait at `fire_at`.
fn arm_wait(
    ctx: &mut Ctx<'_>,
    s: &ScenarioConfig,
    p: &mut CustomerProfile,
    w: &profile::Wait,
    step: usize,
    fire_at: Millis,
) -> anyhow::Result<()> {
    schedule_step(
        ctx,
        s,
        p,
        &w.cause_event_id,
        w.cause_occurred_at,
        step,
        fire_at,
        w.product.as_ref(),
        None,
    )?;
    p.armed.insert(s.name.as_str().into(), fire_at);
    Ok(())
}

/// Arms reactivation `s`'s first step at `at` for the absence since `last` (the
/// customer's latest activity, which names the step's cause).
fn schedule_reactivation(
    ctx: &mut Ctx<'_>,
    s: &ScenarioConfig,
    p: &mut CustomerProfile,
    last: Millis,
    at: Millis,
) -> anyhow::Result<()> {
    schedule_step(ctx, s, p, &format!("visit-{last}"), last, 0, at, None, None)?;
    p.armed.insert(s.name.as_str().into(), at);
    Ok(())
}

/// Ends the scenario's pending wait or chain: its timer never fires.
fn stop_wait(ctx: &mut Ctx<'_>, s: &ScenarioConfig, p: &mut CustomerProfile) -> anyhow::Result<()> {
    p.waits.remove(s.name.as_str());
    if is_yearly(s.kind) {
        // Only the pending follow-up steps: next year's date stays, and so does when
        // the customer was greeted (`yearly_rearm_since`).
        ctx.cancel(&follow_up_timer_id(&s.name, &p.customer_id))?;
    } else {
        p.armed.remove(s.name.as_str());
        ctx.cancel(&timer_id(&s.name, &p.customer_id))?;
    }
    Ok(())
}

/// Arms the first step of `s` its delay after the event `e`.
fn schedule_after_event(
    ctx: &mut Ctx<'_>,
    s: &ScenarioConfig,
    p: &CustomerProfile,
    e: &CustomerEvent,
    product: Option<&Product>,
    order_id: Option<&str>,
) -> anyhow::Result<()> {
    schedule_after(ctx, s, p, &e.event_id, e.occurred_at, product, order_id)
}

/// Arms the scenario's first step `delay` after a cause named `cause_event_id` (an
/// event's id, or a key such as the order's delivery) that happened at `at`.
fn schedule_after(
    ctx: &mut Ctx<'_>,
    s: &ScenarioConfig,
    p: &CustomerProfile,
    cause_event_id: &str,
    at: Millis,
    product: Option<&Product>,
    order_id: Option<&str>,
) -> anyhow::Result<()> {
    let fire_at = at + ms(s.delay);
    schedule_step(ctx, s, p, cause_event_id, at, 0, fire_at, product, order_id)
}

impl ProfileProcessor {
    /// Tells the arbiter that an address or the time zone changed: a message waiting
    /// there (deferred by quiet hours or a cap, a cascade's next step) fired with the
    /// old ones.
    fn tell_contacts_changed(
        &self,
        ctx: &mut Ctx<'_>,
        p: &CustomerProfile,
        before: &[Option<String>; 5],
        event_id: &str,
    ) -> anyhow::Result<()> {
        if addresses(p) == before.each_ref().map(Option::as_deref) {
            return Ok(());
        }
        let action = CustomerAction {
            contacts: Some(contacts(p)),
            ..CustomerAction::new(
                deterministic_id(&[event_id, "contacts_changed"]),
                p.customer_id.clone(),
                CustomerActionKind::contacts_changed,
                // When the profile learnt it, as a trigger's `fired_at` is: the arbiter
                // gives it to what fired before. Not the event's own time: an event
                // dated ahead (a device's clock) would hold later changes back.
                ctx.now(),
            )
        };
        ctx.emit(&self.actions_topic, &p.customer_id, &action);
        Ok(())
    }
}

/// The addresses and time zone a `contacts_changed` action reports a change of.
fn addresses(p: &CustomerProfile) -> [Option<&str>; 5] {
    [
        p.email.as_deref(),
        p.phone.as_deref(),
        p.push_token.as_deref(),
        p.messenger_id.as_deref(),
        p.time_zone.as_deref(),
    ]
}

/// [`addresses`] as they are now, for [`ProfileProcessor::tell_contacts_changed`] to
/// compare with after a change.
fn addresses_now(p: &CustomerProfile) -> [Option<String>; 5] {
    addresses(p).map(|a| a.map(str::to_owned))
}

fn contacts(p: &CustomerProfile) -> Contacts {
    // An address that bounced hard is as good as none until the customer gives a new one.
    let usable = |channel: Channel, address: &Option<String>| {
        address.clone().filter(|a| !p.is_bounced(channel, a))
    };
    Contacts {
        email: usable(Channel::email, &p.email),
        phone: usable(Channel::sms, &p.phone),
        push_token: usable(Channel::push, &p.push_token),
        messenger_id: usable(Channel::messenger, &p.messenger_id),
        time_zone: p.time_zone.clone(),
        consented_channels: Channel::ALL
            .into_iter()
            .filter(|c| p.consents.get(c).copied().unwrap_or(false))
            .collect(),
    }
}

/// Checks what the schema cannot express.
impl Processor for ProfileProcessor {
    type Input = ProfileInput;

    fn name(&self) -> &str {
        "profile"
    }

    fn inputs(&self) -> Vec<String> {
        let mut inputs = match &self.identified_topic {
            Some(identified) => vec![identified.clone()],
            None => vec![
                self.site_topic.clone(),
                self.app_topic.clone(),
                self.offline_topic.clone(),
            ],
        };
        inputs.extend([self.occasions_topic.clone(), self.outcomes_topic.clone()]);
        inputs
    }

    /// The raw event topics, read directly when no identity processor runs in front.
    fn is_raw_input(&self, topic: &str) -> bool {
        self.identified_topic.is_none()
            && (topic == self.site_topic || topic == self.app_topic || topic == self.offline_topic)
    }

    fn outputs(&self) -> Vec<String> {
        vec![
            self.triggers_topic.clone(),
            self.transitions_topic.clone(),
            self.interest_topic.clone(),
            self.actions_topic.clone(),
        ]
    }

    fn decode(&self, record: &Record<'_>) -> Result<ProfileInput, Rejection> {
        if Some(record.topic) == self.identified_topic.as_deref() {
            // Checked and normalized by the identity processor already.
            return Ok(match decode_internal::<IdentifiedRecord>(record.payload)? {
                IdentifiedRecord::site(e) => ProfileInput::Event(e, input::Source::Site),
                IdentifiedRecord::app(e) => ProfileInput::Event(e, input::Source::App),
                IdentifiedRecord::offline(r) => ProfileInput::Receipt(r),
                IdentifiedRecord::merge(m) => ProfileInput::MergeOut(m),
                IdentifiedRecord::merge_expected(m) => ProfileInput::MergeExpected(m),
                IdentifiedRecord::identifier_moved(m) => ProfileInput::IdentifierMoved(m),
                IdentifiedRecord::outcome(o) => ProfileInput::Outcome(o),
                IdentifiedRecord::touches_in { .. } | IdentifiedRecord::purchase_in { .. } => {
                    ProfileInput::Ignored
                }
                IdentifiedRecord::merge_in {
                    merge,
                    profile,
                    held,
                    steps,
                    chains_carried,
                    returned,
                } => {
                    let invalid = |what: &str, e: serde_json::Error| {
                        Rejection::new(
                            kairos_core::contracts::DeadLetterReason::invalid_field,
                            format!("{what} does not decode: {e}"),
                        )
                    };
                    let profile = serde_json::from_value(profile)
                        .map_err(|e| invalid("merged profile", e))?;
                    // A step that does not decode costs that step, not the merge (the
                    // profile's sums and consents).
                    let steps = steps
                        .into_iter()
                        .filter_map(|step| match serde_json::from_value(step) {
                            Ok(step) => Some(step),
                            Err(e) => {
                                tracing::warn!(merge = %merge.merge_id, error = %e, "a merged customer's chain step does not decode; it is dropped");
                                None
                            }
                        })
                        .collect();
                    ProfileInput::MergeIn(Box::new(MergeIn {
                        merge,
                        profile,
                        held,
                        steps,
                        chains_carried,
                        returned,
                    }))
                }
            });
        }
        if record.topic == self.offline_topic {
            let receipt = input::decode_receipt(record.payload, &self.registry, &self.currencies)?;
            Ok(ProfileInput::Receipt(Box::new(receipt)))
        } else if record.topic == self.outcomes_topic {
            Ok(ProfileInput::Outcome(Box::new(decode_internal(
                record.payload,
            )?)))
        } else if record.topic == self.occasions_topic {
            Ok(ProfileInput::Occasion(Box::new(decode_internal(
                record.payload,
            )?)))
        } else {
            let source = if record.topic == self.app_topic {
                input::Source::App
            } else {
                input::Source::Site
            };
            let event =
                input::decode_customer_event(record.payload, &self.registry, &self.currencies)?;
            Ok(ProfileInput::Event(Box::new(event), source))
        }
    }

    fn event_time(&self, input: &ProfileInput) -> Option<Millis> {
        Some(match input {
            ProfileInput::Event(e, _) => e.occurred_at,
            ProfileInput::Receipt(r) => r.occurred_at,
            ProfileInput::Occasion(o) => o.occurred_at,
            ProfileInput::Outcome(o) => o.occurred_at,
            ProfileInput::MergeOut(m) | ProfileInput::MergeExpected(m) => m.occurred_at,
            ProfileInput::MergeIn(m) => m.merge.occurred_at,
            ProfileInput::IdentifierMoved(m) => m.occurred_at,
            ProfileInput::Ignored => return None,
        })
    }

    fn process(&mut self, ctx: &mut Ctx<'_>, mut input: ProfileInput) -> anyhow::Result<()> {
        self.check_standing(ctx)?;
        match &input {
            ProfileInput::Event(e, source) => {
                self.metrics
                    .events
                    .inc(&[source.as_str(), e.event_type.as_str()]);
            }
            ProfileInput::Receipt(r) => {
                let kind = match r.kind {
                    ReceiptKind::sale => "sale",
                    ReceiptKind::refund => "refund",
                };
                self.metrics
                    .events
                    .inc(&[input::Source::Offline.as_str(), kind]);
            }
            _ => {}
        }
        // An event a device dated ahead (within `clock.max_event_lead`) happened when
        // it was read, at the latest: dated hours ahead, a purchase would end the
        // welcome series of a registration read after it and stop cart and browsing
        // waits until that hour, and a registration would outlast the purchase after
        // it. (In event time the clock has moved to the event's time already.)
        let now = ctx.now();
        match &mut input {
            ProfileInput::Event(e, _) => e.occurred_at = e.occurred_at.min(now),
            ProfileInput::Receipt(r) => r.occurred_at = r.occurred_at.min(now),
            _ => {}
        }
        match input {
            ProfileInput::Event(e, _) if e.event_type == EventType::heartbeat => Ok(()),
            ProfileInput::Ignored => Ok(()),
            ProfileInput::Event(e, _) => self.apply_event(ctx, &e),
            ProfileInput::Receipt(r) => self.apply_receipt(ctx, &r),
            ProfileInput::Occasion(o) => self.apply_occasion(ctx, &o),
            ProfileInput::Outcome(o) => self.apply_outcome(ctx, &o),
            ProfileInput::MergeOut(m) => self.merge_out(ctx, &m),
            ProfileInput::MergeIn(m) => self.merge_in(ctx, *m),
            ProfileInput::IdentifierMoved(m) => self.release_identifier(ctx, &m),
            ProfileInput::MergeExpected(m) => {
                if let Some(survivor) = ctx.get::<String>(&forward_key(&m.into))? {
                    // Merged away since: the customer it became waits instead.
                    let record = IdentifiedRecord::merge_expected(CustomerMerge {
                        into: survivor.clone(),
                        ..m
                    });
                    if let Some(topic) = &self.identified_topic {
                        ctx.emit(topic, &survivor, &record);
                    }
                    return Ok(());
                }
                let mut p = self
                    .take(ctx, &m.into)?
                    .unwrap_or_else(|| Box::new(CustomerProfile::new(&m.into, m.occurred_at)));
                if !p.merged_from.contains(&m.from) && !p.awaiting_merges.contains(&m.from) {
                    p.awaiting_merges.push(m.from.clone());
                    schedule_merge_wait(ctx, &m.into, &m.from, m.occurred_at)?;
                }
                self.put(ctx, p)?;
                Ok(())
            }
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: &DueTimer) -> anyhow::Result<()> {
        self.check_standing(ctx)?;
        if let Some((scenario, moves)) = arming_pass_scenario(&timer.timer_id) {
            self.arming_pass(ctx, scenario, moves, timer)
        } else if timer.timer_id.starts_with(RESEGMENT_PASS) {
            self.profile_pass(ctx, timer, |this, ctx, p, now| {
                let judged = |p: &CustomerProfile| {
                    let review = p.armed.get(SEGMENT_REVIEW).copied();
                    (p.lifecycle.clone(), p.rfm.clone(), review)
                };
                let before = judged(p);
                let reorder = Reorder::default();
                this.review_segments(ctx, p, RESEGMENT_REASON, now, &reorder)?;
                Ok(judged(p) != before)
            })
        } else if let Some(customer) = timer.timer_id.strip_prefix(&format!("{SEGMENT_REVIEW}/")) {
            let customer = customer.to_string();
            self.on_segment_review(ctx, &customer, timer.fire_at)
        } else if let Some(customer) = timer.timer_id.strip_prefix(&format!("{FORWARD_EXPIRY}/")) {
            ctx.delete(&forward_key(customer));
            Ok(())
        } else if timer.timer_id.starts_with(&format!("{MERGE_WAIT_EXPIRY}/")) {
            let (into, from): (String, String) = timer
                .decode()
                .with_context(|| format!("timer {} payload does not decode", timer.timer_id))?;
            self.give_up_merge_wait(ctx, &into, &from)
        } else if let Some(customer) = timer.timer_id.strip_prefix(&format!("{ANONYMOUS_EXPIRY}/"))
        {
            let customer = customer.to_string();
            self.expire_anonymous(ctx, &customer, timer.fire_at)
        } else if let Some(mark) = timer
            .timer_id
            .strip_prefix(&format!("{RETURN_MARK_EXPIRY}/"))
        {
            // `<customer>\0<order>`, or `<customer>/<order>` set by earlier versions.
            if mark.contains('\0') {
                ctx.delete(&format!("rt/{mark}"));
            } else {
                ctx.delete(&format!("ret/{mark}"));
            }
            Ok(())
        } else {
            self.on_scenario_timer(ctx, timer)
        }
    }

    fn flush(&mut self, ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
        self.profiles.flush(ctx)
    }

    fn on_partition_closed(&mut self, partition: i32) {
        self.profiles.close(partition);
        // Whoever owns it next compares again (its store may have moved on).
        if let Some(checked) = self.standing_checked_of(partition) {
            *checked = false;
        }
    }
}

/// Runs the profile processor until `cancel` fires.
pub async fn run(
    config: Arc<Config>,
    admin: Arc<kairos_core::admin::AdminState>,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let registry = SchemaRegistry::new(config.schema_registry.url.clone());
    let processor = ProfileProcessor::new(config.clone(), registry.clone(), &admin.registry);
    kairos_core::runtime::run(&config, processor, admin, registry, cancel).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A late bounce of an old address leaves a bounced newer one unusable.
    #[test]
    fn a_late_bounce_of_an_old_address_keeps_the_newer_bounced_one_out() {
        let bounce = |address: &str, at: Millis| Outcome {
            outcome_id: format!("b-{at}"),
            send_id: format!("s-{at}"),
            customer_id: "c1".into(),
            scenario: "welcome".into(),
            channel: Channel::email,
            category: kairos_core::contracts::MessageCategory::trigger,
            kind: OutcomeKind::bounced_hard,
            reason: None,
            occurred_at: at,
            address: Some(address.into()),
        };
        let mut p = CustomerProfile::new("c1", 0);
        p.email = Some("new@x".into());
        p.apply_outcome(&bounce("new@x", 10));
        assert_eq!(contacts(&p).email, None);
        p.apply_outcome(&bounce("old@x", 5));
        assert_eq!(contacts(&p).email, None, "new@x bounced too");
        // A third address nobody bounced is usable.
        p.email = Some("third@x".into());
        assert_eq!(contacts(&p).email.as_deref(), Some("third@x"));
    }

    /// Timers are written from the borrowed form and read back as the owned one: the
    /// two must give the same bytes, with and without the optional fields.
    #[test]
    fn a_borrowed_scenario_timer_encodes_as_the_owned_one() {
        let product = Product {
            product_id: "p-1".into(),
            name: Some("Boots".into()),
            category: None,
            price: Some(79.9),
        };
        let variables = Some(r#"{"to_segment":"At Risk"}"#);
        let earlier = vec![("o-6".to_string(), r#"{"order_items":[]}"#.to_string())];
        for (product, order_id, variables, given_way) in [
            (Some(&product), Some("o-7"), variables, earlier),
            (None, None, None, Vec::new()),
        ] {
            let borrowed = ScenarioTimerRef {
                scenario: "post_purchase",
                customer_id: "c-1",
                cause_event_id: "e-9",
                cause_occurred_at: 1_767_225_600_000,
                step: 2,
                product,
                order_id,
                variables,
                given_way: &given_way,
            };
            let bytes = kairos_core::encoding::encode_state(&borrowed).unwrap();
            let owned: ScenarioTimer = kairos_core::encoding::decode_state(&bytes).unwrap();
            assert_eq!(owned.scenario, "post_purchase");
            assert_eq!(owned.customer_id, "c-1");
            assert_eq!(owned.cause_event_id, "e-9");
            assert_eq!(owned.cause_occurred_at, 1_767_225_600_000);
            assert_eq!(owned.step, 2);
            assert_eq!(owned.product.as_ref(), product);
            assert_eq!(owned.order_id.as_deref(), order_id);
            assert_eq!(owned.variables.as_deref(), variables);
            assert_eq!(owned.given_way, given_way);
            assert_eq!(kairos_core::encoding::encode_state(&owned).unwrap(), bytes);
        }
    }
}
