//! The profile processor under SIGKILL and rebalances: final state and the set of
//! emitted trigger ids equal those of an undisturbed run over the same input.
//!
//! Event-time mode, so results depend on the input alone. All events go to one input
//! topic: the order of records across topics is the broker's arrival order, which no
//! two runs share, while the order within a partition is fixed.

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::Duration;

use kairos_core::config::GeneratorConfig;
use kairos_generator::{Source, Stream, TrafficModel};
use kairos_tests::{resilience_env, sample, Options, Pipeline};
use nix::sys::signal::Signal;

const EVENTS: usize = 100_000;
const CHUNKS: usize = 5;

const SCENARIOS: &str = r#"
[[scenarios]]
name = "welcome"
kind = "welcome"
channels = ["email"]
template = "welcome"
steps = [{ delay = "2d", template = "welcome_2" }]

[[scenarios]]
name = "browse"
kind = "browse_abandonment"
channels = ["email"]
template = "browse"
delay = "2h"

[[scenarios]]
name = "come_back"
kind = "reactivation"
channels = ["email"]
template = "come_back"
delay = "3d"
"#;

/// ~100k generated events at synthetic times: a session every 20 s of event time.
fn traffic() -> Vec<(String, Vec<u8>)> {
    let mut model = TrafficModel::new(&GeneratorConfig {
        customers: 3_000,
        seed: 7,
        ..GeneratorConfig::default()
    });
    let mut now = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    let mut out = Vec::with_capacity(EVENTS);
    while out.len() < EVENTS {
        now += 20_000;
        for e in model.session(now) {
            if e.stream != Stream::Events(Source::Offline) && out.len() < EVENTS {
                out.push((e.key, e.payload));
            }
        }
    }
    out
}

fn options() -> Options {
    Options {
        env: resilience_env(),
        cart_delay: "1h",
        services: vec![],
        extra_config: SCENARIOS.into(),
    }
}

fn produce_chunk(p: &Pipeline, chunk: &[(String, Vec<u8>)]) {
    let records: Vec<(&str, Vec<u8>)> =
        chunk.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    p.produce("events.site", &records);
}

struct Outcome {
    trigger_ids: BTreeSet<String>,
    trigger_records: usize,
    changelog_digest: String,
    local_digest: Option<String>,
}

fn finish(p: &mut Pipeline, instances: &[&str], local: bool) -> Outcome {
    p.wait_caught_up("profile", &["events.site"], Duration::from_secs(300));
    for i in instances {
        assert!(
            !p.log(i).contains("Offset out of range"),
            "the embedded broker dropped input before it was read (5 MB per partition); \
             the test needs more partitions:\n{}",
            p.log(i)
        );
    }
    let triggers = p.read_all_json("triggers");
    for i in instances {
        let (status, _) = p.terminate(i);
        assert!(status.success(), "{i} did not stop cleanly:\n{}", p.log(i));
    }
    Outcome {
        trigger_ids: triggers
            .iter()
            .map(|t| t["trigger_id"].as_str().unwrap_or_default().to_string())
            .collect(),
        trigger_records: triggers.len(),
        changelog_digest: p.state_digest("profile", true, None),
        local_digest: local.then(|| p.state_digest("profile", false, None)),
    }
}

fn undisturbed(events: &[(String, Vec<u8>)]) -> Outcome {
    let mut p = Pipeline::start_with(options(), "profile");
    for chunk in events.chunks(events.len() / CHUNKS) {
        produce_chunk(&p, chunk);
    }
    finish(&mut p, &["profile"], true)
}

/// The undisturbed run over [`traffic`], made once for the tests of this file.
fn baseline() -> &'static Outcome {
    static BASELINE: OnceLock<Outcome> = OnceLock::new();
    BASELINE.get_or_init(|| undisturbed(&traffic()))
}

