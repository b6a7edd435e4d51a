//! Cascades in event time: e-mail, then push if there is no reaction within an hour,
//! then SMS four hours later; an open, a click or a purchase stops the rest. A merge
//! hands a cascade on to the survivor.

mod common;

use common::{merged_into, Arbiter, T0};
use kairos_core::contracts::{
    Channel, Contacts, CustomerAction, CustomerActionKind, DecisionOutcome, MessageCategory,
    OutcomeKind, SendCommand, Trigger,
};
use kairos_core::time::{DAY, HOUR, MINUTE};

fn cascade_trigger(a: &Arbiter, id: &str, at: i64) -> Trigger {
    let mut t = a.trigger_of(id, "cart_cascade", MessageCategory::trigger, at);
    t.channels = vec![Channel::email, Channel::push, Channel::sms];
    t.contacts.phone = Some("+4915112345678".into());
    t.contacts.consented_channels = vec![Channel::email, Channel::push, Channel::sms];
    t.valid_until = at + DAY;
    t
}

/// An arbiter whose order notices fall back from e-mail to SMS after an hour without
/// an open, and has sent notice `o1` by e-mail at `T0`.
fn order_notice_sent_by_email() -> Arbiter {
    let order_status = r#"
[[scenarios]]
name = "order_status"
kind = "order_update"
category = "transactional"
statuses = ["placed"]
channels = ["email", "sms"]
template = "order_status"
cascade = ["1h"]
"#;
    let mut a = Arbiter::from_text(&format!("{}\n{order_status}", common::CONFIG));
    let mut notice = a.trigger_of("o1", "order_status", MessageCategory::transactional, T0);
    notice.channels = vec![Channel::email, Channel::sms];
    notice.contacts.phone = Some("+4915112345678".into());
    notice.contacts.consented_channels = vec![Channel::email, Channel::sms];
    assert_eq!(a.push_trigger(&notice).channel, Some(Channel::email));
    a
}

fn channels(a: &Arbiter) -> Vec<Channel> {
    a.sends.iter().map(|s| s.channel).collect()
}

#[test]
fn without_a_reaction_the_cascade_walks_every_channel() {
    // Three messages in a day: the steps count against the caps.
    let mut a = Arbiter::with_config("daily_cap = 3");
    let t = cascade_trigger(&a, "k1", T0);
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    a.advance_to(T0 + HOUR - 1);
    assert_eq!(channels(&a), [Channel::email]);
    a.advance_to(T0 + HOUR);
    assert_eq!(channels(&a), [Channel::email, Channel::push]);
    a.advance_to(T0 + 5 * HOUR - 1);
    assert_eq!(channels(&a), [Channel::email, Channel::push]);
    a.advance_to(T0 + 5 * HOUR);
    assert_eq!(channels(&a), [Channel::email, Channel::push, Channel::sms]);
    let steps: Vec<_> = a
        .decisions_of("k1")
        .into_iter()
        .filter(|d| d.rule == "cascade")
        .collect();
    assert_eq!(steps.len(), 2, "{steps:#?}");
    assert!(steps.iter().all(|d| d.outcome == DecisionOutcome::sent));
    assert!(
        steps[0]
            .reason
            .contains("no reaction to the message on email"),
        "{}",
        steps[0].reason
    );
    // Three channels, three distinct send ids; nothing more afterwards.
    let ids: std::collections::BTreeSet<_> = a.sends.iter().map(|s| &s.send_id).collect();
    assert_eq!(ids.len(), 3);
    a.advance_to(T0 + 2 * DAY);
    assert_eq!(a.sends.len(), 3);
}

#[test]
fn an_open_stops_the_cascade() {
    let mut a = Arbiter::new();
    let t = cascade_trigger(&a, "k2", T0);
    a.push_trigger(&t);
    let email = a.last_send();
    a.outcome(&email, OutcomeKind::opened, T0 + 30 * MINUTE);
    let stop = *a.decisions_of("k2").last().expect("a stop decision");
    assert_eq!(
        (stop.outcome, stop.rule.as_str()),
        (DecisionOutcome::cancelled, "cascade")
    );
    assert!(stop.reason.contains("opened"), "{}", stop.reason);
    a.advance_to(T0 + 6 * HOUR);
    assert_eq!(channels(&a), [Channel::email], "no push, no SMS");
}

#[test]
fn a_purchase_stops_the_cascade_after_the_push() {
    let mut a = Arbiter::new();
    let t = cascade_trigger(&a, "k3", T0);
    a.push_trigger(&t);
    a.advance_to(T0 + HOUR);
    assert_eq!(channels(&a), [Channel::email, Channel::push]);
    a.purchase("buy", T0 + 2 * HOUR);
    a.advance_to(T0 + 6 * HOUR);
    assert_eq!(channels(&a), [Channel::email, Channel::push], "no SMS");
}

