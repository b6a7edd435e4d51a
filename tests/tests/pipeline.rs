//! The whole pipeline as real processes on a real Kafka-protocol broker.

use std::time::Duration;

use base64::Engine as _;
use kairos_tests::{json, now_millis, registration, sample, Options, Pipeline, SERVICES};
use serde_json::{json as j, Value};

fn add_to_cart(customer: &str, at: i64) -> Vec<u8> {
    json(j!({
        "event_id": format!("cart-{customer}"),
        "event_type": "add_to_cart",
        "occurred_at": at,
        "customer_id": customer,
        "product": {"product_id": "p42", "name": "Red shoes", "price": 59.9}
    }))
}

fn sends_for<'a>(sends: &'a [Value], customer: &str) -> Vec<&'a Value> {
    sends
        .iter()
        .filter(|s| s["customer_id"] == customer)
        .collect()
}

#[test]
fn abandoned_cart_becomes_an_email_send_with_outcomes_and_metrics() {
    // The reminder waits long enough for the buyer's receipt, produced just after the
    // carts, to be read first on a loaded machine (its timer fires on the wall clock).
    let mut p = Pipeline::start(Options {
        cart_delay: "6s",
        ..Options::default()
    });
    let t = now_millis();
    p.produce(
        "events.site",
        &[
            ("c-abandon", registration("c-abandon", t)),
            ("c-abandon", add_to_cart("c-abandon", t + 1)),
            ("c-buyer", registration("c-buyer", t)),
            ("c-buyer", add_to_cart("c-buyer", t + 1)),
        ],
    );
    // The buyer pays in a shop before the 6 s reminder delay is over.
    p.produce(
        "events.offline",
        &[(
            "c-buyer",
            json(j!({
                "event_id": "receipt-1", "occurred_at": t + 2, "receipt_id": "r1",
                "kind": "sale", "store_id": "s1", "customer_id": "c-buyer",
                "items": [{"product_id": "p42", "quantity": 1, "unit_price": 59.9}],
                "total": 59.9, "currency": "EUR"
            })),
        )],
    );

    let sends = p.read_json_until("send.email", Duration::from_secs(60), |v| {
        !sends_for(v, "c-abandon").is_empty()
    });
    let mine = sends_for(&sends, "c-abandon");
    assert_eq!(mine.len(), 1, "exactly one reminder: {sends:?}");
    let send = mine[0];
    assert_eq!(send["scenario"], "abandoned_cart");
    assert_eq!(send["channel"], "email");
    assert_eq!(send["address"], "c-abandon@example.com");
    let vars: Value = serde_json::from_str(send["variables"].as_str().unwrap()).unwrap();
    assert_eq!(vars["cart_items"][0]["product_id"], "p42");
    assert_eq!(vars["first_name"], "Anna");
    let send_id = send["send_id"].as_str().unwrap().to_string();

    let outcomes = p.read_json_until("outcomes", Duration::from_secs(30), |v| {
        let kinds: Vec<&Value> = v
            .iter()
            .filter(|o| o["send_id"] == send_id.as_str())
            .map(|o| &o["kind"])
            .collect();
        kinds.contains(&&j!("sent")) && kinds.contains(&&j!("delivered"))
    });
    let kinds: Vec<String> = outcomes
        .iter()
        .filter(|o| o["send_id"] == send_id.as_str())
        .map(|o| o["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.contains(&"sent".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"delivered".to_string()), "{kinds:?}");

    // Feedback counts them on /metrics.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = p.metrics("feedback");
        let delivered = sample(
            &m,
            "kairos_message_outcomes_total",
            &[
                "kind=\"delivered\"",
                "scenario=\"abandoned_cart\"",
                "channel=\"email\"",
            ],
        );
        if delivered >= 1.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "feedback never counted the delivery:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // Still one reminder once the arbiter has read every trigger (the read above
    // stops at the first).
    p.wait_caught_up("arbiter", &["triggers"], Duration::from_secs(60));
    let all_sends = p.read_all_json("send.email");
    assert_eq!(sends_for(&all_sends, "c-abandon").len(), 1, "{all_sends:?}");
    // The arbiter counts the send commands the broker took, as many as the topic
    // holds (its only writer).
    let topic = format!("topic=\"{}\"", p.topic("send.email"));
    assert_eq!(
        sample(
            &p.metrics("arbiter"),
            "kairos_output_records_total",
            &[&topic]
        ),
        all_sends.len() as f64
    );

    // The decision is on record with its rule.
    let decisions = p.read_json_until("decisions", Duration::from_secs(10), |v| {
        v.iter().any(|d| d["customer_id"] == "c-abandon")
    });
    let d = decisions
        .iter()
        .find(|d| d["customer_id"] == "c-abandon")
        .unwrap();
    assert_eq!(d["outcome"], "sent");
    assert_eq!(d["send_id"], send_id.as_str());

    // `kairos explain` tells the story from Kafka: the trigger, the decision with its
    // rule and reason, and the arbiter's ledger with the send.
    let out = p.run_kairos(&["explain", "c-abandon"], &[]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "explain failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Run with another partition count than the topics', it says so instead of
    // reading the wrong partition.
    let elsewhere = p.run_kairos(
        &["explain", "c-abandon"],
        &[("KAIROS__KAFKA__PARTITIONS", "7")],
    );
    let refusal = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(!elsewhere.status.success(), "{refusal}");
    assert!(refusal.contains("partitions = 7"), "{refusal}");
    let trigger_line = format!(
        "trigger {}: abandoned_cart step 0",
        d["trigger_id"].as_str().unwrap()
    );
    assert!(report.contains(&trigger_line), "{report}");
    assert!(
        report.contains(&format!("sent on email send {send_id} by channel_choice: ")),
        "{report}"
    );
    // Under the decision, what became of the send: the worker's and provider's outcomes.
    let after_send = report
        .split_once(&format!("send {send_id} by"))
        .map(|(_, rest)| rest.lines().skip(1).take(2).collect::<Vec<_>>())
        .unwrap_or_default();
    assert!(
        after_send.len() == 2
            && after_send[0]
                .trim_start()
                .ends_with(" sent to c-abandon@example.com")
            && after_send[1]
                .trim_start()
                .ends_with(" delivered to c-abandon@example.com"),
        "{report}"
    );
    assert!(
        report.contains("sends in the last 7 days {\"email\": 1}"),
        "{report}"
    );

    // The offline purchase cancelled the buyer's reminder: no trigger, no send, even
    // well after the delay.
    std::thread::sleep(Duration::from_secs(4));
    let triggers = p.read_json_until("triggers", Duration::from_secs(5), |_| false);
    assert!(
        triggers.iter().all(|t| t["customer_id"] != "c-buyer"),
        "purchase must cancel the reminder: {triggers:?}"
    );
    assert_eq!(
        triggers
            .iter()
            .filter(|t| t["customer_id"] == "c-abandon")
            .count(),
        1
    );

    // Graceful shutdown: SIGTERM ends every service cleanly and promptly.
    for s in SERVICES {
        let (status, took) = p.terminate(s);
        assert!(status.success(), "{s} exited with {status}:\n{}", p.log(s));
        assert!(took < Duration::from_secs(30), "{s} took {took:?} to stop");
        assert!(
            p.log(s).contains("stopped cleanly"),
            "{s} log:\n{}",
            p.log(s)
        );
    }
}

#[test]
fn malformed_input_goes_to_the_dead_letter_topic_and_the_pipeline_keeps_going() {
    let p = Pipeline::start(Options::default());
    let t = now_millis();
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("c-dl", b"this is not json".to_vec()),
        (
            "c-dl",
            json(
                j!({"event_id": "x1", "event_type": "teleport", "occurred_at": t, "customer_id": "c-dl"}),
            ),
        ),
        (
            "c-dl",
            json(j!({"event_type": "page_view", "occurred_at": t, "customer_id": "c-dl"})),
        ),
    ];
    p.produce("events.site", &bad);
    p.produce(
        "events.site",
        &[
            ("c-dl", registration("c-dl", t)),
            ("c-dl", add_to_cart("c-dl", t + 1)),
        ],
    );
    let letters = p.read_json_until("deadletter", Duration::from_secs(30), |v| v.len() >= 3);
    assert_eq!(letters.len(), 3, "{letters:?}");
    let reasons: Vec<&str> = letters
        .iter()
        .map(|l| l["reason_code"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["not_json", "unknown_event_type", "missing_field"]);
    let b64 = base64::engine::general_purpose::STANDARD;
    for (letter, (_, raw)) in letters.iter().zip(&bad) {
        assert_eq!(letter["source_topic"], p.topic("events.site"));
        assert_eq!(letter["service"], "profile");
        assert!(letter["source_offset"].as_i64().unwrap() >= 0);
        assert!(!letter["reason"].as_str().unwrap().is_empty());
        let bytes = b64
            .decode(letter["payload_base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(&bytes, raw, "raw bytes are kept");
    }
    assert!(letters[2]["reason"].as_str().unwrap().contains("event_id"));
    // The good events behind the bad ones still made it through.
    let sends = p.read_json_until("send.email", Duration::from_secs(60), |v| {
        !sends_for(v, "c-dl").is_empty()
    });
    assert_eq!(sends_for(&sends, "c-dl").len(), 1);
    // Counted again once the profile has read every event and the arbiter every
    // trigger: the reads above stop at the first match.
    p.wait_caught_up("profile", &["events.site"], Duration::from_secs(60));
    p.wait_caught_up("arbiter", &["triggers"], Duration::from_secs(60));
    assert_eq!(p.read_all_json("deadletter").len(), 3);
    let all_sends = p.read_all_json("send.email");
    assert_eq!(sends_for(&all_sends, "c-dl").len(), 1, "{all_sends:?}");
    let m = p.metrics("profile");
    assert_eq!(
        sample(&m, "kairos_dead_letters_total", &["reason=\"not_json\""]),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "kairos_dead_letters_total",
            &["reason=\"unknown_event_type\""]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "kairos_dead_letters_total",
            &["reason=\"missing_field\""]
        ),
        1.0
    );
}

#[test]
fn every_service_exposes_metrics_that_pass_promtool() {
    let p = Pipeline::start(Options::default());
    let t = now_millis();
    // Some traffic first, so labelled series exist.
    p.produce(
        "events.site",
        &[
            ("c-m", registration("c-m", t)),
            ("c-m", add_to_cart("c-m", t)),
        ],
    );
    let outcomes = p.read_json_until("outcomes", Duration::from_secs(60), |v| v.len() >= 2);
    assert!(
        outcomes.len() >= 2,
        "the traffic went through: {outcomes:?}"
    );
    for s in SERVICES {
        let text = p.metrics(s);
        assert!(text.contains("kairos_input_records_total"), "{s}:\n{text}");
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool is installed (make test installs Debian's prometheus package)");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics failed for {s}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for path in ["/healthz", "/readyz"] {
            let (status, _) = kairos_tests::http_get(p.admin(s), path).unwrap();
            assert_eq!(status, 200, "{s}{path}");
        }
    }
}

/// Identity resolution with every service as a real process: an anonymous cart, a
/// login on the same browser, and a loyalty-card-only till receipt of another customer
/// that ends that customer's cart reminder.
#[test]
fn identity_stitches_an_anonymous_cart_to_the_customer_who_logs_in() {
    let p = Pipeline::start(Options {
        env: vec![
            ("KAIROS__IDENTITY__ENABLED".into(), "true".into()),
            ("KAIROS__IDENTITY__DEFAULT_COUNTRY".into(), "DE".into()),
        ],
        services: vec!["identity", "profile", "arbiter", "deliver-email"],
        // Time for the card-only receipt, produced after the carts, to pass through
        // identity and reach the profile before c-card's reminder falls due.
        cart_delay: "6s",
        ..Options::default()
    });
    // c-card's first receipt (yesterday) names the customer and links the card.
    let receipt = |id: &str, ids: Value, at: i64| {
        let mut r = j!({
            "event_id": id, "occurred_at": at, "receipt_id": id, "kind": "sale",
            "store_id": "s1", "items": [{"product_id": "p1", "quantity": 1, "unit_price": 5.0}],
            "total": 5.0, "currency": "EUR"
        });
        if let (Some(o), Value::Object(more)) = (r.as_object_mut(), ids) {
            o.extend(more);
        }
        json(r)
    };
    p.produce(
        "events.offline",
        &[(
            "c-card",
            receipt(
                "till-1",
                j!({"customer_id": "c-card", "loyalty_card": "LC 77"}),
                now_millis() - 86_400_000,
            ),
        )],
    );
    p.read_json_until("customer-actions", Duration::from_secs(30), |v| {
        v.iter().any(|a| a["order_id"] == "till-1")
    });
    let cart = |event_id: &str, key: (&str, &str), at: i64| {
        json(j!({
            "event_id": event_id, "event_type": "add_to_cart", "occurred_at": at,
            key.0: key.1,
            "product": {"product_id": "p42", "name": "Red shoes", "price": 59.9}
        }))
    };
    let t = now_millis();
    p.produce(
        "events.site",
        &[
            (
                "cookie-1",
                cart("anon-cart", ("anonymous_id", "cookie-1"), t),
            ),
            (
                "cookie-1",
                json(j!({
                    "event_id": "login-1", "event_type": "login", "occurred_at": t + 1,
                    "anonymous_id": "cookie-1", "customer_id": "c-stitched",
                    "email": " Stitched@Example.COM ",
                    "consent": {"channel": "email", "granted": true}
                })),
            ),
            ("c-card", registration("c-card", t)),
            (
                "c-card",
                cart("card-cart", ("customer_id", "c-card"), t + 1),
            ),
        ],
    );
    // Before the 6 s reminder, c-card pays in a shop showing only the card.
    std::thread::sleep(Duration::from_millis(300));
    p.produce(
        "events.offline",
        &[(
            "LC77",
            receipt("till-2", j!({"loyalty_card": "lc-77"}), now_millis()),
        )],
    );
    let sends = p.read_json_until("send.email", Duration::from_secs(60), |v| {
        !sends_for(v, "c-stitched").is_empty()
    });
    let mine = sends_for(&sends, "c-stitched");
    assert_eq!(
        mine.len(),
        1,
        "one reminder for the stitched customer: {sends:?}"
    );
    assert_eq!(mine[0]["scenario"], "abandoned_cart");
    assert_eq!(mine[0]["address"], "stitched@example.com");
    let vars: Value = serde_json::from_str(mine[0]["variables"].as_str().unwrap()).unwrap();
    assert_eq!(vars["cart_items"][0]["product_id"], "p42");
    // Nothing for the anonymous profile, and the card-only purchase ended c-card's.
    std::thread::sleep(Duration::from_secs(3));
    p.wait_caught_up("profile", &["identified-events"], Duration::from_secs(60));
    p.wait_caught_up("arbiter", &["triggers"], Duration::from_secs(60));
    // Not even a trigger: the merge ended the anonymous profile's wait (a reminder
    // of it would only be suppressed for want of an address).
    let triggers = p.read_all_json("triggers");
    assert!(
        triggers.iter().all(|t| t["customer_id"] != "anon:cookie-1"),
        "{triggers:?}"
    );
    let sends = p.read_all_json("send.email");
    assert!(
        sends.iter().all(|s| s["customer_id"] != "anon:cookie-1"),
        "{sends:?}"
    );
    assert!(sends_for(&sends, "c-card").is_empty(), "{sends:?}");
    assert_eq!(
        sends_for(&sends, "c-stitched").len(),
        1,
        "still one: {sends:?}"
    );
    // The card-only receipt was c-card's purchase.
    let actions = p.read_all_json("customer-actions");
    assert!(
        actions.iter().any(|a| a["kind"] == "purchase"
            && a["customer_id"] == "c-card"
            && a["order_id"] == "till-2"),
        "{actions:?}"
    );
    let changes = p.read_all_json("identity-changes");
    assert!(
        changes.iter().any(|c| c["kind"] == "merged"
            && c["customer_id"] == "c-stitched"
            && c["merged_from"] == "anon:cookie-1"),
        "{changes:?}"
    );
    let metrics = p.metrics("identity");
    assert_eq!(
        sample(
            &metrics,
            "kairos_identity_merges_total",
            &["kind=\"stitch\""]
        ),
        1.0
    );
}