#[test]
fn profile_state_and_triggers_survive_sigkill_and_rebalance() {
    let events = traffic();
    assert_eq!(events.len(), EVENTS);
    let baseline = baseline();
    assert!(
        baseline.trigger_ids.len() > 1_000,
        "the traffic must exercise the scenarios: {} triggers",
        baseline.trigger_ids.len()
    );
    assert_eq!(
        baseline.local_digest.as_deref(),
        Some(baseline.changelog_digest.as_str()),
        "the changelog replicates the local state exactly"
    );

    // SIGKILL while events flow, several times.
    let mut p = Pipeline::start_with(options(), "profile");
    let mut kills = 0;
    // Kills that came while input lay beyond the committed offsets (see
    // `crash_mid_work`).
    let mut mid_work = 0;
    for (i, chunk) in events.chunks(events.len() / CHUNKS).enumerate() {
        produce_chunk(&p, chunk);
        if p.crash_mid_work(
            "profile",
            Duration::from_millis(200 + 150 * i as u64),
            &["events.site"],
        ) {
            mid_work += 1;
        }
        kills += 1;
    }
    let crashed = finish(&mut p, &["profile"], true);
    assert!(
        mid_work >= 2,
        "only {mid_work} of {kills} kills came while input flowed"
    );
    assert_eq!(
        crashed.trigger_ids, baseline.trigger_ids,
        "same triggers after {kills} SIGKILLs"
    );
    assert!(
        crashed.trigger_records >= baseline.trigger_records,
        "re-sends may repeat ids, never lose them"
    );
    assert_eq!(
        crashed.local_digest, baseline.local_digest,
        "same final state"
    );
    assert_eq!(crashed.changelog_digest, baseline.changelog_digest);

    // Two instances share the partitions; one stops and comes back later.
    let mut p = Pipeline::start(options());
    p.spawn("profile");
    p.spawn_instance("profile-b", "profile");
    p.wait_ready("profile", Duration::from_secs(60));
    p.wait_ready("profile-b", Duration::from_secs(60));
    let chunks: Vec<_> = events.chunks(events.len() / CHUNKS).collect();
    produce_chunk(&p, chunks[0]);
    produce_chunk(&p, chunks[1]);
    std::thread::sleep(Duration::from_millis(500));
    let (status, _) = p.terminate("profile-b");
    assert!(status.success());
    produce_chunk(&p, chunks[2]);
    // Everything so far is committed only once the remaining instance has taken over
    // (and restored) the partitions of the stopped one.
    p.wait_caught_up("profile", &["events.site"], Duration::from_secs(180));
    // The other way round: B alone takes its partitions back, which A wrote to
    // meanwhile, and A's.
    let (status, _) = p.terminate("profile");
    assert!(status.success());
    p.spawn_instance("profile-b", "profile");
    p.wait_ready("profile-b", Duration::from_secs(60));
    produce_chunk(&p, chunks[3]);
    p.wait_caught_up("profile", &["events.site"], Duration::from_secs(180));
    // Then A comes back beside B, to partitions B wrote to after A closed them.
    p.spawn("profile");
    p.wait_ready("profile", Duration::from_secs(60));
    for c in &chunks[4..] {
        produce_chunk(&p, c);
    }
    let shared = finish(&mut p, &["profile", "profile-b"], false);
    let a_log = p.log("profile");
    let b_log = p.log("profile-b");
    assert!(
        a_log.contains("restoring state from the changelog")
            || b_log.contains("restoring state from the changelog"),
        "partitions moved with their state:\n{a_log}\n{b_log}"
    );
    // A partition back on an instance that had closed it cleanly is caught up with
    // what the other instance wrote, not rebuilt: B's own partitions when B came back
    // alone, and whichever half A got when it came back.
    const CAUGHT_UP: &str = "catching up with what the changelog gained since the store was closed";
    assert!(
        b_log.contains(CAUGHT_UP) && a_log.contains(CAUGHT_UP),
        "partitions back on their earlier instance were rebuilt whole:\n{a_log}\n{b_log}"
    );
    assert_eq!(
        shared.trigger_ids, baseline.trigger_ids,
        "same triggers with a rebalance"
    );
    assert_eq!(
        shared.changelog_digest, baseline.changelog_digest,
        "same final state with a rebalance"
    );
}

