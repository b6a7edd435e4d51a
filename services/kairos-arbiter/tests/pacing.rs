//! Pacing in event time: quiet hours in the customer's zone, the minimum gap, the daily
//! cap per local calendar day and the rolling weekly cap defer a marketing message to
//! the moment the rule allows it; a message that cannot wait past its valid-until
//! expires; transactional messages pass.

mod common;

use common::{at, Arbiter, T0};
use kairos_core::contracts::{Channel, Contacts, DecisionOutcome, MessageCategory};
use kairos_core::time::{DAY, HOUR, MINUTE};

const TRIGGER: MessageCategory = MessageCategory::trigger;

#[test]
fn quiet_hours_defer_to_the_local_morning_and_transactional_messages_pass() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    a.time_zone = Some("Europe/Berlin".into());
    // 22:30 in Berlin (UTC+1 in January).
    let night = at("2026-01-05T21:30:00Z");
    let first = a.trigger("q1", "welcome", TRIGGER, night);
    assert_eq!(first.outcome, DecisionOutcome::deferred);
    assert_eq!(first.rule, "quiet_hours");
    let receipt = a.trigger("r1", "welcome", MessageCategory::transactional, night);
    assert_eq!(
        receipt.outcome,
        DecisionOutcome::sent,
        "transactional ignores quiet hours"
    );

    // Nothing before 09:00 Berlin = 08:00 UTC.
    a.advance_to(at("2026-01-06T07:59:00Z"));
    assert_eq!(a.decisions_of("q1").len(), 1);
    a.advance_to(at("2026-01-06T08:00:00Z"));
    let last = *a.decisions_of("q1").last().expect("decided again");
    assert_eq!(last.outcome, DecisionOutcome::sent);
    assert_eq!(last.decided_at, at("2026-01-06T08:00:00Z"));
    assert_eq!(a.sends.len(), 2);
}

#[test]
fn quiet_hours_follow_the_customers_zone() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    // 21:30 UTC is 06:30 the next morning in Tokyo: quiet until 09:00 JST = 00:00 UTC.
    a.time_zone = Some("Asia/Tokyo".into());
    let d = a.trigger("t1", "welcome", TRIGGER, at("2026-01-05T21:30:00Z"));
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::deferred, "quiet_hours")
    );
    a.advance_to(at("2026-01-06T00:00:00Z"));
    assert_eq!(
        a.decisions_of("t1").last().map(|d| d.outcome),
        Some(DecisionOutcome::sent)
    );
    // The same instant is midday in London: not quiet.
    a.time_zone = Some("Europe/London".into());
    let noon = a.trigger("t2", "welcome", TRIGGER, at("2026-01-06T12:00:00Z"));
    assert_eq!(noon.outcome, DecisionOutcome::sent);
}

#[test]
fn a_waiting_message_keeps_the_quiet_hours_of_the_customer_s_newest_zone() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    // 22:00 in Tokyo: deferred to 09:00 JST = 00:00 UTC.
    a.time_zone = Some("Asia/Tokyo".into());
    let w1 = a.trigger("w1", "welcome", TRIGGER, at("2026-01-05T13:00:00Z"));
    assert_eq!(
        (w1.outcome, w1.rule.as_str()),
        (DecisionOutcome::deferred, "quiet_hours")
    );
    // The customer moved to London; a newer trigger says so.
    a.time_zone = Some("Europe/London".into());
    let w2 = a.trigger("w2", "welcome", TRIGGER, at("2026-01-05T14:00:00Z"));
    assert_eq!(w2.outcome, DecisionOutcome::sent);
    // 00:00 UTC is midnight in London: w1 waits for 09:00 there.
    a.advance_to(at("2026-01-06T00:00:00Z"));
    let woke = *a.decisions_of("w1").last().expect("decided again");
    assert_eq!(
        (woke.outcome, woke.rule.as_str()),
        (DecisionOutcome::deferred, "quiet_hours"),
        "{woke:?}"
    );
    a.advance_to(at("2026-01-06T09:00:00Z"));
    let last = *a.decisions_of("w1").last().expect("decided again");
    assert_eq!(last.outcome, DecisionOutcome::sent);
    assert_eq!(last.decided_at, at("2026-01-06T09:00:00Z"));
}

