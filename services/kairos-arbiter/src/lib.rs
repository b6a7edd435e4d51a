//! The arbiter: decides, per customer and trigger, whether to send now, on which
//! channel, or not at all, and records why.
//!
//! Every trigger yields exactly one decision on the decisions topic; a "sent" decision
//! also yields a send command on the channel's topic. Decisions and send ids are
//! deterministic, so a replayed trigger produces the same records.

use std::sync::Arc;

use kairos_core::admin::AdminState;
use kairos_core::config::{topics, CapConfig, Config, LowerPriority, ScenarioKind};
use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use compact_str::CompactString;
use kairos_core::calendar;
use kairos_core::contracts::{
    Channel, Contacts, CustomerAction, CustomerActionKind, DeadLetterReason, DecisionOutcome,
    DecisionRef, ExperimentGroup, MessageCategory, Outcome, OutcomeKind, SendCommandRef, Trigger,
    DECISION_RULES,
};
use kairos_core::encoding::{decode_internal, Rejection, SchemaRegistry};
use kairos_core::ids::{deterministic_id, stable_fraction};
use kairos_core::ignored_row;
use kairos_core::metrics;
use kairos_core::runtime::{Ctx, Processor, Record};
use kairos_core::small_map::SmallMap;
use kairos_core::state_cache::StateCache;
use kairos_core::store::DueTimer;
use kairos_core::time::{Millis, DAY, HOUR, MINUTE};
use prometheus::Histogram;
use serde::{Deserialize, Serialize};

/// Per-customer arbiter state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CustomerLedger {
    /// Recent sends (time, channel, category), newest last; pruned to the cap window.
    pub sends: Vec<(Millis, Channel, MessageCategory)>,
    /// The scenario of each recent send (time, scenario), for per-scenario caps;
    /// pruned with `sends`.
    pub scenario_sends: Vec<(Millis, CompactString)>,
    /// Where recent sends went (send id -> time, address), so a hard bounce suppresses
    /// the address that bounced; pruned to `BOUNCE_WINDOW` (longer than `sends`: a
    /// provider may report a bounce days late).
    pub sent_to: SmallMap<String, (Millis, String)>,
    /// Channels the customer unsubscribed from (outcome time): suppressed until a
    /// later opt-in.
    pub unsubscribed: SmallMap<Channel, Millis>,
    /// The latest opt-in per channel: an unsubscribe older than it no longer holds.
    pub opted_in: SmallMap<Channel, Millis>,
    /// The latest address that bounced hard, per channel (earlier ones are in
    /// `bounced`): never sent to again.
    pub hard_bounced: SmallMap<Channel, String>,
    /// When the customer marked a message as spam: no promo from then on.
    pub complained_at: Option<Millis>,
    /// The customer's latest purchase (from customer actions).
    pub last_purchase_at: Option<Millis>,
    /// The customer's latest visit day seen (from customer actions).
    pub last_active_at: Option<Millis>,
    /// Deferred triggers waiting in the queue, by trigger id.
    pub queued: SmallMap<String, Queued>,
    /// Offers sent (offer id or promo code -> time), pruned to the repeat window.
    pub offers: SmallMap<String, Millis>,
    /// Marketing messages delivered since the customer last opened or clicked one.
    pub ignored_in_row: u32,
    /// Hashes of the latest outcome ids applied, so a redelivered outcome counts once.
    pub recent_outcomes: Vec<u64>,
    /// Hashes of trigger ids decided by versions before `decided_triggers` (newest
    /// last); moved there when the ledger is next decided on, then empty.
    pub recent_triggers: Vec<u64>,
    /// Triggers fired up to this time may have been decided by a version that kept
    /// one `t/<trigger id>` key per trigger instead (set when such a ledger is first
    /// read; `Millis::MIN` for ledgers begun since).
    pub legacy_dedup_until: Option<Millis>,
    /// The chain that holds the customer (the main scenario), if one is running.
    pub main: Option<MainScenario>,
    /// Cascades waiting for a reaction, by trigger id.
    pub cascades: SmallMap<String, Cascade>,
    /// Set once the identity processor merged this customer into another: what still
    /// arrives for this id (a late trigger, an unsubscribe) goes to that one.
    pub merged_into: Option<String>,
    /// Customers whose ledgers were merged into this one (newest last, bounded).
    pub absorbed: Vec<String>,
    /// Every address that bounced hard, per channel (newest last, bounded by
    /// `BOUNCED_PER_CHANNEL`): a customer may have had several, and a trigger fired
    /// before the profile learnt of a bounce still carries the old one.
    pub bounced: SmallMap<Channel, Vec<String>>,
    /// How the customer engages with each channel, for the channel choice.
    pub engagement: SmallMap<Channel, ChannelEngagement>,
    /// The progress of each chain instance with later steps (scenario and cause ->
    /// the latest step decided), so steps go out in order, spaced, and not at all
    /// once an earlier one expired or was cancelled. Bounded by `CHAINS_KEPT`.
    pub chains: SmallMap<String, ChainProgress>,
    /// Hashes of the send ids of recent cascade steps after the first (newest last,
    /// bounded by `CASCADE_FOLLOWUPS_KEPT`): one trigger counts once towards the sunset, so
    /// their deliveries are not counted again.
    pub cascade_followups: Vec<u64>,
    /// When the customer last left each segment or stage a `segment_entered` scenario
    /// targets: a trigger of that scenario caused before it, arriving late, is
    /// cancelled.
    pub left_segments: SmallMap<CompactString, Millis>,
    /// Hashes of the trigger ids decided, with each trigger's valid-until (oldest
    /// first), so a redelivered trigger is decided once: the newest `RECENT_TRIGGERS`,
    /// and beyond them every one still valid (up to `TRIGGERS_KEPT`). A copy of one
    /// forgotten here was past its valid-until, so it is decided "expired" and sends
    /// nothing. Kept in the ledger, which is read for the decision anyway, instead of
    /// one key per trigger.
    pub decided_triggers: Vec<(u64, Millis)>,
    /// Hashes of the merged-ledger records applied (`merge_in` action ids, newest
    /// last, bounded by `MERGES_KEPT`), so one sent again is applied once.
    pub merges_applied: Vec<u64>,
    /// The customer's time zone as the newest trigger decided named it (when that
    /// trigger fired, the zone; none for the default): see [`CustomerLedger::settle_zone`].
    pub zone: Option<(Millis, Option<CompactString>)>,
    /// The customer's contacts as the profile last said they changed (when the
    /// profile learnt it, what), until a trigger fired after that is decided with
    /// nothing else waiting: see [`CustomerLedger::settle_zone`].
    pub contacts: Option<(Millis, Box<Contacts>)>,
    /// When the latest messages counted in `ignored_in_row` were delivered (oldest
    /// first, at most `IGNORED_KEPT`), so an open, click or purchase reported late
    /// clears only the deliveries before it.
    pub ignored_deliveries: Vec<Millis>,
    /// The customer's latest online purchase (a till sale's time is the till's; an
    /// online one's is the device's, allowed `PURCHASE_CLOCK_SKEW`), so a purchase
    /// read before a trigger or a cascade step ends what it would end read after them.
    pub last_online_purchase_at: Option<Millis>,
    /// The latest reaction (an open, a click, a purchase) as the row of ignored
    /// messages was ended by it: a purchase a device dated ahead ends it when read.
    pub last_reacted_at: Option<Millis>,
}

/// How a chain step's final decision ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepEnd {
    /// Sent or held out.
    WentOut,
    /// Suppressed for the customer's state: the next step is decided on its own.
    Unsent,
    /// Expired or cancelled: the chain ends.
    Broke,
}

/// How far one instance of a chain got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChainProgress {
    /// The latest step with a final decision.
    pub step: i32,
    /// When that step went out (or was held out); `None` if it ended without a send.
    pub sent_at: Option<Millis>,
    /// When this entry last changed (the oldest entries go first).
    pub updated_at: Millis,
    /// That step expired or was cancelled (its moment passed, or an exclusion ended
    /// it): the chain ends there. A step suppressed for the customer's state (no
    /// consented channel, an unsubscribe, the sunset) does not end it: the next
    /// step is decided on its own, as the customer may be reachable by then.
    pub broken: bool,
    /// The latest step that went out, and when, carried past steps that did not: the
    /// next step is spaced from it. `None` in entries stored before it was kept.
    pub last_sent: Option<(i32, Millis)>,
}

impl ChainProgress {
    /// The latest step that went out and when: this one, or the one carried.
    fn last_went_out(&self) -> Option<(i32, Millis)> {
        self.sent_at.map(|at| (self.step, at)).or(self.last_sent)
    }
}

/// The customer's engagement with one channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChannelEngagement {
    /// The latest open or click of a message on the channel.
    pub engaged_at: Option<Millis>,
    /// Marketing messages delivered on the channel since the latest open or click.
    pub ignored_in_row: u32,
}

/// A cascade in flight: the trigger went out on `channels` (as `send_ids`) and the next
/// channel waits for the cascade timer unless the customer reacts first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cascade {
    pub scenario: String,
    pub category: Option<MessageCategory>,
    pub channels: Vec<Channel>,
    pub send_ids: Vec<String>,
    /// When the trigger's cause happened: a purchase older than it (a till receipt
    /// uploaded late) does not stop it. Unknown for cascades started by earlier
    /// versions, which any purchase stops.
    #[serde(default)]
    pub cause_occurred_at: Option<Millis>,
    /// Only while the cascade travels to the survivor of a merge (see
    /// `hand_over_cascades`): when its next step is due and its trigger, which its timer
    /// held.
    #[serde(default)]
    pub handed_over: Option<(Millis, Box<Trigger>)>,
    /// The recipient's server put the latest message off (greylisting) and it has not
    /// left yet: the wait for a reaction starts when it does.
    #[serde(default)]
    pub latest_put_off: bool,
    /// The latest message left (or failed): a report of its deferral read after that
    /// holds nothing.
    #[serde(default)]
    pub latest_settled: bool,
    /// The latest message failed or bounced hard: the next step goes at once, and
    /// says so.
    #[serde(default)]
    pub latest_failed: bool,
}

/// What a carrier ledger takes to the survivor of a merge (see `send_carrier`).
enum Carried {
    Queued(Queued),
    Cascade(Cascade),
}

/// A running chain with the customer's attention until its last step is due.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MainScenario {
    pub scenario: String,
    pub priority: i32,
    pub until: Millis,
    /// When the cause of the step that took the slot happened: a till sale older than
    /// it (a receipt uploaded late) does not end the chain. Unknown for slots taken by
    /// earlier versions, which any purchase frees.
    pub cause_occurred_at: Option<Millis>,
    /// The chain instance holding it (see `Arbiter::chain_of`): only that instance's
    /// last step frees it, not the last step of an older instance of the same
    /// scenario still running beside it. Unknown for slots taken by earlier versions,
    /// which any last step of the scenario frees.
    pub chain: Option<String>,
}

/// A deferred trigger as the queue remembers it (the trigger itself is the timer's
/// payload).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Queued {
    pub scenario: String,
    pub category: Option<MessageCategory>,
    pub cause_occurred_at: Millis,
    /// The rule it waits for.
    #[serde(default)]
    pub rule: Option<String>,
    /// The trigger itself, kept for one waiting for the main-scenario slot only: when
    /// the slot frees early its timer is moved to now, which needs the payload.
    /// (Queued by an earlier version without it, such a trigger keeps its timer.)
    /// Filled for every entry of a ledger handed to the survivor of a merge.
    #[serde(default)]
    pub trigger: Option<Box<Trigger>>,
    /// When it is decided again (unknown for entries queued by earlier versions).
    #[serde(default)]
    pub wake_at: Option<Millis>,
    /// The chain instance it is a step of (see `CustomerLedger::chains`), if any.
    #[serde(default)]
    pub chain: Option<String>,
    /// Its step in that chain.
    #[serde(default)]
    pub step: i32,
    /// The deferrals so far ("rule: reason", oldest first, bounded by
    /// `REASONS_KEPT`), for the send command's reason trail.
    #[serde(default)]
    pub reasons: Vec<String>,
    /// When it began waiting for a merged customer's ledger (`MERGE_PENDING`), so the
    /// wait is bounded by `MERGE_WAIT_LIMIT`.
    #[serde(default)]
    pub merge_wait_since: Option<Millis>,
}

/// How long a trigger of a freshly merged customer waits before it is decided again.
const MERGE_WAIT: Millis = 60_000;
/// How long a trigger waits for a merged customer's ledger in all (one that came so
/// long ago that the ledger no longer lists it among those it absorbed is not coming
/// either).
const MERGE_WAIT_LIMIT: Millis = kairos_core::contracts::MERGE_WAIT_LIMIT_MS;
/// The rule of a trigger held by a running chain of higher priority.
const MAIN_SCENARIO: &str = "main_scenario";
/// How long a chain keeps the main-scenario slot after its last step was due, for
/// that step to come through the profile and the triggers topic: freed at the due
/// moment itself, a trigger waiting for the slot (its timer due then too) would go out
/// just before the chain's last step and take its channel, gap or cap. A last step
/// that never comes (the profile ended the chain) lets the waiters go this much later.
const LAST_STEP_GRACE: Millis = 10 * MINUTE;
/// A trigger waiting for another chain's slot looks again at least this often: a
/// chain switched off in the configuration lets go of its slot only when something
/// of its customer is decided, which for a quiet customer may be nothing before the
/// chain's old end (a look that changes nothing records no new decision).
const MAIN_RECHECK: Millis = HOUR;
/// The rule of that wait.
const MERGE_PENDING: &str = "merge_pending";
/// The rule of what a forgotten (anonymous, expired) customer still had waiting.
const FORGOTTEN: &str = "forgotten";

/// Makes trigger `t`, handed over by a customer merged into `customer_id` (queued or
/// cascading), this customer's: named after it and timed by its zone (as the merged
/// profile keeps it: the merged customer's, noted by a trigger fired after the
/// survivor's last one, would time this and the survivor's own waiting messages by
/// another clock), and remembered as decided. False, and nothing changed, if this
/// ledger knows it already (the merge record sent again, by another path): one trigger
/// id, one final decision, here as everywhere.
fn adopt_handed_over(
    ledger: &mut CustomerLedger,
    trigger_id: &str,
    t: &mut Trigger,
    customer_id: &str,
    now: Millis,
) -> bool {
    let h = kairos_core::ids::stable_hash(trigger_id);
    let known = ledger.queued.contains_key(trigger_id)
        || ledger.cascades.contains_key(trigger_id)
        || !remember_trigger(ledger, h, t.valid_until, now);
    if known {
        return false;
    }
    t.customer_id = customer_id.to_string();
    if let Some((_, Some(zone))) = &ledger.zone {
        t.contacts.time_zone = Some(zone.to_string());
    }
    true
}

/// The trigger timer `timer` holds and when it is due; `Err` saying what is wrong with
/// it when it is gone or does not decode. A failing store is an error of its own: no
/// answer about the trigger.
fn timer_trigger(
    ctx: &Ctx<'_>,
    timer: &str,
) -> anyhow::Result<Result<(Millis, Box<Trigger>), String>> {
    match ctx.timer_payload::<Trigger>(timer) {
        Ok(Some((due, t))) => Ok(Ok((due, Box::new(t)))),
        Ok(None) => Ok(Err("had no timer".to_string())),
        Err(e) if e.downcast_ref::<kairos_core::store::StoreError>().is_some() => Err(e),
        Err(e) => Ok(Err(format!("does not decode: {e:#}"))),
    }
}

/// The state key of a customer's ledger.
fn ledger_key(customer_id: &str) -> String {
    ["c/", customer_id].concat()
}

/// The rule of a later chain step waiting for an earlier one still in the queue.
const CHAIN_ORDER: &str = "chain_order";
/// The rule of a mass send to a customer in a personal chain.
const IN_PERSONAL_CHAIN: &str = "in_personal_chain";
/// The rule of a chain step whose earlier step expired or was cancelled.
const CHAIN_BROKEN: &str = "chain_broken";
/// The rule of a trigger whose scenario is switched off or gone from the configuration.
const SCENARIO_OFF: &str = "scenario_off";
/// How long a trigger of a scenario the configuration does not name waits for one
/// that does (a configuration rolled out to the profile first), and how often it looks.
const UNKNOWN_SCENARIO_WAIT: Millis = HOUR;
const UNKNOWN_SCENARIO_RECHECK: Millis = 5 * MINUTE;

/// Why a scenario's triggers go out no more.
enum ScenarioOff {
    Disabled(String),
    Unknown(String),
}

impl ScenarioOff {
    fn why(&self) -> String {
        match self {
            ScenarioOff::Disabled(s) => format!("scenario {s} is switched off (enabled = false)"),
            ScenarioOff::Unknown(s) => format!("scenario {s} is not in the configuration"),
        }
    }
}
/// Chain instances remembered per customer.
const CHAINS_KEPT: usize = 32;
/// Marketing messages waiting per customer at most: with caps of a few a day, more
/// would never go out in their validity, and each wait-up reads the whole queue.
const QUEUED_KEPT: usize = 100;
/// The rule of a marketing message that would have waited behind `QUEUED_KEPT` others.
const QUEUE_FULL: &str = "queue_full";
/// Deferral reasons kept per queued trigger.
const REASONS_KEPT: usize = 8;

/// Bounced addresses remembered per channel.
const BOUNCED_PER_CHANNEL: usize = 8;
/// How long the address of a send is kept for a hard bounce to find it: providers
/// report most bounces at once, some days later (the outcome carries no address).
const BOUNCE_WINDOW: Millis = 30 * DAY;

/// A moment within the quiet hours: when they end, and the customer's zone.
struct Quiet {
    until: Millis,
    tz: chrono_tz::Tz,
}

/// How far a device's clock may put an online purchase before the cart change it
/// checked out.
const PURCHASE_CLOCK_SKEW: Millis = 10 * MINUTE;

/// Timers that shrink a merged customer's forwarding ledger to its note
/// (`merged-expiry/<customer>`).
const MERGED_LEDGER_EXPIRY: &str = "merged-expiry/";

/// Timers that drop a contacts note kept for a customer the arbiter had no ledger of
/// (`contacts-expiry/<customer>`), with the ledger made for it if nothing else came.
const CONTACTS_NOTE_EXPIRY: &str = "contacts-expiry/";
/// How long such a note waits for a trigger fired before the change and read after
/// it (the triggers topic behind the actions topic). One read later goes to the
/// addresses it fired with.
const LONE_CONTACTS_KEPT: Millis = DAY;

/// Outcomes remembered per customer for deduplication: providers retry a webhook for
/// up to three days, and a customer at the default weekly cap gets six messages a
/// week, each with a delivery, an open and a click at most (18 reports): 64 reach
/// back three weeks and more.
const RECENT_OUTCOMES: usize = 64;
/// Delivery times of the messages ignored in a row remembered per customer: beyond
/// any sunset threshold in practice (a count above it stands until a reaction after
/// the oldest one remembered).
const IGNORED_KEPT: usize = 32;
/// Send ids of recent cascade steps after the first remembered per customer.
const CASCADE_FOLLOWUPS_KEPT: usize = 16;
/// Trigger ids remembered per customer whatever their valid-until: far more than any
/// redelivery after a crash brings back.
const RECENT_TRIGGERS: usize = 128;
/// Trigger ids remembered per customer at most, still valid ones included: a bound on
/// the ledger against a flood of long-valid triggers for one customer.
const TRIGGERS_KEPT: usize = 4_096;

/// Merged-ledger records remembered per customer (a merge and each trigger it handed
/// over are one each).
const MERGES_KEPT: usize = 256;

/// How many absorbed customer ids a ledger keeps: well beyond the 16 direct merges the
/// profile names in a trigger's `merged_from`, as the ids a merged customer had
/// absorbed come along too.
const ABSORBED_KEPT: usize = 64;

/// Records the trigger `h` (valid until `valid_until`) as decided; false when it was
/// decided before. Beyond the newest `RECENT_TRIGGERS`, ids of triggers past their
/// valid-until at `now` are let go (see `CustomerLedger::decided_triggers`).
fn remember_trigger(ledger: &mut CustomerLedger, h: u64, valid_until: Millis, now: Millis) -> bool {
    if !ledger.recent_triggers.is_empty() {
        // Decided by an earlier version: its valid-until is not known, so it is kept
        // as the newest `RECENT_TRIGGERS` only.
        let earlier = std::mem::take(&mut ledger.recent_triggers);
        let mut decided: Vec<(u64, Millis)> =
            earlier.into_iter().map(|h| (h, Millis::MIN)).collect();
        decided.append(&mut ledger.decided_triggers);
        ledger.decided_triggers = decided;
    }
    if ledger.has_decided(h) {
        return false;
    }
    let decided = &mut ledger.decided_triggers;
    decided.push((h, valid_until));
    if decided.len() > RECENT_TRIGGERS {
        let older = decided.len() - RECENT_TRIGGERS;
        let mut index = 0;
        decided.retain(|(_, until)| {
            index += 1;
            index > older || *until >= now
        });
        if decided.len() > TRIGGERS_KEPT {
            let excess = decided.len() - TRIGGERS_KEPT;
            decided.drain(..excess);
        }
    }
    true
}