/// An order's status falls back from e-mail to SMS: the purchase that placed the
/// order (read after the notice) ends the marketing cascade, not the notice's.
#[test]
fn a_purchase_stops_a_marketing_cascade_but_not_a_transactional_one() {
    let mut a = order_notice_sent_by_email();
    let cart = cascade_trigger(&a, "k9", T0 + MINUTE);
    assert_eq!(a.push_trigger(&cart).outcome, DecisionOutcome::sent);
    a.purchase("buy", T0 + 2 * MINUTE);
    a.advance_to(T0 + 6 * HOUR);
    let sent: Vec<(&str, Channel)> = a
        .sends
        .iter()
        .map(|s| (s.scenario.as_str(), s.channel))
        .collect();
    assert_eq!(
        sent,
        [
            ("order_status", Channel::email),
            ("cart_cascade", Channel::email),
            ("order_status", Channel::sms),
        ]
    );
}

/// Delivers what the arbiter sent on to survivors (merged ledgers, handed-over queue
/// entries and cascades, forwarded outcomes), `times` over (an outbox sent again
/// after a crash); returns them.
fn deliver_to_survivors(a: &mut Arbiter, times: usize) -> Vec<CustomerAction> {
    let records = std::mem::take(&mut a.actions);
    for _ in 0..times {
        for r in &records {
            a.push("customer-actions", &r.customer_id.clone(), r);
        }
    }
    records
}

/// A guest's order notice went out by e-mail; the guest registers (merged into the
/// customer) before the hour without an open is over: the SMS fallback still goes,
/// once, to the survivor, when it was due.
#[test]
fn a_merge_hands_a_cascade_on_to_the_survivor_whose_next_step_goes_when_due() {
    let mut a = order_notice_sent_by_email();
    a.push(
        "customer-actions",
        "c1",
        &merged_into("c1", "z", T0 + 10 * MINUTE),
    );
    let records = deliver_to_survivors(&mut a, 2);
    // The cascade's carrier once more under another id (sent on along a chain of
    // merges after a crash): the survivor knows the cascade.
    let mut again = records
        .iter()
        .find(|r| {
            r.state
                .as_deref()
                .is_some_and(|s| s.contains("handed_over"))
        })
        .cloned()
        .expect("the cascade's carrier");
    again.action_id = "forwarded-again".into();
    a.push("customer-actions", "z", &again);
    a.advance_to(T0 + HOUR - 1);
    assert_eq!(channels(&a), [Channel::email], "not before it is due");
    a.advance_to(T0 + 6 * HOUR);
    let sent: Vec<(&str, Channel, &str)> = a
        .sends
        .iter()
        .map(|s| (s.trigger_id.as_str(), s.channel, s.customer_id.as_str()))
        .collect();
    assert_eq!(
        sent,
        [("o1", Channel::email, "c1"), ("o1", Channel::sms, "z")]
    );
    assert_eq!(a.sends[1].created_at, T0 + HOUR);
    let steps: Vec<(DecisionOutcome, &str, &str)> = a
        .decisions_of("o1")
        .iter()
        .map(|d| (d.outcome, d.rule.as_str(), d.customer_id.as_str()))
        .collect();
    assert_eq!(
        steps,
        [
            (DecisionOutcome::sent, "channel_choice", "c1"),
            (DecisionOutcome::deferred, "merged", "c1"),
            (DecisionOutcome::deferred, "merged", "z"),
            (DecisionOutcome::sent, "cascade", "z"),
        ]
    );
}

/// The e-mail was put off by its server before the merge: the survivor, who hears
/// nothing of when it leaves, sends the SMS fallback when it was due.
#[test]
fn a_cascade_handed_over_while_its_message_was_put_off_goes_on_when_due() {
    let mut a = order_notice_sent_by_email();
    let email = a.last_send();
    a.outcome(&email, OutcomeKind::deferred, T0 + MINUTE);
    a.push(
        "customer-actions",
        "c1",
        &merged_into("c1", "z", T0 + 10 * MINUTE),
    );
    deliver_to_survivors(&mut a, 2);
    a.advance_to(T0 + 6 * HOUR);
    let sent: Vec<(Channel, &str, i64)> = (a.sends.iter())
        .map(|s| (s.channel, s.customer_id.as_str(), s.created_at))
        .collect();
    assert_eq!(
        sent,
        [(Channel::email, "c1", T0), (Channel::sms, "z", T0 + HOUR)]
    );
}

/// An open of the first message, reported for the merged customer after the merge,
/// reaches the survivor and stops the cascade it took over.
#[test]
fn an_open_after_a_merge_stops_the_cascade_the_survivor_took_over() {
    let mut a = Arbiter::new();
    let t = cascade_trigger(&a, "k20", T0);
    a.push_trigger(&t);
    let email = a.last_send();
    a.push(
        "customer-actions",
        "c1",
        &merged_into("c1", "z", T0 + 10 * MINUTE),
    );
    deliver_to_survivors(&mut a, 1);
    a.outcome(&email, OutcomeKind::opened, T0 + 30 * MINUTE);
    deliver_to_survivors(&mut a, 1);
    a.advance_to(T0 + 6 * HOUR);
    assert_eq!(channels(&a), [Channel::email], "no push, no SMS");
    let stop = *a.decisions_of("k20").last().expect("a stop decision");
    assert_eq!(
        (stop.outcome, stop.rule.as_str(), stop.customer_id.as_str()),
        (DecisionOutcome::cancelled, "cascade", "z")
    );
    assert!(stop.reason.contains("opened"), "{}", stop.reason);
}