#[test]
fn a_waiting_message_goes_to_the_address_and_hours_the_customer_changed_to() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    // 22:00 in Tokyo: deferred to 09:00 JST = 00:00 UTC.
    a.time_zone = Some("Asia/Tokyo".into());
    let w1 = a.trigger("w1", "welcome", TRIGGER, at("2026-01-05T13:00:00Z"));
    assert_eq!(w1.outcome, DecisionOutcome::deferred);
    // The customer gives a new e-mail address and moves to London: no trigger says so.
    let moved = Contacts {
        email: Some("new@example.com".into()),
        push_token: Some("token-1".into()),
        time_zone: Some("Europe/London".into()),
        consented_channels: vec![Channel::email, Channel::push],
        ..Contacts::default()
    };
    a.contacts_changed("ch1", moved, at("2026-01-05T14:00:00Z"));
    // An older statement of contacts, read after it, changes nothing.
    let stale = Contacts {
        email: Some("stale@example.com".into()),
        ..Contacts::default()
    };
    a.contacts_changed("ch0", stale, at("2026-01-05T12:00:00Z"));
    // 00:00 UTC is midnight in London: w1 waits for 09:00 there.
    a.advance_to(at("2026-01-06T00:00:00Z"));
    let woke = *a.decisions_of("w1").last().expect("decided again");
    assert_eq!(
        (woke.outcome, woke.rule.as_str()),
        (DecisionOutcome::deferred, "quiet_hours"),
        "{woke:?}"
    );
    a.advance_to(at("2026-01-06T09:00:00Z"));
    assert_eq!(
        a.decisions_of("w1").last().expect("decided").outcome,
        DecisionOutcome::sent
    );
    let send = a.last_send();
    assert_eq!(send.address.as_deref(), Some("new@example.com"));
    // Nothing waits any more: the next trigger's own contacts are the newest, and the
    // ledger keeps no copy of them.
    a.time_zone = Some("Europe/London".into());
    let w2 = a.trigger("w2", "welcome", TRIGGER, at("2026-01-06T18:00:00Z"));
    assert_eq!(w2.outcome, DecisionOutcome::sent, "{w2:?}");
    assert_eq!(a.last_send().address.as_deref(), Some("c1@example.com"));
    let ledger = a.stored_ledger("c1").expect("ledger");
    assert!(ledger.contacts.is_none(), "{:?}", ledger.contacts);

    // A change read before a trigger that fired ahead of it (another topic, read
    // later): kept while nothing waits, so that trigger goes to the new address.
    let newer = Contacts {
        email: Some("newer@example.com".into()),
        push_token: Some("token-1".into()),
        time_zone: Some("Europe/London".into()),
        consented_channels: vec![Channel::email, Channel::push],
        ..Contacts::default()
    };
    a.contacts_changed("ch2", newer, at("2026-01-07T12:00:00Z"));
    let w3 = a.trigger("w3", "welcome", TRIGGER, at("2026-01-07T11:00:00Z"));
    assert_eq!(w3.outcome, DecisionOutcome::sent, "{w3:?}");
    assert_eq!(a.last_send().address.as_deref(), Some("newer@example.com"));
    // Two changes the profile learnt at the same instant: the one read last stands.
    let newest = Contacts {
        email: Some("newest@example.com".into()),
        consented_channels: vec![Channel::email],
        ..Contacts::default()
    };
    a.contacts_changed("ch3", newest, at("2026-01-07T12:00:00Z"));
    let w4 = a.trigger("w4", "welcome", TRIGGER, at("2026-01-07T11:30:00Z"));
    if w4.outcome != DecisionOutcome::sent {
        a.advance_to(at("2026-01-08T12:00:00Z"));
    }
    assert_eq!(
        a.decisions_of("w4").last().expect("decided").outcome,
        DecisionOutcome::sent
    );
    assert_eq!(a.last_send().address.as_deref(), Some("newest@example.com"));
}

