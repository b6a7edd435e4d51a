//! Observability proofs: the metrics the Prometheus rules and Grafana dashboards use
//! exist on the running services, and conversions and lift on feedback's /metrics equal
//! hand-computed values.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kairos_tests::{json, registration, repo_root, sample, Options, Pipeline, SERVICES};
use serde_json::{json as j, Value};

/// The words of a rule or dashboard file that could name a metric: runs of letters,
/// digits, `_` and `:` (recording-rule names are `level:metric:operation`).
fn name_tokens(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
}

/// Every raw `kairos_*` metric name in a rule or dashboard file. Recording-rule names
/// (`level:metric:operation`) contain colons and are not raw metrics, so they are left out.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    name_tokens(text)
        .filter(|token| token.len() > "kairos_".len() && token.starts_with("kairos_"))
        .filter(|token| !token.contains(':'))
        .map(str::to_string)
        .collect()
}

/// Metric names in a Prometheus text exposition (samples, so histogram series appear
/// as `_bucket`, `_sum` and `_count`, and the `# TYPE` family names).
fn exposed_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split_whitespace().next() {
                names.insert(name.to_string());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            if let Some(name) = line.split(['{', ' ']).next() {
                names.insert(name.to_string());
            }
        }
    }
    names
}

fn files_under(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == extension) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Every recording-rule name (`level:metric:operation`) a rule or dashboard file uses.
fn recording_rule_names_in(text: &str) -> BTreeSet<String> {
    name_tokens(text)
        .filter(|token| token.matches(':').count() == 2 && token.contains(":kairos_"))
        .map(str::to_string)
        .collect()
}

/// A dashboard panel or an alert that names a recording rule nobody records stays
/// empty without an error anywhere, so every name used must be recorded.
#[test]
fn every_recording_rule_the_alerts_and_dashboards_use_is_recorded() {
    let root = repo_root();
    let recording =
        std::fs::read_to_string(root.join("deploy/prometheus/rules/kairos-recording.yml"))
            .expect("read the recording rules");
    let recorded: BTreeSet<String> = recording
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record:"))
        .map(|name| name.trim().to_string())
        .collect();
    assert!(
        recorded.len() >= 20,
        "too few recording rules found: {recorded:?}"
    );
    let mut users = files_under(&root.join("deploy/grafana/dashboards"), "json");
    users.push(root.join("deploy/prometheus/rules/kairos-alerts.yml"));
    users.push(root.join("deploy/prometheus/rules/kairos-recording.yml"));
    let mut used = BTreeSet::new();
    for file in &users {
        let text = std::fs::read_to_string(file).expect("read a rule or dashboard file");
        used.extend(recording_rule_names_in(&text));
    }
    assert!(
        used.contains("scenario_channel:kairos_open_rate:ratio_1d"),
        "the parser missed a name the alerts use: {used:?}"
    );
    let missing: Vec<&String> = used.difference(&recorded).collect();
    assert!(
        missing.is_empty(),
        "recording rules used but never recorded: {missing:?}"
    );
}

#[test]
fn every_metric_in_rules_alerts_and_dashboards_is_exposed_by_a_running_service() {
    let root = repo_root();
    let mut sources = files_under(&root.join("deploy/prometheus/rules"), "yml");
    let dashboards = files_under(&root.join("deploy/grafana/dashboards"), "json");
    assert!(
        !sources.is_empty(),
        "no rule files under deploy/prometheus/rules"
    );
    assert!(
        !dashboards.is_empty(),
        "no dashboards under deploy/grafana/dashboards"
    );
    sources.extend(dashboards);
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in &sources {
        let text = std::fs::read_to_string(file).expect("read rule or dashboard file");
        if file.extension().is_some_and(|e| e == "json") {
            serde_json::from_str::<Value>(&text)
                .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", file.display()));
        }
        for name in metric_names_in(&text) {
            wanted.entry(name).or_default().push(
                file.strip_prefix(&root)
                    .unwrap_or(file)
                    .display()
                    .to_string(),
            );
        }
    }
    assert!(
        wanted.len() >= 20,
        "suspiciously few metric names found in the rules and dashboards: {:?}",
        wanted.keys()
    );

    // Every service, the identity processor included.
    let mut services = SERVICES.to_vec();
    services.push("identity");
    let p = Pipeline::start(Options {
        env: vec![("KAIROS__IDENTITY__ENABLED".into(), "true".into())],
        services: services.clone(),
        ..Options::default()
    });
    let mut exposed = BTreeSet::new();
    let scrapes_dir = p.dir.path().join("scrapes");
    std::fs::create_dir_all(&scrapes_dir).expect("scrapes dir");
    for service in services {
        let text = p.metrics(service);
        exposed.extend(exposed_names(&text));
        // The exposition itself must be valid Prometheus text.
        let file = scrapes_dir.join(format!("{service}.prom"));
        std::fs::write(&file, &text).expect("write scrape");
        let check = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&file).expect("open scrape"))
            .output()
            .expect("run promtool (make test installs it)");
        let report = String::from_utf8_lossy(&check.stderr).to_string()
            + &String::from_utf8_lossy(&check.stdout);
        // Exit 1 is a parse error, 3 a lint problem (a counter without `_total`, a
        // metric without help): both fail.
        assert!(
            check.status.success(),
            "promtool check metrics rejects the /metrics of {service} ({}): {report}",
            check.status
        );
    }
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(name, _)| !exposed.contains(*name))
        .map(|(name, files)| format!("{name} (used in {})", files.join(", ")))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics used by rules or dashboards but exposed by no service:\n{}",
        missing.join("\n")
    );
}

