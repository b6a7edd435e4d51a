//! Policy rules in event time: a purchase cancels queued messages of the scenarios
//! that exist to get one and pauses promo; the conflict window keeps one channel; an
//! offer is not repeated; customers who ignore every message leave promo (sunset); a
//! running chain holds the customer against lower priorities (main scenario).

mod common;

use common::{at, merged_into, Arbiter, T0};
use kairos_core::contracts::{Channel, DecisionOutcome, MessageCategory, OutcomeKind, Trigger};
use kairos_core::time::{DAY, HOUR, MINUTE, SECOND};

const TRIGGER: MessageCategory = MessageCategory::trigger;
const PROMO: MessageCategory = MessageCategory::promo;

#[test]
fn a_purchase_cancels_the_queued_reminder_and_a_trigger_caused_before_it() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    a.time_zone = Some("Europe/Berlin".into());
    // 22:30 in Berlin: the welcome message waits for the morning.
    let queued = a.trigger("w1", "welcome", TRIGGER, at("2026-01-05T21:30:00Z"));
    assert_eq!(queued.outcome, DecisionOutcome::deferred);
    a.purchase("buy1", at("2026-01-05T22:00:00Z"));
    let cancelled = a.decisions_of("w1");
    assert_eq!(cancelled.len(), 2, "{cancelled:#?}");
    assert_eq!(
        (cancelled[1].outcome, cancelled[1].rule.as_str()),
        (DecisionOutcome::cancelled, "purchase_exclusion")
    );
    a.advance_to(at("2026-01-06T12:00:00Z"));
    assert_eq!(
        a.decisions_of("w1").len(),
        2,
        "a cancelled message never wakes"
    );
    assert!(a.sends.is_empty());

    // A trigger caused before the purchase that arrives after it is cancelled too.
    let late = a.trigger("w2", "welcome", TRIGGER, at("2026-01-05T21:50:00Z"));
    assert_eq!(late.outcome, DecisionOutcome::cancelled);
    // One caused after the purchase goes out, and so does a scenario that does not end
    // on purchase (no pause for non-promo messages).
    let after = a.trigger("w3", "welcome", TRIGGER, at("2026-01-06T12:00:00Z"));
    assert_eq!(after.outcome, DecisionOutcome::sent);
}

#[test]
fn promo_pauses_for_two_days_after_a_purchase() {
    let mut a = Arbiter::new();
    a.purchase("buy1", T0);
    let paused = a.trigger("p1", "weekly_promo", PROMO, T0 + DAY);
    assert_eq!(
        (paused.outcome, paused.rule.as_str()),
        (DecisionOutcome::suppressed, "pause_after_purchase")
    );
    let service = a.trigger("t1", "weekly_promo", TRIGGER, T0 + DAY);
    assert_eq!(
        service.outcome,
        DecisionOutcome::sent,
        "the pause is for promo"
    );
    let later = a.trigger("p2", "weekly_promo", PROMO, T0 + 2 * DAY + MINUTE);
    assert_eq!(later.outcome, DecisionOutcome::sent);
}

#[test]
fn the_conflict_window_keeps_one_channel() {
    let mut a = Arbiter::with_config("daily_cap = 5");
    let first = a.trigger("c1", "welcome", TRIGGER, T0);
    assert_eq!(first.channel, Some(Channel::email));
    // Push comes first in this scenario, but e-mail was used 10 minutes ago.
    let mut t = a.trigger_of("c2", "welcome", TRIGGER, T0 + 10 * MINUTE);
    t.channels = vec![Channel::push, Channel::email];
    let stays = a.push_trigger(&t);
    assert_eq!(
        (stays.outcome, stays.channel),
        (DecisionOutcome::sent, Some(Channel::email)),
        "{stays:#?}"
    );
    // A push-only message waits until an hour after the latest e-mail.
    let mut t = a.trigger_of("c3", "welcome", TRIGGER, T0 + 20 * MINUTE);
    t.channels = vec![Channel::push];
    let waits = a.push_trigger(&t);
    assert_eq!(
        (waits.outcome, waits.rule.as_str()),
        (DecisionOutcome::deferred, "channel_conflict")
    );
    a.advance_to(T0 + 70 * MINUTE - 1);
    assert_eq!(a.decisions_of("c3").len(), 1);
    a.advance_to(T0 + 70 * MINUTE);
    let sent = *a.decisions_of("c3").last().expect("decided again");
    assert_eq!(
        (sent.outcome, sent.channel),
        (DecisionOutcome::sent, Some(Channel::push))
    );
    // Transactional messages are not held by the window.
    let mut t = a.trigger_of(
        "r1",
        "welcome",
        MessageCategory::transactional,
        T0 + 75 * MINUTE,
    );
    t.channels = vec![Channel::email];
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
}

#[test]
fn the_same_offer_is_not_repeated_within_the_window() {
    let mut a = Arbiter::new();
    let offer = |a: &Arbiter, id: &str, at: i64| {
        let mut t = a.trigger_of(id, "weekly_promo", PROMO, at);
        t.variables = r#"{"promo_code":"SPRING10","first_name":"Anna"}"#.into();
        t
    };
    let t = offer(&a, "o1", T0);
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
    let t = offer(&a, "o2", T0 + 3 * DAY);
    let repeat = a.push_trigger(&t);
    assert_eq!(
        (repeat.outcome, repeat.rule.as_str()),
        (DecisionOutcome::suppressed, "offer_repeat")
    );
    // Another offer is fine, and the same one after 14 days.
    let mut other = a.trigger_of("o3", "weekly_promo", PROMO, T0 + 3 * DAY);
    other.variables = r#"{"promo_code":"SUMMER5"}"#.into();
    assert_eq!(a.push_trigger(&other).outcome, DecisionOutcome::sent);
    let t = offer(&a, "o4", T0 + 14 * DAY + HOUR);
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
}

/// An arbiter that sunsets after 3 ignored messages, and 3 promos sent hourly from
/// `T0` and delivered, none opened.
fn three_promos_ignored() -> Arbiter {
    let mut a = Arbiter::with_config("sunset_after_ignored = 3\ndaily_cap = 10\nweekly_cap = 20");
    for i in 0..3 {
        let d = a.trigger(&format!("s{i}"), "weekly_promo", PROMO, T0 + i * HOUR);
        assert_eq!(d.outcome, DecisionOutcome::sent);
        let send = a.last_send();
        a.outcome(&send, OutcomeKind::delivered, T0 + i * HOUR + MINUTE);
        // A redelivered outcome counts once.
        a.outcome(&send, OutcomeKind::delivered, T0 + i * HOUR + MINUTE);
    }
    a
}

#[test]
fn customers_who_ignore_every_message_leave_promo_until_they_react() {
    let mut a = three_promos_ignored();
    let sunset = a.trigger("s3", "weekly_promo", PROMO, T0 + 4 * HOUR);
    assert_eq!(
        (sunset.outcome, sunset.rule.as_str()),
        (DecisionOutcome::suppressed, "sunset")
    );
    let service = a.trigger("t1", "welcome", TRIGGER, T0 + 4 * HOUR);
    assert_eq!(
        service.outcome,
        DecisionOutcome::sent,
        "sunset is for promo"
    );
    let send = a.last_send();
    a.outcome(&send, OutcomeKind::opened, T0 + 5 * HOUR);
    let back = a.trigger("s4", "weekly_promo", PROMO, T0 + 6 * HOUR);
    assert_eq!(
        back.outcome,
        DecisionOutcome::sent,
        "an open ends the sunset"
    );
}

/// A purchase is a reaction too (an SMS reports no open, a mail client may block the
/// pixel): a customer who buys is no longer one who ignores every message.
#[test]
fn a_purchase_ends_the_sunset_of_ignored_messages() {
    let mut a = three_promos_ignored();
    let sunset = a.trigger("s3", "weekly_promo", PROMO, T0 + 4 * HOUR);
    assert_eq!(sunset.rule, "sunset");
    a.purchase("buy", T0 + 5 * HOUR);
    // After the pause a purchase starts, promo goes out again.
    let back = a.trigger("s4", "weekly_promo", PROMO, T0 + 3 * DAY);
    assert_eq!(back.outcome, DecisionOutcome::sent, "{back:#?}");
}

/// Step `n` of the onboarding chain (priority 50) that a sign-up at T0 started.
fn onboarding_step(a: &Arbiter, id: &str, n: i32, at: i64) -> Trigger {
    let mut t = a.trigger_of(id, "onboarding", TRIGGER, at);
    t.step = n;
    t.priority = 50;
    t.cause_event_id = Some("signup".into());
    t.cause_occurred_at = T0;
    t
}

/// The onboarding chain's first two steps sent (`{prefix}0`, `{prefix}1`, a day
/// apart), and a lower-priority welcome (`{prefix}-low`) waiting for its slot.
fn chain_with_a_waiter(a: &mut Arbiter, prefix: &str) {
    for (n, at) in [(0, T0), (1, T0 + DAY)] {
        let t = onboarding_step(a, &format!("{prefix}{n}"), n, at);
        assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
    }
    let mut low = a.trigger_of(
        &format!("{prefix}-low"),
        "welcome",
        TRIGGER,
        T0 + DAY + HOUR,
    );
    low.priority = 40;
    low.valid_until = T0 + 5 * DAY;
    assert_eq!(a.push_trigger(&low).rule, "main_scenario");
}

/// A trigger waiting for a chain's slot until the quiet hours' end, let go within
/// them (the chain broke), waits until the same morning for another rule: two
/// decisions, two ids, both recorded (consumers keep one record per id).
#[test]
fn two_deferrals_of_one_trigger_to_the_same_time_for_two_rules_are_two_decisions() {
    let mut a = Arbiter::with_config(
        "daily_cap = 5\nweekly_cap = 20\nquiet_hours_start = \"22:00\"\nquiet_hours_end = \"08:00\"",
    );
    a.time_zone = Some("UTC".into());
    let evening = T0 + 12 * HOUR + 50 * MINUTE; // 21:50 UTC
    let first = onboarding_step(&a, "qd0", 0, evening - DAY);
    assert_eq!(a.push_trigger(&first).outcome, DecisionOutcome::sent);
    let mut low = a.trigger_of("qd-low", "welcome", TRIGGER, evening + 5 * MINUTE);
    low.priority = 40;
    low.valid_until = T0 + 5 * DAY;
    let held = a.push_trigger(&low);
    assert_eq!(held.rule, "main_scenario", "{held:#?}");
    // The second step comes late, in the quiet hours, and expires at 23:00: the
    // chain is broken and its slot free then, within the quiet hours.
    let mut second = onboarding_step(&a, "qd1", 1, evening + 40 * MINUTE);
    second.valid_until = evening + 70 * MINUTE;
    assert_eq!(a.push_trigger(&second).outcome, DecisionOutcome::deferred);
    a.advance_to(evening + 71 * MINUTE);
    let decisions = a.decisions_of("qd-low");
    let rules: Vec<&str> = decisions.iter().map(|d| d.rule.as_str()).collect();
    assert_eq!(rules, ["main_scenario", "quiet_hours"], "{decisions:#?}");
    let morning = (evening + 10 * HOUR + 10 * MINUTE).to_string();
    assert!(
        decisions.iter().all(|d| d.reason.ends_with(&morning)),
        "both until 08:00: {decisions:#?}"
    );
    assert_ne!(
        decisions[0].decision_id, decisions[1].decision_id,
        "{decisions:#?}"
    );
}