/// Adds "rule: reason" to a queued trigger's deferrals (oldest first, bounded by
/// `REASONS_KEPT`).
fn note_reason(reasons: &mut Vec<String>, rule: &str, reason: &str) {
    if reasons.len() >= REASONS_KEPT {
        reasons.remove(0);
    }
    reasons.push([rule, ": ", reason].concat());
}

/// Adds `id` to the absorbed customers as the newest (moved there if listed already;
/// bounded by `ABSORBED_KEPT`, the oldest leaving first).
fn note_absorbed(absorbed: &mut Vec<String>, id: String) {
    absorbed.retain(|known| *known != id);
    if absorbed.len() >= ABSORBED_KEPT {
        absorbed.remove(0);
    }
    absorbed.push(id);
}

/// Adds the hash `h` to a bounded list of recent ids (oldest dropped first). Returns
/// false if it was there already: a redelivery.
fn remember(recent: &mut Vec<u64>, h: u64, limit: usize) -> bool {
    if recent.contains(&h) {
        return false;
    }
    if recent.len() >= limit {
        recent.remove(0);
    }
    recent.push(h);
    true
}

impl CustomerLedger {
    /// A marketing message delivered at `at` that counts towards the sunset.
    fn note_ignored(&mut self, at: Millis) {
        self.ignored_in_row += 1;
        let at_position = self.ignored_deliveries.partition_point(|d| *d <= at);
        self.ignored_deliveries.insert(at_position, at);
        if self.ignored_deliveries.len() > IGNORED_KEPT {
            self.ignored_deliveries.remove(0);
        }
    }

    /// The customer reacted at `at` (an open, a click, a purchase): the messages
    /// delivered before it were not ignored, and those delivered after it still
    /// count, however late the reaction is reported.
    fn reacted_at(&mut self, at: Millis) {
        // A ledger from before this field starts from its latest open or click (not its
        // purchase, which a device may have dated ahead of when it ended the row).
        let known = self.last_reacted_at.or_else(|| self.latest_engagement());
        self.last_reacted_at = Some(latest(known, at));
        ignored_row::end_row_at(
            &mut self.ignored_in_row,
            &mut self.ignored_deliveries,
            at,
            IGNORED_KEPT,
        );
    }

    /// The customer's latest reaction, as it ended the row of ignored messages (for a
    /// ledger from before that was kept: the latest open or click on any channel, or
    /// purchase).
    fn latest_reaction(&self) -> Option<Millis> {
        (self.last_reacted_at).or_else(|| self.latest_engagement().max(self.last_purchase_at))
    }

    /// The customer's latest activity for the inactivity sunset: a visit, a purchase
    /// (a till receipt too: one seen only in shops has no visit) or an opt-in (one seen
    /// only in shops long ago who subscribes now is not switched off for it). An
    /// opt-in alone, from one never seen buying or visiting, has nothing to switch off.
    fn last_activity(&self) -> Option<Millis> {
        let seen = self.last_active_at.max(self.last_purchase_at)?;
        Some(
            self.opted_in
                .iter()
                .map(|(_, at)| *at)
                .fold(seen, Millis::max),
        )
    }

    /// The purchases read that may end a trigger or a cascade: the latest of any kind,
    /// and the latest online one (`true`), which the device's clock may have dated up
    /// to `PURCHASE_CLOCK_SKEW` before what it checked out.
    fn purchases_read(&self) -> impl Iterator<Item = (Millis, bool)> {
        let any = self.last_purchase_at.map(|b| (b, false));
        let online = self.last_online_purchase_at.map(|b| (b, true));
        [any, online].into_iter().flatten()
    }

    /// The latest open or click on any channel.
    fn latest_engagement(&self) -> Option<Millis> {
        self.engagement
            .iter()
            .filter_map(|(_, e)| e.engaged_at)
            .max()
    }

    /// When the main-scenario slot frees unless the chain's last step frees it sooner:
    /// [`LAST_STEP_GRACE`] after that step was due, or after a step of the chain
    /// waiting in the queue (quiet hours, a cap) wakes.
    fn main_frees_at(&self) -> Option<Millis> {
        let m = self.main.as_ref()?;
        let queued_step = self
            .queued
            .values()
            .filter(|q| q.scenario == m.scenario && (m.chain.is_none() || q.chain == m.chain))
            .filter_map(|q| q.wake_at)
            .max();
        Some(
            m.until
                .max(queued_step.unwrap_or(m.until))
                .saturating_add(LAST_STEP_GRACE),
        )
    }

    /// A trigger is decided in the customer's newest time zone: one that waited (in the
    /// queue, or a cascade's later step) carries the zone of when it fired, and the
    /// customer may have moved since (a newer trigger said so). A trigger newer than
    /// what the ledger knows notes its zone. The same goes for the addresses: one that
    /// waited goes to those of the customer's latest change of contacts, if that came
    /// after it fired (a new e-mail address, a bounce, a new push token).
    pub fn settle_zone(&mut self, t: &mut Trigger) {
        match &self.contacts {
            // At the same instant too: the note is the newest the profile knew then.
            Some((at, contacts)) if *at >= t.fired_at => t.contacts = (**contacts).clone(),
            // Nothing that waits fired before the change: the triggers carry it.
            Some(_) if self.queued.is_empty() && self.cascades.is_empty() => {
                self.contacts = None;
            }
            _ => {}
        }
        match &self.zone {
            Some((at, zone)) if *at > t.fired_at => {
                t.contacts.time_zone = zone.as_ref().map(|z| z.to_string());
            }
            _ => {
                let zone = t.contacts.time_zone.as_deref().map(CompactString::from);
                self.zone = Some((t.fired_at, zone));
            }
        }
    }

    /// Counts a send of `t` on `channel` at `now` towards the caps, the gap, the
    /// conflict window and the per-scenario caps.
    fn count_send(&mut self, now: Millis, channel: Channel, t: &Trigger) {
        self.sends.push((now, channel, t.category));
        self.scenario_sends.push((now, t.scenario.as_str().into()));
    }

    /// Notes that the customer left `segment` at `at` (the latest time is kept).
    fn note_left_segment(&mut self, segment: &str, at: Millis) {
        let known = self.left_segments.get(segment).copied();
        self.left_segments.insert(segment.into(), latest(known, at));
    }

    /// Times of the sends that count against caps and the gap (all but transactional).
    fn capped_send_times(&self) -> Vec<Millis> {
        self.sends
            .iter()
            .filter(|(_, _, c)| *c != MessageCategory::transactional)
            .map(|(at, _, _)| *at)
            .collect()
    }

    /// Folds in the ledger of a customer merged into this one: its sends count
    /// against the caps from now on, and every suppression holds, except an
    /// unsubscribe that an opt-in of either id came after: both ids are one person,
    /// whose latest word on a channel counts, as it does without a merge.
    pub fn absorb(&mut self, other: CustomerLedger) {
        // Both rows of ignored messages, up to the later customer's latest reaction.
        let rows = [&*self, &other].map(|l| ignored_row::Row {
            count: l.ignored_in_row,
            delivered_at: &l.ignored_deliveries,
            reacted_at: l.latest_reaction(),
        });
        let reacted_at = rows[0].reacted_at.max(rows[1].reacted_at);
        let ignored = ignored_row::merge_rows(rows[0], rows[1], reacted_at, IGNORED_KEPT);
        // As the profile's merge: the survivor's zone, the merged customer's only where
        // the survivor has none.
        let named = |z: &Option<(Millis, Option<CompactString>)>| {
            z.as_ref().is_some_and(|(_, zone)| zone.is_some())
        };
        if !named(&self.zone) && named(&other.zone) {
            self.zone = other.zone;
        }
        // The survivor's note stands (the merged profile keeps the survivor's addresses
        // first); the merged customer's is of an id that is gone.
        self.sends.extend(other.sends);
        self.sends.sort_by_key(|(at, _, _)| *at);
        self.scenario_sends.extend(other.scenario_sends);
        self.scenario_sends.sort_by_key(|(at, _)| *at);
        self.sent_to.extend(other.sent_to);
        // The later unsubscribe holds longer against an opt-in between the two.
        for (channel, at) in other.unsubscribed {
            let mine = self.unsubscribed.entry(channel).or_insert(at);
            *mine = (*mine).max(at);
        }
        for (channel, at) in other.opted_in {
            let mine = self.opted_in.entry(channel).or_insert(at);
            *mine = (*mine).max(at);
        }
        // An unsubscribe at the instant of an opt-in wins, as in `apply_outcome`.
        let opted_in = &self.opted_in;
        self.unsubscribed
            .retain(|channel, at| opted_in.get(channel).is_none_or(|opt_in| *opt_in <= *at));
        for (channel, address) in other.hard_bounced {
            self.add_bounced(channel, address);
        }
        for (channel, addresses) in other.bounced {
            for address in addresses {
                self.add_bounced(channel, address);
            }
        }
        self.complained_at = match (self.complained_at, other.complained_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_purchase_at = self.last_purchase_at.max(other.last_purchase_at);
        self.last_online_purchase_at =
            (self.last_online_purchase_at).max(other.last_online_purchase_at);
        self.last_active_at = self.last_active_at.max(other.last_active_at);
        for (segment, left) in other.left_segments.iter() {
            self.note_left_segment(segment, *left);
        }
        for (offer, at) in other.offers {
            let mine = self.offers.entry(offer).or_insert(at);
            *mine = (*mine).max(at);
        }
        (self.ignored_in_row, self.ignored_deliveries) = ignored;
        self.last_reacted_at = reacted_at;
        for (channel, e) in other.engagement {
            let mine = self.engagement.entry(channel).or_default();
            mine.engaged_at = mine.engaged_at.max(e.engaged_at);
            mine.ignored_in_row = mine.ignored_in_row.max(e.ignored_in_row);
        }
        for h in other.recent_outcomes {
            remember(&mut self.recent_outcomes, h, RECENT_OUTCOMES);
        }
        // A cascade's later steps count once towards the sunset here too: their
        // deliveries may come after the merge.
        for h in other.cascade_followups {
            remember(&mut self.cascade_followups, h, CASCADE_FOLLOWUPS_KEPT);
        }
        // Whom the merged customer had absorbed is in this ledger now too: a trigger
        // of this customer naming them (after a chain of merges) need not wait.
        for id in other.absorbed {
            note_absorbed(&mut self.absorbed, id);
        }
        // The merged customer's chains go on here (their queued steps are handed over
        // and the profile carries the later ones): the further one of each counts.
        for (chain, theirs) in other.chains {
            let mine = self.chains.entry(chain).or_insert(theirs);
            if theirs.step > mine.step {
                *mine = theirs;
            }
        }
        self.forget_oldest_chains();
    }

    /// Whether the trigger with id hash `h` was decided (see `decided_triggers`), by
    /// this version or an earlier one.
    fn has_decided(&self, h: u64) -> bool {
        self.decided_triggers.iter().any(|(seen, _)| *seen == h)
            || self.recent_triggers.contains(&h)
    }

    /// Keeps the `CHAINS_KEPT` chains changed last.
    fn forget_oldest_chains(&mut self) {
        while self.chains.len() > CHAINS_KEPT {
            let oldest = self
                .chains
                .iter()
                .min_by_key(|(_, p)| p.updated_at)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(oldest) => self.chains.remove(&oldest),
                None => break,
            };
        }
    }

    /// Remembers the outcome's id; false for one seen before, unless it is an
    /// unsubscribe or a complaint: those apply however often they come (once more
    /// changes nothing, and an outcome id names the send and the kind only, so a
    /// second unsubscribe from one message, after a new opt-in, carries the first
    /// one's id).
    fn note_outcome(&mut self, o: &Outcome) -> bool {
        let h = kairos_core::ids::stable_hash(&o.outcome_id);
        let first = remember(&mut self.recent_outcomes, h, RECENT_OUTCOMES);
        first || matches!(o.kind, OutcomeKind::unsubscribed | OutcomeKind::complained)
    }

    /// Folds a delivery or engagement outcome into the suppressions and the sunset
    /// count. Returns false for an outcome already applied (an unsubscribe or a
    /// complaint is applied again, see below).
    pub fn apply_outcome(&mut self, o: &Outcome, address: Option<String>) -> bool {
        if !self.note_outcome(o) {
            return false;
        }
        match o.kind {
            // A delivery reported after an open or click of the channel at or after it
            // (webhooks come in any order) is not a message ignored.
            OutcomeKind::delivered
                if self
                    .engagement
                    .get(&o.channel)
                    .and_then(|e| e.engaged_at)
                    .is_some_and(|engaged| engaged >= o.occurred_at) => {}
            OutcomeKind::delivered if o.category != MessageCategory::transactional => {
                let followup = self
                    .cascade_followups
                    .contains(&kairos_core::ids::stable_hash(&o.send_id));
                // Not ignored if the customer opened or clicked at or after it on
                // another channel (reported before this delivery). (A purchase's
                // time is the device's, which may run ahead: not weighed here.)
                let reacted = self
                    .engagement
                    .values()
                    .filter_map(|e| e.engaged_at)
                    .any(|r| r >= o.occurred_at);
                if !followup && !reacted {
                    self.note_ignored(o.occurred_at);
                }
                self.engagement.entry(o.channel).or_default().ignored_in_row += 1;
            }
            OutcomeKind::opened | OutcomeKind::clicked => {
                self.reacted_at(o.occurred_at);
                let e = self.engagement.entry(o.channel).or_default();
                e.engaged_at = Some(latest(e.engaged_at, o.occurred_at));
                e.ignored_in_row = 0;
            }
            // An unsubscribe at the same time as an opt-in wins (as a withdrawal does);
            // the latest one is kept, so an opt-in between two, arriving last, ends
            // only the first.
            OutcomeKind::unsubscribed
                if self
                    .opted_in
                    .get(&o.channel)
                    .is_none_or(|opt_in| o.occurred_at >= *opt_in) =>
            {
                let known = self.unsubscribed.get(&o.channel).copied();
                self.unsubscribed
                    .insert(o.channel, latest(known, o.occurred_at));
            }
            OutcomeKind::bounced_hard => {
                if let Some(address) = address {
                    self.add_bounced(o.channel, address);
                }
            }
            OutcomeKind::complained => {
                self.complained_at.get_or_insert(o.occurred_at);
            }
            _ => {}
        }
        true
    }

    /// Records a hard bounce of `address` on `channel`: `hard_bounced` keeps the
    /// latest (as earlier versions read it), `bounced` all of them (bounded).
    fn add_bounced(&mut self, channel: Channel, address: String) {
        let set = self.bounced.entry(channel).or_default();
        // One bounced before `bounced` existed is only in `hard_bounced`.
        if let Some(older) = self.hard_bounced.get(&channel) {
            if !set.contains(older) {
                set.push(older.clone());
            }
        }
        set.retain(|a| *a != address);
        set.push(address.clone());
        if set.len() > BOUNCED_PER_CHANNEL {
            set.remove(0);
        }
        self.hard_bounced.insert(channel, address);
    }

    /// Why `channel` must not be used for this customer at `address`, if it must not.
    fn channel_block(&self, channel: Channel, address: Option<&str>) -> Option<&'static str> {
        if self.unsubscribed.contains_key(&channel) {
            return Some("unsubscribed");
        }
        let address = address?;
        // Bounces stored before e-mail domains were normalized keep the Unicode form.
        let same = |b: &String| kairos_core::identifiers::same_address(b, address);
        let bounced = self.hard_bounced.get(&channel).is_some_and(same)
            || self
                .bounced
                .get(&channel)
                .is_some_and(|set| set.iter().any(same));
        bounced.then_some("hard_bounce")
    }
}

/// What the arbiter consumes.
pub enum ArbiterInput {
    Trigger(Box<Trigger>),
    Outcome(Box<Outcome>),
    Action(Box<CustomerAction>),
}

/// How long sends are remembered: the longest cap window.
const WEEK: Millis = 7 * DAY;

pub struct ArbiterProcessor {
    config: Arc<Config>,
    default_zone: chrono_tz::Tz,
    triggers_topic: String,
    outcomes_topic: String,
    actions_topic: String,
    decisions_topic: String,
    /// The send topic of each channel (named once, not per send).
    send_topics: BTreeMap<Channel, String>,
    decisions: metrics::CachedCounterVec,
    end_to_end: Histogram,
    /// Outcomes of customers merged away, sent on to their survivors.
    outcomes_forwarded: prometheus::IntCounter,
    /// Hot ledgers, written back when the batch commits.
    ledgers: StateCache<CustomerLedger>,
}

impl ArbiterProcessor {
    pub fn new(config: Arc<Config>, registry: &prometheus::Registry) -> Self {
        let processor = ArbiterProcessor {
            default_zone: calendar::zone(Some(&config.arbiter.default_time_zone)),
            triggers_topic: config.topic(topics::TRIGGERS),
            outcomes_topic: config.topic(topics::OUTCOMES),
            actions_topic: config.topic(topics::CUSTOMER_ACTIONS),
            decisions_topic: config.topic(topics::DECISIONS),
            send_topics: Channel::ALL
                .iter()
                .map(|c| (*c, config.send_topic(*c)))
                .collect(),
            decisions: metrics::cached_counter_vec(
                registry,
                "kairos_arbiter_decisions_total",
                "Arbiter decisions, by outcome and the rule that made them.",
                &["outcome", "rule"],
            ),
            end_to_end: metrics::histogram(
                registry,
                "kairos_end_to_end_latency_seconds",
                "From the customer event that caused a trigger (or when a waiting scenario was due) to its send command, for sends not held back by the policy.",
                vec![
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0,
                ],
            ),
            outcomes_forwarded: metrics::counter(
                registry,
                "kairos_arbiter_outcomes_forwarded_total",
                "Outcomes of customers merged away (suppressions, deliveries, opens, clicks), sent on to their survivors' ledgers.",
            ),
            ledgers: StateCache::new(config.state.cache_entries, config.kafka.partitions)
                .encoding_first_changes(),
            config,
        };
        for (outcome, rule) in DECISION_RULES {
            processor.decisions.touch(&[outcome.as_str(), rule]);
        }
        processor
    }

    /// The customer's time zone, or the configured default.
    fn zone_of(&self, t: &Trigger) -> chrono_tz::Tz {
        calendar::zone_or(t.contacts.time_zone.as_deref(), self.default_zone)
    }

    fn in_control_group(&self, customer_id: &str) -> bool {
        let pct = f64::from(self.config.arbiter.control_group_percent) / 100.0;
        stable_fraction(&[&self.config.arbiter.control_group_salt, customer_id]) < pct
    }

    /// The scenario's own holdout, drawn independently of the global control group.
    fn in_scenario_holdout(&self, scenario: &str, customer_id: &str) -> Option<u8> {
        let pct = self
            .config
            .scenarios
            .iter()
            .find(|s| s.name == scenario)
            .map_or(0, |s| s.holdout_percent);
        let salt = &self.config.arbiter.control_group_salt;
        (pct > 0
            && stable_fraction(&[salt, "holdout", scenario, customer_id]) < f64::from(pct) / 100.0)
            .then_some(pct)
    }