/// The merged customer's profile told of a new address after the cascade began (an
/// address released, a new one given): the survivor's step goes to it, not to the one
/// the trigger carried.
#[test]
fn a_handed_over_cascade_goes_to_the_address_the_merged_customer_changed_to() {
    let mut a = Arbiter::new();
    let t = cascade_trigger(&a, "k21", T0);
    a.push_trigger(&t);
    let changed = Contacts {
        push_token: Some("token-new".into()),
        phone: t.contacts.phone.clone(),
        consented_channels: t.contacts.consented_channels.clone(),
        ..Contacts::default()
    };
    a.contacts_changed("cc1", changed, T0 + 5 * MINUTE);
    a.push(
        "customer-actions",
        "c1",
        &merged_into("c1", "z", T0 + 10 * MINUTE),
    );
    deliver_to_survivors(&mut a, 1);
    a.advance_to(T0 + HOUR);
    let push = a.last_send();
    assert_eq!(
        (
            push.channel,
            push.customer_id.as_str(),
            push.address.as_deref()
        ),
        (Channel::push, "z", Some("token-new"))
    );
}

/// The survivor read the customer's exit from the segment before the merged
/// customer's cascade reached it (its carrier comes behind the survivor's own
/// actions): the cascade stops at its next step, as it would have there.
#[test]
fn a_segment_exit_the_survivor_read_before_the_handed_over_cascade_stops_it() {
    let mut a = Arbiter::with_scenarios(common::WIN_BACK);
    let t = a.trigger_of("wb3", "win_back", MessageCategory::trigger, T0);
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    a.push(
        "customer-actions",
        "c1",
        &merged_into("c1", "z", T0 + 10 * MINUTE),
    );
    let left = CustomerAction {
        segment: Some("At Risk".into()),
        ..CustomerAction::new(
            "left-z".into(),
            "z".into(),
            CustomerActionKind::left_segment,
            T0 + 20 * MINUTE,
        )
    };
    a.push("customer-actions", "z", &left);
    deliver_to_survivors(&mut a, 1);
    a.advance_to(T0 + 2 * HOUR);
    assert_eq!(channels(&a), [Channel::email], "no push");
    let stop = *a.decisions_of("wb3").last().expect("a stop decision");
    assert_eq!(
        (stop.outcome, stop.rule.as_str(), stop.customer_id.as_str()),
        (DecisionOutcome::cancelled, "left_segment", "z")
    );
}