#[test]
fn a_running_chain_holds_the_customer_against_lower_priorities() {
    let mut a = Arbiter::with_config("daily_cap = 5\nweekly_cap = 20");
    let step = onboarding_step;
    let t = step(&a, "on0", 0, T0);
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
    // The chain runs two more days: a lower-priority trigger waits until its end.
    let mut low = a.trigger_of("low", "welcome", TRIGGER, T0 + 3 * HOUR);
    low.priority = 40;
    low.valid_until = T0 + 3 * DAY;
    let waits = a.push_trigger(&low);
    assert_eq!(
        (waits.outcome, waits.rule.as_str()),
        (DecisionOutcome::deferred, "main_scenario"),
        "{waits:#?}"
    );
    // A higher priority passes; the chain's own steps pass.
    let mut high = a.trigger_of("high", "welcome", TRIGGER, T0 + 4 * HOUR);
    high.priority = 60;
    assert_eq!(a.push_trigger(&high).outcome, DecisionOutcome::sent);
    // Transactional messages are never held.
    let mut t = a.trigger_of(
        "r1",
        "welcome",
        MessageCategory::transactional,
        T0 + 5 * HOUR,
    );
    t.priority = 0;
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
    let t = step(&a, "on1", 1, T0 + DAY);
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
    a.advance_to(T0 + 2 * DAY - 1);
    assert_eq!(a.decisions_of("low").len(), 1, "still held by the chain");
    // The last step is due at T0 + 2 days: the waiter does not go before it (it takes
    // a moment through the profile and the triggers topic).
    a.advance_to(T0 + 2 * DAY);
    assert_eq!(a.decisions_of("low").len(), 1, "held for the last step");
    let t = step(&a, "on2", 2, T0 + 2 * DAY + MINUTE);
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
    // Its send frees the slot: the waiter goes at once, after it.
    a.advance_to(T0 + 2 * DAY + MINUTE);
    let last = *a.decisions_of("low").last().expect("decided again");
    assert_eq!(last.outcome, DecisionOutcome::sent, "{last:#?}");
    assert_eq!(last.decided_at, T0 + 2 * DAY + MINUTE);
}

/// A chain's last step held in the queue past the slot's end (the daily cap) keeps the
/// slot, and its send wakes what waited for it at once.
#[test]
fn a_last_step_sent_from_the_queue_wakes_the_waiters_at_once() {
    let mut a = Arbiter::with_config("daily_cap = 2\nweekly_cap = 20");
    a.time_zone = Some("UTC".into());
    chain_with_a_waiter(&mut a, "lq");
    // Two messages of a higher priority take the third day's cap before the last step.
    for (id, at) in [
        ("lq-h1", T0 + 2 * DAY - 3 * HOUR),
        ("lq-h2", T0 + 2 * DAY - 2 * HOUR),
    ] {
        let mut high = a.trigger_of(id, "welcome", TRIGGER, at);
        high.priority = 60;
        assert_eq!(a.push_trigger(&high).outcome, DecisionOutcome::sent);
    }
    let last = a.push_trigger(&onboarding_step(&a, "lq2", 2, T0 + 2 * DAY));
    assert_eq!(last.rule, "frequency_cap_daily", "{last:#?}");
    // The next day begins at midnight UTC, 15 hours after T0 + 2 days.
    let midnight = T0 + 2 * DAY + 15 * HOUR;
    a.advance_to(midnight);
    let sent: Vec<&str> = a.sends.iter().map(|s| s.trigger_id.as_str()).collect();
    assert_eq!(sent[sent.len() - 2..], ["lq2", "lq-low"]);
    let woken = *a.decisions_of("lq-low").last().expect("decided");
    assert_eq!(
        (woken.outcome, woken.decided_at),
        (DecisionOutcome::sent, midnight)
    );
}

/// A chain's last step decided without a send (no consented channel) frees the slot
/// at once: what waited goes then, not after the grace.
#[test]
fn a_last_step_that_cannot_be_sent_frees_the_slot_at_once() {
    let mut a = Arbiter::with_config("daily_cap = 5\nweekly_cap = 20");
    chain_with_a_waiter(&mut a, "lu");
    let mut last = onboarding_step(&a, "lu2", 2, T0 + 2 * DAY);
    last.contacts.consented_channels.clear();
    assert_eq!(a.push_trigger(&last).outcome, DecisionOutcome::suppressed);
    a.advance_to(T0 + 2 * DAY);
    let woken = *a.decisions_of("lu-low").last().expect("decided");
    assert_eq!(
        (woken.outcome, woken.decided_at),
        (DecisionOutcome::sent, T0 + 2 * DAY)
    );
}

/// A chain whose last step never comes (the profile ended it) lets the waiters go a
/// grace of ten minutes after the step was due.
#[test]
fn a_chain_whose_last_step_never_comes_lets_the_waiters_go_soon_after() {
    let mut a = Arbiter::with_config("daily_cap = 5\nweekly_cap = 20");
    let mut first = a.trigger_of("ln0", "onboarding", TRIGGER, T0);
    first.priority = 50;
    assert_eq!(a.push_trigger(&first).outcome, DecisionOutcome::sent);
    let mut low = a.trigger_of("ln-low", "welcome", TRIGGER, T0 + 3 * HOUR);
    low.priority = 40;
    low.valid_until = T0 + 3 * DAY;
    assert_eq!(a.push_trigger(&low).outcome, DecisionOutcome::deferred);
    a.advance_to(T0 + 2 * DAY + 10 * MINUTE - 1);
    assert_eq!(a.decisions_of("ln-low").len(), 1, "still held");
    a.advance_to(T0 + 2 * DAY + 10 * MINUTE);
    let last = *a.decisions_of("ln-low").last().expect("decided again");
    assert_eq!(last.outcome, DecisionOutcome::sent, "{last:#?}");
}

#[test]
fn with_lower_priority_drop_a_held_customer_gets_nothing_lower() {
    let mut a = Arbiter::with_config("lower_priority = \"drop\"");
    let t = a.trigger_of("on0", "onboarding", TRIGGER, T0);
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
    let mut low = a.trigger_of("low", "welcome", TRIGGER, T0 + HOUR);
    low.priority = 10;
    let dropped = a.push_trigger(&low);
    assert_eq!(
        (dropped.outcome, dropped.rule.as_str()),
        (DecisionOutcome::suppressed, "main_scenario")
    );
    // A purchase ends the chain (it ends on purchase) and frees the customer.
    a.purchase("buy", T0 + 2 * HOUR);
    let mut after = a.trigger_of("after", "welcome", TRIGGER, T0 + 3 * HOUR);
    after.priority = 10;
    assert_eq!(a.push_trigger(&after).outcome, DecisionOutcome::sent);
}

#[test]
fn a_purchase_that_ends_the_chain_decides_the_triggers_waiting_for_it_at_once() {
    let mut a = Arbiter::with_config("daily_cap = 5\nweekly_cap = 20");
    let t = a.trigger_of("on0", "onboarding", TRIGGER, T0);
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
    // Two lower priorities wait for the chain (two days), each valid for a day: one
    // of a scenario that goes on after a purchase, one that ends on it.
    let mut news = a.trigger_of("news", "weekly_promo", TRIGGER, T0 + HOUR);
    news.priority = 40;
    let mut cart = a.trigger_of("cart", "welcome", TRIGGER, T0 + HOUR);
    cart.priority = 40;
    for t in [&news, &cart] {
        let waits = a.push_trigger(t);
        assert_eq!(
            (waits.outcome, waits.rule.as_str()),
            (DecisionOutcome::deferred, "main_scenario")
        );
    }
    // The purchase ends the chain: the first goes out now, the second is excluded.
    a.purchase("buy", T0 + 2 * HOUR);
    let outcomes = |a: &Arbiter, id: &str| -> Vec<_> {
        a.decisions_of(id)
            .iter()
            .map(|d| (d.outcome, d.rule.clone(), d.decided_at))
            .collect()
    };
    let deferred = (
        DecisionOutcome::deferred,
        "main_scenario".to_string(),
        T0 + HOUR,
    );
    assert_eq!(
        outcomes(&a, "news"),
        [
            deferred.clone(),
            (
                DecisionOutcome::sent,
                "channel_choice".to_string(),
                T0 + 2 * HOUR
            )
        ]
    );
    assert_eq!(
        outcomes(&a, "cart"),
        [
            deferred,
            (
                DecisionOutcome::cancelled,
                "purchase_exclusion".to_string(),
                T0 + 2 * HOUR
            )
        ]
    );
    // Nothing wakes later: one final decision each.
    a.advance_to(T0 + 3 * DAY);
    assert_eq!(a.decisions_of("news").len(), 2);
    assert_eq!(a.decisions_of("cart").len(), 2);
    assert_eq!(a.sends.len(), 2);
}