/// 2026-01-05T09:00:00Z: a fixed event time, so the run is the same every time.
const T0: i64 = 1_767_603_600_000;
const HOUR: i64 = 3_600_000;

fn online_purchase(event_id: &str, customer: &str, at: i64, total: f64) -> Vec<u8> {
    json(j!({
        "event_id": event_id,
        "event_type": "purchase",
        "occurred_at": at,
        "customer_id": customer,
        "order": {"order_id": format!("o-{event_id}"), "total": total, "currency": "EUR"},
    }))
}

fn offline_purchase(event_id: &str, customer: &str, at: i64, total: f64) -> Vec<u8> {
    json(j!({
        "event_id": event_id, "occurred_at": at, "receipt_id": format!("r-{event_id}"),
        "kind": "sale", "store_id": "s1", "customer_id": customer,
        "items": [{"product_id": "p1", "quantity": 1, "unit_price": total}],
        "total": total, "currency": "EUR"
    }))
}

fn wait_for_metric(p: &Pipeline, metric: &str, labels: &[&str], want: f64) -> String {
    wait_for_feedback(p, |text| {
        let got = sample(text, metric, labels);
        (got == want)
            .then_some(())
            .ok_or(format!("{metric}{labels:?} is {got}, expected {want}"))
    })
}

