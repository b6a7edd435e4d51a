//! The arbiter under SIGKILL: the send ids that reach the channel topics, every
//! trigger's one final decision and the final state equal those of an undisturbed run
//! over the same triggers.
//!
//! Event-time mode with quiet hours, a minimum gap and the caps, so many triggers wait
//! in the deferred queue (persistent timers) while the process is killed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kairos_tests::{resilience_env, Options, Pipeline};
use serde_json::json;

const TRIGGERS: usize = 40_000;
const CUSTOMERS: usize = 4_000;
const CHUNKS: usize = 5;
const START: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const HOUR: i64 = 3_600_000;

/// Triggers spread over 5 days of event time (two per customer and day, so the caps
/// bite), customers in three time zones, three scenarios of which one is promo and
/// valid for 6 hours only (quiet hours make some expire).
fn triggers() -> Vec<(String, Vec<u8>)> {
    let zones = ["Europe/Berlin", "America/New_York", "Asia/Tokyo"];
    let scenarios = [
        ("abandoned_cart", "trigger"),
        ("welcome", "trigger"),
        ("weekly_digest", "promo"),
    ];
    let step = 5 * 24 * HOUR / TRIGGERS as i64;
    (0..TRIGGERS)
        .map(|i| {
            let customer = (i * 7_919) % CUSTOMERS;
            let (scenario, category) = scenarios[i % scenarios.len()];
            let at = START + i as i64 * step;
            let trigger = json!({
                "trigger_id": format!("rt-{i:06}"),
                "scenario": scenario,
                "customer_id": format!("c-{customer:05}"),
                "category": category,
                "step": 0,
                "template": scenario,
                "channels": ["email", "push"],
                "priority": 50,
                "fired_at": at,
                "valid_until": at + if category == "promo" { 6 * HOUR } else { 24 * HOUR },
                "cause_event_id": format!("e-{i}"),
                "cause_occurred_at": at,
                "contacts": {
                    "email": format!("c{customer}@example.com"),
                    "phone": null,
                    "push_token": customer.is_multiple_of(2).then(|| format!("tok-{customer}")),
                    "messenger_id": null,
                    "time_zone": zones[customer % zones.len()],
                    "consented_channels": if customer.is_multiple_of(5) { json!(["push"]) } else { json!(["email", "push"]) },
                },
                "variables": "{}",
            });
            (
                format!("c-{customer:05}"),
                serde_json::to_vec(&trigger).expect("trigger encodes"),
            )
        })
        .collect()
}

fn options() -> Options {
    Options {
        env: [
            resilience_env(),
            vec![
                ("KAIROS__ARBITER__QUIET_HOURS_START".into(), "22:00".into()),
                ("KAIROS__ARBITER__QUIET_HOURS_END".into(), "08:00".into()),
                ("KAIROS__ARBITER__MIN_GAP".into(), "1h".into()),
                ("KAIROS__ARBITER__CONTROL_GROUP_PERCENT".into(), "10".into()),
            ],
        ]
        .concat(),
        cart_delay: "1h",
        services: vec![],
        // The scenarios of the triggers (beside the test configuration's cart): the
        // arbiter cancels triggers of scenarios it does not know.
        extra_config: "[[scenarios]]\nname = \"welcome\"\nkind = \"welcome\"\n\
                       channels = [\"email\", \"push\"]\ntemplate = \"welcome\"\n\
                       [[scenarios]]\nname = \"weekly_digest\"\nkind = \"welcome\"\n\
                       category = \"promo\"\nchannels = [\"email\", \"push\"]\n\
                       template = \"welcome\"\n"
            .into(),
    }
}

struct Run {
    /// Each send command by its send id: every copy of one (a re-publish after a
    /// crash) is the same record, byte for byte.
    sends: BTreeMap<String, String>,
    /// Final decision per trigger: (decision id, outcome, channel, send id).
    finals: BTreeMap<String, (String, String, String, String)>,
    deferred: usize,
    /// Triggers with any decision (a final one, or deferred and still queued when the
    /// input ended: event time stops at the last trigger).
    decided: BTreeSet<String>,
    digest: String,
}

fn produce_chunk(p: &Pipeline, chunk: &[(String, Vec<u8>)]) {
    p.produce("triggers", chunk);
}