#[test]
fn a_chain_that_ends_before_its_expected_end_frees_the_triggers_waiting_for_it() {
    let mut a = Arbiter::with_config_and_scenarios(
        "daily_cap = 5",
        r#"
[[scenarios]]
name = "duo"
kind = "welcome"
channels = ["push"]
template = "duo"
steps = [{ delay = "1d", template = "duo_2" }]

[[scenarios]]
name = "quick"
kind = "welcome"
channels = ["push"]
template = "quick"
steps = [{ delay = "2h", template = "quick_2" }]
"#,
    );
    // Every step carries its chain's cause, as the profile fires them.
    let step = |a: &Arbiter, scenario: &str, step: i32, priority: i32, cause: i64| {
        let at = cause + i64::from(step) * if scenario == "duo" { DAY } else { 2 * HOUR };
        let mut t = a.trigger_of(&format!("{scenario}{step}"), scenario, TRIGGER, at);
        t.channels = vec![Channel::push];
        t.step = step;
        t.priority = priority;
        t.cause_occurred_at = cause;
        t
    };
    // duo holds the customer until T0 + 1 d.
    assert_eq!(
        a.push_trigger(&step(&a, "duo", 0, 50, T0)).outcome,
        DecisionOutcome::sent
    );
    let mut low = a.trigger_of("low", "welcome", TRIGGER, T0 + 2 * HOUR);
    low.channels = vec![Channel::push];
    low.priority = 10;
    low.valid_until = T0 + 12 * HOUR;
    let waits = a.push_trigger(&low);
    assert_eq!(
        (waits.outcome, waits.rule.as_str()),
        (DecisionOutcome::deferred, "main_scenario")
    );
    assert!(waits.reason.contains("duo"), "{waits:#?}");
    // quick, of higher priority, takes the slot until T0 + 5 h: the waiting trigger
    // now waits for that end, not duo's, and goes out before it expires.
    let cause = T0 + 3 * HOUR;
    assert_eq!(
        a.push_trigger(&step(&a, "quick", 0, 60, cause)).outcome,
        DecisionOutcome::sent
    );
    assert_eq!(
        a.push_trigger(&step(&a, "quick", 1, 60, cause)).outcome,
        DecisionOutcome::sent
    );
    a.advance_to(T0 + DAY);
    let last = *a.decisions_of("low").last().expect("decided again");
    assert_eq!(
        (last.outcome, last.decided_at),
        (DecisionOutcome::sent, T0 + 5 * HOUR),
        "{last:#?}"
    );
    assert_eq!(
        a.decisions_of("low")
            .iter()
            .filter(|d| d.outcome != DecisionOutcome::deferred)
            .count(),
        1
    );
}

#[test]
fn a_later_opt_in_ends_an_unsubscribe_and_an_older_unsubscribe_does_not_undo_it() {
    let mut a = Arbiter::new();
    let mut t = a.trigger_of("u1", "welcome", TRIGGER, T0);
    t.channels = vec![Channel::email];
    a.push_trigger(&t);
    let email = a.last_send();
    a.outcome(&email, OutcomeKind::unsubscribed, T0 + HOUR);
    let mut t = a.trigger_of("u2", "welcome", TRIGGER, T0 + DAY);
    t.channels = vec![Channel::email];
    let blocked = a.push_trigger(&t);
    assert_eq!(
        (blocked.outcome, blocked.rule.as_str()),
        (DecisionOutcome::suppressed, "unsubscribed")
    );
    // An opt-in older than the unsubscribe changes nothing; a newer one ends it.
    a.opt_in("old", Channel::email, T0 + 30 * MINUTE);
    let mut t = a.trigger_of("u3", "welcome", TRIGGER, T0 + DAY + HOUR);
    t.channels = vec![Channel::email];
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::suppressed);
    a.opt_in("new", Channel::email, T0 + 2 * DAY);
    let mut t = a.trigger_of("u4", "welcome", TRIGGER, T0 + 2 * DAY + HOUR);
    t.channels = vec![Channel::email];
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
    // An unsubscribe from before the opt-in that arrives late does not undo it.
    a.outcome(&email, OutcomeKind::unsubscribed, T0 + DAY + 12 * HOUR);
    let mut t = a.trigger_of("u5", "welcome", TRIGGER, T0 + 3 * DAY);
    t.channels = vec![Channel::email];
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
}

#[test]
fn a_visit_ends_queued_and_late_reactivation_messages() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    a.time_zone = Some("UTC".into());
    let night = at("2026-01-05T22:00:00Z");
    let queued = a.trigger("cb1", "come_back", PROMO, night);
    assert_eq!(queued.outcome, DecisionOutcome::deferred);
    a.visit("v1", night + HOUR);
    let cancelled = *a.decisions_of("cb1").last().expect("cancelled");
    assert_eq!(
        (cancelled.outcome, cancelled.rule.as_str()),
        (DecisionOutcome::cancelled, "became_active")
    );
    // One caused before the visit that arrives after it is cancelled as well.
    let late = a.trigger("cb2", "come_back", PROMO, night + 30 * MINUTE);
    assert_eq!(
        (late.outcome, late.rule.as_str()),
        (DecisionOutcome::cancelled, "became_active")
    );
    a.advance_to(at("2026-01-06T12:00:00Z"));
    assert!(a.sends.is_empty());
}

#[test]
fn leaving_a_segment_ends_its_queued_late_and_cascading_messages() {
    let mut a = Arbiter::with_config_and_scenarios(
        "quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"",
        &format!(
            "{}{}",
            common::WIN_BACK,
            r#"
[[scenarios]]
name = "vip"
kind = "segment_entered"
segment = "Champions"
channels = ["email"]
template = "vip"
"#
        ),
    );
    a.time_zone = Some("UTC".into());
    // The customer entered At Risk at night: the win-back waits for the morning, and
    // a VIP greeting of another segment waits too.
    let night = at("2026-01-05T22:00:00Z");
    assert_eq!(
        a.trigger("wb1", "win_back", PROMO, night).outcome,
        DecisionOutcome::deferred
    );
    assert_eq!(
        a.trigger("vip1", "vip", TRIGGER, night).outcome,
        DecisionOutcome::deferred
    );
    // A purchase moves the customer out of At Risk before the morning.
    a.left_segment("l1", "At Risk", night + HOUR);
    let cancelled = *a.decisions_of("wb1").last().expect("cancelled");
    assert_eq!(
        (cancelled.outcome, cancelled.rule.as_str()),
        (DecisionOutcome::cancelled, "left_segment"),
        "{cancelled:#?}"
    );
    // A win-back caused before the customer left that arrives after it is cancelled.
    let late = a.trigger("wb2", "win_back", PROMO, night + 30 * MINUTE);
    assert_eq!(
        (late.outcome, late.rule.as_str()),
        (DecisionOutcome::cancelled, "left_segment")
    );
    a.advance_to(at("2026-01-06T09:30:00Z"));
    let vip = *a.decisions_of("vip1").last().expect("decided again");
    assert_eq!(
        vip.outcome,
        DecisionOutcome::sent,
        "another segment's message"
    );
    assert!(a.sends.iter().all(|s| s.scenario != "win_back"));

    // Back in At Risk later: a new win-back goes out, and leaving again stops its
    // cascade before the push.
    let back = at("2026-01-20T10:00:00Z");
    let sent = a.trigger("wb3", "win_back", PROMO, back);
    assert_eq!(sent.outcome, DecisionOutcome::sent, "{sent:#?}");
    a.left_segment("l2", "At Risk", back + 30 * MINUTE);
    let stopped = *a.decisions_of("wb3").last().expect("stopped");
    assert_eq!(
        (stopped.outcome, stopped.rule.as_str()),
        (DecisionOutcome::cancelled, "left_segment"),
        "{stopped:#?}"
    );
    a.advance_to(back + 3 * HOUR);
    let win_backs: Vec<_> = a
        .sends
        .iter()
        .filter(|s| s.scenario == "win_back")
        .collect();
    assert_eq!(win_backs.len(), 1, "the e-mail only: {win_backs:#?}");
}

#[test]
fn a_single_visit_that_caused_the_reactivation_is_not_a_return() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    a.time_zone = Some("UTC".into());
    // The customer's last active day had one visit, at T0: the profile reports it, and
    // 30 days later the reactivation trigger carries that visit as its cause.
    a.visit("v1", T0);
    let mut t = a.trigger_of("cb1", "come_back", PROMO, T0 + 30 * DAY);
    t.cause_occurred_at = T0;
    let d = a.push_trigger(&t);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::sent, "channel_choice"),
        "{d:#?}"
    );
    // One waiting for the morning is not cancelled by that visit arriving again.
    let night = at("2026-02-05T22:00:00Z");
    let mut t = a.trigger_of("cb2", "come_back", PROMO, night);
    t.cause_occurred_at = T0;
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::deferred);
    a.visit("v1", T0);
    assert_eq!(
        a.decisions_of("cb2").len(),
        1,
        "{:#?}",
        a.decisions_of("cb2")
    );
    a.advance_to(at("2026-02-06T09:00:00Z"));
    let last = *a.decisions_of("cb2").last().expect("decided again");
    assert_eq!(last.outcome, DecisionOutcome::sent, "{last:#?}");
    // A visit after the cause still ends it.
    a.visit("v2", at("2026-02-06T10:00:00Z"));
    let mut t = a.trigger_of("cb3", "come_back", PROMO, at("2026-02-06T11:00:00Z"));
    t.cause_occurred_at = T0;
    let back = a.push_trigger(&t);
    assert_eq!(
        (back.outcome, back.rule.as_str()),
        (DecisionOutcome::cancelled, "became_active")
    );
}

#[test]
fn promo_stops_for_customers_inactive_longer_than_the_sunset() {
    let mut a = Arbiter::with_config("sunset_inactive_after = \"30d\"");
    a.visit("v1", T0);
    let early = a.trigger("p1", "weekly_promo", PROMO, T0 + 29 * DAY);
    assert_eq!(early.outcome, DecisionOutcome::sent);
    let sunset = a.trigger("p2", "weekly_promo", PROMO, T0 + 31 * DAY);
    assert_eq!(
        (sunset.outcome, sunset.rule.as_str()),
        (DecisionOutcome::suppressed, "sunset_inactive")
    );
    let service = a.trigger("t1", "welcome", TRIGGER, T0 + 31 * DAY);
    assert_eq!(service.outcome, DecisionOutcome::sent, "only promo sunsets");
    a.visit("v2", T0 + 32 * DAY);
    let back = a.trigger("p3", "weekly_promo", PROMO, T0 + 32 * DAY + HOUR);
    assert_eq!(back.outcome, DecisionOutcome::sent);
}

#[test]
fn a_trigger_decided_by_an_earlier_version_is_not_decided_again() {
    let mut a = Arbiter::new();
    // The customer's ledger predates the upgrade (no legacy mark yet), and the earlier
    // version kept one JSON key per decided trigger id.
    a.visit("v1", T0);
    a.put_raw_state("c1", "t/old-1", T0.to_string().as_bytes());
    let old = a.trigger_of("old-1", "welcome", MessageCategory::trigger, T0);
    a.push("triggers", "c1", &old);
    assert!(
        a.decisions_of("old-1").is_empty(),
        "redelivered after the upgrade: {:?}",
        a.decisions_of("old-1")
    );
    // A trigger of the same time without such a key, and a later one, are decided.
    let other = a.trigger("old-2", "welcome", MessageCategory::trigger, T0);
    assert_eq!(other.outcome, DecisionOutcome::sent);
    let later = a.trigger(
        "new-1",
        "weekly_promo",
        MessageCategory::promo,
        T0 + 3 * HOUR,
    );
    assert_ne!(later.outcome, DecisionOutcome::duplicate);
    assert!(a.decisions_of("new-1").len() == 1);
    // And the redelivery of one decided since is a duplicate by the ledger alone.
    let again = a.trigger_of("old-2", "welcome", MessageCategory::trigger, T0);
    a.push("triggers", "c1", &again);
    assert_eq!(a.decisions_of("old-2").len(), 1);
}