#[test]
fn a_change_of_address_read_before_the_first_trigger_is_kept_for_it_a_day() {
    let fixed = || Contacts {
        email: Some("fixed@example.com".into()),
        push_token: Some("token-1".into()),
        consented_channels: vec![Channel::email, Channel::push],
        ..Contacts::default()
    };
    // The customer registers with a mistyped address and fixes it a minute later; the
    // arbiter, which has no ledger of them yet, reads the change before the welcome
    // that fired with the old address.
    let mut a = Arbiter::new();
    a.contacts_changed("ch1", fixed(), at("2026-01-05T12:01:00Z"));
    assert!(a.ledger_stored("c1"), "the note is kept");
    assert_eq!(
        a.timer_due("c1", "contacts-expiry/c1"),
        Some(at("2026-01-06T12:01:00Z"))
    );
    let w1 = a.trigger("w1", "welcome", TRIGGER, at("2026-01-05T12:00:00Z"));
    assert_eq!(w1.outcome, DecisionOutcome::sent, "{w1:?}");
    assert_eq!(a.last_send().address.as_deref(), Some("fixed@example.com"));
    // The ledger is the customer's now: the note's day ending leaves it.
    a.advance_to(at("2026-01-06T13:00:00Z"));
    let ledger = a.stored_ledger("c1").expect("ledger stays");
    assert_eq!(ledger.sends.len(), 1);

    // Nothing else comes within the day: the ledger made for the note goes.
    let mut b = Arbiter::new();
    b.contacts_changed("ch1", fixed(), at("2026-01-05T12:01:00Z"));
    // A second change within the day waits a day of its own.
    b.contacts_changed("ch2", fixed(), at("2026-01-06T10:00:00Z"));
    b.advance_to(at("2026-01-06T13:00:00Z"));
    let kept = b.stored_ledger("c1").expect("the newer note still waits");
    assert_eq!(
        kept.contacts.map(|(at, _)| at),
        Some(at("2026-01-06T10:00:00Z"))
    );
    b.advance_to(at("2026-01-07T10:00:00Z"));
    assert!(
        !b.ledger_stored("c1"),
        "a ledger of nothing but the note goes"
    );
    assert_eq!(b.timer_due("c1", "contacts-expiry/c1"), None);
    // A trigger that fired before the change and is read after the day goes to the
    // address it fired with.
    let mut late = b.trigger_of("w1", "welcome", TRIGGER, at("2026-01-05T12:00:00Z"));
    late.valid_until = at("2026-01-12T12:00:00Z");
    let w1 = b.push_trigger(&late);
    assert_eq!(w1.outcome, DecisionOutcome::sent, "{w1:?}");
    assert_eq!(b.last_send().address.as_deref(), Some("c1@example.com"));

    // Something else came for the customer within the day: the ledger is theirs like
    // any other, and keeps the note for a trigger fired before it, however late.
    let mut c = Arbiter::new();
    c.contacts_changed("ch1", fixed(), at("2026-01-05T12:01:00Z"));
    c.visit("v1", at("2026-01-05T15:00:00Z"));
    c.advance_to(at("2026-01-06T13:00:00Z"));
    let ledger = c.stored_ledger("c1").expect("ledger stays");
    assert_eq!(
        ledger.contacts.map(|(at, _)| at),
        Some(at("2026-01-05T12:01:00Z"))
    );
    assert_eq!(ledger.last_active_at, Some(at("2026-01-05T15:00:00Z")));
    let mut late = c.trigger_of("w1", "welcome", TRIGGER, at("2026-01-05T12:00:00Z"));
    late.valid_until = at("2026-01-12T12:00:00Z");
    assert_eq!(c.push_trigger(&late).outcome, DecisionOutcome::sent);
    assert_eq!(c.last_send().address.as_deref(), Some("fixed@example.com"));
}

