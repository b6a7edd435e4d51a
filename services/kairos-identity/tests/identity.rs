//! Identity resolution in event time, in process: the identity processor in front of
//! the profile processor and the arbiter, wired as on Kafka (the same engine and
//! stores), fed raw site, app and offline events keyed by whatever the producer had.

use std::path::Path;
use std::sync::Arc;

use kairos_core::config::Config;
use kairos_core::contracts::{Channel, IdentityChange, IdentityChangeKind, SendCommand, Trigger};
use kairos_core::encoding::SchemaRegistry;
use kairos_core::replay::Replayer;
use kairos_core::store::OutboxEntry;
use kairos_core::time::{ClockMode, Millis, DAY, HOUR, MINUTE};
use kairos_identity::IdentityProcessor;
use kairos_profile::pipeline::Pipeline;
use serde_json::{json, Value};

const CONFIG: &str = r#"
[kafka]
partitions = 3

[state]
max_batch_records = 1

[clock]
mode = "event"

[identity]
enabled = true
default_country = "DE"
merge_on = ["email", "loyalty_card"]
max_customers_per_identifier = 2

[arbiter]
control_group_percent = 0
daily_cap = 2
min_gap = "0s"
conflict_window = "0s"

[[scenarios]]
name = "abandoned_cart"
kind = "abandoned_cart"
channels = ["email"]
template = "abandoned_cart"
delay = "1h"
valid_for = "12h"
priority = 80

[[scenarios]]
name = "welcome"
kind = "welcome"
channels = ["email", "sms"]
template = "welcome"
delay = "0s"
tolerance = "1d"
exit_on_purchase = false
steps = [{ delay = "2d", template = "welcome_2" }]
"#;

const T0: &str = "2026-03-02T09:00:00Z";

fn at(s: &str) -> Millis {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("bad timestamp {s:?}: {e}"))
        .timestamp_millis()
}

fn rfc(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("timestamp in range")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[derive(Debug, Clone)]
struct Output {
    topic: String,
    key: String,
    value: Value,
}

/// A sink that keeps every output record, decoded.
fn collect(outputs: &mut Vec<Output>) -> impl FnMut(&OutboxEntry) -> anyhow::Result<()> + '_ {
    move |e: &OutboxEntry| {
        outputs.push(Output {
            topic: e
                .topic
                .strip_prefix("kairos.")
                .unwrap_or(&e.topic)
                .to_string(),
            key: String::from_utf8_lossy(&e.key).into_owned(),
            value: serde_json::from_slice(&e.payload)?,
        });
        Ok(())
    }
}

struct Harness {
    pipeline: Pipeline,
    outputs: Vec<Output>,
    /// The identity processor's metrics.
    identity_metrics: prometheus::Registry,
    _dir: tempfile::TempDir,
    next_event: u32,
}

impl Harness {
    fn new() -> Self {
        Self::with_identity("")
    }

    /// A harness with `extra` added to the `[identity]` section.
    fn with_identity(extra: &str) -> Self {
        Self::from_text(&CONFIG.replace("[identity]\n", &format!("[identity]\n{extra}\n")))
    }

    /// A harness of the configuration `text`.
    fn from_text(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::from_text(Path::new("identity-test.toml"), text, &[])
            .unwrap_or_else(|e| panic!("{e}"));
        config.state.dir = dir.path().to_path_buf();
        config.clock.mode = ClockMode::Event;
        let mut pipeline = Pipeline::new(&config).expect("pipeline");
        let registry = prometheus::Registry::new();
        let config = Arc::new(config);
        let identity = IdentityProcessor::new(config.clone(), SchemaRegistry::new(None), &registry)
            .expect("identity processor");
        pipeline.set_upstream(Box::new(
            Replayer::new(identity, &config, &registry).expect("identity replayer"),
        ));
        let arbiter_registry = prometheus::Registry::new();
        let arbiter = kairos_arbiter::ArbiterProcessor::new(config.clone(), &arbiter_registry);
        pipeline.add_stage(Box::new(
            Replayer::new(arbiter, &config, &arbiter_registry).expect("arbiter replayer"),
        ));
        Harness {
            pipeline,
            outputs: Vec::new(),
            identity_metrics: registry,
            _dir: dir,
            next_event: 0,
        }
    }

    fn feed(&mut self, topic: &str, key: &str, value: Value) {
        let payload = serde_json::to_vec(&value).expect("json");
        let mut sink = collect(&mut self.outputs);
        self.pipeline
            .push(
                &format!("kairos.{topic}"),
                key.as_bytes(),
                &payload,
                &mut sink,
            )
            .expect("push");
    }

    /// A site or app event with the given identifiers (`extra` is merged in); keyed by
    /// the first identifier given, as a producer would.
    fn event(&mut self, topic: &str, event_type: &str, time: Millis, extra: Value) {
        self.next_event += 1;
        let mut e = json!({
            "event_id": format!("e-{}", self.next_event),
            "event_type": event_type,
            "occurred_at": rfc(time),
        });
        let key = ["customer_id", "anonymous_id", "device_id", "email"]
            .iter()
            .find_map(|k| extra.get(*k).and_then(Value::as_str).map(str::to_string))
            .unwrap_or_default();
        if let (Some(obj), Value::Object(more)) = (e.as_object_mut(), extra) {
            obj.extend(more);
        }
        self.feed(topic, &key, e);
    }

    /// An online order of `customer` on `topic`.
    fn purchase(&mut self, topic: &str, customer: &str, order_id: &str, total: f64, time: Millis) {
        self.event(
            topic,
            "purchase",
            time,
            json!({"customer_id": customer, "order": {"order_id": order_id, "total": total}}),
        );
    }

    fn receipt(&mut self, time: Millis, total: f64, ids: Value) {
        self.next_event += 1;
        let mut r = json!({
            "event_id": format!("r-{}", self.next_event),
            "occurred_at": rfc(time),
            "receipt_id": format!("receipt-{}", self.next_event),
            "kind": "sale",
            "store_id": "store-7",
            "items": [{"product_id": "p-till", "quantity": 1, "unit_price": total}],
            "total": total,
            "currency": "EUR",
        });
        let key = ids
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if let (Some(obj), Value::Object(more)) = (r.as_object_mut(), ids) {
            obj.extend(more);
        }
        self.feed("events.offline", &key, r);
    }

    fn outcome(&mut self, send: &SendCommand, kind: &str, time: Millis) {
        let o = json!({
            "outcome_id": format!("{}-{kind}", send.send_id),
            "send_id": send.send_id,
            "customer_id": send.customer_id,
            "scenario": send.scenario,
            "channel": send.channel,
            "category": send.category,
            "kind": kind,
            "occurred_at": time,
        });
        self.feed("outcomes", &send.customer_id, o);
    }

    fn advance(&mut self, t: Millis) {
        let mut sink = collect(&mut self.outputs);
        self.pipeline.advance_to(t, &mut sink).expect("advance");
        self.pipeline.commit(&mut sink).expect("commit");
    }

    fn of_topic(&self, topic: &str) -> Vec<&Output> {
        self.outputs.iter().filter(|o| o.topic == topic).collect()
    }

    fn sends(&self) -> Vec<SendCommand> {
        self.outputs
            .iter()
            .filter(|o| o.topic.starts_with("send."))
            .map(|o| serde_json::from_value(o.value.clone()).expect("send command"))
            .collect()
    }

    fn triggers(&self) -> Vec<Trigger> {
        self.of_topic("triggers")
            .into_iter()
            .map(|o| serde_json::from_value(o.value.clone()).expect("trigger"))
            .collect()
    }

    fn changes(&self) -> Vec<IdentityChange> {
        self.of_topic("identity-changes")
            .into_iter()
            .map(|o| serde_json::from_value(o.value.clone()).expect("identity change"))
            .collect()
    }

    /// The customers merged away, as `identity-changes` announced them.
    fn merged_away(&self) -> Vec<String> {
        self.merges()
            .into_iter()
            .filter_map(|c| c.merged_from)
            .collect()
    }

    /// The merges announced on `identity-changes`.
    fn merges(&self) -> Vec<IdentityChange> {
        self.changes()
            .into_iter()
            .filter(|c| c.kind == IdentityChangeKind::merged)
            .collect()
    }

    /// Feeds a page view of cookie `anonymous_id` with `email` at `time`; returns the
    /// profile it resolved to.
    fn page_view_resolves_to(&mut self, anonymous_id: &str, email: &str, time: Millis) -> String {
        let page_view = json!({"anonymous_id": anonymous_id, "email": email});
        self.resolves_to("events.site", "page_view", time, page_view)
    }

    /// The customer an event is resolved to, once time has come to it.
    fn resolves_to(&mut self, topic: &str, event_type: &str, time: Millis, extra: Value) -> String {
        self.event(topic, event_type, time, extra);
        let id = format!("e-{}", self.next_event);
        self.advance(time);
        self.resolved(&id).expect("resolved")
    }

    /// The customer each identified event was re-keyed to, by event id.
    fn resolved(&self, event_id: &str) -> Option<String> {
        self.of_topic("identified-events")
            .into_iter()
            .find_map(|o| {
                let record = o.value.get("record")?;
                (record.get("event_id")?.as_str()? == event_id).then(|| o.key.clone())
            })
    }

    fn profile(&self, customer: &str) -> kairos_profile::profile::CustomerProfile {
        self.pipeline
            .profile(customer)
            .expect("read profile")
            .unwrap_or_else(|| panic!("no profile for {customer}"))
    }

    fn dead_letters(&self) -> Vec<&Output> {
        self.of_topic("deadletter")
    }
}

