//! The identity processor under SIGKILL: the identity graph it ends with (every
//! identifier and known customer id with its customer) and the customer each event
//! was resolved to equal those of an undisturbed run over the same input.
//!
//! The input comes from the load generator on all three raw topics, keyed as a
//! producer would key it: anonymous visitors who register later (stitching), receipts
//! with only a loyalty card or a phone, and second accounts that share a first
//! account's e-mail (merges of known customers). Which customer an event is re-keyed
//! to depends on what arrived before it, which differs between runs; what it resolves
//! to in the final graph does not.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kairos_core::config::GeneratorConfig;
use kairos_core::store::StoreFactory;
use kairos_generator::TrafficModel;
use kairos_tests::{resilience_env, Options, Pipeline};

const EVENTS: usize = 60_000;
const CHUNKS: usize = 6;
const TOPICS: [&str; 3] = ["events.site", "events.app", "events.offline"];

/// Generated traffic (topic, key, payload), plus a second account for every 40th
/// registration, signing up in the app with the first account's e-mail.
fn traffic() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut model = TrafficModel::new(&GeneratorConfig {
        customers: 4_000,
        seed: 11,
        offline_share: 0.4,
        ..GeneratorConfig::default()
    });
    let mut now = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    let mut out = Vec::with_capacity(EVENTS + EVENTS / 100);
    let mut registrations = 0;
    while out.len() < EVENTS {
        now += 20_000;
        for e in model.session(now) {
            let topic = e.stream.topic();
            let v: serde_json::Value = serde_json::from_slice(&e.payload).expect("json");
            if v["event_type"] == "registration" {
                registrations += 1;
                if registrations % 40 == 0 {
                    let second = format!("x{}", v["customer_id"].as_str().unwrap_or_default());
                    let dup = serde_json::json!({
                        "event_id": format!("dup-{registrations}"),
                        "event_type": "registration",
                        "occurred_at": now + 1,
                        "customer_id": second,
                        "email": v["email"].as_str().unwrap_or_default().to_uppercase(),
                    });
                    out.push((
                        "events.app",
                        second,
                        serde_json::to_vec(&dup).expect("json"),
                    ));
                }
            }
            out.push((topic, e.key, e.payload));
        }
    }
    out
}

fn options() -> Options {
    let mut env = resilience_env();
    env.push(("KAIROS__IDENTITY__ENABLED".into(), "true".into()));
    env.push(("KAIROS__IDENTITY__DEFAULT_COUNTRY".into(), "DE".into()));
    // The graph is one partition: on the embedded broker (5 MB per partition) its
    // changelog would outgrow what the broker keeps. A SIGKILL recovers from the
    // local store, which is what this test proves.
    env.push(("KAIROS__STATE__CHANGELOG".into(), "false".into()));
    Options {
        env,
        cart_delay: "1h",
        services: vec![],
        extra_config: String::new(),
    }
}

