//! Property tests over random trigger and outcome streams: whatever arrives, no
//! customer exceeds a cap (overall, the push channel's own or the promo scenario's),
//! cascade steps included, nothing non-transactional goes out in quiet hours, closer
//! than the minimum gap or on another channel within the conflict window after
//! another trigger's message (a cascade's own steps aside: its wait is their gap),
//! nothing is sent
//! without consent or after an unsubscribe, no
//! send id repeats, nothing of a scenario that ends on purchase goes out after a
//! purchase that followed its cause, nothing of a segment's scenario goes out after
//! the customer left the segment after its cause, no promo goes out within two days of
//! a purchase, every trigger ends in exactly one final decision, and a transactional
//! message with a channel it may use is sent (so an arbiter that sends nothing
//! fails); streams
//! start in January and just before the 2026 clock changes of New York and Berlin.
//! A stream may merge two customers (as the identity processor does): what the
//! merged one had queued, and a trigger of it arriving after the merge, is decided
//! once, for the survivor; its unsubscribes, purchases, segment exits and sends hold
//! there (the caps count the person's messages from the merge on), however late or
//! often the merged ledger arrives.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Arbiter, T0};
use kairos_core::calendar;
use kairos_core::contracts::{
    Channel, Contacts, DecisionOutcome, MessageCategory, Outcome, OutcomeKind, Trigger,
};
use kairos_core::ids::deterministic_id;
use kairos_core::time::{DAY, HOUR, MINUTE};
use proptest::prelude::*;

/// Each customer's time zone. Customers 1 and 4 share one, so that merging them keeps
/// each of the person's days one calendar day (caps count per local day).
const ZONES: [&str; 5] = [
    "UTC",
    "Europe/Berlin",
    "Asia/Tokyo",
    "America/New_York",
    "Europe/Berlin",
];
/// The two customers a stream may merge.
const MERGEABLE: (usize, usize) = (1, 4);
/// Starts of the 4-day streams: a plain January week, and the days before the clock
/// changes of New York (8 March, 1 November) and Berlin (29 March, 25 October) 2026.
const STARTS: [i64; 5] = [
    T0,
    1_772_841_600_000, // 2026-03-07T00:00:00Z
    1_774_656_000_000, // 2026-03-28T00:00:00Z
    1_792_800_000_000, // 2026-10-24T00:00:00Z
    1_793_404_800_000, // 2026-10-31T00:00:00Z
];
const CHANNELS: [Channel; 2] = [Channel::email, Channel::push];
const PACING: &str = "daily_cap = 2\nweekly_cap = 6\nmin_gap = \"30m\"\nquiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"\nchannel_caps = { push = { daily_cap = 1 } }";

#[derive(Debug, Clone)]
enum Event {
    Trigger {
        customer: usize,
        minute: i64,
        category: MessageCategory,
        consent: (bool, bool),
        valid_hours: i64,
        redeliver: bool,
        /// A trigger message of the cascading scenario (e-mail, then push after 1 h).
        cascade: bool,
        /// A trigger message of the segment's scenario (cascading too).
        segment: bool,
    },
    /// The customer left the segment (as the profile reports it).
    LeftSegment {
        customer: usize,
        minute: i64,
    },
    Unsubscribe {
        customer: usize,
        minute: i64,
        channel: Channel,
    },
    Purchase {
        customer: usize,
        minute: i64,
    },
    /// One of the `MERGEABLE` customers is merged into the other (the first such
    /// event of a stream; later ones change nothing).
    Merge {
        minute: i64,
        first_into_second: bool,
        /// The merged ledger reaches the survivor only after the next event.
        late: bool,
        /// Every record the merge sends is delivered twice (an outbox after a crash).
        twice: bool,
    },
}

impl Event {
    fn minute(&self) -> i64 {
        match self {
            Event::Trigger { minute, .. }
            | Event::Unsubscribe { minute, .. }
            | Event::Purchase { minute, .. }
            | Event::LeftSegment { minute, .. }
            | Event::Merge { minute, .. } => *minute,
        }
    }
}

/// The promo scenario of the test configuration, and its own cap added to it.
const PROMO_SCENARIO: &str = "template = \"promo\"\nexit_on_purchase = false";
const PROMO_CAPS: &str = "caps = { weekly_cap = 2 }";