#[test]
fn the_cascade_skips_channels_without_consent_and_keeps_quiet_hours() {
    let mut a = Arbiter::with_config("quiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"");
    a.time_zone = Some("UTC".into());
    // 20:30 UTC: the e-mail goes out; push has no consent; SMS is due at 21:30, in the
    // quiet hours, so it waits for 09:00.
    let mut t = cascade_trigger(&a, "k4", T0 + 11 * HOUR + 30 * MINUTE);
    t.contacts.consented_channels = vec![Channel::email, Channel::sms];
    a.push_trigger(&t);
    // The check for a reaction waits for the morning at once (a reaction at night
    // still stops the cascade), not for 21:30 and then again.
    assert_eq!(a.timer_due("c1", "cascade/k4"), Some(T0 + DAY));
    a.advance_to(T0 + 23 * HOUR);
    assert_eq!(channels(&a), [Channel::email]);
    a.advance_to(T0 + DAY);
    assert_eq!(channels(&a), [Channel::email, Channel::sms]);
    assert_eq!(a.last_send().created_at, T0 + DAY);
}

#[test]
fn a_complaint_about_another_message_stops_a_promo_cascade_in_flight() {
    let mut a = Arbiter::with_scenarios(
        r#"
[[scenarios]]
name = "promo_cascade"
kind = "welcome"
category = "promo"
channels = ["email", "push", "sms"]
template = "promo"
exit_on_purchase = false
cascade = ["1h"]
"#,
    );
    let mut t = a.trigger_of("w1", "welcome", MessageCategory::trigger, T0);
    t.channels = vec![Channel::email];
    a.push_trigger(&t);
    let welcome = a.last_send();
    let mut t = cascade_trigger(&a, "k5", T0 + 2 * HOUR);
    t.scenario = "promo_cascade".into();
    t.category = MessageCategory::promo;
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    // The spam complaint is about the welcome message, not the promo's e-mail.
    a.outcome(
        &welcome,
        OutcomeKind::complained,
        T0 + 2 * HOUR + 30 * MINUTE,
    );
    a.advance_to(T0 + 3 * HOUR);
    let stop = *a.decisions_of("k5").last().expect("a stop decision");
    assert_eq!(
        (stop.outcome, stop.rule.as_str(), stop.channel),
        (DecisionOutcome::suppressed, "complaint", None),
        "{stop:#?}"
    );
    assert_eq!(channels(&a), [Channel::email, Channel::email], "no push");
    a.advance_to(T0 + 2 * DAY);
    assert_eq!(a.sends.len(), 2);
    assert_eq!(a.decisions_of("k5").len(), 2);
}

#[test]
fn a_till_sale_older_than_the_cascade_cause_does_not_stop_it() {
    let mut a = Arbiter::new();
    let mut t = cascade_trigger(&a, "k9", T0);
    t.cause_occurred_at = T0 - 10 * MINUTE;
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    // A receipt of a sale before the cart change, uploaded after the e-mail.
    a.till_sale("till-late", T0 - 30 * MINUTE);
    a.advance_to(T0 + HOUR);
    assert_eq!(channels(&a), [Channel::email, Channel::push]);
    // An online purchase stops the rest, even stamped before the cause by a device
    // clock running late: the cart is what was bought.
    a.purchase("online", T0 - 20 * MINUTE);
    a.advance_to(T0 + 2 * DAY);
    assert_eq!(channels(&a), [Channel::email, Channel::push]);
}

/// A purchase does not stop the cascade of a message it caused itself (a thank-you
/// after the order, read from the triggers topic before the purchase from the actions
/// topic); a later purchase does.
#[test]
fn a_purchase_does_not_stop_the_cascade_of_the_message_it_caused() {
    let thanks = r#"
[[scenarios]]
name = "thanks"
kind = "post_purchase"
channels = ["email", "push"]
template = "thanks"
delay = "1m"
cascade = ["1h"]
"#;
    for (bought, expected) in [
        (T0 - MINUTE, vec![Channel::email, Channel::push]),
        (T0 + 10 * MINUTE, vec![Channel::email]),
    ] {
        let mut a = Arbiter::with_scenarios(thanks);
        let mut t = a.trigger_of("th1", "thanks", MessageCategory::trigger, T0);
        t.cause_occurred_at = T0 - MINUTE;
        assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
        a.purchase("the-order", bought);
        a.advance_to(T0 + 2 * HOUR);
        assert_eq!(channels(&a), expected, "bought at {bought}");
    }
}

/// A purchase after a cascade's cause ends the rest of it whichever topic was read
/// first: read before the trigger (the triggers topic lagging), it stops the cascade
/// at its next step, with the decision a purchase read later gives.
#[test]
fn a_purchase_read_before_the_cascade_began_still_ends_it() {
    let win_back = common::WIN_BACK;
    let bought = T0 - 5 * MINUTE;
    let mut stops = Vec::new();
    for purchase_first in [true, false] {
        let mut a = Arbiter::with_scenarios(win_back);
        let mut t = a.trigger_of("wb1", "win_back", MessageCategory::trigger, T0);
        t.cause_occurred_at = T0 - 10 * MINUTE;
        if purchase_first {
            a.purchase("first", bought);
        }
        assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
        if !purchase_first {
            a.purchase("first", bought);
        }
        a.advance_to(T0 + 2 * HOUR);
        assert_eq!(
            channels(&a),
            [Channel::email],
            "purchase first: {purchase_first}"
        );
        let stop = a
            .decisions_of("wb1")
            .into_iter()
            .find(|d| d.outcome == DecisionOutcome::cancelled)
            .cloned()
            .expect("the cascade's stop is on record");
        stops.push((stop.decision_id, stop.rule, stop.reason));
    }
    assert_eq!(stops[0], stops[1], "the same decision either way");
}

/// An online purchase dated by the device a few minutes before a cascade's cause
/// ends it read either side of the trigger, with the same decision; a till sale at
/// that time (the till's clock) leaves it running either way.
#[test]
fn a_purchase_read_first_stops_a_cascade_within_the_device_clock_s_allowance() {
    for till in [false, true] {
        let mut stops = Vec::new();
        for purchase_first in [true, false] {
            let mut a = Arbiter::with_scenarios(common::WIN_BACK);
            let t = a.trigger_of("wb2", "win_back", MessageCategory::trigger, T0);
            let buy = |a: &mut Arbiter| match till {
                true => a.till_sale("early", T0 - 5 * MINUTE),
                false => a.purchase("early", T0 - 5 * MINUTE),
            };
            if purchase_first {
                buy(&mut a);
            }
            assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
            if !purchase_first {
                buy(&mut a);
            }
            a.advance_to(T0 + 2 * HOUR);
            let case = format!("till sale {till}, purchase first {purchase_first}");
            let expected = match till {
                true => vec![Channel::email, Channel::push],
                false => vec![Channel::email],
            };
            assert_eq!(channels(&a), expected, "{case}");
            let stop = a
                .decisions_of("wb2")
                .into_iter()
                .find(|d| d.outcome == DecisionOutcome::cancelled)
                .map(|d| (d.decision_id.clone(), d.rule.clone(), d.reason.clone()));
            assert_eq!(stop.is_some(), !till, "{case}: {stop:?}");
            stops.push(stop);
        }
        assert_eq!(
            stops[0], stops[1],
            "till sale {till}: the same decision either way"
        );
    }
}

/// A reactivation counted from the customer's last purchase is not ended by that
/// purchase: its cascade walks on.
#[test]
fn a_reactivation_cascade_counted_from_the_last_purchase_walks_on() {
    let mut a = Arbiter::with_scenarios(
        r#"
[[scenarios]]
name = "miss_you"
kind = "reactivation"
channels = ["email", "push"]
template = "miss_you"
delay = "30d"
cascade = ["1h"]
"#,
    );
    a.purchase("last", T0);
    let fired = T0 + 30 * DAY;
    let mut t = a.trigger_of("mu1", "miss_you", MessageCategory::trigger, fired);
    t.cause_occurred_at = T0;
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    a.advance_to(fired + 2 * HOUR);
    assert_eq!(channels(&a), [Channel::email, Channel::push]);
}

/// Another scenario's message on the same channel in the same millisecond is not
/// taken for the cascade's own: the next step still keeps the conflict window
/// against it.
#[test]
fn a_message_sent_with_the_cascade_s_own_in_the_same_millisecond_still_counts() {
    let mut a = Arbiter::with_config("daily_cap = 3\nmin_gap = \"0s\"\nconflict_window = \"2h\"");
    let t = cascade_trigger(&a, "k12", T0);
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    let d = a.trigger("w1", "welcome", MessageCategory::trigger, T0);
    assert_eq!(
        (d.outcome, d.channel),
        (DecisionOutcome::sent, Some(Channel::email)),
        "{d:#?}"
    );
    // The push step is due at one hour and waits until the welcome e-mail leaves the
    // two-hour window.
    a.advance_to(T0 + 2 * HOUR - 1);
    assert_eq!(channels(&a), [Channel::email, Channel::email]);
    a.advance_to(T0 + 2 * HOUR);
    assert_eq!(
        channels(&a),
        [Channel::email, Channel::email, Channel::push]
    );
}

/// An online purchase read late (its topic lagging) does not answer a cascade caused
/// well after it: the news is newer than the purchase.
#[test]
fn an_online_purchase_older_than_the_cascade_cause_does_not_stop_it() {
    let mut a = Arbiter::new();
    let t = cascade_trigger(&a, "k10", T0);
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    a.purchase("online-late", T0 - 2 * HOUR);
    a.advance_to(T0 + HOUR);
    assert_eq!(channels(&a), [Channel::email, Channel::push]);
    assert!(a
        .decisions_of("k10")
        .iter()
        .all(|d| d.outcome != DecisionOutcome::cancelled));
}

/// A cascade's step keeps the minimum gap and the conflict window against another
/// scenario's message (not against its own e-mail): it waits for both.
#[test]
fn a_cascade_step_waits_for_the_gap_and_the_window_after_another_message() {
    let mut a = Arbiter::with_config("daily_cap = 3\nmin_gap = \"30m\"");
    let t = cascade_trigger(&a, "k11", T0);
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    // Another scenario's message 55 minutes on: past the gap, it stays on e-mail.
    let welcome = T0 + 55 * MINUTE;
    let d = a.trigger("w1", "welcome", MessageCategory::trigger, welcome);
    assert_eq!(
        (d.outcome, d.channel),
        (DecisionOutcome::sent, Some(Channel::email)),
        "{d:?}"
    );
    // The push step is due at one hour; another channel 5 minutes after the welcome
    // e-mail would break the gap and the window. It goes once the e-mail leaves the
    // window.
    a.advance_to(welcome + HOUR - 1);
    assert_eq!(channels(&a), [Channel::email, Channel::email]);
    a.advance_to(welcome + HOUR);
    assert_eq!(
        channels(&a),
        [Channel::email, Channel::email, Channel::push]
    );
    let step = a.sends.last().expect("the push step");
    assert_eq!(
        (step.trigger_id.as_str(), step.created_at),
        ("k11", welcome + HOUR)
    );
    // The wait is recorded, with its rule, for `explain`.
    let waits: Vec<_> = a
        .decisions_of("k11")
        .into_iter()
        .filter(|d| d.outcome == DecisionOutcome::deferred)
        .collect();
    assert_eq!(waits.len(), 1, "{waits:#?}");
    assert_eq!(
        (
            waits[0].rule.as_str(),
            waits[0].channel,
            waits[0].decided_at
        ),
        ("cascade_spacing", Some(Channel::push), T0 + HOUR),
        "{waits:#?}"
    );
}

/// The gap alone holds a step too (the window being short), and another trigger of
/// the cascade's own scenario is another message.
#[test]
fn a_cascade_step_waits_for_the_gap_after_a_message_of_the_same_scenario() {
    let mut a = Arbiter::with_config("daily_cap = 4\nmin_gap = \"30m\"\nconflict_window = \"1m\"");
    let t = cascade_trigger(&a, "k12", T0);
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    // A second cart reminder 50 minutes on, past the gap.
    let second = T0 + 50 * MINUTE;
    let mut other = cascade_trigger(&a, "k13", second);
    other.channels = vec![Channel::email];
    assert_eq!(a.push_trigger(&other).channel, Some(Channel::email));
    // The first one's push step, due at one hour, waits for the gap after it.
    a.advance_to(second + 30 * MINUTE - 1);
    assert_eq!(channels(&a), [Channel::email, Channel::email]);
    a.advance_to(second + 30 * MINUTE);
    let step = a.sends.last().expect("the push step");
    assert_eq!(
        (step.trigger_id.as_str(), step.channel, step.created_at),
        ("k12", Channel::push, second + 30 * MINUTE)
    );
}

#[test]
fn a_promo_cascade_left_running_by_a_late_till_sale_keeps_the_pause_after_it() {
    let mut a = Arbiter::with_scenarios(
        r#"
[[scenarios]]
name = "promo_cascade"
kind = "welcome"
category = "promo"
channels = ["email", "push", "sms"]
template = "promo"
exit_on_purchase = false
cascade = ["1h"]
"#,
    );
    let mut t = cascade_trigger(&a, "k10", T0);
    t.scenario = "promo_cascade".into();
    t.category = MessageCategory::promo;
    t.cause_occurred_at = T0 - 10 * MINUTE;
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    // A receipt dated before the cause, uploaded after the e-mail: the cascade runs
    // on, but its push would be a promo within two days of a purchase.
    a.till_sale("till-late", T0 - 30 * MINUTE);
    a.advance_to(T0 + 2 * DAY);
    assert_eq!(channels(&a), [Channel::email], "no push, no SMS");
    let stop = *a.decisions_of("k10").last().expect("a stop decision");
    assert_eq!(
        (stop.outcome, stop.rule.as_str(), stop.channel),
        (DecisionOutcome::suppressed, "pause_after_purchase", None),
        "{stop:#?}"
    );
    assert!(
        stop.reason.contains("after 1 message(s)"),
        "{}",
        stop.reason
    );
}

/// A marketing SMS of another scenario at `at`.
fn sms_message(a: &mut Arbiter, id: &str, at: i64) {
    let mut t = cascade_trigger(a, id, at);
    t.scenario = "welcome".into();
    t.channels = vec![Channel::sms];
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::sms));
}