#[test]
fn a_trigger_waiting_for_a_merged_ledger_is_recorded_once_and_sent_when_it_arrives() {
    let mut a = Arbiter::new();
    let mut t = a.trigger_of("m1", "welcome", MessageCategory::trigger, T0);
    t.merged_from = vec!["c0".into()];
    let first = a.push_trigger(&t);
    assert_eq!(
        (first.outcome, first.rule.as_str()),
        (DecisionOutcome::deferred, "merge_pending")
    );
    // Fifty minutes of polling every minute for the merged ledger: no new decisions.
    a.advance_to(T0 + 50 * MINUTE);
    assert_eq!(a.decisions_of("m1").len(), 1, "{:#?}", a.decisions_of("m1"));
    assert!(
        a.sends.is_empty(),
        "nothing goes out before the merged state is in"
    );
    // The merged customer's ledger arrives; the next poll decides the trigger.
    a.merge_in("c0", "{}", T0 + 50 * MINUTE);
    a.advance_to(T0 + 52 * MINUTE);
    let rules: Vec<_> = a
        .decisions_of("m1")
        .iter()
        .map(|d| (d.outcome, d.rule.clone()))
        .collect();
    assert_eq!(
        rules,
        [
            (DecisionOutcome::deferred, "merge_pending".to_string()),
            (DecisionOutcome::sent, "channel_choice".to_string())
        ]
    );
    assert_eq!(a.sends.len(), 1);
}

#[test]
fn a_merged_ledger_that_never_comes_is_waited_for_an_hour_only() {
    let mut a = Arbiter::with_scenarios(common::ORDER_STATUS);
    // An order confirmation of a customer whose merged ledger was lost (dead-lettered).
    let mut t = a.trigger_of("lost1", "order_status", MessageCategory::transactional, T0);
    t.valid_until = T0 + DAY;
    t.merged_from = vec!["c-lost".into()];
    assert_eq!(a.push_trigger(&t).rule, "merge_pending");
    a.advance_to(T0 + 59 * MINUTE);
    assert!(a.sends.is_empty(), "still waiting within the hour");
    a.advance_to(T0 + HOUR + 2 * MINUTE);
    let decided: Vec<_> = a.decisions_of("lost1").iter().map(|d| d.outcome).collect();
    assert_eq!(
        decided,
        [DecisionOutcome::deferred, DecisionOutcome::sent],
        "{:#?}",
        a.decisions_of("lost1")
    );
    assert_eq!(a.sends.len(), 1);
}

#[test]
fn the_hour_of_waiting_for_a_merged_ledger_is_counted_once_across_other_deferrals() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"10:00\"\nquiet_hours_end = \"11:00\"");
    a.time_zone = Some("UTC".into());
    // 09:00 UTC: waits for a ledger that never comes; at 10:00 the hour is over, and
    // quiet hours (10:00 to 11:00) defer it again.
    let mut t = a.trigger_of("mq1", "welcome", TRIGGER, T0);
    t.merged_from = vec!["c-lost".into()];
    assert_eq!(a.push_trigger(&t).rule, "merge_pending");
    a.advance_to(T0 + 3 * HOUR);
    let decided: Vec<_> = a
        .decisions_of("mq1")
        .iter()
        .map(|d| (d.outcome, d.rule.clone(), d.decided_at))
        .collect();
    assert_eq!(
        decided,
        [
            (DecisionOutcome::deferred, "merge_pending".to_string(), T0),
            (
                DecisionOutcome::deferred,
                "quiet_hours".to_string(),
                T0 + HOUR
            ),
            // Not another hour of waiting for the ledger after the quiet hours.
            (
                DecisionOutcome::sent,
                "channel_choice".to_string(),
                T0 + 2 * HOUR
            ),
        ]
    );
}

#[test]
fn a_direct_merge_stays_known_however_many_ids_the_merged_ledger_brings_along() {
    let mut a = Arbiter::with_scenarios(common::ORDER_STATUS);
    // c0 had absorbed 80 anonymous visitors before it merged into c1.
    let brought: Vec<String> = (0..80).map(|i| format!("anon:{i}")).collect();
    a.merge_in(
        "c0",
        &serde_json::json!({ "absorbed": brought }).to_string(),
        T0,
    );
    // The profile names c0 (its direct merge) in every later trigger of c1.
    let mut t = a.trigger_of("after1", "order_status", MessageCategory::transactional, T0);
    t.merged_from = vec!["c0".into()];
    let d = a.push_trigger(&t);
    assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
}

#[test]
fn a_store_purchase_that_caused_the_reactivation_does_not_cancel_it() {
    let mut a = Arbiter::new();
    a.time_zone = Some("UTC".into());
    // The profile waits 30 days from the last activity, here a till sale at T0, and
    // the sale's purchase action reached the arbiter long before.
    a.purchase("till", T0);
    let mut t = a.trigger_of("cb1", "come_back", PROMO, T0 + 30 * DAY);
    t.cause_occurred_at = T0;
    let d = a.push_trigger(&t);
    assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
    // One caused before the purchase is still ended by it.
    let mut t = a.trigger_of("cb2", "come_back", PROMO, T0 + 30 * DAY);
    t.cause_occurred_at = T0 - DAY;
    let d = a.push_trigger(&t);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::cancelled, "purchase_exclusion"),
        "{d:#?}"
    );
}

#[test]
fn a_till_sale_from_before_the_chain_began_does_not_free_its_slot() {
    let mut a = Arbiter::new();
    let t = a.trigger_of("on0", "onboarding", TRIGGER, T0);
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
    let waits = a.trigger("w1", "welcome", TRIGGER, T0 + 3 * HOUR);
    assert_eq!(
        (waits.outcome, waits.rule.as_str()),
        (DecisionOutcome::deferred, "main_scenario")
    );
    // A receipt of a sale an hour before the chain began, uploaded late: the chain
    // was started after it and goes on.
    a.till_sale("old", T0 - HOUR);
    a.advance_to(T0 + 3 * HOUR + MINUTE);
    assert_eq!(a.decisions_of("w1").len(), 1, "{:#?}", a.decisions_of("w1"));
    assert_eq!(a.sends.len(), 1);
    // A sale after the chain began ends it and frees the slot.
    a.till_sale("new", T0 + HOUR);
    a.advance_to(T0 + 3 * HOUR + 2 * MINUTE);
    let last = *a.decisions_of("w1").last().expect("decided again");
    assert_eq!(last.outcome, DecisionOutcome::sent, "{last:#?}");
}

#[test]
fn a_visit_stops_a_reactivation_cascade_and_frees_its_slot() {
    let mut a = Arbiter::with_scenarios(
        r#"
[[scenarios]]
name = "win_back"
kind = "reactivation"
category = "promo"
channels = ["email", "push"]
template = "win_back"
cascade = ["1d"]
steps = [{ delay = "3d", template = "win_back_2" }]
"#,
    );
    let mut t = a.trigger_of("wb", "win_back", PROMO, T0);
    t.cause_occurred_at = T0 - 30 * DAY;
    t.valid_until = T0 + 3 * DAY;
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    let waits = a.trigger("w1", "welcome", TRIGGER, T0 + 2 * HOUR);
    assert_eq!(
        (waits.outcome, waits.rule.as_str()),
        (DecisionOutcome::deferred, "main_scenario")
    );
    // The customer comes back: the rest of the win-back ends, and the slot frees.
    a.visit("v1", T0 + 3 * HOUR);
    let stop = *a.decisions_of("wb").last().expect("a stop decision");
    assert_eq!(
        (stop.outcome, stop.rule.as_str()),
        (DecisionOutcome::cancelled, "became_active"),
        "{stop:#?}"
    );
    let freed = *a.decisions_of("w1").last().expect("decided again");
    assert_eq!(
        (freed.outcome, freed.decided_at),
        (DecisionOutcome::sent, T0 + 3 * HOUR),
        "{freed:#?}"
    );
    a.advance_to(T0 + 2 * DAY);
    let channels: Vec<_> = a.sends.iter().map(|s| s.channel).collect();
    assert_eq!(
        channels,
        [Channel::email, Channel::email],
        "no win-back push"
    );
}

#[test]
fn a_trigger_still_in_the_queue_is_a_duplicate_however_many_came_since() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    a.time_zone = Some("UTC".into());
    let night = at("2026-01-05T22:00:00Z");
    let x = a.trigger_of("x", "welcome", TRIGGER, night);
    assert_eq!(a.push_trigger(&x).outcome, DecisionOutcome::deferred);
    // More triggers than the ledger remembers ids of (receipts pass quiet hours).
    for i in 0..140 {
        a.trigger(
            &format!("r{i}"),
            "welcome",
            MessageCategory::transactional,
            night + (i + 1) * 1000,
        );
    }
    a.push("triggers", "c1", &x);
    assert_eq!(a.decisions_of("x").len(), 1, "{:#?}", a.decisions_of("x"));
    a.advance_to(at("2026-01-06T12:00:00Z"));
    let finals = a
        .decisions_of("x")
        .iter()
        .filter(|d| d.outcome != DecisionOutcome::deferred)
        .count();
    assert_eq!(finals, 1, "{:#?}", a.decisions_of("x"));
    assert_eq!(a.sends.iter().filter(|s| s.trigger_id == "x").count(), 1);
}

#[test]
fn a_trigger_still_valid_is_a_duplicate_however_many_came_since() {
    let mut a = Arbiter::new();
    let mut x = a.trigger_of("x", "welcome", TRIGGER, T0);
    x.valid_until = T0 + 10 * DAY;
    assert_eq!(a.push_trigger(&x).outcome, DecisionOutcome::sent);
    // More triggers than the ledger keeps whatever their validity (receipts, which
    // pass every cap), each valid for a day.
    let receipts = |a: &mut Arbiter, prefix: &str, from: i64| {
        for i in 0..200 {
            a.trigger(
                &format!("{prefix}{i}"),
                "welcome",
                MessageCategory::transactional,
                from + (i + 1) * 1000,
            );
        }
    };
    receipts(&mut a, "r", T0);
    // Redelivered while still valid (a profile's outbox sent again after a crash):
    // decided once, sent once.
    a.push("triggers", "c1", &x);
    assert_eq!(a.decisions_of("x").len(), 1, "{:#?}", a.decisions_of("x"));
    // Once it expired, newer triggers let its id go: a copy now is decided expired,
    // and still nothing more goes out.
    receipts(&mut a, "s", T0 + 11 * DAY);
    a.push("triggers", "c1", &x);
    let decided = a.decisions_of("x");
    assert_eq!(decided.len(), 2, "{decided:#?}");
    assert_eq!(
        (decided[1].outcome, decided[1].rule.as_str()),
        (DecisionOutcome::expired, "valid_until")
    );
    assert_eq!(a.sends.iter().filter(|s| s.trigger_id == "x").count(), 1);
}