fn produce_chunk(p: &Pipeline, chunk: &[(&'static str, String, Vec<u8>)]) {
    for topic in TOPICS {
        let records: Vec<(&str, Vec<u8>)> = chunk
            .iter()
            .filter(|(t, _, _)| *t == topic)
            .map(|(_, k, v)| (k.as_str(), v.clone()))
            .collect();
        p.produce(topic, &records);
    }
}

struct Outcome {
    graph: BTreeMap<String, String>,
    /// Event id -> the customer its re-keyed record resolves to in the final graph.
    resolved: BTreeMap<String, String>,
    records: usize,
    known_merges: BTreeSet<(String, String)>,
}

fn finish(p: &mut Pipeline) -> Outcome {
    p.wait_caught_up("identity", &TOPICS, Duration::from_secs(300));
    assert!(
        !p.log("identity").contains("Offset out of range"),
        "the embedded broker dropped input before it was read:\n{}",
        p.log("identity")
    );
    let identified = p.read_all_records("identified-events");
    let changes = p.read_all_json("identity-changes");
    let (status, _) = p.terminate("identity");
    assert!(
        status.success(),
        "identity did not stop cleanly:\n{}",
        p.log("identity")
    );
    let factory =
        StoreFactory::new(&p.state_dir("identity").join("identity"), 8 << 20).expect("factory");
    let store = factory.open(0).expect("identity store");
    let graph = kairos_identity::resolved_graph(&store).expect("graph");
    let mut resolved = BTreeMap::new();
    for (key, record) in &identified {
        let Some(event_id) = record["record"]["event_id"].as_str() else {
            continue; // merges
        };
        let customer = graph
            .profiles
            .get(key)
            .cloned()
            .unwrap_or_else(|| key.clone());
        if let Some(earlier) = resolved.insert(event_id.to_string(), customer.clone()) {
            assert_eq!(
                earlier, customer,
                "a re-sent event resolved elsewhere: {event_id}"
            );
        }
    }
    let known_merges = changes
        .iter()
        .filter(|c| c["kind"] == "merged")
        .filter_map(|c| {
            let from = c["merged_from"].as_str()?;
            let into = c["customer_id"].as_str()?;
            (!from.contains(':') && !into.contains(':'))
                .then(|| (from.to_string(), into.to_string()))
        })
        .collect();
    Outcome {
        graph: graph.identifiers,
        resolved,
        records: identified.len(),
        known_merges,
    }
}

fn undisturbed(events: &[(&'static str, String, Vec<u8>)]) -> Outcome {
    let mut p = Pipeline::start_with(options(), "identity");
    for chunk in events.chunks(events.len() / CHUNKS) {
        produce_chunk(&p, chunk);
    }
    finish(&mut p)
}

#[test]
fn identity_graph_and_resolutions_survive_sigkill() {
    let events = traffic();
    let baseline = undisturbed(&events);
    // The traffic exercises every kind of link.
    let count = |prefix: &str| {
        baseline
            .graph
            .keys()
            .filter(|k| k.starts_with(prefix))
            .count()
    };
    assert!(
        count("anonymous_id:") > 500,
        "anonymous visitors: {}",
        count("anonymous_id:")
    );
    assert!(
        count("loyalty_card:") > 50,
        "cards: {}",
        count("loyalty_card:")
    );
    assert!(count("phone:") > 500, "phones: {}", count("phone:"));
    assert!(
        baseline.known_merges.len() > 20,
        "merges: {:?}",
        baseline.known_merges
    );
    let stitched = baseline
        .graph
        .iter()
        .filter(|(k, v)| k.starts_with("anonymous_id:") && !v.contains(':'))
        .count();
    assert!(
        stitched > 100,
        "anonymous visitors who became customers: {stitched}"
    );
    assert_eq!(
        baseline.resolved.len(),
        events.len(),
        "every event went on, once"
    );

    let mut p = Pipeline::start_with(options(), "identity");
    let mut kills = 0;
    // Kills that came while input lay beyond the committed offsets (see
    // `crash_mid_work`).
    let mut mid_work = 0;
    for (i, chunk) in events.chunks(events.len() / CHUNKS).enumerate() {
        produce_chunk(&p, chunk);
        let after = Duration::from_millis(150 + 100 * i as u64);
        if p.crash_mid_work("identity", after, &TOPICS) {
            mid_work += 1;
        }
        kills += 1;
    }
    let crashed = finish(&mut p);
    assert!(
        mid_work >= 2,
        "only {mid_work} of {kills} kills came while input flowed"
    );
    eprintln!(
        "identified-events records: {} undisturbed, {} with {kills} SIGKILLs",
        baseline.records, crashed.records
    );
    assert_eq!(crashed.graph.len(), baseline.graph.len());
    let differing: Vec<_> = baseline
        .graph
        .iter()
        .filter(|(k, v)| crashed.graph.get(*k) != Some(*v))
        .take(10)
        .collect();
    assert!(
        differing.is_empty(),
        "graph differs after {kills} SIGKILLs: {differing:?}"
    );
    // No event lost or resolved twice differently (re-sent records carry the same
    // event id and resolve alike: checked in `finish`).
    assert_eq!(
        crashed.resolved, baseline.resolved,
        "every event resolves to the same customer"
    );
    assert_eq!(
        crashed.known_merges, baseline.known_merges,
        "the same merges"
    );

    // A second instance: the graph is one partition, so neither instance applies
    // anything while they share the input; when one goes, the other does it all.
    // Batches are gathered for up to 25 s, so that the instance left alone gets every
    // partition back in the middle of one: it had read and dropped what came while it
    // shared, and what it fetched in that batch before the assignment lies past those
    // records, which come again from the committed offset after it, most of them in
    // later batches (500 records each).
    // (25 s: the session's expiry, 6 s, and the rebalance after it must fall within
    // the batch on a loaded machine.)
    let gather = Duration::from_secs(25);
    let mut opts = options();
    opts.env.extend([
        ("KAIROS__STATE__MAX_BATCH_WAIT".into(), "25s".into()),
        ("KAIROS__STATE__MAX_BATCH_RECORDS".into(), "500".into()),
    ]);
    let mut p = Pipeline::start_with(opts, "identity");
    let chunks: Vec<_> = events.chunks(events.len() / CHUNKS).collect();
    produce_chunk(&p, chunks[0]);
    p.wait_caught_up("identity", &TOPICS, Duration::from_secs(120));
    p.spawn_instance("identity-b", "identity");
    let waiting = "does not own every input partition";
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut resent = 0;
    while !p.log("identity-b").contains(waiting) && !p.log("identity").contains(waiting) {
        // Records keep coming, so an instance polls and sees the shared assignment.
        assert!(
            std::time::Instant::now() < deadline,
            "no instance noticed the shared input:\n{}\n{}",
            p.log("identity"),
            p.log("identity-b")
        );
        produce_chunk(&p, &chunks[1][resent..resent + 20]);
        resent += 20;
        std::thread::sleep(Duration::from_millis(500));
    }
    produce_chunk(&p, &chunks[1][resent..]);
    // Both read the rest of the chunk and drop it with their batches.
    std::thread::sleep(gather + Duration::from_secs(3));
    let b_dir = p.state_dir("identity-b").join("identity");
    // A few records open the next batch; the second instance dies in it, and its
    // session expires (6 s) before the batch is due.
    let set_aside = |p: &Pipeline| {
        p.log("identity")
            .matches("records fetched before a new assignment set aside")
            .count()
    };
    let set_aside_before = set_aside(&p);
    let (opening, rest) = chunks[2].split_at(300);
    produce_chunk(&p, opening);
    std::thread::sleep(Duration::from_secs(1));
    p.kill9("identity-b");
    // The rest comes after that batch, as the comment above has it.
    std::thread::sleep(gather);
    assert!(
        set_aside(&p) > set_aside_before,
        "the assignment did not come within a batch:\n{}",
        p.log("identity")
    );
    let b_store = StoreFactory::new(&b_dir, 8 << 20)
        .expect("factory")
        .open(0)
        .expect("identity-b store");
    let b_graph = kairos_identity::resolved_graph(&b_store).expect("graph");
    assert!(
        b_graph.identifiers.is_empty(),
        "the instance without every partition applied {} links",
        b_graph.identifiers.len()
    );
    drop(b_store);
    produce_chunk(&p, rest);
    for c in &chunks[3..] {
        produce_chunk(&p, c);
    }
    let shared = finish(&mut p);
    assert_eq!(
        shared.graph, baseline.graph,
        "the same graph with a second instance"
    );
    assert_eq!(shared.resolved, baseline.resolved);
}
