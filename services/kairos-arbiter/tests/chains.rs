//! Chains in event time: the steps of one chain instance (scenario and cause) go out
//! in order and spaced, even when they were held back together, and none goes out
//! once an earlier step ended without a send; a mass send leaves out a customer
//! whom a personal chain holds.

mod common;

use common::{Arbiter, T0};
use kairos_core::contracts::{DecisionOutcome, MessageCategory, Trigger};
use kairos_core::time::{DAY, HOUR, MINUTE};

const CHAINS: &str = r#"
[[scenarios]]
name = "vip"
kind = "segment_entered"
segment = "Champions"
channels = ["email"]
template = "vip"
priority = 90
steps = [{ delay = "3d", template = "vip_2" }]

[[scenarios]]
name = "tips"
kind = "post_purchase"
channels = ["email"]
template = "tips"
priority = 50
steps = [{ delay = "1d", template = "tips_2" }, { delay = "1d", template = "tips_3" }]

[[scenarios]]
name = "flash_sale"
kind = "segment_entered"
segment = "Loyal"
category = "promo"
channels = ["email"]
template = "flash_sale"
priority = 100
mass = true
"#;

fn arbiter() -> Arbiter {
    Arbiter::from_text(
        &format!("{}\n{CHAINS}", common::CONFIG)
            .replace("[arbiter]\n", "[arbiter]\ndaily_cap = 5\nweekly_cap = 20\n"),
    )
}

/// Step `step` of the tips chain caused by order-1, fired at `at`, valid `valid` long.
fn tips(a: &Arbiter, step: i32, at: i64, valid: i64) -> Trigger {
    let mut t = a.trigger_of(&format!("tips{step}"), "tips", MessageCategory::trigger, at);
    t.step = step;
    t.template = ["tips", "tips_2", "tips_3"][step as usize].into();
    t.cause_event_id = Some("order-1".into());
    t.cause_occurred_at = T0;
    t.valid_until = at + valid;
    t
}

fn vip(a: &mut Arbiter) {
    let mut t = a.trigger_of("vip0", "vip", MessageCategory::trigger, T0);
    t.priority = 90;
    t.cause_event_id = Some("vip-entered".into());
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
}

#[test]
fn chain_steps_held_back_together_go_out_one_at_a_time_in_order() {
    let mut a = arbiter();
    vip(&mut a);
    for step in 0..3 {
        let t = tips(&a, step, T0 + i64::from(step) * DAY + HOUR, 10 * DAY);
        let d = a.push_trigger(&t);
        assert_eq!(
            (d.outcome, d.rule.as_str()),
            (DecisionOutcome::deferred, "main_scenario"),
            "{d:#?}"
        );
    }
    // The vip chain's last step, due at T0 + 3 days, never comes: the chain lets go
    // ten minutes later (see `a_chain_whose_last_step_never_comes_lets_the_waiters_go_soon_after`):
    // one tips message, not three.
    a.advance_to(T0 + 3 * DAY + HOUR);
    let tips_sent = |a: &Arbiter| -> Vec<(String, i64)> {
        a.sends
            .iter()
            .filter(|s| s.scenario == "tips")
            .map(|s| (s.template.clone(), s.created_at))
            .collect()
    };
    assert_eq!(
        tips_sent(&a),
        [("tips".to_string(), T0 + 3 * DAY + 10 * MINUTE)]
    );
    // Then a day apart, in order.
    a.advance_to(T0 + 8 * DAY);
    assert_eq!(
        tips_sent(&a),
        [
            ("tips".to_string(), T0 + 3 * DAY + 10 * MINUTE),
            ("tips_2".to_string(), T0 + 4 * DAY + 10 * MINUTE),
            ("tips_3".to_string(), T0 + 5 * DAY + 10 * MINUTE),
        ]
    );
    for step in 0..3 {
        let id = format!("tips{step}");
        let f = a.finals_of(&id);
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!(f[0].outcome, DecisionOutcome::sent);
    }
}

/// A step between that did not go out (its customer unreachable then) does not end
/// the chain, and the next step keeps the spacing from the last one that went out:
/// both steps' delays, not back to back.
#[test]
fn a_step_held_back_behind_one_that_did_not_go_out_keeps_its_spacing() {
    let mut a = arbiter();
    vip(&mut a);
    for step in 0..3 {
        let mut t = tips(&a, step, T0 + i64::from(step) * DAY + HOUR, 10 * DAY);
        if step == 1 {
            t.contacts.consented_channels.clear();
        }
        assert_eq!(a.push_trigger(&t).rule, "main_scenario");
    }
    a.advance_to(T0 + 8 * DAY);
    let tips_sent: Vec<(String, i64)> = a
        .sends
        .iter()
        .filter(|s| s.scenario == "tips")
        .map(|s| (s.template.clone(), s.created_at))
        .collect();
    assert_eq!(
        tips_sent,
        [
            ("tips".to_string(), T0 + 3 * DAY + 10 * MINUTE),
            ("tips_3".to_string(), T0 + 5 * DAY + 10 * MINUTE),
        ]
    );
    assert_eq!(
        a.finals_of("tips1").first().map(|d| d.outcome),
        Some(DecisionOutcome::suppressed)
    );
}