#[test]
fn the_channel_the_customer_engages_with_comes_first() {
    let mut a = Arbiter::new();
    assert_eq!(
        a.trigger("e1", "welcome", TRIGGER, T0).channel,
        Some(Channel::email)
    );
    let email = a.last_send();
    a.outcome(&email, OutcomeKind::delivered, T0 + MINUTE);
    let mut t = a.trigger_of("p1", "welcome", TRIGGER, T0 + 2 * HOUR);
    t.channels = vec![Channel::push];
    a.push_trigger(&t);
    let push = a.last_send();
    a.outcome(&push, OutcomeKind::delivered, T0 + 2 * HOUR + MINUTE);
    a.outcome(&push, OutcomeKind::opened, T0 + 2 * HOUR + 5 * MINUTE);
    // E-mail first in the scenario's list, but the customer reads pushes.
    let d = a.trigger("x", "welcome", TRIGGER, T0 + DAY);
    assert_eq!(d.channel, Some(Channel::push), "{d:#?}");
    assert!(d.reason.contains("push"), "{}", d.reason);
}

#[test]
fn free_channels_come_before_paid_ones() {
    let mut a = Arbiter::new();
    let mut t = a.trigger_of("s1", "welcome", TRIGGER, T0);
    t.channels = vec![Channel::sms, Channel::email];
    t.contacts.phone = Some("+4915112345678".into());
    t.contacts.consented_channels = vec![Channel::sms, Channel::email];
    let d = a.push_trigger(&t);
    assert_eq!(d.channel, Some(Channel::email), "{d:#?}");
    assert!(d.reason.contains("paid"), "{}", d.reason);
    // With e-mail declared paid as well, the scenario's order decides.
    let mut b = Arbiter::with_config("channel_costs = { email = \"paid\" }");
    t.trigger_id = "s2".into();
    assert_eq!(b.push_trigger(&t).channel, Some(Channel::sms));
}

#[test]
fn the_control_group_is_drawn_where_a_message_would_go_out() {
    let mut a = Arbiter::from_text(
        &common::CONFIG.replace("control_group_percent = 0", "control_group_percent = 100"),
    );
    // Unreachable: suppressed as its treatment twin would be, not a control touch.
    let mut t = a.trigger_of("c1", "welcome", TRIGGER, T0);
    t.contacts.consented_channels = Vec::new();
    let d = a.push_trigger(&t);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::suppressed, "no_consented_channel"),
        "{d:#?}"
    );
    // Just bought: promo pauses for both groups alike.
    a.purchase("buy", T0 + HOUR);
    let d = a.trigger("p1", "weekly_promo", PROMO, T0 + 2 * HOUR);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::suppressed, "pause_after_purchase"),
        "{d:#?}"
    );
    // Reachable: held out, and nothing goes out.
    let d = a.trigger("c2", "welcome", TRIGGER, T0 + 3 * HOUR);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::held_out, "control_group"),
        "{d:#?}"
    );
    assert!(a.sends.is_empty(), "{:#?}", a.sends);
    // A held-out chain holds the customer as the sent one would: a lower priority
    // waits for it in both groups.
    let t = a.trigger_of("on0", "onboarding", TRIGGER, T0 + 4 * HOUR);
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::held_out);
    let mut low = a.trigger_of("low", "welcome", TRIGGER, T0 + 5 * HOUR);
    low.priority = 40;
    let d = a.push_trigger(&low);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::deferred, "main_scenario"),
        "{d:#?}"
    );
}

#[test]
fn a_control_customer_meets_the_caps_as_a_treated_one_does() {
    let control =
        common::CONFIG.replace("control_group_percent = 0", "control_group_percent = 100");
    let mut treated = Arbiter::new();
    let mut held = Arbiter::from_text(&control);
    let day = |a: &mut Arbiter| -> Vec<(DecisionOutcome, String)> {
        (0..4)
            .map(|i| {
                let d = a.trigger(&format!("p{i}"), "weekly_promo", PROMO, T0 + i * 2 * HOUR);
                (d.outcome, d.rule)
            })
            .collect()
    };
    let (treated_day, held_day) = (day(&mut treated), day(&mut held));
    let sent = treated_day
        .iter()
        .filter(|(o, _)| *o == DecisionOutcome::sent)
        .count();
    assert!((1..4).contains(&sent), "a cap stops some: {treated_day:#?}");
    for (t, h) in treated_day.iter().zip(&held_day) {
        match t.0 {
            DecisionOutcome::sent => assert_eq!(h.0, DecisionOutcome::held_out, "{held_day:#?}"),
            _ => assert_eq!(t, h, "the same rule stops both: {held_day:#?}"),
        }
    }
    assert!(held.sends.is_empty(), "nothing goes out: {:#?}", held.sends);
}

#[test]
fn a_trigger_over_the_weekly_cap_by_several_waits_until_the_count_falls_below_it() {
    let mut a = Arbiter::with_config("weekly_cap = 2");
    // A merged ledger brings four sends of the last week: two over the cap.
    let sends: Vec<_> = (3..=6)
        .rev()
        .map(|days| serde_json::json!([T0 - days * DAY, "email", "promo"]))
        .collect();
    a.merge_in("c0", &serde_json::json!({ "sends": sends }).to_string(), T0);
    let mut t = a.trigger_of("wk1", "weekly_promo", PROMO, T0);
    t.valid_until = T0 + 10 * DAY;
    let d = a.push_trigger(&t);
    assert_eq!(d.outcome, DecisionOutcome::deferred, "{d:#?}");
    // Three of the four must leave the window: the one sent 4 days ago leaves last.
    let wake = T0 - 4 * DAY + 7 * DAY;
    assert!(
        d.reason.ends_with(&format!("decided again at {wake}")),
        "{d:#?}"
    );
    a.advance_to(wake + MINUTE);
    let decided: Vec<_> = a.decisions_of("wk1").iter().map(|d| d.outcome).collect();
    assert_eq!(decided, [DecisionOutcome::deferred, DecisionOutcome::sent]);
}

/// A customer seen only in shops (receipts, no visit) is switched off for promo once
/// the last receipt is older than the sunset, like one who visits.
#[test]
fn a_customer_seen_only_in_shops_is_sunset_after_the_last_receipt() {
    let mut a = Arbiter::new();
    a.till_sale("s1", T0);
    let d = a.trigger("p1", "weekly_promo", PROMO, T0 + 100 * DAY);
    assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
    let d = a.trigger("p2", "weekly_promo", PROMO, T0 + 200 * DAY);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::suppressed, "sunset_inactive"),
        "{d:#?}"
    );
}

/// An opt-in is activity: a customer seen only in shops long ago who subscribes now
/// gets the promo.
#[test]
fn an_opt_in_is_activity_for_the_inactivity_sunset() {
    let mut a = Arbiter::new();
    a.till_sale("s1", T0);
    a.opt_in("opt-in", Channel::email, T0 + 199 * DAY);
    let d = a.trigger("p1", "weekly_promo", PROMO, T0 + 200 * DAY);
    assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
}

/// An opt-in keeps the customer out of the sunset, but it is no return: the
/// reactivation that waited for the morning, and one read after the opt-in, go out.
#[test]
fn an_opt_in_ends_no_reactivation_message() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    a.time_zone = Some("UTC".into());
    a.visit("v1", T0);
    let night = at("2026-02-05T03:00:00Z");
    let mut t = a.trigger_of("cb1", "come_back", PROMO, night);
    t.cause_occurred_at = T0;
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::deferred);
    a.opt_in("sms", Channel::sms, night + 5 * HOUR);
    assert_eq!(
        a.decisions_of("cb1").len(),
        1,
        "{:#?}",
        a.decisions_of("cb1")
    );
    a.advance_to(at("2026-02-05T09:00:00Z"));
    let woke = *a.decisions_of("cb1").last().expect("decided again");
    assert_eq!(woke.outcome, DecisionOutcome::sent, "{woke:#?}");
    let mut t = a.trigger_of("cb2", "come_back", PROMO, at("2026-02-07T10:00:00Z"));
    t.cause_occurred_at = T0;
    let late = a.push_trigger(&t);
    assert_eq!(late.outcome, DecisionOutcome::sent, "{late:#?}");
}

#[test]
fn a_purchase_is_activity_for_the_inactivity_sunset() {
    let mut a = Arbiter::new();
    a.visit("v1", T0);
    a.till_sale("s1", T0 + 200 * DAY);
    let d = a.trigger("p1", "weekly_promo", PROMO, T0 + 203 * DAY);
    assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
}