fn finish(p: &mut Pipeline) -> Run {
    p.wait_caught_up("arbiter", &["triggers"], Duration::from_secs(300));
    let log = p.log("arbiter");
    assert!(
        !log.contains("Offset out of range"),
        "the embedded broker dropped input before it was read:\n{log}"
    );
    let mut sends = BTreeMap::new();
    for channel in ["email", "push"] {
        for cmd in p.read_all_json(&format!("send.{channel}")) {
            let send_id = cmd["send_id"].as_str().unwrap_or_default().to_string();
            let record = cmd.to_string();
            if let Some(earlier) = sends.insert(send_id.clone(), record.clone()) {
                assert_eq!(earlier, record, "send {send_id} published in two versions");
            }
        }
    }
    let mut finals: BTreeMap<String, (String, String, String, String)> = BTreeMap::new();
    let mut deferred = 0;
    let mut decided = BTreeSet::new();
    for d in p.read_all_json("decisions") {
        let text = |k: &str| d[k].as_str().unwrap_or_default().to_string();
        decided.insert(text("trigger_id"));
        if text("outcome") == "deferred" {
            deferred += 1;
            continue;
        }
        let decision = (
            text("decision_id"),
            text("outcome"),
            text("channel"),
            text("send_id"),
        );
        if let Some(earlier) = finals.insert(text("trigger_id"), decision.clone()) {
            // A re-sent record after a crash repeats the decision; it never changes it.
            assert_eq!(
                earlier, decision,
                "trigger {} decided twice",
                d["trigger_id"]
            );
        }
    }
    let (status, _) = p.terminate("arbiter");
    assert!(
        status.success(),
        "arbiter did not stop cleanly:\n{}",
        p.log("arbiter")
    );
    Run {
        sends,
        finals,
        deferred,
        decided,
        digest: p.state_digest("arbiter", false, None),
    }
}

#[test]
fn arbiter_sends_and_decisions_survive_sigkill() {
    let input = triggers();
    let chunks: Vec<_> = input.chunks(TRIGGERS / CHUNKS).collect();

    let mut p = Pipeline::start_with(options(), "arbiter");
    for c in &chunks {
        produce_chunk(&p, c);
    }
    let baseline = finish(&mut p);
    assert!(
        baseline.sends.len() > 5_000 && baseline.deferred > 1_000,
        "the triggers must exercise sending and the deferred queue: {} sends, {} deferrals",
        baseline.sends.len(),
        baseline.deferred
    );
    assert_eq!(baseline.decided.len(), TRIGGERS, "every trigger is decided");
    let outcomes: BTreeSet<&str> = baseline.finals.values().map(|f| f.1.as_str()).collect();
    for expected in ["sent", "held_out", "expired", "suppressed"] {
        assert!(
            outcomes.contains(expected),
            "no {expected} decision: {outcomes:?}"
        );
    }

    let mut p = Pipeline::start_with(options(), "arbiter");
    let mut kills = 0;
    // Kills that came while input lay beyond the committed offsets (see
    // `crash_mid_work`).
    let mut mid_work = 0;
    for (i, c) in chunks.iter().enumerate() {
        produce_chunk(&p, c);
        if p.crash_mid_work(
            "arbiter",
            Duration::from_millis(150 + 150 * i as u64),
            &["triggers"],
        ) {
            mid_work += 1;
        }
        kills += 1;
    }
    let crashed = finish(&mut p);
    assert!(
        mid_work >= 2,
        "only {mid_work} of {kills} kills came while input flowed"
    );
    let ids = |run: &Run| run.sends.keys().cloned().collect::<BTreeSet<String>>();
    let (baseline_ids, crashed_ids) = (ids(&baseline), ids(&crashed));
    let missing: Vec<_> = baseline_ids.difference(&crashed_ids).collect();
    let extra: Vec<_> = crashed_ids.difference(&baseline_ids).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "after {kills} SIGKILLs: {} send ids missing ({:?}...), {} extra ({:?}...)",
        missing.len(),
        missing.iter().take(3).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(3).collect::<Vec<_>>()
    );
    let changed: Vec<&String> = baseline
        .sends
        .iter()
        .filter(|(id, record)| crashed.sends.get(*id) != Some(*record))
        .map(|(id, _)| id)
        .collect();
    assert!(
        changed.is_empty(),
        "{} send commands differ from the uncrashed run's (address, template, reasons...): {:?}...",
        changed.len(),
        changed.iter().take(3).collect::<Vec<_>>()
    );
    assert_eq!(
        crashed.finals, baseline.finals,
        "every trigger has the same one final decision"
    );
    assert_eq!(
        crashed.decided, baseline.decided,
        "the same triggers decided"
    );
    assert_eq!(crashed.digest, baseline.digest, "same final state");
    let records: usize = baseline
        .digest
        .split(' ')
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_default();
    assert!(
        records >= CUSTOMERS,
        "the digest counts at least as many records as customers: {}",
        baseline.digest
    );
}