#[test]
fn an_expired_step_cancels_the_later_steps_of_its_chain() {
    let mut a = arbiter();
    vip(&mut a);
    for step in 0..3 {
        let t = tips(&a, step, T0 + i64::from(step) * DAY + HOUR, DAY);
        a.push_trigger(&t);
    }
    a.advance_to(T0 + 8 * DAY);
    assert!(
        a.sends.iter().all(|s| s.scenario != "tips"),
        "no tips_2 or tips_3 without tips: {:#?}",
        a.sends
    );
    let f = a.finals_of("tips0");
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0].outcome, DecisionOutcome::expired);
    for id in ["tips1", "tips2"] {
        let f = a.finals_of(id);
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!(
            (f[0].outcome, f[0].rule.as_str()),
            (DecisionOutcome::cancelled, "chain_broken"),
            "{f:#?}"
        );
    }
}

#[test]
fn a_mass_send_leaves_out_a_customer_in_a_personal_chain() {
    let mut a = arbiter();
    let mut sale = a.trigger_of("sale0", "flash_sale", MessageCategory::promo, T0);
    sale.priority = 100;
    assert_eq!(a.push_trigger(&sale).outcome, DecisionOutcome::sent);
    // The tips chain (priority 50) holds the customer for two days.
    let t = tips(&a, 0, T0 + DAY, DAY);
    assert_eq!(a.push_trigger(&t).outcome, DecisionOutcome::sent);
    let mut sale = a.trigger_of(
        "sale1",
        "flash_sale",
        MessageCategory::promo,
        T0 + DAY + HOUR,
    );
    sale.priority = 100;
    let d = a.push_trigger(&sale);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::suppressed, "in_personal_chain"),
        "{d:#?}"
    );
}

/// A chain broken by an expired step lets go of the customer at once, not at its
/// planned end: a mass send after that is decided like any other.
#[test]
fn a_broken_chain_frees_the_main_scenario_slot() {
    let mut a = Arbiter::from_text(&format!("{}\n{CHAINS}", common::CONFIG).replace(
        "[arbiter]\n",
        "[arbiter]\ndaily_cap = 5\nweekly_cap = 20\nquiet_hours_start = \"21:00\"\nquiet_hours_end = \"08:00\"\n",
    ));
    // Monday 09:00 UTC: the tips chain holds the customer until Wednesday 09:00.
    assert_eq!(
        a.push_trigger(&tips(&a, 0, T0, DAY)).outcome,
        DecisionOutcome::sent
    );
    // Its second step comes in the quiet hours, valid an hour: it expires at 23:00.
    let second = tips(&a, 1, T0 + DAY + 13 * HOUR, HOUR);
    assert_eq!(a.push_trigger(&second).outcome, DecisionOutcome::deferred);
    a.advance_to(T0 + DAY + 14 * HOUR + 1);
    let f = a.finals_of("tips1");
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0].outcome, DecisionOutcome::expired);
    // A flash sale at 23:30 waits for the morning and goes out.
    let mut sale = a.trigger_of(
        "sale",
        "flash_sale",
        MessageCategory::promo,
        T0 + DAY + 14 * HOUR + 30 * 60_000,
    );
    sale.priority = 100;
    let d = a.push_trigger(&sale);
    assert_eq!(d.outcome, DecisionOutcome::deferred, "{d:#?}");
    a.advance_to(T0 + 2 * DAY);
    let f = a.finals_of("sale");
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0].outcome, DecisionOutcome::sent, "{f:#?}");
}

/// A transactional chain (an address to confirm, its reminder half an hour on) keeps
/// its own delays: the minimum gap between messages is a marketing rule.
#[test]
fn a_transactional_chain_s_steps_are_not_held_to_the_minimum_gap() {
    let verify = r#"
[[scenarios]]
name = "verify_email"
kind = "welcome"
category = "transactional"
channels = ["email"]
template = "verify"
steps = [{ delay = "30m", template = "verify_reminder" }]
"#;
    let mut a = Arbiter::from_text(
        &format!("{}\n{verify}", common::CONFIG)
            .replace("[arbiter]\n", "[arbiter]\nmin_gap = \"2h\"\n"),
    );
    for (step, at) in [(0, T0), (1, T0 + 30 * 60_000)] {
        let mut t = a.trigger_of(
            &format!("v{step}"),
            "verify_email",
            MessageCategory::transactional,
            at,
        );
        t.step = step;
        t.cause_event_id = Some("registered".into());
        let d = a.push_trigger(&t);
        assert_eq!(d.outcome, DecisionOutcome::sent, "step {step}: {d:#?}");
    }
}