#[test]
fn an_offer_id_and_its_promo_code_are_each_not_repeated() {
    let mut a = Arbiter::new();
    let offer = |a: &Arbiter, id: &str, at: i64, vars: &str| {
        let mut t = a.trigger_of(id, "weekly_promo", PROMO, at);
        t.variables = vars.into();
        t
    };
    let t = offer(&a, "o1", T0, r#"{"offer_id":"A","promo_code":"X"}"#);
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
    for (id, vars) in [
        ("o2", r#"{"promo_code":"X"}"#),
        ("o3", r#"{"offer_id":"B","promo_code":"X"}"#),
    ] {
        let t = offer(&a, id, T0 + 3 * DAY, vars);
        let d = a.push_trigger(&t);
        assert_eq!(
            (d.outcome, d.rule.as_str()),
            (DecisionOutcome::suppressed, "offer_repeat"),
            "{vars}"
        );
    }
}

#[test]
fn a_cascade_counts_once_towards_the_sunset() {
    let mut a = Arbiter::with_config("sunset_after_ignored = 10\ndaily_cap = 10\nweekly_cap = 30");
    for i in 0..4 {
        let start = T0 + i * DAY;
        let mut t = a.trigger_of(&format!("k{i}"), "cart_cascade", TRIGGER, start);
        t.channels = vec![Channel::email, Channel::push, Channel::sms];
        t.contacts.phone = Some("+4915112345678".into());
        t.contacts.consented_channels = vec![Channel::email, Channel::push, Channel::sms];
        assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
        let send = a.last_send();
        a.outcome(&send, OutcomeKind::delivered, start + MINUTE);
        for wait in [HOUR, 5 * HOUR] {
            a.advance_to(start + wait);
            let send = a.last_send();
            assert_eq!(send.trigger_id, format!("k{i}"));
            a.outcome(&send, OutcomeKind::delivered, start + wait + MINUTE);
        }
    }
    assert_eq!(a.sends.len(), 12);
    let d = a.trigger("p1", "weekly_promo", PROMO, T0 + 4 * DAY);
    assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
}

/// Customer y was merged into x, and x into z (the identity processor's order). The
/// profile names both in z's triggers; the arbiter must bring y's state to z whichever
/// of x's two actions it meets first.
fn a_chain_of_merges_brings_every_ledger_to_the_survivor(merged_first: bool) {
    use kairos_arbiter::CustomerLedger;
    use kairos_core::contracts::{CustomerAction, CustomerActionKind};
    let mut a = Arbiter::new();
    // y had unsubscribed from e-mail before the merges.
    let mut y_ledger = CustomerLedger::default();
    y_ledger.unsubscribed.insert(Channel::email, T0 - DAY);
    let y_into_x = CustomerAction {
        state: Some(serde_json::to_string(&y_ledger).expect("ledger json")),
        merged_from: Some("y".into()),
        ..CustomerAction::new(
            "merge-y".into(),
            "x".into(),
            CustomerActionKind::merge_in,
            T0,
        )
    };
    let x_into_z = CustomerAction {
        merged_into: Some("z".into()),
        ..CustomerAction::new(
            "merged-x".into(),
            "x".into(),
            CustomerActionKind::merged,
            T0 + MINUTE,
        )
    };
    if merged_first {
        a.push("customer-actions", "x", &x_into_z);
        a.push("customer-actions", "x", &y_into_x);
    } else {
        a.push("customer-actions", "x", &y_into_x);
        a.push("customer-actions", "x", &x_into_z);
    }
    // What x handed on reaches z.
    let handed_on: Vec<CustomerAction> = std::mem::take(&mut a.actions);
    assert!(
        handed_on.iter().all(|h| h.customer_id == "z"),
        "{handed_on:#?}"
    );
    for action in &handed_on {
        a.push("customer-actions", "z", action);
    }
    let mut t = a.trigger_of("z1", "welcome", MessageCategory::trigger, T0 + 2 * MINUTE);
    t.customer_id = "z".into();
    t.merged_from = vec!["x".into(), "y".into()];
    let d = a.push_trigger(&t);
    assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
    // y's unsubscribe holds for z: the message goes by push, not e-mail.
    assert_eq!(a.last_send().channel, Channel::push);
}

#[test]
fn a_chain_of_merges_reaches_the_survivor_when_the_merge_comes_first() {
    a_chain_of_merges_brings_every_ledger_to_the_survivor(true);
}

#[test]
fn a_chain_of_merges_reaches_the_survivor_when_the_absorbed_ledger_comes_first() {
    a_chain_of_merges_brings_every_ledger_to_the_survivor(false);
}

#[test]
fn a_trigger_queued_for_a_merged_customer_is_decided_once_for_the_survivor() {
    use kairos_core::contracts::{CustomerAction, Outcome};
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    a.time_zone = Some("Europe/Berlin".into());
    // 22:30 in Berlin: c1's welcome waits for the morning.
    let queued = a.trigger("w1", "welcome", TRIGGER, at("2026-01-05T21:30:00Z"));
    assert_eq!(
        (queued.outcome, queued.rule.as_str()),
        (DecisionOutcome::deferred, "quiet_hours")
    );
    // The survivor z had unsubscribed from e-mail.
    let unsubscribe = Outcome {
        outcome_id: "z-unsub".into(),
        send_id: "s-z".into(),
        customer_id: "z".into(),
        scenario: "welcome".into(),
        channel: Channel::email,
        category: TRIGGER,
        kind: OutcomeKind::unsubscribed,
        reason: None,
        occurred_at: at("2026-01-05T21:40:00Z"),
        address: None,
    };
    a.push("outcomes", "z", &unsubscribe);
    let merge = merged_into("c1", "z", at("2026-01-05T22:00:00Z"));
    a.push("customer-actions", "c1", &merge);
    let handed = a.decisions_of("w1");
    assert_eq!(handed.len(), 2, "{handed:#?}");
    assert_eq!(
        (
            handed[1].outcome,
            handed[1].rule.as_str(),
            handed[1].customer_id.as_str()
        ),
        (DecisionOutcome::deferred, "merged", "c1"),
        "handed over, not cancelled"
    );
    let handed_on: Vec<CustomerAction> = std::mem::take(&mut a.actions);
    assert_eq!(
        handed_on.len(),
        2,
        "the ledger, then the queued trigger: {handed_on:#?}"
    );
    // Both reach z twice (a redelivery after a crash): taken over once.
    for _ in 0..2 {
        for record in &handed_on {
            a.push("customer-actions", "z", record);
        }
    }
    // c1's own timer is gone: nothing wakes for c1 in the morning.
    a.advance_to(at("2026-01-06T12:00:00Z"));
    let decisions: Vec<_> = a
        .decisions_of("w1")
        .iter()
        .map(|d| (d.outcome, d.rule.clone(), d.customer_id.clone()))
        .collect();
    assert_eq!(
        decisions,
        [
            (DecisionOutcome::deferred, "quiet_hours".into(), "c1".into()),
            (DecisionOutcome::deferred, "merged".into(), "c1".into()),
            (DecisionOutcome::deferred, "merged".into(), "z".into()),
            (DecisionOutcome::sent, "channel_choice".into(), "z".into()),
        ]
    );
    // Sent once, at the end of the quiet hours, by push: z's unsubscribe holds.
    assert_eq!(a.sends.len(), 1, "{:#?}", a.sends);
    let send = a.last_send();
    assert_eq!(
        (send.customer_id.as_str(), send.channel),
        ("z", Channel::push)
    );
    assert_eq!(
        a.decisions_of("w1")[3].decided_at,
        at("2026-01-06T08:00:00Z")
    );
    assert!(
        send.reasons.iter().any(|r| r.starts_with("merged: ")),
        "the reason trail says where it came from: {:?}",
        send.reasons
    );
    // A late copy of the trigger for c1, the merge again, and the merged ledger again
    // under another id (forwarded along a chain of merges after a crash, once z had
    // applied many other records): nothing more.
    let copy = a.trigger_of("w1", "welcome", TRIGGER, at("2026-01-05T21:30:00Z"));
    a.push("triggers", "c1", &copy);
    a.push("customer-actions", "c1", &merge);
    let mut again = handed_on[1].clone();
    again.action_id = "forwarded-again".into();
    a.push("customer-actions", "z", &again);
    a.advance_to(at("2026-01-07T12:00:00Z"));
    assert_eq!(a.decisions_of("w1").len(), 4, "{:#?}", a.decisions_of("w1"));
    assert_eq!(a.sends.len(), 1);
}

#[test]
fn a_trigger_of_a_merged_customer_arriving_after_the_merge_is_decided_for_the_survivor() {
    let mut a = Arbiter::new();
    a.push("customer-actions", "c1", &merged_into("c1", "z", T0 - HOUR));
    for action in std::mem::take(&mut a.actions) {
        a.push("customer-actions", "z", &action);
    }
    // Fired for c1 before the merge; the merge came first on its own topic.
    let late = a.trigger("w1", "welcome", TRIGGER, T0);
    assert_eq!(
        (late.outcome, late.rule.as_str(), late.customer_id.as_str()),
        (DecisionOutcome::deferred, "merged", "c1")
    );
    let forwarded: Vec<_> = std::mem::take(&mut a.actions);
    assert_eq!(forwarded.len(), 1, "{forwarded:#?}");
    assert_eq!(forwarded[0].customer_id, "z");
    // Delivered twice (an outbox after a crash): decided once, for z.
    for _ in 0..2 {
        a.push("customer-actions", "z", &forwarded[0]);
    }
    a.advance_to(T0 + MINUTE);
    let finals = a.finals_of("w1");
    assert_eq!(finals.len(), 1, "{:#?}", a.decisions_of("w1"));
    assert_eq!(
        (finals[0].outcome, finals[0].customer_id.as_str()),
        (DecisionOutcome::sent, "z")
    );
    assert_eq!(a.sends.len(), 1);
    assert_eq!(a.last_send().customer_id, "z");
}

/// A trigger handed over in a merge is timed by the survivor's clock (the merged
/// profile keeps the survivor's time zone), not by the merged customer's.
#[test]
fn a_trigger_handed_over_in_a_merge_keeps_the_survivor_s_time_zone() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    // The survivor z's latest trigger, in London.
    a.time_zone = Some("Europe/London".into());
    let mut own = a.trigger_of("z1", "weekly_promo", PROMO, at("2026-01-05T10:00:00Z"));
    own.customer_id = "z".into();
    assert_eq!(a.push_trigger(&own).outcome, DecisionOutcome::sent);
    // c1's trigger at 22:30 in Tokyo waits for the Tokyo morning (00:00 UTC).
    a.time_zone = Some("Asia/Tokyo".into());
    let queued = a.trigger("w1", "welcome", TRIGGER, at("2026-01-05T13:30:00Z"));
    assert_eq!(
        (queued.outcome, queued.rule.as_str()),
        (DecisionOutcome::deferred, "quiet_hours")
    );
    a.push(
        "customer-actions",
        "c1",
        &merged_into("c1", "z", at("2026-01-05T14:00:00Z")),
    );
    deliver_merge_records(&mut a);
    a.advance_to(at("2026-01-06T12:00:00Z"));
    // Midnight in London is the survivor's night: it goes in the London morning.
    let send = a.last_send();
    assert_eq!(
        (send.trigger_id.as_str(), send.customer_id.as_str()),
        ("w1", "z")
    );
    assert_eq!(send.created_at, at("2026-01-06T09:00:00Z"));
}

/// Delivers every record the arbiter emitted for other customers (merged ledgers and
/// the triggers handed over with them), in order, and returns them.
fn deliver_merge_records(a: &mut Arbiter) -> Vec<kairos_core::contracts::CustomerAction> {
    let records = std::mem::take(&mut a.actions);
    for r in &records {
        a.push("customer-actions", &r.customer_id.clone(), r);
    }
    records
}

/// y, with a welcome queued and more outcomes than a ledger remembers, merges into x,
/// where the welcome goes out; then x merges into z, and y's records reach x again
/// (an outbox after a crash): x must not send the welcome on to z.
#[test]
fn a_merge_sent_again_along_a_chain_of_merges_sends_nothing_twice() {
    use kairos_core::contracts::Outcome;
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    a.time_zone = Some("Europe/Berlin".into());
    let mut t = a.trigger_of("w1", "welcome", TRIGGER, at("2026-01-05T21:30:00Z"));
    t.customer_id = "y".into();
    assert_eq!(a.push_trigger(&t).rule, "quiet_hours");
    for i in 0..20 {
        let delivered = Outcome {
            outcome_id: format!("y-out-{i}"),
            send_id: format!("y-send-{i}"),
            customer_id: "y".into(),
            scenario: "welcome".into(),
            channel: Channel::email,
            category: TRIGGER,
            kind: OutcomeKind::opened,
            reason: None,
            occurred_at: at("2026-01-05T21:35:00Z"),
            address: None,
        };
        a.push("outcomes", "y", &delivered);
    }
    a.push(
        "customer-actions",
        "y",
        &merged_into("y", "x", at("2026-01-05T22:00:00Z")),
    );
    let y_records = deliver_merge_records(&mut a);
    assert_eq!(
        y_records.len(),
        2,
        "the ledger, then the queued welcome: {y_records:#?}"
    );
    a.advance_to(at("2026-01-06T12:00:00Z"));
    assert_eq!(a.sends.len(), 1);
    assert_eq!(a.last_send().customer_id, "x");
    a.push(
        "customer-actions",
        "x",
        &merged_into("x", "z", at("2026-01-06T13:00:00Z")),
    );
    deliver_merge_records(&mut a);
    // y's records again, as they were: x knows them, and sends nothing on.
    for r in &y_records {
        a.push("customer-actions", "x", r);
    }
    assert!(a.actions.is_empty(), "{:#?}", a.actions);
    // The welcome's under another id: x sends on no trigger it decided.
    let mut renamed = y_records[1].clone();
    renamed.action_id = "sent-again".into();
    a.push("customer-actions", "x", &renamed);
    for forwarded in deliver_merge_records(&mut a) {
        let ledger: kairos_arbiter::CustomerLedger =
            serde_json::from_str(forwarded.state.as_deref().unwrap_or("{}")).expect("ledger");
        assert!(ledger.queued.is_empty(), "{forwarded:#?}");
    }
    a.advance_to(at("2026-01-08T12:00:00Z"));
    assert_eq!(a.sends.len(), 1, "{:#?}", a.sends);
    let finals = a.finals_of("w1");
    assert_eq!(finals.len(), 1, "{:#?}", a.decisions_of("w1"));
}

#[test]
fn a_merged_ledger_or_forwarded_outcome_that_does_not_decode_is_dead_lettered_and_the_arbiter_goes_on(
) {
    let mut a = Arbiter::new();
    a.merge_in("c0", "{\"sends\": 7}", T0);
    assert_eq!(a.dead_letters.len(), 1, "{:#?}", a.dead_letters);
    let letter = &a.dead_letters[0];
    assert_eq!(letter["reason_code"], "invalid_field", "{letter:#}");
    assert!(
        letter["reason"]
            .as_str()
            .is_some_and(|r| r.contains("merged ledger does not decode")),
        "{letter:#}"
    );
    // So does an outcome sent on from a merged customer.
    let forwarded = kairos_core::contracts::CustomerAction {
        state: Some("{\"kind\": \"opened\"}".into()),
        merged_from: Some("c0".into()),
        ..kairos_core::contracts::CustomerAction::new(
            "fwd".into(),
            "c1".into(),
            kairos_core::contracts::CustomerActionKind::outcome,
            T0,
        )
    };
    a.push("customer-actions", "c1", &forwarded);
    assert_eq!(a.dead_letters.len(), 2, "{:#?}", a.dead_letters);
    assert!(
        a.dead_letters[1]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("forwarded outcome does not decode")),
        "{:#}",
        a.dead_letters[1]
    );
    let d = a.trigger("w1", "welcome", TRIGGER, T0 + MINUTE);
    assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
}

/// The end-to-end latency is the pipeline's: a reminder an hour after the cart counts
/// from when it was due, not from the cart, and a send held back by quiet hours is
/// not observed; an immediate answer to an event counts from the event.
#[test]
fn the_end_to_end_latency_leaves_out_the_scenario_s_own_waits() {
    let mut a = Arbiter::with_config_and_scenarios(
        "quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"",
        r#"
[[scenarios]]
name = "cart_in_an_hour"
kind = "abandoned_cart"
channels = ["email"]
template = "cart"
delay = "1h"
"#,
    );
    a.time_zone = Some("UTC".into());
    let at = T0 - 8 * HOUR; // 01:00 UTC: quiet
    let mut quiet = a.trigger_of("quiet", "welcome", MessageCategory::trigger, at);
    quiet.cause_occurred_at = at - 5 * SECOND;
    assert_eq!(a.push_trigger(&quiet).outcome, DecisionOutcome::deferred);
    a.advance_to(T0);
    let mut cart = a.trigger_of("cart", "cart_in_an_hour", MessageCategory::trigger, T0);
    cart.customer_id = "c2".into();
    cart.cause_occurred_at = T0 - HOUR;
    let mut welcome = a.trigger_of("hello", "welcome", MessageCategory::trigger, T0);
    welcome.customer_id = "c3".into();
    welcome.cause_occurred_at = T0 - 30 * SECOND;
    assert_eq!(a.push_trigger(&cart).outcome, DecisionOutcome::sent);
    assert_eq!(a.push_trigger(&welcome).outcome, DecisionOutcome::sent);
    assert_eq!(a.sends.len(), 3, "the quiet one went out at 09:00 too");
    let histogram = a
        .registry
        .gather()
        .into_iter()
        .find(|f| f.name() == "kairos_end_to_end_latency_seconds")
        .expect("the histogram");
    let h = histogram.get_metric()[0].get_histogram();
    assert_eq!(h.get_sample_count(), 2);
    assert_eq!(h.get_sample_sum(), 30.0);
}

#[test]
fn a_forgotten_customer_s_waiting_message_is_cancelled_and_the_ledger_goes() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    a.time_zone = Some("UTC".into());
    let night = at("2026-01-05T22:00:00Z");
    assert_eq!(
        a.trigger("fg1", "welcome", TRIGGER, night).outcome,
        DecisionOutcome::deferred,
        "quiet hours"
    );
    assert!(a.ledger_stored("c1"));
    a.forgotten("fg-x", night + HOUR);
    let last = *a.decisions_of("fg1").last().expect("decided");
    assert_eq!(
        (last.outcome, last.rule.as_str()),
        (DecisionOutcome::cancelled, "forgotten"),
        "{last:#?}"
    );
    assert!(!a.ledger_stored("c1"));
    a.advance_to(at("2026-01-06T12:00:00Z"));
    assert_eq!(a.decisions_of("fg1").len(), 2, "its wake-up went too");
}