/// Feedback's `/metrics` once `settled` accepts it (else it says what it is waiting for),
/// within a minute.
fn wait_for_feedback(p: &Pipeline, settled: impl Fn(&str) -> Result<(), String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = p.metrics("feedback");
        let waiting = match settled(&text) {
            Ok(()) => return text,
            Err(waiting) => waiting,
        };
        assert!(
            Instant::now() < deadline,
            "{waiting}; feedback log:\n{}",
            p.log("feedback")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_close(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() < 1e-9,
        "{what}: /metrics says {actual}, hand-computed {expected}"
    );
}

#[test]
fn conversions_and_lift_of_a_holdout_scenario_equal_the_hand_computed_values() {
    let p = Pipeline::start(Options {
        services: vec!["profile", "arbiter", "feedback"],
        env: vec![("KAIROS__CLOCK__MODE".into(), "event".into())],
        extra_config: r#"
[[scenarios]]
name = "welcome"
kind = "welcome"
channels = ["email"]
template = "welcome"
valid_for = "1d"
holdout_percent = 50
"#
        .into(),
        ..Options::default()
    });
    let customers: Vec<String> = (0..60).map(|i| format!("lift-{i:02}")).collect();
    let registrations: Vec<(&str, Vec<u8>)> = customers
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), registration(c, T0 + i as i64 * 1000)))
        .collect();
    p.produce("events.site", &registrations);

    // Every registration ends in one welcome decision: sent, or held out by the 50%
    // scenario holdout.
    let decisions = p.read_json_until("decisions", Duration::from_secs(60), |v| {
        v.iter().filter(|d| d["scenario"] == "welcome").count() >= customers.len()
    });
    let mut treated = BTreeMap::new();
    let mut held_out = BTreeMap::new();
    for d in decisions.iter().filter(|d| d["scenario"] == "welcome") {
        let customer = d["customer_id"].as_str().expect("customer id").to_string();
        let at = d["decided_at"].as_i64().expect("decided_at");
        match d["outcome"].as_str() {
            Some("sent") => treated.insert(customer, at),
            Some("held_out") => {
                assert_eq!(d["rule"], "scenario_holdout");
                held_out.insert(customer, at)
            }
            other => panic!("unexpected decision {other:?}: {d}"),
        };
    }
    assert_eq!(treated.len() + held_out.len(), customers.len());
    assert!(
        treated.len() >= 15 && held_out.len() >= 15,
        "a 50% holdout of 60 customers: {} sent, {} held out",
        treated.len(),
        held_out.len()
    );
    // Purchases must meet the touches: wait until feedback has seen every decision.
    wait_for_metric(
        &p,
        "kairos_attribution_touches_total",
        &["scenario=\"welcome\""],
        customers.len() as f64,
    );

    // The known purchases and what they must count for, computed by hand.
    let mut site = Vec::new();
    let mut shop = Vec::new();
    let (mut conversions, mut revenue) = ([0u64; 2], [0f64; 2]);
    let mut purchases = 0u64;
    for (group, members) in [(0, &treated), (1, &held_out)] {
        for (n, (customer, decided_at)) in members.iter().enumerate() {
            let id = |k: &str| format!("{customer}-{k}");
            match n % 4 {
                // Buys 1 h after the touch: a conversion.
                0 => {
                    let total = 100.0 + n as f64;
                    site.push((
                        customer.clone(),
                        online_purchase(&id("a"), customer, decided_at + HOUR, total),
                    ));
                    conversions[group] += 1;
                    revenue[group] += total;
                    purchases += 1;
                }
                // Buys twice in the window, once in a shop: one conversion, both revenues.
                1 if group == 0 || n % 8 == 1 => {
                    site.push((
                        customer.clone(),
                        online_purchase(&id("b1"), customer, decided_at + 2 * HOUR, 30.0),
                    ));
                    shop.push((
                        customer.clone(),
                        offline_purchase(&id("b2"), customer, decided_at + 70 * HOUR, 12.5),
                    ));
                    conversions[group] += 1;
                    revenue[group] += 42.5;
                    purchases += 2;
                }
                // Buys after the 72 h window: a purchase, no conversion.
                2 => {
                    site.push((
                        customer.clone(),
                        online_purchase(&id("c"), customer, decided_at + 73 * HOUR, 80.0),
                    ));
                    purchases += 1;
                }
                _ => {}
            }
        }
    }
    // A redelivered purchase (same event id) counts once.
    let duplicate = site[0].clone();
    site.push(duplicate);
    p.produce("events.site", &site);
    p.produce("events.offline", &shop);

    // Every record reached feedback (the duplicate too), and it counted the purchases once.
    let site_topic = format!("topic=\"{}\"", p.topic("events.site"));
    let offline_topic = format!("topic=\"{}\"", p.topic("events.offline"));
    wait_for_metric(
        &p,
        "kairos_input_records_total",
        &[&site_topic],
        (customers.len() + site.len()) as f64,
    );
    wait_for_metric(
        &p,
        "kairos_input_records_total",
        &[&offline_topic],
        shop.len() as f64,
    );
    wait_for_metric(&p, "kairos_purchases_total", &[], purchases as f64);
    // A purchase waits `feedback.attribution_delay` on the clock the input moves (event
    // time here): a heartbeat on every partition, after every purchase was read, lets
    // the last ones through.
    let partitions = 4;
    let heartbeats: Vec<(String, Vec<u8>)> = (0..partitions)
        .map(|partition| {
            let key = (0..)
                .map(|n| format!("heartbeat-{n}"))
                .find(|k| kairos_core::replay::partition_for(k.as_bytes(), partitions) == partition)
                .expect("a key for every partition");
            let beat = json(j!({"event_id": format!("hb-{partition}"),
                "event_type": "heartbeat", "occurred_at": T0 + 200 * HOUR}));
            (key, beat)
        })
        .collect();
    p.produce("events.site", &heartbeats);
    let expected_revenue = revenue[0] + revenue[1];
    let text = wait_for_feedback(&p, |text| {
        let welcome = ["scenario=\"welcome\""];
        let conversions_now = sample(text, "kairos_conversions_total", &welcome);
        let revenue_now = sample(text, "kairos_conversion_revenue_total", &welcome);
        let settled = conversions_now == (conversions[0] + conversions[1]) as f64
            && (revenue_now - expected_revenue).abs() < 1e-9;
        settled.then_some(()).ok_or(format!(
            "{conversions_now} conversions, revenue {revenue_now}"
        ))
    });
    let metric = |name: &str, labels: &[&str]| sample(&text, name, labels);
    let groups = ["group=\"treatment\"", "group=\"control\""];
    let sizes = [treated.len() as f64, held_out.len() as f64];
    for g in 0..2 {
        let labels = ["scenario=\"welcome\"", groups[g]];
        assert_eq!(
            metric("kairos_attribution_touches_total", &labels),
            sizes[g],
            "{}",
            groups[g]
        );
        assert_eq!(
            metric("kairos_conversions_total", &labels),
            conversions[g] as f64,
            "conversions of {}",
            groups[g]
        );
        // One touch per customer: the scenario's conversions are the same ones.
        assert_eq!(
            metric("kairos_scenario_conversions_total", &labels),
            conversions[g] as f64,
            "scenario conversions of {}",
            groups[g]
        );
        assert_close(
            metric("kairos_conversion_revenue_total", &labels),
            revenue[g],
            &format!("attributed revenue of {}", groups[g]),
        );
        assert_close(
            metric("kairos_scenario_conversion_rate", &labels),
            conversions[g] as f64 / sizes[g],
            &format!("conversion rate of {}", groups[g]),
        );
    }
    let rate = |g: usize| conversions[g] as f64 / sizes[g];
    assert!(
        rate(1) > 0.0,
        "the control group needs conversions for a lift"
    );
    assert_close(
        metric("kairos_scenario_lift_ratio", &["scenario=\"welcome\""]),
        rate(0) / rate(1) - 1.0,
        "lift",
    );
    assert_eq!(
        metric(
            "kairos_decisions_total",
            &[
                "scenario=\"welcome\"",
                "outcome=\"held_out\"",
                "rule=\"scenario_holdout\""
            ]
        ),
        sizes[1]
    );
}