#[test]
fn a_step_suppressed_for_want_of_consent_lets_the_next_step_be_decided_on_its_own() {
    let mut a = arbiter();
    // No consented channel when the first step comes: suppressed, not sent.
    let mut first = tips(&a, 0, T0, DAY);
    first.contacts.consented_channels.clear();
    let d = a.push_trigger(&first);
    assert_eq!(d.outcome, DecisionOutcome::suppressed, "{d:#?}");
    // By the second step the customer consented: it goes out (the chain did not
    // expire or get cancelled, it only found the customer unreachable).
    let second = tips(&a, 1, T0 + DAY, DAY);
    let d = a.push_trigger(&second);
    assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
}

/// c1 is merged into z at `at`: the arbiter hands c1's ledger over, and it reaches z.
fn merge_c1_into_z(a: &mut Arbiter, at: i64) {
    a.merged_into("merged-c1", "z", at);
    for action in std::mem::take(&mut a.actions) {
        assert_eq!(action.customer_id, "z");
        a.push("customer-actions", "z", &action);
    }
}

/// Step `step` of c1's tips chain, carried to the survivor z by the profile.
fn survivors_tips(a: &Arbiter, step: i32, at: i64) -> Trigger {
    let mut t = tips(a, step, at, 10 * DAY);
    t.trigger_id = format!("z-tips{step}");
    t.customer_id = "z".into();
    t
}

#[test]
fn a_chain_that_broke_before_a_merge_stays_broken_for_the_survivor() {
    let mut a = arbiter();
    // The first step's moment had passed when it came: the chain ends there.
    let first = tips(&a, 0, T0, -1);
    assert_eq!(a.push_trigger(&first).outcome, DecisionOutcome::expired);
    merge_c1_into_z(&mut a, T0 + HOUR);
    let next = survivors_tips(&a, 1, T0 + DAY);
    let d = a.push_trigger(&next);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::cancelled, "chain_broken"),
        "{d:#?}"
    );
    assert!(a.sends.is_empty(), "{:#?}", a.sends);
}

#[test]
fn a_chain_step_sent_before_a_merge_spaces_the_survivors_next_step() {
    let mut a = arbiter();
    let first = tips(&a, 0, T0, 10 * DAY);
    assert_eq!(a.push_trigger(&first).outcome, DecisionOutcome::sent);
    merge_c1_into_z(&mut a, T0 + HOUR);
    // The next step comes early (a merge re-arms it at once when it was overdue): it
    // keeps the chain's day after the first step, sent to c1.
    let next = survivors_tips(&a, 1, T0 + 2 * HOUR);
    let d = a.push_trigger(&next);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::deferred, "chain_spacing"),
        "{d:#?}"
    );
    a.advance_to(T0 + 2 * DAY);
    let f = a.finals_of("z-tips1");
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(
        (f[0].outcome, f[0].decided_at),
        (DecisionOutcome::sent, T0 + DAY)
    );
}

#[test]
fn two_instances_of_one_chain_hold_the_slot_until_the_later_one_s_last_step() {
    let mut a = arbiter();
    let step_of = |a: &Arbiter, order: &str, step: i32, at: i64| {
        let mut t = tips(a, step, at, DAY);
        t.trigger_id = format!("{order}-tips{step}");
        t.cause_event_id = Some(order.into());
        t.cause_occurred_at = at - i64::from(step) * DAY;
        t
    };
    // order-1's series runs from T0 to T0 + 2 days; order-2's, a day later, to T0 + 3
    // days: its first message goes out beside the first series (same scenario).
    for (order, step, at) in [
        ("order-1", 0, T0),
        ("order-1", 1, T0 + DAY),
        ("order-2", 0, T0 + DAY + 2 * HOUR),
        ("order-1", 2, T0 + 2 * DAY),
    ] {
        let d = a.push_trigger(&step_of(&a, order, step, at));
        assert_eq!(
            d.outcome,
            DecisionOutcome::sent,
            "{order} step {step}: {d:#?}"
        );
    }
    // order-1's last step does not free the slot order-2's series holds.
    let mut lower = a.trigger_of(
        "come_back0",
        "come_back",
        MessageCategory::trigger,
        T0 + 2 * DAY + HOUR,
    );
    lower.priority = 40;
    lower.valid_until = T0 + 5 * DAY;
    let d = a.push_trigger(&lower);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::deferred, "main_scenario"),
        "{d:#?}"
    );
    assert!(d.reason.contains("tips"), "{d:#?}");
    // order-2's last step frees it, and the waiting trigger goes out.
    a.push_trigger(&step_of(&a, "order-2", 1, T0 + 2 * DAY + 2 * HOUR));
    let d = a.push_trigger(&step_of(&a, "order-2", 2, T0 + 3 * DAY + 2 * HOUR));
    assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
    a.advance_to(T0 + 3 * DAY + 3 * HOUR);
    let f = a.finals_of("come_back0");
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0].outcome, DecisionOutcome::sent, "{f:#?}");
}