#[test]
fn a_cascade_step_that_would_break_the_daily_cap_ends_the_cascade() {
    let mut a = Arbiter::with_config("daily_cap = 2\nchannel_caps = { sms = { daily_cap = 1 } }");
    a.time_zone = Some("UTC".into());
    sms_message(&mut a, "s1", T0);
    let t = cascade_trigger(&a, "k6", T0 + HOUR + 5 * MINUTE);
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    a.advance_to(T0 + 2 * DAY);
    assert_eq!(channels(&a), [Channel::sms, Channel::email], "two a day");
    let stop = *a.decisions_of("k6").last().expect("a stop decision");
    assert_eq!(
        (stop.outcome, stop.rule.as_str(), stop.decided_at),
        (
            DecisionOutcome::suppressed,
            "frequency_cap_daily",
            T0 + 2 * HOUR + 5 * MINUTE
        ),
        "{stop:#?}"
    );
    assert!(
        stop.reason.starts_with("cascade stopped"),
        "{}",
        stop.reason
    );
    assert_eq!(a.decisions_of("k6").len(), 2);
}

#[test]
fn a_cascade_step_at_its_channel_cap_ends_the_cascade_and_the_gap_does_not_hold_it() {
    let mut a = Arbiter::with_config(
        "daily_cap = 5\nmin_gap = \"2h\"\nchannel_caps = { sms = { daily_cap = 1 } }",
    );
    a.time_zone = Some("UTC".into());
    sms_message(&mut a, "s1", T0);
    let t = cascade_trigger(&a, "k7", T0 + 2 * HOUR + 5 * MINUTE);
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    // The push an hour later is closer than the minimum gap: the cascade's own wait
    // is its gap.
    a.advance_to(T0 + 3 * HOUR + 5 * MINUTE);
    assert_eq!(channels(&a), [Channel::sms, Channel::email, Channel::push]);
    a.advance_to(T0 + 2 * DAY);
    assert_eq!(
        channels(&a),
        [Channel::sms, Channel::email, Channel::push],
        "one SMS a day"
    );
    let stop = *a.decisions_of("k7").last().expect("a stop decision");
    assert_eq!(
        (stop.outcome, stop.rule.as_str()),
        (DecisionOutcome::suppressed, "channel_cap"),
        "{stop:#?}"
    );
}