    /// `chain` is `chain_of(t)` and `offers` is `offers_of(t)`, worked out once per
    /// decision by the caller.
    fn decide(
        &self,
        ctx: &mut Ctx<'_>,
        t: &Trigger,
        ledger: &mut CustomerLedger,
        chain: Option<&str>,
        offers: &[String],
    ) -> Verdict {
        let now = ctx.now();
        if t.valid_until < now {
            return Verdict::no(
                DecisionOutcome::expired,
                "valid_until",
                format!("valid until {} but decided at {now}", t.valid_until),
            );
        }
        match self.switched_off(&t.scenario) {
            // A configuration rolled out to the profile before the arbiter: its new
            // scenario's triggers wait for the arbiter's restart, for a while.
            Some(off @ ScenarioOff::Unknown(_))
                if now < t.fired_at.saturating_add(UNKNOWN_SCENARIO_WAIT) =>
            {
                return Verdict::defer(
                    (now + UNKNOWN_SCENARIO_RECHECK).min(t.fired_at + UNKNOWN_SCENARIO_WAIT),
                    SCENARIO_OFF,
                    format!(
                        "{}; waiting until {} for a configuration that has it",
                        off.why(),
                        kairos_core::time::format_millis(t.fired_at + UNKNOWN_SCENARIO_WAIT)
                    ),
                );
            }
            Some(off) => return Verdict::no(DecisionOutcome::cancelled, SCENARIO_OFF, off.why()),
            None => {}
        }
        if let Some(pending) = t.merged_from.iter().find(|m| !ledger.absorbed.contains(m)) {
            // Decided without the merged customer's sends and suppressions, this could
            // break a cap or an unsubscribe: wait for its ledger (it is on its way).
            let since = ledger
                .queued
                .get(&t.trigger_id)
                .and_then(|q| q.merge_wait_since);
            if since.is_none_or(|since| now - since < MERGE_WAIT_LIMIT) {
                return Verdict::defer(
                    now + MERGE_WAIT,
                    MERGE_PENDING,
                    format!("waiting for the state of {pending}, merged into this customer"),
                );
            }
            tracing::warn!(
                customer = %t.customer_id,
                trigger = %t.trigger_id,
                merged = %pending,
                "the merged customer's ledger did not come within an hour: the trigger is \
                 decided without it"
            );
        }
        let progress = chain
            .and_then(|c| ledger.chains.get(c).copied())
            .filter(|p| t.step > 0 && p.step < t.step);
        if let Some(p) = progress.filter(|p| p.broken) {
            return Verdict::no(
                DecisionOutcome::cancelled,
                CHAIN_BROKEN,
                format!(
                    "step {} of this {} chain expired or was cancelled: no later step goes out",
                    p.step, t.scenario
                ),
            );
        }
        if let Some(bought) =
            self.purchase_read_ending(ledger, (&t.scenario, t.step), t.cause_occurred_at)
        {
            let when = match bought >= t.cause_occurred_at {
                true => "after the trigger's cause",
                false => "within the device clock's allowance before the trigger's cause",
            };
            return Verdict::no(
                DecisionOutcome::cancelled,
                "purchase_exclusion",
                format!("the customer bought at {bought}, {when}"),
            );
        }
        if let Some((rule, why)) = self.returned_or_left_since(ledger, t) {
            return Verdict::no(DecisionOutcome::cancelled, rule, why);
        }
        let marketing = t.category != MessageCategory::transactional;
        let a = &self.config.arbiter;
        if t.category == MessageCategory::promo {
            if let Some(at) = ledger.complained_at {
                return Verdict::no(
                    DecisionOutcome::suppressed,
                    "complaint",
                    complaint_reason(at),
                );
            }
            if let Some(reason) = self.purchase_pause(now, ledger) {
                return Verdict::no(DecisionOutcome::suppressed, "pause_after_purchase", reason);
            }
            let inactive = ms(a.sunset_inactive_after);
            if let Some(active) = ledger
                .last_activity()
                .filter(|v| inactive > 0 && now - v > inactive)
            {
                return Verdict::no(
                    DecisionOutcome::suppressed,
                    "sunset_inactive",
                    format!(
                        "no visit, purchase or opt-in since {active}, longer than {:?}",
                        a.sunset_inactive_after
                    ),
                );
            }
            if a.sunset_after_ignored > 0 && ledger.ignored_in_row >= a.sunset_after_ignored {
                return Verdict::no(
                    DecisionOutcome::suppressed,
                    "sunset",
                    format!(
                        "the customer ignored the last {} messages (sunset after {})",
                        ledger.ignored_in_row, a.sunset_after_ignored
                    ),
                );
            }
        }
        let repeat_window = a.offer_repeat_window.as_millis() as Millis;
        ledger.offers.retain(|_, at| now - *at < repeat_window);
        for offer in offers {
            if let Some(at) = ledger.offers.get(offer).filter(|_| marketing) {
                return Verdict::no(
                    DecisionOutcome::suppressed,
                    "offer_repeat",
                    format!(
                        "offer {offer:?} went to the customer at {at}, within {:?}",
                        a.offer_repeat_window
                    ),
                );
            }
        }
        ledger.sends.retain(|(at, _, _)| now - at < WEEK);
        ledger.scenario_sends.retain(|(at, _)| now - at < WEEK);
        ledger
            .sent_to
            .retain(|_, (at, _)| now - *at < BOUNCE_WINDOW);
        // A chain past its end holds the slot no more (one switched off or removed
        // let go of it before the decision: see `decide_with_ledger`).
        if ledger
            .main_frees_at()
            .is_some_and(|frees_at| frees_at <= now)
        {
            ledger.main = None;
        }
        if let (Some(main), true) = (&ledger.main, marketing && self.is_mass(&t.scenario)) {
            if main.scenario != t.scenario && !self.is_mass(&main.scenario) {
                return Verdict::no(
                    DecisionOutcome::suppressed,
                    IN_PERSONAL_CHAIN,
                    format!(
                        "the customer is in the personal {} chain until {}: no mass send",
                        main.scenario, main.until
                    ),
                );
            }
        }
        if let (Some(main), true) = (&ledger.main, marketing) {
            if main.scenario != t.scenario && t.priority <= main.priority {
                let reason = format!(
                    "the {} chain (priority {}) holds the customer until {}; this trigger has priority {}",
                    main.scenario, main.priority, main.until, t.priority
                );
                let frees_at = ledger.main_frees_at().unwrap_or(main.until);
                return match a.lower_priority {
                    LowerPriority::Wait => {
                        Verdict::defer(frees_at.min(now + MAIN_RECHECK), MAIN_SCENARIO, reason)
                    }
                    LowerPriority::Drop => {
                        Verdict::no(DecisionOutcome::suppressed, MAIN_SCENARIO, reason)
                    }
                };
            }
        }
        if let Some(chain) = chain.filter(|_| t.step > 0) {
            if let Some(v) = self.chain_pacing(now, t, chain, progress, ledger) {
                return v;
            }
        }
        if marketing {
            if let Some(v) = self.pacing(now, t, ledger) {
                return v;
            }
        }
        let verdict = self.choose_channel(now, t, ledger);
        // The control group and the holdouts are drawn at the point of sending, after
        // every suppression and deferral: both groups lose the same triggers and wait
        // alike, so lift stays comparable.
        if marketing && verdict.outcome == DecisionOutcome::sent {
            if let Some(held) = self.held_out(t) {
                // Counted against the caps, the gap and the conflict window as the send
                // it stands for: a control customer is held out of as many triggers as
                // a treated one gets sends, not of every one a cap would have stopped.
                if let Some(channel) = verdict.channel {
                    ledger.count_send(now, channel, t);
                }
                return held;
            }
        }
        verdict
    }

    /// The hold-out of a marketing message that would go out: the global control
    /// group, then the scenario's own holdout.
    /// When `t` was due to go out: at its cause for a scenario that answers an event
    /// at once (a welcome, an order update, a price drop), when the profile fired it
    /// for one that waits (a delay, a chain's later step, a date).
    fn due_at(&self, t: &Trigger) -> Millis {
        use kairos_core::config::ScenarioKind as Kind;
        let waits = self.config.scenario(&t.scenario).is_none_or(|s| {
            t.step > 0
                || !s.delay.is_zero()
                || matches!(
                    s.kind,
                    Kind::Birthday
                        | Kind::RegistrationAnniversary
                        | Kind::SubscriptionEnding
                        | Kind::Reactivation
                )
        });
        if waits {
            t.fired_at
        } else {
            t.cause_occurred_at
        }
    }

    /// Why no promo may go out now, if the customer bought within the pause.
    fn purchase_pause(&self, now: Millis, ledger: &CustomerLedger) -> Option<String> {
        let pause = &self.config.arbiter.pause_after_purchase;
        // Zero turns the pause off, also for a purchase a device dated ahead of now.
        let bought =
            (ledger.last_purchase_at).filter(|b| !pause.is_zero() && now - b < ms(*pause))?;
        Some(format!(
            "no promo within {pause:?} of a purchase (bought at {bought})"
        ))
    }

    fn held_out(&self, t: &Trigger) -> Option<Verdict> {
        if self.in_control_group(&t.customer_id) {
            return Some(Verdict::no(
                DecisionOutcome::held_out,
                "control_group",
                format!(
                    "customer is in the {}% global control group",
                    self.config.arbiter.control_group_percent
                ),
            ));
        }
        self.in_scenario_holdout(&t.scenario, &t.customer_id)
            .map(|pct| {
                Verdict::no(
                    DecisionOutcome::held_out,
                    "scenario_holdout",
                    format!("customer is in the scenario's {pct}% holdout"),
                )
            })
    }

    /// The chain instance a trigger is a step of: its scenario and cause, for a
    /// scenario with later steps.
    fn chain_of(&self, t: &Trigger) -> Option<String> {
        self.config
            .scenario(&t.scenario)
            .filter(|s| !s.steps.is_empty())?;
        Some(match &t.cause_event_id {
            Some(cause) => [t.scenario.as_str(), "/", cause].concat(),
            None => format!("{}/{}", t.scenario, t.cause_occurred_at),
        })
    }

    /// A later step of a chain waits behind an earlier step still in the queue, and
    /// goes out no sooner than the chain's spacing after the step before it: steps
    /// held back together (behind a chain of higher priority, by an outage) do not
    /// pile up.
    fn chain_pacing(
        &self,
        now: Millis,
        t: &Trigger,
        chain: &str,
        progress: Option<ChainProgress>,
        ledger: &CustomerLedger,
    ) -> Option<Verdict> {
        let earlier = ledger
            .queued
            .iter()
            .filter(|(id, q)| {
                **id != t.trigger_id && q.chain.as_deref() == Some(chain) && q.step < t.step
            })
            .map(|(_, q)| (q.step, q.wake_at.unwrap_or(now)))
            .min_by_key(|(step, _)| *step);
        if let Some((step, wake)) = earlier {
            // Just after it, so that the earlier step is decided first; a wake-up
            // already past (its timer about to fire) is waited for a second at a time.
            let until = if wake >= now { wake + 1 } else { now + 1_000 };
            return Some(Verdict::defer(
                until,
                CHAIN_ORDER,
                format!("step {step} of this chain is still waiting (until {wake})"),
            ));
        }
        // From the latest step that went out: a step between that did not (its
        // customer unreachable then) adds its delay, so steps held back together do
        // not go out back to back.
        let (step, sent_at) = progress.and_then(|p| p.last_went_out())?;
        let spacing = self
            .config
            .scenario(&t.scenario)
            .map_or(Duration::ZERO, |s| {
                // Bounded by the scenario's steps, whatever step a trigger claims.
                let last = t.step.min(i32::try_from(s.steps.len()).unwrap_or(i32::MAX));
                (step + 1..=last)
                    .filter_map(|k| s.steps.get(usize::try_from(k - 1).ok()?))
                    .map(|s| s.delay)
                    .sum()
            });
        // The minimum gap is a marketing rule: a transactional chain (a notice, then
        // its reminder ten minutes on) keeps only its own delays.
        let spacing = match t.category {
            MessageCategory::transactional => spacing,
            _ => spacing.max(self.config.arbiter.min_gap),
        };
        let due = sent_at + ms(spacing);
        (now < due).then(|| {
            Verdict::defer(
                due,
                "chain_spacing",
                format!(
                    "step {step} of this chain went out at {sent_at}; step {} is due {spacing:?} after it",
                    t.step
                ),
            )
        })
    }

    /// A marketing chain with steps still to come becomes the main scenario (a higher
    /// priority one took the slot from any other, see `decide`); its last step frees it.
    /// True if the slot now frees sooner than it did (a last step sent before the end
    /// its first send promised, a chain that ends sooner taking it): the triggers
    /// waiting for it wake at that older end and must be woken.
    ///
    /// Two instances of one chain may run side by side (a second order starts the
    /// post-purchase series while the first one's last step waits): the slot stays
    /// with whichever ends later, and only its own last step frees it.
    fn hold_main_scenario(
        &self,
        now: Millis,
        t: &Trigger,
        chain: Option<&str>,
        ledger: &mut CustomerLedger,
    ) -> bool {
        if t.category == MessageCategory::transactional {
            return false;
        }
        let held_until = ledger.main_frees_at();
        let remaining = self
            .config
            .scenario(&t.scenario)
            .map_or(Duration::ZERO, |s| {
                s.remaining_after(t.step.max(0) as usize)
            });
        let other_instance = |m: &MainScenario| {
            m.scenario == t.scenario && m.chain.is_some() && m.chain.as_deref() != chain
        };
        if remaining > Duration::ZERO {
            let until = now + remaining.as_millis() as Millis;
            let kept_by_a_later_instance = ledger
                .main
                .as_ref()
                .is_some_and(|m| other_instance(m) && m.until >= until);
            if !kept_by_a_later_instance {
                ledger.main = Some(MainScenario {
                    scenario: t.scenario.clone(),
                    priority: t.priority,
                    until,
                    cause_occurred_at: Some(t.cause_occurred_at),
                    chain: chain.map(str::to_string),
                });
            }
        } else if ledger
            .main
            .as_ref()
            .is_some_and(|m| m.scenario == t.scenario && !other_instance(m))
        {
            ledger.main = None;
        }
        match (held_until, ledger.main_frees_at()) {
            // Freed (also by a last step that waited in the queue past the slot's
            // end): what waited for it goes now.
            (Some(_), None) => true,
            (Some(held), Some(frees_at)) => frees_at < held,
            (None, _) => false,
        }
    }

    fn is_mass(&self, scenario: &str) -> bool {
        self.config.scenario(scenario).is_some_and(|s| s.mass)
    }

    /// The rule and reason that end `t` because the customer came back (a reactivation)
    /// or left the segment it targets after its cause, as read in `ledger`.
    fn returned_or_left_since(
        &self,
        ledger: &CustomerLedger,
        t: &Trigger,
    ) -> Option<(&'static str, String)> {
        // Strictly later: a visit at the cause time is the last visit that caused the
        // trigger (the profile reports one per day), not a return.
        if let Some(active) = ledger
            .last_active_at
            .filter(|v| *v > t.cause_occurred_at && self.is_reactivation(&t.scenario))
        {
            let why = format!("the customer came back at {active}, after the trigger's cause");
            return Some(("became_active", why));
        }
        let (segment, left) = self.segment_left_since(ledger, t)?;
        let why = format!("the customer left {segment} at {left}, after the trigger's cause");
        Some(("left_segment", why))
    }

    /// The segment a `segment_entered` trigger was for, with when the customer left
    /// it, if that was after the trigger's cause.
    fn segment_left_since(&self, ledger: &CustomerLedger, t: &Trigger) -> Option<(&str, Millis)> {
        let scenario = self.config.scenario(&t.scenario)?;
        if scenario.kind != ScenarioKind::SegmentEntered {
            return None;
        }
        let target = scenario.segment.as_deref()?;
        let left = *ledger.left_segments.get(target)?;
        (left > t.cause_occurred_at).then_some((target, left))
    }

    /// Why nothing of `scenario` goes out any more, if so: switched off (a template
    /// being fixed) or gone from the configuration, while its triggers were on the
    /// topic, in the queue or in a cascade. Sent anyway, they would go out with the
    /// template being fixed, or without the scenario's purchase exclusion and holdout.
    fn switched_off(&self, scenario: &str) -> Option<ScenarioOff> {
        match self.config.scenario(scenario) {
            Some(s) if s.enabled => None,
            Some(_) => Some(ScenarioOff::Disabled(scenario.to_string())),
            None => Some(ScenarioOff::Unknown(scenario.to_string())),
        }
    }

    fn is_reactivation(&self, scenario: &str) -> bool {
        self.config
            .scenario(scenario)
            .is_some_and(|s| s.kind == ScenarioKind::Reactivation)
    }

    /// Whether a purchase at `bought` ends step `step` of `scenario` caused at
    /// `cause`: one at or after the cause, or strictly after it for reactivation, whose
    /// cause is the customer's last activity, possibly that very purchase.
    fn purchase_ends(&self, (scenario, step): (&str, i32), cause: Millis, bought: Millis) -> bool {
        let ends = self
            .config
            .scenario(scenario)
            .is_some_and(|s| s.step_ends_on_purchase(usize::try_from(step).unwrap_or_default()));
        ends && (bought > cause || (bought == cause && !self.is_reactivation(scenario)))
    }

    /// `purchase_ends`, and for an online purchase (`online`) also a cart or browse
    /// reminder caused up to `PURCHASE_CLOCK_SKEW` after it: the device's clock may
    /// put the checkout a little before the cart change it checked out.
    fn purchase_ends_allowing_skew(
        &self,
        (scenario, step): (&str, i32),
        cause: Millis,
        (bought, online): (Millis, bool),
    ) -> bool {
        self.purchase_ends((scenario, step), cause, bought)
            || (online
                && self.is_restartable_wait(scenario)
                && self.ends_on_purchase(scenario)
                && cause <= bought.saturating_add(PURCHASE_CLOCK_SKEW))
    }

    /// The purchase already read that ends step `step` of `scenario` caused at
    /// `cause` (see `purchase_ends_allowing_skew`), if one does: the same answer as
    /// the purchase gives when it is read after the trigger.
    fn purchase_read_ending(
        &self,
        ledger: &CustomerLedger,
        (scenario, step): (&str, i32),
        cause: Millis,
    ) -> Option<Millis> {
        ledger
            .purchases_read()
            .find(|bought| self.purchase_ends_allowing_skew((scenario, step), cause, *bought))
            .map(|(b, _)| b)
    }

    /// A cart or browse reminder (see `ScenarioKind::is_restartable_wait`).
    fn is_restartable_wait(&self, scenario: &str) -> bool {
        self.config
            .scenario(scenario)
            .is_some_and(|s| s.kind.is_restartable_wait())
    }

    fn ends_on_purchase(&self, scenario: &str) -> bool {
        self.config
            .scenario(scenario)
            .is_some_and(|s| s.ends_on_purchase())
    }

    /// Quiet hours, the minimum gap and the caps: a message that must wait is deferred
    /// to the moment the rule allows it (never dropped for that alone).
    fn pacing(&self, now: Millis, t: &Trigger, ledger: &CustomerLedger) -> Option<Verdict> {
        if let Some(v) = self.quiet_hours(now, t) {
            return Some(v);
        }
        let a = &self.config.arbiter;
        let sent = ledger.capped_send_times();
        let gap = a.min_gap.as_millis() as Millis;
        if let Some(last) = sent
            .iter()
            .max()
            .filter(|last| gap > 0 && now - **last < gap)
        {
            return Some(Verdict::defer(
                last + gap,
                "min_gap",
                format!(
                    "the last message went out at {last}; the minimum gap is {:?}",
                    a.min_gap
                ),
            ));
        }
        self.caps(now, t, ledger, &sent)
    }

    /// The overall, category and scenario caps (the channel caps are part of the
    /// channel choice), given the times of the marketing messages `sent`: the deferral
    /// until a slot frees, if one is reached.
    fn caps(
        &self,
        now: Millis,
        t: &Trigger,
        ledger: &CustomerLedger,
        sent: &[Millis],
    ) -> Option<Verdict> {
        let a = &self.config.arbiter;
        let tz = self.zone_of(t);
        let overall = CapConfig {
            daily_cap: Some(a.daily_cap),
            weekly_cap: Some(a.weekly_cap),
        };
        if let Some(cap) = cap_reached(now, tz, sent, &overall) {
            let rule = if cap.daily {
                "frequency_cap_daily"
            } else {
                "frequency_cap_weekly"
            };
            return Some(Verdict::defer(
                cap.until,
                rule,
                cap.describe("messages", tz),
            ));
        }
        let defer_at_cap = |limits: &CapConfig, times: Vec<Millis>, rule, what: String| {
            cap_reached(now, tz, &times, limits)
                .map(|cap| Verdict::defer(cap.until, rule, cap.describe(&what, tz)))
        };
        if let Some(limits) = a.category_caps.get(&t.category) {
            let same = ledger.sends.iter().filter(|(_, _, c)| *c == t.category);
            let verdict = defer_at_cap(
                limits,
                same.map(|(at, _, _)| *at).collect(),
                "category_cap",
                format!("{:?} messages", t.category),
            );
            if verdict.is_some() {
                return verdict;
            }
        }
        let scenario_caps = self
            .config
            .scenario(&t.scenario)
            .and_then(|s| s.caps.as_ref());
        if let Some(limits) = scenario_caps {
            let same = ledger
                .scenario_sends
                .iter()
                .filter(|(_, s)| *s == t.scenario);
            return defer_at_cap(
                limits,
                same.map(|(at, _)| *at).collect(),
                "scenario_cap",
                format!("{} messages", t.scenario),
            );
        }
        None
    }

    /// Channels of `usable` still under their own caps, or the deferral when caps
    /// leave none.
    fn under_channel_caps(
        &self,
        now: Millis,
        t: &Trigger,
        ledger: &CustomerLedger,
        usable: Vec<Channel>,
    ) -> Result<Vec<Channel>, Verdict> {
        let caps = &self.config.arbiter.channel_caps;
        if caps.is_empty() || t.category == MessageCategory::transactional || usable.is_empty() {
            return Ok(usable);
        }
        let tz = self.zone_of(t);
        let mut earliest: Option<(Millis, String)> = None;
        let mut open = Vec::new();
        for c in usable {
            let Some(limits) = caps.get(&c) else {
                open.push(c);
                continue;
            };
            let sent: Vec<Millis> = ledger
                .sends
                .iter()
                .filter(|(_, ch, cat)| *ch == c && *cat != MessageCategory::transactional)
                .map(|(at, _, _)| *at)
                .collect();
            match cap_reached(now, tz, &sent, limits) {
                None => open.push(c),
                Some(cap) => {
                    if earliest.as_ref().is_none_or(|(u, _)| cap.until < *u) {
                        let what = format!("{} messages", c.as_str());
                        earliest = Some((cap.until, cap.describe(&what, tz)));
                    }
                }
            }
        }
        match (open.is_empty(), earliest) {
            (true, Some((until, reason))) => Err(Verdict::defer(until, "channel_cap", reason)),
            _ => Ok(open),
        }
    }

