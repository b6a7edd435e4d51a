//! Outcomes flow back into the arbiter's state: an unsubscribe, a hard bounce and a
//! spam complaint suppress what they must, in event time, through the same engine
//! the service runs.

mod common;

use common::{at, Arbiter, T0};
use kairos_core::contracts::{
    Channel, CustomerAction, CustomerActionKind, DecisionOutcome, MessageCategory, Outcome,
    OutcomeKind, SendCommand,
};
use kairos_core::time::{DAY, HOUR, MINUTE};

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
fn a_bounce_of_an_address_in_its_unicode_spelling_bars_its_ascii_form() {
    let mut a = Arbiter::new();
    // Sent before e-mail domains were normalized: the Unicode spelling.
    let mut first = a.trigger_of("t1", "welcome", MessageCategory::trigger, T0);
    first.contacts.email = Some("anna@bücher.de".into());
    a.push_trigger(&first);
    let email = a.last_send();
    assert_eq!(email.address.as_deref(), Some("anna@bücher.de"));
    a.outcome(&email, OutcomeKind::bounced_hard, T0 + 1);
    let mut next = a.trigger_of("t2", "welcome", MessageCategory::trigger, T0 + 2 * HOUR);
    next.contacts.email = Some("anna@xn--bcher-kva.de".into());
    let decided = a.push_trigger(&next);
    assert_eq!(decided.channel, Some(Channel::push), "{decided:?}");
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

/// Customer c1 withdrew consent on `channel` at `at` (as the profile reports a
/// `consent_change` of the site or app).
fn opt_out(a: &mut Arbiter, id: &str, channel: Channel, at: i64) {
    let action = CustomerAction {
        channel: Some(channel),
        ..CustomerAction::new(id.into(), "c1".into(), CustomerActionKind::opt_out, at)
    };
    a.push("customer-actions", "c1", &action);
}

#[test]
fn a_consent_withdrawn_on_the_site_stops_a_message_already_waiting() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    a.time_zone = Some("UTC".into());
    let night = at("2026-01-05T22:00:00Z");
    let mut t = a.trigger_of("w1", "welcome", MessageCategory::trigger, night);
    t.channels = vec![Channel::email];
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::deferred);
    // The trigger carries the consent the profile knew when it fired; the withdrawal
    // comes after it, while the message waits for the morning.
    opt_out(&mut a, "out-1", Channel::email, night + HOUR);
    a.advance_to(at("2026-01-06T10:00:00Z"));
    let last = *a.decisions_of("w1").last().expect("decided again");
    assert_eq!(
        (last.outcome, last.rule.as_str()),
        (DecisionOutcome::suppressed, "unsubscribed"),
        "{last:#?}"
    );
    assert!(a.sends.is_empty());

    // A later opt-in lifts it, and a withdrawal older than that opt-in, arriving
    // late, does not undo it.
    let morning = at("2026-01-06T11:00:00Z");
    a.opt_in("in-1", Channel::email, morning);
    opt_out(&mut a, "out-0", Channel::email, morning - 30 * MINUTE);
    let mut t = a.trigger_of("w2", "welcome", MessageCategory::trigger, morning + HOUR);
    t.channels = vec![Channel::email];
    let d = a.push_trigger(&t);
    assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
}

/// An unsubscribe outcome of its own id (the harness names outcomes by send and kind).
fn unsubscribe(a: &mut Arbiter, id: &str, send: &SendCommand, at: i64) {
    let o = Outcome {
        outcome_id: id.into(),
        send_id: send.send_id.clone(),
        customer_id: send.customer_id.clone(),
        scenario: send.scenario.clone(),
        channel: send.channel,
        category: send.category,
        kind: OutcomeKind::unsubscribed,
        reason: None,
        occurred_at: at,
        address: None,
    };
    a.push("outcomes", "c1", &o);
}

fn email_only(a: &Arbiter, id: &str, at: i64) -> kairos_core::contracts::Trigger {
    let mut t = a.trigger_of(id, "welcome", MessageCategory::trigger, at);
    t.channels = vec![Channel::email];
    t
}