#[test]
fn a_cascade_step_passes_over_a_channel_at_its_cap_to_the_next() {
    let mut a = Arbiter::with_config("daily_cap = 5\nchannel_caps = { push = { daily_cap = 1 } }");
    a.time_zone = Some("UTC".into());
    let mut push = cascade_trigger(&a, "p1", T0);
    push.scenario = "welcome".into();
    push.channels = vec![Channel::push];
    assert_eq!(a.push_trigger(&push).channel, Some(Channel::push));
    let t = cascade_trigger(&a, "k8", T0 + 2 * HOUR);
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    // Push had its one message today: the step goes on to SMS instead of ending.
    a.advance_to(T0 + 3 * HOUR);
    assert_eq!(channels(&a), [Channel::push, Channel::email, Channel::sms]);
}

#[test]
fn a_cascade_step_counts_only_the_last_seven_days_against_its_channel_cap() {
    let mut a = Arbiter::with_config("channel_caps = { push = { weekly_cap = 1 } }");
    a.time_zone = Some("UTC".into());
    let mut push = cascade_trigger(&a, "p1", T0);
    push.scenario = "welcome".into();
    push.channels = vec![Channel::push];
    assert_eq!(a.push_trigger(&push).channel, Some(Channel::push));
    let start = T0 + 7 * DAY - 30 * MINUTE;
    let t = cascade_trigger(&a, "k9", start);
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    // An hour later the push of T0 is more than 7 days old: the step takes push.
    a.advance_to(start + HOUR);
    assert_eq!(channels(&a), [Channel::push, Channel::email, Channel::push]);
}