#[test]
fn an_anonymous_cart_followed_by_a_login_yields_one_reminder_to_the_customers_email() {
    let mut h = Harness::new();
    let t0 = at(T0);
    h.event(
        "events.site",
        "product_view",
        t0,
        json!({"anonymous_id": "cookie-1",
        "product": {"product_id": "p-1", "name": "Boots", "price": 120.0}}),
    );
    h.event(
        "events.site",
        "add_to_cart",
        t0 + MINUTE,
        json!({"anonymous_id": "cookie-1",
        "product": {"product_id": "p-1", "name": "Boots", "price": 120.0}}),
    );
    // The visitor logs in ten minutes later, on the same browser, and leaves.
    h.event(
        "events.site",
        "login",
        t0 + 10 * MINUTE,
        json!({"anonymous_id": "cookie-1",
        "customer_id": "c-1", "email": "  Ann.Lee@Example.COM ",
        "consent": {"channel": "email", "granted": true}}),
    );
    h.advance(t0 + 3 * HOUR);

    let carts: Vec<Trigger> = h
        .triggers()
        .into_iter()
        .filter(|t| t.scenario == "abandoned_cart")
        .collect();
    assert_eq!(
        carts.len(),
        1,
        "one reminder, not one per profile: {carts:?}"
    );
    assert_eq!(carts[0].customer_id, "c-1");
    let sends: Vec<SendCommand> = h
        .sends()
        .into_iter()
        .filter(|s| s.scenario == "abandoned_cart")
        .collect();
    assert_eq!(sends.len(), 1, "{sends:?}");
    assert_eq!(sends[0].address.as_deref(), Some("ann.lee@example.com"));
    // The anonymous history now belongs to the customer.
    let p = h.profile("c-1");
    assert_eq!(p.cart.len(), 1);
    assert!(p.recently_viewed.iter().any(|v| v.product_id == "p-1"));
    assert!(h.pipeline.profile("anon:cookie-1").expect("read").is_none());
    let stitched = h.changes();
    assert!(stitched.iter().any(|c| c.kind == IdentityChangeKind::merged
        && c.customer_id == "c-1"
        && c.merged_from.as_deref() == Some("anon:cookie-1")));
    // Later anonymous events of the same cookie resolve to the customer at once.
    h.event(
        "events.site",
        "page_view",
        t0 + 4 * HOUR,
        json!({"anonymous_id": "cookie-1"}),
    );
    let last = format!("e-{}", h.next_event);
    assert_eq!(h.resolved(&last).as_deref(), Some("c-1"));
}

#[test]
fn offline_receipts_resolve_by_loyalty_card_and_by_phone_and_end_the_cart_reminder() {
    let mut h = Harness::new();
    let t0 = at(T0);
    h.event(
        "events.app",
        "registration",
        t0,
        json!({"customer_id": "c-2",
        "device_id": "ios-77", "phone": "+49 151 2345 6789",
        "consent": {"channel": "email", "granted": true},
        "profile": {"email": "bob@example.com"}}),
    );
    // The first till receipt names the customer and the card: the card is linked.
    h.receipt(
        t0 + HOUR,
        30.0,
        json!({"customer_id": "c-2", "loyalty_card": "LC-0001 77"}),
    );
    h.event(
        "events.app",
        "add_to_cart",
        t0 + 2 * HOUR,
        json!({"device_id": "ios-77",
        "product": {"product_id": "p-9", "name": "Scarf", "price": 25.0}}),
    );
    let cart = format!("e-{}", h.next_event);
    assert_eq!(h.profile("c-2").cart.len(), 1, "the scarf is in her cart");
    // The card alone, printed differently, and the phone alone, written nationally.
    h.receipt(
        t0 + 2 * HOUR + 20 * MINUTE,
        25.0,
        json!({"loyalty_card": "lc0001 77"}),
    );
    let by_card = format!("r-{}", h.next_event);
    h.receipt(t0 + 5 * HOUR, 12.5, json!({"phone": "0151 23456789"}));
    let by_phone = format!("r-{}", h.next_event);
    h.advance(t0 + 8 * HOUR);

    assert_eq!(h.resolved(&by_card).as_deref(), Some("c-2"));
    assert_eq!(h.resolved(&by_phone).as_deref(), Some("c-2"));
    // The cart change reached her profile (by the device), so the reminder's absence
    // is the card purchase's doing.
    assert_eq!(h.resolved(&cart).as_deref(), Some("c-2"));
    let p = h.profile("c-2");
    assert_eq!(
        p.offline_orders, 3,
        "every receipt counts in the one profile"
    );
    assert!((p.revenue - 67.5).abs() < 1e-9, "revenue {}", p.revenue);
    assert_eq!(p.phone.as_deref(), Some("+4915123456789"), "phone in E.164");
    // The card purchase came after the cart change: no cart reminder at all.
    assert!(
        h.triggers().iter().all(|t| t.scenario != "abandoned_cart"),
        "{:?}",
        h.triggers()
    );
}

#[test]
fn two_known_customers_merge_state_combined_unsubscribe_kept_no_duplicates_caps_shared() {
    let mut h = Harness::new();
    let t0 = at(T0);
    // c-20 signs up in the app with an e-mail, opts in, gets the welcome e-mail and
    // unsubscribes from it; it also buys once.
    h.event(
        "events.app",
        "registration",
        t0,
        json!({"customer_id": "c-20",
        "email": "Eve@Example.com", "phone": "+4915199990000",
        "consent": {"channel": "email", "granted": true}}),
    );
    h.purchase("events.app", "c-20", "o-1", 80.0, t0 + MINUTE);
    let first = h.sends();
    assert_eq!(first.len(), 1, "welcome to c-20: {first:?}");
    assert_eq!(first[0].customer_id, "c-20");
    h.outcome(&first[0], "unsubscribed", t0 + 5 * MINUTE);
    // c-10 registers on the site with the same e-mail (trusted to merge), without a
    // word on e-mail consent (a later opt-in would count: see the profile's tests),
    // buys too, and consents to SMS.
    h.event(
        "events.site",
        "registration",
        t0 + HOUR,
        json!({"customer_id": "c-10",
        "email": "eve@example.com"}),
    );
    h.event(
        "events.site",
        "consent_change",
        t0 + HOUR + MINUTE,
        json!({"customer_id": "c-10",
        "phone": "+4915199990000", "consent": {"channel": "sms", "granted": true}}),
    );
    h.purchase("events.site", "c-10", "o-2", 20.0, t0 + HOUR + 2 * MINUTE);
    // Events still keyed by the merged customer's id resolve to the survivor.
    h.event(
        "events.app",
        "page_view",
        t0 + 2 * HOUR,
        json!({"customer_id": "c-20"}),
    );
    let late = format!("e-{}", h.next_event);
    h.advance(t0 + 3 * DAY);

    // The survivor is the smaller id; the merge is announced.
    let merges = h.merges();
    assert_eq!(merges.len(), 1, "{merges:?}");
    assert_eq!(merges[0].customer_id, "c-10");
    assert_eq!(merges[0].merged_from.as_deref(), Some("c-20"));
    assert_eq!(merges[0].identifier, "email:eve@example.com");
    assert_eq!(h.resolved(&late).as_deref(), Some("c-10"));

    // State combined: purchases add up; the unsubscribe is not lost.
    let p = h.profile("c-10");
    assert_eq!(p.orders, 2);
    assert!((p.revenue - 100.0).abs() < 1e-9);
    assert_eq!(
        p.consents.get(&kairos_core::contracts::Channel::email),
        Some(&false)
    );
    assert!(h.pipeline.profile("c-20").expect("read").is_none());

    // No e-mail after the merge (the unsubscribe holds), no message twice: the merged
    // customer's welcome series ended at the merge, the survivor's goes on, by SMS
    // (its first message found no consented channel yet: e-mail was unsubscribed).
    let after: Vec<SendCommand> = h
        .sends()
        .into_iter()
        .filter(|s| s.created_at > t0 + 5 * MINUTE)
        .collect();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].customer_id, "c-10");
    assert_eq!(after[0].template, "welcome_2");
    assert_eq!(after[0].channel, kairos_core::contracts::Channel::sms);
    assert_eq!(after[0].address.as_deref(), Some("+4915199990000"));
    let merged_at = t0 + HOUR;
    assert!(
        h.triggers()
            .iter()
            .all(|t| t.customer_id != "c-20" || t.fired_at < merged_at),
        "the merged customer's chain went on: {:?}",
        h.triggers()
    );
    let welcome_for_10 = h
        .of_topic("decisions")
        .into_iter()
        .filter(|d| d.value["customer_id"] == "c-10" && d.value["scenario"] == "welcome")
        .map(|d| d.value["rule"].as_str().unwrap_or_default().to_string())
        .collect::<Vec<_>>();
    assert_eq!(
        welcome_for_10,
        ["merge_pending", "no_consented_channel", "channel_choice"],
        "the survivor's first welcome waited for the merged ledger, then found e-mail unsubscribed"
    );
}