fn event() -> impl Strategy<Value = Event> {
    let category = prop_oneof![
        1 => Just(MessageCategory::transactional),
        3 => Just(MessageCategory::trigger),
        2 => Just(MessageCategory::promo),
    ];
    prop_oneof![
        8 => (0..5usize, 0..(4 * 24 * 60i64), category, any::<(bool, bool)>(), 1..72i64, prop::bool::weighted(0.15), prop::sample::select(vec![0u8, 0, 0, 0, 1, 1, 2]))
            .prop_map(|(customer, minute, category, consent, valid_hours, redeliver, kind)| Event::Trigger {
                customer, minute, category, consent, valid_hours, redeliver,
                cascade: kind == 1 && category == MessageCategory::trigger,
                segment: kind == 2 && category == MessageCategory::trigger,
            }),
        1 => (0..5usize, 0..(4 * 24 * 60i64), 0..2usize).prop_map(|(customer, minute, c)| {
            Event::Unsubscribe { customer, minute, channel: CHANNELS[c] }
        }),
        1 => (0..5usize, 0..(4 * 24 * 60i64)).prop_map(|(customer, minute)| {
            Event::Purchase { customer, minute }
        }),
        1 => (0..5usize, 0..(4 * 24 * 60i64)).prop_map(|(customer, minute)| {
            Event::LeftSegment { customer, minute }
        }),
        1 => (0..(4 * 24 * 60i64), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(minute, first_into_second, late, twice)| {
                Event::Merge { minute, first_into_second, late, twice }
            }
        ),
    ]
}

fn customer_id(i: usize) -> String {
    format!("c{i}")
}

/// Hands what the arbiter emitted for other customers (a merged ledger) to them, as
/// the customer-actions topic would; each twice if `twice`.
fn deliver_actions(a: &mut Arbiter, twice: bool) {
    loop {
        let actions = std::mem::take(&mut a.actions);
        if actions.is_empty() {
            return;
        }
        for action in actions {
            for _ in 0..(1 + usize::from(twice)) {
                a.push("customer-actions", &action.customer_id.clone(), &action);
            }
        }
    }
}

/// From `since`, what the merged customer `from` did holds for the survivor `into`:
/// the survivor's arbiter has its ledger. Until then the survivor's own cascade steps
/// (fired before the merge, so not waiting for it) cannot know of it.
fn carry_facts(
    unsubscribed: &mut BTreeMap<(String, Channel), i64>,
    purchases: &mut BTreeMap<String, Vec<Fact>>,
    left_segment: &mut BTreeMap<String, Vec<Fact>>,
    from: usize,
    into: usize,
    since: i64,
) {
    let (from, into) = (customer_id(from), customer_id(into));
    for channel in CHANNELS {
        if let Some(u) = unsubscribed.get(&(from.clone(), channel)).copied() {
            let mine = unsubscribed
                .entry((into.clone(), channel))
                .or_insert(i64::MAX);
            *mine = (*mine).min(u.max(since));
        }
    }
    for facts in [purchases, left_segment] {
        let carried: Vec<Fact> = facts
            .get(&from)
            .into_iter()
            .flatten()
            .map(|f| Fact {
                at: f.at,
                holds_from: f.holds_from.max(since),
            })
            .collect();
        facts.entry(into.clone()).or_default().extend(carried);
    }
}

/// What a customer did at `at` (an unsubscribe, a purchase, leaving the segment), and
/// from when it holds for that customer id: at once, or from the merge that brought
/// it from the merged customer.
#[derive(Debug, Clone, Copy)]
struct Fact {
    at: i64,
    holds_from: i64,
}

impl Fact {
    fn new(at: i64) -> Self {
        Fact { at, holds_from: at }
    }
}

/// A fixed seed, or the one `PROPTEST_RNG_SEED` names (read by proptest's default).
fn fixed_seed_unless_asked() -> proptest::test_runner::RngSeed {
    if std::env::var_os("PROPTEST_RNG_SEED").is_some() {
        ProptestConfig::default().rng_seed
    } else {
        proptest::test_runner::RngSeed::Fixed(0x6b61_6972_6f73)
    }
}

