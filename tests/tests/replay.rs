//! `kairos replay` as a process: profile and arbiter together over a JSON-lines file in
//! event time, writing triggers, decisions and send commands as topic envelopes.

use std::process::Command;

use kairos_tests::{kairos_bin, registration, repo_root};
use serde_json::{json, Value};

#[test]
fn replay_runs_profile_and_arbiter_together() {
    let dir = tempfile::tempdir().expect("temp dir");
    let t0 = 1_767_603_600_000i64; // 2026-01-05T09:00:00Z
    let cart = |id: &str, customer: &str, at: i64| {
        json!({
            "event_id": id, "event_type": "add_to_cart", "occurred_at": at,
            "customer_id": customer,
            "product": {"product_id": "p42", "name": "Red shoes", "price": 59.9}
        })
    };
    let buy = json!({
        "event_id": "buy-2", "event_type": "purchase", "occurred_at": t0 + 10_000,
        "customer_id": "c-r2",
        "order": {"order_id": "o-2", "total": 59.9,
                  "items": [{"product_id": "p42", "quantity": 1, "unit_price": 59.9}]}
    });
    let lines = [
        serde_json::from_slice::<Value>(&registration("c-r1", t0)).expect("json"),
        cart("cart-1", "c-r1", t0 + 1_000),
        serde_json::from_slice::<Value>(&registration("c-r2", t0)).expect("json"),
        cart("cart-2", "c-r2", t0 + 1_000),
        buy,
    ];
    let input = dir.path().join("events.jsonl");
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    std::fs::write(&input, text.join("\n")).expect("write input");
    let output = dir.path().join("out.jsonl");
    run_ok(
        kairos(&["replay"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .args(["--until", "2026-01-06T09:00:00Z"])
            .env("KAIROS__ARBITER__CONTROL_GROUP_PERCENT", "0"),
    );
    let records = envelopes(&output);
    let of = |topic: &str, customer: &str| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["topic"] == topic && r["value"]["customer_id"] == customer)
            .map(|r| &r["value"])
            .collect()
    };
    // The abandoned cart of c-r1 becomes a trigger, a sent decision and an e-mail.
    let triggers: Vec<_> = of("triggers", "c-r1")
        .into_iter()
        .filter(|t| t["scenario"] == "abandoned_cart")
        .collect();
    assert_eq!(triggers.len(), 1, "{records:#?}");
    let decisions = of("decisions", "c-r1");
    let sent: Vec<_> = decisions
        .iter()
        .filter(|d| d["trigger_id"] == triggers[0]["trigger_id"] && d["outcome"] == "sent")
        .collect();
    assert_eq!(sent.len(), 1, "{decisions:#?}");
    assert_eq!(sent[0]["channel"], "email");
    let sends = of("send.email", "c-r1");
    assert!(
        sends
            .iter()
            .any(|s| s["send_id"] == sent[0]["send_id"] && s["address"] == "c-r1@example.com"),
        "{sends:#?}"
    );
    // No push or SMS consent: the cascade stops with its reason on record.
    assert!(
        decisions
            .iter()
            .any(|d| d["trigger_id"] == triggers[0]["trigger_id"]
                && d["outcome"] == "cancelled"
                && d["rule"] == "cascade"),
        "{decisions:#?}"
    );
    // c-r2 bought before the reminder: the purchase reaches the arbiter, no cart send.
    let actions = of("customer-actions", "c-r2");
    let purchases = actions.iter().filter(|a| a["kind"] == "purchase").count();
    assert_eq!(purchases, 1, "{actions:#?}");
    assert!(of("triggers", "c-r2")
        .iter()
        .all(|t| t["scenario"] != "abandoned_cart"));
    assert!(of("send.email", "c-r2")
        .iter()
        .all(|s| s["scenario"] != "abandoned_cart"));
}

/// `kairos --config config/kairos.toml <args>`, run from the repository root.
fn kairos(args: &[&str]) -> Command {
    let mut command = Command::new(kairos_bin());
    command
        .current_dir(repo_root())
        .args(["--config", "config/kairos.toml"])
        .args(args);
    command
}