#[test]
fn the_daily_cap_counts_the_customers_calendar_day() {
    let mut a = Arbiter::new();
    a.time_zone = Some("America/New_York".into());
    // 10:00, 12:00 and 20:00 New York time on Monday (UTC-5).
    let d1 = a.trigger("d1", "welcome", TRIGGER, at("2026-01-05T15:00:00Z"));
    let d2 = a.trigger("d2", "welcome", TRIGGER, at("2026-01-05T17:00:00Z"));
    let d3 = a.trigger("d3", "welcome", TRIGGER, at("2026-01-06T01:00:00Z"));
    assert_eq!(d1.outcome, DecisionOutcome::sent);
    assert_eq!(d2.outcome, DecisionOutcome::sent);
    // 01:00 UTC is still Monday in New York: the third waits for local midnight.
    assert_eq!(
        (d3.outcome, d3.rule.as_str()),
        (DecisionOutcome::deferred, "frequency_cap_daily")
    );
    a.advance_to(at("2026-01-06T04:59:00Z"));
    assert_eq!(a.decisions_of("d3").len(), 1);
    a.advance_to(at("2026-01-06T05:00:00Z"));
    let last = *a.decisions_of("d3").last().expect("decided again");
    assert_eq!(last.outcome, DecisionOutcome::sent);
    assert_eq!(last.decided_at, at("2026-01-06T05:00:00Z"));
}

#[test]
fn the_weekly_cap_holds_until_the_oldest_send_leaves_the_window() {
    let mut a = Arbiter::with_config("daily_cap = 10\nweekly_cap = 3");
    for (i, day) in [0, 1, 2].iter().enumerate() {
        let d = a.trigger(&format!("w{i}"), "welcome", TRIGGER, T0 + day * DAY);
        assert_eq!(d.outcome, DecisionOutcome::sent);
    }
    // Valid for 24 h, so it can wait for day 7, when the day-0 send leaves the window.
    let t = a.trigger("w3", "welcome", TRIGGER, T0 + 6 * DAY + 12 * HOUR);
    assert_eq!(
        (t.outcome, t.rule.as_str()),
        (DecisionOutcome::deferred, "frequency_cap_weekly")
    );
    a.advance_to(T0 + 7 * DAY - 1);
    assert_eq!(a.decisions_of("w3").len(), 1);
    a.advance_to(T0 + 7 * DAY);
    assert_eq!(
        a.decisions_of("w3").last().map(|d| d.outcome),
        Some(DecisionOutcome::sent)
    );
}

#[test]
fn the_minimum_gap_spaces_messages() {
    let mut a = Arbiter::with_config("min_gap = \"4h\"");
    assert_eq!(
        a.trigger("g1", "welcome", TRIGGER, T0).outcome,
        DecisionOutcome::sent
    );
    let g2 = a.trigger("g2", "welcome", TRIGGER, T0 + HOUR);
    assert_eq!(
        (g2.outcome, g2.rule.as_str()),
        (DecisionOutcome::deferred, "min_gap")
    );
    a.advance_to(T0 + 4 * HOUR - MINUTE);
    assert_eq!(a.decisions_of("g2").len(), 1);
    a.advance_to(T0 + 4 * HOUR);
    let last = *a.decisions_of("g2").last().expect("decided again");
    assert_eq!(last.outcome, DecisionOutcome::sent);
    assert_eq!(last.channel, Some(Channel::email));
}

/// A wait for the minimum gap that would end within the quiet hours is a wait for
/// their end: one deferral, one wake, not a second one at night.
#[test]
fn a_gap_that_ends_in_the_quiet_hours_waits_for_their_end_at_once() {
    let mut a = Arbiter::with_config(
        "min_gap = \"4h\"\nquiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"",
    );
    a.time_zone = Some("UTC".into());
    let evening = at("2026-01-05T19:00:00Z");
    assert_eq!(
        a.trigger("qg1", "welcome", TRIGGER, evening).outcome,
        DecisionOutcome::sent
    );
    // The gap would end at 23:00, within the quiet hours.
    let qg2 = a.trigger("qg2", "welcome", TRIGGER, evening + HOUR);
    assert_eq!(
        (qg2.outcome, qg2.rule.as_str()),
        (DecisionOutcome::deferred, "min_gap")
    );
    a.advance_to(at("2026-01-06T08:59:00Z"));
    assert_eq!(
        a.decisions_of("qg2").len(),
        1,
        "{:#?}",
        a.decisions_of("qg2")
    );
    a.advance_to(at("2026-01-06T09:00:00Z"));
    let decided = a.decisions_of("qg2");
    assert_eq!(decided.len(), 2, "{decided:#?}");
    assert_eq!(
        (decided[1].outcome, decided[1].decided_at),
        (DecisionOutcome::sent, at("2026-01-06T09:00:00Z"))
    );
}