#[test]
fn a_cascade_step_keeps_the_quiet_hours_of_the_customer_s_newest_zone() {
    let mut a = Arbiter::with_config(
        "daily_cap = 4\nquiet_hours_start = \"21:00\"\nquiet_hours_end = \"09:00\"",
    );
    // 11:00 in Tokyo: the e-mail goes out.
    a.time_zone = Some("Asia/Tokyo".into());
    let start = common::at("2026-01-05T02:00:00Z");
    let t = cascade_trigger(&a, "k1", start);
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    // The customer moved to London, where it is the middle of the night.
    a.time_zone = Some("Europe/London".into());
    let w = a.trigger(
        "w1",
        "welcome",
        MessageCategory::trigger,
        start + 30 * MINUTE,
    );
    assert_eq!(w.rule, "quiet_hours");
    // The push step is due at 03:00 UTC, noon in Tokyo but 03:00 in London: it waits
    // for 09:00 there.
    let cascade = |a: &Arbiter| {
        a.sends
            .iter()
            .filter(|s| s.trigger_id == "k1")
            .map(|s| (s.channel, s.created_at))
            .collect::<Vec<_>>()
    };
    a.advance_to(start + HOUR);
    assert_eq!(cascade(&a), [(Channel::email, start)]);
    let morning = common::at("2026-01-05T09:00:00Z");
    a.advance_to(morning);
    assert_eq!(
        cascade(&a),
        [(Channel::email, start), (Channel::push, morning)]
    );
    let waits: Vec<_> = a
        .decisions_of("k1")
        .into_iter()
        .filter(|d| d.outcome == DecisionOutcome::deferred)
        .map(|d| (d.rule.as_str(), d.decided_at))
        .collect();
    assert_eq!(waits, [("quiet_hours", start + HOUR)]);
}

#[test]
fn after_a_cascade_step_on_another_channel_the_next_message_waits_for_the_window() {
    let mut a = Arbiter::with_config("daily_cap = 4\nconflict_window = \"2h\"");
    let t = cascade_trigger(&a, "k1", T0);
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    a.advance_to(T0 + HOUR);
    assert_eq!(
        channels(&a),
        [Channel::email, Channel::push],
        "the push step"
    );
    // E-mail and push within two hours, the step aside: a new message on either
    // would make two channels in the window without a cascade. It waits until the
    // e-mail leaves the window, then stays on push.
    let d = a.trigger(
        "d1",
        "welcome",
        MessageCategory::trigger,
        T0 + HOUR + 10 * MINUTE,
    );
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::deferred, "channel_conflict"),
        "{d:?}"
    );
    a.advance_to(T0 + 2 * HOUR - 1);
    assert_eq!(a.decisions_of("d1").len(), 1);
    a.advance_to(T0 + 2 * HOUR);
    let last = *a.decisions_of("d1").last().expect("decided again");
    assert_eq!(
        (last.outcome, last.channel),
        (DecisionOutcome::sent, Some(Channel::push)),
        "{last:?}"
    );
}

/// A cascade whose scenario is switched off between its steps stops there: the next
/// channel is not tried.
#[test]
fn a_cascade_switched_off_between_steps_stops() {
    let mut a = Arbiter::with_config("daily_cap = 3");
    let t = cascade_trigger(&a, "k9", T0);
    assert_eq!(a.push_trigger(&t).channel, Some(Channel::email));
    let cascade = "name = \"cart_cascade\"\nkind = \"abandoned_cart\"\n";
    let off = common::CONFIG
        .replace("[arbiter]\n", "[arbiter]\ndaily_cap = 3\n")
        .replacen(cascade, &format!("{cascade}enabled = false\n"), 1);
    a.restart_with(&off);
    a.advance_to(T0 + DAY);
    assert_eq!(channels(&a), [Channel::email]);
    let stop = a
        .decisions_of("k9")
        .last()
        .copied()
        .cloned()
        .expect("decided");
    assert_eq!(
        (stop.outcome, stop.rule.as_str()),
        (DecisionOutcome::cancelled, "scenario_off"),
        "{stop:#?}"
    );
    assert!(
        stop.reason.starts_with(
            "cascade stopped after 1 message(s): scenario cart_cascade is switched off"
        ),
        "{}",
        stop.reason
    );
}

/// An arbiter allowing three messages a day that has sent cascade `id`'s e-mail at
/// `T0`, and that e-mail.
fn emailed_cascade(id: &str) -> (Arbiter, SendCommand) {
    let mut a = Arbiter::with_config("daily_cap = 3");
    let t = cascade_trigger(&a, id, T0);
    a.push_trigger(&t);
    let email = a.last_send();
    (a, email)
}