#[test]
fn forgetting_keeps_a_ledger_whose_chain_moved_on_after_it() {
    let mut a = arbiter();
    vip(&mut a);
    // A chain step decided after the forgetting (it expired waiting for the vip
    // chain's slot) is newer than it: the ledger, and the broken chain, stay.
    let t = tips(&a, 0, T0 + HOUR, DAY);
    a.push_trigger(&t);
    a.advance_to(T0 + 2 * DAY);
    assert_eq!(a.finals_of("tips0")[0].outcome, DecisionOutcome::expired);
    a.forgotten("fk", T0);
    assert!(a.ledger_stored("c1"));
    let next = tips(&a, 1, T0 + 2 * DAY + HOUR, DAY);
    let d = a.push_trigger(&next);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::cancelled, "chain_broken"),
        "{d:#?}"
    );
}

/// A chain switched off in the configuration lets go of its customer: a trigger that
/// waited for its slot goes out at its next look (hourly), not at the chain's old end,
/// though nothing else of the customer is decided; the looks before found the slot
/// held and recorded nothing new.
#[test]
fn a_chain_switched_off_lets_its_waiters_go_within_the_hour() {
    let mut a = arbiter();
    vip(&mut a);
    let d = a.push_trigger(&tips(&a, 0, T0 + HOUR, 2 * DAY));
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::deferred, "main_scenario"),
        "{d:#?}"
    );
    a.advance_to(T0 + 5 * HOUR);
    assert_eq!(
        a.decisions_of("tips0").len(),
        1,
        "looked four times, recorded once"
    );
    let text = format!("{}\n{CHAINS}", common::CONFIG)
        .replace("[arbiter]\n", "[arbiter]\ndaily_cap = 5\nweekly_cap = 20\n")
        .replace("priority = 90\n", "priority = 90\nenabled = false\n");
    a.restart_with(&text);
    a.advance_to(T0 + 7 * HOUR);
    let f = a.finals_of("tips0");
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0].outcome, DecisionOutcome::sent, "{f:#?}");
    let sent = a
        .sends
        .iter()
        .find(|s| s.trigger_id == "tips0")
        .expect("sent");
    assert_eq!(sent.created_at, T0 + 6 * HOUR);
}

/// A step's own `exit_on_purchase = false` keeps it going to a buyer; a later step
/// that keeps the scenario's (a welcome ends on a purchase) is cancelled.
#[test]
fn a_purchase_ends_a_chain_only_at_the_steps_that_end_on_one() {
    let text = common::CONFIG.replace(
        r#"steps = [{ delay = "1d", template = "onboarding_2" }, { delay = "1d", template = "onboarding_3" }]"#,
        r#"steps = [{ delay = "1d", template = "onboarding_2", exit_on_purchase = false }, { delay = "1d", template = "onboarding_3" }]"#,
    );
    assert_ne!(text, common::CONFIG, "the step's setting is in");
    let mut a = Arbiter::from_text(&text);
    let step = |a: &Arbiter, step: i32, at: i64| {
        let mut t = a.trigger_of(
            &format!("ob{step}"),
            "onboarding",
            MessageCategory::trigger,
            at,
        );
        t.step = step;
        t.template = ["onboarding", "onboarding_2", "onboarding_3"][step as usize].into();
        t.cause_event_id = Some("registration-1".into());
        t.cause_occurred_at = T0;
        t
    };
    let first = step(&a, 0, T0);
    assert_eq!(a.push_trigger(&first).outcome, DecisionOutcome::sent);
    a.purchase("buy", T0 + HOUR);
    let second = step(&a, 1, T0 + DAY);
    let d = a.push_trigger(&second);
    assert_eq!(d.outcome, DecisionOutcome::sent, "{d:#?}");
    let third = step(&a, 2, T0 + 2 * DAY);
    let d = a.push_trigger(&third);
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (DecisionOutcome::cancelled, "purchase_exclusion"),
        "{d:#?}"
    );
}