    /// `at`, or the end of the quiet hours it falls in for a marketing message: what
    /// wakes then would only wait again.
    fn outside_quiet_hours(&self, at: Millis, t: &Trigger) -> Millis {
        if t.category == MessageCategory::transactional {
            return at;
        }
        self.quiet_until(at, t).map_or(at, |quiet| quiet.until)
    }

    /// When the quiet hours `now` falls in end in the customer's zone; `None` outside
    /// them.
    fn quiet_until(&self, now: Millis, t: &Trigger) -> Option<Quiet> {
        let tz = self.zone_of(t);
        let (start, end) = self.config.arbiter.quiet_hours()?;
        let local = calendar::local_time(now, tz)?;
        if !calendar::within_window(local, start, end) {
            return None;
        }
        // Fail closed: a local time the zone cannot map waits an hour.
        let until = calendar::next_local_time(now, tz, end).unwrap_or(now + HOUR);
        Some(Quiet { until, tz })
    }

    /// Quiet hours in the customer's zone: wait until they end.
    fn quiet_hours(&self, now: Millis, t: &Trigger) -> Option<Verdict> {
        let Quiet { until, tz } = self.quiet_until(now, t)?;
        let (start, end) = self.config.arbiter.quiet_hours()?;
        // Only for the reason: the check itself formats nothing.
        let local = calendar::local_time(now, tz)?;
        Some(Verdict::defer(
            until,
            "quiet_hours",
            format!("{local} in {tz} is within the quiet hours {start}-{end}"),
        ))
    }

    fn choose_channel(&self, now: Millis, t: &Trigger, ledger: &CustomerLedger) -> Verdict {
        let mut blocked = None;
        let usable = |c: &&Channel| match channel_check(t, ledger, **c) {
            Ok(()) => true,
            Err(rule) => {
                if let Some(rule) = rule {
                    blocked.get_or_insert(rule);
                }
                false
            }
        };
        let usable: Vec<Channel> = t.channels.iter().filter(usable).copied().collect();
        let usable = match self.under_channel_caps(now, t, ledger, usable) {
            Ok(usable) => usable,
            Err(wait) => return wait,
        };
        // One channel per customer within the conflict window (transactional aside):
        // stay on the channel of the latest marketing message, or wait for the window.
        // A cascade's later step may have taken a second channel within it: then the
        // latest channel is free only once the other one's messages leave the window.
        let window = self.config.arbiter.conflict_window.as_millis() as Millis;
        let in_window = || {
            ledger
                .sends
                .iter()
                .filter(|(at, _, c)| *c != MessageCategory::transactional && now - at < window)
        };
        let latest = in_window().max_by_key(|(at, _, _)| *at);
        if let (Some((at, channel, _)), true, false) = (
            latest,
            t.category != MessageCategory::transactional,
            usable.is_empty(),
        ) {
            let other_channel = in_window()
                .filter(|(_, c, _)| c != channel)
                .map(|(at, c, _)| (*at, *c))
                .max_by_key(|(at, _)| *at);
            if let (Some((other_at, other)), true) = (other_channel, usable.contains(channel)) {
                return Verdict::defer(
                    other_at + window,
                    "channel_conflict",
                    format!(
                        "messages went out on {} at {other_at} and on {} at {at} (a cascade step); the next waits {:?} after the first",
                        other.as_str(),
                        channel.as_str(),
                        self.config.arbiter.conflict_window
                    ),
                );
            }
            if usable.contains(channel) {
                return Verdict {
                    outcome: DecisionOutcome::sent,
                    channel: Some(*channel),
                    rule: "channel_choice",
                    reason: format!(
                        "stays on {}: a message went out on it at {at}, within the conflict window",
                        channel.as_str()
                    ),
                    defer_until: None,
                };
            }
            return Verdict::defer(
                at + window,
                "channel_conflict",
                format!(
                    "a message went out on {} at {at}; another channel waits {:?}",
                    channel.as_str(),
                    self.config.arbiter.conflict_window
                ),
            );
        }
        let first = usable.first().copied();
        let mut ranked = usable;
        self.rank_channels(ledger, &mut ranked);
        match (ranked.first().copied(), first) {
            (Some(c), Some(first)) => Verdict {
                outcome: DecisionOutcome::sent,
                channel: Some(c),
                rule: "channel_choice",
                reason: if c == first {
                    first_channel_reason(&t.channels)
                } else {
                    self.ranked_reason(ledger, c, first, &t.channels)
                },
                defer_until: None,
            },
            _ => match blocked {
                Some(rule) => Verdict::no(
                    DecisionOutcome::suppressed,
                    rule,
                    format!("every channel with consent and an address is suppressed ({rule})"),
                ),
                None => Verdict::no(
                    DecisionOutcome::suppressed,
                    "no_consented_channel",
                    "no channel of the scenario has both consent and an address".to_string(),
                ),
            },
        }
    }
}

impl ArbiterProcessor {
    /// Orders usable channels (given in the scenario's order) for the choice: free
    /// before paid, then the channel the customer opened or clicked on most recently,
    /// then the one with fewer messages ignored in a row, then the scenario's order
    /// (the sort is stable, so the choice is deterministic).
    fn rank_channels(&self, ledger: &CustomerLedger, channels: &mut [Channel]) {
        if channels.len() < 2 {
            return;
        }
        let a = &self.config.arbiter;
        channels.sort_by_key(|c| {
            let e = ledger.engagement.get(c).copied().unwrap_or_default();
            (
                a.cost_of(*c),
                std::cmp::Reverse(e.engaged_at),
                e.ignored_in_row,
            )
        });
    }

    /// Why `chosen` goes before `first`, the scenario's first usable channel.
    fn ranked_reason(
        &self,
        ledger: &CustomerLedger,
        chosen: Channel,
        first: Channel,
        list: &[Channel],
    ) -> String {
        let a = &self.config.arbiter;
        let (cost, first_cost) = (a.cost_of(chosen), a.cost_of(first));
        let engagement = |c: Channel| ledger.engagement.get(&c).copied().unwrap_or_default();
        let (e, first_e) = (engagement(chosen), engagement(first));
        let why = if cost != first_cost {
            format!(
                "{} is {} and {} {}: free channels first",
                chosen.as_str(),
                cost.as_str(),
                first.as_str(),
                first_cost.as_str()
            )
        } else if e.engaged_at != first_e.engaged_at {
            let on_first = match first_e.engaged_at {
                Some(at) => format!("on {} at {at}", first.as_str()),
                None => format!("never on {}", first.as_str()),
            };
            format!(
                "the customer last opened or clicked a message on {} at {}, {on_first}",
                chosen.as_str(),
                e.engaged_at.unwrap_or_default()
            )
        } else {
            format!(
                "the customer ignored the last {} message(s) on {} and {} on {}",
                first_e.ignored_in_row,
                first.as_str(),
                e.ignored_in_row,
                chosen.as_str()
            )
        };
        let names: Vec<&str> = list.iter().map(|c| c.as_str()).collect();
        format!(
            "{} rather than {}, of {names:?} with consent and an address: {why}",
            chosen.as_str(),
            first.as_str()
        )
    }
}

/// The reason of the usual decision: `first channel of ["email", "push"] with consent
/// and an address`. Built by hand: the same text through `format!` and `Debug` of a
/// collected list was about 3% of the arbiter benchmark.
fn first_channel_reason(channels: &[Channel]) -> String {
    let mut reason = String::with_capacity(64);
    reason.push_str("first channel of [");
    for (i, c) in channels.iter().enumerate() {
        if i > 0 {
            reason.push_str(", ");
        }
        reason.push('"');
        reason.push_str(c.as_str());
        reason.push('"');
    }
    reason.push_str("] with consent and an address");
    reason
}

/// A cap that is reached: when a slot frees.
struct CapReached {
    until: Millis,
    daily: bool,
    count: usize,
    limit: u32,
}

impl CapReached {
    fn describe(&self, what: &str, tz: chrono_tz::Tz) -> String {
        if self.daily {
            format!("{} {what} today in {tz} (cap {})", self.count, self.limit)
        } else {
            format!(
                "{} {what} in the last 7 days (cap {})",
                self.count, self.limit
            )
        }
    }
}

/// Whether the send times `sent` (all within the last 7 days) reach the daily cap of
/// the customer's calendar day or the rolling weekly cap.
fn cap_reached(
    now: Millis,
    tz: chrono_tz::Tz,
    sent: &[Millis],
    cap: &CapConfig,
) -> Option<CapReached> {
    if let Some(limit) = cap.daily_cap {
        let today = calendar::local_date(now, tz);
        let count = sent
            .iter()
            .filter(|at| calendar::local_date(**at, tz) == today)
            .count();
        if count >= limit as usize {
            let until = calendar::start_of_next_local_day(now, tz).unwrap_or(now + HOUR);
            return Some(CapReached {
                until,
                daily: true,
                count,
                limit,
            });
        }
    }
    if let Some(limit) = cap.weekly_cap {
        let allowed = limit as usize;
        if sent.len() >= allowed {
            // Sends are kept for 7 days: a slot is free once enough of the oldest have
            // left the window for the count to fall below the cap (more than one when
            // a merge or a lowered cap put the count above it). A cap of 0 frees none.
            let mut times = sent.to_vec();
            times.sort_unstable();
            let until = match allowed {
                0 => now + WEEK,
                _ => times[sent.len() - allowed] + WEEK,
            };
            return Some(CapReached {
                until,
                daily: false,
                count: sent.len(),
                limit,
            });
        }
    }
    None
}

/// Whether `channel` may carry `t`: `Err(None)` without consent or an address,
/// `Err(Some(rule))` when a suppression rule blocks it.
fn channel_check(
    t: &Trigger,
    ledger: &CustomerLedger,
    channel: Channel,
) -> Result<(), Option<&'static str>> {
    let consented = t.contacts.consented_channels.contains(&channel);
    let address = t.contacts.address(channel);
    let reachable = matches!(channel, Channel::in_app | Channel::webhook) || address.is_some();
    if !(consented && reachable) {
        return Err(None);
    }
    match ledger.channel_block(channel, address) {
        Some(rule) => Err(Some(rule)),
        None => Ok(()),
    }
}

/// The timer of a cascade's next step (its payload: the trigger).
fn cascade_timer(trigger_id: &str) -> String {
    [CASCADE_TIMER_PREFIX, trigger_id].concat()
}

/// The prefix of [`cascade_timer`]s.
const CASCADE_TIMER_PREFIX: &str = "cascade/";

/// Outcomes the ledger keeps (suppressions and engagement); of the rest, those that
/// tell of a cascade's latest message are read for it (see `outcome_concerns_cascade`).
fn outcome_concerns_ledger(kind: OutcomeKind) -> bool {
    matches!(
        kind,
        OutcomeKind::unsubscribed
            | OutcomeKind::bounced_hard
            | OutcomeKind::complained
            | OutcomeKind::delivered
            | OutcomeKind::opened
            | OutcomeKind::clicked
    )
}

/// Whether an outcome tells when a cascade's message left, or that it never will.
fn outcome_concerns_cascade(kind: OutcomeKind) -> bool {
    matches!(
        kind,
        OutcomeKind::deferred
            | OutcomeKind::sent
            | OutcomeKind::delivered
            | OutcomeKind::failed
            | OutcomeKind::bounced_hard
    )
}

/// Why promo is suppressed after a spam complaint at `at`.
fn complaint_reason(at: Millis) -> String {
    format!("the customer marked a message as spam at {at}: no promo")
}

/// The later of an optional time and `at`.
fn latest(known: Option<Millis>, at: Millis) -> Millis {
    known.map_or(at, |k| k.max(at))
}

fn ms(d: Duration) -> Millis {
    d.as_millis() as Millis
}

/// The trigger a decision is about.
struct Subject<'a> {
    trigger_id: &'a str,
    customer_id: &'a str,
    scenario: &'a str,
    category: MessageCategory,
}

impl<'a> Subject<'a> {
    fn of(t: &'a Trigger) -> Self {
        Subject {
            trigger_id: &t.trigger_id,
            customer_id: &t.customer_id,
            scenario: &t.scenario,
            category: t.category,
        }
    }
}

/// The offers a trigger carries (its `offer_id` and `promo_code` variables): each is
/// checked and recorded, so neither repeats under another's cover.
fn offers_of(t: &Trigger) -> Vec<String> {
    // Most triggers carry no offer: skip the parse for them.
    if !(t.variables.contains("offer_id") || t.variables.contains("promo_code")) {
        return Vec::new();
    }
    let Ok(vars) = serde_json::from_str::<serde_json::Value>(&t.variables) else {
        return Vec::new();
    };
    ["offer_id", "promo_code"]
        .iter()
        .filter_map(|k| match &vars[*k] {
            serde_json::Value::String(s) if !s.is_empty() => Some(format!("{k}:{s}")),
            serde_json::Value::Number(n) => Some(format!("{k}:{n}")),
            _ => None,
        })
        .collect()
}

/// What the policy decided for one trigger, and why.
struct Verdict {
    outcome: DecisionOutcome,
    channel: Option<Channel>,
    rule: &'static str,
    reason: String,
    /// For a deferred trigger: when to decide again.
    defer_until: Option<Millis>,
}

impl Verdict {
    fn no(outcome: DecisionOutcome, rule: &'static str, reason: String) -> Self {
        Verdict {
            outcome,
            channel: None,
            rule,
            reason,
            defer_until: None,
        }
    }

    fn defer(until: Millis, rule: &'static str, reason: String) -> Self {
        Verdict {
            outcome: DecisionOutcome::deferred,
            channel: None,
            rule,
            reason,
            defer_until: Some(until),
        }
    }
}

impl ArbiterProcessor {
    /// An outcome on the customer's ledger; true if it changed. Suppressions (an
    /// unsubscribe, a hard bounce, a complaint) hold from the moment the arbiter sees
    /// them; a reaction stops the cascade of the message it reacts to.
    fn apply_outcome(
        &mut self,
        ctx: &mut Ctx<'_>,
        o: &Outcome,
        ledger: &mut CustomerLedger,
    ) -> anyhow::Result<bool> {
        // The bounced address is the one the send went to, which the arbiter recorded
        // (or, for a send older than that record, the outcome names).
        let address = match o.kind {
            OutcomeKind::bounced_hard => ledger
                .sent_to
                .get(&o.send_id)
                .map(|(_, a)| a.clone())
                .or_else(|| o.address.clone()),
            _ => None,
        };
        if let Some(into) = ledger.merged_into.clone() {
            // The message went to the person under the id merged away: a suppression
            // holds for the survivor, and an open, a click or an ignored delivery
            // counts towards its sunset, applied there as the survivor's own outcome.
            // A repeat of one this ledger applied before the merge, or forwarded
            // already, goes no further (suppressions go again, as they apply again).
            if !ledger.note_outcome(o) {
                return Ok(false);
            }
            let forwarded = Outcome {
                customer_id: into.clone(),
                address: address.or_else(|| o.address.clone()),
                ..o.clone()
            };
            // Its time in the id: a second unsubscribe from one message (after an
            // opt-in) has the first one's outcome id, and is a record of its own.
            let cause = format!("{}@{}", o.outcome_id, o.occurred_at);
            let action = CustomerAction {
                state: Some(
                    serde_json::to_string(&forwarded).context("encode a forwarded outcome")?,
                ),
                merged_from: Some(o.customer_id.clone()),
                ..CustomerAction::new(
                    deterministic_id(&[&cause, "outcome"]),
                    into.clone(),
                    CustomerActionKind::outcome,
                    o.occurred_at,
                )
            };
            ctx.emit(&self.actions_topic, &into, &action);
            self.outcomes_forwarded.inc();
            // Its id is noted now (a repeated suppression, rare, writes the ledger back
            // unchanged).
            return Ok(true);
        }
        let changed = ledger.apply_outcome(o, address);
        let reaction = matches!(
            o.kind,
            OutcomeKind::opened
                | OutcomeKind::clicked
                | OutcomeKind::unsubscribed
                | OutcomeKind::complained
        );
        if changed && reaction {
            let reacted: Vec<String> = ledger
                .cascades
                .iter()
                .filter(|(_, c)| c.send_ids.contains(&o.send_id))
                .map(|(id, _)| id.clone())
                .collect();
            for trigger_id in reacted {
                let why = format!(
                    "the customer reacted ({}) on {} at {}",
                    o.kind.as_str(),
                    o.channel.as_str(),
                    o.occurred_at
                );
                let subject = Subject {
                    trigger_id: &trigger_id,
                    customer_id: &o.customer_id,
                    scenario: &o.scenario,
                    category: o.category,
                };
                self.stop_cascade(ctx, ledger, &subject, "cascade", why)?;
            }
        }
        Ok(changed)
    }