/// A delivery, open or click of a message read after the customer was forgotten makes
/// no ledger (no `forgotten` would come to take it away); an unsubscribe from it does,
/// and holds.
#[test]
fn a_report_on_a_forgotten_customer_s_old_message_makes_no_ledger_but_a_suppression_does() {
    let mut a = Arbiter::new();
    let sent = a.trigger("fo1", "welcome", TRIGGER, T0);
    assert_eq!(sent.outcome, DecisionOutcome::sent);
    let email = a.last_send();
    a.forgotten("fo-x", T0 + HOUR);
    assert!(!a.ledger_stored("c1"));
    for (kind, at) in [
        (OutcomeKind::delivered, T0 + 2 * HOUR),
        (OutcomeKind::opened, T0 + 3 * HOUR),
        (OutcomeKind::clicked, T0 + 3 * HOUR),
        (OutcomeKind::sent, T0 + 3 * HOUR),
    ] {
        a.outcome(&email, kind, at);
        assert!(!a.ledger_stored("c1"), "{kind:?}");
    }
    a.outcome(&email, OutcomeKind::unsubscribed, T0 + 4 * HOUR);
    assert!(a.ledger_stored("c1"));
    let later = a.trigger("fo2", "welcome", TRIGGER, T0 + 5 * HOUR);
    assert_eq!(
        (later.outcome, later.channel),
        (DecisionOutcome::sent, Some(Channel::push)),
        "the e-mail unsubscribe holds: {later:#?}"
    );
}

#[test]
fn forgetting_leaves_what_came_after_it_and_then_the_ledger() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    a.time_zone = Some("UTC".into());
    // The visitor came back after the profile forgot them, and the new profile's
    // trigger was read before the older `forgotten` action.
    let forgotten_at = at("2026-01-05T21:30:00Z");
    let newer = a.trigger("fa1", "welcome", TRIGGER, forgotten_at + HOUR);
    assert_eq!(newer.outcome, DecisionOutcome::deferred, "quiet hours");
    a.forgotten("fa-x", forgotten_at);
    assert_eq!(a.decisions_of("fa1").len(), 1, "still queued");
    assert!(a.ledger_stored("c1"));
    a.advance_to(at("2026-01-06T09:30:00Z"));
    let last = *a.decisions_of("fa1").last().expect("decided");
    assert_eq!(last.outcome, DecisionOutcome::sent);
}

/// An online purchase checks out the cart whatever the device's clock says: a cart
/// reminder waiting for the morning whose cause is dated a minute after the purchase
/// is cancelled, and so is one the purchase was read before (the triggers topic
/// behind the actions topic). A till sale uploaded late, dated before the cart
/// change, is another visit and leaves it.
#[test]
fn an_online_purchase_dated_before_the_cart_change_cancels_the_queued_reminder() {
    for purchase_first in [false, true] {
        for (till, bought_at, expected) in [
            (false, "2026-01-05T21:49:00Z", DecisionOutcome::cancelled),
            (true, "2026-01-05T21:49:00Z", DecisionOutcome::sent),
            // A cart changed half an hour after the purchase is another cart.
            (false, "2026-01-05T21:20:00Z", DecisionOutcome::sent),
        ] {
            let mut a =
                Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
            a.time_zone = Some("UTC".into());
            let mut t = a.trigger_of(
                "qc",
                "cart_cascade",
                MessageCategory::trigger,
                at("2026-01-05T22:50:00Z"),
            );
            t.cause_occurred_at = at("2026-01-05T21:50:00Z");
            let buy = |a: &mut Arbiter| match till {
                true => a.till_sale("qc-buy", at(bought_at)),
                false => a.purchase("qc-buy", at(bought_at)),
            };
            if purchase_first {
                buy(&mut a);
            }
            let d = a.push_trigger(&t);
            if !purchase_first {
                assert_eq!(d.rule, "quiet_hours");
                buy(&mut a);
            }
            a.advance_to(at("2026-01-06T09:00:00Z"));
            let finals = a.finals_of("qc");
            let case = format!("purchase first {purchase_first}, till sale {till} at {bought_at}");
            assert_eq!(finals.len(), 1, "{case}: {finals:#?}");
            assert_eq!(finals[0].outcome, expected, "{case}: {finals:#?}");
        }
    }
}