#[test]
fn a_deferred_message_expires_at_its_valid_until() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    // Valid 24 h (as every trigger of the harness), so it can wait for the morning.
    let late = at("2026-01-05T23:00:00Z");
    let d = a.trigger("e1", "welcome", TRIGGER, late);
    assert_eq!(d.outcome, DecisionOutcome::deferred);
    a.advance_to(at("2026-01-06T09:00:00Z"));
    assert_eq!(
        a.decisions_of("e1").last().map(|d| d.outcome),
        Some(DecisionOutcome::sent)
    );

    // With a weekly cap that frees a slot only after valid-until, it expires.
    let mut b = Arbiter::with_config("weekly_cap = 1");
    assert_eq!(
        b.trigger("x1", "welcome", TRIGGER, T0).outcome,
        DecisionOutcome::sent
    );
    let x2 = b.trigger("x2", "welcome", TRIGGER, T0 + DAY);
    assert_eq!(x2.outcome, DecisionOutcome::deferred);
    b.advance_to(T0 + 3 * DAY);
    let last = *b.decisions_of("x2").last().expect("decided again");
    assert_eq!(
        (last.outcome, last.rule.as_str()),
        (DecisionOutcome::expired, "valid_until")
    );
    assert_eq!(b.sends.len(), 1, "the expired message was never sent");
}

/// A customer's queue is bounded: a marketing message that would wait behind a
/// hundred others is suppressed, saying what it would have waited for; a
/// transactional one still passes, and what waits is decided as before.
#[test]
fn a_marketing_message_behind_a_full_queue_is_suppressed_with_the_rule() {
    let mut a = Arbiter::with_config("weekly_cap = 1");
    assert_eq!(
        a.trigger("f0", "welcome", TRIGGER, T0).outcome,
        DecisionOutcome::sent
    );
    for n in 1..=100 {
        let d = a.trigger(&format!("f{n}"), "welcome", TRIGGER, T0 + n * MINUTE);
        assert_eq!(d.outcome, DecisionOutcome::deferred, "f{n}: {d:#?}");
    }
    let over = a.trigger("f101", "welcome", TRIGGER, T0 + 101 * MINUTE);
    assert_eq!(
        (over.outcome, over.rule.as_str()),
        (DecisionOutcome::suppressed, "queue_full"),
        "{over:#?}"
    );
    assert!(
        over.reason.contains("frequency_cap_weekly"),
        "{}",
        over.reason
    );
    let receipt = a.trigger(
        "r1",
        "welcome",
        MessageCategory::transactional,
        T0 + 102 * MINUTE,
    );
    assert_eq!(receipt.outcome, DecisionOutcome::sent);
    // The queue drains as its messages expire: one more may wait then.
    a.advance_to(T0 + 3 * DAY);
    let d = a.trigger("f102", "welcome", TRIGGER, T0 + 3 * DAY);
    assert_eq!(d.outcome, DecisionOutcome::deferred, "{d:#?}");
}

#[test]
fn a_channel_at_its_own_cap_gives_way_to_the_next_or_waits() {
    let mut a = Arbiter::with_config("daily_cap = 5\nchannel_caps = { email = { daily_cap = 1 } }");
    let first = a.trigger("e1", "welcome", TRIGGER, T0);
    assert_eq!(first.channel, Some(Channel::email));
    // E-mail is at its cap for the day: push takes the message (after the conflict
    // window of the e-mail).
    let second = a.trigger("e2", "welcome", TRIGGER, T0 + 2 * HOUR);
    assert_eq!(
        (second.outcome, second.channel),
        (DecisionOutcome::sent, Some(Channel::push)),
        "{second:#?}"
    );
    // An e-mail-only message waits for the next day (UTC customer).
    let mut t = a.trigger_of("e3", "welcome", TRIGGER, T0 + 4 * HOUR);
    t.channels = vec![Channel::email];
    let waits = a.push_trigger(&t);
    assert_eq!(
        (waits.outcome, waits.rule.as_str()),
        (DecisionOutcome::deferred, "channel_cap"),
        "{waits:#?}"
    );
    a.advance_to(at("2026-01-06T00:00:00Z"));
    let sent = *a.decisions_of("e3").last().expect("decided again");
    assert_eq!(
        (sent.outcome, sent.channel),
        (DecisionOutcome::sent, Some(Channel::email))
    );
}