/// Asserts that the cascade's next message, on `next`, goes out at `at`, not before.
fn next_step_goes_at(a: &mut Arbiter, at: i64, next: Channel) {
    let before = channels(a);
    a.advance_to(at - 1);
    assert_eq!(channels(a), before, "not before {at}");
    a.advance_to(at);
    let mut expected = before;
    expected.push(next);
    assert_eq!(channels(a), expected);
}

/// A greylisting server puts the e-mail off for over an hour: the push waits for the
/// e-mail to reach the customer, then gives them the cascade's hour to open it.
#[test]
fn a_cascade_step_waits_for_a_message_the_recipient_s_server_put_off() {
    let (mut a, email) = emailed_cascade("k-grey");
    a.outcome(&email, OutcomeKind::deferred, T0 + MINUTE);
    a.advance_to(T0 + HOUR);
    assert_eq!(channels(&a), [Channel::email], "the e-mail has not left");
    let wait = *a.decisions_of("k-grey").last().expect("the step's wait");
    assert_eq!(
        (wait.outcome, wait.rule.as_str(), wait.channel),
        (DecisionOutcome::deferred, "cascade", None)
    );
    assert!(
        wait.reason.contains("put the message on email off")
            && wait
                .reason
                .ends_with(&format!("decided again at {}", T0 + 2 * HOUR)),
        "{}",
        wait.reason
    );
    // Sent at last 75 minutes on (5 + 10 + 20 + 40): an hour from then to open it.
    let left_at = T0 + 75 * MINUTE;
    a.outcome(&email, OutcomeKind::sent, left_at);
    next_step_goes_at(&mut a, left_at + HOUR, Channel::push);
    // A message that went out as sent is not held: the SMS comes 4 hours on.
    let push = a.last_send();
    a.outcome(&push, OutcomeKind::sent, left_at + HOUR);
    a.advance_to(left_at + 5 * HOUR);
    assert_eq!(channels(&a), [Channel::email, Channel::push, Channel::sms]);
}

/// A cascade's message that failed (its server put it off to its end, or it could not
/// be sent) got no reaction and never will: the next channel is tried at once. A
/// failure of an earlier message of the cascade moves nothing.
#[test]
fn a_failed_cascade_message_passes_to_the_next_channel_at_once() {
    let (mut a, email) = emailed_cascade("k-fail");
    a.outcome(&email, OutcomeKind::deferred, T0 + MINUTE);
    a.outcome(&email, OutcomeKind::failed, T0 + 20 * MINUTE);
    a.advance_to(T0 + 20 * MINUTE);
    assert_eq!(channels(&a), [Channel::email, Channel::push]);
    let step = *a.decisions_of("k-fail").last().expect("the push");
    assert_eq!(
        (step.outcome, step.channel),
        (DecisionOutcome::sent, Some(Channel::push))
    );
    assert_eq!(
        step.reason,
        "cascade: the message on email failed or bounced"
    );
    // The e-mail's late bounce is not the push's: the SMS waits its 4 hours.
    a.outcome(&email, OutcomeKind::bounced_hard, T0 + 30 * MINUTE);
    next_step_goes_at(&mut a, T0 + 20 * MINUTE + 4 * HOUR, Channel::sms);
}

/// Outcomes come in any order: a deferral of the latest message read after it was
/// delivered holds nothing; a soft bounce, which may still be delivered, moves nothing.
#[test]
fn a_deferral_read_after_delivery_holds_nothing_and_a_soft_bounce_moves_nothing() {
    let (mut a, email) = emailed_cascade("k-late");
    a.outcome(&email, OutcomeKind::delivered, T0 + MINUTE);
    a.outcome(&email, OutcomeKind::deferred, T0 + 2 * MINUTE);
    a.advance_to(T0 + HOUR);
    assert_eq!(channels(&a), [Channel::email, Channel::push]);
    let push = a.last_send();
    a.outcome(&push, OutcomeKind::bounced_soft, T0 + HOUR + MINUTE);
    next_step_goes_at(&mut a, T0 + 5 * HOUR, Channel::sms);
}

/// Each step's message is followed anew: the e-mail delivered, the push put off holds
/// the SMS until the push has left, four hours from then.
#[test]
fn a_later_step_put_off_holds_the_step_after_it() {
    let (mut a, email) = emailed_cascade("k-second");
    a.outcome(&email, OutcomeKind::delivered, T0 + MINUTE);
    a.advance_to(T0 + HOUR);
    let push = a.last_send();
    assert_eq!(push.channel, Channel::push);
    a.outcome(&push, OutcomeKind::deferred, T0 + HOUR + MINUTE);
    a.advance_to(T0 + 5 * HOUR);
    assert_eq!(channels(&a), [Channel::email, Channel::push], "held");
    let left_at = T0 + 5 * HOUR + 30 * MINUTE;
    a.outcome(&push, OutcomeKind::sent, left_at);
    next_step_goes_at(&mut a, left_at + 4 * HOUR, Channel::sms);
}