    /// Runs `change` on the ledger of `customer_id`, taken out of the cache without a
    /// copy (an empty one if the customer has none; `change` is told which), and puts
    /// it back on every path: to be written at the next commit if `change` says it
    /// changed it, as it was otherwise. (A copy of the ledger per outcome or cascade
    /// step was a tenth of the cascading benchmark.)
    fn with_ledger(
        &mut self,
        ctx: &mut Ctx<'_>,
        customer_id: &str,
        change: impl FnOnce(&mut Self, &mut Ctx<'_>, &mut CustomerLedger, bool) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let key = ledger_key(customer_id);
        let (mut ledger, known) = match self.ledgers.take(ctx, &key)? {
            Some(ledger) => (ledger, true),
            None => (Box::default(), false),
        };
        let result = change(self, ctx, &mut ledger, known);
        match result {
            Ok(true) => self.ledgers.put(ctx.partition, key, ledger),
            _ if known => self.ledgers.restore(ctx.partition, key, ledger),
            _ => {}
        }
        result.map(|_| ())
    }

    /// Ends every cascade of the customer still waiting whose cause happened at or
    /// before `caused_by` (all of them for `None`); with `marketing_only`, the
    /// transactional ones (an order's status) go on. For a purchase at `bought`, a
    /// cascade of a message the purchase itself causes (see `caused_by_purchase`) goes
    /// on, whichever topic was read first.
    fn stop_all_cascades(
        &self,
        ctx: &mut Ctx<'_>,
        ledger: &mut CustomerLedger,
        customer_id: &str,
        why: &str,
        (caused_by, marketing_only): (Option<Millis>, bool),
        bought: Option<Millis>,
    ) -> anyhow::Result<()> {
        let cascades: Vec<(String, Cascade)> = ledger
            .cascades
            .iter()
            .filter(|(_, c)| match (caused_by, c.cause_occurred_at) {
                (Some(limit), Some(cause)) => cause <= limit,
                _ => true,
            })
            .filter(|(_, c)| !self.caused_by_purchase(c, bought))
            .filter(|(_, c)| {
                !(marketing_only && c.category == Some(MessageCategory::transactional))
            })
            .map(|(id, c)| (id.clone(), c.clone()))
            .collect();
        for (trigger_id, c) in cascades {
            let subject = Subject {
                trigger_id: &trigger_id,
                customer_id,
                scenario: &c.scenario,
                category: c.category.unwrap_or(MessageCategory::trigger),
            };
            self.stop_cascade(ctx, ledger, &subject, "cascade", why.to_string())?;
        }
        Ok(())
    }

    /// The purchase already read that stops cascade `c` of trigger `t` at its next
    /// step, as `stop_all_cascades` does when the purchase is read after it began: a
    /// marketing cascade caused at or before a purchase (up to `PURCHASE_CLOCK_SKEW`
    /// after an online one) and not caused by it.
    fn purchase_read_stopping(
        &self,
        ledger: &CustomerLedger,
        c: &Cascade,
        t: &Trigger,
    ) -> Option<Millis> {
        let cause = c.cause_occurred_at?;
        if t.category == MessageCategory::transactional {
            return None;
        }
        ledger
            .purchases_read()
            .find(|(bought, online)| {
                let answers_until = match online {
                    true => bought.saturating_add(PURCHASE_CLOCK_SKEW),
                    false => *bought,
                };
                cause <= answers_until && !self.caused_by_purchase(c, Some(*bought))
            })
            .map(|(bought, _)| bought)
    }

    /// Whether `c` is the cascade of a message the purchase at `bought` itself causes,
    /// which that purchase does not end: a post-purchase or post-delivery message or
    /// an order's status (caused at or after it), a segment entered by that purchase
    /// or a reactivation counted from it (caused at it).
    fn caused_by_purchase(&self, c: &Cascade, bought: Option<Millis>) -> bool {
        let (Some(bought), Some(cause)) = (bought, c.cause_occurred_at) else {
            return false;
        };
        self.config
            .scenario(&c.scenario)
            .is_some_and(|s| match s.kind {
                ScenarioKind::PostPurchase
                | ScenarioKind::PostDelivery
                | ScenarioKind::OrderUpdate => cause >= bought,
                ScenarioKind::SegmentEntered | ScenarioKind::Reactivation => cause == bought,
                _ => false,
            })
    }

    /// Ends a cascade still waiting: its timer never fires, and the decision trail
    /// says why.
    fn stop_cascade(
        &self,
        ctx: &mut Ctx<'_>,
        ledger: &mut CustomerLedger,
        subject: &Subject<'_>,
        rule: &str,
        why: String,
    ) -> anyhow::Result<()> {
        let Some(c) = ledger.cascades.remove(subject.trigger_id) else {
            return Ok(());
        };
        ctx.cancel(&cascade_timer(subject.trigger_id))?;
        self.record_cascade_stop(ctx, subject, &c, rule, why);
        Ok(())
    }

    fn record_cascade_stop(
        &self,
        ctx: &mut Ctx<'_>,
        subject: &Subject<'_>,
        c: &Cascade,
        rule: &str,
        why: String,
    ) {
        self.record_decision(
            ctx,
            subject,
            deterministic_id(&[subject.trigger_id, "cascade-stop"]),
            (DecisionOutcome::cancelled, None, None),
            rule,
            format!(
                "cascade stopped after {} message(s): {why}",
                c.channels.len()
            ),
        );
    }

    /// Shrinks the ledger a merged customer left to its forwarding note once the
    /// retention is over: the addresses (kept for late bounces), the triggers it
    /// decided, the outcomes and merges it applied go. The note stays: an unsubscribe or a
    /// complaint about an old message must still reach the survivor, and an outcome
    /// finding no ledger would start one for good.
    fn shrink_forwarding_ledger(
        &mut self,
        ctx: &mut Ctx<'_>,
        customer_id: &str,
    ) -> anyhow::Result<()> {
        let key = ledger_key(customer_id);
        let Some(mut ledger) = self.ledgers.take(ctx, &key)? else {
            return Ok(());
        };
        if ledger.merged_into.is_none() {
            self.ledgers.restore(ctx.partition, key, ledger);
            return Ok(());
        }
        *ledger = CustomerLedger {
            merged_into: ledger.merged_into.take(),
            ..CustomerLedger::default()
        };
        self.ledgers.put(ctx.partition, key, ledger);
        Ok(())
    }

    /// The wait of a contacts note kept for a customer the arbiter had no ledger of
    /// (see `process`) is over at `now`: a ledger that still holds nothing but the
    /// note (and the zone it set) goes, unless a newer note came, which waits its own
    /// time. A ledger that took anything else meanwhile is the customer's like any
    /// other, its note kept until `settle_zone` lets it go.
    fn expire_lone_contacts(
        &mut self,
        ctx: &mut Ctx<'_>,
        customer_id: &str,
        now: Millis,
    ) -> anyhow::Result<()> {
        let key = ledger_key(customer_id);
        let Some(ledger) = self.ledgers.take(ctx, &key)? else {
            return Ok(());
        };
        let only_the_note = CustomerLedger {
            contacts: ledger.contacts.clone(),
            zone: ledger.zone.clone(),
            ..CustomerLedger::default()
        };
        match ledger.contacts {
            _ if *ledger != only_the_note => self.ledgers.restore(ctx.partition, key, ledger),
            Some((at, _)) if at.saturating_add(LONE_CONTACTS_KEPT) > now => {
                let timer = [CONTACTS_NOTE_EXPIRY, customer_id].concat();
                ctx.schedule(&timer, at.saturating_add(LONE_CONTACTS_KEPT), &customer_id)?;
                self.ledgers.restore(ctx.partition, key, ledger);
            }
            _ => {
                self.ledgers.remove(ctx.partition, &key);
                ctx.delete(&key);
            }
        }
        Ok(())
    }

    /// The profile forgot an anonymous customer after the retention: what still waits
    /// for them from before is cancelled (queued messages with rule `forgotten`,
    /// cascades stopped) and the ledger is deleted, so ledgers do not pile up with
    /// every visitor who once got a trigger. Triggers and actions are read from
    /// separate topics, so the visitor may be back already (a new profile under the
    /// same name, whose trigger came first): what is newer than the forgetting stays,
    /// and so does the ledger. A ledger merged away keeps its forwarding note.
    fn forget(&mut self, ctx: &mut Ctx<'_>, a: &CustomerAction) -> anyhow::Result<()> {
        let key = ledger_key(&a.customer_id);
        let Some(mut ledger) = self.ledgers.take(ctx, &key)? else {
            return Ok(());
        };
        if ledger.merged_into.is_some() {
            self.ledgers.restore(ctx.partition, key, ledger);
            return Ok(());
        }
        let at = a.occurred_at;
        let why = "the customer was forgotten (anonymous, no event within the retention)";
        self.cancel_queued_where(ctx, &mut ledger, a, FORGOTTEN, why.to_string(), |q| {
            q.cause_occurred_at <= at
        })?;
        self.stop_all_cascades(
            ctx,
            &mut ledger,
            &a.customer_id,
            why,
            (Some(at), false),
            None,
        )?;
        let slot_of_before = ledger
            .main
            .as_ref()
            .is_some_and(|m| m.cause_occurred_at.is_none_or(|c| c <= at));
        if slot_of_before {
            ledger.main = None;
            self.wake_main_waiters(ctx, &mut ledger, None)?;
        }
        let after = |t: Option<Millis>| t.is_some_and(|t| t > at);
        let newer = !ledger.queued.is_empty()
            || !ledger.cascades.is_empty()
            || ledger.main.is_some()
            || ledger.chains.iter().any(|(_, c)| c.updated_at > at)
            || after(ledger.sends.last().map(|(t, ..)| *t))
            || after(ledger.last_active_at)
            || ledger.opted_in.iter().any(|(_, t)| *t > at)
            || after(ledger.last_purchase_at);
        if newer {
            self.ledgers.put(ctx.partition, key, ledger);
        } else {
            // Nothing of the ledger may be written back: it may hold a change of this
            // batch, encoded when it was put.
            self.ledgers.remove(ctx.partition, &key);
            ctx.delete(&key);
        }
        Ok(())
    }

    /// A key action of the customer. A visit ends queued reactivation messages; an
    /// opt-in ends an older unsubscribe; a purchase pauses promo, ends every cascade,
    /// the main scenario and the queued messages of scenarios that exist to get a
    /// purchase (cart, browse, welcome, reactivation). True if the ledger changed.
    fn apply_action(
        &mut self,
        ctx: &mut Ctx<'_>,
        a: &CustomerAction,
        ledger: &mut CustomerLedger,
    ) -> anyhow::Result<bool> {
        let at = a.occurred_at;
        match a.kind {
            CustomerActionKind::merged => {
                let Some(into) = a.merged_into.clone() else {
                    return Ok(false);
                };
                if ledger.merged_into.is_some() {
                    return Ok(false); // handed over already (a redelivered action)
                }
                let why = format!("the customer was merged into {into}");
                // What waited in the queue goes to the survivor with the ledger and is
                // decided there, against the person's caps and suppressions: the
                // profile does not start these again (the person had them), so
                // cancelling them here would lose them.
                let handed_over = self.hand_over_queue(ctx, ledger, &a.customer_id, &into)?;
                // So do the cascades: the person the first message went to gets the
                // next step (an order's status its SMS fallback). One whose timer is
                // gone stops here.
                let cascades = self.hand_over_cascades(ctx, ledger, &into)?;
                self.stop_all_cascades(ctx, ledger, &a.customer_id, &why, (None, false), None)?;
                ledger.main = None;
                self.send_ledger(ctx, &a.action_id, &a.customer_id, &into, at, ledger)?;
                let carried = (handed_over.into_iter())
                    .map(|(id, q)| (id, Carried::Queued(q)))
                    .chain(
                        cascades
                            .into_iter()
                            .map(|(id, c)| (id, Carried::Cascade(c))),
                    );
                for (trigger_id, carried) in carried {
                    self.send_carrier(ctx, &a.customer_id, &into, at, trigger_id, carried)?;
                }
                // Only the forwarding note, the addresses (for late bounces), the
                // triggers decided (a redelivered one is still a duplicate) and the
                // actions applied (a re-sent merge of another customer into this one
                // is forwarded once) stay, until `forward_retention` (at least the
                // bounce window) is over; then only the note, or every merge would
                // keep its addresses for good.
                let keep = ms(self.config.identity.forward_retention).max(BOUNCE_WINDOW);
                let expires = at.max(ctx.now()).saturating_add(keep);
                let timer = [MERGED_LEDGER_EXPIRY, a.customer_id.as_str()].concat();
                ctx.schedule(&timer, expires, &a.customer_id)?;
                *ledger = CustomerLedger {
                    merged_into: Some(into),
                    sent_to: std::mem::take(&mut ledger.sent_to),
                    recent_outcomes: std::mem::take(&mut ledger.recent_outcomes),
                    merges_applied: std::mem::take(&mut ledger.merges_applied),
                    recent_triggers: std::mem::take(&mut ledger.recent_triggers),
                    decided_triggers: std::mem::take(&mut ledger.decided_triggers),
                    legacy_dedup_until: ledger.legacy_dedup_until,
                    ..CustomerLedger::default()
                };
            }
            CustomerActionKind::merge_in => {
                let Some(state) = &a.state else {
                    return Ok(false);
                };
                // A re-sent record (after a crash) must not count the sends twice. Kept
                // apart from the outcomes (a merged ledger brings its own), so no burst
                // of them pushes it out; versions before kept it with the outcomes.
                let h = kairos_core::ids::stable_hash(&a.action_id);
                if ledger.recent_outcomes.contains(&h)
                    || !remember(&mut ledger.merges_applied, h, MERGES_KEPT)
                {
                    return Ok(false);
                }
                let mut merged: CustomerLedger =
                    serde_json::from_str(state).with_context(|| {
                        format!("merged ledger in action {} does not decode", a.action_id)
                    })?;
                if let Some(into) = ledger.merged_into.clone() {
                    // This customer was merged on in turn (Y into X, then X into Z):
                    // the survivor's triggers wait for Y's state, so it goes on there,
                    // still named as Y's, with what Y had absorbed. A queued trigger
                    // this customer took over or decided before is not sent on again.
                    merged
                        .queued
                        .retain(|id, _| !ledger.has_decided(kairos_core::ids::stable_hash(id)));
                    let from = a.merged_from.as_deref().unwrap_or(&a.customer_id);
                    self.send_ledger(ctx, &a.action_id, from, &into, at, &merged)?;
                    return Ok(true);
                }
                let handed_over = std::mem::take(&mut merged.queued);
                let cascades = std::mem::take(&mut merged.cascades);
                ledger.absorb(merged);
                // After the ids it brings along: the direct merge, which the
                // profile names in this customer's triggers, is the newest.
                if let Some(from) = &a.merged_from {
                    note_absorbed(&mut ledger.absorbed, from.clone());
                }
                let from = a.merged_from.as_deref().unwrap_or("a merged customer");
                self.take_over_queue(ctx, ledger, &a.customer_id, from, handed_over)?;
                self.take_over_cascades(ctx, ledger, &a.customer_id, from, cascades)?;
            }
            CustomerActionKind::visit => {
                ledger.last_active_at = Some(latest(ledger.last_active_at, at));
                // A returning customer leaves reactivation. Strictly before, as in
                // `decide`: a visit at the cause time (such as a redelivery of the
                // visit that caused it) is not a return.
                let why = format!("the customer came back at {at}");
                self.end_scenarios(ctx, ledger, a, "became_active", &why, |scenario| {
                    self.is_reactivation(scenario)
                })?;
            }
            // Handled before a ledger is taken (see `forget`).
            CustomerActionKind::forgotten => return Ok(false),
            CustomerActionKind::outcome => {
                let Some(state) = &a.state else {
                    return Ok(false);
                };
                let o: Outcome = serde_json::from_str(state).with_context(|| {
                    format!(
                        "forwarded outcome in action {} does not decode",
                        a.action_id
                    )
                })?;
                return self.apply_outcome(ctx, &o, ledger);
            }
            CustomerActionKind::left_segment => {
                let Some(segment) = a.segment.as_deref() else {
                    return Ok(false);
                };
                ledger.note_left_segment(segment, at);
                // Caused before the customer left: a trigger of a later return to the
                // segment is caused at or after it.
                let why = format!("the customer left {segment} at {at}");
                self.end_scenarios(ctx, ledger, a, "left_segment", &why, |scenario| {
                    self.config
                        .scenario(scenario)
                        .is_some_and(|s| s.targets_segment(segment))
                })?;
            }
            CustomerActionKind::opt_in => {
                // Activity for the inactivity sunset through `opted_in` (see
                // `CustomerLedger::last_activity`), not a return: reactivation ends
                // with a visit or a purchase only, as the profile counts them.
                if let Some(channel) = a.channel {
                    let opted = ledger.opted_in.get(&channel).copied();
                    ledger.opted_in.insert(channel, latest(opted, at));
                    if ledger.unsubscribed.get(&channel).is_some_and(|u| *u < at) {
                        ledger.unsubscribed.remove(&channel);
                    }
                }
            }
            // A withdrawal stated on the site or app counts like an unsubscribe from a
            // message: from now on, queued and cascading messages included, until an
            // opt-in later than it.
            CustomerActionKind::opt_out => {
                if let Some(channel) = a.channel {
                    if ledger
                        .opted_in
                        .get(&channel)
                        // A withdrawal at the same time as an opt-in wins, as in the
                        // profile.
                        .is_none_or(|opt_in| at >= *opt_in)
                    {
                        let known = ledger.unsubscribed.get(&channel).copied();
                        ledger.unsubscribed.insert(channel, latest(known, at));
                    }
                }
            }
            CustomerActionKind::contacts_changed => {
                let Some(contacts) = &a.contacts else {
                    return Ok(false);
                };
                // Kept also while nothing waits: a trigger fired before the change may
                // still be on its way (another topic, read later). The first trigger
                // decided that fired after it drops it (see `settle_zone`).
                let newer = ledger
                    .contacts
                    .as_ref()
                    // Equal: read later, so told later (one customer's actions are in
                    // order on their partition).
                    .is_none_or(|(known, _)| *known <= at);
                if !newer {
                    return Ok(false);
                }
                ledger.contacts = Some((at, Box::new(contacts.clone())));
                if ledger.zone.as_ref().is_none_or(|(noted, _)| *noted <= at) {
                    let zone = contacts.time_zone.as_deref().map(CompactString::from);
                    ledger.zone = Some((at, zone));
                }
            }
            CustomerActionKind::purchase => {
                ledger.last_purchase_at = Some(latest(ledger.last_purchase_at, at));
                if !a.till_sale {
                    ledger.last_online_purchase_at =
                        Some(latest(ledger.last_online_purchase_at, at));
                }
                // A conversion is a reaction: a customer who buys is not ignoring the
                // messages (an SMS reports no open, a mail client may block pixels).
                // As of when it was read, if the device dated it later: a clock ahead
                // must not keep the next deliveries out of the count.
                ledger.reacted_at(at.min(ctx.now()));
                // A till sale older than the chain's cause (uploaded late) leaves it
                // running; an online purchase ends it whatever the device's clock
                // said (a cascade caused well after the purchase goes on, below).
                let slot_freed = ledger.main.as_ref().is_some_and(|m| {
                    self.ends_on_purchase(&m.scenario)
                        && match (a.till_sale, m.cause_occurred_at) {
                            (true, Some(cause)) => self.purchase_ends((&m.scenario, 0), cause, at),
                            _ => true,
                        }
                });
                if slot_freed {
                    ledger.main = None;
                }
                // A conversion ends every marketing cascade caused before it: the
                // customer did what they were for. A transactional one (the fallback
                // of an order's status) is a notice the customer must still get. One
                // caused after it (a price drop read before a purchase read late) is
                // news the purchase did not answer; an online purchase allows for
                // the device's clock.
                let why = format!("the customer bought at {at}");
                let caused_by = Some(match a.till_sale {
                    true => at,
                    false => at.saturating_add(PURCHASE_CLOCK_SKEW),
                });
                let scope = (caused_by, true);
                self.stop_all_cascades(ctx, ledger, &a.customer_id, &why, scope, Some(at))?;
                let why = format!("the customer bought at {at} while it waited");
                // An online purchase checks out the cart that caused a cart or browse
                // reminder, also when the device's clock puts it a little before the
                // cart change; a cart changed well after it (read first, from the
                // other topic) is a new one, whose reminder stays queued. The slot
                // ends whatever the clock said, and the cascades above within the same
                // allowance: what a new cart's reminder loses is at most its priority,
                // never the message itself.
                let bought = (at, !a.till_sale);
                self.cancel_queued_where(ctx, ledger, a, "purchase_exclusion", why, |q| {
                    self.purchase_ends_allowing_skew(
                        (&q.scenario, q.step),
                        q.cause_occurred_at,
                        bought,
                    )
                })?;
                // After the exclusions, so only what survived them is decided again.
                if slot_freed {
                    self.wake_main_waiters(ctx, ledger, None)?;
                }
            }
        }
        Ok(true)
    }

    /// Hands (part of) a merged customer's ledger to the survivor, keyed by it.
    fn send_ledger(
        &self,
        ctx: &mut Ctx<'_>,
        cause_id: &str,
        from: &str,
        into: &str,
        at: Millis,
        ledger: &CustomerLedger,
    ) -> anyhow::Result<()> {
        let action = CustomerAction {
            state: Some(serde_json::to_string(ledger).context("encode a merged ledger")?),
            merged_from: Some(from.to_string()),
            ..CustomerAction::new(
                deterministic_id(&[cause_id, "merge_in"]),
                into.to_string(),
                CustomerActionKind::merge_in,
                at,
            )
        };
        ctx.emit(&self.actions_topic, into, &action);
        Ok(())
    }

    /// Takes the queue of a customer merged into `into` out of its ledger, each entry
    /// with its trigger (read from its timer), for `send_carrier` to take to the
    /// survivor. An entry without a timer is cancelled; a payload that does not decode
    /// too (it would fail on its own timer as well).
    fn hand_over_queue(
        &self,
        ctx: &mut Ctx<'_>,
        ledger: &mut CustomerLedger,
        customer_id: &str,
        into: &str,
    ) -> anyhow::Result<Vec<(String, Queued)>> {
        let queued: Vec<(String, Queued)> = ledger
            .queued
            .iter()
            .map(|(id, q)| (id.clone(), q.clone()))
            .collect();
        let mut handed_over = Vec::with_capacity(queued.len());
        for (trigger_id, mut q) in queued {
            // Ended meanwhile with a step before it that could not go (below).
            if !ledger.queued.contains_key(&trigger_id) {
                continue;
            }
            let timer = ["defer/", trigger_id.as_str()].concat();
            let unusable = match q.trigger.take() {
                Some(t) => Ok(t),
                None => timer_trigger(ctx, &timer)?.map(|(_, t)| t),
            };
            let mut trigger = match unusable {
                Ok(t) => t,
                Err(what) => {
                    let why =
                        format!("the customer was merged into {into}; the queued trigger {what}");
                    self.cancel_queued(ctx, ledger, customer_id, &trigger_id, &q, "merged", why)?;
                    continue;
                }
            };
            ctx.cancel(&timer)?;
            ledger.queued.remove(&trigger_id);
            // As a cascade's (see `hand_over_cascades`).
            ledger.settle_zone(&mut trigger);
            self.record_handed_over(ctx, &trigger, into);
            q.trigger = Some(trigger);
            handed_over.push((trigger_id, q));
        }
        Ok(handed_over)
    }

    /// Takes the cascades of a customer merged into `into` out of its ledger, each with
    /// its trigger and the time of its next step (read from its timer, which is
    /// cancelled), for the survivor to go on with (see `take_over_cascades`). One
    /// without a readable timer stays, for `stop_all_cascades` to stop.
    fn hand_over_cascades(
        &self,
        ctx: &mut Ctx<'_>,
        ledger: &mut CustomerLedger,
        into: &str,
    ) -> anyhow::Result<Vec<(String, Cascade)>> {
        let ids: Vec<String> = ledger.cascades.iter().map(|(id, _)| id.clone()).collect();
        let mut handed_over = Vec::with_capacity(ids.len());
        for trigger_id in ids {
            let timer = cascade_timer(&trigger_id);
            let (due, mut t) = match timer_trigger(ctx, &timer)? {
                Ok(found) => found,
                Err(what) => {
                    tracing::warn!(trigger = %trigger_id, "a cascade's timer {what}; the merge stops the cascade");
                    continue;
                }
            };
            let Some(mut c) = ledger.cascades.remove(&trigger_id) else {
                continue;
            };
            ctx.cancel(&timer)?;
            // With the addresses this customer's profile told of after it fired (an
            // address released since): the survivor's ledger keeps its own note only.
            ledger.settle_zone(&mut t);
            self.record_decision(
                ctx,
                &Subject::of(&t),
                deterministic_id(&[&trigger_id, "cascade_handed_over", into]),
                (DecisionOutcome::deferred, None, None),
                "merged",
                format!(
                    "the customer was merged into {into}, whose arbiter goes on with the cascade (next step due at {due})"
                ),
            );
            c.handed_over = Some((due, t));
            // The survivor hears nothing of when a message put off here leaves (its
            // `sent` stays with this id): its next step goes at its time.
            c.latest_put_off = false;
            handed_over.push((trigger_id, c));
        }
        Ok(handed_over)
    }

    /// The cascades a merged customer's ledger brought (see `hand_over_cascades`) go on
    /// as this customer's: each next step is due when it would have been (at once if
    /// that passed), and decided then through every rule, against this ledger. One
    /// this ledger knows already is left out.
    fn take_over_cascades(
        &self,
        ctx: &mut Ctx<'_>,
        ledger: &mut CustomerLedger,
        customer_id: &str,
        from: &str,
        cascades: SmallMap<String, Cascade>,
    ) -> anyhow::Result<()> {
        let now = ctx.now();
        for (trigger_id, mut c) in cascades {
            let Some((due, mut t)) = c.handed_over.take() else {
                continue;
            };
            if !adopt_handed_over(ledger, &trigger_id, &mut t, customer_id, now) {
                continue;
            }
            // A return (a reactivation) or a segment exit this customer's ledger read
            // before the cascade came (the carrier comes behind this customer's own
            // actions) ends it, as it would have had the cascade been here.
            if let Some((rule, why)) = self.returned_or_left_since(ledger, &t) {
                self.record_cascade_stop(ctx, &Subject::of(&t), &c, rule, why);
                continue;
            }
            let next = due.max(now);
            ctx.schedule(&cascade_timer(&trigger_id), next, t.as_ref())?;
            self.record_decision(
                ctx,
                &Subject::of(&t),
                deterministic_id(&[&trigger_id, "cascade_taken_over", customer_id]),
                (DecisionOutcome::deferred, None, None),
                "merged",
                format!(
                    "cascade taken over from {from}, merged into this customer; next step at {next}"
                ),
            );
            ledger.cascades.insert(trigger_id, c);
        }
        Ok(())
    }

    /// Records that the merged customer's trigger `t` went to `into` to be decided.
    fn record_handed_over(&self, ctx: &mut Ctx<'_>, t: &Trigger, into: &str) {
        self.record_decision(
            ctx,
            &Subject::of(t),
            deterministic_id(&[&t.trigger_id, "handed_over", into]),
            (DecisionOutcome::deferred, None, None),
            "merged",
            format!("the customer was merged into {into}, whose arbiter decides it"),
        );
    }

    /// Sends one queued or cascading trigger of customer `from` to `into` in a ledger
    /// of its own (each its own record, so a long queue never makes one record too
    /// large), after the merged ledger on the same topic and key, so it arrives after it.
    fn send_carrier(
        &self,
        ctx: &mut Ctx<'_>,
        from: &str,
        into: &str,
        at: Millis,
        trigger_id: String,
        carried: Carried,
    ) -> anyhow::Result<()> {
        let mut carrier = CustomerLedger::default();
        let cause = match carried {
            Carried::Queued(q) => {
                let cause = trigger_id.clone();
                carrier.queued.insert(trigger_id, q);
                cause
            }
            Carried::Cascade(c) => {
                let cause = deterministic_id(&[&trigger_id, "cascade"]);
                carrier.cascades.insert(trigger_id, c);
                cause
            }
        };
        self.send_ledger(ctx, &cause, from, into, at, &carrier)
    }

    /// The queue a merged customer's ledger brought (see `hand_over_queue`) joins this
    /// customer's: each trigger is now this customer's, waits until it would have
    /// woken (or a later step of its chain behind it) and is decided then through
    /// every rule, against this ledger. One this ledger knows already is left out.
    fn take_over_queue(
        &self,
        ctx: &mut Ctx<'_>,
        ledger: &mut CustomerLedger,
        customer_id: &str,
        from: &str,
        handed_over: SmallMap<String, Queued>,
    ) -> anyhow::Result<()> {
        let now = ctx.now();
        for (trigger_id, mut q) in handed_over {
            let Some(mut t) = q.trigger.take() else {
                // `hand_over_queue` fills every entry it hands over.
                tracing::warn!(
                    trigger = %trigger_id,
                    from,
                    "a handed-over queue entry carries no trigger; it is dropped"
                );
                continue;
            };
            if !adopt_handed_over(ledger, &trigger_id, &mut t, customer_id, now) {
                continue;
            }
            // One waiting for the merged customer's main-scenario slot, which is gone,
            // is decided at once: this customer's own slot holds it again if need be.
            let wake = if q.rule.as_deref() == Some(MAIN_SCENARIO) {
                now
            } else {
                q.wake_at.unwrap_or(now).max(now)
            };
            ctx.schedule(&["defer/", trigger_id.as_str()].concat(), wake, t.as_ref())?;
            let reason = format!("taken over from {from}, merged into this customer");
            self.record_decision(
                ctx,
                &Subject::of(&t),
                deterministic_id(&[&trigger_id, "taken_over", customer_id]),
                (DecisionOutcome::deferred, None, None),
                "merged",
                format!("{reason}; decided again at {wake}"),
            );
            note_reason(&mut q.reasons, "merged", &reason);
            q.wake_at = Some(wake);
            q.trigger = (q.rule.as_deref() == Some(MAIN_SCENARIO)).then_some(t);
            ledger.queued.insert(trigger_id, q);
        }
        Ok(())
    }

    /// A trigger of a customer merged into `into`, arriving after the merge: it goes
    /// to the survivor as a handed-over queue entry due now (see `send_carrier`) and
    /// is decided there (see `take_over_queue`).
    fn forward_trigger(
        &self,
        ctx: &mut Ctx<'_>,
        t: Trigger,
        chain: Option<String>,
        into: &str,
    ) -> anyhow::Result<()> {
        let now = ctx.now();
        self.record_handed_over(ctx, &t, into);
        let (trigger_id, from) = (t.trigger_id.clone(), t.customer_id.clone());
        let q = Queued {
            scenario: t.scenario.clone(),
            category: Some(t.category),
            cause_occurred_at: t.cause_occurred_at,
            rule: None,
            wake_at: Some(now),
            chain,
            step: t.step,
            reasons: Vec::new(),
            trigger: Some(Box::new(t)),
            merge_wait_since: None,
        };
        self.send_carrier(ctx, &from, into, now, trigger_id, Carried::Queued(q))
    }

    /// Ends, for the scenarios `ends` names, what action `a` makes pointless if it was
    /// caused before it: the queued triggers, the rest of their cascades and a chain's
    /// hold on the customer (the main-scenario slot, whose waiters are then woken).
    #[allow(clippy::too_many_arguments)]
    fn end_scenarios(
        &self,
        ctx: &mut Ctx<'_>,
        ledger: &mut CustomerLedger,
        a: &CustomerAction,
        rule: &str,
        why: &str,
        ends: impl Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        let at = a.occurred_at;
        let ended =
            |scenario: &str, cause: Option<Millis>| ends(scenario) && cause.is_none_or(|c| c < at);
        let waited = format!("{why} while it waited");
        self.cancel_queued_where(ctx, ledger, a, rule, waited, |q| {
            ended(&q.scenario, Some(q.cause_occurred_at))
        })?;
        let stopped: Vec<(String, Cascade)> = ledger
            .cascades
            .iter()
            .filter(|(_, c)| ended(&c.scenario, c.cause_occurred_at))
            .map(|(id, c)| (id.clone(), c.clone()))
            .collect();
        for (trigger_id, c) in stopped {
            let subject = Subject {
                trigger_id: &trigger_id,
                customer_id: &a.customer_id,
                scenario: &c.scenario,
                category: c.category.unwrap_or(MessageCategory::promo),
            };
            self.stop_cascade(ctx, ledger, &subject, rule, why.to_string())?;
        }
        let slot_freed = ledger
            .main
            .as_ref()
            .is_some_and(|m| ended(&m.scenario, m.cause_occurred_at));
        if slot_freed {
            ledger.main = None;
            self.wake_main_waiters(ctx, ledger, None)?;
        }
        Ok(())
    }

    /// Cancels the queued triggers that the action `a` ends (`ends` says which: by
    /// scenario and cause time).
    fn cancel_queued_where(
        &self,
        ctx: &mut Ctx<'_>,
        ledger: &mut CustomerLedger,
        a: &CustomerAction,
        rule: &str,
        reason: String,
        ends: impl Fn(&Queued) -> bool,
    ) -> anyhow::Result<()> {
        let ended: Vec<(String, Queued)> = ledger
            .queued
            .iter()
            .filter(|(_, q)| ends(q))
            .map(|(id, q)| (id.clone(), q.clone()))
            .collect();
        for (trigger_id, q) in ended {
            self.cancel_queued(
                ctx,
                ledger,
                &a.customer_id,
                &trigger_id,
                &q,
                rule,
                reason.clone(),
            )?;
        }
        Ok(())
    }

    /// When `t`, waiting in the queue for another chain's slot, looks again, if that
    /// chain (not switched off) still holds the slot past `now` and `t` is still
    /// valid: see [`MAIN_RECHECK`].
    fn slot_still_held(&self, t: &Trigger, ledger: &CustomerLedger, now: Millis) -> Option<Millis> {
        let q = ledger.queued.get(&t.trigger_id)?;
        let main = ledger.main.as_ref()?;
        // Anything else that may have changed its fate is weighed by a decision: its
        // own scenario switched off, a mass send now behind a personal chain, waiting
        // given up for dropping.
        let waits = q.rule.as_deref() == Some(MAIN_SCENARIO)
            && main.scenario != t.scenario
            && t.priority <= main.priority
            && self.switched_off(&main.scenario).is_none()
            && self.switched_off(&t.scenario).is_none()
            && (!self.is_mass(&t.scenario) || self.is_mass(&main.scenario))
            && self.config.arbiter.lower_priority == LowerPriority::Wait;
        let frees_at = ledger.main_frees_at()?;
        let wake = frees_at
            .min(now.saturating_add(MAIN_RECHECK))
            .min(t.valid_until.saturating_add(1));
        (waits && wake > now).then_some(wake)
    }

    /// A chain switched off lets go of the main-scenario slot: what waited behind it
    /// is decided again now, not at the chain's old end (`deciding` aside, being
    /// decided already).
    fn release_switched_off_main(
        &self,
        ctx: &mut Ctx<'_>,
        ledger: &mut CustomerLedger,
        deciding: Option<&str>,
    ) -> anyhow::Result<()> {
        if (ledger.main.as_ref()).is_some_and(|m| self.switched_off(&m.scenario).is_some()) {
            ledger.main = None;
            self.wake_main_waiters(ctx, ledger, deciding)?;
        }
        Ok(())
    }

    /// The main-scenario slot freed earlier than the triggers waiting for it were
    /// told: their wake-up moves to now, so each is decided again through every rule
    /// (and still ends in one final decision, by its own timer).
    fn wake_main_waiters(
        &self,
        ctx: &mut Ctx<'_>,
        ledger: &mut CustomerLedger,
        deciding: Option<&str>,
    ) -> anyhow::Result<()> {
        let now = ctx.now();
        for (trigger_id, q) in ledger.queued.iter_mut() {
            // The one being decided (released by its timer) is not woken again.
            if q.rule.as_deref() != Some(MAIN_SCENARIO) || deciding == Some(trigger_id.as_str()) {
                continue;
            }
            if let Some(t) = &q.trigger {
                ctx.schedule(&["defer/", trigger_id].concat(), now, t.as_ref())?;
                q.wake_at = Some(now);
            }
        }
        Ok(())
    }

    /// Takes a deferred trigger out of the queue with a final "cancelled" decision.
    #[allow(clippy::too_many_arguments)]
    fn cancel_queued(
        &self,
        ctx: &mut Ctx<'_>,
        ledger: &mut CustomerLedger,
        customer_id: &str,
        trigger_id: &str,
        q: &Queued,
        rule: &str,
        reason: String,
    ) -> anyhow::Result<()> {
        // Ended meanwhile (with an earlier step of its chain): decided once.
        if ledger.queued.remove(trigger_id).is_none() {
            return Ok(());
        }
        ctx.cancel(&["defer/", trigger_id].concat())?;
        let subject = Subject {
            trigger_id,
            customer_id,
            scenario: &q.scenario,
            category: q.category.unwrap_or(MessageCategory::trigger),
        };
        self.record_final_decision(
            ctx,
            &subject,
            (DecisionOutcome::cancelled, None, None),
            rule,
            reason,
        );
        if let Some(chain) = q.chain.clone() {
            self.chain_step_ended(ctx, ledger, customer_id, chain, q.step, StepEnd::Broke)?;
        }
        Ok(())
    }

    /// Emits the send command of `t` on `channel` and records the send in the ledger;
    /// returns the send id.
    fn emit_send(
        &self,
        ctx: &mut Ctx<'_>,
        t: &Trigger,
        channel: Channel,
        ledger: &mut CustomerLedger,
        earlier_reasons: &[String],
        last_reason: &str,
    ) -> anyhow::Result<String> {
        let now = ctx.now();
        // Most sends were never deferred: their one reason needs no list built.
        let joined: Vec<&str>;
        let reasons: &[&str] = if earlier_reasons.is_empty() {
            std::slice::from_ref(&last_reason)
        } else {
            joined = earlier_reasons
                .iter()
                .map(String::as_str)
                .chain([last_reason])
                .collect();
            &joined
        };
        let send_id = deterministic_id(&[&t.trigger_id, channel.as_str()]);
        let address = t.contacts.address(channel);
        let cmd = SendCommandRef {
            send_id: &send_id,
            trigger_id: &t.trigger_id,
            customer_id: &t.customer_id,
            scenario: &t.scenario,
            channel,
            category: t.category,
            template: &t.template,
            address,
            variables: &t.variables,
            created_at: now,
            valid_until: t.valid_until,
            cause_occurred_at: t.cause_occurred_at,
            reasons,
        };
        if let Some(address) = address {
            ledger
                .sent_to
                .insert(send_id.clone(), (now, address.to_string()));
        }
        match self.send_topics.get(&channel) {
            Some(topic) => ctx.emit(topic, &t.customer_id, &cmd),
            None => ctx.emit(&self.config.send_topic(channel), &t.customer_id, &cmd),
        }
        ledger.count_send(now, channel, t);
        Ok(send_id)
    }

    fn cascade_wait(&self, scenario: &str, sent: usize) -> Option<Duration> {
        self.config.scenario(scenario)?.cascade_wait(sent)
    }

    /// Follows the latest message of a cascade to the customer: one the recipient's
    /// server put off has not reached them, so the wait for a reaction starts when it
    /// leaves (a 5-minute greylisting doubling up to an hour would otherwise let the
    /// push go out before the e-mail arrives); one that failed or bounced hard got no
    /// reaction and never will, so the next channel is tried at once. True if the
    /// ledger changed.
    fn follow_cascade_message(
        &self,
        ctx: &mut Ctx<'_>,
        o: &Outcome,
        ledger: &mut CustomerLedger,
    ) -> anyhow::Result<bool> {
        if ledger.merged_into.is_some() {
            return Ok(false); // its cascades went to the survivor
        }
        let Some((trigger_id, cascade)) = ledger
            .cascades
            .iter_mut()
            .find(|(_, c)| c.handed_over.is_none() && c.send_ids.last() == Some(&o.send_id))
        else {
            return Ok(false);
        };
        let timer = cascade_timer(trigger_id);
        let now = ctx.now();
        let settled_before = cascade.latest_settled;
        cascade.latest_settled |= o.kind != OutcomeKind::deferred;
        match o.kind {
            OutcomeKind::deferred => {
                let changed = !cascade.latest_put_off && !settled_before;
                cascade.latest_put_off |= changed;
                Ok(changed)
            }
            OutcomeKind::sent | OutcomeKind::delivered => {
                if !cascade.latest_put_off {
                    return Ok(!settled_before);
                }
                cascade.latest_put_off = false;
                let wait = self.cascade_wait(&cascade.scenario, cascade.channels.len());
                // None: the last message of the cascade, nothing left to check for.
                if let (Some(wait), Some((_, t))) = (wait, ctx.timer_payload::<Trigger>(&timer)?) {
                    let check_at = self.outside_quiet_hours(o.occurred_at + ms(wait), &t);
                    ctx.schedule(&timer, check_at, &t)?;
                }
                Ok(true)
            }
            OutcomeKind::failed | OutcomeKind::bounced_hard => {
                cascade.latest_put_off = false;
                cascade.latest_failed = true;
                match ctx.timer_payload::<Trigger>(&timer)? {
                    Some((at, t)) if at > now => {
                        ctx.schedule(&timer, now, &t)?;
                        Ok(true)
                    }
                    _ => Ok(!settled_before),
                }
            }
            // Not of a cascade's message (see `outcome_concerns_cascade`).
            _ => Ok(false),
        }
    }

    /// The cascade timer of `t` fired with no reaction: the next usable channel gets
    /// the message. Cascade steps keep the conflict window and the minimum gap only
    /// against other messages (a cascade is one message on several channels, and its
    /// wait is their gap): a step waits for them, as for quiet hours. They keep
    /// consent, suppressions, the valid-until and every cap: a step that would break
    /// one ends the cascade. True if the ledger changed.
    fn cascade_step(
        &mut self,
        ctx: &mut Ctx<'_>,
        mut t: Trigger,
        ledger: &mut CustomerLedger,
    ) -> anyhow::Result<bool> {
        let Some(mut cascade) = ledger.cascades.remove(&t.trigger_id) else {
            return Ok(false); // stopped meanwhile
        };
        ledger.settle_zone(&mut t);
        let now = ctx.now();
        let subject = Subject::of(&t);
        // Before any cap is read: only the last 7 days count.
        ledger.sends.retain(|(at, _, _)| now - at < WEEK);
        ledger.scenario_sends.retain(|(at, _)| now - at < WEEK);
        if let Some(off) = self.switched_off(&t.scenario) {
            self.record_cascade_stop(ctx, &subject, &cascade, SCENARIO_OFF, off.why());
            self.release_switched_off_main(ctx, ledger, None)?;
            return Ok(true);
        }
        // A purchase read before the cascade's first message went out (the triggers
        // topic behind the actions topic) ends the rest as one read after it would:
        // the same decision, also ahead of the complaint and the pause after the
        // purchase, which the purchase read later does not wait for.
        if let Some(at) = self.purchase_read_stopping(ledger, &cascade, &t) {
            self.record_cascade_stop(
                ctx,
                &subject,
                &cascade,
                "cascade",
                format!("the customer bought at {at}"),
            );
            return Ok(true);
        }
        // A complaint about any message ends all promo, the rest of a cascade too.
        if let Some(at) = ledger
            .complained_at
            .filter(|_| t.category == MessageCategory::promo)
        {
            self.record_decision(
                ctx,
                &subject,
                deterministic_id(&[&t.trigger_id, "cascade-stop"]),
                (DecisionOutcome::suppressed, None, None),
                "complaint",
                format!(
                    "cascade stopped after {} message(s): {}",
                    cascade.channels.len(),
                    complaint_reason(at)
                ),
            );
            return Ok(true);
        }
        // A till sale uploaded late, dated before the cascade's cause, leaves the
        // cascade running; its promo steps still keep the pause after that purchase.
        if let Some(pause) = (t.category == MessageCategory::promo)
            .then(|| self.purchase_pause(now, ledger))
            .flatten()
        {
            self.record_decision(
                ctx,
                &subject,
                deterministic_id(&[&t.trigger_id, "cascade-stop"]),
                (DecisionOutcome::suppressed, None, None),
                "pause_after_purchase",
                format!(
                    "cascade stopped after {} message(s): {pause}",
                    cascade.channels.len()
                ),
            );
            return Ok(true);
        }
        if cascade.latest_put_off && now <= t.valid_until {
            // Its latest message has not reached the customer (see
            // `follow_cascade_message`): looked at again a wait later, unless it leaves
            // or fails before.
            let waited = cascade.channels.len();
            let wait = self.cascade_wait(&t.scenario, waited).map_or(HOUR, ms);
            let until = self
                .outside_quiet_hours(now + wait, &t)
                .min(t.valid_until + 1);
            ctx.schedule(&cascade_timer(&t.trigger_id), until, &t)?;
            let last = cascade.channels.last().map_or("", |c| c.as_str());
            self.record_decision(
                ctx,
                &subject,
                // Its own tag: a wait for the quiet hours may end at the same time.
                deterministic_id(&[
                    &t.trigger_id,
                    "cascade-hold",
                    &waited.to_string(),
                    &until.to_string(),
                ]),
                (DecisionOutcome::deferred, None, None),
                "cascade",
                format!(
                    "cascade step waits: the recipient's server put the message on {last} \
                     off and it has not left yet; decided again at {until}"
                ),
            );
            ledger.cascades.insert(t.trigger_id.clone(), cascade);
            return Ok(true);
        }
        let mut rest: Vec<Channel> = t
            .channels
            .iter()
            .copied()
            .filter(|c| !cascade.channels.contains(c) && channel_check(&t, ledger, *c).is_ok())
            .collect();
        // Free channels before paid ones, then by engagement, as for the first message.
        self.rank_channels(ledger, &mut rest);
        // A channel at its own cap passes the step to the next one; with every channel
        // capped, the first one's cap ends the cascade below.
        let mut channel_capped = None;
        if t.category != MessageCategory::transactional {
            match self.under_channel_caps(now, &t, ledger, rest.clone()) {
                Ok(open) => rest = open,
                Err(_) => {
                    channel_capped = rest.first().and_then(|first| {
                        self.under_channel_caps(now, &t, ledger, vec![*first]).err()
                    })
                }
            }
        }
        let next = rest.first().copied();
        let Some(next) = next.filter(|_| now <= t.valid_until) else {
            let why = if now > t.valid_until {
                format!("valid until {}", t.valid_until)
            } else {
                "no further channel with consent and an address".to_string()
            };
            // Its timer just fired: nothing left to cancel.
            self.record_cascade_stop(ctx, &subject, &cascade, "cascade", why);
            return Ok(true);
        };
        let quiet = (t.category != MessageCategory::transactional)
            .then(|| self.quiet_hours(now, &t))
            .flatten();
        // Wait for the morning, or for the gap after another message, still without
        // a reaction.
        let wait = match quiet {
            Some(v) => Some((v.defer_until.unwrap_or(now + HOUR), v.rule, v.reason)),
            None => (t.category != MessageCategory::transactional)
                .then(|| self.cascade_spacing(now, next, ledger, &cascade))
                .flatten()
                .map(|until| {
                    let why = format!(
                        "the minimum gap or the conflict window after the customer's \
                         other messages holds until {until}"
                    );
                    (self.outside_quiet_hours(until, &t), "cascade_spacing", why)
                }),
        };
        if let Some((until, rule, why)) = wait {
            ctx.schedule(&cascade_timer(&t.trigger_id), until, &t)?;
            // Recorded, so that a step going out hours after its wait can be
            // explained.
            let step = cascade.channels.len().to_string();
            self.record_decision(
                ctx,
                &subject,
                deterministic_id(&[&t.trigger_id, "cascade-wait", &step, &until.to_string()]),
                (DecisionOutcome::deferred, Some(next), None),
                rule,
                format!(
                    "cascade step on {} waits: {why}; decided again at {until}",
                    next.as_str()
                ),
            );
            ledger.cascades.insert(t.trigger_id.clone(), cascade);
            return Ok(true);
        }
        if t.category != MessageCategory::transactional {
            let sent = ledger.capped_send_times();
            let capped = self.caps(now, &t, ledger, &sent).or(channel_capped);
            if let Some(cap) = capped {
                // Its timer just fired: nothing left to cancel.
                self.record_decision(
                    ctx,
                    &subject,
                    deterministic_id(&[&t.trigger_id, "cascade-stop"]),
                    (DecisionOutcome::suppressed, None, None),
                    cap.rule,
                    format!(
                        "cascade stopped after {} message(s): the next, on {}, would break a cap: {}",
                        cascade.channels.len(),
                        next.as_str(),
                        cap.reason
                    ),
                );
                return Ok(true);
            }
        }
        let sent_on = (cascade.channels.iter())
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let reason = match cascade.latest_failed {
            true => format!(
                "cascade: the message on {} failed or bounced",
                cascade.channels.last().map_or("", |c| c.as_str())
            ),
            false => format!(
                "cascade: no reaction to the message on {sent_on} within {:?}",
                self.cascade_wait(&t.scenario, cascade.channels.len().max(1))
                    .unwrap_or_default()
            ),
        };
        let send_id = self.emit_send(ctx, &t, next, ledger, &[], &reason)?;
        let step = cascade.channels.len();
        let h = kairos_core::ids::stable_hash(&send_id);
        remember(&mut ledger.cascade_followups, h, CASCADE_FOLLOWUPS_KEPT);
        cascade.channels.push(next);
        cascade.send_ids.push(send_id.clone());
        cascade.latest_settled = false;
        cascade.latest_failed = false;
        self.record_decision(
            ctx,
            &subject,
            deterministic_id(&[&t.trigger_id, "cascade", &step.to_string()]),
            (DecisionOutcome::sent, Some(next), Some(send_id)),
            "cascade",
            reason,
        );
        if let Some(wait) = self.cascade_wait(&t.scenario, cascade.channels.len()) {
            ledger.cascades.insert(t.trigger_id.clone(), cascade);
            // The next step could not go out in the quiet hours: a reaction until
            // their end still stops it.
            let check_at = self.outside_quiet_hours(now + ms(wait), &t);
            ctx.schedule(&cascade_timer(&t.trigger_id), check_at, &t)?;
        }
        Ok(true)
    }

    /// When a cascade's step on `next` may go out, if not at `now`: the minimum gap
    /// and the conflict window hold against the customer's other marketing messages,
    /// not against the cascade's own (one message on several channels).
    fn cascade_spacing(
        &self,
        now: Millis,
        next: Channel,
        ledger: &CustomerLedger,
        cascade: &Cascade,
    ) -> Option<Millis> {
        // The cascade's own sends, by their send ids' times and channels; one without
        // an address (in-app, webhook) is not kept by id: any send of the cascade's
        // scenario on that channel at one of the scenario's send times is taken for it.
        let mut own: Vec<(Millis, Channel)> = Vec::new();
        let mut unaddressed: Vec<Channel> = Vec::new();
        for (send_id, channel) in cascade.send_ids.iter().zip(&cascade.channels) {
            match ledger.sent_to.get(send_id) {
                Some((at, _)) => own.push((*at, *channel)),
                None => unaddressed.push(*channel),
            }
        }
        let scenario_times: Vec<Millis> = match unaddressed.is_empty() {
            true => Vec::new(),
            false => (ledger.scenario_sends.iter())
                .filter(|(_, scenario)| *scenario == cascade.scenario.as_str())
                .map(|(at, _)| *at)
                .collect(),
        };
        // Each own send takes out one matching entry: another message sent on the
        // same channel in the same millisecond is still another's.
        let others = ledger.sends.iter().filter(|(at, channel, c)| {
            if *c == MessageCategory::transactional {
                return false;
            }
            if let Some(i) = own.iter().position(|o| *o == (*at, *channel)) {
                own.swap_remove(i);
                return false;
            }
            !(unaddressed.contains(channel) && scenario_times.contains(at))
        });
        let gap = self.config.arbiter.min_gap.as_millis() as Millis;
        let window = self.config.arbiter.conflict_window.as_millis() as Millis;
        let until = others
            .flat_map(|(at, channel, _)| {
                let gap_ends = at + gap;
                let window_ends = (*channel != next).then_some(at + window);
                [Some(gap_ends), window_ends]
            })
            .flatten()
            .max()?;
        (until > now).then_some(until)
    }

    /// `verdict`, unless it queues a new marketing message behind `QUEUED_KEPT`
    /// others: that one is suppressed instead, with what it would have waited for.
    fn bounded_queue(&self, t: &Trigger, ledger: &CustomerLedger, verdict: Verdict) -> Verdict {
        let marketing_waiting = || {
            (ledger.queued.values())
                .filter(|q| q.category != Some(MessageCategory::transactional))
                .count()
        };
        let full = verdict.defer_until.is_some()
            && t.category != MessageCategory::transactional
            && !ledger.queued.contains_key(&t.trigger_id)
            && marketing_waiting() >= QUEUED_KEPT;
        if !full {
            return verdict;
        }
        Verdict::no(
            DecisionOutcome::suppressed,
            QUEUE_FULL,
            format!(
                "{} marketing messages already wait for this customer; this one would have \
                 waited: {}: {}",
                marketing_waiting(),
                verdict.rule,
                verdict.reason
            ),
        )
    }

    /// Emits a decision on the decisions topic and counts it.
    fn record_decision(
        &self,
        ctx: &mut Ctx<'_>,
        t: &Subject<'_>,
        decision_id: String,
        verdict: (DecisionOutcome, Option<Channel>, Option<String>),
        rule: &str,
        reason: String,
    ) {
        self.record_decision_in(ctx, t, decision_id, verdict, rule, reason, None);
    }

    /// Records the final decision of trigger `t` (its id `[trigger id, "decision"]`),
    /// with the customer's experiment group if it is a marketing trigger.
    fn record_final_decision(
        &self,
        ctx: &mut Ctx<'_>,
        t: &Subject<'_>,
        verdict: (DecisionOutcome, Option<Channel>, Option<String>),
        rule: &str,
        reason: String,
    ) {
        let group = self.experiment_group(t, verdict.0);
        let id = deterministic_id(&[t.trigger_id, "decision"]);
        self.record_decision_in(ctx, t, id, verdict, rule, reason, group);
    }

    /// The group a marketing trigger's final decision counts in for lift: the one the
    /// customer was drawn into, whatever the decision (intent to treat). Counting only
    /// the messages sent against the hold-outs would leave out the treated customers
    /// the messages themselves stopped (a sunset after ignored messages, an
    /// unsubscribe, a complaint, a bounce), whose control twins are still counted.
    fn experiment_group(
        &self,
        t: &Subject<'_>,
        outcome: DecisionOutcome,
    ) -> Option<ExperimentGroup> {
        if t.category == MessageCategory::transactional {
            return None;
        }
        match outcome {
            DecisionOutcome::sent => Some(ExperimentGroup::treatment),
            DecisionOutcome::held_out => Some(ExperimentGroup::control),
            DecisionOutcome::deferred | DecisionOutcome::duplicate => None,
            DecisionOutcome::suppressed | DecisionOutcome::expired | DecisionOutcome::cancelled => {
                let control = self.in_control_group(t.customer_id)
                    || self
                        .in_scenario_holdout(t.scenario, t.customer_id)
                        .is_some();
                Some(match control {
                    true => ExperimentGroup::control,
                    false => ExperimentGroup::treatment,
                })
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record_decision_in(
        &self,
        ctx: &mut Ctx<'_>,
        t: &Subject<'_>,
        decision_id: String,
        (outcome, channel, send_id): (DecisionOutcome, Option<Channel>, Option<String>),
        rule: &str,
        reason: String,
        group: Option<ExperimentGroup>,
    ) {
        let decision = DecisionRef {
            decision_id: &decision_id,
            trigger_id: t.trigger_id,
            customer_id: t.customer_id,
            scenario: t.scenario,
            category: t.category,
            outcome,
            channel,
            send_id: send_id.as_deref(),
            rule,
            reason: &reason,
            decided_at: ctx.now(),
            group,
        };
        self.decisions.inc(&[outcome.as_str(), rule]);
        ctx.emit(&self.decisions_topic, t.customer_id, &decision);
    }

    /// Decides a trigger: one arriving (`queued` false) or one whose deferral ended.
    fn decide_trigger(
        &mut self,
        ctx: &mut Ctx<'_>,
        t: Trigger,
        queued: bool,
    ) -> anyhow::Result<()> {
        let customer_id = t.customer_id.clone();
        self.with_ledger(ctx, &customer_id, |this, ctx, ledger, known| {
            // A ledger begun by a version that kept one key per decided trigger may
            // have decided the triggers fired before now that way.
            let legacy_until = if known { ctx.now() } else { Millis::MIN };
            ledger.legacy_dedup_until.get_or_insert(legacy_until);
            this.decide_with_ledger(ctx, t, queued, ledger)?;
            Ok(true)
        })
    }

    /// A deferred trigger's wait is over. The customer's other queued triggers due by
    /// now (all deferred to the same end of the quiet hours or the same midnight) are
    /// decided with it, highest priority first, then in the order they fired, then by
    /// id: their timers would otherwise fire in the order of their ids, and the first
    /// would take the caps whatever its priority.
    fn decide_released(&mut self, ctx: &mut Ctx<'_>, t: Trigger) -> anyhow::Result<()> {
        let customer_id = t.customer_id.clone();
        self.with_ledger(ctx, &customer_id, |this, ctx, ledger, known| {
            let legacy_until = if known { ctx.now() } else { Millis::MIN };
            ledger.legacy_dedup_until.get_or_insert(legacy_until);
            let now = ctx.now();
            if let Some(wake) = this.slot_still_held(&t, ledger, now) {
                // A look at the slot it waits for, held as before: it waits on,
                // undecided (the rules it passed are not weighed again each hour).
                ctx.schedule(&["defer/", t.trigger_id.as_str()].concat(), wake, &t)?;
                if let Some(q) = ledger.queued.get_mut(&t.trigger_id) {
                    q.wake_at = Some(wake);
                }
                return Ok(true);
            }
            let mut due = vec![t];
            for trigger_id in ledger.queued.keys() {
                if *trigger_id == due[0].trigger_id {
                    continue;
                }
                let timer = ["defer/", trigger_id.as_str()].concat();
                if ctx.timer_fire_at(&timer)?.is_none_or(|at| at > now) {
                    continue;
                }
                // One that does not decode is left to fail on its own timer.
                if let Ok(Some((_, other))) = ctx.timer_payload::<Trigger>(&timer) {
                    due.push(other);
                }
            }
            due.sort_by(|a, b| {
                b.priority
                    .cmp(&a.priority)
                    .then(a.fired_at.cmp(&b.fired_at))
                    .then_with(|| a.trigger_id.cmp(&b.trigger_id))
            });
            let was_queued: Vec<bool> = due
                .iter()
                .map(|t| ledger.queued.contains_key(&t.trigger_id))
                .collect();
            for (t, was_queued) in due.into_iter().zip(was_queued) {
                // Ended by an earlier one of the batch (a step of its chain): decided.
                if was_queued && !ledger.queued.contains_key(&t.trigger_id) {
                    continue;
                }
                // Decided here, so its own timer must not decide it again.
                ctx.cancel(&["defer/", t.trigger_id.as_str()].concat())?;
                this.decide_with_ledger(ctx, t, true, ledger)?;
            }
            Ok(true)
        })
    }

    fn decide_with_ledger(
        &mut self,
        ctx: &mut Ctx<'_>,
        mut t: Trigger,
        queued: bool,
        ledger: &mut CustomerLedger,
    ) -> anyhow::Result<()> {
        // One trigger id, one final decision: a re-delivered trigger is ignored.
        if !queued {
            let h = kairos_core::ids::stable_hash(&t.trigger_id);
            let legacy = ledger
                .legacy_dedup_until
                .is_some_and(|until| t.fired_at <= until);
            let seen_before_upgrade =
                legacy && ctx.get::<Millis>(&format!("t/{}", t.trigger_id))?.is_some();
            // One still waiting in the queue or cascading was seen, however many
            // triggers came since (the recent ids are bounded): its own timer decides it.
            let in_flight = ledger.queued.contains_key(&t.trigger_id)
                || ledger.cascades.contains_key(&t.trigger_id);
            if seen_before_upgrade
                || in_flight
                || !remember_trigger(ledger, h, t.valid_until, ctx.now())
            {
                self.decisions
                    .inc(&[DecisionOutcome::duplicate.as_str(), "trigger_id"]);
                return Ok(());
            }
        }
        // Both are needed more than once below: work them out once per decision.
        let chain = self.chain_of(&t);
        if let Some(into) = ledger.merged_into.clone() {
            // Fired before the merge and arriving after it (triggers and the merge
            // travel on different topics): the survivor decides it, as it decides
            // what this customer had queued.
            return self.forward_trigger(ctx, t, chain, &into);
        }
        ledger.settle_zone(&mut t);
        self.release_switched_off_main(ctx, ledger, Some(&t.trigger_id))?;
        let offers = offers_of(&t);
        let Verdict {
            outcome,
            channel,
            rule,
            reason,
            defer_until,
        } = {
            let verdict = self.decide(ctx, &t, ledger, chain.as_deref(), &offers);
            self.bounded_queue(&t, ledger, verdict)
        };
        let now = ctx.now();
        let subject = Subject::of(&t);
        if let Some(until) = defer_until {
            // The queue is the timer index: the trigger waits in state until the rule
            // allows it, or until its valid-until, when it is decided "expired".
            // A marketing message waking within the quiet hours (a gap or a cap ending
            // at night) would only wait again: it wakes when they end. Not a merge
            // poll: the survivor's zone may differ.
            let until = match rule {
                MERGE_PENDING => until,
                _ => self.outside_quiet_hours(until, &t),
            };
            let wake = until.min(t.valid_until + 1);
            ctx.schedule(&["defer/", t.trigger_id.as_str()].concat(), wake, &t)?;
            // The merge wait polls every minute until the merged ledger is in: a poll
            // that changes nothing is not a new decision (in a replay, where the
            // ledger comes with the next commit, it polled thousands of times).
            let earlier = ledger.queued.get(&t.trigger_id);
            // So is a look at a chain's slot that finds it held as before.
            let same_wait = |q: &Queued| {
                q.rule.as_deref() == Some(rule)
                    && (rule == MERGE_PENDING
                        || q.reasons.last().map(String::as_str)
                            == Some([rule, ": ", &reason].concat().as_str()))
            };
            let polled_again =
                matches!(rule, MERGE_PENDING | MAIN_SCENARIO) && earlier.is_some_and(same_wait);
            let mut reasons = earlier.map(|q| q.reasons.clone()).unwrap_or_default();
            if !polled_again {
                note_reason(&mut reasons, rule, &reason);
            }
            // Kept through other deferrals: the hour is counted once.
            let merge_wait_since = earlier
                .and_then(|q| q.merge_wait_since)
                .or((rule == MERGE_PENDING).then_some(now));
            ledger.queued.insert(
                t.trigger_id.clone(),
                Queued {
                    scenario: t.scenario.clone(),
                    category: Some(t.category),
                    cause_occurred_at: t.cause_occurred_at,
                    rule: Some(rule.to_string()),
                    trigger: (rule == MAIN_SCENARIO).then(|| Box::new(t.clone())),
                    wake_at: Some(wake),
                    chain,
                    step: t.step,
                    reasons,
                    merge_wait_since,
                },
            );
            if polled_again {
                return Ok(());
            }
            self.record_decision(
                ctx,
                &subject,
                // With the rule: a trigger woken early (a chain's slot freed) may
                // wait until the same time for another rule, a decision of its own.
                deterministic_id(&[&t.trigger_id, "deferred", rule, &wake.to_string()]),
                (outcome, None, None),
                rule,
                format!("{reason}; decided again at {wake}"),
            );
            return Ok(());
        }
        let earlier_reasons = ledger
            .queued
            .remove(&t.trigger_id)
            .map(|q| q.reasons)
            .unwrap_or_default();
        let mut send_id = None;
        if let Some(c) = channel {
            let last_reason = [rule, ": ", &reason].concat();
            let id = self.emit_send(ctx, &t, c, ledger, &earlier_reasons, &last_reason)?;
            if let Some(wait) = self.cascade_wait(&t.scenario, 1) {
                ledger.cascades.insert(
                    t.trigger_id.clone(),
                    Cascade {
                        scenario: t.scenario.clone(),
                        category: Some(t.category),
                        channels: vec![c],
                        send_ids: vec![id.clone()],
                        cause_occurred_at: Some(t.cause_occurred_at),
                        handed_over: None,
                        latest_put_off: false,
                        latest_settled: false,
                        latest_failed: false,
                    },
                );
                let check_at = self.outside_quiet_hours(now + ms(wait), &t);
                ctx.schedule(&cascade_timer(&t.trigger_id), check_at, &t)?;
            }
            send_id = Some(id);
            // The pipeline's latency, not the scenario's: a send held back on purpose
            // (quiet hours, a cap, a merge) is not observed, and one whose scenario
            // waits (a cart reminder an hour on) counts from when it was due.
            if !queued {
                let due = self.due_at(&t);
                self.end_to_end
                    .observe(((now - due).max(0) as f64) / 1000.0);
            }
        }
        // A hold-out stands for the send it replaces: it holds the chain's slot and
        // uses up the offer, so the other triggers of both groups fare alike.
        if matches!(outcome, DecisionOutcome::sent | DecisionOutcome::held_out) {
            if self.hold_main_scenario(now, &t, chain.as_deref(), ledger) {
                self.wake_main_waiters(ctx, ledger, None)?;
            }
            for offer in &offers {
                ledger.offers.insert(offer.clone(), now);
            }
        }
        self.record_final_decision(ctx, &subject, (outcome, channel, send_id), rule, reason);
        if let Some(chain) = chain {
            let end = match outcome {
                DecisionOutcome::sent | DecisionOutcome::held_out => StepEnd::WentOut,
                DecisionOutcome::expired | DecisionOutcome::cancelled => StepEnd::Broke,
                _ => StepEnd::Unsent,
            };
            self.chain_step_ended(ctx, ledger, &t.customer_id, chain, t.step, end)?;
        }
        Ok(())
    }

    /// Notes the final decision of step `step` of a chain instance. One that `breaks`
    /// it (expired or cancelled) ends the chain: its later steps still in the queue
    /// are cancelled now, those yet to come when they arrive.
    fn chain_step_ended(
        &self,
        ctx: &mut Ctx<'_>,
        ledger: &mut CustomerLedger,
        customer_id: &str,
        chain: String,
        step: i32,
        end: StepEnd,
    ) -> anyhow::Result<()> {
        let now = ctx.now();
        let broken_before = ledger
            .chains
            .get(&chain)
            .is_some_and(|p| p.broken && p.step < step);
        if !broken_before {
            let last_sent = match end {
                StepEnd::WentOut => Some((step, now)),
                _ => ledger.chains.get(&chain).and_then(|p| p.last_went_out()),
            };
            ledger.chains.insert(
                chain.clone(),
                ChainProgress {
                    step,
                    sent_at: (end == StepEnd::WentOut).then_some(now),
                    updated_at: now,
                    broken: end == StepEnd::Broke,
                    last_sent,
                },
            );
        }
        ledger.forget_oldest_chains();
        if end == StepEnd::Unsent {
            // The holding chain's last step, unsent (no consented channel, the
            // sunset): nothing of the chain is left to go out, so its slot frees now.
            let last_step = ledger
                .main
                .as_ref()
                .filter(|m| m.chain.as_deref() == Some(chain.as_str()))
                .and_then(|m| self.config.scenario(&m.scenario))
                .is_some_and(|s| s.remaining_after(step.max(0) as usize).is_zero());
            if last_step {
                ledger.main = None;
                self.wake_main_waiters(ctx, ledger, None)?;
            }
        }
        if end != StepEnd::Broke {
            return Ok(());
        }
        // The broken chain's instance held the main-scenario slot until its planned
        // last step: nothing of it will go out now, so the triggers waiting for the
        // slot are decided again at once.
        if ledger
            .main
            .as_ref()
            .is_some_and(|m| m.chain.as_deref() == Some(chain.as_str()))
        {
            ledger.main = None;
            self.wake_main_waiters(ctx, ledger, None)?;
        }
        let later: Vec<(String, Queued)> = ledger
            .queued
            .iter()
            .filter(|(_, q)| q.chain.as_deref() == Some(chain.as_str()) && q.step > step)
            .map(|(id, q)| (id.clone(), q.clone()))
            .collect();
        for (trigger_id, q) in later {
            let why = format!("step {step} of this chain expired or was cancelled");
            self.cancel_queued(ctx, ledger, customer_id, &trigger_id, &q, CHAIN_BROKEN, why)?;
        }
        Ok(())
    }
}

impl Processor for ArbiterProcessor {
    type Input = ArbiterInput;

    fn name(&self) -> &str {
        "arbiter"
    }

    fn inputs(&self) -> Vec<String> {
        vec![
            self.triggers_topic.clone(),
            self.outcomes_topic.clone(),
            self.actions_topic.clone(),
        ]
    }

    fn outputs(&self) -> Vec<String> {
        let mut topics = vec![self.decisions_topic.clone()];
        topics.extend(
            self.config
                .delivery
                .keys()
                .map(|c| self.config.send_topic(*c)),
        );
        topics.push(self.actions_topic.clone());
        topics
    }

    fn decode(&self, record: &Record<'_>) -> Result<ArbiterInput, Rejection> {
        if record.topic == self.outcomes_topic {
            Ok(ArbiterInput::Outcome(Box::new(decode_internal(
                record.payload,
            )?)))
        } else if record.topic == self.actions_topic {
            let action: CustomerAction = decode_internal(record.payload)?;
            // A merged ledger that does not decode goes to the dead-letter topic with
            // the reason, instead of failing the partition on every read.
            let state_error = match (action.kind, &action.state) {
                (CustomerActionKind::merge_in, Some(state)) => {
                    serde_json::from_str::<CustomerLedger>(state)
                        .err()
                        .map(|e| format!("state: the merged ledger does not decode: {e}"))
                }
                (CustomerActionKind::outcome, Some(state)) => {
                    serde_json::from_str::<Outcome>(state)
                        .err()
                        .map(|e| format!("state: the forwarded outcome does not decode: {e}"))
                }
                _ => None,
            };
            if let Some(reason) = state_error {
                return Err(Rejection::new(DeadLetterReason::invalid_field, reason));
            }
            Ok(ArbiterInput::Action(Box::new(action)))
        } else {
            Ok(ArbiterInput::Trigger(Box::new(decode_internal(
                record.payload,
            )?)))
        }
    }

    fn event_time(&self, input: &ArbiterInput) -> Option<Millis> {
        Some(match input {
            ArbiterInput::Trigger(t) => t.fired_at,
            ArbiterInput::Outcome(o) => o.occurred_at,
            ArbiterInput::Action(a) => a.occurred_at,
        })
    }

    fn process(&mut self, ctx: &mut Ctx<'_>, input: ArbiterInput) -> anyhow::Result<()> {
        match input {
            ArbiterInput::Trigger(t) => self.decide_trigger(ctx, *t, false),
            ArbiterInput::Outcome(o)
                if outcome_concerns_ledger(o.kind) || outcome_concerns_cascade(o.kind) =>
            {
                self.with_ledger(ctx, &o.customer_id, |this, ctx, ledger, known| {
                    // A report on an old message of a customer forgotten since makes no
                    // ledger, which no `forgotten` would take away again; a suppression
                    // does, as it must hold.
                    let suppresses = matches!(
                        o.kind,
                        OutcomeKind::unsubscribed
                            | OutcomeKind::complained
                            | OutcomeKind::bounced_hard
                    );
                    if !known && !suppresses {
                        return Ok(false);
                    }
                    let applied =
                        outcome_concerns_ledger(o.kind) && this.apply_outcome(ctx, &o, ledger)?;
                    let followed = outcome_concerns_cascade(o.kind)
                        && this.follow_cascade_message(ctx, &o, ledger)?;
                    Ok(followed || applied)
                })
            }
            ArbiterInput::Outcome(_) => Ok(()),
            ArbiterInput::Action(a) if a.kind == CustomerActionKind::forgotten => {
                self.forget(ctx, &a)
            }
            ArbiterInput::Action(a) => {
                self.with_ledger(ctx, &a.customer_id, |this, ctx, ledger, known| {
                    // Nothing waits for a customer the arbiter has no ledger of, but a
                    // trigger fired before the change (a welcome, say) may still be on
                    // its way: the note is kept for it a while, in a ledger made for
                    // it, which goes again if nothing else came.
                    if a.kind == CustomerActionKind::contacts_changed && !known {
                        let timer = [CONTACTS_NOTE_EXPIRY, a.customer_id.as_str()].concat();
                        let expires = a
                            .occurred_at
                            .max(ctx.now())
                            .saturating_add(LONE_CONTACTS_KEPT);
                        ctx.schedule(&timer, expires, &a.customer_id)?;
                    }
                    this.apply_action(ctx, &a, ledger)
                })
            }
        }
    }

    /// A deferred trigger's wait is over: decide it again.
    fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: &DueTimer) -> anyhow::Result<()> {
        if let Some(customer) = timer.timer_id.strip_prefix(MERGED_LEDGER_EXPIRY) {
            return self.shrink_forwarding_ledger(ctx, customer);
        }
        if let Some(customer) = timer.timer_id.strip_prefix(CONTACTS_NOTE_EXPIRY) {
            return self.expire_lone_contacts(ctx, customer, timer.fire_at);
        }
        let t: Trigger = timer
            .decode()
            .with_context(|| format!("timer {} payload does not decode", timer.timer_id))?;
        if timer.timer_id.starts_with(CASCADE_TIMER_PREFIX) {
            let customer_id = t.customer_id.clone();
            self.with_ledger(ctx, &customer_id, |this, ctx, ledger, _| {
                this.cascade_step(ctx, t, ledger)
            })
        } else {
            self.decide_released(ctx, t)
        }
    }

    fn flush(&mut self, ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
        self.ledgers.flush(ctx)
    }

    fn on_partition_closed(&mut self, partition: i32) {
        self.ledgers.close(partition);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The slot of a chain whose last step waits in the queue (quiet hours, a cap) is
    /// held until that step wakes, and the grace after: a waiter woken at the same
    /// moment would go out before it. A queued trigger of another scenario or chain
    /// instance holds nothing.
    #[test]
    fn a_chain_s_last_step_waiting_in_the_queue_keeps_its_slot() {
        let queued = |scenario: &str, chain: &str, wake_at: Millis| Queued {
            scenario: scenario.into(),
            chain: Some(chain.into()),
            wake_at: Some(wake_at),
            ..Queued::default()
        };
        let mut ledger = CustomerLedger {
            main: Some(MainScenario {
                scenario: "onboarding".into(),
                priority: 50,
                until: 1_000,
                cause_occurred_at: None,
                chain: Some("onboarding/signup".into()),
            }),
            ..CustomerLedger::default()
        };
        assert_eq!(ledger.main_frees_at(), Some(1_000 + LAST_STEP_GRACE));
        ledger
            .queued
            .insert("other".into(), queued("welcome", "welcome/x", 50_000));
        ledger.queued.insert(
            "older".into(),
            queued("onboarding", "onboarding/old", 60_000),
        );
        assert_eq!(ledger.main_frees_at(), Some(1_000 + LAST_STEP_GRACE));
        ledger.queued.insert(
            "last".into(),
            queued("onboarding", "onboarding/signup", 40_000),
        );
        assert_eq!(ledger.main_frees_at(), Some(40_000 + LAST_STEP_GRACE));
        ledger.main = None;
        assert_eq!(ledger.main_frees_at(), None);
    }

    /// A cascade's later step delivered after its customer was merged away counts
    /// once towards the survivor's sunset, as it would have before the merge.
    #[test]
    fn a_merge_keeps_the_survivor_s_time_zone_as_the_profile_does() {
        let zone = |at: Millis, name: Option<&str>| Some((at, name.map(CompactString::from)));
        let merged = || CustomerLedger {
            zone: zone(20, Some("Europe/London")),
            ..CustomerLedger::default()
        };
        let mut survivor = CustomerLedger {
            zone: zone(10, Some("Asia/Tokyo")),
            ..CustomerLedger::default()
        };
        survivor.absorb(merged());
        assert_eq!(survivor.zone, zone(10, Some("Asia/Tokyo")));
        // A survivor whose triggers named no zone takes the merged customer's.
        let mut unnamed = CustomerLedger {
            zone: zone(30, None),
            ..CustomerLedger::default()
        };
        unnamed.absorb(merged());
        assert_eq!(unnamed.zone, zone(20, Some("Europe/London")));
    }

    #[test]
    fn a_merge_keeps_a_cascade_s_later_steps_out_of_the_sunset_count() {
        let followup = "s-push";
        let merged = CustomerLedger {
            cascade_followups: vec![kairos_core::ids::stable_hash(followup)],
            ..CustomerLedger::default()
        };
        let mut survivor = CustomerLedger::default();
        survivor.absorb(merged);
        let delivered = Outcome {
            outcome_id: "s-push-delivered".into(),
            send_id: followup.into(),
            customer_id: "c2".into(),
            scenario: "abandoned_cart".into(),
            channel: Channel::push,
            category: MessageCategory::trigger,
            kind: OutcomeKind::delivered,
            reason: None,
            occurred_at: 1_000,
            address: None,
        };
        assert!(survivor.apply_outcome(&delivered, None));
        assert_eq!(
            survivor.ignored_in_row, 0,
            "the cascade counted by its first"
        );
        assert_eq!(survivor.engagement[&Channel::push].ignored_in_row, 1);
    }

    /// Two merged customers' rows of ignored messages make one: every delivery of
    /// either after the later reaction (here the merged customer's purchase).
    #[test]
    fn a_merge_counts_both_rows_of_ignored_messages_after_the_later_reaction() {
        let mut survivor = CustomerLedger {
            ignored_in_row: 3,
            ignored_deliveries: vec![10, 20, 30],
            ..CustomerLedger::default()
        };
        let merged = CustomerLedger {
            ignored_in_row: 2,
            ignored_deliveries: vec![40, 50],
            last_purchase_at: Some(25),
            ..CustomerLedger::default()
        };
        survivor.absorb(merged);
        assert_eq!(
            (
                survivor.ignored_in_row,
                survivor.ignored_deliveries.as_slice()
            ),
            (3, [30, 40, 50].as_slice())
        );
    }

    /// A purchase a device dated ahead ended the row when it was read: a merge (or a
    /// queued trigger handed over, which comes as a ledger to absorb) keeps the
    /// deliveries counted after that, not only those after the purchase's own date.
    #[test]
    fn a_merge_ends_the_row_where_a_purchase_dated_ahead_ended_it() {
        let mut survivor = CustomerLedger {
            last_purchase_at: Some(100),
            ..CustomerLedger::default()
        };
        // Read at 20: the row ends there.
        survivor.reacted_at(20);
        for delivered in [30, 40] {
            survivor.ignored_in_row += 1;
            survivor.ignored_deliveries.push(delivered);
        }
        survivor.absorb(CustomerLedger::default());
        assert_eq!(
            (
                survivor.ignored_in_row,
                survivor.ignored_deliveries.as_slice()
            ),
            (2, [30, 40].as_slice())
        );
    }

    /// A ledger kept before its last reaction was: a reaction reported late after the
    /// upgrade does not move the latest one back to it.
    #[test]
    fn a_late_reaction_keeps_the_later_one_a_ledger_knew_before() {
        let mut ledger = CustomerLedger::default();
        ledger.engagement.insert(
            Channel::email,
            ChannelEngagement {
                engaged_at: Some(500),
                ..ChannelEngagement::default()
            },
        );
        ledger.reacted_at(100);
        assert_eq!(ledger.latest_reaction(), Some(500));
    }

    /// `pause_after_purchase = "0s"` turns the pause off, also after a purchase a
    /// device dated ahead of the arbiter's clock (wall-clock mode; event time never
    /// runs behind a purchase it has read).
    #[test]
    fn a_zero_pause_after_purchase_pauses_nothing() {
        let pause = |setting: &str| {
            let text = format!("[arbiter]\npause_after_purchase = \"{setting}\"\n");
            let config =
                Config::from_text(std::path::Path::new("t.toml"), &text, &[]).expect("config");
            let arbiter = ArbiterProcessor::new(Arc::new(config), &prometheus::Registry::new());
            let ledger = CustomerLedger {
                last_purchase_at: Some(1_000 + 3 * HOUR),
                ..CustomerLedger::default()
            };
            arbiter.purchase_pause(1_000, &ledger)
        };
        assert_eq!(pause("0s"), None);
        assert!(pause("2d").is_some_and(|why| why.contains("bought at")));
    }

    /// An open, click or purchase reported late clears only the messages delivered
    /// before it from the sunset count; a delivery reported after a reaction later
    /// than it (on any channel) is not counted at all.
    #[test]
    fn a_late_reaction_clears_only_the_deliveries_before_it() {
        let outcome = |id: &str, channel: Channel, kind: OutcomeKind, at: Millis| Outcome {
            outcome_id: id.into(),
            send_id: format!("s-{id}"),
            customer_id: "c1".into(),
            scenario: "weekly_promo".into(),
            channel,
            category: MessageCategory::promo,
            kind,
            reason: None,
            occurred_at: at,
            address: None,
        };
        let mut ledger = CustomerLedger::default();
        for (id, at) in [("d1", 1_000), ("d3", 3_000), ("d2", 2_000)] {
            assert!(ledger.apply_outcome(
                &outcome(id, Channel::email, OutcomeKind::delivered, at),
                None
            ));
        }
        assert_eq!(ledger.ignored_in_row, 3);
        // The open of the first message, reported after the other two were delivered.
        assert!(ledger.apply_outcome(
            &outcome("o1", Channel::email, OutcomeKind::opened, 1_500),
            None
        ));
        assert_eq!(ledger.ignored_in_row, 2, "two delivered after the open");
        assert_eq!(ledger.ignored_deliveries, [2_000, 3_000]);
        // A push opened at 4,000, then an e-mail delivery of 3,500 reported late.
        assert!(ledger.apply_outcome(
            &outcome("o2", Channel::push, OutcomeKind::opened, 4_000),
            None
        ));
        assert_eq!(ledger.ignored_in_row, 0);
        assert!(ledger.apply_outcome(
            &outcome("d4", Channel::email, OutcomeKind::delivered, 3_500),
            None
        ));
        assert_eq!(ledger.ignored_in_row, 0, "the customer reacted after it");
        // More deliveries than remembered, and a reaction older than all of them: the
        // count stands.
        for n in 0..IGNORED_KEPT as i64 + 3 {
            let id = format!("m{n}");
            assert!(ledger.apply_outcome(
                &outcome(&id, Channel::email, OutcomeKind::delivered, 10_000 + n),
                None
            ));
        }
        assert_eq!(ledger.ignored_in_row, IGNORED_KEPT as u32 + 3);
        assert!(ledger.apply_outcome(
            &outcome("o3", Channel::email, OutcomeKind::clicked, 9_000),
            None
        ));
        assert_eq!(ledger.ignored_in_row, IGNORED_KEPT as u32 + 3);
        assert!(ledger.apply_outcome(
            &outcome("o4", Channel::email, OutcomeKind::clicked, 10_010),
            None
        ));
        assert_eq!(ledger.ignored_in_row, IGNORED_KEPT as u32 + 3 - 11);
        // A count of a version that remembered no times is cleared by any reaction.
        let mut legacy = CustomerLedger {
            ignored_in_row: 5,
            ..CustomerLedger::default()
        };
        assert!(legacy.apply_outcome(&outcome("o5", Channel::email, OutcomeKind::opened, 1), None));
        assert_eq!(legacy.ignored_in_row, 0);
    }

    /// Trigger ids an earlier version remembered (without valid-until) still make a
    /// copy a duplicate, and then age out as the newest `RECENT_TRIGGERS` would.
    #[test]
    fn trigger_ids_remembered_by_an_earlier_version_carry_over() {
        let mut ledger = CustomerLedger {
            recent_triggers: vec![1, 2],
            ..CustomerLedger::default()
        };
        assert!(!remember_trigger(&mut ledger, 2, 100, 0), "a duplicate");
        assert!(ledger.recent_triggers.is_empty());
        assert_eq!(
            ledger.decided_triggers,
            [(1, Millis::MIN), (2, Millis::MIN)]
        );
        for h in 3..3 + RECENT_TRIGGERS as u64 {
            assert!(remember_trigger(&mut ledger, h, 1_000, 500));
        }
        // Older than the newest kept and of unknown validity: let go; the rest stay.
        assert!(!ledger.decided_triggers.iter().any(|(h, _)| *h <= 2));
        assert_eq!(ledger.decided_triggers.len(), RECENT_TRIGGERS);
        // Past the newest kept, still-valid ids stay, up to `TRIGGERS_KEPT`.
        for h in 1_000..1_000 + TRIGGERS_KEPT as u64 {
            assert!(remember_trigger(&mut ledger, h, 1_000, 500));
        }
        assert_eq!(ledger.decided_triggers.len(), TRIGGERS_KEPT);
        assert_eq!(
            ledger.decided_triggers.last(),
            Some(&(1_000 + TRIGGERS_KEPT as u64 - 1, 1_000))
        );
    }

    /// A queue entry stored before the wake-up, chain and reasons were appended.
    #[test]
    fn queue_entries_stored_before_the_chain_fields_still_read() {
        #[derive(Serialize)]
        struct OldQueued {
            scenario: String,
            category: Option<MessageCategory>,
            cause_occurred_at: Millis,
            rule: Option<String>,
            trigger: Option<Box<Trigger>>,
        }
        let old = OldQueued {
            scenario: "welcome".into(),
            category: Some(MessageCategory::trigger),
            cause_occurred_at: 42,
            rule: Some("quiet_hours".into()),
            trigger: None,
        };
        let bytes = kairos_core::encoding::encode_state(&old).expect("encode");
        let q: Queued = kairos_core::encoding::decode_state(&bytes).expect("decode");
        assert_eq!(
            q,
            Queued {
                scenario: "welcome".into(),
                category: Some(MessageCategory::trigger),
                cause_occurred_at: 42,
                rule: Some("quiet_hours".into()),
                ..Queued::default()
            }
        );
    }

    /// The hand-built reason reads exactly as `Debug` of the channel names wrote it,
    /// so decisions keep their text.
    #[test]
    fn first_channel_reason_reads_as_the_debug_list_did() {
        let lists: [&[Channel]; 3] = [
            &[],
            &[Channel::email],
            &[Channel::email, Channel::push, Channel::sms],
        ];
        for channels in lists {
            let names: Vec<&str> = channels.iter().map(|c| c.as_str()).collect();
            assert_eq!(
                first_channel_reason(channels),
                format!("first channel of {names:?} with consent and an address")
            );
        }
    }
}