/// The records of a replay's output file.
fn envelopes(output: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(output)
        .expect("output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("envelope"))
        .collect()
}

/// Runs `command` and asserts that it succeeded.
fn run_ok(command: &mut Command) {
    let out = command.output().expect("run kairos");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `kairos replay` over `input` with the settings `env` (environment overrides);
/// returns the output lines, sorted. `label` names its output and state directory.
fn replay_sorted(
    dir: &std::path::Path,
    input: &std::path::Path,
    label: &str,
    env: &[(&str, &str)],
) -> Vec<String> {
    let output = dir.join(format!("out-{label}.jsonl"));
    let state = dir.join(format!("state-{label}"));
    run_ok(
        kairos(&["replay"])
            .arg(input)
            .arg("--output")
            .arg(&output)
            .arg("--state-dir")
            .arg(&state)
            .envs(env.iter().copied()),
    );
    let mut lines: Vec<String> = std::fs::read_to_string(&output)
        .expect("output")
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

/// Generated shop traffic (20,000 events, 2,000 customers, 20 days) in `dir`.
fn generated_traffic(dir: &std::path::Path) -> std::path::PathBuf {
    let input = dir.join("traffic.jsonl");
    run_ok(kairos(&["generate", "--to-file"]).arg(&input).args([
        "--count",
        "20000",
        "--customers",
        "2000",
        "--span-days",
        "20",
    ]));
    input
}

#[test]
fn replay_results_do_not_depend_on_the_batch_size() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Generated shop traffic with identity resolution on: anonymous sessions that log
    // in merge, so the arbiter waits for merged ledgers it sends to itself.
    let input = generated_traffic(dir.path());
    let batch = "KAIROS__STATE__MAX_BATCH_RECORDS";
    let small = replay_sorted(dir.path(), &input, "batch-7", &[(batch, "7")]);
    let large = replay_sorted(dir.path(), &input, "batch-5000", &[(batch, "5000")]);
    let decisions = small
        .iter()
        .filter(|l| l.contains(r#""topic":"decisions""#));
    let merge_waits = small
        .iter()
        .filter(|l| l.contains(r#""rule":"merge_pending""#))
        .count();
    assert!(decisions.count() > 100, "the traffic reaches the arbiter");
    assert!(
        merge_waits > 0 && merge_waits < 200,
        "the traffic makes the arbiter wait for merged ledgers, recorded once per \
         trigger, not once per poll: {merge_waits}"
    );
    assert_eq!(small.len(), large.len());
    assert!(small == large, "the same records whatever the batch size");
}

/// A replay whose processors hold 12 timers in memory per partition (48 per process
/// over the config's four partitions, against thousands per partition here) reads the
/// rest back from RocksDB as it goes, and gives exactly the records of one that holds
/// them all.
#[test]
fn replay_results_do_not_depend_on_how_many_timers_are_held_in_memory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = generated_traffic(dir.path());
    let timers = "KAIROS__STATE__TIMERS_IN_MEMORY";
    let all = replay_sorted(dir.path(), &input, "all-timers", &[(timers, "100000000")]);
    let few = replay_sorted(dir.path(), &input, "few-timers", &[(timers, "48")]);
    let count = |topic: &str| {
        let tag = format!(r#""topic":"{topic}""#);
        all.iter().filter(|l| l.contains(&tag)).count()
    };
    // Timers of every kind fired: chains, waits, cascades.
    assert!(count("triggers") > 500, "{}", count("triggers"));
    assert!(count("decisions") > 500, "{}", count("decisions"));
    assert_eq!(few.len(), all.len());
    assert!(
        few == all,
        "the same records whatever the timers held in memory"
    );
}

#[test]
fn replay_reads_crlf_and_unterminated_lines_and_dead_letters_what_is_not_json() {
    let dir = tempfile::tempdir().expect("temp dir");
    let t0 = 1_767_603_600_000i64; // 2026-01-05T09:00:00Z
    let mut input = Vec::new();
    input.extend_from_slice(&registration("c-l1", t0));
    input.extend_from_slice(b"\r\n\r\n   \n");
    input.extend_from_slice(b"{\"event_id\": \"broken\n");
    input.extend_from_slice(b"\xff\xfe not text\n");
    // The last line has no line ending.
    input.extend_from_slice(&registration("c-l2", t0 + 1_000));
    let path = dir.path().join("events.jsonl");
    std::fs::write(&path, input).expect("write input");
    let lines = replay_sorted(
        dir.path(),
        &path,
        "lines",
        &[("KAIROS__STATE__MAX_BATCH_RECORDS", "100")],
    );
    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("output line is JSON"))
        .collect();
    // Both registrations were read: the one before CRLF and the unterminated last one.
    let mut registered: Vec<&str> = records
        .iter()
        .filter(|r| r["topic"] == "segment-transitions")
        .filter(|r| r["value"]["reason"] == "first event")
        .filter_map(|r| r["value"]["customer_id"].as_str())
        .collect();
    registered.sort();
    assert_eq!(registered, ["c-l1", "c-l2"], "{lines:?}");
    let mut dead: Vec<(String, String)> = records
        .iter()
        .filter(|r| r["topic"] == "deadletter")
        .map(|r| {
            let payload = r["value"]["payload_base64"].as_str().expect("payload");
            (
                r["value"]["reason_code"]
                    .as_str()
                    .expect("reason")
                    .to_string(),
                payload.to_string(),
            )
        })
        .collect();
    dead.sort();
    // Both bad lines, as they were (base64), and nothing for the blank ones.
    let expected = |raw: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(raw)
    };
    let mut want = vec![
        ("not_json".to_string(), expected(b"{\"event_id\": \"broken")),
        ("not_json".to_string(), expected(b"\xff\xfe not text")),
    ];
    want.sort();
    assert_eq!(dead, want, "{lines:?}");
}

/// Per-source exports of one period replay as the topics deliver them, in event time:
/// a till receipt in its own file cancels the cart reminder of a site file's cart, as
/// on Kafka. An envelope whose topic no stage reads stops the replay at its line, and
/// leaves no output.
#[test]
fn replay_merges_its_files_in_event_time_and_refuses_a_topic_no_stage_reads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let t0 = 1_767_603_600_000i64; // 2026-01-05T09:00:00Z
    let site = [
        serde_json::from_slice::<Value>(&registration("c-m1", t0)).expect("json"),
        json!({"event_id": "m-cart", "event_type": "add_to_cart", "occurred_at": t0 + 1_000,
            "customer_id": "c-m1",
            "product": {"product_id": "p42", "name": "Red shoes", "price": 59.9}}),
        // Hours later: long past the cart reminder's delay.
        json!({"event_id": "m-view", "event_type": "page_view", "occurred_at": t0 + 3_600_000,
            "customer_id": "c-m1"}),
    ];
    let till = [
        json!({"event_id": "m-till", "receipt_id": "R-1", "kind": "sale",
        "store_id": "s-1", "occurred_at": t0 + 10_000, "customer_id": "c-m1",
        "total": 59.9, "currency": "EUR",
        "items": [{"product_id": "p42", "quantity": 1, "unit_price": 59.9}]}),
    ];
    let write = |name: &str, lines: &[Value]| {
        let path = dir.path().join(name);
        let text: Vec<String> = lines.iter().map(Value::to_string).collect();
        std::fs::write(&path, text.join("\n")).expect("write input");
        path
    };
    let site = write("site.jsonl", &site);
    let till = write("till.jsonl", &till);
    let output = dir.path().join("out.jsonl");
    run_ok(
        kairos(&["replay"])
            .arg(&site)
            .arg(&till)
            .arg("--output")
            .arg(&output)
            .env("KAIROS__ARBITER__CONTROL_GROUP_PERCENT", "0"),
    );
    let records = envelopes(&output);
    let scenarios: Vec<&str> = records
        .iter()
        .filter(|r| r["topic"] == "triggers")
        .filter_map(|r| r["value"]["scenario"].as_str())
        .collect();
    assert!(scenarios.contains(&"welcome"), "{scenarios:?}");
    assert!(
        !scenarios.contains(&"abandoned_cart"),
        "the receipt came before the reminder was due: {scenarios:?}"
    );
    let bought = records.iter().any(|r| {
        r["topic"] == "segment-transitions"
            && r["value"]["customer_id"] == "c-m1"
            && r["value"]["reason"] == "offline purchase"
    });
    assert!(bought, "the receipt counted");

    let decisions = write(
        "fed-back.jsonl",
        &[json!({"topic": "decisions", "key": "c-m1", "value": {"customer_id": "c-m1"}})],
    );
    let out = kairos(&["replay"])
        .arg(&site)
        .arg(&decisions)
        .arg("--output")
        .arg(dir.path().join("out-2.jsonl"))
        .arg("--state-dir")
        .arg(dir.path().join("state-2"))
        .output()
        .expect("run kairos");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fed-back.jsonl:1") && stderr.contains("\"decisions\""),
        "{stderr}"
    );
    // Written beside the output and renamed when whole: a failed run leaves no
    // output that looks finished, a finished one no leftover.
    for left in ["out-2.jsonl", "out-2.jsonl.partial"] {
        assert!(
            !dir.path().join(left).exists(),
            "a failed replay left {left}"
        );
    }
    assert!(!dir.path().join("out.jsonl.partial").exists());
}

/// A scenario that sends on a channel without a `[delivery.<channel>]` section would
/// publish send commands no worker reads: `check-config` and the arbiter service stop
/// and name the scenario's line; the shipped config passes.
#[test]
fn a_scenario_channel_without_a_delivery_worker_is_a_configuration_error() {
    run_ok(&mut kairos(&["check-config"]));
    let shipped = std::fs::read_to_string(repo_root().join("config/kairos.toml")).unwrap();
    let start = shipped.find("[delivery.sms]\n").expect("an sms section");
    let end = start
        + shipped[start..]
            .find("[delivery.push]\n")
            .expect("push after sms");
    let without_sms = format!("{}{}", &shipped[..start], &shipped[end..]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kairos.toml");
    std::fs::write(&config, &without_sms).unwrap();
    std::os::unix::fs::symlink(
        repo_root().join("config/templates"),
        dir.path().join("templates"),
    )
    .unwrap();
    // The first scenario sending on sms, as the error must name it.
    let line = without_sms
        .lines()
        .position(|l| l.starts_with("channels = ") && l.contains("\"sms\""))
        .expect("a scenario on sms")
        + 1;
    for command in ["check-config", "arbiter"] {
        let mut child = Command::new(kairos_bin())
            .arg("--config")
            .arg(&config)
            .arg(command)
            .env("KAIROS__ARBITER__ADMIN_LISTEN", "127.0.0.1:0")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run kairos");
        // Without the check the arbiter would wait for a broker: stop it, and fail.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while child.try_wait().expect("poll kairos").is_none() {
            if std::time::Instant::now() > deadline {
                child.kill().expect("stop kairos");
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let out = child.wait_with_output().expect("kairos output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command}: {stderr}");
        assert!(
            stderr.contains(&format!("{}:{line}:", config.display()))
                && stderr.contains("no [delivery.sms] section"),
            "{command}: {stderr}"
        );
    }
}

/// A replay numbers its input from the start of its files: over the state an earlier
/// run left (stopped half-way, or the same file again) it would count every visit and
/// order twice, so it refuses that state and touches nothing.
#[test]
fn replay_refuses_a_state_directory_an_earlier_run_left() {
    let dir = tempfile::tempdir().expect("temp dir");
    let t0 = 1_767_603_600_000i64; // 2026-01-05T09:00:00Z
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, registration("c-s1", t0)).expect("write input");
    let state = dir.path().join("state");
    let replay = |output: &str| {
        kairos(&["replay"])
            .arg(&input)
            .arg("--output")
            .arg(dir.path().join(output))
            .arg("--state-dir")
            .arg(&state)
            .output()
            .expect("run kairos")
    };
    let first = replay("first.jsonl");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let left: Vec<_> = std::fs::read_dir(&state).expect("state").collect();
    assert!(!left.is_empty(), "the first run keeps its state");
    let second = replay("second.jsonl");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("--state-dir {} is not empty", state.display())),
        "{stderr}"
    );
    assert!(
        !dir.path().join("second.jsonl").exists(),
        "nothing was replayed"
    );
}