#[test]
fn caps_count_the_merged_customers_sends() {
    let mut h = Harness::new();
    let t0 = at(T0);
    // c-31 gets two welcome messages today (its own, and a loyalty card sign-up of
    // c-32 that merges into it later).
    h.event(
        "events.site",
        "registration",
        t0,
        json!({"customer_id": "c-32",
        "loyalty_card": "CARD-5",
        "consent": {"channel": "email", "granted": true}, "email": "c32@example.com"}),
    );
    h.event(
        "events.site",
        "registration",
        t0 + HOUR,
        json!({"customer_id": "c-31",
        "consent": {"channel": "email", "granted": true}, "email": "c31@example.com"}),
    );
    assert_eq!(h.sends().len(), 2, "{:?}", h.sends());
    // A receipt of c-31 with c-32's card merges the two (cards are trusted).
    h.receipt(
        t0 + 2 * HOUR,
        10.0,
        json!({"customer_id": "c-31", "loyalty_card": "card-5"}),
    );
    // c-31 abandons a cart: the reminder would be the third message today.
    h.event(
        "events.site",
        "add_to_cart",
        t0 + 3 * HOUR,
        json!({"customer_id": "c-31",
        "product": {"product_id": "p-3", "name": "Hat", "price": 15.0}}),
    );
    h.advance(t0 + 5 * HOUR);
    let cart: Vec<&Output> = h
        .of_topic("decisions")
        .into_iter()
        .filter(|d| d.value["scenario"] == "abandoned_cart")
        .collect();
    assert!(!cart.is_empty(), "the cart reminder was decided");
    assert_eq!(cart[0].value["customer_id"], "c-31");
    assert_eq!(
        cart[0].value["rule"], "frequency_cap_daily",
        "the merged customer's send counts against the daily cap: {:?}",
        cart[0].value
    );
}

/// With `survivor = "first_seen"` the survivor is the customer seen first in event
/// time, whatever order the events arrive in: an older event arriving late moves the
/// customer's first sighting back.
#[test]
fn the_first_seen_survivor_is_the_customer_seen_first_whatever_the_arrival_order() {
    let t0 = at(T0);
    // c-20 seen at T0+1h, c-10 at T0+30m; then `late` events in the order given
    // (customer, topic, event type, time, e-mail), and the survivor of the merge.
    let survivor = |late: &[(&str, &str, &str, i64, Option<&str>)]| {
        let mut h = Harness::with_identity("survivor = \"first_seen\"");
        let seen = [
            ("c-20", "events.site", "page_view", t0 + HOUR, None),
            ("c-10", "events.site", "page_view", t0 + 30 * MINUTE, None),
        ];
        for (customer, topic, kind, time, email) in seen.iter().chain(late) {
            let mut body = json!({"customer_id": customer});
            if let Some(email) = email {
                body["email"] = json!(email);
            }
            h.event(topic, kind, *time, body);
        }
        let merges = h.merges();
        assert_eq!(merges.len(), 1, "{merges:?}");
        merges[0].customer_id.clone()
    };
    let email = Some("ida@example.com");
    let updates = [
        (
            "c-10",
            "events.site",
            "profile_update",
            t0 + 2 * HOUR,
            email,
        ),
        (
            "c-20",
            "events.site",
            "profile_update",
            t0 + 2 * HOUR,
            email,
        ),
    ];
    assert_eq!(
        survivor(&updates),
        "c-10",
        "first seen half an hour before c-20"
    );
    let late_view = ("c-20", "events.app", "page_view", t0, None);
    assert_eq!(
        survivor(&[late_view, updates[0], updates[1]]),
        "c-20",
        "c-20's late event is the earliest"
    );
    // The late event is the one that causes the merge: its own time counts.
    let late_update = ("c-20", "events.app", "profile_update", t0, email);
    assert_eq!(survivor(&[updates[0], late_update]), "c-20");
}

#[test]
fn an_identifier_shared_by_too_many_customers_stops_linking() {
    let mut h = Harness::new();
    let t0 = at(T0);
    // A shop's test card, scanned for three different customers (limit: two).
    for (i, c) in ["c-41", "c-42", "c-43"].iter().enumerate() {
        h.receipt(
            t0 + i as Millis * HOUR,
            5.0,
            json!({"customer_id": c, "loyalty_card": "TEST-1"}),
        );
    }
    // The card alone no longer resolves to any of them.
    h.receipt(t0 + 5 * HOUR, 7.0, json!({"loyalty_card": "TEST-1"}));
    let alone = format!("r-{}", h.next_event);
    h.advance(t0 + 6 * HOUR);
    let shared: Vec<IdentityChange> = h
        .changes()
        .into_iter()
        .filter(|c| c.kind == IdentityChangeKind::identifier_shared)
        .collect();
    assert_eq!(shared.len(), 1, "{:?}", h.changes());
    assert_eq!(shared[0].identifier, "loyalty_card:TEST1");
    assert_eq!(shared[0].customers, ["c-41", "c-42", "c-43"]);
    let resolved = h.resolved(&alone).expect("resolved");
    assert!(
        !["c-41", "c-42", "c-43"].contains(&resolved.as_str()),
        "{resolved}"
    );
    // Two customers shared it before the limit: cards are trusted, so they merged, but
    // the third was not merged into them.
    assert_eq!(h.profile("c-43").offline_orders, 1);
    let p41 = h.profile("c-41");
    assert_eq!(
        p41.offline_orders, 2,
        "c-42 merged into c-41 before the limit"
    );
}

/// A receipt with a shared card and a phone nobody has yet: its profile is named after
/// the phone, not the card, so the customer who later registers with the phone gets
/// that receipt and none of the card's others.
#[test]
fn a_profile_is_never_named_after_a_shared_identifier_when_another_is_at_hand() {
    let mut h = Harness::new();
    let t0 = at(T0);
    for (i, c) in ["c-41", "c-42", "c-43"].iter().enumerate() {
        h.receipt(
            t0 + i as Millis * HOUR,
            5.0,
            json!({"customer_id": c, "loyalty_card": "TEST-1"}),
        );
    }
    h.receipt(t0 + 4 * HOUR, 7.0, json!({"loyalty_card": "TEST-1"}));
    h.receipt(
        t0 + 5 * HOUR,
        9.0,
        json!({"loyalty_card": "TEST-1", "phone": "+4915100000060"}),
    );
    h.event(
        "events.site",
        "registration",
        t0 + 6 * HOUR,
        json!({"customer_id": "c-60", "phone": "+4915100000060"}),
    );
    h.receipt(t0 + 7 * HOUR, 11.0, json!({"loyalty_card": "TEST-1"}));
    let later_alone = format!("r-{}", h.next_event);
    h.advance(t0 + 8 * HOUR);
    let p60 = h.profile("c-60");
    assert_eq!(
        (p60.offline_orders, p60.revenue),
        (1, 9.0),
        "the receipt with its phone, and no other of the card"
    );
    let resolved = h.resolved(&later_alone).expect("resolved");
    assert!(
        !["c-41", "c-42", "c-43", "c-60"].contains(&resolved.as_str()),
        "{resolved}"
    );
}

/// The card was first seen alone (a receipt without a customer), so it had an
/// anonymous profile, stitched to the first customer who presented it; once shared, a
/// receipt with the card alone must not reach that customer through the old profile.
#[test]
fn a_shared_identifier_first_seen_alone_reaches_none_of_its_holders() {
    let mut h = Harness::new();
    let t0 = at(T0);
    h.receipt(t0, 3.0, json!({"loyalty_card": "TEST-1"}));
    for (i, c) in ["c-41", "c-42", "c-43"].iter().enumerate() {
        h.receipt(
            t0 + (i as Millis + 1) * HOUR,
            5.0,
            json!({"customer_id": c, "loyalty_card": "TEST-1"}),
        );
    }
    h.receipt(t0 + 5 * HOUR, 7.0, json!({"loyalty_card": "TEST-1"}));
    let alone = format!("r-{}", h.next_event);
    h.advance(t0 + 6 * HOUR);
    let shared = h
        .changes()
        .into_iter()
        .filter(|c| c.kind == IdentityChangeKind::identifier_shared)
        .count();
    assert_eq!(shared, 1, "{:?}", h.changes());
    let resolved = h.resolved(&alone).expect("resolved");
    assert!(
        !["c-41", "c-42", "c-43"].contains(&resolved.as_str()),
        "{resolved}"
    );
    // The first anonymous receipt and c-41's and c-42's: not the one after the limit.
    assert_eq!(h.profile("c-41").offline_orders, 3);
}

/// Events without a login that carry one customer's e-mail and another's card make
/// the e-mail's customer a holder of the card: the limit on holders counts them as it
/// counts logged-in ones, so a card on many sign-up forms stops merging.
#[test]
fn holders_of_an_identifier_count_when_the_event_names_no_customer() {
    let mut h = Harness::new();
    let t0 = at(T0);
    h.receipt(
        t0,
        5.0,
        json!({"customer_id": "c-71", "loyalty_card": "K-1"}),
    );
    for (i, c) in ["c-72", "c-73", "c-74"].iter().enumerate() {
        let t = t0 + (i as Millis + 1) * HOUR;
        h.event(
            "events.site",
            "registration",
            t,
            json!({"customer_id": c, "email": format!("{c}@example.com")}),
        );
        h.event(
            "events.site",
            "page_view",
            t + MINUTE,
            json!({"anonymous_id": format!("a-{c}"), "email": format!("{c}@example.com"),
                   "loyalty_card": "K-1"}),
        );
    }
    h.advance(t0 + 6 * HOUR);
    let changes = h.changes();
    let of = |kind: IdentityChangeKind| changes.iter().filter(|c| c.kind == kind).count();
    // c-72 is the second holder (limit two): merged; c-73 the third: the card is shared.
    assert_eq!(of(IdentityChangeKind::identifier_shared), 1, "{changes:?}");
    let merged_known: Vec<_> = changes
        .iter()
        .filter(|c| c.kind == IdentityChangeKind::merged)
        .filter_map(|c| c.merged_from.clone())
        .filter(|m| m.starts_with("c-"))
        .collect();
    assert_eq!(merged_known, ["c-72"], "{changes:?}");
}