/// Input the broker deletes before a stopped service read it (here the embedded
/// broker's 5 MiB per partition, as retention would on a cluster) is not skipped in
/// silence: the service, started again, reads on from the earliest record left, counts
/// the reset for the topic and logs the loss as an error.
#[test]
fn input_deleted_before_it_was_read_is_counted_and_logged_as_lost() {
    let mut p = Pipeline::start(Options {
        services: vec!["profile"],
        ..Options::default()
    });
    let site = p.topic("events.site");
    let t = kairos_tests::now_millis();
    let first: Vec<(&str, Vec<u8>)> = (0..5)
        .map(|i| {
            (
                "c-lost",
                json(
                    j!({"event_id": format!("lost-{i}"), "event_type": "page_view",
                         "occurred_at": t + i, "customer_id": "c-lost"}),
                ),
            )
        })
        .collect();
    p.produce("events.site", &first);
    p.wait_caught_up("profile", &["events.site"], Duration::from_secs(60));
    let counted = |p: &Pipeline| {
        sample(
            &p.metrics("profile"),
            "kairos_input_offset_resets_total",
            &[&format!("topic=\"{site}\"")],
        )
    };
    assert_eq!(counted(&p), 0.0);
    let (status, _) = p.terminate("profile");
    assert!(status.success(), "{status}");
    // Six MiB more into the same partition while the profile is stopped: the broker
    // drops the oldest batches, the ones after its committed offset among them.
    let padding = "x".repeat(1000);
    let more: Vec<(&str, Vec<u8>)> = (0..6_300)
        .map(|i| {
            (
                "c-lost",
                json(
                    j!({"event_id": format!("more-{i}"), "event_type": "page_view",
                         "occurred_at": t + 10 + i, "customer_id": "c-lost",
                         "page_url": format!("https://shop.example/{padding}")}),
                ),
            )
        })
        .collect();
    p.produce("events.site", &more);
    p.spawn("profile");
    p.wait_ready("profile", Duration::from_secs(60));
    p.wait_caught_up("profile", &["events.site"], Duration::from_secs(120));
    assert_eq!(counted(&p), 1.0, "{}", p.log("profile"));
    let log = p.log("profile");
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("input lost") && l.contains(&site)),
        "{log}"
    );
    // What was left was read: the reset went on from the earliest record, not the end.
    let read = sample(
        &p.metrics("profile"),
        "kairos_input_records_total",
        &[&format!("topic=\"{site}\"")],
    );
    assert!(read > 1_000.0 && read < 6_300.0, "{read}");
}