/// An envelope of a later stage's own input (a trigger, for the arbiter) goes to that
/// stage alone, as on Kafka: decided, not dead-lettered by the profile, which never
/// reads that topic. A first line behind a UTF-8 byte order mark is read. An output
/// that is one of the inputs is refused before it empties the input.
#[test]
fn replay_gives_a_trigger_to_the_arbiter_alone_reads_past_a_byte_order_mark_and_keeps_its_input() {
    use kairos_core::contracts::{Channel, Contacts, MessageCategory, Trigger};
    let dir = tempfile::tempdir().expect("temp dir");
    let t0 = 1_767_603_600_000i64; // 2026-01-05T09:00:00Z
    let trigger = Trigger {
        merged_from: Vec::new(),
        trigger_id: "bt-1".into(),
        scenario: "welcome".into(),
        customer_id: "c-t1".into(),
        category: MessageCategory::trigger,
        step: 0,
        template: "welcome".into(),
        channels: vec![Channel::email],
        priority: 50,
        fired_at: t0 + 1_000,
        valid_until: t0 + 86_400_000,
        cause_event_id: Some("e-t1".into()),
        cause_occurred_at: t0 + 1_000,
        contacts: Contacts {
            email: Some("t1@example.com".into()),
            consented_channels: vec![Channel::email],
            ..Contacts::default()
        },
        variables: r#"{"first_name":"Ann"}"#.into(),
    };
    let mut input = b"\xEF\xBB\xBF".to_vec();
    input.extend_from_slice(&registration("c-b1", t0));
    input.push(b'\n');
    let envelope = json!({"topic": "triggers", "key": "c-t1", "value": trigger});
    input.extend_from_slice(envelope.to_string().as_bytes());
    input.push(b'\n');
    let path = dir.path().join("backtest.jsonl");
    std::fs::write(&path, &input).expect("write input");
    // Several files are merged by event time, read line by line their own way.
    let mut second = b"\xEF\xBB\xBF".to_vec();
    second.extend_from_slice(&registration("c-b2", t0 + 500));
    let second_path = dir.path().join("second.jsonl");
    std::fs::write(&second_path, &second).expect("write input");
    let records: Vec<Value> = replay_sorted(
        dir.path(),
        &path,
        "envelope",
        &[("KAIROS__ARBITER__CONTROL_GROUP_PERCENT", "0")],
    )
    .iter()
    .map(|l| serde_json::from_str(l).expect("output line is JSON"))
    .collect();
    let dead: Vec<&Value> = records
        .iter()
        .filter(|r| r["topic"] == "deadletter")
        .collect();
    assert!(dead.is_empty(), "{dead:#?}");
    let decided: Vec<&Value> = records
        .iter()
        .filter(|r| r["topic"] == "decisions" && r["value"]["trigger_id"] == "bt-1")
        .collect();
    assert_eq!(decided.len(), 1, "{records:#?}");
    assert_eq!(decided[0]["value"]["outcome"], "sent", "{decided:#?}");
    let first_seen = records.iter().any(|r| {
        r["topic"] == "segment-transitions"
            && r["value"]["customer_id"] == "c-b1"
            && r["value"]["reason"] == "first event"
    });
    assert!(first_seen, "the line behind the byte order mark was read");
    let output = dir.path().join("out-merged.jsonl");
    run_ok(
        kairos(&["replay"])
            .arg(&path)
            .arg(&second_path)
            .arg("--output")
            .arg(&output)
            .arg("--state-dir")
            .arg(dir.path().join("state-merged"))
            .env("KAIROS__ARBITER__CONTROL_GROUP_PERCENT", "0"),
    );
    let merged = envelopes(&output);
    let dead: Vec<&Value> = merged
        .iter()
        .filter(|r| r["topic"] == "deadletter")
        .collect();
    assert!(dead.is_empty(), "{dead:#?}");
    for customer in ["c-b1", "c-b2"] {
        let seen = merged.iter().any(|r| {
            r["topic"] == "segment-transitions"
                && r["value"]["customer_id"] == customer
                && r["value"]["reason"] == "first event"
        });
        assert!(
            seen,
            "{customer}: the line behind the byte order mark was read"
        );
    }

    let out = kairos(&["replay"])
        .arg(&path)
        .arg("--output")
        .arg(dir.path().join(".").join("backtest.jsonl"))
        .arg("--state-dir")
        .arg(dir.path().join("state-same"))
        .output()
        .expect("run kairos");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("would be emptied"), "{stderr}");
    assert_eq!(std::fs::read(&path).expect("input"), input, "input kept");
}