/// Holders are people: a customer merged into another presents the phone as that
/// other one, so two people (limit two) do not make it shared, whichever id each
/// logged in with and whether the merge came before or after.
#[test]
fn a_merged_customer_and_its_survivor_are_one_holder_of_an_identifier() {
    let mut h = Harness::new();
    let t0 = at(T0);
    let login = |h: &mut Harness, customer: &str, t: Millis| {
        h.event(
            "events.site",
            "login",
            t,
            json!({"customer_id": customer, "phone": "+4915111113333"}),
        );
    };
    // c-82 presents the phone and a trusted card before it merges into c-81, and the
    // phone again after.
    login(&mut h, "c-82", t0);
    let card = |h: &mut Harness, customer: &str, card: &str, t: Millis| {
        h.event(
            "events.site",
            "login",
            t,
            json!({"customer_id": customer, "loyalty_card": card}),
        );
    };
    card(&mut h, "c-82", "K-7", t0 + 30 * MINUTE);
    for (i, c) in ["c-81", "c-82"].iter().enumerate() {
        h.event(
            "events.site",
            "registration",
            t0 + (i as Millis + 1) * HOUR,
            json!({"customer_id": c, "email": "one@example.com"}),
        );
    }
    login(&mut h, "c-82", t0 + 3 * HOUR);
    login(&mut h, "c-81", t0 + 4 * HOUR);
    login(&mut h, "c-83", t0 + 5 * HOUR);
    h.advance(t0 + 6 * HOUR);
    let none_shared = |h: &Harness| {
        let changes = h.changes();
        assert!(
            changes
                .iter()
                .all(|c| c.kind != IdentityChangeKind::identifier_shared),
            "{changes:?}"
        );
    };
    assert_eq!(h.merged_away(), ["c-82"]);
    none_shared(&h);
    // The phone still tells c-81 and c-83 apart, as two holders do.
    let changes = h.changes();
    assert!(
        changes
            .iter()
            .any(|c| c.kind == IdentityChangeKind::conflict
                && c.identifier == "phone:+4915111113333"),
        "{changes:?}"
    );

    // A trusted card c-82 presents after its merge is c-81's: c-83 is its second
    // holder and merges through it, the card is not shared.
    for (i, c) in ["c-82", "c-81", "c-83"].iter().enumerate() {
        card(&mut h, c, "K-8", t0 + (i as Millis + 7) * HOUR);
    }
    h.advance(t0 + 10 * HOUR);
    assert_eq!(h.merged_away(), ["c-82", "c-83"]);
    none_shared(&h);
    // So is the card c-82 presented before its merge, when c-81 presents it: c-84 is
    // its second holder.
    card(&mut h, "c-81", "K-7", t0 + 11 * HOUR);
    card(&mut h, "c-84", "K-7", t0 + 12 * HOUR);
    h.advance(t0 + 13 * HOUR);
    assert_eq!(h.merged_away(), ["c-82", "c-83", "c-84"]);
    none_shared(&h);
}

#[test]
fn untrusted_identifiers_do_not_merge_known_customers() {
    let mut h = Harness::new();
    let t0 = at(T0);
    // A family phone: two known customers present it; phones are not in merge_on.
    h.event(
        "events.site",
        "registration",
        t0,
        json!({"customer_id": "c-51", "phone": "+4915111112222"}),
    );
    h.event(
        "events.site",
        "registration",
        t0 + HOUR,
        json!({"customer_id": "c-52", "phone": "0151 11112222"}),
    );
    h.advance(t0 + 2 * HOUR);
    assert!(h
        .changes()
        .iter()
        .all(|c| c.kind != IdentityChangeKind::merged));
    let conflicts: Vec<IdentityChange> = h
        .changes()
        .into_iter()
        .filter(|c| c.kind == IdentityChangeKind::conflict)
        .collect();
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].identifier, "phone:+4915111112222");
    assert_eq!(h.profile("c-51").orders + h.profile("c-52").orders, 0);

    // The wife's loyalty card and the family phone on a form without a login: the
    // event is hers (the card is trusted, the phone not), and nobody is merged.
    h.receipt(
        t0 + 3 * HOUR,
        5.0,
        json!({"customer_id": "c-52", "loyalty_card": "K-52"}),
    );
    h.event(
        "events.site",
        "page_view",
        t0 + 4 * HOUR,
        json!({"anonymous_id": "a-form", "phone": "+4915111112222", "loyalty_card": "K-52"}),
    );
    let form = format!("e-{}", h.next_event);
    h.advance(t0 + 5 * HOUR);
    assert_eq!(h.resolved(&form).as_deref(), Some("c-52"));
    assert!(h.merged_away().is_empty(), "{:?}", h.merged_away());
    assert_eq!(h.profile("c-52").orders, 1);
    assert_eq!(h.profile("c-51").orders, 0);
}

/// A placeholder device or anonymous id (the all-zero advertising id of a device that
/// limits tracking, "undefined" from a tag manager) joins nobody: two strangers sending
/// it with their e-mails stay two profiles, and an event naming no one else is
/// dead-lettered with the placeholder named.
#[test]
fn a_placeholder_device_id_joins_no_strangers() {
    let mut h = Harness::new();
    let t0 = at(T0);
    let zeros = "00000000-0000-0000-0000-000000000000";
    for (n, email) in [(1, "a@example.com"), (2, "b@example.com")] {
        h.event(
            "events.site",
            "page_view",
            t0 + n * MINUTE,
            json!({"device_id": zeros, "anonymous_id": format!("cookie-{n}"), "email": email}),
        );
    }
    h.advance(t0 + 3 * MINUTE);
    let (first, second) = (h.resolved("e-1"), h.resolved("e-2"));
    assert!(first.is_some() && second.is_some(), "{first:?} {second:?}");
    assert_ne!(first, second, "two visitors, two profiles");
    h.event(
        "events.site",
        "page_view",
        t0 + 4 * MINUTE,
        json!({"anonymous_id": "undefined"}),
    );
    h.advance(t0 + 5 * MINUTE);
    assert_eq!(h.resolved("e-3"), None);
    let dead = h.dead_letters();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let reason = dead[0].value["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("anonymous_id \"undefined\" is a placeholder"),
        "{reason}"
    );
}

/// A shop's kiosk (one device) where visitors sign up for the newsletter one after
/// another: each visitor's e-mail and opt-in are their own profile's, not piled up in
/// the first visitor's anonymous one, which the first to register would take in with
/// every other visitor's address and consent. The first visitor typing her own
/// address again stays hers.
#[test]
fn visitors_signing_up_at_one_kiosk_are_apart() {
    let mut h = Harness::new();
    let t0 = at(T0);
    let sign_up = |n: i64| {
        json!({"device_id": "kiosk-1", "email": format!("visitor{n}@example.com"),
            "consent": {"channel": "email", "granted": true}})
    };
    let first = h.resolves_to("events.app", "consent_change", t0, sign_up(1));
    let mut others = Vec::new();
    for n in 2..=4 {
        others.push(h.resolves_to("events.app", "consent_change", t0 + n * MINUTE, sign_up(n)));
    }
    for (n, other) in (2..).zip(&others) {
        assert_ne!(other, &first, "visitor {n}");
        assert_eq!(other, &format!("email:visitor{n}@example.com"));
    }
    assert_eq!(
        h.resolves_to("events.app", "page_view", t0 + 10 * MINUTE, sign_up(1)),
        first,
        "her own address again"
    );
    // Visitor 2 back at the kiosk: his own profile, and the kiosk's is not merged
    // into it.
    assert_eq!(
        h.resolves_to("events.app", "page_view", t0 + 20 * MINUTE, sign_up(2)),
        others[0]
    );
    // Someone at home with one e-mail, then a second phone at a guest checkout with
    // it: one person, one profile (a phone is no sign of someone else).
    let home = h.resolves_to(
        "events.site",
        "page_view",
        t0 + 30 * MINUTE,
        json!({"anonymous_id": "home-5", "email": "home5@example.com", "phone": "+4915155550001"}),
    );
    let checkout = h.resolves_to(
        "events.site",
        "page_view",
        t0 + 31 * MINUTE,
        json!({"anonymous_id": "home-5", "email": "home5@example.com", "phone": "+4915155550002"}),
    );
    assert_eq!(checkout, home);
    // Its own e-mail with a second one (a profile update's): still one person.
    assert_eq!(
        h.resolves_to(
            "events.site",
            "profile_update",
            t0 + 31 * MINUTE + 30_000,
            json!({"anonymous_id": "home-5", "email": "home5@example.com",
                "profile": {"email": "home5.work@example.com"}}),
        ),
        home
    );
    assert_eq!(
        h.resolves_to(
            "events.site",
            "page_view",
            t0 + 32 * MINUTE,
            json!({"anonymous_id": "home-5", "phone": "+4915155550003"}),
        ),
        home
    );
    // The first visitor registers: she takes in her own profile, no one else's.
    h.event(
        "events.site",
        "registration",
        t0 + HOUR,
        json!({"customer_id": "c-1", "email": "visitor1@example.com"}),
    );
    h.advance(t0 + 2 * HOUR);
    assert_eq!(h.merged_away(), std::slice::from_ref(&first));
    let hers = h.profile("c-1");
    assert_eq!(hers.email.as_deref(), Some("visitor1@example.com"));
    for other in &others {
        let theirs = h.profile(other);
        assert_eq!(theirs.consents.get(&Channel::email), Some(&true), "{other}");
        assert!(theirs.email.is_some_and(|e| e != "visitor1@example.com"));
    }
}