#[test]
fn the_latest_unsubscribe_holds_against_an_earlier_opt_in_arriving_last() {
    let mut a = Arbiter::new();
    let t = email_only(&a, "u1", T0);
    a.push_trigger(&t);
    let email = a.last_send();
    unsubscribe(&mut a, "unsub-1", &email, T0 + HOUR);
    unsubscribe(&mut a, "unsub-2", &email, T0 + 5 * HOUR);
    // The opt-in between the two arrives last: it ends the first, not the second.
    a.opt_in("in", Channel::email, T0 + 3 * HOUR);
    let t = email_only(&a, "u2", T0 + 6 * HOUR);
    let d = a.push_trigger(&t);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::suppressed, "unsubscribed"),
        "{d:#?}"
    );
    assert_eq!(a.sends.len(), 1);
}

#[test]
fn an_unsubscribe_at_the_instant_of_an_opt_in_wins() {
    let mut a = Arbiter::new();
    let t = email_only(&a, "u1", T0);
    a.push_trigger(&t);
    let email = a.last_send();
    a.opt_in("in", Channel::email, T0 + HOUR);
    unsubscribe(&mut a, "unsub", &email, T0 + HOUR);
    let t = email_only(&a, "u2", T0 + 2 * HOUR);
    let d = a.push_trigger(&t);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::suppressed, "unsubscribed"),
        "{d:#?}"
    );
}

#[test]
fn every_address_that_bounced_stays_suppressed() {
    let mut a = Arbiter::with_config("daily_cap = 10");
    let with_address = |a: &Arbiter, id: &str, address: &str, at: i64| {
        let mut t = a.trigger_of(id, "welcome", MessageCategory::trigger, at);
        t.contacts.email = Some(address.into());
        t
    };
    let t = with_address(&a, "b1", "a@example.com", T0);
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    let first = a.last_send();
    a.outcome(&first, OutcomeKind::bounced_hard, T0 + 1);
    let t = with_address(&a, "b2", "b@example.com", T0 + 2 * HOUR);
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    let second = a.last_send();
    assert_eq!(second.address.as_deref(), Some("b@example.com"));
    a.outcome(&second, OutcomeKind::bounced_hard, T0 + 2 * HOUR + 1);
    // A trigger that still carries the first address: it bounced too.
    let t = with_address(&a, "b3", "a@example.com", T0 + 4 * HOUR);
    let d = a.push_trigger(&t);
    assert_eq!(d.channel, Some(Channel::push), "{d:#?}");
}

#[test]
fn a_bounce_reported_weeks_after_the_send_still_suppresses_the_address() {
    let mut a = Arbiter::new();
    a.trigger("b1", "welcome", MessageCategory::trigger, T0);
    let first = a.last_send();
    // A decision eight days later prunes what is only kept for the weekly cap.
    let later = a.trigger("b2", "welcome", MessageCategory::trigger, T0 + 8 * DAY);
    assert_eq!(later.channel, Some(Channel::email));
    a.outcome(&first, OutcomeKind::bounced_hard, T0 + 9 * DAY);
    let d = a.trigger("b3", "welcome", MessageCategory::trigger, T0 + 10 * DAY);
    assert_eq!(d.channel, Some(Channel::push), "{d:#?}");
}

#[test]
fn a_push_token_that_bounced_hard_gives_way_to_email() {
    let mut a = Arbiter::new();
    let push_first = |a: &Arbiter, id: &str, at: i64| {
        let mut t = a.trigger_of(id, "welcome", MessageCategory::trigger, at);
        t.channels = vec![Channel::push, Channel::email];
        t
    };
    let t = push_first(&a, "t1", T0);
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::push));
    let send = a.last_send();
    a.outcome(&send, OutcomeKind::bounced_hard, T0 + MINUTE);
    let t = push_first(&a, "t2", T0 + DAY);
    let d = a.push_trigger(&t);
    assert_eq!(d.channel, Some(Channel::email), "{d:#?}");
}