#[test]
fn a_category_cap_holds_promo_but_not_other_messages() {
    let mut a = Arbiter::with_config("category_caps = { promo = { weekly_cap = 1 } }");
    assert_eq!(
        a.trigger("p1", "weekly_promo", MessageCategory::promo, T0)
            .outcome,
        DecisionOutcome::sent
    );
    let capped = a.trigger("p2", "weekly_promo", MessageCategory::promo, T0 + 2 * DAY);
    assert_eq!(
        (capped.outcome, capped.rule.as_str()),
        (DecisionOutcome::deferred, "category_cap")
    );
    assert!(
        capped.reason.contains("in the last 7 days (cap 1)"),
        "{}",
        capped.reason
    );
    let other = a.trigger("t1", "welcome", TRIGGER, T0 + 2 * DAY);
    assert_eq!(other.outcome, DecisionOutcome::sent);
    // The promo waited for the week to free a slot, past its valid-until: expired.
    a.advance_to(T0 + 8 * DAY);
    assert_eq!(
        a.decisions_of("p2").last().map(|d| d.outcome),
        Some(DecisionOutcome::expired)
    );
}

#[test]
fn a_scenario_cap_holds_that_scenario_but_not_others() {
    let mut a = Arbiter::with_scenarios(
        r#"
[[scenarios]]
name = "flash_sale"
kind = "welcome"
category = "promo"
channels = ["email"]
template = "flash"
exit_on_purchase = false
valid_for = "10d"
caps = { daily_cap = 1, weekly_cap = 2 }
"#,
    );
    let first = a.trigger("f1", "flash_sale", MessageCategory::promo, T0);
    assert_eq!(first.outcome, DecisionOutcome::sent);
    // Same local day: the scenario's daily cap (1) holds it until the next day.
    let same_day = a.trigger("f2", "flash_sale", MessageCategory::promo, T0 + 2 * HOUR);
    assert_eq!(
        (same_day.outcome, same_day.rule.as_str()),
        (DecisionOutcome::deferred, "scenario_cap")
    );
    assert!(
        same_day.reason.contains("flash_sale messages"),
        "{}",
        same_day.reason
    );
    // Another scenario is not held by it (the overall daily cap is 2).
    let other = a.trigger("w1", "weekly_promo", MessageCategory::promo, T0 + 2 * HOUR);
    assert_eq!(other.outcome, DecisionOutcome::sent);
    // The next day the deferred one goes out: 2 in 7 days, the weekly cap.
    a.advance_to(T0 + DAY);
    assert_eq!(
        a.decisions_of("f2").last().map(|d| d.outcome),
        Some(DecisionOutcome::sent)
    );
    let third = a.trigger("f3", "flash_sale", MessageCategory::promo, T0 + 3 * DAY);
    assert_eq!(
        (third.outcome, third.rule.as_str()),
        (DecisionOutcome::deferred, "scenario_cap")
    );
    assert!(
        third.reason.contains("in the last 7 days (cap 2)"),
        "{}",
        third.reason
    );
    let sent_flash = a
        .sends
        .iter()
        .filter(|s| s.scenario == "flash_sale")
        .count();
    assert_eq!(sent_flash, 2);
}

#[test]
fn quiet_hours_ending_in_the_repeated_dst_hour_end_at_its_second_pass() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"02:30\"");
    a.time_zone = Some("Europe/Berlin".into());
    // 2026-10-25 01:10 UTC is the second 02:10 in Berlin (CET): the first 02:30
    // (00:30 UTC) has passed, the second (01:30 UTC) ends the quiet hours.
    let d = a.trigger("dst", "welcome", TRIGGER, at("2026-10-25T01:10:00Z"));
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::deferred, "quiet_hours")
    );
    a.advance_to(at("2026-10-25T01:29:00Z"));
    assert_eq!(a.decisions_of("dst").len(), 1);
    a.advance_to(at("2026-10-25T01:30:00Z"));
    let last = *a.decisions_of("dst").last().expect("decided again");
    assert_eq!(
        (last.outcome, last.decided_at),
        (DecisionOutcome::sent, at("2026-10-25T01:30:00Z")),
        "{last:#?}"
    );
}