/// A phone (not trusted to merge by default) typed on the husband's laptop, with an
/// SMS opt-in, is his until the wife presents it: then it is hers, his profile loses
/// it and the opt-in given with it, and a receipt with the phone alone is hers.
#[test]
fn a_phone_picked_up_through_a_family_device_goes_to_whoever_presents_it() {
    let mut h = Harness::new();
    let t0 = at(T0);
    h.event(
        "events.site",
        "registration",
        t0,
        json!({"customer_id": "c-71", "anonymous_id": "laptop-7"}),
    );
    h.event(
        "events.site",
        "consent_change",
        t0 + HOUR,
        json!({"anonymous_id": "laptop-7", "phone": "+49 151 7000 0071",
            "consent": {"channel": "sms", "granted": true}}),
    );
    h.advance(t0 + HOUR + MINUTE);
    let husband = h.profile("c-71");
    assert_eq!(husband.phone.as_deref(), Some("+4915170000071"));
    assert_eq!(husband.consents.get(&Channel::sms).copied(), Some(true));
    h.event(
        "events.site",
        "registration",
        t0 + 2 * HOUR,
        json!({"customer_id": "c-72", "phone": "0151 70000071"}),
    );
    h.receipt(t0 + 3 * HOUR, 19.0, json!({"phone": "+4915170000071"}));
    let by_phone = format!("r-{}", h.next_event);
    h.advance(t0 + 4 * HOUR);
    assert_eq!(h.resolved(&by_phone).as_deref(), Some("c-72"));
    let husband = h.profile("c-71");
    assert_eq!(husband.phone, None);
    assert_ne!(husband.consents.get(&Channel::sms).copied(), Some(true));
    assert_eq!(h.profile("c-72").phone.as_deref(), Some("+4915170000071"));
    assert_eq!(h.profile("c-72").offline_orders, 1);
    let merged: Vec<_> = h.merged_away();
    assert!(merged.iter().all(|m| !m.starts_with("c-")), "{merged:?}");
}

/// On the family tablet the husband registered on (its device id his), the app's new
/// cookie after his logout comes with the wife's e-mail: her event goes to her, and the
/// cookie stays the device's, so the tablet's next app open (without her e-mail)
/// does not join her profile to his.
#[test]
fn a_new_cookie_with_someone_elses_address_stays_with_the_device() {
    let mut h = Harness::new();
    let t0 = at(T0);
    h.event(
        "events.app",
        "registration",
        t0,
        json!({"customer_id": "c-81", "device_id": "tablet-8", "anonymous_id": "a-1",
            "email": "husband8@example.com"}),
    );
    let hers = h.resolves_to(
        "events.app",
        "consent_change",
        t0 + HOUR,
        json!({"device_id": "tablet-8", "anonymous_id": "a-2", "email": "wife8@example.com",
            "consent": {"channel": "email", "granted": true}}),
    );
    assert_ne!(hers, "c-81");
    let view = h.resolves_to(
        "events.app",
        "app_open",
        t0 + 2 * HOUR,
        json!({"device_id": "tablet-8", "anonymous_id": "a-2"}),
    );
    assert_eq!(view, "c-81");
    h.advance(t0 + 3 * HOUR);
    assert!(h.merged_away().is_empty(), "{:?}", h.merged_away());
    assert_eq!(
        h.profile("c-81").email.as_deref(),
        Some("husband8@example.com")
    );
    // Her address still leads to her own profile, with her opt-in.
    assert_eq!(
        h.page_view_resolves_to("her-phone-8", "wife8@example.com", t0 + 4 * HOUR),
        hers
    );

    // Passed over for another reason (her phone, typed once on another husband's
    // laptop, now with her e-mail on her own phone's new cookie): the cookie is hers.
    h.event(
        "events.site",
        "registration",
        t0 + 5 * HOUR,
        json!({"customer_id": "c-91", "anonymous_id": "laptop-9",
            "email": "husband9@example.com"}),
    );
    h.event(
        "events.site",
        "consent_change",
        t0 + 6 * HOUR,
        json!({"anonymous_id": "laptop-9", "phone": "+49 151 7000 0091",
            "consent": {"channel": "sms", "granted": true}}),
    );
    let hers = h.resolves_to(
        "events.site",
        "page_view",
        t0 + 7 * HOUR,
        json!({"anonymous_id": "her-phone-9", "phone": "+49 151 7000 0091",
            "email": "wife9@example.com"}),
    );
    assert_ne!(hers, "c-91");
    let view = h.resolves_to(
        "events.site",
        "page_view",
        t0 + 8 * HOUR,
        json!({"anonymous_id": "her-phone-9"}),
    );
    assert_eq!(view, hers);
}

/// An e-mail that reached a known customer only through an untrusted identifier (the
/// family laptop's cookie) or with an anonymous profile stitched to them was never
/// presented by them: the person who registers with it takes it, and nobody is merged.
#[test]
fn a_trusted_identifier_picked_up_through_a_family_device_merges_nobody() {
    let mut h = Harness::new();
    let t0 = at(T0);
    // The husband logs in on the laptop; the wife, not logged in, leaves her e-mail.
    h.event(
        "events.site",
        "registration",
        t0,
        json!({"customer_id": "c-61", "anonymous_id": "laptop"}),
    );
    // He gave no e-mail of his own: one typed on his laptop may be his, and leads to
    // him (the son's first, then the wife's).
    assert_eq!(
        h.page_view_resolves_to("laptop", "son@example.com", t0 + HOUR / 2),
        "c-61"
    );
    assert_eq!(
        h.page_view_resolves_to("laptop", "wife@example.com", t0 + HOUR),
        "c-61"
    );
    // She ticks the newsletter box there too.
    h.event(
        "events.site",
        "consent_change",
        t0 + HOUR,
        json!({"anonymous_id": "laptop", "email": "wife@example.com",
            "consent": {"channel": "email", "granted": true}}),
    );
    // She comes back to it before registering, and from her own phone: the e-mail
    // still leads to him (nothing better is known) but proves nothing of him.
    assert_eq!(
        h.page_view_resolves_to("laptop", "wife@example.com", t0 + HOUR + MINUTE),
        "c-61"
    );
    assert_eq!(
        h.page_view_resolves_to("her-phone", "wife@example.com", t0 + HOUR + 2 * MINUTE),
        "c-61"
    );
    // The wife types her e-mail on the tablet before anyone logged in there; then the
    // husband logs in on it (stitching the tablet's profile to him).
    let tablet = h.page_view_resolves_to("tablet", "wife2@example.com", t0 + 2 * HOUR);
    assert!(!tablet.starts_with("c-"), "{tablet}");
    h.event(
        "events.site",
        "consent_change",
        t0 + 2 * HOUR + MINUTE,
        json!({"anonymous_id": "tablet", "consent": {"channel": "email", "granted": true}}),
    );
    h.event(
        "events.site",
        "login",
        t0 + 3 * HOUR,
        json!({"customer_id": "c-63", "anonymous_id": "tablet"}),
    );
    // Meanwhile the husbands' profiles took the e-mails as their addresses (nothing
    // better is known of who was at the keyboard).
    h.advance(t0 + 3 * HOUR + MINUTE);
    assert_eq!(h.profile("c-61").email.as_deref(), Some("wife@example.com"));
    assert_eq!(
        h.profile("c-63").email.as_deref(),
        Some("wife2@example.com")
    );
    for husband in ["c-61", "c-63"] {
        let consent = h.profile(husband).consents.get(&Channel::email).copied();
        assert_eq!(consent, Some(true), "{husband}");
    }
    // Both wives register with their e-mails.
    for (customer, email, hours) in [
        ("c-62", "wife@example.com", 4),
        ("c-64", "wife2@example.com", 5),
    ] {
        h.event(
            "events.site",
            "registration",
            t0 + hours * HOUR,
            json!({"customer_id": customer, "email": email}),
        );
    }
    h.advance(t0 + 6 * HOUR);
    let known_merged: Vec<_> = h
        .merged_away()
        .into_iter()
        .filter(|m| m.starts_with("c-"))
        .collect();
    assert!(known_merged.is_empty(), "{known_merged:?}");
    let conflicts: Vec<(String, String)> = h
        .changes()
        .into_iter()
        .filter(|c| c.kind == IdentityChangeKind::conflict)
        .map(|c| (c.identifier, c.customer_id))
        .collect();
    assert_eq!(
        conflicts,
        [
            ("email:wife@example.com".to_string(), "c-62".to_string()),
            ("email:wife2@example.com".to_string(), "c-64".to_string()),
        ]
    );
    // The e-mails are the wives' now: no longer the husbands' addresses, nor are the
    // opt-ins given with them the husbands' consents; the arbiter is told so (a
    // message waiting for a husband does not go to his wife, nor a promo to the next
    // address he states).
    for (husband, wife) in [("c-61", "c-62"), ("c-63", "c-64")] {
        assert_eq!(h.profile(husband).email, None, "{husband}");
        let consent = h.profile(husband).consents.get(&Channel::email).copied();
        assert_ne!(consent, Some(true), "{husband}");
        assert!(h.profile(wife).email.is_some(), "{wife}");
        let told = h
            .of_topic("customer-actions")
            .into_iter()
            .rev()
            .find(|o| o.key == husband && o.value["kind"] == "contacts_changed")
            .map(|o| o.value["contacts"].clone());
        let told = told.unwrap_or_else(|| panic!("{husband}'s contacts change told"));
        assert_eq!(told["email"], Value::Null, "{husband}: {told}");
        assert_eq!(told["consented_channels"], json!([]), "{husband}: {told}");
    }
    // The e-mails are the wives' now: an anonymous visit with one goes to her.
    assert_eq!(
        h.page_view_resolves_to("phone-1", "wife@example.com", t0 + 7 * HOUR),
        "c-62"
    );
    assert_eq!(
        h.page_view_resolves_to("phone-2", "wife2@example.com", t0 + 8 * HOUR),
        "c-64"
    );
    // The laptop is still the husband's.
    assert_eq!(
        h.page_view_resolves_to("laptop", "husband@example.com", t0 + 9 * HOUR),
        "c-61"
    );

    // A second account with an e-mail its first account registered with still merges.
    for (customer, hours) in [("c-65", 10), ("c-66", 11)] {
        h.event(
            "events.site",
            "registration",
            t0 + hours * HOUR,
            json!({"customer_id": customer, "email": "same@example.com"}),
        );
    }
    h.advance(t0 + 12 * HOUR);
    assert!(h.merged_away().contains(&"c-66".to_string()));
}