/// An instance paused past its session (SIGSTOP, as a frozen VM or a long stall would
/// pause it) while it works through a backlog wakes up to partitions the other instance
/// has claimed meanwhile. What it had processed is not published and the records it
/// wrote under its old epoch are left out of the state (the other instance writes its
/// values again after them); as its consumer still holds the partitions when it finds
/// out, it stops and is started again. Paused until two of its partitions have been
/// fenced (at most six times): the triggers and the state equal the undisturbed run's.
#[test]
fn profile_instance_paused_past_its_session_is_fenced_when_it_wakes() {
    const FENCED: &str = "another instance claimed this partition since this one did";
    const OPENED: &str = "partition opened";
    let events = traffic();
    let baseline = baseline();
    let mut p = Pipeline::start(options());
    p.spawn("profile");
    p.spawn_instance("profile-b", "profile");
    p.wait_ready("profile", Duration::from_secs(60));
    p.wait_ready("profile-b", Duration::from_secs(60));
    // Smaller chunks than the crash test's: one per pause.
    let chunks: Vec<_> = events.chunks(events.len() / 10).collect();
    produce_chunk(&p, chunks[0]);
    let mut pauses = 0;
    let mut rest = chunks[1..].iter();
    for chunk in rest.by_ref() {
        // A holds partitions, and is paused as soon as it works on the new chunk.
        wait_for(Duration::from_secs(90), "A to hold partitions", || {
            metric(&p, "kairos_owned_partitions").is_some_and(|n| n > 0.0)
        });
        let before = metric(&p, "kairos_input_records_total").unwrap_or_default();
        produce_chunk(&p, chunk);
        wait_for(Duration::from_secs(60), "A to work on the chunk", || {
            metric(&p, "kairos_input_records_total").is_some_and(|n| n > before)
        });
        p.signal("profile", Signal::SIGSTOP);
        pauses += 1;
        // Once A's session has expired, B takes its partitions over (restoring and
        // claiming them) and processes everything.
        p.wait_caught_up("profile", &["events.site"], Duration::from_secs(180));
        // A finishes the batch it was in and publishes it, finds B's claims and
        // stops (its consumer still holds the partitions when it finds out), or it
        // learns of the revocation first and lets them go; either way it rejoins and
        // opens partitions again (what it reports before that is stale).
        let opened = p.log("profile").matches(OPENED).count();
        p.signal("profile", Signal::SIGCONT);
        wait_for(Duration::from_secs(90), "A to stop or rejoin", || {
            p.log("profile").matches(OPENED).count() > opened || p.has_exited("profile")
        });
        if let Some(status) = p.exited("profile") {
            assert!(!status.success(), "A stopped with an error");
            p.spawn("profile");
        }
        p.wait_ready("profile", Duration::from_secs(60));
        if p.log("profile").matches(FENCED).count() >= 2 || pauses == 6 {
            break;
        }
    }
    for c in rest {
        produce_chunk(&p, c);
    }
    let paused = finish(&mut p, &["profile", "profile-b"], false);
    let fenced = p.log("profile").matches(FENCED).count();
    eprintln!("{pauses} pauses, {fenced} partitions fenced");
    assert!(
        fenced >= 1,
        "the paused instance woke in the middle of a batch in {pauses} pauses and was never \
         fenced:\n{}",
        p.log("profile")
    );
    assert_eq!(
        paused.trigger_ids, baseline.trigger_ids,
        "same triggers with an instance paused past its session ({pauses} pauses)"
    );
    assert_eq!(
        paused.changelog_digest, baseline.changelog_digest,
        "same final state with an instance paused past its session ({pauses} pauses)"
    );
}

/// A sample of `name` from A's metrics, if A answers.
fn metric(p: &Pipeline, name: &str) -> Option<f64> {
    let (status, body) = kairos_tests::http_get(p.admin("profile"), "/metrics")?;
    (status == 200).then(|| sample(&body, name, &[]))
}

/// Waits until `ready` holds, up to `timeout`, polling every 20 ms.
fn wait_for(timeout: Duration, what: &str, ready: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited {timeout:?} for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