#[test]
fn a_second_unsubscribe_from_the_same_message_after_an_opt_in_suppresses_again() {
    let mut a = Arbiter::with_config("daily_cap = 10");
    a.push_trigger(&email_only(&a, "u1", T0));
    let email = a.last_send();
    // The webhook names an outcome by its send and kind: both clicks share an id.
    unsubscribe(&mut a, "same-id", &email, T0 + HOUR);
    a.opt_in("in", Channel::email, T0 + 2 * HOUR);
    assert_eq!(
        a.push_trigger(&email_only(&a, "u2", T0 + 3 * HOUR)).outcome,
        DecisionOutcome::sent,
        "the opt-in lifts the first unsubscribe"
    );
    unsubscribe(&mut a, "same-id", &email, T0 + 4 * HOUR);
    let d = a.push_trigger(&email_only(&a, "u3", T0 + 5 * HOUR));
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::suppressed, "unsubscribed"),
        "{d:#?}"
    );
    assert_eq!(a.sends.len(), 2);
}

#[test]
fn a_delivery_reported_after_the_open_is_not_a_message_ignored() {
    let mut a = Arbiter::with_config("sunset_after_ignored = 2\ndaily_cap = 10\nweekly_cap = 30");
    for i in 0..3 {
        let d = a.trigger(
            &format!("w{i}"),
            "welcome",
            MessageCategory::trigger,
            T0 + i * DAY,
        );
        assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
    }
    // The provider's webhooks come late and out of order: every open before any
    // delivery report.
    let sends = a.sends.clone();
    for (i, send) in (0..).zip(&sends) {
        a.outcome(send, OutcomeKind::opened, T0 + i * DAY + 2 * MINUTE);
    }
    for (i, send) in (0..).zip(&sends) {
        a.outcome(send, OutcomeKind::delivered, T0 + i * DAY + MINUTE);
    }
    let d = a.trigger("p1", "weekly_promo", MessageCategory::promo, T0 + 4 * DAY);
    assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
}

/// A merged customer's unsubscribe that the survivor's opt-in came after is over: both
/// ids are one person, whose latest word counts. One that came after the opt-in holds.
#[test]
fn a_merged_unsubscribe_holds_only_against_an_older_opt_in() {
    use kairos_arbiter::CustomerLedger;
    for (unsubscribed_at, opted_in_at, sent) in [
        (T0 + 3 * HOUR, T0 + 5 * HOUR, true),
        (T0 + 5 * HOUR, T0 + 3 * HOUR, false),
    ] {
        let mut a = Arbiter::new();
        a.opt_in("in", Channel::email, opted_in_at);
        let mut merged = CustomerLedger::default();
        merged.unsubscribed.insert(Channel::email, unsubscribed_at);
        let merge_in = CustomerAction {
            state: Some(serde_json::to_string(&merged).expect("ledger json")),
            merged_from: Some("c9".into()),
            ..CustomerAction::new(
                "merge-c9".into(),
                "c1".into(),
                CustomerActionKind::merge_in,
                T0 + 4 * HOUR,
            )
        };
        a.push("customer-actions", "c1", &merge_in);
        let d = a.push_trigger(&email_only(&a, "u1", T0 + 6 * HOUR));
        let expected = if sent {
            DecisionOutcome::sent
        } else {
            DecisionOutcome::suppressed
        };
        assert_eq!(
            d.outcome, expected,
            "unsubscribed at {unsubscribed_at}: {d:#?}"
        );
    }
}

/// As above for a message sent before a merge: the merged id's unsubscribes reach the
/// survivor, and the second click (after the survivor's opt-in) is not taken for the
/// first one's repeat.
#[test]
fn a_second_unsubscribe_from_a_message_of_a_merged_id_reaches_the_survivor() {
    let mut a = Arbiter::with_config("daily_cap = 10");
    a.push_trigger(&email_only(&a, "u1", T0));
    let email = a.last_send();
    let hand_on = |a: &mut Arbiter| {
        for action in std::mem::take(&mut a.actions) {
            assert_eq!(action.customer_id, "c2", "{action:?}");
            a.push("customer-actions", "c2", &action);
        }
    };
    a.merged_into("m1", "c2", T0 + MINUTE);
    hand_on(&mut a);
    unsubscribe(&mut a, "same-id", &email, T0 + HOUR);
    hand_on(&mut a);
    let opt_in = CustomerAction {
        channel: Some(Channel::email),
        ..CustomerAction::new(
            "in".into(),
            "c2".into(),
            CustomerActionKind::opt_in,
            T0 + 2 * HOUR,
        )
    };
    a.push("customer-actions", "c2", &opt_in);
    unsubscribe(&mut a, "same-id", &email, T0 + 3 * HOUR);
    hand_on(&mut a);
    let mut t = email_only(&a, "u2", T0 + 4 * HOUR);
    t.customer_id = "c2".into();
    t.merged_from = vec!["c1".into()];
    let d = a.push_trigger(&t);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::suppressed, "unsubscribed"),
        "{d:#?}"
    );
}