/// The wife types her e-mail (and ticks the newsletter box) on the laptop where the
/// husband registered with his: someone else is at the keyboard. The event goes to a
/// profile of her e-mail, not his (his address and consent stay his own), and that
/// profile joins her account when she registers. The son's phone likewise.
#[test]
fn an_address_typed_on_the_device_of_a_customer_who_gave_another_is_someone_else_s() {
    let mut h = Harness::new();
    let t0 = at(T0);
    h.event(
        "events.site",
        "registration",
        t0,
        json!({"customer_id": "c-71", "anonymous_id": "laptop",
            "email": "husband@example.com", "phone": "+4915111110000"}),
    );
    let hers = h.resolves_to(
        "events.site",
        "consent_change",
        t0 + HOUR,
        json!({"anonymous_id": "laptop", "email": "wife@example.com",
            "consent": {"channel": "email", "granted": true}}),
    );
    assert_eq!(hers, "email:wife@example.com");
    // The laptop alone is still his; her e-mail on it again is hers.
    assert_eq!(
        h.page_view_resolves_to("laptop", "", t0 + 2 * HOUR),
        "c-71",
        "the device stays his"
    );
    assert_eq!(
        h.page_view_resolves_to("laptop", "wife@example.com", t0 + 3 * HOUR),
        hers
    );
    let sons = h.resolves_to(
        "events.site",
        "page_view",
        t0 + 3 * HOUR + MINUTE,
        json!({"anonymous_id": "laptop", "phone": "+4915122220000"}),
    );
    assert_eq!(sons, "phone:+4915122220000");
    let husband = h.profile("c-71");
    assert_eq!(husband.email.as_deref(), Some("husband@example.com"));
    assert_eq!(husband.phone.as_deref(), Some("+4915111110000"));
    assert_eq!(husband.consents.get(&Channel::email), None);
    let wife = h.profile(&hers);
    assert_eq!(wife.email.as_deref(), Some("wife@example.com"));
    assert_eq!(wife.consents.get(&Channel::email), Some(&true));
    // He himself, logged out, at a guest checkout with his own phone and a work
    // e-mail: his phone on it, the event stays his.
    let his = h.resolves_to(
        "events.site",
        "page_view",
        t0 + 3 * HOUR + 2 * MINUTE,
        json!({"anonymous_id": "laptop", "phone": "+4915111110000", "email": "work@example.com"}),
    );
    assert_eq!(his, "c-71");
    // The grandmother's app (she registered on it, with her e-mail) and the laptop's
    // cookie, with a new e-mail: two known customers in the event, the rules for two
    // customers apply (her device names her first), and nobody is merged into either.
    h.event(
        "events.app",
        "registration",
        t0 + 3 * HOUR + 3 * MINUTE,
        json!({"customer_id": "c-73", "device_id": "gran-phone", "email": "gran@example.com"}),
    );
    let grandmothers = h.resolves_to(
        "events.site",
        "page_view",
        t0 + 3 * HOUR + 4 * MINUTE,
        json!({"anonymous_id": "laptop", "device_id": "gran-phone", "email": "new@example.com"}),
    );
    assert_eq!(grandmothers, "c-73");
    assert!(h.merged_away().is_empty(), "{:?}", h.merged_away());
    // Her other e-mail came to him with the tablet he logged in on after she typed
    // it there: not one he presented. With it and her phone on the laptop, the phone
    // is someone else's all the same.
    h.page_view_resolves_to("tablet-2", "wife3@example.com", t0 + 3 * HOUR + 6 * MINUTE);
    h.event(
        "events.site",
        "login",
        t0 + 3 * HOUR + 7 * MINUTE,
        json!({"customer_id": "c-71", "anonymous_id": "tablet-2"}),
    );
    let her_phone = h.resolves_to(
        "events.site",
        "page_view",
        t0 + 3 * HOUR + 8 * MINUTE,
        json!({"anonymous_id": "laptop", "email": "wife3@example.com", "phone": "+4915144440000"}),
    );
    assert_eq!(her_phone, "phone:+4915144440000");
    // She registers: her profile joins her account (the tablet's joined his), nobody
    // known is merged, and no address had to move.
    h.event(
        "events.site",
        "registration",
        t0 + 4 * HOUR,
        json!({"customer_id": "c-72", "email": "wife@example.com"}),
    );
    h.advance(t0 + 5 * HOUR);
    assert_eq!(h.merged_away(), ["anon:tablet-2".to_string(), hers]);
    let wife = h.profile("c-72");
    assert_eq!(wife.email.as_deref(), Some("wife@example.com"));
    assert_eq!(wife.consents.get(&Channel::email), Some(&true));
    assert!(h
        .changes()
        .iter()
        .all(|c| c.kind != IdentityChangeKind::conflict));
    assert_eq!(
        h.page_view_resolves_to("laptop", "", t0 + 6 * HOUR),
        "c-71",
        "the device stays his"
    );
}

/// A card its owner never presented with a login (it came with an anonymous profile
/// stitched to her) still names her before a family phone names him: the event is
/// hers, and the card stays hers.
#[test]
fn an_unclaimed_card_names_its_owner_before_a_family_phone() {
    let mut h = Harness::new();
    let t0 = at(T0);
    let family = "+4915111113333";
    h.event(
        "events.site",
        "registration",
        t0,
        json!({"customer_id": "c-51", "phone": family}),
    );
    // Her card and her own phone at the till, then a login with the phone alone.
    h.receipt(
        t0 + HOUR,
        5.0,
        json!({"loyalty_card": "K52", "phone": "+4915122224444"}),
    );
    h.event(
        "events.site",
        "login",
        t0 + 2 * HOUR,
        json!({"customer_id": "c-52", "phone": "+4915122224444"}),
    );
    h.event(
        "events.site",
        "page_view",
        t0 + 3 * HOUR,
        json!({"anonymous_id": "a-form", "phone": family, "loyalty_card": "K52"}),
    );
    let form = format!("e-{}", h.next_event);
    h.receipt(t0 + 4 * HOUR, 7.0, json!({"loyalty_card": "K52"}));
    let till = format!("r-{}", h.next_event);
    h.advance(t0 + 5 * HOUR);
    assert_eq!(h.resolved(&form).as_deref(), Some("c-52"));
    assert_eq!(
        h.resolved(&till).as_deref(),
        Some("c-52"),
        "the card stays hers"
    );
    assert!(h.merged_away().iter().all(|m| !m.starts_with("c-")));
}

/// A customer merged by one identifier of an event presents its other identifiers as
/// the survivor: one person, not a second holder of the card (limit two), as when the
/// merge came in an earlier event.
#[test]
fn after_a_merge_within_an_event_its_other_identifiers_count_one_holder() {
    let mut h = Harness::new();
    let t0 = at(T0);
    let register = |h: &mut Harness, customer: &str, ids: Value, hours: Millis| {
        let mut fields = ids;
        fields["customer_id"] = json!(customer);
        h.event("events.site", "registration", t0 + hours * HOUR, fields);
    };
    let both = json!({"email": "one@example.com", "loyalty_card": "K-81"});
    register(&mut h, "c-81", both.clone(), 0);
    // The e-mail merges c-82 into c-81; the card is then presented by c-81 again.
    register(&mut h, "c-82", both, 1);
    // The card's second holder: merged (the card is trusted), not shared.
    register(&mut h, "c-83", json!({"loyalty_card": "K-81"}), 2);
    h.advance(t0 + 3 * HOUR);
    assert_eq!(h.merged_away(), ["c-82", "c-83"]);
    let shared: Vec<_> = h
        .changes()
        .into_iter()
        .filter(|c| c.kind == IdentityChangeKind::identifier_shared)
        .collect();
    assert!(shared.is_empty(), "{shared:?}");
}

/// With identity resolution the identity processor converts orders and receipts into
/// `profile.currency` (the profile takes identified events as they come) and
/// dead-letters one in a currency without a rate.
#[test]
fn orders_are_converted_into_the_profile_s_currency_on_the_way_in() {
    let mut h = Harness::from_text(&format!(
        "{CONFIG}\n[profile]\ncurrency = \"EUR\"\n[profile.exchange_rates]\nUSD = 0.5\n"
    ));
    let t0 = at(T0);
    h.event(
        "events.site",
        "purchase",
        t0,
        json!({"customer_id": "c-95", "order": {"order_id": "o-1", "total": 100.0, "currency": "USD"}}),
    );
    h.event(
        "events.site",
        "purchase",
        t0 + HOUR,
        json!({"customer_id": "c-95", "order": {"order_id": "o-2", "total": 100.0, "currency": "CHF"}}),
    );
    h.receipt(t0 + 2 * HOUR, 40.0, json!({"customer_id": "c-95"}));
    h.advance(t0 + 3 * HOUR);
    let p = h.profile("c-95");
    assert_eq!((p.orders, p.revenue), (2, 50.0 + 40.0));
    assert_eq!(h.dead_letters().len(), 1);
}