/// On the night summer time starts, 02:30 never shows on a Berlin clock: quiet hours
/// ending then end when the clocks jump from 02:00 to 03:00, not half an hour later.
#[test]
fn quiet_hours_ending_in_the_skipped_dst_hour_end_when_the_clocks_jump() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"02:30\"");
    a.time_zone = Some("Europe/Berlin".into());
    // 2026-03-29 00:10 UTC is 01:10 CET; at 01:00 UTC the clocks go to 03:00 CEST.
    let d = a.trigger("dst-spring", "welcome", TRIGGER, at("2026-03-29T00:10:00Z"));
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::deferred, "quiet_hours")
    );
    a.advance_to(at("2026-03-29T00:59:00Z"));
    assert_eq!(a.decisions_of("dst-spring").len(), 1);
    a.advance_to(at("2026-03-29T01:00:00Z"));
    let last = *a.decisions_of("dst-spring").last().expect("decided again");
    assert_eq!(
        (last.outcome, last.decided_at),
        (DecisionOutcome::sent, at("2026-03-29T01:00:00Z")),
        "{last:#?}"
    );
}

#[test]
fn triggers_released_together_are_decided_by_priority() {
    let scenarios: String = [
        ("browse_abandonment", "browse_abandonment"),
        ("price_drop", "price_drop"),
        ("abandoned_cart", "abandoned_cart"),
    ]
    .iter()
    .map(|(name, kind)| {
        format!(
            "[[scenarios]]\nname = \"{name}\"\nkind = \"{kind}\"\n\
             channels = [\"email\"]\ntemplate = \"{name}\"\n"
        )
    })
    .collect();
    let mut a = Arbiter::with_config_and_scenarios(
        "daily_cap = 2\nquiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"",
        &scenarios,
    );
    a.time_zone = Some("UTC".into());
    // Ids in the opposite order of the priorities, so the order of the timers' ids
    // would pick the wrong two.
    for (id, scenario, priority, at_) in [
        (
            "a-browse",
            "browse_abandonment",
            40,
            at("2026-01-05T22:00:00Z"),
        ),
        ("b-price", "price_drop", 45, at("2026-01-05T22:30:00Z")),
        ("c-cart", "abandoned_cart", 60, at("2026-01-05T23:00:00Z")),
    ] {
        let mut t = a.trigger_of(id, scenario, TRIGGER, at_);
        t.priority = priority;
        let d = a.push_trigger(&t);
        assert_eq!(
            (d.outcome, d.rule.as_str()),
            (DecisionOutcome::deferred, "quiet_hours")
        );
    }
    a.advance_to(at("2026-01-06T09:00:00Z"));
    let sent: Vec<_> = a.sends.iter().map(|s| s.trigger_id.as_str()).collect();
    assert_eq!(sent, ["c-cart", "b-price"]);
    let last = *a.decisions_of("a-browse").last().expect("decided again");
    assert_eq!(
        (last.outcome, last.rule.as_str()),
        (DecisionOutcome::deferred, "frequency_cap_daily")
    );
}

#[test]
fn the_send_command_carries_every_deferral_in_its_reason_trail() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    a.time_zone = Some("UTC".into());
    let night = at("2026-01-05T22:00:00Z");
    assert_eq!(
        a.trigger("q1", "welcome", TRIGGER, night).rule,
        "quiet_hours"
    );
    a.advance_to(at("2026-01-06T09:00:00Z"));
    let send = a.last_send();
    assert_eq!(send.reasons.len(), 2, "{:#?}", send.reasons);
    assert!(
        send.reasons[0].starts_with("quiet_hours: "),
        "{:#?}",
        send.reasons
    );
    assert!(
        send.reasons[1].starts_with("channel_choice: "),
        "{:#?}",
        send.reasons
    );
}