/// A cart scenario configured to go on after a purchase (`exit_on_purchase = false`,
/// an upsell to the cart) is not cancelled by one while it waits for the morning,
/// whatever the device's clock.
#[test]
fn a_queued_cart_message_that_a_purchase_does_not_end_stays_queued() {
    let mut a = Arbiter::with_config_and_scenarios(
        "quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"",
        r#"
[[scenarios]]
name = "cart_upsell"
kind = "abandoned_cart"
channels = ["email"]
template = "upsell"
delay = "1h"
exit_on_purchase = false
"#,
    );
    a.time_zone = Some("UTC".into());
    let mut t = a.trigger_of(
        "up",
        "cart_upsell",
        MessageCategory::trigger,
        at("2026-01-05T22:50:00Z"),
    );
    t.cause_occurred_at = at("2026-01-05T21:50:00Z");
    assert_eq!(a.push_trigger(&t).rule, "quiet_hours");
    a.purchase("up-buy", at("2026-01-05T21:49:00Z"));
    a.advance_to(at("2026-01-06T09:00:00Z"));
    let finals = a.finals_of("up");
    assert_eq!(finals.len(), 1, "{finals:#?}");
    assert_eq!(finals[0].outcome, DecisionOutcome::sent, "{finals:#?}");
}

/// A merged customer leaves a forwarding ledger (for late triggers, bounces and
/// unsubscribes). After the retention only the note stays: the addresses and the
/// triggers decided go, and an unsubscribe from an old message still reaches the
/// survivor.
#[test]
fn a_merged_customer_s_forwarding_ledger_shrinks_to_its_note_after_the_retention() {
    let mut a = Arbiter::new();
    assert_eq!(
        a.trigger("fl", "welcome", MessageCategory::trigger, T0)
            .outcome,
        DecisionOutcome::sent
    );
    let old_mail = a.last_send();
    a.merged_into("merged-fl", "z", T0 + HOUR);
    a.actions.clear();
    a.advance_to(T0 + HOUR + 30 * DAY - MINUTE);
    let kept = a.stored_ledger("c1").expect("the forwarding ledger");
    assert!(!kept.sent_to.is_empty(), "addresses kept for late bounces");
    a.advance_to(T0 + HOUR + 30 * DAY);
    let note = a.stored_ledger("c1").expect("the note stays");
    assert_eq!(note.merged_into.as_deref(), Some("z"));
    assert!(note.sent_to.is_empty() && note.decided_triggers.is_empty());
    a.outcome(&old_mail, OutcomeKind::unsubscribed, T0 + 60 * DAY);
    let forwarded: Vec<_> = a.actions.iter().map(|x| x.customer_id.as_str()).collect();
    assert_eq!(forwarded, ["z"], "the unsubscribe goes on to the survivor");
}

/// Lift is measured by intent to treat: the final decision of every marketing trigger
/// names the experiment group the customer was drawn into, whatever it decided (sent
/// or held out, unreachable, cancelled). Deferrals, transactional messages and
/// a cascade's later steps name none: they are no trigger's final decision.
#[test]
fn a_marketing_trigger_s_final_decision_names_the_customer_s_group() {
    use kairos_core::contracts::ExperimentGroup;
    let control =
        common::CONFIG.replace("control_group_percent = 0", "control_group_percent = 100");
    for (config, group) in [
        (common::CONFIG.to_string(), ExperimentGroup::treatment),
        (control, ExperimentGroup::control),
    ] {
        let mut a = Arbiter::from_text(&config);
        let day: Vec<_> = (0..4)
            .map(|i| a.trigger(&format!("p{i}"), "weekly_promo", PROMO, T0 + i * 2 * HOUR))
            .collect();
        // Over the daily cap, the rest wait for the next day: no final decision yet.
        let (waiting, decided): (Vec<_>, Vec<_>) = day
            .iter()
            .partition(|d| d.outcome == DecisionOutcome::deferred);
        assert!(!waiting.is_empty() && !decided.is_empty(), "{day:#?}");
        assert!(waiting.iter().all(|d| d.group.is_none()), "{day:#?}");
        assert!(decided.iter().all(|d| d.group == Some(group)), "{day:#?}");
        let mut a = Arbiter::from_text(&config);
        let mut unreachable = a.trigger_of("nc", "welcome", TRIGGER, T0 + 9 * HOUR);
        unreachable.contacts.consented_channels = Vec::new();
        let d = a.push_trigger(&unreachable);
        assert_eq!(
            (d.outcome, d.group),
            (DecisionOutcome::suppressed, Some(group))
        );
        a.purchase("buy", T0 + 10 * HOUR);
        let mut cancelled = a.trigger_of("late", "welcome", TRIGGER, T0 + 9 * HOUR);
        cancelled.fired_at = T0 + 11 * HOUR;
        let d = a.push_trigger(&cancelled);
        assert_eq!(
            (d.outcome, d.group),
            (DecisionOutcome::cancelled, Some(group))
        );
        let d = a.trigger(
            "r1",
            "welcome",
            MessageCategory::transactional,
            T0 + 12 * HOUR,
        );
        assert_eq!((d.outcome, d.group), (DecisionOutcome::sent, None));
    }
    // A deferral names none; the decision it ends in does.
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    a.time_zone = Some("Europe/Berlin".into());
    let d = a.trigger("w1", "welcome", TRIGGER, at("2026-01-05T21:30:00Z"));
    assert_eq!((d.outcome, d.group), (DecisionOutcome::deferred, None));
    a.advance_to(at("2026-01-06T09:00:00Z"));
    let decided = a.decisions_of("w1");
    assert_eq!(
        (decided[1].outcome, decided[1].group),
        (DecisionOutcome::sent, Some(ExperimentGroup::treatment))
    );
    // A cascade's first message counts, its next channel does not.
    let mut a = Arbiter::new();
    let mut t = a.trigger_of("k1", "cart_cascade", TRIGGER, T0);
    t.contacts.consented_channels = vec![Channel::email, Channel::push];
    assert_eq!(a.push_trigger(&t).group, Some(ExperimentGroup::treatment));
    a.advance_to(T0 + HOUR);
    let steps = a.decisions_of("k1");
    assert_eq!(steps.len(), 2, "{steps:#?}");
    assert_eq!(
        (steps[1].outcome, steps[1].rule.as_str(), steps[1].group),
        (DecisionOutcome::sent, "cascade", None)
    );
}

/// A scenario switched off (its template being fixed) or removed from the
/// configuration sends nothing more: a trigger waiting in the queue and one still on
/// the topic are cancelled, and say why. A trigger of a scenario the configuration
/// does not name waits an hour for one that does (a configuration rolled out to the
/// profile first), then is cancelled.
#[test]
fn a_scenario_switched_off_or_removed_sends_nothing_more() {
    let quiet = "quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"";
    let on = common::CONFIG.replace("[arbiter]\n", &format!("[arbiter]\n{quiet}\n"));
    let welcome = "name = \"welcome\"\nkind = \"welcome\"\n";
    let off = on.replacen(welcome, &format!("{welcome}enabled = false\n"), 1);
    let removed = on.replacen(welcome, "name = \"welcome_v2\"\nkind = \"welcome\"\n", 1);
    assert!(off != on && removed != on);
    let mut a = Arbiter::from_text(&on);
    a.time_zone = Some("Europe/Berlin".into());
    // 22:30 in Berlin: the welcome message waits for the morning.
    let queued = a.trigger("w1", "welcome", TRIGGER, at("2026-01-05T21:30:00Z"));
    assert_eq!(queued.outcome, DecisionOutcome::deferred);
    a.restart_with(&off);
    a.advance_to(at("2026-01-06T12:00:00Z"));
    let last = |a: &Arbiter, id: &str| {
        a.decisions_of(id)
            .last()
            .copied()
            .cloned()
            .expect("decided")
    };
    let ended = |a: &Arbiter, id: &str| {
        let d = last(a, id);
        assert_eq!(
            (d.outcome, d.rule.as_str()),
            (DecisionOutcome::cancelled, "scenario_off"),
            "{d:#?}"
        );
        d.reason
    };
    assert!(ended(&a, "w1").contains("switched off (enabled = false)"));
    a.trigger("w2", "welcome", TRIGGER, at("2026-01-06T12:00:00Z"));
    assert!(ended(&a, "w2").contains("switched off"));
    a.restart_with(&removed);
    let waits = a.trigger("w3", "welcome", TRIGGER, at("2026-01-06T12:30:00Z"));
    assert_eq!(
        (waits.outcome, waits.rule.as_str()),
        (DecisionOutcome::deferred, "scenario_off"),
        "{waits:#?}"
    );
    a.advance_to(at("2026-01-06T13:29:00Z"));
    assert_eq!(last(&a, "w3").outcome, DecisionOutcome::deferred);
    a.advance_to(at("2026-01-06T13:30:00Z"));
    assert!(ended(&a, "w3").contains("welcome is not in the configuration"));
    assert!(a.sends.is_empty(), "{:#?}", a.sends);
    // The configuration that has it comes within the hour: the trigger goes out.
    let waits = a.trigger("w4", "welcome", TRIGGER, at("2026-01-06T14:00:00Z"));
    assert_eq!(waits.outcome, DecisionOutcome::deferred);
    a.restart_with(&on);
    a.advance_to(at("2026-01-06T14:10:00Z"));
    assert_eq!(last(&a, "w4").outcome, DecisionOutcome::sent);
    let sent: Vec<&str> = a.sends.iter().map(|s| s.trigger_id.as_str()).collect();
    assert_eq!(sent, ["w4"]);
}

/// A chain switched off after its first step no longer holds the customer's main
/// scenario: what waited behind it goes out.
#[test]
fn a_chain_switched_off_lets_go_of_the_customer() {
    let mut a = Arbiter::with_config("daily_cap = 5\nweekly_cap = 20");
    let mut first = a.trigger_of("on0", "onboarding", TRIGGER, T0);
    first.priority = 50;
    assert_eq!(a.push_trigger(&first).outcome, DecisionOutcome::sent);
    let mut low = a.trigger_of("low", "welcome", TRIGGER, T0 + HOUR);
    low.priority = 40;
    low.valid_until = T0 + 3 * DAY;
    let waits = a.push_trigger(&low);
    assert_eq!(
        (waits.outcome, waits.rule.as_str()),
        (DecisionOutcome::deferred, "main_scenario")
    );
    let onboarding = "name = \"onboarding\"\nkind = \"welcome\"\n";
    let off = common::CONFIG
        .replace("[arbiter]\n", "[arbiter]\ndaily_cap = 5\nweekly_cap = 20\n")
        .replacen(onboarding, &format!("{onboarding}enabled = false\n"), 1);
    a.restart_with(&off);
    let mut other = a.trigger_of("other", "welcome", TRIGGER, T0 + 2 * HOUR);
    other.priority = 40;
    assert_eq!(a.push_trigger(&other).outcome, DecisionOutcome::sent);
    // What waited for the chain is decided again as it lets go, not at the chain's
    // old end.
    a.advance_to(T0 + 2 * HOUR + MINUTE);
    let finals = a.finals_of("low");
    assert_eq!(finals.len(), 1, "{:#?}", a.decisions_of("low"));
    assert_eq!(
        (finals[0].outcome, finals[0].decided_at),
        (DecisionOutcome::sent, T0 + 2 * HOUR)
    );
}