proptest! {
    // The same cases on every run unless PROPTEST_RNG_SEED asks for others: a gate
    // that a fresh seed can fail would fail unrelated changes (found cases are kept in
    // properties.proptest-regressions and run first either way).
    #![proptest_config(ProptestConfig {
        cases: 128,
        rng_seed: fixed_seed_unless_asked(),
        ..ProptestConfig::default()
    })]

    #[test]
    fn pacing_consent_and_decision_invariants_hold(
        mut events in prop::collection::vec(event(), 1..40),
        start in prop::sample::select(STARTS.to_vec()),
    ) {
        // Time order; within a minute the unsubscribe first, so "before" is unambiguous.
        events.sort_by_key(|e| (e.minute(), matches!(e, Event::Trigger { .. })));
        let mut a = Arbiter::from_text(
            &format!(
                "{}\n{}",
                common::CONFIG
                    .replace("[arbiter]\n", &format!("[arbiter]\n{PACING}\n"))
                    .replace(PROMO_SCENARIO, &format!("{PROMO_SCENARIO}\n{PROMO_CAPS}")),
                common::WIN_BACK,
            ),
        );
        let mut triggers: BTreeMap<String, Trigger> = BTreeMap::new();
        let mut unsubscribed: BTreeMap<(String, Channel), i64> = BTreeMap::new();
        let mut purchases: BTreeMap<String, Vec<Fact>> = BTreeMap::new();
        let mut left_segment: BTreeMap<String, Vec<Fact>> = BTreeMap::new();
        // (merged, survivor, when its ledger got in) once merged: the merged customer's
        // later events are
        // the survivor's, as the identity processor resolves them, except triggers at
        // odd minutes: fired for the merged customer before the merge, they arrive
        // after it.
        let mut merge: Option<(usize, usize, i64)> = None;
        // Records the merge sent, held back for one event, and whether each goes twice.
        let mut held: Option<(Vec<kairos_core::contracts::CustomerAction>, bool)> = None;
        let mut twice = false;
        for (n, e) in events.iter().enumerate() {
            let at = start + e.minute() * MINUTE;
            let person = |c: &usize| match merge {
                Some((from, into, _)) if *c == from => into,
                _ => *c,
            };
            let held_before = held.take();
            match e {
                Event::Trigger { customer, category, consent, valid_hours, redeliver, cascade, segment, minute } => {
                    let late_for_merged = merge.is_some_and(|(from, _, _)| *customer == from) && minute % 2 == 1;
                    let customer = &if late_for_merged { *customer } else { person(customer) };
                    // The survivor's triggers name the merged customer: decided once its
                    // ledger is in, as the profile marks them.
                    let merged_from = match merge {
                        Some((from, into, _)) if *customer == into => vec![customer_id(from)],
                        _ => Vec::new(),
                    };
                    let id = format!("t{n}");
                    let consented: Vec<Channel> = CHANNELS
                        .into_iter()
                        .zip([consent.0, consent.1])
                        .filter_map(|(c, yes)| yes.then_some(c))
                        .collect();
                    // Promo from a scenario that does not end on purchase, the rest from
                    // welcome, which does.
                    let scenario = if *category == MessageCategory::promo {
                        "weekly_promo"
                    } else if *cascade {
                        "cart_cascade"
                    } else if *segment {
                        "win_back"
                    } else {
                        "welcome"
                    };
                    let t = Trigger {
                        merged_from,
                        trigger_id: id.clone(),
                        scenario: scenario.into(),
                        customer_id: customer_id(*customer),
                        category: *category,
                        step: 0,
                        template: "welcome".into(),
                        channels: CHANNELS.to_vec(),
                        priority: 50,
                        fired_at: at,
                        valid_until: at + valid_hours * HOUR,
                        cause_event_id: None,
                        cause_occurred_at: at,
                        contacts: Contacts {
                            email: Some(format!("c{customer}@example.com")),
                            push_token: Some(format!("token-{customer}")),
                            consented_channels: consented,
                            time_zone: Some(ZONES[*customer].into()),
                            ..Contacts::default()
                        },
                        variables: "{}".into(),
                    };
                    a.push("triggers", &t.customer_id.clone(), &t);
                    if *redeliver {
                        a.push("triggers", &t.customer_id.clone(), &t);
                    }
                    triggers.insert(id, t);
                }
                Event::Unsubscribe { customer, channel, .. } => {
                    let customer = &person(customer);
                    let o = Outcome {
                        outcome_id: format!("u{n}"),
                        send_id: format!("u{n}"),
                        customer_id: customer_id(*customer),
                        scenario: "welcome".into(),
                        channel: *channel,
                        category: MessageCategory::trigger,
                        kind: OutcomeKind::unsubscribed,
                        reason: None,
                        occurred_at: at,
                        address: None,
                    };
                    a.push("outcomes", &o.customer_id.clone(), &o);
                    unsubscribed.entry((o.customer_id.clone(), *channel)).or_insert(at);
                }
                Event::Purchase { customer, .. } => {
                    let customer = &person(customer);
                    let action = kairos_core::contracts::CustomerAction::new(
                        format!("b{n}"),
                        customer_id(*customer),
                        kairos_core::contracts::CustomerActionKind::purchase,
                        at,
                    );
                    a.push("customer-actions", &action.customer_id.clone(), &action);
                    purchases.entry(action.customer_id).or_default().push(Fact::new(at));
                }
                Event::LeftSegment { customer, .. } => {
                    let customer = &person(customer);
                    let action = kairos_core::contracts::CustomerAction {
                        segment: Some("At Risk".into()),
                        ..kairos_core::contracts::CustomerAction::new(
                            format!("l{n}"),
                            customer_id(*customer),
                            kairos_core::contracts::CustomerActionKind::left_segment,
                            at,
                        )
                    };
                    a.push("customer-actions", &action.customer_id.clone(), &action);
                    left_segment.entry(action.customer_id).or_default().push(Fact::new(at));
                }
                Event::Merge { first_into_second, late, twice: again, .. } => {
                    if merge.is_some() {
                        if let Some(h) = held_before {
                            held = Some(h);
                        }
                        continue;
                    }
                    let (from, into) = if *first_into_second {
                        MERGEABLE
                    } else {
                        (MERGEABLE.1, MERGEABLE.0)
                    };
                    merge = Some((from, into, at));
                    twice = *again;
                    let action = kairos_core::contracts::CustomerAction {
                        merged_into: Some(customer_id(into)),
                        ..kairos_core::contracts::CustomerAction::new(
                            format!("m{n}"),
                            customer_id(from),
                            kairos_core::contracts::CustomerActionKind::merged,
                            at,
                        )
                    };
                    for _ in 0..(1 + usize::from(twice)) {
                        a.push("customer-actions", &customer_id(from), &action);
                    }
                    if *late {
                        held = Some((std::mem::take(&mut a.actions), twice));
                    } else {
                        carry_facts(&mut unsubscribed, &mut purchases, &mut left_segment, from, into, at);
                    }
                }
            }
            if let Some((mut actions, again)) = held_before {
                // The merged ledger first: what the merged customer forwarded since
                // went on the same topic after it.
                actions.append(&mut a.actions);
                a.actions = actions;
                deliver_actions(&mut a, again);
                if let Some((from, into, ledger_in)) = merge.as_mut() {
                    *ledger_in = at;
                    carry_facts(&mut unsubscribed, &mut purchases, &mut left_segment, *from, *into, at);
                }
            }
            deliver_actions(&mut a, twice);
        }
        if let Some((mut actions, again)) = held.take() {
            actions.append(&mut a.actions);
            a.actions = actions;
            deliver_actions(&mut a, again);
            let last = start + events.last().map_or(0, Event::minute) * MINUTE;
            if let Some((from, into, ledger_in)) = merge.as_mut() {
                *ledger_in = last;
                carry_facts(&mut unsubscribed, &mut purchases, &mut left_segment, *from, *into, last);
            }
        }
        // Let every deferred trigger come due or expire.
        a.advance_to(start + 10 * DAY);
        deliver_actions(&mut a, twice);

        // Every trigger ends in exactly one final decision (a cascade's steps and its
        // end are decisions of their own, with ids of their own).
        for id in triggers.keys() {
            let stop = deterministic_id(&[id, "cascade-stop"]);
            let step_ids: Vec<String> =
                (1..4).map(|n| deterministic_id(&[id, "cascade", &n.to_string()])).collect();
            let decisions = a.decisions_of(id);
            let finals: Vec<_> = decisions
                .iter()
                .filter(|d| !matches!(d.outcome, DecisionOutcome::deferred | DecisionOutcome::duplicate))
                .filter(|d| d.decision_id != stop && !step_ids.contains(&d.decision_id))
                .collect();
            prop_assert_eq!(finals.len(), 1, "trigger {} decisions {:?}", id, decisions);
            // Nothing is lost to a merge: what the merged customer had queued, or got
            // after the merge, is decided for the survivor.
            prop_assert!(
                finals[0].rule != "merged",
                "trigger {} ended by the merge: {:?}", id, decisions
            );
            if let Some((from, into, _)) = merge {
                let handed_over = decisions.iter().any(|d| {
                    d.outcome == DecisionOutcome::deferred
                        && d.rule == "merged"
                        && d.customer_id == customer_id(from)
                });
                if handed_over {
                    prop_assert_eq!(&finals[0].customer_id, &customer_id(into), "{:?}", decisions);
                }
            }
            // And it is not an arbiter that sends nothing: a transactional message
            // (past caps, gaps and quiet hours) goes out whenever a channel it names
            // has consent and no unsubscribe, and no purchase can have ended it (a
            // merge's customers aside: their ledgers move).
            let t = &triggers[id];
            let merged_person = merge.is_some_and(|(from, into, _)| {
                [customer_id(from), customer_id(into)].contains(&t.customer_id)
            });
            let open_channel = t.contacts.consented_channels.iter().any(|c| {
                unsubscribed
                    .get(&(t.customer_id.clone(), *c))
                    .is_none_or(|u| *u > t.fired_at)
            });
            let bought_since = purchases
                .get(&t.customer_id)
                .into_iter()
                .flatten()
                .any(|f| f.at >= t.fired_at - DAY);
            if t.category == MessageCategory::transactional && open_channel && !merged_person && !bought_since {
                prop_assert_eq!(
                    finals[0].outcome, DecisionOutcome::sent,
                    "transactional trigger {} not sent: {:?}", id, decisions
                );
            }
            let stops = decisions.iter().filter(|d| d.decision_id == stop).count();
            prop_assert!(stops <= 1, "trigger {} stopped twice: {:?}", id, decisions);
        }
        // No send id repeats.
        let ids: BTreeSet<&str> = a.sends.iter().map(|s| s.send_id.as_str()).collect();
        prop_assert_eq!(ids.len(), a.sends.len());

        let quiet = (
            chrono::NaiveTime::from_hms_opt(21, 0, 0).unwrap(),
            chrono::NaiveTime::from_hms_opt(9, 0, 0).unwrap(),
        );
        let mut marketing: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
        let mut promo_sends: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        let mut channels_used: BTreeMap<String, Vec<(i64, Channel, String)>> = BTreeMap::new();
        for s in &a.sends {
            let t = &triggers[&s.trigger_id];
            // Consent and unsubscribes.
            prop_assert!(t.contacts.consented_channels.contains(&s.channel), "no consent: {:?}", s);
            // At the same instant a due deferral is decided before the unsubscribe (timers
            // due at t fire before the input at t), so only a later send is a violation.
            if let Some(unsub) = unsubscribed.get(&(s.customer_id.clone(), s.channel)) {
                prop_assert!(s.created_at <= *unsub, "sent after the unsubscribe at {}: {:?}", unsub, s);
            }
            prop_assert!(s.created_at <= t.valid_until, "sent after valid-until: {:?}", s);
            // A send released by a deferral timer due at the purchase's instant was decided
            // before that purchase (timers first, as above); one decided on arrival of a
            // trigger at that instant came after it (purchases sort first within a minute).
            // A cascade step's wait (it names the channel waiting) is not the
            // trigger's own deferral.
            let released_by_timer = a
                .decisions_of(&s.trigger_id)
                .iter()
                .any(|d| d.outcome == DecisionOutcome::deferred && d.channel.is_none());
            for Fact { at: bought, holds_from } in purchases.get(&s.customer_id).into_iter().flatten() {
                if s.scenario == "welcome" || s.scenario == "cart_cascade" {
                    prop_assert!(
                        !(t.cause_occurred_at <= *bought && s.created_at > *holds_from),
                        "sent after the purchase at {} that ended it: {:?}", bought, s
                    );
                }
                if s.category == MessageCategory::promo {
                    prop_assert!(
                        !(s.created_at - bought < 2 * DAY
                            && (s.created_at > *holds_from || (s.created_at == *holds_from && !released_by_timer))),
                        "promo within two days of the purchase at {}: {:?}", bought, s
                    );
                }
            }
            // As for purchases: a send released at the instant the customer left was
            // decided before it (timers first).
            if s.scenario == "win_back" {
                for Fact { at: left, holds_from } in left_segment.get(&s.customer_id).into_iter().flatten() {
                    prop_assert!(
                        !(t.cause_occurred_at < *left && s.created_at > *holds_from),
                        "sent after the customer left the segment at {}: {:?}", left, s
                    );
                }
            }
            if s.category != MessageCategory::transactional {
                let tz = calendar::zone(t.contacts.time_zone.as_deref());
                let local = calendar::local_time(s.created_at, tz).unwrap();
                prop_assert!(!calendar::within_window(local, quiet.0, quiet.1), "sent at {} local in quiet hours", local);
                marketing.entry(s.customer_id.clone()).or_default().push((s.created_at, s.trigger_id.clone()));
                if s.scenario == "weekly_promo" {
                    promo_sends.entry(s.customer_id.clone()).or_default().push(s.created_at);
                }
                channels_used.entry(s.customer_id.clone()).or_default().push((s.created_at, s.channel, s.trigger_id.clone()));
            }
        }
        for (customer, times) in &promo_sends {
            for t in times {
                let in_week = times.iter().filter(|x| *x <= t && *t - **x < 7 * DAY).count();
                prop_assert!(in_week <= 2, "{} over the promo scenario's weekly cap", customer);
            }
        }
        // One channel per customer within the conflict window, a cascade's own steps
        // aside (one message on several channels).
        for (customer, used) in &channels_used {
            for (i, (t1, c1, k1)) in used.iter().enumerate() {
                for (t2, c2, k2) in &used[i + 1..] {
                    prop_assert!(k1 == k2 || (t2 - t1).abs() >= HOUR || c1 == c2, "{} got {:?} and {:?} within an hour", customer, c1, c2);
                }
            }
        }
        // Once the merged ledger is in, the caps count the person's messages under both
        // ids: the survivor's ledger holds the merged customer's sends. (Before, the
        // survivor's own cascade steps, fired before the merge, do not wait for it.)
        if let Some((from, into, merged_at)) = merge {
            let tz = calendar::zone(Some(ZONES[into]));
            let mut person: Vec<i64> = [customer_id(from), customer_id(into)]
                .iter()
                .flat_map(|c| marketing.get(c).into_iter().flatten().map(|(t, _)| *t))
                .collect();
            person.sort_unstable();
            for s in a.sends.iter().filter(|s| {
                s.customer_id == customer_id(into)
                    && s.category != MessageCategory::transactional
                    && s.created_at > merged_at
            }) {
                let day = calendar::local_date(s.created_at, tz);
                let same_day = person
                    .iter()
                    .filter(|t| **t <= s.created_at && calendar::local_date(**t, tz) == day)
                    .count();
                prop_assert!(same_day <= 2, "the merged person over the daily cap: {:?}", person);
                let week = person
                    .iter()
                    .filter(|t| **t <= s.created_at && s.created_at - **t < 7 * DAY)
                    .count();
                prop_assert!(week <= 6, "the merged person over the weekly cap: {:?}", person);
            }
        }
        for (customer, mut sent) in marketing {
            sent.sort_unstable();
            let times: Vec<i64> = sent.iter().map(|(t, _)| *t).collect();
            let tz = calendar::zone(Some(ZONES[customer[1..].parse::<usize>().unwrap()]));
            let mut per_day: BTreeMap<_, usize> = BTreeMap::new();
            for t in &times {
                *per_day.entry(calendar::local_date(*t, tz)).or_default() += 1;
            }
            let mut push_per_day: BTreeMap<_, usize> = BTreeMap::new();
            for (t, c, _) in channels_used.get(&customer).into_iter().flatten() {
                if *c == Channel::push {
                    *push_per_day.entry(calendar::local_date(*t, tz)).or_default() += 1;
                }
            }
            prop_assert!(push_per_day.values().all(|n| *n <= 1), "{} over the push cap: {:?}", customer, push_per_day);
            prop_assert!(per_day.values().all(|n| *n <= 2), "{} over the daily cap: {:?}", customer, per_day);
            for (i, t) in times.iter().enumerate() {
                let in_week = times[..=i].iter().filter(|x| *t - **x < 7 * DAY).count();
                prop_assert!(in_week <= 6, "{} over the weekly cap", customer);
            }
            // The minimum gap between messages of two triggers, a cascade's step too.
            for (i, (t1, k1)) in sent.iter().enumerate() {
                for (t2, k2) in &sent[i + 1..] {
                    prop_assert!(k1 == k2 || t2 - t1 >= 30 * MINUTE, "{} closer than the minimum gap", customer);
                }
            }
        }
    }
}