#[test]
fn an_event_whose_only_identifier_is_invalid_goes_to_the_dead_letter_topic_with_the_reason() {
    let mut h = Harness::new();
    let t0 = at(T0);
    h.receipt(t0, 9.0, json!({"loyalty_card": "#!"}));
    h.receipt(t0 + MINUTE, 9.0, json!({"phone": "12"}));
    h.event(
        "events.site",
        "page_view",
        t0 + 2 * MINUTE,
        json!({"session_id": "s-1"}),
    );
    h.advance(t0 + HOUR);
    let dead = h.dead_letters();
    assert_eq!(dead.len(), 3, "{dead:?}");
    let reasons: Vec<String> = dead
        .iter()
        .map(|d| format!("{} {}", d.value["reason_code"], d.value["reason"]))
        .collect();
    assert!(
        reasons[0].contains("invalid_field") && reasons[0].contains("loyalty_card"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("invalid_field") && reasons[1].contains("phone"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("missing_field"), "{reasons:?}");
    assert_eq!(dead[0].value["source_topic"], "kairos.events.offline");
    assert!(
        h.of_topic("identified-events").is_empty(),
        "nothing invalid went on"
    );
}

#[test]
fn an_invalid_contact_or_card_is_taken_off_an_event_that_names_its_customer_otherwise() {
    let mut h = Harness::new();
    let t0 = at(T0);
    // A login with a mistyped address, a till receipt with a mistyped phone and a
    // card of punctuation: each still counts for its customer.
    h.event(
        "events.site",
        "login",
        t0,
        json!({"customer_id": "c-60", "email": "not-an-address",
            "profile": {"first_name": "Ute", "phone": "call me"}}),
    );
    h.receipt(
        t0 + MINUTE,
        9.0,
        json!({"customer_id": "c-60", "phone": "12", "loyalty_card": "#!"}),
    );
    h.advance(t0 + HOUR);
    assert!(h.dead_letters().is_empty(), "{:?}", h.dead_letters());
    let p = h.profile("c-60");
    assert_eq!((p.orders, p.revenue), (1, 9.0), "the receipt counted");
    assert_eq!(
        p.first_name.as_deref(),
        Some("Ute"),
        "the login's profile went on"
    );
    assert_eq!((p.email.as_deref(), p.phone.as_deref()), (None, None));
    let events = h.of_topic("identified-events");
    assert_eq!(events.len(), 2, "{events:?}");
    for e in &events {
        let record = &e.value["record"];
        assert_eq!(record["customer_id"], "c-60", "{e:?}");
        for field in ["email", "phone", "loyalty_card"] {
            assert!(record[field].is_null(), "{field} went on: {e:?}");
        }
    }
    // Four identifiers dropped, counted by kind.
    let dropped: Vec<(String, f64)> = h
        .identity_metrics
        .gather()
        .iter()
        .filter(|f| f.name() == "kairos_identity_invalid_identifiers_dropped_total")
        .flat_map(|f| f.get_metric().iter())
        .map(|m| {
            let kind = m.get_label().first().map(|l| l.value().to_string());
            (kind.unwrap_or_default(), m.get_counter().get_value())
        })
        .filter(|(_, n)| *n > 0.0)
        .collect();
    assert_eq!(
        dropped,
        [("email", 1.0), ("loyalty_card", 1.0), ("phone", 2.0)]
            .map(|(k, n)| (k.to_string(), n))
            .to_vec()
    );
}

#[test]
fn re_sent_merge_records_change_nothing() {
    let mut h = Harness::new();
    let t0 = at(T0);
    // c-72 gets a welcome e-mail; c-71 has no consent, so none. A receipt with c-72's
    // card merges c-72 into c-71.
    h.event(
        "events.site",
        "registration",
        t0,
        json!({"customer_id": "c-72",
        "loyalty_card": "CARD-9", "email": "c72@example.com",
        "consent": {"channel": "email", "granted": true}}),
    );
    h.purchase("events.site", "c-72", "o-72", 40.0, t0 + MINUTE);
    h.event(
        "events.site",
        "registration",
        t0 + HOUR,
        json!({"customer_id": "c-71"}),
    );
    h.receipt(
        t0 + 2 * HOUR,
        10.0,
        json!({"customer_id": "c-71", "loyalty_card": "card-9"}),
    );
    h.advance(t0 + 2 * HOUR + 5 * MINUTE);
    assert_eq!(h.sends().len(), 1, "{:?}", h.sends());
    let before = h.profile("c-71");
    assert_eq!((before.orders, before.offline_orders), (2, 1), "{before:?}");
    // Every merge record goes again, as an outbox does after a crash.
    let resent: Vec<Output> = h
        .outputs
        .iter()
        .filter(|o| {
            (o.topic == "identified-events"
                && o.value["kind"] != "site"
                && o.value["kind"] != "offline")
                || (o.topic == "customer-actions"
                    && (o.value["kind"] == "merged" || o.value["kind"] == "merge_in"))
        })
        .cloned()
        .collect();
    assert!(resent.len() >= 4, "{resent:?}");
    for o in resent {
        h.feed(&o.topic, &o.key, o.value);
    }
    h.advance(t0 + 3 * HOUR);
    let after = h.profile("c-71");
    assert_eq!(after.orders, before.orders, "orders counted once");
    assert_eq!(after.offline_orders, before.offline_orders);
    assert!((after.revenue - before.revenue).abs() < 1e-9);
    // The merged welcome counts once against the daily cap of 2: the cart reminder
    // is the second message of the day and goes out.
    h.event(
        "events.site",
        "add_to_cart",
        t0 + 3 * HOUR,
        json!({"customer_id": "c-71",
        "product": {"product_id": "p-5", "name": "Belt", "price": 30.0}}),
    );
    h.advance(t0 + 5 * HOUR);
    let carts: Vec<SendCommand> = h
        .sends()
        .into_iter()
        .filter(|s| s.scenario == "abandoned_cart")
        .collect();
    assert_eq!(carts.len(), 1, "{:?}", h.of_topic("decisions"));
    assert_eq!(carts[0].address.as_deref(), Some("c72@example.com"));
}

/// A visitor who never logs in is forgotten `anonymous_retention` after their last
/// event: their cookie and the e-mail they left no longer resolve to their profile.
/// One who keeps coming back, and one who logged in, are kept.
#[test]
fn an_anonymous_profile_is_forgotten_after_its_retention_without_an_event() {
    let mut h = Harness::with_identity("anonymous_retention = \"30d\"");
    let t0 = at(T0);
    // Each leaves an e-mail without logging in; a-3 then logs in as c-3.
    for a in ["a-1", "a-2", "a-3"] {
        h.event(
            "events.site",
            "page_view",
            t0,
            json!({"anonymous_id": a, "email": format!("{a}@example.com")}),
        );
    }
    h.event(
        "events.site",
        "login",
        t0 + HOUR,
        json!({"customer_id": "c-3", "anonymous_id": "a-3"}),
    );
    // a-2 comes back every 20 days; a-1 never does.
    let a2_visits = |h: &mut Harness, days: &[Millis]| {
        for day in days {
            h.event(
                "events.site",
                "page_view",
                t0 + day * DAY,
                json!({"anonymous_id": "a-2"}),
            );
        }
    };
    a2_visits(&mut h, &[20]);
    // A new cookie with a visitor's e-mail: the profile the e-mail leads to.
    let by_email = |h: &mut Harness, a: &str, time: Millis| {
        let probe = format!("probe-{}", h.next_event + 1);
        h.event(
            "events.site",
            "page_view",
            time,
            json!({"anonymous_id": probe, "email": format!("{a}@example.com")}),
        );
        let id = format!("e-{}", h.next_event);
        h.advance(time);
        (h.resolved(&id).expect("resolved"), format!("anon:{probe}"))
    };
    // Within the 30 days, the e-mail still finds a-1's profile.
    assert_eq!(by_email(&mut h, "a-1", t0 + 29 * DAY).0, "anon:a-1");
    a2_visits(&mut h, &[40, 60]);
    h.advance(t0 + 61 * DAY);
    // 30 days after a-1's last event (the look-up at day 29) a-1 is forgotten: the
    // e-mail no longer leads anywhere, and the new cookie starts a profile of its own.
    let (resolved, probe) = by_email(&mut h, "a-1", t0 + 61 * DAY);
    assert_eq!(resolved, probe);
    assert_eq!(by_email(&mut h, "a-2", t0 + 61 * DAY).0, "anon:a-2");
    assert_eq!(by_email(&mut h, "a-3", t0 + 61 * DAY).0, "c-3");
    h.event(
        "events.site",
        "page_view",
        t0 + 61 * DAY,
        json!({"anonymous_id": "a-3"}),
    );
    let id = format!("e-{}", h.next_event);
    assert_eq!(
        h.resolved(&id).as_deref(),
        Some("c-3"),
        "a stitched cookie stays"
    );
}

/// A cookie's link outlives its forgotten profile when a customer at the identifier
/// limit claimed it; the cookie's next visit begins the profile again at that visit
/// (whether it merges at once or first takes an identifier of its own), so an
/// anonymous profile seen before that visit survives their merge.
#[test]
fn a_profile_begun_again_from_a_kept_link_is_first_seen_at_its_visit() {
    for own_visit_first in [false, true] {
        let mut h = Harness::with_identity(
            "anonymous_retention = \"30d\"\nsurvivor = \"first_seen\"\n\
             max_identifiers_per_customer = 3",
        );
        let t0 = at(T0);
        let view =
            |h: &mut Harness, t: Millis, ids: Value| h.event("events.site", "page_view", t, ids);
        view(&mut h, t0, json!({"anonymous_id": "s-1"}));
        h.event(
            "events.site",
            "registration",
            t0 + HOUR,
            json!({"customer_id": "c-91", "email": "c91@example.com",
                   "phone": "+4915111119191", "loyalty_card": "K-91"}),
        );
        // c-91 holds its three identifiers: the cookie is claimed but stays apart.
        h.event(
            "events.site",
            "login",
            t0 + 2 * HOUR,
            json!({"customer_id": "c-91", "anonymous_id": "s-1"}),
        );
        h.advance(t0 + 35 * DAY);
        view(
            &mut h,
            t0 + 39 * DAY,
            json!({"anonymous_id": "r-1", "email": "shared@example.com"}),
        );
        if own_visit_first {
            // A phone of its own (with an e-mail of its own, the two anonymous
            // profiles would be two people met on one device, and stay apart).
            view(
                &mut h,
                t0 + 40 * DAY,
                json!({"anonymous_id": "s-1", "phone": "+4915100004040"}),
            );
        }
        view(
            &mut h,
            t0 + 41 * DAY,
            json!({"anonymous_id": "s-1", "email": "shared@example.com"}),
        );
        h.advance(t0 + 42 * DAY);
        let merges: Vec<(String, String)> = h
            .merges()
            .into_iter()
            .map(|m| (m.merged_from.unwrap_or_default(), m.customer_id))
            .collect();
        assert_eq!(
            merges,
            [("anon:s-1".to_string(), "anon:r-1".to_string())],
            "r-1 was seen first (own visit first: {own_visit_first}): {:?}",
            h.changes()
        );
    }
}

#[test]
fn a_placeholder_customer_stops_taking_identifiers_at_the_limit() {
    // A till sends "walk-in" as the customer of every anonymous sale, with the buyer's
    // phone: the customer takes three identifiers, then none.
    let mut h = Harness::with_identity("max_identifiers_per_customer = 3");
    let t0 = at(T0);
    let phone = |n: u32| format!("+49151000000{n:02}");
    // One buyer was seen alone before: an anonymous profile of that phone.
    h.receipt(t0, 5.0, json!({"phone": phone(9)}));
    for n in 1..=4 {
        h.receipt(
            t0 + Millis::from(n) * HOUR,
            10.0,
            json!({"customer_id": "walk-in", "phone": phone(n)}),
        );
    }
    h.receipt(
        t0 + 5 * HOUR,
        10.0,
        json!({"customer_id": "walk-in", "phone": phone(9)}),
    );
    // The same buyers' next receipts, by phone alone.
    for n in [1, 2, 4, 9] {
        h.receipt(
            t0 + 6 * HOUR + Millis::from(n) * MINUTE,
            1.0,
            json!({"phone": phone(n)}),
        );
    }
    h.advance(t0 + 8 * HOUR);
    // Every receipt named the walk-in customer is its own, linked or not.
    let walk_in = h.profile("walk-in");
    assert_eq!(walk_in.orders, 5 + 2, "{walk_in:?}");
    // Phones 1 to 3 were linked; phone 4 was not, and the anonymous profile of phone 9
    // was not merged in.
    assert_eq!(h.profile("phone:+4915100000004").orders, 1);
    assert_eq!(h.profile("phone:+4915100000009").orders, 2);
    assert!(h.merged_away().is_empty(), "{:?}", h.merged_away());
}

/// A newsletter form's opt-in names its subscriber by the e-mail alone: with identity
/// resolution that is a customer (the e-mail's own profile), not an event naming nobody.
#[test]
fn an_opt_in_named_by_its_e_mail_alone_is_kept() {
    let mut h = Harness::new();
    let t0 = at(T0);
    h.event(
        "events.site",
        "consent_change",
        t0,
        json!({"email": "ann@example.com", "consent": {"channel": "email", "granted": true}}),
    );
    h.advance(t0 + HOUR);
    assert!(h.dead_letters().is_empty(), "{:?}", h.dead_letters());
    let p = h.profile("email:ann@example.com");
    assert_eq!(p.consents.get(&Channel::email), Some(&true), "{p:?}");
}

/// A subscriber known by an e-mail alone, who only opens the newsletter, is kept by
/// the profile processor, and so by the identity graph: registering later with the
/// e-mail stitches their profile (consent and history) to the new customer instead
/// of leaving a second profile of the same mailbox.
#[test]
fn a_subscriber_who_only_reads_e_mails_stays_in_the_graph() {
    let mut h = Harness::with_identity("anonymous_retention = \"30d\"");
    let t0 = at(T0);
    h.event(
        "events.site",
        "page_view",
        t0,
        json!({"anonymous_id": "a-9", "email": "reader@example.com"}),
    );
    // Opens every 20 days, no other event.
    for (n, day) in [20, 40, 60].iter().enumerate() {
        let opened = json!({
            "outcome_id": format!("o-{n}"), "send_id": format!("s-{n}"),
            "customer_id": "anon:a-9", "scenario": "newsletter", "channel": "email",
            "category": "promo", "kind": "opened", "reason": null,
            "occurred_at": t0 + day * DAY,
        });
        h.feed("outcomes", "anon:a-9", opened);
        h.advance(t0 + day * DAY);
    }
    // Day 61: the last event was 61 days ago, the last open a day ago.
    h.event(
        "events.site",
        "registration",
        t0 + 61 * DAY,
        json!({"customer_id": "c-9", "email": "reader@example.com"}),
    );
    h.advance(t0 + 61 * DAY + HOUR);
    assert_eq!(h.merged_away(), ["anon:a-9"]);
    // Forgotten by the profile processor 30 days after the last open, the profile
    // leaves the graph then.
    h.advance(t0 + 200 * DAY);
    h.page_view_resolves_to("a-10", "gone@example.com", t0 + 200 * DAY);
    h.advance(t0 + 240 * DAY);
    let later = h.page_view_resolves_to("a-11", "gone@example.com", t0 + 240 * DAY);
    assert_eq!(later, "anon:a-11");
}

/// A heartbeat that names a visitor moves no clock of theirs: the profile processor
/// ignores heartbeats, so one that kept the visitor's graph entry alive would keep it
/// past the forgetting, for good.
#[test]
fn a_heartbeat_naming_a_visitor_does_not_keep_them_in_the_graph() {
    let mut h = Harness::with_identity("anonymous_retention = \"30d\"");
    let t0 = at(T0);
    h.page_view_resolves_to("a-5", "a5@example.com", t0);
    h.event(
        "events.site",
        "heartbeat",
        t0 + 20 * DAY,
        json!({"anonymous_id": "a-5"}),
    );
    h.advance(t0 + 31 * DAY);
    let later = h.page_view_resolves_to("probe", "a5@example.com", t0 + 31 * DAY);
    assert_eq!(later, "anon:probe");
}

/// A producer beats every partition in turn without a key (or with any): each
/// heartbeat goes on keyed to reach the profile's partition it was produced to, so
/// every partition's event time moves, not only the one an empty key hashes to.
#[test]
fn a_heartbeat_goes_on_to_the_partition_it_was_produced_to() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::from_text(Path::new("identity-test.toml"), CONFIG, &[])
        .unwrap_or_else(|e| panic!("{e}"));
    config.state.dir = dir.path().to_path_buf();
    let config = Arc::new(config);
    let registry = prometheus::Registry::new();
    let identity = IdentityProcessor::new(config.clone(), SchemaRegistry::new(None), &registry)
        .expect("identity processor");
    let mut replayer = Replayer::new(identity, &config, &registry).expect("replayer");
    let partitions = config.kafka.partitions;
    let identified = config.topic("identified-events");
    // The last key is not UTF-8: it cannot go on as the bytes it was produced with.
    for (n, key) in [&b""[..], b"c-1", b"some-key", b"\xff\xfe-beat"]
        .iter()
        .enumerate()
    {
        for partition in 0..partitions {
            let beat = json!({"event_id": format!("hb-{n}-{partition}"),
                "event_type": "heartbeat", "occurred_at": rfc(at(T0))});
            let mut out = replayer
                .push_to_partition(
                    &config.topic("events.site"),
                    partition,
                    key,
                    &serde_json::to_vec(&beat).expect("json"),
                )
                .expect("push");
            out.extend(replayer.commit().expect("commit"));
            let keys: Vec<i32> = out
                .iter()
                .filter(|e| !e.changelog && e.topic == identified)
                .map(|e| kairos_core::replay::partition_for(&e.key, partitions))
                .collect();
            assert_eq!(keys, [partition], "key {key:?}");
        }
    }
}

/// A customer action fed to the pipeline reaches every stage that reads its topic:
/// the identity processor (which reads `forgotten`) and the arbiter, which
/// dead-letters a kind it does not know.
#[test]
fn a_customer_action_fed_in_reaches_the_identity_processor_and_the_arbiter() {
    let mut h = Harness::new();
    let t0 = at(T0);
    h.feed(
        "customer-actions",
        "c-1",
        json!({"action_id": "x-1", "customer_id": "c-1", "kind": "no_such_kind",
               "occurred_at": t0}),
    );
    let letters: Vec<Value> = h
        .of_topic("deadletter")
        .into_iter()
        .map(|o| o.value.clone())
        .collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["service"], "arbiter", "{letters:?}");
    // One that is no action at all is dead-lettered once too, by the arbiter.
    h.feed("customer-actions", "c-1", json!(["not", "an", "action"]));
    let letters = h.of_topic("deadletter");
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(letters[1].value["service"], "arbiter", "{letters:?}");
    // Both reached the identity processor too.
    let read_by_identity: f64 = h
        .identity_metrics
        .gather()
        .iter()
        .filter(|f| f.name() == "kairos_input_records_total")
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.value() == "kairos.customer-actions")
        })
        .map(|m| m.get_counter().get_value())
        .sum();
    assert_eq!(read_by_identity, 2.0);
}