/// Messages went out to an id later merged away, and their deliveries and opens come
/// after the merge: they count for the survivor's sunset (three ignored messages stop
/// its promo, a repeated delivery report counts once, an open starts it again), as
/// the person's own would. A report applied before the merge and repeated after it is
/// not sent on.
#[test]
fn engagement_with_messages_to_a_merged_id_counts_for_the_survivor() {
    let mut a = Arbiter::with_config("sunset_after_ignored = 3\ndaily_cap = 10\nweekly_cap = 30");
    for i in 0..3 {
        let d = a.push_trigger(&email_only(&a, &format!("w{i}"), T0 + i * DAY));
        assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
    }
    let sends = a.sends.clone();
    // The first delivery is reported before the merge, and again after it.
    a.outcome(&sends[0], OutcomeKind::delivered, T0 + 3 * DAY - HOUR);
    let hand_on = |a: &mut Arbiter| -> Vec<CustomerAction> {
        let actions = std::mem::take(&mut a.actions);
        for action in &actions {
            assert_eq!(action.customer_id, "c2", "{action:?}");
            a.push("customer-actions", "c2", action);
        }
        actions
    };
    a.merged_into("m1", "c2", T0 + 3 * DAY);
    hand_on(&mut a);
    for (i, send) in (0..).zip(&sends) {
        a.outcome(send, OutcomeKind::delivered, T0 + 3 * DAY + i * MINUTE);
    }
    a.outcome(&sends[2], OutcomeKind::delivered, T0 + 3 * DAY + 2 * MINUTE);
    let forwarded = hand_on(&mut a);
    assert_eq!(
        forwarded.len(),
        2,
        "the repeats of a report applied before the merge or sent on already go no further: {forwarded:#?}"
    );
    assert!(forwarded
        .iter()
        .all(|f| f.kind == CustomerActionKind::outcome && f.merged_from.as_deref() == Some("c1")));
    assert_eq!(
        a.stored_ledger("c2").map(|l| l.ignored_in_row),
        Some(3),
        "each message counts once"
    );
    let promo = |a: &mut Arbiter, id: &str, at: i64| {
        let mut t = a.trigger_of(id, "weekly_promo", MessageCategory::promo, at);
        t.customer_id = "c2".into();
        t.merged_from = vec!["c1".into()];
        a.push_trigger(&t)
    };
    let d = promo(&mut a, "p1", T0 + 4 * DAY);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::suppressed, "sunset"),
        "{d:#?}"
    );
    a.outcome(&sends[2], OutcomeKind::opened, T0 + 4 * DAY + HOUR);
    assert_eq!(hand_on(&mut a).len(), 1);
    let d = promo(&mut a, "p2", T0 + 5 * DAY);
    assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
}

/// A provider retries a webhook for days: a delivery reported again after three
/// weeks of the customer's reports at the weekly cap counts once.
#[test]
fn a_delivery_reported_again_weeks_later_counts_once() {
    let mut a = Arbiter::with_config("sunset_after_ignored = 100");
    // Six messages a week (the default cap), each delivered, none opened.
    for i in 0..18 {
        let d = a.push_trigger(&email_only(&a, &format!("w{i}"), T0 + i * 28 * HOUR));
        assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
        let send = a.last_send();
        a.outcome(&send, OutcomeKind::delivered, T0 + i * 28 * HOUR + MINUTE);
    }
    let ignored = |a: &Arbiter| a.stored_ledger("c1").map(|l| l.ignored_in_row);
    assert_eq!(ignored(&a), Some(18));
    let first = a.sends[0].clone();
    a.outcome(&first, OutcomeKind::delivered, T0 + MINUTE);
    assert_eq!(ignored(&a), Some(18), "the first delivery counted once");
}
