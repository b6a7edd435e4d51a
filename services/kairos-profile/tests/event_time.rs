//! The profile processor and the catalog join in event-time mode, in process: every
//! scenario kind, driven by timestamps and heartbeats instead of the wall clock.

use std::path::Path;

use kairos_core::config::Config;
use kairos_core::store::OutboxEntry;
use kairos_core::time::{ClockMode, Millis, DAY, HOUR, MINUTE};
use kairos_profile::pipeline::Pipeline;
use serde_json::{json, Value};

const CONFIG: &str = r#"
[kafka]
partitions = 2

[state]
max_batch_records = 1

[clock]
mode = "event"

[arbiter]
control_group_percent = 0

[[scenarios]]
name = "abandoned_cart"
kind = "abandoned_cart"
channels = ["email"]
template = "abandoned_cart"
delay = "1h"
valid_for = "12h"

[[scenarios]]
name = "browse_abandonment"
kind = "browse_abandonment"
channels = ["email"]
template = "browse_abandonment"
delay = "2h"

[[scenarios]]
name = "welcome"
kind = "welcome"
channels = ["email"]
template = "welcome"
delay = "0s"
tolerance = "1d"
steps = [
    { delay = "2d", template = "welcome_2" },
    { delay = "3d", template = "welcome_3" },
]

[[scenarios]]
name = "post_purchase"
kind = "post_purchase"
channels = ["email"]
template = "post_purchase"
delay = "14d"

[[scenarios]]
name = "reactivation"
kind = "reactivation"
channels = ["email"]
template = "reactivation"
delay = "30d"

[[scenarios]]
name = "birthday"
kind = "birthday"
channels = ["email"]
template = "birthday"
local_time = "10:00"

[[scenarios]]
name = "registration_anniversary"
kind = "registration_anniversary"
channels = ["email"]
template = "registration_anniversary"
local_time = "12:00"

[[scenarios]]
name = "subscription_ending"
kind = "subscription_ending"
channels = ["email"]
template = "subscription_ending"
delay = "5d"

[[scenarios]]
name = "post_delivery"
kind = "post_delivery"
channels = ["email"]
template = "post_delivery"
delay = "2d"

[[scenarios]]
name = "order_update"
kind = "order_update"
category = "transactional"
channels = ["email"]
template = "order_update"
statuses = ["shipped"]

[[scenarios]]
name = "win_back"
kind = "segment_entered"
segment = "At Risk"
channels = ["email"]
template = "win_back"

[[scenarios]]
name = "vip"
kind = "segment_entered"
segment = "Champions"
channels = ["email"]
template = "vip"

[[scenarios]]
name = "price_drop"
kind = "price_drop"
channels = ["email"]
template = "price_drop"
min_drop_percent = 10

[[scenarios]]
name = "back_in_stock"
kind = "back_in_stock"
channels = ["email"]
template = "back_in_stock"
"#;

/// Epoch milliseconds of an RFC 3339 timestamp.
fn at(s: &str) -> Millis {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("bad timestamp {s:?}: {e}"))
        .timestamp_millis()
}

/// RFC 3339 of epoch milliseconds, as events carry it.
fn rfc(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("timestamp in range")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// One output record: topic without the prefix, key, decoded JSON value.
#[derive(Debug, Clone)]
struct Output {
    topic: String,
    key: String,
    value: Value,
}

struct Harness {
    pipeline: Pipeline,
    outputs: Vec<Output>,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        Self::with(CONFIG, ClockMode::Event)
    }

    /// A harness on `config_text` (the test configuration, edited) with `mode`.
    fn with(config_text: &str, mode: ClockMode) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::from_text(Path::new("test.toml"), config_text, &[])
            .unwrap_or_else(|e| panic!("{e}"));
        config.state.dir = dir.path().to_path_buf();
        config.clock.mode = mode;
        assert_eq!(config.kafka.partitions, 2);
        assert_eq!(config.state.max_batch_records, 1);
        let pipeline = Pipeline::new(&config).expect("pipeline");
        Harness {
            pipeline,
            outputs: Vec::new(),
            _dir: dir,
        }
    }

    /// Stops the pipeline and starts it again on the same state with `config_text`
    /// (a deployment with a changed configuration).
    fn restart_with(&mut self, config_text: &str) {
        self.restart_in(config_text, ClockMode::Event);
    }

    /// [`Self::restart_with`] in clock `mode`.
    fn restart_in(&mut self, config_text: &str, mode: ClockMode) {
        self.commit();
        let config_on = |dir: &Path| {
            let mut config = Config::from_text(Path::new("test.toml"), config_text, &[])
                .unwrap_or_else(|e| panic!("{e}"));
            config.state.dir = dir.to_path_buf();
            config.clock.mode = mode;
            config
        };
        // The stores are closed before they open again.
        let elsewhere = tempfile::tempdir().expect("temp dir");
        let stand_in = Pipeline::new(&config_on(elsewhere.path())).expect("pipeline");
        drop(std::mem::replace(&mut self.pipeline, stand_in));
        self.pipeline = Pipeline::new(&config_on(self._dir.path())).expect("pipeline");
    }

    fn sink(outputs: &mut Vec<Output>) -> impl FnMut(&OutboxEntry) -> anyhow::Result<()> + '_ {
        move |e: &OutboxEntry| {
            let value: Value = serde_json::from_slice(&e.payload)?;
            outputs.push(Output {
                topic: e
                    .topic
                    .strip_prefix("kairos.")
                    .unwrap_or(&e.topic)
                    .to_string(),
                key: String::from_utf8_lossy(&e.key).into_owned(),
                value,
            });
            Ok(())
        }
    }

    /// Feeds one JSON record to `kairos.<topic>` with `key`.
    fn feed(&mut self, topic: &str, key: &str, value: Value) {
        let payload = serde_json::to_vec(&value).expect("json");
        let mut sink = Self::sink(&mut self.outputs);
        self.pipeline
            .push(
                &format!("kairos.{topic}"),
                key.as_bytes(),
                &payload,
                &mut sink,
            )
            .expect("push");
    }

    /// A site event of `customer`; `extra` fields are merged in.
    fn site(
        &mut self,
        event_id: &str,
        event_type: &str,
        customer: &str,
        time: Millis,
        extra: Value,
    ) {
        let mut e = json!({
            "event_id": event_id,
            "event_type": event_type,
            "occurred_at": rfc(time),
            "customer_id": customer,
        });
        if let (Some(obj), Value::Object(more)) = (e.as_object_mut(), extra) {
            obj.extend(more);
        }
        self.feed("events.site", customer, e);
    }

    /// A till receipt of `customer`.
    fn receipt(&mut self, event_id: &str, kind: &str, customer: &str, time: Millis, total: f64) {
        let r = json!({
            "event_id": event_id,
            "occurred_at": rfc(time),
            "receipt_id": format!("r-{event_id}"),
            "kind": kind,
            "store_id": "store-1",
            "customer_id": customer,
            "items": [{"product_id": "p-till", "quantity": 1, "unit_price": total}],
            "total": total,
            "currency": "EUR",
        });
        self.feed("events.offline", customer, r);
    }

    /// A catalog update of `product`; `fields` are merged in (price, in_stock, name).
    fn catalog(&mut self, event_id: &str, product: &str, time: Millis, fields: Value) {
        let mut u = json!({
            "event_id": event_id,
            "occurred_at": rfc(time),
            "product_id": product,
        });
        if let (Some(obj), Value::Object(more)) = (u.as_object_mut(), fields) {
            obj.extend(more);
        }
        self.feed("catalog", product, u);
    }

    fn advance(&mut self, t: Millis) {
        let mut sink = Self::sink(&mut self.outputs);
        self.pipeline.advance_to(t, &mut sink).expect("advance");
    }

    fn commit(&mut self) {
        let mut sink = Self::sink(&mut self.outputs);
        self.pipeline.commit(&mut sink).expect("commit");
    }

    fn on(&self, topic: &str) -> impl Iterator<Item = &Output> {
        let topic = topic.to_string();
        self.outputs.iter().filter(move |o| o.topic == topic)
    }

    fn triggers(&self, customer: &str, scenario: &str) -> Vec<Value> {
        self.on("triggers")
            .filter(|o| o.value["customer_id"] == customer && o.value["scenario"] == scenario)
            .inspect(|o| assert_eq!(o.key, customer, "triggers are keyed by customer"))
            .map(|o| o.value.clone())
            .collect()
    }

    fn transitions(&self, customer: &str) -> Vec<Value> {
        self.on("segment-transitions")
            .filter(|o| o.value["customer_id"] == customer)
            .map(|o| o.value.clone())
            .collect()
    }

    fn trigger_ids(&self) -> Vec<String> {
        self.on("triggers")
            .map(|o| {
                o.value["trigger_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    }
}

/// The trigger's template variables (a JSON object carried as a string).
fn vars(trigger: &Value) -> Value {
    let s = trigger["variables"]
        .as_str()
        .expect("variables is a string");
    serde_json::from_str(s).expect("variables is JSON")
}

fn product(id: &str, price: f64) -> Value {
    json!({"product_id": id, "name": format!("Product {id}"), "category": "kitchen", "price": price})
}

fn add_to_cart(id: &str, price: f64) -> Value {
    json!({ "product": product(id, price) })
}

fn order(order_id: &str, total: f64, status: Option<&str>) -> Value {
    match status {
        Some(s) => json!({"order": {"order_id": order_id, "total": total, "status": s}}),
        None => json!({"order": {"order_id": order_id, "total": total}}),
    }
}

/// An order of 50 with one item of `product`, as a purchase event's fields.
fn order_of_one(order_id: &str, product: &str) -> Value {
    let mut o = order(order_id, 50.0, None);
    o["items"] = json!([{"product_id": product, "quantity": 1, "unit_price": 50.0}]);
    o
}

/// The customer's one post-purchase follow-up is for `order_id` and names `product`.
fn follow_up_names(h: &Harness, customer: &str, order_id: &str, product: &str) {
    let fired = h.triggers(customer, "post_purchase");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    let v = vars(&fired[0]);
    assert_eq!(v["order_id"], order_id);
    assert_eq!(v["order_items"][0]["product_id"], product, "{v}");
    assert_eq!(v["order_items"].as_array().map(Vec::len), Some(1), "{v}");
}

const T0: &str = "2026-03-02T10:00:00Z";

// 1. Abandoned cart.

#[test]
fn abandoned_cart_fires_exactly_after_the_delay_with_the_cart() {
    let t0 = at(T0);
    let mut h = Harness::new();
    h.site("ac1-add", "add_to_cart", "ac1", t0, add_to_cart("p1", 12.5));
    h.advance(t0 + 59 * MINUTE);
    assert!(
        h.triggers("ac1", "abandoned_cart").is_empty(),
        "not before the delay"
    );
    h.advance(t0 + HOUR);
    let fired = h.triggers("ac1", "abandoned_cart");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    let t = &fired[0];
    assert_eq!(t["fired_at"], t0 + HOUR);
    assert_eq!(
        t["valid_until"],
        t0 + HOUR + 12 * HOUR,
        "fired_at + valid_for"
    );
    assert_eq!(t["step"], 0);
    assert_eq!(t["template"], "abandoned_cart");
    assert_eq!(t["category"], "trigger");
    assert_eq!(t["channels"], json!(["email"]));
    assert_eq!(t["cause_event_id"], "ac1-add");
    assert_eq!(t["cause_occurred_at"], t0);
    let v = vars(t);
    let items = v["cart_items"].as_array().expect("cart_items");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["product_id"], "p1");
    assert_eq!(items[0]["quantity"], 1);
    assert_eq!(items[0]["unit_price"], 12.5);
    // Nothing more later.
    h.advance(t0 + 3 * HOUR);
    assert_eq!(h.triggers("ac1", "abandoned_cart").len(), 1);
}

#[test]
fn abandoned_cart_wait_restarts_on_cart_change() {
    let t0 = at(T0);
    let mut h = Harness::new();
    h.site(
        "ac2-add1",
        "add_to_cart",
        "ac2",
        t0,
        add_to_cart("p1", 10.0),
    );
    h.site(
        "ac2-add2",
        "add_to_cart",
        "ac2",
        t0 + 30 * MINUTE,
        add_to_cart("p2", 20.0),
    );
    h.advance(t0 + HOUR);
    assert!(
        h.triggers("ac2", "abandoned_cart").is_empty(),
        "the first wait was restarted"
    );
    h.advance(t0 + HOUR + 29 * MINUTE);
    assert!(h.triggers("ac2", "abandoned_cart").is_empty());
    h.advance(t0 + HOUR + 30 * MINUTE);
    let fired = h.triggers("ac2", "abandoned_cart");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t0 + 90 * MINUTE);
    assert_eq!(fired[0]["cause_event_id"], "ac2-add2");
    let items = vars(&fired[0])["cart_items"].clone();
    assert_eq!(items.as_array().map(Vec::len), Some(2), "{items}");
    assert_eq!(vars(&fired[0])["cart_value"], 30.0);
}

#[test]
fn abandoned_cart_is_cancelled_by_an_online_purchase() {
    let t0 = at(T0);
    let mut h = Harness::new();
    h.site("ac3-add", "add_to_cart", "ac3", t0, add_to_cart("p1", 10.0));
    h.site(
        "ac3-buy",
        "purchase",
        "ac3",
        t0 + 20 * MINUTE,
        order("o-ac3", 10.0, None),
    );
    h.advance(t0 + 3 * HOUR);
    assert!(h.triggers("ac3", "abandoned_cart").is_empty());
    // The arbiter hears of the purchase too (to drop queued messages, pause promo).
    let actions: Vec<_> = h
        .outputs
        .iter()
        .filter(|o| o.topic == "customer-actions" && o.value["kind"] == "purchase")
        .collect();
    assert_eq!(actions.len(), 1, "{actions:#?}");
    assert_eq!(actions[0].key, "ac3");
    assert_eq!(actions[0].value["kind"], "purchase");
    assert_eq!(actions[0].value["order_id"], "o-ac3");
    assert_eq!(actions[0].value["occurred_at"], t0 + 20 * MINUTE);
}

#[test]
fn abandoned_cart_is_cancelled_by_an_offline_receipt() {
    let t0 = at(T0);
    let mut h = Harness::new();
    h.site("ac4-add", "add_to_cart", "ac4", t0, add_to_cart("p1", 10.0));
    h.receipt("ac4-till", "sale", "ac4", t0 + 20 * MINUTE, 10.0);
    h.advance(t0 + 3 * HOUR);
    assert!(h.triggers("ac4", "abandoned_cart").is_empty());
    assert!(
        h.outputs
            .iter()
            .any(|o| o.topic == "customer-actions" && o.key == "ac4"),
        "an offline sale is a purchase for the arbiter too"
    );
}

#[test]
fn abandoned_cart_out_of_order_receipt_still_prevents_the_reminder() {
    let t0 = at(T0);
    let mut h = Harness::new();
    // The receipt (20 minutes after the cart change) is consumed first.
    h.receipt("ac5-till", "sale", "ac5", t0 + 20 * MINUTE, 10.0);
    h.site("ac5-add", "add_to_cart", "ac5", t0, add_to_cart("p1", 10.0));
    h.advance(t0 + 3 * HOUR);
    assert!(h.triggers("ac5", "abandoned_cart").is_empty());
}

// 2. Duplicates.

#[test]
fn duplicate_event_ids_are_applied_once() {
    let t0 = at(T0);
    let mut h = Harness::new();
    let cart = add_to_cart("p1", 10.0);
    h.site("dup-add", "add_to_cart", "dup1", t0, cart.clone());
    h.site("dup-add", "add_to_cart", "dup1", t0, cart);
    h.advance(t0 + HOUR);
    let fired = h.triggers("dup1", "abandoned_cart");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    let items = vars(&fired[0])["cart_items"].clone();
    assert_eq!(items.as_array().map(Vec::len), Some(1), "{items}");
    assert_eq!(items[0]["quantity"], 1, "{items}");

    h.site(
        "dup-buy",
        "purchase",
        "dup2",
        t0,
        order("o-dup", 40.0, None),
    );
    h.site(
        "dup-buy",
        "purchase",
        "dup2",
        t0,
        order("o-dup", 40.0, None),
    );
    h.advance(t0 + 14 * DAY);
    let follow_up = h.triggers("dup2", "post_purchase");
    assert_eq!(follow_up.len(), 1, "{follow_up:#?}");
    assert_eq!(
        vars(&follow_up[0])["orders"],
        1,
        "the duplicate purchase was not counted"
    );
    let to_new = h
        .transitions("dup2")
        .into_iter()
        .filter(|t| t["kind"] == "lifecycle" && t["to_segment"] == "new")
        .count();
    assert_eq!(to_new, 1);
}

// 3. Browse abandonment.

#[test]
fn browse_abandonment_fires_two_hours_after_a_view() {
    let t0 = at(T0);
    let mut h = Harness::new();
    h.site(
        "ba1-view",
        "product_view",
        "ba1",
        t0,
        json!({"product": product("p7", 55.0)}),
    );
    h.advance(t0 + 2 * HOUR - MINUTE);
    assert!(h.triggers("ba1", "browse_abandonment").is_empty());
    h.advance(t0 + 2 * HOUR);
    let fired = h.triggers("ba1", "browse_abandonment");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t0 + 2 * HOUR);
    let v = vars(&fired[0]);
    assert_eq!(v["product"]["product_id"], "p7", "{v}");
    assert_eq!(v["product"]["price"], 55.0, "{v}");
}

#[test]
fn browse_abandonment_waits_from_the_latest_view_and_offers_its_product() {
    let t0 = at(T0);
    let mut h = Harness::new();
    for (i, (id, price)) in [("p7", 55.0), ("p8", 60.0), ("p9", 65.0)]
        .iter()
        .enumerate()
    {
        h.site(
            &format!("ba3-view{i}"),
            "product_view",
            "ba3",
            t0 + i as Millis * 20 * MINUTE,
            json!({"product": product(id, *price)}),
        );
    }
    h.advance(t0 + 2 * HOUR + 39 * MINUTE);
    assert!(
        h.triggers("ba3", "browse_abandonment").is_empty(),
        "every view restarts the wait"
    );
    h.advance(t0 + 5 * HOUR);
    let fired = h.triggers("ba3", "browse_abandonment");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t0 + 2 * HOUR + 40 * MINUTE);
    assert_eq!(fired[0]["cause_event_id"], "ba3-view2");
    assert_eq!(vars(&fired[0])["product"]["product_id"], "p9");
}

#[test]
fn browse_abandonment_not_after_add_to_cart() {
    let t0 = at(T0);
    let mut h = Harness::new();
    h.site(
        "ba2-view",
        "product_view",
        "ba2",
        t0,
        json!({"product": product("p7", 55.0)}),
    );
    h.site(
        "ba2-add",
        "add_to_cart",
        "ba2",
        t0 + 10 * MINUTE,
        add_to_cart("p7", 55.0),
    );
    h.advance(t0 + 5 * HOUR);
    assert!(h.triggers("ba2", "browse_abandonment").is_empty());
    // The cart reminder took over.
    assert_eq!(h.triggers("ba2", "abandoned_cart").len(), 1);
}

/// A cart left long ago, its reminder gone out, does not silence browse abandonment
/// for good; a cart changed within the cart chain's reach (1 h and its 12 h tolerance)
/// before the view does, counted as such.
#[test]
fn browse_abandonment_goes_out_past_a_cart_whose_reminder_is_long_past() {
    let t0 = at(T0);
    let mut h = Harness::new();
    for customer in ["old", "new"] {
        h.site(
            &format!("{customer}-add"),
            "add_to_cart",
            customer,
            t0,
            add_to_cart("p1", 20.0),
        );
    }
    h.advance(t0 + 2 * HOUR);
    assert_eq!(h.triggers("old", "abandoned_cart").len(), 1);
    // The cart reminder reaches 1 h + its 12 h tolerance after the cart's change.
    h.site(
        "new-view",
        "product_view",
        "new",
        t0 + 3 * HOUR,
        json!({"product": product("p8", 40.0)}),
    );
    h.site(
        "old-view",
        "product_view",
        "old",
        t0 + 60 * DAY,
        json!({"product": product("p8", 40.0)}),
    );
    h.advance(t0 + 61 * DAY);
    let fired = h.triggers("old", "browse_abandonment");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t0 + 60 * DAY + 2 * HOUR);
    assert!(h.triggers("new", "browse_abandonment").is_empty());
    let carted = metric(
        &h,
        "kairos_triggers_skipped_total",
        &[r#"scenario="browse_abandonment""#, r#"reason="carted""#],
    );
    assert_eq!(carted, 1.0);
}

// 4. Welcome chain.

#[test]
fn welcome_chain_runs_its_steps() {
    let t = at("2026-04-01T09:00:00Z");
    let mut h = Harness::new();
    h.site(
        "w1-reg",
        "registration",
        "w1",
        t,
        json!({"email": "w1@example.com"}),
    );
    h.commit();
    let fired = h.triggers("w1", "welcome");
    assert_eq!(fired.len(), 1, "step 0 right away: {fired:#?}");
    h.advance(t + 2 * DAY - MINUTE);
    assert_eq!(h.triggers("w1", "welcome").len(), 1);
    h.advance(t + 2 * DAY);
    assert_eq!(h.triggers("w1", "welcome").len(), 2);
    h.advance(t + 5 * DAY - MINUTE);
    assert_eq!(h.triggers("w1", "welcome").len(), 2);
    h.advance(t + 30 * DAY);
    let fired = h.triggers("w1", "welcome");
    let got: Vec<(i64, String, i64)> = fired
        .iter()
        .map(|t| {
            (
                t["step"].as_i64().unwrap_or(-1),
                t["template"].as_str().unwrap_or_default().to_string(),
                t["fired_at"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (0, "welcome".to_string(), t),
            (1, "welcome_2".to_string(), t + 2 * DAY),
            (2, "welcome_3".to_string(), t + 5 * DAY),
        ]
    );
    assert_eq!(fired[0]["contacts"]["email"], "w1@example.com");
    let mut ids: Vec<&str> = fired
        .iter()
        .filter_map(|t| t["trigger_id"].as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "distinct trigger ids per step");
}

#[test]
fn welcome_chain_ends_on_purchase() {
    let t = at("2026-04-01T09:00:00Z");
    let mut h = Harness::new();
    h.site("w2-reg", "registration", "w2", t, json!({}));
    h.site(
        "w2-buy",
        "purchase",
        "w2",
        t + DAY,
        order("o-w2", 30.0, None),
    );
    h.advance(t + 10 * DAY);
    let fired = h.triggers("w2", "welcome");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["step"], 0);
}

/// A step's own `exit_on_purchase`: the how-to step goes out to a buyer too, the
/// series ends at the step that keeps its scenario's (a purchase ends a welcome).
#[test]
fn a_step_that_does_not_end_on_purchase_goes_out_and_the_next_one_ends_the_chain() {
    let config = CONFIG.replace(
        "    { delay = \"2d\", template = \"welcome_2\" },",
        "    { delay = \"2d\", template = \"welcome_2\", exit_on_purchase = false },",
    );
    let t = at("2026-04-01T09:00:00Z");
    let mut h = Harness::with(&config, ClockMode::Event);
    h.site("ws-reg", "registration", "ws", t, json!({}));
    h.site(
        "ws-buy",
        "purchase",
        "ws",
        t + DAY,
        order("o-ws", 30.0, None),
    );
    h.advance(t + 10 * DAY);
    let steps: Vec<_> = h
        .triggers("ws", "welcome")
        .iter()
        .map(|t| t["step"].clone())
        .collect();
    assert_eq!(steps, [json!(0), json!(1)]);
}

/// A guest checkout, then an account: the welcome series runs in full however the
/// two arrive (the site's purchase processed after the app's registration).
#[test]
fn a_purchase_before_the_registration_leaves_the_welcome_series_alone_whichever_arrives_first() {
    let t = at("2026-04-01T09:00:00Z");
    let steps_sent = |first_purchase: bool| {
        let mut h = Harness::new();
        let buy = |h: &mut Harness| {
            h.site("gc-buy", "purchase", "gc", t, order("o-gc", 30.0, None));
        };
        if first_purchase {
            buy(&mut h);
        }
        h.feed(
            "events.app",
            "gc",
            json!({"event_id": "gc-reg", "event_type": "registration",
                "occurred_at": rfc(t + 5 * MINUTE), "customer_id": "gc"}),
        );
        if !first_purchase {
            buy(&mut h);
        }
        h.advance(t + 10 * DAY);
        h.triggers("gc", "welcome").len()
    };
    assert_eq!(steps_sent(true), 3, "in time order");
    assert_eq!(
        steps_sent(false),
        3,
        "the purchase processed after the registration"
    );
}

// 5. Post purchase.

#[test]
fn post_purchase_fires_after_fourteen_days() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("pp1-buy", "purchase", "pp1", t, order("o-pp1", 80.0, None));
    h.advance(t + 14 * DAY - MINUTE);
    assert!(h.triggers("pp1", "post_purchase").is_empty());
    h.advance(t + 14 * DAY);
    let fired = h.triggers("pp1", "post_purchase");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t + 14 * DAY);
    assert_eq!(vars(&fired[0])["order_id"], "o-pp1");
}

/// The follow-up (a review request) names what was bought: the checked-out cart, the
/// order's own items, or a till receipt's.
#[test]
fn post_purchase_names_the_items_bought() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site(
        "pi-add",
        "add_to_cart",
        "pi1",
        t,
        add_to_cart("p-kettle", 40.0),
    );
    h.site(
        "pi-buy",
        "purchase",
        "pi1",
        t + MINUTE,
        order("o-pi1", 40.0, None),
    );
    let mut with_items = order("o-pi2", 25.0, None);
    with_items["items"] =
        json!([{"product_id": "p-mug", "name": "Mug", "quantity": 2, "unit_price": 12.5}]);
    h.site("pi-buy2", "purchase", "pi2", t, with_items);
    h.receipt("pi-till", "sale", "pi3", t, 30.0);
    // A purchase without an order id names its items too.
    h.site(
        "pi-buy4",
        "purchase",
        "pi4",
        t,
        json!({"items": [{"product_id": "p-cup", "name": "Cup", "quantity": 1, "unit_price": 9.0}]}),
    );
    h.advance(t + 15 * DAY);
    let items = |customer: &str| {
        let fired = h.triggers(customer, "post_purchase");
        assert_eq!(fired.len(), 1, "{fired:#?}");
        let v = vars(&fired[0]);
        let ids: Vec<String> = (v["order_items"].as_array().expect("order_items").iter())
            .map(|i| i["product_id"].as_str().unwrap_or_default().to_string())
            .collect();
        (v["order_id"].as_str().unwrap_or_default().to_string(), ids)
    };
    assert_eq!(items("pi1"), ("o-pi1".into(), vec!["p-kettle".to_string()]));
    assert_eq!(items("pi2"), ("o-pi2".into(), vec!["p-mug".to_string()]));
    assert_eq!(
        items("pi3"),
        ("r-pi-till".into(), vec!["p-till".to_string()])
    );
    assert_eq!(items("pi4"), (String::new(), vec!["p-cup".to_string()]));
}

#[test]
fn a_purchase_without_a_total_or_items_buys_the_cart_and_is_worth_nothing() {
    let t = at(T0);
    let mut h = Harness::new();
    for (i, (product, price)) in [("p-kettle", 40.0), ("p-mug", 12.5)]
        .into_iter()
        .enumerate()
    {
        h.site(
            &format!("wc-add{i}"),
            "add_to_cart",
            "wc",
            t,
            add_to_cart(product, price),
        );
    }
    let bare = json!({"order": {"order_id": "o-wc"}});
    h.site("wc-buy", "purchase", "wc", t + MINUTE, bare);
    // One without a cart counts as an order worth nothing.
    h.site(
        "wn-buy",
        "purchase",
        "wn",
        t,
        json!({"order": {"order_id": "o-wn"}}),
    );
    h.advance(t + HOUR);
    let profile = |c: &str| h.pipeline.profile(c).expect("read").expect("stored");
    let wc = profile("wc");
    assert_eq!((wc.orders, wc.revenue), (1, 0.0), "as feedback counts it");
    assert!(wc.cart.is_empty(), "the cart was bought: {:?}", wc.cart);
    let wn = profile("wn");
    assert_eq!((wn.orders, wn.revenue), (1, 0.0));
}

#[test]
fn post_purchase_is_cancelled_by_a_return() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("pp2-buy", "purchase", "pp2", t, order("o-pp2", 80.0, None));
    h.site(
        "pp2-ret",
        "order_status",
        "pp2",
        t + 3 * DAY,
        order("o-pp2", 80.0, Some("returned")),
    );
    h.advance(t + 20 * DAY);
    assert!(h.triggers("pp2", "post_purchase").is_empty());
}

#[test]
fn a_return_mark_holds_off_a_late_purchases_follow_up_and_then_expires() {
    let t = at(T0);
    let mut h = Harness::new();
    // The return comes before its purchase, and another one whose purchase never
    // comes: both orders are marked returned.
    for (id, order_id) in [("rm-ret1", "o-rm1"), ("rm-ret2", "o-rm2")] {
        h.site(
            id,
            "order_status",
            "rm",
            t,
            order(order_id, 80.0, Some("returned")),
        );
    }
    h.site(
        "rm-buy1",
        "purchase",
        "rm",
        t - DAY,
        order("o-rm1", 80.0, None),
    );
    h.commit();
    let marks = h.pipeline.profile_state_keys("rt/").expect("keys");
    assert_eq!(marks, ["rt/rm\0o-rm1", "rt/rm\0o-rm2"]);
    // No review request for the order sent back. Its mark stays after it is read (a
    // second post-purchase scenario of the order reads it too).
    h.advance(t + 14 * DAY);
    assert!(h.triggers("rm", "post_purchase").is_empty());
    h.commit();
    let marks = h.pipeline.profile_state_keys("rt/").expect("keys");
    assert_eq!(marks, ["rt/rm\0o-rm1", "rt/rm\0o-rm2"]);
    // Both go once no follow-up of their orders could fire any more (14 days of
    // delay, a day of tolerance and a day more).
    h.advance(t + 16 * DAY - MINUTE);
    h.commit();
    assert_eq!(h.pipeline.profile_state_keys("rt/").expect("keys").len(), 2);
    h.advance(t + 16 * DAY);
    h.commit();
    let marks = h.pipeline.profile_state_keys("rt/").expect("keys");
    assert!(marks.is_empty(), "{marks:?}");
}

#[test]
fn a_return_or_cancellation_that_comes_before_its_purchase_is_applied_to_it() {
    let t = at(T0);
    let mut h = Harness::new();
    // Cancelled: the app's status read before the site's purchase of the cart (within
    // the cart's hour, so event time does not pass the reminder before the purchase).
    let cart = add_to_cart("p1", 80.0);
    h.site("rb-cart", "add_to_cart", "rb", t - 10 * MINUTE, cart);
    let cancelled = order("o-rb", 80.0, Some("cancelled"));
    h.site(
        "rb-cancel",
        "order_status",
        "rb",
        t + 10 * MINUTE,
        cancelled,
    );
    h.site("rb-buy", "purchase", "rb", t, order("o-rb", 80.0, None));
    // Delivered and returned (no amount: the whole order) before the purchase.
    let delivered = order_status("o-rr", "delivered");
    h.site("rr-del", "order_status", "rr", t + DAY, delivered);
    let returned = order_status("o-rr", "returned");
    h.site("rr-back", "order_status", "rr", t + DAY + HOUR, returned);
    h.site("rr-buy", "purchase", "rr", t, order("o-rr", 80.0, None));
    // A customer with an earlier order: 30 of 80 returned before the purchase came.
    h.site(
        "rp-old",
        "purchase",
        "rp",
        t - 10 * DAY,
        order("o-rp0", 50.0, None),
    );
    let part = order("o-rp", 30.0, Some("returned"));
    h.site("rp-back", "order_status", "rp", t + DAY, part);
    h.site("rp-buy", "purchase", "rp", t, order("o-rp", 80.0, None));
    // The producer re-sends that return under a new event id: it applies once.
    let again = order("o-rp", 30.0, Some("returned"));
    h.site("rp-back-again", "order_status", "rp", t + DAY, again);
    h.advance(t + 30 * DAY);
    let profile = |c: &str| h.pipeline.profile(c).expect("read").expect("stored");
    let rb = profile("rb");
    assert_eq!(
        (rb.orders, rb.revenue),
        (0, 0.0),
        "a cancelled order counts for nothing"
    );
    let rr = profile("rr");
    assert_eq!((rr.orders, rr.revenue, rr.returns), (1, 0.0, 1));
    let rp = profile("rp");
    assert_eq!((rp.orders, rp.revenue, rp.returns), (2, 100.0, 1));
    for c in ["rb", "rr"] {
        assert!(h.triggers(c, "post_purchase").is_empty(), "{c}");
    }
    // The returned order never took the follow-up from the earlier one, as in time
    // order, where its return would have given it back.
    let rp_follow_up = h.triggers("rp", "post_purchase");
    assert_eq!(rp_follow_up.len(), 1, "{rp_follow_up:#?}");
    assert_eq!(vars(&rp_follow_up[0])["order_id"], "o-rp0");
    assert_eq!(rp_follow_up[0]["fired_at"], t + 4 * DAY);
    assert!(
        h.triggers("rr", "post_delivery").is_empty(),
        "no NPS for a returned order"
    );
    // The checkout still happened, as when the purchase is read first: the cart
    // reminder ends and the arbiter hears of the purchase.
    assert!(h.triggers("rb", "abandoned_cart").is_empty());
    let purchases_of_rb = h
        .on("customer-actions")
        .filter(|a| a.value["customer_id"] == "rb" && a.value["kind"] == "purchase")
        .count();
    assert_eq!(purchases_of_rb, 1);
}

#[test]
fn post_purchase_is_cancelled_by_a_till_refund() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("pp3-buy", "purchase", "pp3", t, order("o-pp3", 80.0, None));
    h.receipt("pp3-refund", "refund", "pp3", t + 3 * DAY, 80.0);
    // Half the order back may be it, in part.
    h.site("pp4-buy", "purchase", "pp4", t, order("o-pp4", 80.0, None));
    h.receipt("pp4-refund", "refund", "pp4", t + 3 * DAY, 40.0);
    // A small refund at a store is no return of a large order.
    h.site("pp5-buy", "purchase", "pp5", t, order("o-pp5", 500.0, None));
    h.receipt("pp5-refund", "refund", "pp5", t + 3 * DAY, 5.0);
    h.advance(t + 20 * DAY);
    assert!(h.triggers("pp3", "post_purchase").is_empty());
    assert!(h.triggers("pp4", "post_purchase").is_empty());
    let kept = h.triggers("pp5", "post_purchase");
    assert_eq!(kept.len(), 1, "{kept:#?}");
    assert_eq!(vars(&kept[0])["order_id"], "o-pp5");
    let refunded = metric(
        &h,
        "kairos_triggers_skipped_total",
        &[r#"scenario="post_purchase""#, r#"reason="refunded""#],
    );
    assert_eq!(refunded, 2.0);
}

// 6. Reactivation.

/// One follow-up per customer, for the latest order: when that order is cancelled
/// or returned, the earlier one takes it back; one cancelled before its purchase came
/// never takes it.
#[test]
fn a_reversed_later_order_gives_the_follow_up_back_to_the_earlier_one() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site(
        "rv-a",
        "purchase",
        "rv",
        t,
        order_of_one("o-rv-a", "p-kettle"),
    );
    h.site(
        "rv-b",
        "purchase",
        "rv",
        t + DAY,
        order_of_one("o-rv-b", "p-mug"),
    );
    h.site(
        "rv-b-cancel",
        "order_status",
        "rv",
        t + 2 * DAY,
        order_status("o-rv-b", "cancelled"),
    );
    h.site("cb-a", "purchase", "cb", t, order("o-cb-a", 50.0, None));
    h.site(
        "cb-c-cancel",
        "order_status",
        "cb",
        t + 2 * DAY,
        order_status("o-cb-c", "cancelled"),
    );
    h.site(
        "cb-c",
        "purchase",
        "cb",
        t + DAY,
        order("o-cb-c", 50.0, None),
    );
    h.advance(t + 20 * DAY);
    for (customer, earlier) in [("rv", "o-rv-a"), ("cb", "o-cb-a")] {
        let fired = h.triggers(customer, "post_purchase");
        assert_eq!(fired.len(), 1, "{customer}: {fired:#?}");
        assert_eq!(vars(&fired[0])["order_id"], earlier);
        assert_eq!(fired[0]["fired_at"], t + 14 * DAY);
    }
    // The earlier order names what it bought, though the later one had taken its place.
    follow_up_names(&h, "rv", "o-rv-a", "p-kettle");
}

/// The test configuration with a week's tolerance for the post-purchase follow-up.
fn with_review_tolerance_of_a_week() -> String {
    let config = CONFIG.replace(
        "template = \"post_purchase\"\ndelay = \"14d\"",
        "template = \"post_purchase\"\ndelay = \"14d\"\ntolerance = \"7d\"",
    );
    assert_ne!(config, CONFIG);
    config
}

/// A later order cancelled after the earlier one's follow-up was due gives it back
/// still: sent within the scenario's tolerance, counted late past it.
#[test]
fn a_follow_up_given_back_after_it_was_due_goes_out_within_its_tolerance() {
    let config = with_review_tolerance_of_a_week();
    let t = at(T0);
    // Each alone: one customer's events move the other's event time.
    let run = |cancelled_on: i64| {
        let mut h = Harness::with(&config, ClockMode::Event);
        h.site("gb-a", "purchase", "gb", t, order("o-gb-a", 50.0, None));
        h.site(
            "gb-b",
            "purchase",
            "gb",
            t + 10 * DAY,
            order("o-gb-b", 20.0, None),
        );
        h.site(
            "gb-b-cancel",
            "order_status",
            "gb",
            t + cancelled_on * DAY,
            order_status("o-gb-b", "cancelled"),
        );
        h.advance(t + 40 * DAY);
        h
    };
    let h = run(16);
    let fired = h.triggers("gb", "post_purchase");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["order_id"], "o-gb-a");
    assert_eq!(fired[0]["fired_at"], t + 16 * DAY);
    // Cancelled on day 22: 8 days past the earlier one's due day, before the
    // later one's own (day 24).
    let h = run(22);
    assert!(h.triggers("gb", "post_purchase").is_empty());
    let late = metric(
        &h,
        "kairos_triggers_skipped_total",
        &[r#"scenario="post_purchase""#, r#"reason="late""#],
    );
    assert_eq!(late, 1.0, "the one given back 8 days late");
}

/// An order whose follow-up went out before a later order was bought does not get it
/// again when the later one is cancelled.
#[test]
fn a_follow_up_sent_before_a_later_order_is_not_sent_again_when_that_one_is_cancelled() {
    // A week's tolerance: given back two days after it was due, it would go out again.
    let config = with_review_tolerance_of_a_week();
    let t = at(T0);
    let mut h = Harness::with(&config, ClockMode::Event);
    h.site("sa-a", "purchase", "sa", t, order("o-sa-a", 50.0, None));
    h.advance(t + 15 * DAY);
    assert_eq!(h.triggers("sa", "post_purchase").len(), 1);
    h.site(
        "sa-b",
        "purchase",
        "sa",
        t + 16 * DAY,
        order("o-sa-b", 20.0, None),
    );
    h.site(
        "sa-b-cancel",
        "order_status",
        "sa",
        t + 16 * DAY + HOUR,
        order_status("o-sa-b", "cancelled"),
    );
    h.advance(t + 40 * DAY);
    let fired = h.triggers("sa", "post_purchase");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["order_id"], "o-sa-a");
}

/// Orders returned while later ones held the follow-up take none of the few places
/// of the orders remembered: after five orders and four cancellations, the first
/// order gets the follow-up with its items.
#[test]
fn returned_orders_keep_no_place_among_those_a_follow_up_remembers() {
    let t = at(T0);
    let mut h = Harness::new();
    let buy = |h: &mut Harness, n: i64, product: &str| {
        let o = order_of_one(&format!("o-rp-{n}"), product);
        h.site(&format!("rp-{n}"), "purchase", "rp", t + n * HOUR, o);
    };
    let cancel = |h: &mut Harness, n: i64, hours: i64| {
        let status = order_status(&format!("o-rp-{n}"), "cancelled");
        h.site(
            &format!("rp-{n}-cancel"),
            "order_status",
            "rp",
            t + hours * HOUR,
            status,
        );
    };
    for (n, product) in [(1, "p-kettle"), (2, "p-b"), (3, "p-c"), (4, "p-d")] {
        buy(&mut h, n, product);
    }
    cancel(&mut h, 2, 5);
    buy(&mut h, 6, "p-e");
    for (n, hours) in [(6, 7), (4, 8), (3, 9)] {
        cancel(&mut h, n, hours);
    }
    h.advance(t + 20 * DAY);
    follow_up_names(&h, "rp", "o-rp-1", "p-kettle");
}

/// Between the order that takes the follow-up back and the one returned, a purchase
/// that named no order (it takes the follow-up too, but is no order to give it back
/// to): the earlier order's items are still remembered.
#[test]
fn an_order_takes_its_follow_up_back_with_its_items_past_a_purchase_without_an_order() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site(
        "nb-a",
        "purchase",
        "nb",
        t,
        order_of_one("o-nb-a", "p-kettle"),
    );
    let without_order =
        json!({"items": [{"product_id": "p-cup", "quantity": 1, "unit_price": 9.0}]});
    h.site("nb-b", "purchase", "nb", t + DAY, without_order);
    let c = order_of_one("o-nb-c", "p-mug");
    h.site("nb-c", "purchase", "nb", t + 2 * DAY, c);
    h.site(
        "nb-c-cancel",
        "order_status",
        "nb",
        t + 3 * DAY,
        order_status("o-nb-c", "cancelled"),
    );
    h.advance(t + 20 * DAY);
    follow_up_names(&h, "nb", "o-nb-a", "p-kettle");
}

/// A later order returned before an earlier one is read (a till receipt uploaded
/// late) leaves the follow-up to the earlier one, as in time order.
#[test]
fn an_earlier_order_read_after_a_later_one_s_return_gets_the_follow_up() {
    let t = at(T0);
    let mut h = Harness::new();
    let returned = |h: &mut Harness, customer: &str| {
        h.site(
            &format!("{customer}-b"),
            "purchase",
            customer,
            t + DAY,
            order(&format!("o-{customer}-b"), 50.0, None),
        );
        h.site(
            &format!("{customer}-b-return"),
            "order_status",
            customer,
            t + 2 * DAY,
            order_status(&format!("o-{customer}-b"), "returned"),
        );
    };
    let earlier = |h: &mut Harness, customer: &str| {
        let id = format!("o-{customer}-a");
        h.site(
            &format!("{customer}-a"),
            "purchase",
            customer,
            t,
            order(&id, 50.0, None),
        );
    };
    earlier(&mut h, "tr");
    returned(&mut h, "tr");
    returned(&mut h, "lr");
    earlier(&mut h, "lr");
    h.advance(t + 20 * DAY);
    for customer in ["tr", "lr"] {
        let fired = h.triggers(customer, "post_purchase");
        assert_eq!(fired.len(), 1, "{customer}: {fired:#?}");
        assert_eq!(vars(&fired[0])["order_id"], format!("o-{customer}-a"));
        assert_eq!(fired[0]["fired_at"], t + 14 * DAY);
    }

    // The later order's follow-up went out before its return: the earlier order,
    // read after both, gets none (in time order it lost the one follow-up for good).
    let t = t + 30 * DAY;
    h.site(
        "fr-y",
        "purchase",
        "fr",
        t + DAY / 2,
        order("o-fr-y", 50.0, None),
    );
    h.advance(t + 14 * DAY + DAY * 6 / 10);
    h.site(
        "fr-y-return",
        "order_status",
        "fr",
        t + 14 * DAY + DAY * 6 / 10,
        order_status("o-fr-y", "returned"),
    );
    h.site("fr-a", "purchase", "fr", t, order("o-fr-a", 50.0, None));
    h.advance(t + 20 * DAY);
    let fired = h.triggers("fr", "post_purchase");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["order_id"], "o-fr-y");
}

/// A delivery status re-sent under a new event id for an order the profile does not
/// hold among its recent ones asks for the same survey, not a second one.
#[test]
fn a_delivery_re_sent_for_an_old_order_gives_the_same_survey() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site(
        "nd-1",
        "order_status",
        "nd",
        t,
        order_status("o-nd-old", "delivered"),
    );
    h.site(
        "nd-2",
        "order_status",
        "nd",
        t + 3 * DAY,
        order_status("o-nd-old", "delivered"),
    );
    h.advance(t + 6 * DAY);
    let fired = h.triggers("nd", "post_delivery");
    let ids: std::collections::BTreeSet<String> =
        fired.iter().map(|f| f["trigger_id"].to_string()).collect();
    assert!(!fired.is_empty());
    assert_eq!(ids.len(), 1, "{fired:#?}");
}

#[test]
fn reactivation_waits_from_the_latest_visit() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("ra-v1", "page_view", "ra", t, json!({"page_url": "/"}));
    h.site(
        "ra-v2",
        "page_view",
        "ra",
        t + 10 * DAY,
        json!({"page_url": "/"}),
    );
    h.advance(t + 30 * DAY);
    assert!(
        h.triggers("ra", "reactivation").is_empty(),
        "the customer came back at T+10d"
    );
    h.advance(t + 40 * DAY - MINUTE);
    assert!(h.triggers("ra", "reactivation").is_empty());
    h.advance(t + 40 * DAY);
    let fired = h.triggers("ra", "reactivation");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t + 40 * DAY);
    assert_eq!(vars(&fired[0])["days_since_visit"], 30);
    h.advance(t + 100 * DAY);
    assert_eq!(
        h.triggers("ra", "reactivation").len(),
        1,
        "once per absence"
    );
}

// 7. Birthday.

fn birthday_update(birthday: &str, zone: &str) -> Value {
    json!({"profile": {"birthday": birthday, "time_zone": zone}})
}

/// A customer without a zone is in `arbiter.default_time_zone` for the profile too,
/// as for the arbiter's quiet hours and days: ten in Berlin, not ten in UTC.
#[test]
fn a_change_of_address_or_zone_is_told_to_the_arbiter_once() {
    let t = at(T0);
    let mut h = Harness::new();
    let update = |email: &str, zone: &str| json!({"profile": {"email": email, "time_zone": zone, "first_name": "Anna"}});
    h.site(
        "ca-1",
        "profile_update",
        "ca",
        t,
        update("a@example.com", "Asia/Tokyo"),
    );
    // The same contacts stated again, or a name alone: nothing to tell.
    h.site(
        "ca-2",
        "profile_update",
        "ca",
        t + HOUR,
        update("a@example.com", "Asia/Tokyo"),
    );
    let name = json!({"profile": {"first_name": "Ann"}});
    h.site("ca-3", "profile_update", "ca", t + 2 * HOUR, name);
    h.site(
        "ca-4",
        "profile_update",
        "ca",
        t + 3 * HOUR,
        update("b@example.com", "Asia/Tokyo"),
    );
    h.site(
        "ca-5",
        "profile_update",
        "ca",
        t + 4 * HOUR,
        update("b@example.com", "Europe/London"),
    );
    // A statement older than the latest, read late, changes nothing.
    h.site(
        "ca-6",
        "profile_update",
        "ca",
        t + 30 * MINUTE,
        update("old@example.com", "Asia/Tokyo"),
    );
    let told: Vec<(Value, Value, Value)> = h
        .on("customer-actions")
        .filter(|a| a.value["customer_id"] == "ca" && a.value["kind"] == "contacts_changed")
        .map(|a| {
            let c = &a.value["contacts"];
            (
                a.value["occurred_at"].clone(),
                c["email"].clone(),
                c["time_zone"].clone(),
            )
        })
        .collect();
    assert_eq!(
        told,
        [
            (json!(t), json!("a@example.com"), json!("Asia/Tokyo")),
            (
                json!(t + 3 * HOUR),
                json!("b@example.com"),
                json!("Asia/Tokyo")
            ),
            (
                json!(t + 4 * HOUR),
                json!("b@example.com"),
                json!("Europe/London")
            ),
        ]
    );
}

#[test]
fn a_birthday_without_a_time_zone_is_at_ten_in_the_default_zone() {
    let config = CONFIG.replace(
        "[arbiter]",
        "[arbiter]\ndefault_time_zone = \"Europe/Berlin\"",
    );
    let mut h = Harness::with(&config, ClockMode::Event);
    let t = at("2026-03-01T12:00:00Z");
    h.site(
        "bz-up",
        "profile_update",
        "bz",
        t,
        json!({"profile": {"birthday": "1990-03-20"}}),
    );
    // CET: 10:00 local is 09:00Z.
    h.advance(at("2026-03-20T08:59:00Z"));
    assert!(h.triggers("bz", "birthday").is_empty());
    h.advance(at("2026-03-20T09:00:00Z"));
    let fired = h.triggers("bz", "birthday");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], at("2026-03-20T09:00:00Z"));
}

/// A birthday timer armed while customers without a zone were in another one (the
/// default zone changed, or an earlier version took UTC) fires on the wrong local day:
/// this year's moment in the new zone is greeted within its tolerance, not skipped
/// for a year.
#[test]
fn a_birthday_armed_in_another_default_zone_is_still_greeted_this_year() {
    let tolerant = CONFIG.replace(
        "local_time = \"10:00\"",
        "local_time = \"10:00\"\ntolerance = \"1d\"",
    );
    let mut h = Harness::with(&tolerant, ClockMode::Event);
    let t = at("2026-03-01T12:00:00Z");
    h.site(
        "dz-up",
        "profile_update",
        "dz",
        t,
        json!({"profile": {"birthday": "1990-03-20"}}),
    );
    h.advance(at("2026-03-19T00:00:00Z"));
    // Armed at 10:00 UTC on March 20, which is 00:00 on March 21 in Kiritimati (+14).
    h.restart_with(&tolerant.replace(
        "[arbiter]",
        "[arbiter]\ndefault_time_zone = \"Pacific/Kiritimati\"",
    ));
    h.advance(at("2026-03-20T10:00:00Z"));
    let fired = h.triggers("dz", "birthday");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["cause_event_id"], "birthday-2026", "{fired:#?}");
}

/// New York to Berlin on the birthday morning: Berlin's 10:00 has passed, within the
/// 12 h tolerance, so the greeting goes out late rather than a year later; back to
/// New York the same day, its 10:00 greeting is the same trigger (one per year).
#[test]
fn a_zone_change_that_puts_the_birthday_moment_behind_still_greets_once() {
    let mut h = Harness::new();
    let t = at("2026-03-01T12:00:00Z");
    h.site(
        "bz-up",
        "profile_update",
        "bz",
        t,
        birthday_update("1990-03-20", "America/New_York"),
    );
    // 08:00 in New York (12:00Z), 13:00 in Berlin.
    let moved = at("2026-03-20T12:00:00Z");
    h.advance(moved - MINUTE);
    h.site(
        "bz-move",
        "profile_update",
        "bz",
        moved,
        json!({"profile": {"time_zone": "Europe/Berlin"}}),
    );
    h.advance(moved + MINUTE);
    let fired = h.triggers("bz", "birthday");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["contacts"]["time_zone"], "Europe/Berlin");
    h.site(
        "bz-back",
        "profile_update",
        "bz",
        moved + HOUR,
        json!({"profile": {"time_zone": "America/New_York"}}),
    );
    h.advance(at("2026-03-21T12:00:00Z"));
    let ids: std::collections::BTreeSet<String> = h
        .triggers("bz", "birthday")
        .iter()
        .map(|t| t["trigger_id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "one greeting a year: {ids:?}");
}

/// A greeting's `local_time` changed in a running shop moves the greetings already
/// armed: earlier or later, each customer is greeted at the new hour, once.
#[test]
fn a_changed_local_time_moves_the_greetings_already_armed() {
    for (new_time, expected) in [
        ("08:00", "2026-06-10T06:00:00Z"),
        ("12:00", "2026-06-10T10:00:00Z"),
    ] {
        let mut h = Harness::new();
        h.site(
            "lt-up",
            "profile_update",
            "lt",
            at("2026-03-01T12:00:00Z"),
            birthday_update("1990-06-10", "Europe/Berlin"),
        );
        h.advance(at("2026-03-02T00:00:00Z"));
        h.restart_with(&CONFIG.replace(
            "local_time = \"10:00\"",
            &format!("local_time = \"{new_time}\""),
        ));
        // The partition's first record after the restart starts the pass.
        let heartbeat = at("2026-03-02T01:00:00Z");
        h.site("lt-hb", "heartbeat", "lt", heartbeat, json!({}));
        h.advance(at("2026-06-12T00:00:00Z"));
        let fired = h.triggers("lt", "birthday");
        assert_eq!(fired.len(), 1, "{new_time}: {fired:#?}");
        assert_eq!(fired[0]["fired_at"], at(expected), "{new_time}");
    }

    // Moved from 10:00 to 06:00 at 09:30 on the birthday, with a tolerance of an hour:
    // not greeted yet, and the new moment 3.5 h ago; greeted then, not next year.
    let strict = CONFIG.replace(
        "local_time = \"10:00\"",
        "local_time = \"10:00\"\ntolerance = \"1h\"",
    );
    let mut h = Harness::with(&strict, ClockMode::Event);
    let update = birthday_update("1990-06-10", "Europe/Berlin");
    h.site(
        "lt-up",
        "profile_update",
        "lt",
        at("2026-03-01T12:00:00Z"),
        update,
    );
    h.advance(at("2026-06-10T07:00:00Z"));
    h.restart_with(&strict.replace("local_time = \"10:00\"", "local_time = \"06:00\""));
    let moved = at("2026-06-10T07:30:00Z");
    h.site("lt-hb", "heartbeat", "lt", moved, json!({}));
    h.advance(at("2026-06-12T00:00:00Z"));
    let fired = h.triggers("lt", "birthday");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], moved);
}

/// A reactivation's `delay` changed in a running shop moves the reactivations armed
/// already; a customer reactivated already is not reactivated again for the same
/// absence.
#[test]
fn a_changed_reactivation_delay_moves_the_timers_already_armed() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("rd-v", "page_view", "rd", t, json!({"page_url": "/"}));
    h.site(
        "rg-v",
        "page_view",
        "rg",
        t - 31 * DAY,
        json!({"page_url": "/"}),
    );
    h.advance(t + DAY);
    assert_eq!(h.triggers("rg", "reactivation").len(), 1, "away 31 days");
    h.restart_with(&CONFIG.replace("delay = \"30d\"", "delay = \"20d\""));
    // The partition's first record after the restart starts the pass (a heartbeat:
    // no visit, which would move the timer itself).
    for customer in ["rd", "rg"] {
        let id = format!("{customer}-hb");
        h.site(&id, "heartbeat", customer, t + 2 * DAY, json!({}));
    }
    h.advance(t + 25 * DAY);
    let fired = h.triggers("rd", "reactivation");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t + 20 * DAY);
    assert_eq!(
        h.triggers("rg", "reactivation").len(),
        1,
        "reactivated already for this absence"
    );

    // A series whose first step went out: its second step keeps its time.
    let steps = "template = \"reactivation\"\ndelay = \"30d\"\n\
                 steps = [{ delay = \"7d\", template = \"re_2\" }]";
    let series = CONFIG.replace("template = \"reactivation\"\ndelay = \"30d\"", steps);
    assert_ne!(series, CONFIG);
    let mut h = Harness::with(&series, ClockMode::Event);
    h.site("rs-v", "page_view", "rs", t, json!({"page_url": "/"}));
    h.advance(t + 31 * DAY);
    h.restart_with(&series.replace("delay = \"30d\"", "delay = \"60d\""));
    h.site("rs-hb", "heartbeat", "rs", t + 32 * DAY, json!({}));
    h.advance(t + 40 * DAY);
    let fired: Vec<(Value, Value)> = h
        .triggers("rs", "reactivation")
        .iter()
        .map(|x| (x["step"].clone(), x["fired_at"].clone()))
        .collect();
    assert_eq!(
        fired,
        [
            (json!(0), json!(t + 30 * DAY)),
            (json!(1), json!(t + 37 * DAY))
        ]
    );
}

/// Segmentation rules changed in a running shop judge the stored profiles again: a
/// customer churned at 365 days is dormant again when churn moves to 730 days, and
/// churns at the new boundary, with no new event from them.
#[test]
fn changed_segmentation_rules_judge_the_stored_profiles_again() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("sr-buy", "purchase", "sr", t, order("o-1", 30.0, None));
    h.advance(t + 400 * DAY);
    let to = |h: &Harness| -> Vec<(String, String)> {
        h.transitions("sr")
            .iter()
            .filter(|x| x["kind"] == "lifecycle")
            .map(|x| {
                let field = |f: &str| x[f].as_str().unwrap_or_default().to_string();
                (field("to_segment"), field("reason"))
            })
            .collect()
    };
    assert_eq!(to(&h).last().map(|x| x.0.as_str()), Some("churned"));
    let before = to(&h).len();
    h.restart_with(&format!(
        "{CONFIG}\n[segments.lifecycle]\nchurn_days = 730\n"
    ));
    h.site("sr-hb", "heartbeat", "sr", t + 401 * DAY, json!({}));
    h.advance(t + 402 * DAY);
    let after = to(&h);
    assert_eq!(
        after[before..],
        [(
            "dormant".to_string(),
            "segmentation rules changed".to_string()
        )],
        "{after:?}"
    );
    h.advance(t + 731 * DAY);
    let after = to(&h);
    assert_eq!(
        after.last().map(|x| x.0.as_str()),
        Some("churned"),
        "{after:?}"
    );
    assert_eq!(after.len(), before + 2, "{after:?}");
    let churned = h.transitions("sr");
    let last = churned.last().expect("a transition");
    assert_eq!(last["occurred_at"], t + 730 * DAY, "{last:#?}");
}

#[test]
fn birthday_fires_at_ten_local_across_dst() {
    let t = at("2026-03-01T12:00:00Z");
    let mut h = Harness::new();
    h.site(
        "bd1-up",
        "profile_update",
        "bd1",
        t,
        birthday_update("1990-03-30", "Europe/Berlin"),
    );
    h.site(
        "bd2-up",
        "profile_update",
        "bd2",
        t,
        birthday_update("1985-03-20", "Europe/Berlin"),
    );
    h.site(
        "bd3-up",
        "profile_update",
        "bd3",
        t,
        birthday_update("1979-11-02", "America/New_York"),
    );

    // March 20: CET, 10:00 local is 09:00Z.
    h.advance(at("2026-03-20T08:59:00Z"));
    assert!(h.triggers("bd2", "birthday").is_empty());
    h.advance(at("2026-03-20T09:00:00Z"));
    let fired = h.triggers("bd2", "birthday");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], at("2026-03-20T09:00:00Z"));

    // March 30, after the switch to CEST: 08:00Z.
    h.advance(at("2026-03-30T07:59:00Z"));
    assert!(h.triggers("bd1", "birthday").is_empty());
    h.advance(at("2026-03-30T08:00:00Z"));
    let fired = h.triggers("bd1", "birthday");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], at("2026-03-30T08:00:00Z"));
    assert_eq!(fired[0]["contacts"]["time_zone"], "Europe/Berlin");

    // November 2 in New York, after the fall back on November 1: EST, 15:00Z.
    h.advance(at("2026-11-02T14:59:00Z"));
    assert!(h.triggers("bd3", "birthday").is_empty());
    h.advance(at("2026-11-02T15:00:00Z"));
    let fired = h.triggers("bd3", "birthday");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], at("2026-11-02T15:00:00Z"));

    // Once a year.
    assert_eq!(h.triggers("bd1", "birthday").len(), 1);
    assert_eq!(h.triggers("bd2", "birthday").len(), 1);
}

/// A greeting time a DST gap skips where the gap spans midnight (Nuuk's clocks go
/// from 23:00 on Saturday to 00:00 on Sunday) is greeted when the clocks jump, the
/// next local day, once; the partition's later timers still fire.
#[test]
fn a_greeting_time_skipped_by_a_gap_over_midnight_greets_once_and_stalls_nothing() {
    let late = CONFIG.replace("local_time = \"10:00\"", "local_time = \"23:30\"");
    let mut h = Harness::with(&late, ClockMode::Event);
    let t = at("2027-03-01T12:00:00Z");
    h.site(
        "gm-up",
        "profile_update",
        "gm",
        t,
        birthday_update("1990-03-27", "America/Nuuk"),
    );
    h.site(
        "gl-up",
        "profile_update",
        "gl",
        t,
        birthday_update("1990-04-02", "America/Nuuk"),
    );
    h.advance(at("2027-04-10T00:00:00Z"));
    let fired = h.triggers("gm", "birthday");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    // 23:30 on March 27 does not exist: 00:00 on March 28 (-01) follows 22:59 (-02).
    assert_eq!(fired[0]["fired_at"], at("2027-03-28T01:00:00Z"));
    let later = h.triggers("gl", "birthday");
    assert_eq!(later.len(), 1, "{later:#?}");
    assert_eq!(later[0]["fired_at"], at("2027-04-03T00:30:00Z"));
}

#[test]
fn changing_the_birthday_moves_the_timer() {
    let t = at("2026-03-01T12:00:00Z");
    let mut h = Harness::new();
    h.site(
        "bd4-up1",
        "profile_update",
        "bd4",
        t,
        birthday_update("1990-03-30", "Europe/Berlin"),
    );
    h.site(
        "bd4-up2",
        "profile_update",
        "bd4",
        t + DAY,
        json!({"profile": {"birthday": "1990-04-10"}}),
    );
    h.advance(at("2026-04-01T00:00:00Z"));
    assert!(
        h.triggers("bd4", "birthday").is_empty(),
        "the old date does not fire"
    );
    h.advance(at("2026-04-10T07:59:00Z"));
    assert!(h.triggers("bd4", "birthday").is_empty());
    h.advance(at("2026-04-10T08:00:00Z"));
    let fired = h.triggers("bd4", "birthday");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], at("2026-04-10T08:00:00Z"));
}

// 8. Registration anniversary.

#[test]
fn registration_anniversary_at_noon_local_one_year_later() {
    // 10:00 in Berlin: the registration day's noon is still ahead, and is no anniversary.
    let reg = at("2026-02-10T09:00:00Z");
    let mut h = Harness::new();
    h.site(
        "an1-reg",
        "registration",
        "an1",
        reg,
        json!({"profile": {"time_zone": "Europe/Berlin"}}),
    );
    h.advance(at("2026-02-12T00:00:00Z"));
    assert!(
        h.triggers("an1", "registration_anniversary").is_empty(),
        "no anniversary on the day of registration"
    );
    h.advance(at("2027-02-10T10:59:00Z"));
    assert!(h.triggers("an1", "registration_anniversary").is_empty());
    h.advance(at("2027-02-10T11:00:00Z"));
    let fired = h.triggers("an1", "registration_anniversary");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(
        fired[0]["fired_at"],
        at("2027-02-10T11:00:00Z"),
        "12:00 CET"
    );
    assert_eq!(fired[0]["template"], "registration_anniversary");
}

// 9. Subscription ending.

#[test]
fn subscription_ending_follows_the_end_date() {
    let t = at("2026-05-01T08:00:00Z");
    let ends = at("2026-06-01T00:00:00Z");
    let moved = at("2026-06-15T00:00:00Z");
    let mut h = Harness::new();
    h.site(
        "se-up1",
        "profile_update",
        "se",
        t,
        json!({"profile": {"subscription_ends_at": ends}}),
    );
    h.site(
        "se-up2",
        "profile_update",
        "se",
        t + 9 * DAY,
        json!({"profile": {"subscription_ends_at": moved}}),
    );
    h.advance(ends - 5 * DAY + HOUR);
    assert!(
        h.triggers("se", "subscription_ending").is_empty(),
        "the old end date does not fire"
    );
    h.advance(moved - 5 * DAY - MINUTE);
    assert!(h.triggers("se", "subscription_ending").is_empty());
    h.advance(moved - 5 * DAY);
    let fired = h.triggers("se", "subscription_ending");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], moved - 5 * DAY);
    assert_eq!(fired[0]["cause_event_id"], format!("subscription-{moved}"));
    h.advance(moved + DAY);
    assert_eq!(h.triggers("se", "subscription_ending").len(), 1);
}

/// A three-day plan bought with a five-day reminder: the end is learned within the
/// reminder's lead, so it is told at once; an end stated after it passed is not.
#[test]
fn a_subscription_end_learned_within_the_reminder_s_lead_is_told_at_once() {
    let t = at("2026-05-01T08:00:00Z");
    let mut h = Harness::new();
    let ends = t + 3 * DAY;
    let stated = json!({"profile": {"subscription_ends_at": ends}});
    h.site("sl-up", "profile_update", "sl", t, stated);
    h.advance(t + MINUTE);
    let fired = h.triggers("sl", "subscription_ending");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t);
    let past = json!({"profile": {"subscription_ends_at": t - DAY}});
    h.site("sp-up", "profile_update", "sp", t + 2 * MINUTE, past);
    h.advance(t + 10 * DAY);
    assert!(h.triggers("sp", "subscription_ending").is_empty());
}

#[test]
fn a_cleared_subscription_end_fires_nothing_and_an_older_statement_does_not_bring_it_back() {
    let t = at("2026-05-01T08:00:00Z");
    let ends = at("2026-06-01T00:00:00Z");
    let mut h = Harness::new();
    let update = |h: &mut Harness, id: &str, at: Millis, profile: Value| {
        h.site(
            id,
            "profile_update",
            "sc",
            at,
            json!({ "profile": profile }),
        );
    };
    update(
        &mut h,
        "sc-set",
        t,
        json!({"subscription_ends_at": ends, "phone": "+4915100000001"}),
    );
    // The customer moved to a plan without an end and removed the phone number.
    update(
        &mut h,
        "sc-clear",
        t + DAY,
        json!({"cleared": ["subscription_ends_at", "phone"]}),
    );
    // A statement made before the clearing, delivered after it, changes nothing.
    update(
        &mut h,
        "sc-old",
        t + HOUR,
        json!({"subscription_ends_at": ends + DAY, "phone": "+4915100000002"}),
    );
    h.advance(ends + 2 * DAY);
    assert!(h.triggers("sc", "subscription_ending").is_empty());
    let p = h.pipeline.profile("sc").expect("read").expect("stored");
    assert_eq!((p.subscription_ends_at, p.phone), (None, None));
    // A later end is a new plan with an end: it fires.
    let renewed = ends + 60 * DAY;
    update(
        &mut h,
        "sc-new",
        ends + 3 * DAY,
        json!({"subscription_ends_at": renewed}),
    );
    h.advance(renewed);
    assert_eq!(
        steps(&h, "sc", "subscription_ending"),
        [(0, renewed - 5 * DAY)]
    );
    // Only the attributes the contract names can be cleared.
    update(&mut h, "sc-bad", renewed, json!({"cleared": ["revenue"]}));
    let dead: Vec<&Output> = h.on("deadletter").collect();
    assert_eq!(dead.len(), 1, "{dead:#?}");
}

/// A till receipt's phone number fills in a profile without one (and the arbiter
/// hears of it), but one uploaded after the customer removed their number, dated
/// before the removal, does not bring it back.
#[test]
fn a_late_till_receipt_does_not_bring_back_a_removed_phone_number() {
    let t = at("2026-05-01T08:00:00Z");
    let mut h = Harness::new();
    let receipt = |h: &mut Harness, id: &str, customer: &str, at: Millis, phone: &str| {
        h.feed(
            "events.offline",
            customer,
            json!({
                "event_id": id, "occurred_at": rfc(at), "receipt_id": format!("r-{id}"),
                "kind": "sale", "store_id": "store-1", "customer_id": customer,
                "phone": phone,
                "items": [{"product_id": "p-till", "quantity": 1, "unit_price": 10.0}],
                "total": 10.0, "currency": "EUR",
            }),
        );
    };
    h.site(
        "rp-set",
        "profile_update",
        "rp",
        t,
        json!({"profile": {"phone": "+4915100000001"}}),
    );
    h.site(
        "rp-clear",
        "profile_update",
        "rp",
        t + DAY,
        json!({"profile": {"cleared": ["phone"]}}),
    );
    receipt(&mut h, "rp-till", "rp", t + HOUR, "+4915100000003");
    let p = h.pipeline.profile("rp").expect("read").expect("stored");
    assert_eq!(p.phone, None);
    let told = |h: &Harness, customer: &str| -> Vec<Value> {
        h.on("customer-actions")
            .filter(|o| o.value["customer_id"] == customer && o.value["kind"] == "contacts_changed")
            .map(|o| o.value["contacts"]["phone"].clone())
            .collect()
    };
    assert_eq!(told(&h, "rp"), [json!("+4915100000001"), Value::Null]);

    // A customer without a number gets the receipt's, and the arbiter is told.
    receipt(&mut h, "rn-till", "rn", t, "+4915100000004");
    let p = h.pipeline.profile("rn").expect("read").expect("stored");
    assert_eq!(p.phone.as_deref(), Some("+4915100000004"));
    assert_eq!(told(&h, "rn"), [json!("+4915100000004")]);
    // The receipt is no statement of the customer's (a till's clock may run ahead):
    // one of theirs, dated before it and read after it, still replaces its number.
    h.site(
        "rn-up",
        "profile_update",
        "rn",
        t - HOUR,
        json!({"profile": {"phone": "+4915100000005"}}),
    );
    let p = h.pipeline.profile("rn").expect("read").expect("stored");
    assert_eq!(p.phone.as_deref(), Some("+4915100000005"));
}

#[test]
fn subscription_ending_fires_five_days_before() {
    let t = at("2026-05-01T08:00:00Z");
    let ends = at("2026-06-01T00:00:00Z");
    let mut h = Harness::new();
    h.site(
        "se2-up",
        "profile_update",
        "se2",
        t,
        json!({"profile": {"subscription_ends_at": ends}}),
    );
    h.advance(ends - 5 * DAY - MINUTE);
    assert!(h.triggers("se2", "subscription_ending").is_empty());
    h.advance(ends - 5 * DAY);
    let fired = h.triggers("se2", "subscription_ending");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], ends - 5 * DAY);
}

// 10. Post delivery and order updates.

#[test]
fn post_delivery_two_days_after_delivery() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("pd-buy", "purchase", "pd", t, order("o-pd", 60.0, None));
    h.site(
        "pd-del",
        "order_status",
        "pd",
        t + 3 * DAY,
        order("o-pd", 60.0, Some("delivered")),
    );
    h.advance(t + 5 * DAY - MINUTE);
    assert!(h.triggers("pd", "post_delivery").is_empty());
    h.advance(t + 5 * DAY);
    let fired = h.triggers("pd", "post_delivery");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t + 5 * DAY);
    assert_eq!(vars(&fired[0])["order_id"], "o-pd");
    assert!(
        h.triggers("pd", "order_update").is_empty(),
        "only shipped is configured"
    );
}

#[test]
fn an_older_delivery_read_late_leaves_the_survey_of_the_newer_order() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("ld-buy-a", "purchase", "ld", t, order("o-a", 60.0, None));
    h.site("ld-buy-b", "purchase", "ld", t, order("o-b", 80.0, None));
    // B's delivery is read before A's, which came a day earlier.
    h.site(
        "ld-del-b",
        "order_status",
        "ld",
        t + 3 * DAY,
        order("o-b", 80.0, Some("delivered")),
    );
    h.site(
        "ld-del-a",
        "order_status",
        "ld",
        t + 2 * DAY,
        order("o-a", 60.0, Some("delivered")),
    );
    h.advance(t + 10 * DAY);
    // In time order B's delivery replaced A's survey before it was due.
    let fired = h.triggers("ld", "post_delivery");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["order_id"], "o-b");
    assert_eq!(fired[0]["fired_at"], t + 5 * DAY);
}

/// As above, with B's delivery read even before B's purchase: the profile does not
/// know B was delivered, but its survey is pending, and A's older delivery leaves it.
#[test]
fn an_older_delivery_read_late_leaves_the_survey_of_an_order_delivered_before_its_purchase_was_read(
) {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("lp-buy-a", "purchase", "lp", t, order("o-a", 60.0, None));
    let delivered_b = order("o-b", 80.0, Some("delivered"));
    h.site("lp-del-b", "order_status", "lp", t + 3 * DAY, delivered_b);
    h.site("lp-buy-b", "purchase", "lp", t, order("o-b", 80.0, None));
    let delivered_a = order("o-a", 60.0, Some("delivered"));
    h.site("lp-del-a", "order_status", "lp", t + 2 * DAY, delivered_a);
    h.advance(t + 10 * DAY);
    let fired = h.triggers("lp", "post_delivery");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["order_id"], "o-b");
    assert_eq!(fired[0]["fired_at"], t + 5 * DAY);
}

#[test]
fn order_update_fires_immediately_for_configured_statuses() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site(
        "ou-placed",
        "order_status",
        "ou",
        t,
        order("o-ou", 60.0, Some("placed")),
    );
    h.commit();
    assert!(
        h.triggers("ou", "order_update").is_empty(),
        "placed is not configured"
    );
    h.site(
        "ou-shipped",
        "order_status",
        "ou",
        t + HOUR,
        order("o-ou", 60.0, Some("shipped")),
    );
    let fired = h.triggers("ou", "order_update");
    assert_eq!(fired.len(), 1, "no heartbeat needed: {fired:#?}");
    assert_eq!(fired[0]["category"], "transactional");
    assert_eq!(fired[0]["fired_at"], t + HOUR);
    let v = vars(&fired[0]);
    assert_eq!(v["order_id"], "o-ou");
    assert_eq!(v["status"], "shipped");
}

// 11. Segments.

fn find<'a>(transitions: &'a [Value], kind: &str, to: &str) -> Option<&'a Value> {
    transitions
        .iter()
        .find(|t| t["kind"] == kind && t["to_segment"] == to)
}

#[test]
fn purchases_move_segments() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("sg1-view", "page_view", "sg1", t, json!({}));
    let first = h.transitions("sg1");
    assert_eq!(first.len(), 1, "{first:#?}");
    assert_eq!(first[0]["kind"], "lifecycle");
    assert_eq!(first[0]["from_segment"], Value::Null);
    assert_eq!(first[0]["to_segment"], "prospect");
    assert_eq!(first[0]["reason"], "first event");

    h.site(
        "sg1-buy",
        "purchase",
        "sg1",
        t + HOUR,
        order("o-sg1", 50.0, None),
    );
    let all = h.transitions("sg1");
    let new = find(&all, "lifecycle", "new").expect("lifecycle new");
    assert_eq!(new["from_segment"], "prospect");
    assert_eq!(new["reason"], "purchase");
    assert_eq!(new["occurred_at"], t + HOUR);
    let rfm = all
        .iter()
        .find(|t| t["kind"] == "rfm")
        .expect("an RFM segment appears");
    assert_eq!(rfm["from_segment"], Value::Null);
    assert_eq!(rfm["to_segment"], "New");
    assert_eq!(rfm["reason"], "purchase");
}

/// Five orders of 60, a day apart from `t` (300 in all: F=4, M=3).
fn five_orders_of_60(h: &mut Harness, customer: &str, t: Millis) {
    orders_of(h, customer, 5, (t, DAY), 60.0);
}

/// `count` orders of `total` each by `customer`, the first at `t`, then every `gap`.
fn orders_of(h: &mut Harness, customer: &str, count: i64, (t, gap): (Millis, Millis), total: f64) {
    for i in 0..count {
        h.site(
            &format!("{customer}-buy{i}"),
            "purchase",
            customer,
            t + i * gap,
            order(&format!("o-{customer}-{i}"), total, None),
        );
    }
}

#[test]
fn time_alone_moves_a_customer_to_at_risk() {
    let t = at(T0);
    let mut h = Harness::new();
    five_orders_of_60(&mut h, "sg2", t);
    let last = t + 4 * DAY;
    assert!(h.triggers("sg2", "win_back").is_empty());
    // No further input, only time.
    h.advance(t + 200 * DAY);
    let all = h.transitions("sg2");
    let dormant = find(&all, "lifecycle", "dormant").expect("dormant after 90 days");
    assert_eq!(dormant["reason"], "time");
    assert_eq!(dormant["occurred_at"], last + 90 * DAY);
    let at_risk = find(&all, "rfm", "At Risk").unwrap_or_else(|| panic!("At Risk: {all:#?}"));
    assert_eq!(at_risk["reason"], "time");
    assert_eq!(at_risk["occurred_at"], last + 180 * DAY);
    let fired = h.triggers("sg2", "win_back");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], last + 180 * DAY);
    let v = vars(&fired[0]);
    assert_eq!(v["to_segment"], "At Risk");
    assert_eq!(v["segment"], "At Risk");
}

#[test]
fn a_stage_s_trigger_names_the_rfm_cell_of_the_same_moment() {
    let config = format!(
        "{CONFIG}\n[[scenarios]]\nname = \"became_regular\"\nkind = \"segment_entered\"\nsegment = \"regular\"\nchannels = [\"email\"]\ntemplate = \"vip\"\n"
    );
    let t = at(T0);
    let mut h = Harness::with(&config, ClockMode::Event);
    h.site("sr-buy", "purchase", "sr", t, order("o-sr", 60.0, None));
    // 30 days on, one review makes the customer regular and moves them out of New.
    h.advance(t + 31 * DAY);
    let all = h.transitions("sr");
    let regular = find(&all, "lifecycle", "regular").unwrap_or_else(|| panic!("{all:#?}"));
    let others = find(&all, "rfm", "Others").unwrap_or_else(|| panic!("{all:#?}"));
    assert_eq!(regular["occurred_at"], others["occurred_at"]);
    let fired = h.triggers("sr", "became_regular");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["segment"], "Others");
}

/// A review timer that fires late (the service was down past its boundary) is judged
/// at its boundary: the customer passes through each segment on the way, each
/// transition at its own time and with its own id, as in a run that kept up.
#[test]
fn a_late_segment_review_passes_through_every_segment_on_the_way() {
    let t = at(T0);
    let mut h = Harness::new();
    five_orders_of_60(&mut h, "sg3", t);
    let last = t + 4 * DAY;
    h.advance(last + DAY);
    assert!(h.transitions("sg3").iter().all(|x| x["reason"] != "time"));
    // The service comes back months later (a wall clock long past every boundary):
    // the review timers fire late.
    assert!(kairos_core::time::wall_now() > last + 200 * DAY);
    h.restart_in(CONFIG, ClockMode::Wall);
    h.advance(kairos_core::time::wall_now());
    let all = h.transitions("sg3");
    let dormant = find(&all, "lifecycle", "dormant").unwrap_or_else(|| panic!("{all:#?}"));
    assert_eq!(dormant["occurred_at"], last + 90 * DAY, "{all:#?}");
    let at_risk = find(&all, "rfm", "At Risk").unwrap_or_else(|| panic!("{all:#?}"));
    assert_eq!(at_risk["occurred_at"], last + 180 * DAY, "{all:#?}");
}

/// With the wall clock, the backlog of an outage is read before the timers it holds
/// back: a purchase 100 days after the last one, read before the review due at 90
/// days fired, still finds the customer dormant since then, as an uninterrupted run
/// would, and brings them back.
#[test]
fn a_purchase_read_before_overdue_segment_reviews_comes_after_them() {
    // Recent enough that the customer, back, is still regular by the wall clock.
    let t = (kairos_core::time::wall_now() / DAY - 130) * DAY;
    let mut h = Harness::new();
    five_orders_of_60(&mut h, "sb", t);
    let last = t + 4 * DAY;
    h.advance(last + DAY);
    h.restart_in(CONFIG, ClockMode::Wall);
    h.site(
        "sb-back",
        "purchase",
        "sb",
        last + 100 * DAY,
        order("o-sb-back", 60.0, None),
    );
    let all = h.transitions("sb");
    let dormant = find(&all, "lifecycle", "dormant").unwrap_or_else(|| panic!("{all:#?}"));
    assert_eq!(dormant["occurred_at"], last + 90 * DAY, "{all:#?}");
    assert_eq!(dormant["reason"], "time");
    let back: Vec<&Value> = all
        .iter()
        .filter(|x| x["from_segment"] == "dormant" && x["to_segment"] == "regular")
        .collect();
    assert_eq!(back.len(), 1, "{all:#?}");
    assert_eq!(back[0]["reason"], "purchase");
    // Stamped when the purchase was read, by the wall clock.
    assert!(back[0]["occurred_at"].as_i64() >= Some(last + 100 * DAY));
    // The review timer is armed for the next boundary only: nothing is judged twice.
    h.advance(kairos_core::time::wall_now());
    let again = h.transitions("sb");
    assert_eq!(
        again
            .iter()
            .filter(|x| x["to_segment"] == "dormant")
            .count(),
        1,
        "{again:#?}"
    );
}

/// As above for a merge into the customer read in the backlog: the review due before
/// it is judged first, for time, at its boundary, not for the merge when read.
#[test]
fn a_merge_read_before_an_overdue_segment_review_comes_after_it() {
    let t = (kairos_core::time::wall_now() / DAY - 130) * DAY;
    let last = t + 4 * DAY;
    let config = CONFIG.replace("[clock]", "[identity]\nenabled = true\n[clock]");
    // Five orders by the customer, a guest's visit, then an outage.
    let before_the_outage = || {
        let mut h = identified_harness();
        for i in 0..5 {
            h.identified_site(json!({"event_id": format!("smg-buy{i}"),
                "event_type": "purchase", "occurred_at": rfc(t + i * DAY),
                "customer_id": "smg",
                "order": {"order_id": format!("o-smg-{i}"), "total": 60.0}}));
        }
        h.identified_site(json!({"event_id": "smg-guest", "event_type": "page_view",
            "occurred_at": rfc(last), "customer_id": "smg-guest", "page_url": "/"}));
        h.advance(last + DAY);
        h.restart_in(&config, ClockMode::Wall);
        h
    };
    // The guest's profile on its way to the customer (from a twin run).
    let mut twin = before_the_outage();
    twin.merge_out(&merge_record("m-smg", "smg-guest", "smg", last + 100 * DAY));
    let (key, merge_in) = (twin.on("identified-events"))
        .find(|r| r.value["kind"] == "merge_in")
        .map(|r| (r.key.clone(), r.value.clone()))
        .expect("the merged profile");
    // Read first after the restart, before the customer's overdue review fired.
    let mut h = before_the_outage();
    h.feed("identified-events", &key, merge_in);
    let all = h.transitions("smg");
    let dormant: Vec<&Value> = (all.iter())
        .filter(|x| x["to_segment"] == "dormant")
        .collect();
    assert_eq!(dormant.len(), 1, "{all:#?}");
    assert_eq!(dormant[0]["reason"], "time", "{all:#?}");
    assert_eq!(dormant[0]["occurred_at"], last + 90 * DAY, "{all:#?}");
}

/// With the wall clock, a return dated the day before the customer's dormant
/// boundary, read in the backlog of an outage past it, is judged as of its own day:
/// the customer still becomes dormant at the boundary, for time, as in an
/// uninterrupted run, not for the return.
#[test]
fn an_event_dated_before_an_overdue_segment_review_leaves_the_boundary_to_it() {
    let t = (kairos_core::time::wall_now() / DAY - 130) * DAY;
    let mut h = Harness::new();
    five_orders_of_60(&mut h, "sr", t);
    let last = t + 4 * DAY;
    h.advance(last + DAY);
    h.restart_in(CONFIG, ClockMode::Wall);
    let returned = order_status("o-sr-0", "returned");
    h.site("sr-ret", "order_status", "sr", last + 89 * DAY, returned);
    h.advance(kairos_core::time::wall_now());
    let all = h.transitions("sr");
    let dormant: Vec<&Value> = all
        .iter()
        .filter(|x| x["to_segment"] == "dormant")
        .collect();
    assert_eq!(dormant.len(), 1, "{all:#?}");
    assert_eq!(dormant[0]["reason"], "time", "{all:#?}");
    assert_eq!(dormant[0]["occurred_at"], last + 90 * DAY, "{all:#?}");
}

/// As above, with a cancellation dated before a boundary already judged (day 30,
/// judged on time): judged when read, as before, not as of its own day, which would
/// run the segments back and judge day 30 again under the same transition ids.
#[test]
fn an_event_dated_before_a_boundary_already_judged_is_judged_when_read() {
    let t = (kairos_core::time::wall_now() / DAY - 95) * DAY;
    let mut h = Harness::new();
    // Two orders: Others. With the first cancelled, as of day 20, the customer would
    // be New again.
    orders_of(&mut h, "sj", 2, (t, HOUR), 60.0);
    let last = t + HOUR;
    h.advance(last + 31 * DAY);
    let judged = h.transitions("sj").len();
    h.restart_in(CONFIG, ClockMode::Wall);
    let cancelled = order_status("o-sj-0", "cancelled");
    h.site(
        "sj-cancel",
        "order_status",
        "sj",
        last + 20 * DAY,
        cancelled,
    );
    h.advance(kairos_core::time::wall_now());
    let all = h.transitions("sj");
    let ids: std::collections::BTreeSet<&str> = all
        .iter()
        .filter_map(|x| x["transition_id"].as_str())
        .collect();
    assert_eq!(ids.len(), all.len(), "{all:#?}");
    let after: Vec<&Value> = all[judged..].iter().map(|x| &x["occurred_at"]).collect();
    assert!(
        after.iter().all(|at| at.as_i64() >= Some(last + 90 * DAY)),
        "{all:#?}"
    );
}

#[test]
fn champions_get_the_vip_trigger() {
    let t = at(T0);
    let mut h = Harness::new();
    for i in 0..4 {
        h.site(
            &format!("sg3-buy{i}"),
            "purchase",
            "sg3",
            t + i * HOUR,
            order(&format!("o-sg3-{i}"), 200.0, None),
        );
    }
    assert!(
        h.triggers("sg3", "vip").is_empty(),
        "four orders are not enough"
    );
    h.site(
        "sg3-buy4",
        "purchase",
        "sg3",
        t + 4 * HOUR,
        order("o-sg3-4", 200.0, None),
    );
    let fired = h.triggers("sg3", "vip");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t + 4 * HOUR);
    let all = h.transitions("sg3");
    let champions = find(&all, "rfm", "Champions").expect("Champions");
    assert_eq!(champions["reason"], "purchase");
    assert!(h.triggers("sg3", "win_back").is_empty());
}

/// Five orders that add up to exactly 500 (the fourth monetary boundary) make a
/// Champion, though their sum in binary floating point is 499.99999999999994.
/// With `profile.currency` set, orders and receipts in another currency count
/// converted at its rate, returns too; one in a currency without a rate is
/// dead-lettered, naming it, and counts nowhere.
#[test]
fn amounts_in_other_currencies_count_converted_and_unknown_ones_are_refused() {
    let t = at(T0);
    let text =
        format!("{CONFIG}\n[profile]\ncurrency = \"EUR\"\n[profile.exchange_rates]\nUSD = 0.5\n");
    let mut h = Harness::with(&text, ClockMode::Event);
    let priced = |id: &str, total: f64, currency: &str, status: Option<&str>| {
        let mut o = order(id, total, status);
        o["order"]["currency"] = currency.into();
        o
    };
    h.site(
        "cu-1",
        "purchase",
        "cu",
        t,
        priced("o-usd", 100.0, "usd", None),
    );
    h.site(
        "cu-2",
        "purchase",
        "cu",
        t + HOUR,
        priced("o-eur", 30.0, "EUR", None),
    );
    h.receipt("cu-3", "sale", "cu", t + 2 * HOUR, 20.0);
    // Half of the dollar order comes back: 25 euros.
    let back = priced("o-usd", 50.0, "USD", Some("returned"));
    h.site("cu-4", "order_status", "cu", t + DAY, back);
    h.site(
        "cu-5",
        "purchase",
        "cu",
        t + DAY,
        priced("o-jpy", 1000.0, "JPY", None),
    );
    h.advance(t + 2 * DAY);
    let p = h.pipeline.profile("cu").expect("read").expect("stored");
    assert_eq!((p.orders, p.revenue), (3, 50.0 + 30.0 + 20.0 - 25.0));
    let dead: Vec<String> = h
        .on("deadletter")
        .map(|d| d.value["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert!(
        dead[0].contains("order.currency \"JPY\" is neither profile.currency (EUR)"),
        "{dead:#?}"
    );
}

#[test]
fn revenue_of_exactly_a_boundary_reaches_it() {
    let t = at(T0);
    let mut h = Harness::new();
    for (i, total) in [91.85, 108.74, 136.84, 54.75, 107.82]
        .into_iter()
        .enumerate()
    {
        h.site(
            &format!("rb-buy{i}"),
            "purchase",
            "rb",
            t + i as i64 * HOUR,
            order(&format!("o-rb-{i}"), total, None),
        );
    }
    let all = h.transitions("rb");
    assert!(find(&all, "rfm", "Champions").is_some(), "{all:#?}");
    assert_eq!(h.triggers("rb", "vip").len(), 1);
}

#[test]
fn a_cancellation_read_before_its_purchase_does_not_greet_the_vip_a_second_time() {
    let t = at(T0);
    let mut h = Harness::new();
    orders_of(&mut h, "cf", 5, (t, HOUR), 200.0);
    assert_eq!(h.triggers("cf", "vip").len(), 1, "a Champion now");
    // A sixth order is placed and cancelled at once; the app's cancellation is read
    // before the site's purchase. The profile holds every order it counted, so the
    // unknown one was never counted: nothing is taken out, and the customer, in time
    // order a Champion throughout, never leaves.
    let cancelled = order("o-cf-5", 600.0, Some("cancelled"));
    h.site("cf-cancel", "order_status", "cf", t + 6 * HOUR, cancelled);
    let profile = h.pipeline.profile("cf").expect("read").expect("stored");
    assert_eq!((profile.orders, profile.revenue), (5, 1000.0));
    h.site(
        "cf-buy5",
        "purchase",
        "cf",
        t + 5 * HOUR,
        order("o-cf-5", 600.0, None),
    );
    let all = h.transitions("cf");
    assert!(
        all.iter().all(|t| t["from_segment"] != "Champions"),
        "{all:#?}"
    );
    assert_eq!(h.triggers("cf", "vip").len(), 1);
    let profile = h.pipeline.profile("cf").expect("read").expect("stored");
    assert_eq!((profile.orders, profile.revenue), (5, 1000.0));

    // A customer of twenty orders (as many as a profile keeps): an unknown order may
    // be an older one, so its cancellation takes its amount out at once, and the
    // customer leaves the Champions until the purchase shows the order is the
    // cancelled one. Back among them, they are not greeted a second time.
    let mut h = Harness::new();
    orders_of(&mut h, "cr", 20, (t, MINUTE), 30.0);
    assert_eq!(h.triggers("cr", "vip").len(), 1, "a Champion now");
    let cancelled = order("o-cr-x", 150.0, Some("cancelled"));
    h.site("cr-cancel", "order_status", "cr", t + 6 * HOUR, cancelled);
    let out = h.transitions("cr");
    let left = out.last().expect("a transition");
    assert_eq!(left["from_segment"], "Champions", "{out:#?}");
    h.site(
        "cr-buy-x",
        "purchase",
        "cr",
        t + 5 * HOUR,
        order("o-cr-x", 150.0, None),
    );
    let entries: Vec<Value> = h
        .transitions("cr")
        .into_iter()
        .filter(|t| t["kind"] == "rfm" && t["to_segment"] == "Champions")
        .collect();
    assert_eq!(entries.len(), 2, "reported as it happened: {entries:#?}");
    // In time order the customer never left: no second greeting.
    let fired = h.triggers("cr", "vip");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    let restored = metric(
        &h,
        "kairos_triggers_skipped_total",
        &[r#"scenario="vip""#, r#"reason="restored""#],
    );
    assert_eq!(restored, 1.0);
    let profile = h.pipeline.profile("cr").expect("read").expect("stored");
    assert_eq!((profile.orders, profile.revenue), (20, 600.0));

    // A customer who was not a Champion before the cancellation is greeted when an
    // order makes them one, whatever came first.
    let mut h = Harness::new();
    orders_of(&mut h, "cg", 4, (t, HOUR), 200.0);
    let cancelled = order("o-cg-x", 50.0, Some("cancelled"));
    h.site("cg-cancel", "order_status", "cg", t + 6 * HOUR, cancelled);
    h.site(
        "cg-buy-x",
        "purchase",
        "cg",
        t + 5 * HOUR,
        order("o-cg-x", 50.0, None),
    );
    h.site(
        "cg-buy4",
        "purchase",
        "cg",
        t + 7 * HOUR,
        order("o-cg-4", 200.0, None),
    );
    assert_eq!(h.triggers("cg", "vip").len(), 1);
}

#[test]
fn an_unknown_order_cancelled_for_a_customer_of_many_orders_is_told_as_an_exit() {
    let t = at(T0);
    let mut h = Harness::new();
    // Twenty orders fill the recent ones: an unknown order may be an older one.
    for i in 0..20 {
        h.site(
            &format!("cm-buy{i}"),
            "purchase",
            "cm",
            t + i * MINUTE,
            order(&format!("o-cm-{i}"), 100.0, None),
        );
    }
    let cancelled = order("o-cm-old", 1900.0, Some("cancelled"));
    h.site("cm-cancel", "order_status", "cm", t + HOUR, cancelled);
    let left: Vec<Value> = h
        .on("customer-actions")
        .filter(|a| a.value["customer_id"] == "cm" && a.value["kind"] == "left_segment")
        .map(|a| a.value.clone())
        .collect();
    assert_eq!(left.len(), 1, "{left:#?}");
    assert_eq!(left[0]["segment"], "Champions");
}

#[test]
fn a_vip_entry_processed_after_a_backlog_past_the_tolerance_is_skipped_as_late() {
    let t = at(T0);
    let vip_after = |backlog: Millis| {
        let mut h = Harness::new();
        for i in 0..4 {
            h.site(
                &format!("bl-buy{i}"),
                "purchase",
                "bl",
                t + i * HOUR,
                order(&format!("o-bl-{i}"), 200.0, None),
            );
        }
        // The fifth order, placed at t + 4 h, reaches the profile `backlog` later.
        h.advance(t + 4 * HOUR + backlog);
        h.site(
            "bl-buy4",
            "purchase",
            "bl",
            t + 4 * HOUR,
            order("o-bl-4", 200.0, None),
        );
        assert!(
            find(&h.transitions("bl"), "rfm", "Champions").is_some(),
            "a Champion either way"
        );
        let late = metric(
            &h,
            "kairos_triggers_skipped_total",
            &[r#"scenario="vip""#, r#"reason="late""#],
        );
        (h.triggers("bl", "vip"), late)
    };
    // Within the tolerance (the scenario's valid_for, 24 h): greeted. Its cause time
    // is the transition's, when the profile learnt of the order.
    let (fired, late) = vip_after(6 * HOUR);
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["cause_occurred_at"], t + 10 * HOUR);
    assert_eq!(late, 0.0);
    // Three days late (an outage): skipped and counted.
    let (fired, late) = vip_after(3 * DAY);
    assert!(fired.is_empty(), "{fired:#?}");
    assert_eq!(late, 1.0);
}

// 12. Price drop and back in stock.

/// The replay's one-parse path keys a visitor's event by the profile it goes to
/// (`anon:<id>`), the key its price drops come back with: keyed by the bare id, the
/// profile would sit on another partition than its occasions, which found no one.
#[test]
fn a_replayed_anonymous_viewer_on_another_partition_than_its_bare_id_hears_of_the_price_drop() {
    let t = at(T0);
    let mut h = Harness::new();
    // A visitor whose bare id and profile id fall on different partitions.
    let visitor = (0..100)
        .map(|n| format!("v-{n}"))
        .find(|v| {
            kairos_core::replay::partition_for(v.as_bytes(), 2)
                != kairos_core::replay::partition_for(format!("anon:{v}").as_bytes(), 2)
        })
        .expect("a visitor split across the partitions");
    h.catalog(
        "rv-cat-1",
        "p1",
        t,
        json!({"name": "Kettle", "price": 100.0, "in_stock": true}),
    );
    let view = json!({"event_id": "rv-view", "event_type": "product_view",
        "occurred_at": rfc(t + HOUR), "anonymous_id": visitor, "product": product("p1", 100.0)});
    let raw = serde_json::to_vec(&view).expect("json");
    let taken = {
        let mut sink = Harness::sink(&mut h.outputs);
        h.pipeline
            .push_site_event_line("kairos.events.site", &raw, &mut sink)
            .expect("push")
    };
    assert!(taken);
    h.catalog("rv-cat-2", "p1", t + 2 * HOUR, json!({"price": 80.0}));
    let fired = h.triggers(&format!("anon:{visitor}"), "price_drop");
    assert_eq!(fired.len(), 1, "{fired:#?}");
}

/// A replayed catalog envelope keyed otherwise than by its product id reaches the join
/// on another partition than the product's: the join sends it on to the product's
/// partition, as on Kafka, and the viewer there hears of the drop.
#[test]
fn a_catalog_update_keyed_otherwise_still_tells_the_product_s_viewer() {
    let t = at(T0);
    let mut h = Harness::new();
    let key = (0..100)
        .map(|n| format!("row-{n}"))
        .find(|k| {
            kairos_core::replay::partition_for(k.as_bytes(), 2)
                != kairos_core::replay::partition_for(b"p1", 2)
        })
        .expect("a key on the other partition");
    let update = |event_id: &str, time: Millis, price: f64| {
        json!({"event_id": event_id, "occurred_at": rfc(time), "product_id": "p1",
            "name": "Kettle", "price": price, "in_stock": true})
    };
    h.feed("catalog", &key, update("ko-cat-1", t, 100.0));
    h.site(
        "ko-view",
        "product_view",
        "ko1",
        t + HOUR,
        json!({"product": product("p1", 100.0)}),
    );
    h.feed("catalog", &key, update("ko-cat-2", t + 2 * HOUR, 80.0));
    assert_eq!(h.triggers("ko1", "price_drop").len(), 1);
}

#[test]
fn price_drop_reaches_viewers_only() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog(
        "cat-1",
        "p1",
        t,
        json!({"name": "Kettle", "price": 100.0, "in_stock": true}),
    );
    h.site(
        "pr1-view",
        "product_view",
        "pr1",
        t + HOUR,
        json!({"product": product("p1", 100.0)}),
    );
    h.site(
        "pr2-view",
        "product_view",
        "pr2",
        t + HOUR,
        json!({"product": product("p9", 10.0)}),
    );
    h.catalog("cat-2", "p1", t + 2 * HOUR, json!({"price": 80.0}));
    let fired = h.triggers("pr1", "price_drop");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    let v = vars(&fired[0]);
    assert_eq!(v["product_id"], "p1");
    assert_eq!(v["product_name"], "Kettle");
    assert_eq!(v["old_price"], 100.0);
    assert_eq!(v["new_price"], 80.0);
    assert_eq!(
        v["lowest_price"], 100.0,
        "the 30 days' lowest before the drop"
    );
    assert_eq!(fired[0]["fired_at"], t + 2 * HOUR);
    assert!(
        h.triggers("pr2", "price_drop").is_empty(),
        "did not view p1"
    );

    // 5% below the 80 told, and 10% below no price that 80 was not: news to no one
    // (the join does not read the audience for it).
    h.catalog("cat-3", "p1", t + 3 * HOUR, json!({"price": 76.0}));
    h.advance(t + 4 * HOUR);
    assert_eq!(h.triggers("pr1", "price_drop").len(), 1);
    assert_eq!(skipped(&h, "price_drop", "below_min_drop"), 0.0);

    // Back up and down to 80 again: announced (a viewer of 100 since would want it),
    // but pr1 was told of 80 and has not seen the product since: nothing new (the
    // same offer, which the arbiter's repeat window would hold back too).
    h.catalog("cat-4", "p1", t + 5 * HOUR, json!({"price": 100.0}));
    h.catalog("cat-5", "p1", t + 6 * HOUR, json!({"price": 80.0}));
    h.advance(t + 7 * HOUR);
    let fired = h.triggers("pr1", "price_drop");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["offer_id"], "p1@80");
    assert_eq!(skipped(&h, "price_drop", "below_min_drop"), 1.0);
}

/// The catalog join with `audience_per_commit` on `mode`'s clock, nine customers (two
/// wishers, seven viewers) interested in p30, and p30 back in stock and cheaper (the
/// viewers hear of the drop, the wishers of the return with it); `now` is the wall
/// clock's time, or the event time the test goes by.
fn fan_out_harness(per_commit: usize, mode: ClockMode, now: Millis) -> (Harness, Vec<String>) {
    let config = CONFIG.replace(
        "[arbiter]\n",
        &format!("[profile]\naudience_per_commit = {per_commit}\n\n[arbiter]\n"),
    );
    assert_ne!(config, CONFIG);
    let mut h = Harness::with(&config, mode);
    h.catalog(
        "fo-0",
        "p30",
        now - 3 * HOUR,
        json!({"name": "Kettle", "price": 100.0, "in_stock": false}),
    );
    let customers: Vec<String> = (0..9).map(|n| format!("fo-{n}")).collect();
    for (n, customer) in customers.iter().enumerate() {
        let kind = if n < 2 {
            "wishlist_add"
        } else {
            "product_view"
        };
        h.site(
            &format!("{customer}-{kind}"),
            kind,
            customer,
            now - 2 * HOUR,
            json!({"product": product("p30", 100.0)}),
        );
    }
    h.catalog(
        "fo-1",
        "p30",
        now - HOUR,
        json!({"price": 80.0, "in_stock": true}),
    );
    (h, customers)
}

/// The announcements each customer was told: (customer, scenario, trigger id).
fn told(h: &Harness, customers: &[String]) -> Vec<(String, String, String)> {
    customers
        .iter()
        .flat_map(|c| {
            let mut told = h.triggers(c, "price_drop");
            told.extend(h.triggers(c, "back_in_stock"));
            told.into_iter().map(|t| {
                (
                    c.clone(),
                    t["scenario"].to_string(),
                    t["trigger_id"].to_string(),
                )
            })
        })
        .collect()
}

/// On the wall clock, an audience larger than `profile.audience_per_commit` is told in
/// chunks, one per commit after the update's, each customer once, with the ids an
/// undivided telling gives; in event time (replays, backtests) it is told at once,
/// whatever the setting, so results do not depend on where commits fall.
#[test]
fn a_large_audience_is_told_in_chunks_with_the_same_ids() {
    let now = kairos_core::time::wall_now();
    let (h, customers) = fan_out_harness(100, ClockMode::Wall, now);
    let undivided = told(&h, &customers);
    assert_eq!(undivided.len(), 9, "{undivided:#?}");
    assert_eq!(
        undivided
            .iter()
            .filter(|(_, s, _)| s.contains("back_in_stock"))
            .count(),
        2
    );
    let (mut h, customers) = fan_out_harness(4, ClockMode::Wall, now);
    let mut sizes = vec![told(&h, &customers).len()];
    for _ in 0..3 {
        // A chunk's successor is due a second after it was told.
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        h.commit();
        sizes.push(told(&h, &customers).len());
    }
    assert_eq!(sizes, [4, 8, 9, 9], "told after each commit");
    let mut chunked = told(&h, &customers);
    chunked.sort();
    let mut undivided = undivided;
    undivided.sort();
    assert_eq!(chunked, undivided);

    let t = at(T0);
    let (h, customers) = fan_out_harness(4, ClockMode::Event, t);
    assert_eq!(told(&h, &customers).len(), 9, "event time tells at once");
}

/// The rest of an audience told in chunks hears nothing of a return to stock (and the
/// drop with it) that no longer holds: sold out again before their chunk came.
#[test]
fn the_rest_of_an_audience_hears_nothing_of_news_withdrawn_since() {
    let now = kairos_core::time::wall_now();
    let (mut h, customers) = fan_out_harness(4, ClockMode::Wall, now);
    assert_eq!(told(&h, &customers).len(), 4);
    h.catalog("fo-2", "p30", now - HOUR / 2, json!({"in_stock": false}));
    for _ in 0..3 {
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        h.commit();
    }
    assert_eq!(told(&h, &customers).len(), 4, "{:#?}", told(&h, &customers));
}

/// A price-drop scenario that sets no `min_drop_percent` tells of drops of at least
/// the default (5%): a repricer's cent, or 2%, is no news to anyone.
#[test]
fn a_price_drop_without_its_own_threshold_tells_drops_of_the_default_and_more() {
    let config = CONFIG.replace(
        "template = \"price_drop\"\nmin_drop_percent = 10\n",
        "template = \"price_drop\"\n",
    );
    assert_ne!(config, CONFIG);
    let t = at(T0);
    let mut h = Harness::with(&config, ClockMode::Event);
    h.catalog(
        "dd-0",
        "p1",
        t,
        json!({"name": "Kettle", "price": 100.0, "in_stock": true}),
    );
    h.site(
        "dd-view",
        "product_view",
        "dd1",
        t + HOUR,
        json!({"product": product("p1", 100.0)}),
    );
    h.catalog("dd-1", "p1", t + 2 * HOUR, json!({"price": 99.99}));
    h.catalog("dd-2", "p1", t + 3 * HOUR, json!({"price": 98.0}));
    h.advance(t + 4 * HOUR);
    assert!(h.triggers("dd1", "price_drop").is_empty());
    h.catalog("dd-3", "p1", t + 5 * HOUR, json!({"price": 94.0}));
    h.advance(t + 6 * HOUR);
    let fired = h.triggers("dd1", "price_drop");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["new_price"], 94.0);
}

/// The price a wish without one is measured from is the window's highest (30 days),
/// not one of months ago: 100, then 95 for two months, is no 11% drop at 89.
#[test]
fn a_wish_without_a_price_is_measured_from_the_window_not_from_months_ago() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("wm-0", "p5", t, json!({"price": 100.0, "in_stock": true}));
    h.catalog("wm-1", "p5", t + DAY, json!({"price": 95.0}));
    h.site(
        "wm-wish",
        "wishlist_add",
        "wm",
        t + 2 * DAY,
        json!({"product": {"product_id": "p5"}}),
    );
    h.catalog("wm-2", "p5", t + 60 * DAY, json!({"price": 89.0}));
    h.advance(t + 60 * DAY + HOUR);
    assert!(h.triggers("wm", "price_drop").is_empty(), "6% below 95");
    h.catalog("wm-3", "p5", t + 61 * DAY, json!({"price": 85.0}));
    h.advance(t + 61 * DAY + HOUR);
    let fired = h.triggers("wm", "price_drop");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["old_price"], json!(95.0));
}

/// A staged markdown: 100, 92 (8%, news to no one), a view at 92, 89 (11% below 100:
/// told to whoever saw 100; 3% for this viewer), then 82: 11% below the 92 the
/// customer saw, told, though only 8% below the 89 announced before. A customer told
/// of 89 hears of 82 only as the 8% it is to them: nothing.
#[test]
fn a_staged_markdown_is_measured_from_the_price_each_customer_saw_or_was_told() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("sm-0", "p8", t, json!({"price": 100.0, "in_stock": true}));
    h.site(
        "early-view",
        "product_view",
        "early",
        t + HOUR / 2,
        json!({"product": product("p8", 100.0)}),
    );
    h.catalog("sm-1", "p8", t + HOUR, json!({"price": 92.0}));
    h.site(
        "mx-view",
        "product_view",
        "mx",
        t + 2 * HOUR,
        json!({"product": product("p8", 92.0)}),
    );
    h.catalog("sm-2", "p8", t + 3 * HOUR, json!({"price": 89.0}));
    h.advance(t + 3 * HOUR + MINUTE);
    assert!(h.triggers("mx", "price_drop").is_empty(), "3% for mx");
    assert_eq!(h.triggers("early", "price_drop").len(), 1, "11% for early");
    h.catalog("sm-3", "p8", t + 4 * HOUR, json!({"price": 82.0}));
    h.advance(t + 5 * HOUR);
    let fired = h.triggers("mx", "price_drop");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    let v = vars(&fired[0]);
    assert_eq!(
        (v["old_price"].clone(), v["new_price"].clone()),
        (json!(92.0), json!(82.0))
    );
    assert_eq!(h.triggers("early", "price_drop").len(), 1, "told of 89: 8%");
}

#[test]
fn a_product_viewed_again_after_the_interest_window_still_hears_of_its_price_drop() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("cat-1", "p4", t, json!({"name": "Lamp", "price": 100.0}));
    for (n, day) in [0, 40].into_iter().enumerate() {
        h.site(
            &format!("pr4-view-{n}"),
            "product_view",
            "pr4",
            t + HOUR + day * DAY,
            json!({"product": product("p4", 100.0)}),
        );
    }
    // The first view is older than the catalog's 30-day audience window; the second
    // one, with the product still among the recently viewed, renews it.
    h.catalog("cat-2", "p4", t + 41 * DAY, json!({"price": 70.0}));
    let fired = h.triggers("pr4", "price_drop");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["new_price"], 70.0);
    assert_eq!(h.on("product-interest").count(), 2);
}

/// The profile keeps the latest twenty views; the join keeps thirty days of them.
#[test]
fn a_price_drop_reaches_a_viewer_who_viewed_twenty_other_products_since() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog(
        "many-cat-1",
        "p1",
        t,
        json!({"name": "Kettle", "price": 100.0, "in_stock": true}),
    );
    h.site(
        "many-view",
        "product_view",
        "many",
        t + HOUR,
        json!({"product": product("p1", 100.0)}),
    );
    for i in 0..20 {
        h.site(
            &format!("many-view-{i}"),
            "product_view",
            "many",
            t + HOUR + (i + 1) * MINUTE,
            json!({"product": product(&format!("q{i}"), 10.0)}),
        );
    }
    h.catalog("many-cat-2", "p1", t + DAY, json!({"price": 80.0}));
    let fired = h.triggers("many", "price_drop");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["old_price"], 100.0);
}

#[test]
fn small_price_drop_gives_nothing() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("cat-1", "p3", t, json!({"price": 100.0}));
    h.site(
        "pr3-view",
        "product_view",
        "pr3",
        t + HOUR,
        json!({"product": product("p3", 100.0)}),
    );
    h.catalog("cat-2", "p3", t + 2 * HOUR, json!({"price": 95.0}));
    h.advance(t + 3 * HOUR);
    assert!(h.triggers("pr3", "price_drop").is_empty());
    assert!(h.on("product-occasions").next().is_none());
}

/// A drop of exactly the scenario's minimum counts, though in floating point 1.00 to
/// 0.90 is 9.999999999999998% (the shipped price-drop minimum is 10%).
#[test]
fn a_drop_of_exactly_the_minimum_counts() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("cat-1", "p4", t, json!({"price": 1.0}));
    h.site(
        "pr4-view",
        "product_view",
        "pr4",
        t + HOUR,
        json!({"product": product("p4", 1.0)}),
    );
    h.catalog("cat-2", "p4", t + 2 * HOUR, json!({"price": 0.9}));
    h.advance(t + 3 * HOUR);
    assert_eq!(h.triggers("pr4", "price_drop").len(), 1);
}

/// The test configuration with a second price-drop scenario, "big_sale", at 30%.
fn with_big_sale() -> Harness {
    let config = CONFIG.replace(
        "[[scenarios]]\nname = \"back_in_stock\"",
        "[[scenarios]]\nname = \"big_sale\"\nkind = \"price_drop\"\nchannels = [\"email\"]\n\
         template = \"big_sale\"\nmin_drop_percent = 30\n\n\
         [[scenarios]]\nname = \"back_in_stock\"",
    );
    assert_ne!(config, CONFIG);
    Harness::with(&config, ClockMode::Event)
}

/// A drop told by a 10% scenario leaves a 30% "big sale" measuring from the price the
/// customer saw: 100, 85 (told by the first), 68 (32% below 100, 20% below 85): the
/// big sale tells them, the 10% scenario too (20% below what it told).
#[test]
fn a_drop_told_by_a_lower_threshold_leaves_a_higher_one_its_own_measure() {
    let t = at(T0);
    let mut h = with_big_sale();
    h.catalog("bs-0", "p6", t, json!({"price": 100.0, "in_stock": true}));
    h.site(
        "bs-view",
        "product_view",
        "bs",
        t + HOUR,
        json!({"product": product("p6", 100.0)}),
    );
    h.catalog("bs-1", "p6", t + 2 * HOUR, json!({"price": 85.0}));
    h.advance(t + 3 * HOUR);
    assert_eq!(h.triggers("bs", "price_drop").len(), 1);
    assert!(h.triggers("bs", "big_sale").is_empty(), "15%");
    h.catalog("bs-2", "p6", t + 4 * HOUR, json!({"price": 68.0}));
    h.advance(t + 5 * HOUR);
    let big = h.triggers("bs", "big_sale");
    assert_eq!(big.len(), 1, "{big:#?}");
    assert_eq!(vars(&big[0])["old_price"], json!(100.0));
    let drops = h.triggers("bs", "price_drop");
    assert_eq!(drops.len(), 2, "{drops:#?}");
    assert_eq!(vars(&drops[1])["old_price"], json!(85.0));
}

/// A 30% scenario hears of 70 (30% below the 100 the customer saw) though the 10% one
/// told 72 just before (28% below 100): the join announces a price that crosses a
/// threshold the last announcement did not.
#[test]
fn a_higher_threshold_crossed_after_a_lower_one_told_is_announced() {
    let t = at(T0);
    let mut h = with_big_sale();
    h.catalog("ht-0", "p6", t, json!({"price": 100.0, "in_stock": true}));
    h.site(
        "ht-view",
        "product_view",
        "ht",
        t + HOUR,
        json!({"product": product("p6", 100.0)}),
    );
    for (i, price) in [85.0, 72.0, 70.0].into_iter().enumerate() {
        let i = i as Millis;
        h.catalog(
            &format!("ht-{}", i + 1),
            "p6",
            t + (2 + i) * HOUR,
            json!({"price": price}),
        );
    }
    h.advance(t + 6 * HOUR);
    assert_eq!(h.triggers("ht", "price_drop").len(), 2, "85 and 72");
    let big = h.triggers("ht", "big_sale");
    assert_eq!(big.len(), 1, "{big:#?}");
    assert_eq!(vars(&big[0])["new_price"], json!(70.0));
}

/// A drop held while the product was sold out and told with its return: the wisher
/// hears of both in the return's message (was 100, now 80), not in two; a viewer
/// hears of the drop.
#[test]
fn a_wisher_hears_of_a_return_at_a_lower_price_once() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("rl-0", "p3", t, json!({"price": 100.0, "in_stock": true}));
    h.site(
        "rl-wish",
        "wishlist_add",
        "rl-w",
        t + HOUR,
        json!({"product": product("p3", 100.0)}),
    );
    h.site(
        "rl-view",
        "product_view",
        "rl-v",
        t + HOUR,
        json!({"product": product("p3", 100.0)}),
    );
    h.catalog("rl-1", "p3", t + 2 * HOUR, json!({"in_stock": false}));
    h.catalog("rl-2", "p3", t + 3 * HOUR, json!({"price": 80.0}));
    h.catalog("rl-3", "p3", t + 4 * HOUR, json!({"in_stock": true}));
    // A wish made before, read after the return (the app's topic behind).
    h.site(
        "rl-late-wish",
        "wishlist_add",
        "rl-late",
        t + HOUR,
        json!({"product": product("p3", 100.0)}),
    );
    h.advance(t + 5 * HOUR);
    for wisher in ["rl-w", "rl-late"] {
        assert!(h.triggers(wisher, "price_drop").is_empty(), "{wisher}");
        let back = h.triggers(wisher, "back_in_stock");
        assert_eq!(back.len(), 1, "{wisher}: {back:#?}");
        let v = vars(&back[0]);
        let prices = (v["old_price"].clone(), v["new_price"].clone());
        assert_eq!(prices, (json!(100.0), json!(80.0)), "{wisher}");
    }
    assert_eq!(h.triggers("rl-v", "price_drop").len(), 1);
    assert!(h.triggers("rl-v", "back_in_stock").is_empty());
    // The return told the wisher of 80: a drop to 72 is measured from it.
    h.catalog("rl-4", "p3", t + 6 * HOUR, json!({"price": 72.0}));
    h.advance(t + 7 * HOUR);
    let drops = h.triggers("rl-w", "price_drop");
    assert_eq!(drops.len(), 1, "{drops:#?}");
    assert_eq!(vars(&drops[0])["old_price"], json!(80.0));
    // Once the price rose, a wish read late hears of the return at the price now.
    h.catalog("rl-5", "p3", t + 8 * HOUR, json!({"price": 90.0}));
    h.site(
        "rl-later-wish",
        "wishlist_add",
        "rl-later",
        t + 2 * HOUR + 30 * MINUTE,
        json!({"product": product("p3", 100.0)}),
    );
    h.advance(t + 9 * HOUR);
    let back = h.triggers("rl-later", "back_in_stock");
    assert_eq!(back.len(), 1, "{back:#?}");
    let v = vars(&back[0]);
    let prices = (v["old_price"].clone(), v["new_price"].clone());
    assert_eq!(prices, (json!(null), json!(90.0)));
}

#[test]
fn back_in_stock_reaches_the_wishlister_only() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog(
        "cat-1",
        "p2",
        t,
        json!({"name": "Teapot", "price": 30.0, "in_stock": false}),
    );
    h.site(
        "bs1-wish",
        "wishlist_add",
        "bs1",
        t + HOUR,
        json!({"product": product("p2", 30.0)}),
    );
    h.site(
        "bs2-view",
        "product_view",
        "bs2",
        t + HOUR,
        json!({"product": product("p2", 30.0)}),
    );
    h.catalog("cat-2", "p2", t + 2 * HOUR, json!({"in_stock": true}));
    let fired = h.triggers("bs1", "back_in_stock");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["product_id"], "p2");
    assert_eq!(vars(&fired[0])["offer_id"], "p2#BackInStock");
    assert!(
        h.triggers("bs2", "back_in_stock").is_empty(),
        "viewed, not wishlisted"
    );
    assert!(h.triggers("bs1", "price_drop").is_empty());
}

/// A wish made after the restock, the catalog's update read late: the product was in
/// stock when they wished it, so its return is no news to them.
#[test]
fn a_wish_made_after_the_restock_hears_nothing_of_it() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog(
        "ws-cat-1",
        "p2",
        t,
        json!({"price": 30.0, "in_stock": false}),
    );
    for (customer, hours) in [("ws-before", 1), ("ws-after", 3)] {
        h.site(
            &format!("{customer}-wish"),
            "wishlist_add",
            customer,
            t + hours * HOUR,
            json!({"product": product("p2", 30.0)}),
        );
    }
    h.catalog("ws-cat-2", "p2", t + 2 * HOUR, json!({"in_stock": true}));
    assert_eq!(h.triggers("ws-before", "back_in_stock").len(), 1);
    assert!(h.triggers("ws-after", "back_in_stock").is_empty());
    assert_eq!(
        metric(&h, "kairos_triggers_skipped_total", &["seen_since"]),
        1.0
    );
}

/// The catalog is read straight from its topic, interest only once the profile
/// committed the event: a wish and a view from before a restock and drop that reach
/// the join after it still bring their greetings.
#[test]
fn interest_from_before_a_catalog_change_that_arrives_after_it_is_greeted() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog(
        "late-cat-1",
        "p7",
        t,
        json!({"name": "Kettle", "price": 100.0, "in_stock": false}),
    );
    h.catalog(
        "late-cat-2",
        "p7",
        t + 2 * HOUR,
        json!({"price": 80.0, "in_stock": true}),
    );
    h.site(
        "late-wish",
        "wishlist_add",
        "lw1",
        t + HOUR,
        json!({"product": product("p7", 100.0)}),
    );
    h.site(
        "late-view",
        "product_view",
        "lw2",
        t + HOUR,
        json!({"product": product("p7", 100.0)}),
    );
    h.advance(t + 3 * HOUR);
    assert_eq!(h.triggers("lw1", "back_in_stock").len(), 1);
    let drops = h.triggers("lw2", "price_drop");
    assert_eq!(drops.len(), 1, "{drops:#?}");
    assert_eq!(vars(&drops[0])["new_price"], 80.0);
    assert!(h.triggers("lw2", "back_in_stock").is_empty(), "viewed only");
}

/// A return to stock whose price rose since is told late at the price now, also from
/// the join's cache of the product (which a wish before the change loaded): what a
/// restart would read from the store.
#[test]
fn interest_arriving_late_hears_a_return_to_stock_at_the_price_now() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog(
        "risen-cat",
        "p20",
        t,
        json!({"name": "Kettle", "price": 100.0, "in_stock": false}),
    );
    let wish = |h: &mut Harness, customer: &str| {
        h.site(
            &format!("{customer}-wish"),
            "wishlist_add",
            customer,
            t + HOUR,
            json!({"product": product("p20", 100.0)}),
        );
    };
    wish(&mut h, "rs-early");
    h.catalog("risen-back", "p20", t + 2 * HOUR, json!({"in_stock": true}));
    let told = h.triggers("rs-early", "back_in_stock");
    assert_eq!(told.len(), 1, "{told:#?}");
    assert_eq!(vars(&told[0])["new_price"], 100.0);
    // Dearer since: nothing withdrawn, the announcement follows the price.
    h.catalog("risen-up", "p20", t + 150 * MINUTE, json!({"price": 110.0}));
    wish(&mut h, "rs-late");
    h.advance(t + 3 * HOUR);
    let late = h.triggers("rs-late", "back_in_stock");
    assert_eq!(late.len(), 1, "{late:#?}");
    let v = vars(&late[0]);
    assert_eq!(v["new_price"], 110.0, "{v}");
    assert!(v["old_price"].is_null(), "{v}");
}

/// An announcement that no longer holds is not told to interest that reaches the join
/// late: a return to stock sold out again, a drop whose price rose since (a customer
/// would be told of a price or a stock the shop no longer has).
#[test]
fn interest_arriving_late_hears_nothing_of_a_change_undone_since() {
    let t = at(T0);
    let mut h = Harness::new();
    for (id, in_stock) in [("p8", false), ("p9", true)] {
        h.catalog(
            &format!("undone-cat-{id}"),
            id,
            t,
            json!({"name": "Kettle", "price": 100.0, "in_stock": in_stock}),
        );
    }
    // p8 back in stock and cheaper, then sold out; p9 cheaper, then dearer again.
    h.catalog(
        "undone-8a",
        "p8",
        t + 2 * HOUR,
        json!({"price": 80.0, "in_stock": true}),
    );
    h.catalog(
        "undone-8b",
        "p8",
        t + 150 * MINUTE,
        json!({"in_stock": false}),
    );
    h.catalog("undone-9a", "p9", t + 2 * HOUR, json!({"price": 80.0}));
    h.catalog("undone-9b", "p9", t + 150 * MINUTE, json!({"price": 120.0}));
    for (id, customer) in [("p8", "ul8"), ("p9", "ul9")] {
        h.site(
            &format!("undone-wish-{id}"),
            "wishlist_add",
            customer,
            t + HOUR,
            json!({"product": product(id, 100.0)}),
        );
        h.site(
            &format!("undone-view-{id}"),
            "product_view",
            customer,
            t + HOUR,
            json!({"product": product(id, 100.0)}),
        );
    }
    h.advance(t + 3 * HOUR);
    for customer in ["ul8", "ul9"] {
        for scenario in ["back_in_stock", "price_drop"] {
            let fired = h.triggers(customer, scenario);
            assert!(fired.is_empty(), "{customer} {scenario}: {fired:#?}");
        }
    }
    // A drop told while the product was in stock is not told late while it is sold
    // out, and is again once it is back at that price.
    h.catalog(
        "undone-11",
        "p11",
        t,
        json!({"price": 100.0, "in_stock": true}),
    );
    h.catalog("undone-11a", "p11", t + 2 * HOUR, json!({"price": 80.0}));
    h.catalog(
        "undone-11b",
        "p11",
        t + 150 * MINUTE,
        json!({"in_stock": false}),
    );
    let late_view = |h: &mut Harness, customer: &str| {
        h.site(
            &format!("undone-view-{customer}"),
            "product_view",
            customer,
            t + HOUR,
            json!({"product": product("p11", 100.0)}),
        );
    };
    late_view(&mut h, "ul11");
    h.catalog("undone-11c", "p11", t + 4 * HOUR, json!({"in_stock": true}));
    late_view(&mut h, "ul12");
    h.advance(t + 5 * HOUR);
    assert!(h.triggers("ul11", "price_drop").is_empty(), "sold out then");
    let drops = h.triggers("ul12", "price_drop");
    assert_eq!(drops.len(), 1, "{drops:#?}");
    assert_eq!(vars(&drops[0])["new_price"], 80.0);
    // A drop that still holds is told late, as before.
    h.catalog("undone-9c", "p9", t + 4 * HOUR, json!({"price": 90.0}));
    h.site(
        "undone-view-late",
        "product_view",
        "ul10",
        t + 3 * HOUR,
        json!({"product": product("p9", 120.0)}),
    );
    h.advance(t + 5 * HOUR);
    let drops = h.triggers("ul10", "price_drop");
    assert_eq!(drops.len(), 1, "{drops:#?}");
    assert_eq!(vars(&drops[0])["new_price"], 90.0);
}

#[test]
fn a_wish_the_full_wishlist_pushed_out_gets_no_more_price_drops() {
    let t = at(T0);
    let mut h = Harness::new();
    for n in 0..=50 {
        let id = format!("wp{n}");
        h.catalog(&format!("wl-cat-{n}"), &id, t, json!({"price": 100.0}));
        h.site(
            &format!("wl-wish-{n}"),
            "wishlist_add",
            "wl1",
            t + HOUR + n * MINUTE,
            json!({"product": product(&id, 100.0)}),
        );
    }
    // The 51st wish pushed `wp0` out; `wp1` is still wished.
    h.catalog("wl-drop-0", "wp0", t + 3 * HOUR, json!({"price": 50.0}));
    h.catalog("wl-drop-1", "wp1", t + 3 * HOUR, json!({"price": 50.0}));
    let fired = h.triggers("wl1", "price_drop");
    let products: Vec<Value> = fired
        .iter()
        .map(|t| vars(t)["product_id"].clone())
        .collect();
    assert_eq!(products, [json!("wp1")], "{fired:#?}");
}

/// "Never after the customer already did the thing": a purchase of the product (online,
/// with its items or by checking out the cart, or at the till) ends the interest a
/// price drop or a return to stock would speak to; a later view starts it again.
#[test]
fn a_price_drop_or_return_to_stock_skips_a_customer_who_bought_the_product_since() {
    let t = at(T0);
    let mut h = Harness::new();
    for (id, in_stock) in [("p1", true), ("p2", false), ("p3", true), ("p-till", true)] {
        h.catalog(
            &format!("bb-cat-{id}"),
            id,
            t,
            json!({"price": 100.0, "in_stock": in_stock}),
        );
    }
    h.site(
        "bb-view-1",
        "product_view",
        "bb",
        t + HOUR,
        json!({"product": product("p1", 100.0)}),
    );
    h.site(
        "bb-wish-2",
        "wishlist_add",
        "bb",
        t + HOUR,
        json!({"product": product("p2", 100.0)}),
    );
    h.site(
        "bb-view-3",
        "product_view",
        "bb",
        t + HOUR,
        json!({"product": product("p3", 100.0)}),
    );
    h.site(
        "bb-view-t",
        "product_view",
        "bb",
        t + HOUR,
        json!({"product": product("p-till", 100.0)}),
    );
    // p1 and p2 bought with the order's items, p3 by checking out the cart, p-till at
    // the till.
    let mut items = order("o-bb", 200.0, None);
    items["items"] = json!([
        {"product_id": "p1", "quantity": 1, "unit_price": 100.0},
        {"product_id": "p2", "quantity": 1, "unit_price": 100.0},
    ]);
    h.site("bb-buy", "purchase", "bb", t + 2 * HOUR, items);
    h.site(
        "bb-add-3",
        "add_to_cart",
        "bb",
        t + 2 * HOUR + 30 * MINUTE,
        add_to_cart("p3", 100.0),
    );
    h.site(
        "bb-buy-3",
        "purchase",
        "bb",
        t + 3 * HOUR,
        order("o-bb-3", 100.0, None),
    );
    h.receipt("bb-till", "sale", "bb", t + 3 * HOUR, 100.0);
    for id in ["p1", "p3", "p-till"] {
        h.catalog(
            &format!("bb-drop-{id}"),
            id,
            t + 4 * HOUR,
            json!({"price": 50.0}),
        );
    }
    h.catalog("bb-back-2", "p2", t + 4 * HOUR, json!({"in_stock": true}));
    h.advance(t + 5 * HOUR);
    assert_eq!(
        h.on("product-occasions").count(),
        4,
        "the join knows no purchases"
    );
    assert!(
        h.triggers("bb", "price_drop").is_empty(),
        "{:#?}",
        h.triggers("bb", "price_drop")
    );
    assert!(h.triggers("bb", "back_in_stock").is_empty());
    assert_eq!(
        metric(
            &h,
            "kairos_triggers_skipped_total",
            &["already_bought", "\"price_drop\""]
        ),
        3.0
    );
    assert_eq!(
        metric(
            &h,
            "kairos_triggers_skipped_total",
            &["already_bought", "\"back_in_stock\""]
        ),
        1.0
    );

    // Viewed again after buying it: wanted again (another one, a present).
    h.site(
        "bb-view-1b",
        "product_view",
        "bb",
        t + 6 * HOUR,
        json!({"product": product("p1", 50.0)}),
    );
    h.catalog("bb-drop-1b", "p1", t + 7 * HOUR, json!({"price": 30.0}));
    let fired = h.triggers("bb", "price_drop");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["old_price"], 50.0);
}

/// A wish taken off is an answer: the price drops a view would bring stop too, until
/// the customer views the product again.
#[test]
fn a_wish_taken_off_stops_price_drops_though_the_product_was_viewed_within_the_window() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("uw-cat", "p1", t, json!({"price": 100.0, "in_stock": true}));
    h.site(
        "uw-view",
        "product_view",
        "uw",
        t + HOUR,
        json!({"product": product("p1", 100.0)}),
    );
    h.site(
        "uw-wish",
        "wishlist_add",
        "uw",
        t + 2 * HOUR,
        json!({"product": product("p1", 100.0)}),
    );
    h.site(
        "uw-unwish",
        "wishlist_remove",
        "uw",
        t + 3 * HOUR,
        json!({"product": product("p1", 100.0)}),
    );
    h.catalog("uw-drop", "p1", t + 4 * HOUR, json!({"price": 50.0}));
    assert_eq!(
        h.on("product-occasions").count(),
        1,
        "the view is within the join's window"
    );
    assert!(h.triggers("uw", "price_drop").is_empty());
    assert_eq!(
        metric(&h, "kairos_triggers_skipped_total", &["unwished"]),
        1.0
    );

    h.site(
        "uw-view-2",
        "product_view",
        "uw",
        t + 5 * HOUR,
        json!({"product": product("p1", 50.0)}),
    );
    h.catalog("uw-drop-2", "p1", t + 6 * HOUR, json!({"price": 40.0}));
    let fired = h.triggers("uw", "price_drop");
    assert_eq!(fired.len(), 1, "viewed again after the removal: {fired:#?}");
}

/// The site's and the app's topics are read independently: a removal read before the
/// addition it undoes (made earlier) keeps the wish off; a wish made after it stands.
#[test]
fn a_wish_removal_read_before_its_addition_keeps_the_wish_off() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog(
        "ro-cat",
        "p2",
        t,
        json!({"price": 100.0, "in_stock": false}),
    );
    let wish = json!({"product": product("p2", 100.0)});
    h.site(
        "ro-unwish",
        "wishlist_remove",
        "ro",
        t + 2 * HOUR,
        wish.clone(),
    );
    h.site("ro-wish", "wishlist_add", "ro", t + HOUR, wish.clone());
    let profile = h.pipeline.profile("ro").expect("read").expect("stored");
    assert!(profile.wishlist.is_empty(), "{:?}", profile.wishlist);
    h.catalog("ro-back", "p2", t + 3 * HOUR, json!({"in_stock": true}));
    assert!(
        h.on("product-occasions").next().is_none(),
        "the join holds no wish"
    );
    assert!(h.triggers("ro", "back_in_stock").is_empty());

    // A removal older than the wish it finds changes nothing.
    h.catalog("ro-out", "p2", t + 4 * HOUR, json!({"in_stock": false}));
    h.site(
        "ro-wish-2",
        "wishlist_add",
        "ro",
        t + 6 * HOUR,
        wish.clone(),
    );
    h.site("ro-unwish-old", "wishlist_remove", "ro", t + 5 * HOUR, wish);
    h.catalog("ro-back-2", "p2", t + 7 * HOUR, json!({"in_stock": true}));
    let fired = h.triggers("ro", "back_in_stock");
    assert_eq!(fired.len(), 1, "{fired:#?}");
}

/// The price a drop is measured from is the one the customer last saw: a view read
/// late does not move it back, and a wish made after the view carries its own.
#[test]
fn a_price_drop_is_measured_from_the_price_the_customer_saw_last() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("ps-cat", "p1", t, json!({"price": 100.0, "in_stock": true}));
    h.site(
        "ps-view-new",
        "product_view",
        "ps",
        t + 2 * HOUR,
        json!({"product": product("p1", 80.0)}),
    );
    h.site(
        "ps-view-old",
        "product_view",
        "ps",
        t + HOUR,
        json!({"product": product("p1", 100.0)}),
    );
    let profile = h.pipeline.profile("ps").expect("read").expect("stored");
    assert_eq!(profile.recently_viewed[0].price, Some(80.0));
    assert_eq!(profile.recently_viewed[0].at, t + 2 * HOUR);
    h.catalog("ps-drop", "p1", t + 3 * HOUR, json!({"price": 70.0}));
    let fired = h.triggers("ps", "price_drop");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(
        vars(&fired[0])["old_price"],
        80.0,
        "the latest view's price"
    );

    h.catalog("pw-cat", "p5", t, json!({"price": 100.0, "in_stock": true}));
    h.site(
        "pw-view",
        "product_view",
        "pw",
        t + HOUR,
        json!({"product": product("p5", 100.0)}),
    );
    h.site(
        "pw-wish",
        "wishlist_add",
        "pw",
        t + 2 * HOUR,
        json!({"product": product("p5", 60.0)}),
    );
    h.catalog("pw-drop", "p5", t + 3 * HOUR, json!({"price": 50.0}));
    let fired = h.triggers("pw", "price_drop");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(
        vars(&fired[0])["old_price"],
        60.0,
        "the wish came after the view"
    );
}

/// A cancelled order bought nothing: the wish it held is wanted again, in whichever
/// order the purchase and its cancellation are read.
#[test]
fn a_cancelled_order_leaves_its_products_wanted_whichever_is_read_first() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("co-cat", "p2", t, json!({"price": 30.0, "in_stock": false}));
    let mut bought = order("o-co", 30.0, None);
    bought["items"] = json!([{"product_id": "p2", "quantity": 1, "unit_price": 30.0}]);
    for (customer, cancel_first) in [("co-1", false), ("co-2", true)] {
        h.site(
            &format!("{customer}-wish"),
            "wishlist_add",
            customer,
            t + HOUR,
            json!({"product": product("p2", 30.0)}),
        );
        let mut purchase = bought.clone();
        purchase["order"]["order_id"] = json!(format!("o-{customer}"));
        let cancel = order_status(&format!("o-{customer}"), "cancelled");
        let buy_id = format!("{customer}-buy");
        let cancel_id = format!("{customer}-cancel");
        if cancel_first {
            h.site(&cancel_id, "order_status", customer, t + 3 * HOUR, cancel);
            h.site(&buy_id, "purchase", customer, t + 2 * HOUR, purchase);
        } else {
            h.site(&buy_id, "purchase", customer, t + 2 * HOUR, purchase);
            h.site(&cancel_id, "order_status", customer, t + 3 * HOUR, cancel);
        }
    }
    h.catalog("co-back", "p2", t + 4 * HOUR, json!({"in_stock": true}));
    for customer in ["co-1", "co-2"] {
        let fired = h.triggers(customer, "back_in_stock");
        assert_eq!(fired.len(), 1, "{customer}: {fired:#?}");
    }
}

/// A view after a removal or a purchase wants the product again, also once it has
/// left the latest twenty views the profile keeps.
#[test]
fn a_view_after_a_removal_or_purchase_counts_though_twenty_views_came_since() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("vr-cat", "p1", t, json!({"price": 100.0, "in_stock": true}));
    let p1 = json!({"product": product("p1", 100.0)});
    h.site("vr-wish", "wishlist_add", "vr", t + HOUR, p1.clone());
    h.site(
        "vr-unwish",
        "wishlist_remove",
        "vr",
        t + HOUR + 5 * MINUTE,
        p1.clone(),
    );
    h.site(
        "vr-view",
        "product_view",
        "vr",
        t + HOUR + 10 * MINUTE,
        p1.clone(),
    );
    let mut bought = order("o-vb", 100.0, None);
    bought["items"] = json!([{"product_id": "p1", "quantity": 1, "unit_price": 100.0}]);
    h.site("vb-buy", "purchase", "vb", t + HOUR, bought);
    h.site("vb-view", "product_view", "vb", t + 2 * HOUR, p1);
    for customer in ["vr", "vb"] {
        for i in 0..20 {
            h.site(
                &format!("{customer}-other-{i}"),
                "product_view",
                customer,
                t + 3 * HOUR + i * MINUTE,
                json!({"product": product(&format!("q{i}"), 10.0)}),
            );
        }
    }
    h.catalog("vr-drop", "p1", t + DAY, json!({"price": 50.0}));
    for customer in ["vr", "vb"] {
        let fired = h.triggers(customer, "price_drop");
        assert_eq!(fired.len(), 1, "{customer}: {fired:#?}");
    }
}

/// The profile keeps a bounded number of marks: a large order must not push out the
/// removal that keeps a wish off, nor the time that keeps a wish on.
#[test]
fn a_large_order_keeps_the_marks_that_hold_wishes_on_and_off() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog(
        "lo-cat-x",
        "px",
        t,
        json!({"price": 30.0, "in_stock": false}),
    );
    h.catalog(
        "lo-cat-y",
        "py",
        t,
        json!({"price": 30.0, "in_stock": false}),
    );
    let items: Vec<Value> = (0..40)
        .map(|i| json!({"product_id": format!("bulk-{i}"), "quantity": 1, "unit_price": 1.0}))
        .collect();
    let mut bulk = order("o-lo", 40.0, None);
    bulk["items"] = json!(items);
    // px taken off (the addition it undoes still on its way); py wished.
    h.site(
        "lo-unwish-x",
        "wishlist_remove",
        "lo",
        t + 2 * HOUR,
        json!({"product": product("px", 30.0)}),
    );
    h.site(
        "lo-wish-y",
        "wishlist_add",
        "lo",
        t + 2 * HOUR,
        json!({"product": product("py", 30.0)}),
    );
    h.site("lo-bulk", "purchase", "lo", t + 3 * HOUR, bulk);
    // Read late: px's addition, older than its removal; a removal of py older than
    // its wish.
    h.site(
        "lo-wish-x",
        "wishlist_add",
        "lo",
        t + HOUR,
        json!({"product": product("px", 30.0)}),
    );
    h.site(
        "lo-unwish-y",
        "wishlist_remove",
        "lo",
        t + HOUR,
        json!({"product": product("py", 30.0)}),
    );
    let profile = h.pipeline.profile("lo").expect("read").expect("stored");
    let wishes: Vec<&str> = profile
        .wishlist
        .iter()
        .map(|w| w.product_id.as_str())
        .collect();
    assert_eq!(wishes, ["py"]);
    assert!(
        profile.product_marks.len() <= 34,
        "{}",
        profile.product_marks.len()
    );
    h.catalog("lo-back-x", "px", t + 4 * HOUR, json!({"in_stock": true}));
    h.catalog("lo-back-y", "py", t + 4 * HOUR, json!({"in_stock": true}));
    let fired: Vec<Value> = h
        .triggers("lo", "back_in_stock")
        .iter()
        .map(|t| vars(t)["product_id"].clone())
        .collect();
    assert_eq!(fired, [json!("py")]);
}

/// A view dated after the change showed the new price already.
#[test]
fn a_customer_who_viewed_the_product_after_its_price_fell_hears_no_price_drop() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("vs-cat", "p1", t, json!({"price": 100.0, "in_stock": true}));
    // Two views the same day, carrying no price; the catalog's update is read after
    // them. The join hears of the day's first view, from before the change, and tells
    // the profile, which knows of the later one.
    for (id, hours) in [("vs-view-1", 1), ("vs-view-2", 3)] {
        h.site(
            id,
            "product_view",
            "vs",
            t + hours * HOUR,
            json!({"product": {"product_id": "p1"}}),
        );
    }
    h.catalog("vs-drop", "p1", t + 2 * HOUR, json!({"price": 50.0}));
    assert_eq!(h.on("product-occasions").count(), 1);
    assert!(h.triggers("vs", "price_drop").is_empty());
    assert_eq!(
        metric(&h, "kairos_triggers_skipped_total", &["seen_since"]),
        1.0
    );
}

// 13. Late events.

#[test]
fn late_registration_beyond_tolerance_is_not_welcomed() {
    let t = at("2026-04-01T09:00:00Z");
    let mut h = Harness::new();
    h.advance(t + 10 * DAY);
    h.site("late-reg", "registration", "late", t, json!({}));
    h.commit();
    h.advance(t + 11 * DAY);
    let fired = h.triggers("late", "welcome");
    assert!(
        fired.iter().all(|t| t["step"] != 0),
        "step 0 is 10 days late: {fired:#?}"
    );
    assert!(
        fired.is_empty(),
        "every step is more than a day late: {fired:#?}"
    );
}

#[test]
fn late_registration_within_tolerance_is_welcomed() {
    let t = at("2026-04-01T09:00:00Z");
    let mut h = Harness::new();
    h.advance(t + 12 * HOUR);
    h.site("late2-reg", "registration", "late2", t, json!({}));
    let fired = h.triggers("late2", "welcome");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t + 12 * HOUR);
    assert_eq!(fired[0]["step"], 0);
}

// 14. Determinism.

fn script(h: &mut Harness) {
    let t = at(T0);
    h.catalog(
        "d-cat-1",
        "p1",
        t,
        json!({"price": 100.0, "in_stock": false}),
    );
    h.site(
        "d-reg",
        "registration",
        "d1",
        t,
        json!({"profile": {"birthday": "1990-03-10", "time_zone": "Europe/Paris"}}),
    );
    h.site(
        "d-view",
        "product_view",
        "d1",
        t + MINUTE,
        json!({"product": product("p1", 100.0)}),
    );
    h.site(
        "d-wish",
        "wishlist_add",
        "d2",
        t + MINUTE,
        json!({"product": product("p1", 100.0)}),
    );
    h.site(
        "d-add",
        "add_to_cart",
        "d2",
        t + 2 * MINUTE,
        add_to_cart("p5", 15.0),
    );
    h.site(
        "d-buy",
        "purchase",
        "d3",
        t + 3 * MINUTE,
        order("o-d3", 120.0, None),
    );
    h.site(
        "d-ship",
        "order_status",
        "d3",
        t + DAY,
        order("o-d3", 120.0, Some("shipped")),
    );
    h.site(
        "d-deliv",
        "order_status",
        "d3",
        t + 2 * DAY,
        order("o-d3", 120.0, Some("delivered")),
    );
    h.receipt("d-till", "sale", "d4", t + HOUR, 45.0);
    h.catalog(
        "d-cat-2",
        "p1",
        t + 3 * DAY,
        json!({"price": 70.0, "in_stock": true}),
    );
    h.advance(t + 400 * DAY);
}

#[test]
fn same_input_same_trigger_ids() {
    let mut a = Harness::new();
    let mut b = Harness::new();
    script(&mut a);
    script(&mut b);
    let ids = a.trigger_ids();
    assert!(
        ids.len() >= 10,
        "the script exercises many scenarios: {ids:?}"
    );
    assert_eq!(ids, b.trigger_ids());
    let transitions = |h: &Harness| -> Vec<Value> {
        h.on("segment-transitions")
            .map(|o| o.value.clone())
            .collect()
    };
    assert_eq!(transitions(&a), transitions(&b));
}

#[test]
fn the_first_visit_of_a_day_is_reported_to_the_arbiter() {
    let t0 = at(T0);
    let mut h = Harness::new();
    h.site(
        "vi-1",
        "page_view",
        "vi",
        t0,
        json!({"page_url": "https://shop.example/"}),
    );
    h.site(
        "vi-2",
        "page_view",
        "vi",
        t0 + HOUR,
        json!({"page_url": "https://shop.example/a"}),
    );
    h.site(
        "vi-3",
        "page_view",
        "vi",
        t0 + DAY,
        json!({"page_url": "https://shop.example/b"}),
    );
    let visits: Vec<_> = h
        .outputs
        .iter()
        .filter(|o| o.topic == "customer-actions" && o.value["kind"] == "visit")
        .map(|o| o.value["occurred_at"].clone())
        .collect();
    assert_eq!(visits, [json!(t0), json!(t0 + DAY)]);
}

/// `push_site_event_line`, the replay's one-parse path for bare site events, gives
/// the same records as `push` with the topic and key the replay's router picks, and
/// declines (doing nothing) what it must not take: an invalid event, which `push`
/// then dead-letters, a receipt, an envelope, a catalog update and an order in a
/// currency without a rate; an order in another currency is converted as the profile's
/// decoding converts it.
#[test]
fn a_site_event_line_decoded_once_gives_what_push_gives() {
    let t0 = at("2026-03-02T09:00:00Z");
    let site = "kairos.events.site";
    let line = |v: Value| serde_json::to_vec(&v).expect("json");
    let view = |id: &str, who: Value, t: Millis| {
        let mut e = json!({"event_id": id, "event_type": "product_view", "occurred_at": rfc(t),
            "product": product("p-1", 40.0)});
        if let (Some(obj), Value::Object(who)) = (e.as_object_mut(), who) {
            obj.extend(who);
        }
        line(e)
    };
    let envelope_value = json!({"event_id": "e-env", "event_type": "registration",
        "occurred_at": rfc(t0 + 5 * MINUTE), "customer_id": "c-2"});
    // The line, the topic and key a router gives it, whether the one-parse path takes
    // it, and the payload a router pushes when it is not the line (an envelope's).
    type Case<'a> = (Vec<u8>, &'a str, &'a str, bool, Vec<u8>);
    let lines: Vec<Case<'_>> = vec![
        (
            view("e-1", json!({"customer_id": "c-1"}), t0),
            site,
            "c-1",
            true,
            vec![],
        ),
        (
            view("e-2", json!({"anonymous_id": "a-9"}), t0 + MINUTE),
            site,
            "anon:a-9",
            true,
            vec![],
        ),
        (
            line(
                json!({"event_id": "e-3", "event_type": "purchase", "occurred_at": rfc(t0 + 2 * MINUTE),
                "customer_id": "c-1", "order": order("o-bad", -5.0, None)}),
            ),
            site,
            "c-1",
            false,
            vec![],
        ),
        (
            line(
                json!({"event_id": "e-4", "occurred_at": rfc(t0 + 3 * MINUTE), "receipt_id": "r-4",
                "kind": "sale", "store_id": "s-1", "customer_id": "c-1", "total": 10.0,
                "items": [{"product_id": "p-2", "quantity": 1, "unit_price": 10.0}], "currency": "EUR"}),
            ),
            "kairos.events.offline",
            "c-1",
            false,
            vec![],
        ),
        (
            line(json!({"topic": "events.site", "key": "c-2", "value": envelope_value})),
            site,
            "c-2",
            false,
            line(envelope_value.clone()),
        ),
        (
            view("e-5", json!({"customer_id": "c-2"}), t0 + 6 * MINUTE),
            site,
            "c-2",
            true,
            vec![],
        ),
        (
            line(
                json!({"event_id": "e-6", "occurred_at": rfc(t0 + 7 * MINUTE), "product_id": "p-1", "price": 30.0}),
            ),
            "kairos.catalog",
            "p-1",
            false,
            vec![],
        ),
        // An order in dollars, converted as the profile's decoding converts it; one
        // in yen, without a rate, goes the usual way to be dead-lettered.
        (
            line(
                json!({"event_id": "e-7", "event_type": "purchase", "occurred_at": rfc(t0 + 8 * MINUTE),
                "customer_id": "c-3", "order": {"order_id": "o-7", "total": 10.0, "currency": "USD"}}),
            ),
            site,
            "c-3",
            true,
            vec![],
        ),
        (
            line(
                json!({"event_id": "e-8", "event_type": "purchase", "occurred_at": rfc(t0 + 9 * MINUTE),
                "customer_id": "c-3", "order": {"order_id": "o-8", "total": 10.0, "currency": "JPY"}}),
            ),
            site,
            "c-3",
            false,
            vec![],
        ),
    ];
    let text =
        format!("{CONFIG}\n[profile]\ncurrency = \"EUR\"\n[profile.exchange_rates]\nUSD = 0.5\n");
    let mut once = Harness::with(&text, ClockMode::Event);
    let mut routed = Harness::with(&text, ClockMode::Event);
    for (raw, topic, key, taken, envelope_payload) in &lines {
        let payload = if envelope_payload.is_empty() {
            raw
        } else {
            envelope_payload
        };
        let mut sink = Harness::sink(&mut once.outputs);
        let took = once
            .pipeline
            .push_site_event_line(site, raw, &mut sink)
            .expect("push line");
        assert_eq!(took, *taken, "{}", String::from_utf8_lossy(raw));
        if !took {
            once.pipeline
                .push(topic, key.as_bytes(), payload, &mut sink)
                .expect("push");
        }
        let mut sink = Harness::sink(&mut routed.outputs);
        routed
            .pipeline
            .push(topic, key.as_bytes(), payload, &mut sink)
            .expect("push");
    }
    for h in [&mut once, &mut routed] {
        h.advance(t0 + 3 * HOUR);
        h.commit();
    }
    let records = |h: &Harness| -> Vec<(String, String, Value)> {
        h.outputs
            .iter()
            .map(|o| (o.topic.clone(), o.key.clone(), o.value.clone()))
            .collect()
    };
    assert!(
        records(&once) == records(&routed),
        "{:#?}\n{:#?}",
        records(&once),
        records(&routed)
    );
    // What each line did: the views' interest and activity, the receipt's purchase,
    // the converted order's purchase and first visit, the envelope's registration,
    // and the reminders (the purchase ended c-1's).
    let actions: Vec<String> = once
        .on("customer-actions")
        .map(|a| format!("{} {}", a.value["customer_id"], a.value["kind"]))
        .collect();
    assert_eq!(actions.len(), 6, "{actions:#?}");
    assert_eq!(once.on("product-interest").count(), 3);
    assert_eq!(once.triggers("c-1", "browse_abandonment").len(), 0);
    assert_eq!(once.triggers("anon:a-9", "browse_abandonment").len(), 1);
    assert!(!once.triggers("c-2", "browse_abandonment").is_empty());
    assert_eq!(
        once.on("deadletter").count(),
        2,
        "the negative purchase and the one in yen"
    );
    let c3 = once.pipeline.profile("c-3").expect("read").expect("stored");
    assert_eq!((c3.orders, c3.revenue), (1, 5.0));
}

// Review fixes: orders undone, late purchases, activity, zones, consent, ids, bad input.

fn order_status(order_id: &str, status: &str) -> Value {
    json!({"order": {"order_id": order_id, "status": status}})
}

#[test]
fn a_cancelled_order_is_undone_and_its_review_request_never_fires() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("cx-buy", "purchase", "cx", t, order("o-cx", 80.0, None));
    // The status names no total: the profile reverses what it counted for the order.
    h.site(
        "cx-cancel",
        "order_status",
        "cx",
        t + DAY,
        order_status("o-cx", "cancelled"),
    );
    h.advance(t + 20 * DAY);
    assert!(h.triggers("cx", "post_purchase").is_empty());
}

#[test]
fn an_order_sent_again_under_a_new_event_id_counts_once() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("rs-buy-1", "purchase", "rs", t, order("o-rs", 80.0, None));
    // More events than the profile remembers ids of, then the producer's retry.
    for i in 0..40 {
        h.site(
            &format!("rs-view-{i}"),
            "page_view",
            "rs",
            t + MINUTE,
            json!({"page_url": "/"}),
        );
    }
    h.site(
        "rs-buy-2",
        "purchase",
        "rs",
        t + 2 * MINUTE,
        order("o-rs", 80.0, None),
    );
    h.advance(t + 20 * DAY);
    let purchases = h
        .on("customer-actions")
        .filter(|a| a.value["customer_id"] == "rs" && a.value["kind"] == "purchase")
        .count();
    assert_eq!(purchases, 1, "one purchase action for one order");
    let fired = h.triggers("rs", "post_purchase");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(
        fired[0]["fired_at"],
        t + 14 * DAY,
        "from the first purchase"
    );
}

#[test]
fn a_till_receipt_uploaded_late_keeps_the_cart_filled_after_the_sale() {
    let sale = at("2026-03-02T18:00:00Z");
    let mut h = Harness::new();
    h.site(
        "lr-new",
        "purchase",
        "lr",
        sale - DAY,
        order("o-lr-online", 30.0, None),
    );
    h.site(
        "lr-cart",
        "add_to_cart",
        "lr",
        sale + 10 * MINUTE,
        add_to_cart("p-1", 25.0),
    );
    // The receipt of 18:00 arrives at 18:30, after the 18:10 cart change.
    h.receipt("lr-till", "sale", "lr", sale, 40.0);
    h.advance(sale + 10 * MINUTE + HOUR);
    let fired = h.triggers("lr", "abandoned_cart");
    assert_eq!(
        fired.len(),
        1,
        "the cart added after the sale is still waiting: {fired:#?}"
    );
    assert_eq!(fired[0]["fired_at"], sale + 10 * MINUTE + HOUR);

    // An older purchase that arrives late does not take the newer order's follow-up.
    let mut h = Harness::new();
    let t = at(T0);
    h.site(
        "lp-new",
        "purchase",
        "lp",
        t + 5 * DAY,
        order("o-new", 30.0, None),
    );
    h.receipt("lp-old", "sale", "lp", t, 40.0);
    h.advance(t + 30 * DAY);
    let fired = h.triggers("lp", "post_purchase");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["order_id"], "o-new");
    assert_eq!(fired[0]["fired_at"], t + 19 * DAY);
}

#[test]
fn reactivation_waits_from_a_store_purchase_after_the_last_visit() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("rp-v1", "page_view", "rp", t, json!({"page_url": "/"}));
    h.receipt("rp-till", "sale", "rp", t + 5 * DAY, 40.0);
    h.advance(t + 35 * DAY - MINUTE);
    assert!(
        h.triggers("rp", "reactivation").is_empty(),
        "the customer bought in a store at T+5d"
    );
    h.advance(t + 35 * DAY);
    let fired = h.triggers("rp", "reactivation");
    assert_eq!(
        fired.len(),
        1,
        "30 days after the store purchase: {fired:#?}"
    );
    assert_eq!(fired[0]["fired_at"], t + 35 * DAY);

    // Back in a store after the reactivation went out, then away again: reactivated
    // again, 30 days after that purchase.
    let mut h = Harness::new();
    h.site("rb-v1", "page_view", "rb", t, json!({"page_url": "/"}));
    h.advance(t + 31 * DAY);
    assert_eq!(h.triggers("rb", "reactivation").len(), 1);
    h.receipt("rb-till", "sale", "rb", t + 35 * DAY, 40.0);
    h.advance(t + 70 * DAY);
    let fired = h.triggers("rb", "reactivation");
    assert_eq!(fired.len(), 2, "{fired:#?}");
    assert_eq!(fired[1]["fired_at"], t + 65 * DAY);

    // A customer seen only in a store is armed by the purchase.
    let mut h = Harness::new();
    h.receipt("ro-till", "sale", "ro", t, 40.0);
    h.advance(t + 31 * DAY);
    let fired = h.triggers("ro", "reactivation");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t + 30 * DAY);
}

#[test]
fn the_registration_anniversary_moves_with_a_new_time_zone() {
    // 00:30 UTC on 2 March is still 1 March in Los Angeles.
    let reg = at("2026-03-02T00:30:00Z");
    let mut h = Harness::new();
    h.site("tz-reg", "registration", "tz", reg, json!({}));
    h.site(
        "tz-zone",
        "profile_update",
        "tz",
        reg + HOUR,
        json!({"profile": {"time_zone": "America/Los_Angeles"}}),
    );
    h.advance(at("2027-03-01T19:59:00Z"));
    assert!(h.triggers("tz", "registration_anniversary").is_empty());
    h.advance(at("2027-03-01T20:00:00Z"));
    let fired = h.triggers("tz", "registration_anniversary");
    assert_eq!(fired.len(), 1, "12:00 PST on 1 March 2027: {fired:#?}");
    assert_eq!(fired[0]["fired_at"], at("2027-03-01T20:00:00Z"));
}

#[test]
fn every_stated_consent_reaches_the_arbiter_as_an_opt_in_or_an_opt_out() {
    let t = at(T0);
    let mut h = Harness::new();
    let consent = |granted: bool| json!({"consent": {"channel": "email", "granted": granted}});
    h.site("cs-1", "consent_change", "cs", t, consent(true));
    // Granted again while the profile holds it granted: an unsubscribe outcome may
    // still be on its way, so the arbiter hears it anyway.
    h.site("cs-2", "consent_change", "cs", t + HOUR, consent(true));
    h.site("cs-3", "consent_change", "cs", t + 2 * HOUR, consent(false));
    let kinds: Vec<(String, Value)> = h
        .on("customer-actions")
        .filter(|a| a.value["customer_id"] == "cs" && a.value["channel"] == "email")
        .map(|a| {
            (
                a.value["kind"].as_str().unwrap_or_default().to_string(),
                a.value["occurred_at"].clone(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("opt_in".to_string(), json!(t)),
            ("opt_in".to_string(), json!(t + HOUR)),
            ("opt_out".to_string(), json!(t + 2 * HOUR)),
        ]
    );
}

#[test]
fn a_second_unsubscribe_from_one_message_after_an_opt_in_withdraws_consent_again() {
    let t = at(T0);
    let mut h = Harness::new();
    let consent = |granted: bool| json!({"consent": {"channel": "email", "granted": granted}});
    h.site("su-1", "consent_change", "su", t, consent(true));
    // The webhook names an outcome by its send and kind: both clicks share an id.
    let unsubscribe = |h: &mut Harness, at: Millis| {
        h.outcome("su", "su-s1", "unsubscribed", at);
    };
    let email_consent = |h: &mut Harness| {
        h.commit();
        let p = h.pipeline.profile("su").expect("read").expect("stored");
        p.consents
            .get(&kairos_core::contracts::Channel::email)
            .copied()
    };
    unsubscribe(&mut h, t + HOUR);
    assert_eq!(email_consent(&mut h), Some(false));
    h.site("su-2", "consent_change", "su", t + 2 * HOUR, consent(true));
    assert_eq!(email_consent(&mut h), Some(true));
    unsubscribe(&mut h, t + 3 * HOUR);
    assert_eq!(
        email_consent(&mut h),
        Some(false),
        "the second click counts"
    );
}

/// With the wall clock, an opt-in a device dated hours ahead counts from when it was
/// read: an unsubscribe clicked after that still withdraws consent, in the profile
/// and in the action the arbiter and the delivery workers order by time.
#[test]
fn in_wall_clock_mode_an_opt_in_dated_ahead_does_not_outrank_a_later_unsubscribe() {
    let mut h = Harness::with(CONFIG, ClockMode::Wall);
    let read_at = kairos_core::time::wall_now();
    let consent = json!({"consent": {"channel": "email", "granted": true}});
    h.site("da-1", "consent_change", "da", read_at + 3 * HOUR, consent);
    let opt_in: Vec<Millis> = h
        .on("customer-actions")
        .filter(|a| a.value["customer_id"] == "da" && a.value["kind"] == "opt_in")
        .filter_map(|a| a.value["occurred_at"].as_i64())
        .collect();
    assert_eq!(opt_in.len(), 1, "{opt_in:?}");
    let stated = opt_in[0];
    assert!(
        (read_at..read_at + 3 * HOUR).contains(&stated),
        "stated at {stated}, read at {read_at}"
    );
    h.outcome("da", "da-s1", "unsubscribed", stated + MINUTE);
    h.commit();
    let p = h.pipeline.profile("da").expect("read").expect("stored");
    assert_eq!(
        p.consents.get(&kairos_core::contracts::Channel::email),
        Some(&false),
        "the unsubscribe after the opt-in was read counts"
    );
}

/// With the wall clock, a guest checkout a phone dated hours ahead counts from when it
/// was read: the registration read after it still starts the welcome series, and the
/// cart filled after it is kept (both compare with the last purchase); a registration
/// dated ahead counts from when it was read too.
#[test]
fn in_wall_clock_mode_a_purchase_dated_ahead_counts_from_when_it_was_read() {
    let mut h = Harness::with(CONFIG, ClockMode::Wall);
    let read_at = kairos_core::time::wall_now();
    h.site(
        "fa-buy",
        "purchase",
        "fa",
        read_at + 3 * HOUR,
        order("o-fa", 30.0, None),
    );
    std::thread::sleep(std::time::Duration::from_millis(5));
    let registered = kairos_core::time::wall_now();
    h.site("fa-reg", "registration", "fa", registered, json!({}));
    h.site(
        "fa-cart",
        "add_to_cart",
        "fa",
        registered,
        add_to_cart("p-fa", 12.0),
    );
    h.commit();
    let p = h.pipeline.profile("fa").expect("read").expect("stored");
    let bought = p.last_purchase_at.expect("a purchase");
    assert!(
        (read_at..registered).contains(&bought),
        "bought at {bought}, read from {read_at}, registered at {registered}"
    );
    assert_eq!(h.triggers("fa", "welcome").len(), 1, "the series starts");
    assert_eq!(p.cart.len(), 1, "the cart after the purchase is kept");
    let read_at = kairos_core::time::wall_now();
    h.site(
        "fb-reg",
        "registration",
        "fb",
        read_at + 3 * HOUR,
        json!({}),
    );
    h.commit();
    let p = h.pipeline.profile("fb").expect("read").expect("stored");
    let registered = p.registered_at.expect("registered");
    assert!(
        (read_at..read_at + HOUR).contains(&registered),
        "registered at {registered}, read at {read_at}"
    );
}

/// A provider's bounce webhook that names no address marks none of the profile's
/// (the arbiter bars the send's address, which it knows by the send id): neither the
/// old address nor, repeated after the customer changed it, the new one.
#[test]
fn a_bounce_webhook_without_an_address_marks_none_of_the_profile_s() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site(
        "rb-1",
        "registration",
        "rb",
        t,
        json!({"email": "old@example.com"}),
    );
    let bounce = |h: &mut Harness, at: Millis| {
        h.outcome("rb", "rb-s1", "bounced_hard", at);
    };
    bounce(&mut h, t + MINUTE);
    h.site(
        "rb-2",
        "profile_update",
        "rb",
        t + HOUR,
        json!({"email": "new@example.com"}),
    );
    bounce(&mut h, t + MINUTE);
    h.commit();
    let p = h.pipeline.profile("rb").expect("read").expect("stored");
    let bounced = p
        .bounced_addresses
        .get(&kairos_core::contracts::Channel::email)
        .cloned()
        .unwrap_or_default();
    assert!(bounced.is_empty(), "{bounced:?}");
    assert_eq!(p.email.as_deref(), Some("new@example.com"));
}

#[test]
fn a_transition_id_comes_from_its_cause_not_from_the_clock() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("ti-v", "page_view", "ti", t, json!({"page_url": "/"}));
    h.advance(t + 3 * HOUR);
    // A purchase made at T+1h, seen two hours later.
    h.site(
        "ti-buy",
        "purchase",
        "ti",
        t + HOUR,
        order("o-ti", 80.0, None),
    );
    let bought = h
        .transitions("ti")
        .into_iter()
        .find(|tr| tr["reason"] == "purchase")
        .expect("the purchase moved a segment");
    let to = bought["to_segment"].as_str().expect("to_segment");
    let kind = bought["kind"].as_str().expect("kind");
    let cause = (t + HOUR).to_string();
    assert_eq!(
        bought["transition_id"],
        kairos_core::ids::deterministic_id(&["ti", kind, to, &cause]),
        "{bought:#?}"
    );
}

#[test]
fn amounts_that_are_negative_or_quantities_below_one_are_dead_lettered() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("am-1", "purchase", "am", t, order("o-am1", -5.0, None));
    h.site(
        "am-2",
        "add_to_cart",
        "am",
        t,
        json!({"items": [{"product_id": "p-1", "quantity": 0, "unit_price": 5.0}]}),
    );
    h.receipt("am-3", "refund", "am", t, -20.0);
    let reasons: Vec<String> = h
        .on("deadletter")
        .map(|d| d.value["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:#?}");
    assert!(reasons[0].contains("order.total -5"), "{reasons:#?}");
    assert!(reasons[1].contains("items[0].quantity 0"), "{reasons:#?}");
    assert!(reasons[2].contains("total -20"), "{reasons:#?}");
    assert!(h.on("customer-actions").next().is_none(), "nothing applied");
}

/// Blank order, receipt and product ids are missing fields: a second order with a
/// blank id would otherwise be taken for a repeat of the first and lost.
#[test]
fn blank_order_receipt_and_product_ids_are_dead_lettered() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("bl-1", "purchase", "bl", t, order(" ", 20.0, None));
    h.site("bl-2", "add_to_cart", "bl", t, add_to_cart("", 5.0));
    h.site(
        "bl-3",
        "purchase",
        "bl",
        t,
        json!({"order": {"order_id": "o-bl3", "total": 5.0},
               "items": [{"product_id": "", "quantity": 1, "unit_price": 5.0}]}),
    );
    h.feed(
        "events.offline",
        "bl",
        json!({"event_id": "bl-4", "occurred_at": rfc(t), "receipt_id": "", "kind": "sale",
               "store_id": "s-1", "customer_id": "bl", "items": [], "total": 10.0,
               "currency": "EUR"}),
    );
    let dead: Vec<(String, String)> = h
        .on("deadletter")
        .map(|d| {
            let field = |f: &str| d.value[f].as_str().unwrap_or_default().to_string();
            (field("reason_code"), field("reason"))
        })
        .collect();
    assert_eq!(dead.len(), 4, "{dead:#?}");
    for (code, _) in &dead {
        assert_eq!(code, "missing_field", "{dead:#?}");
    }
    assert!(dead[0].1.contains("order.order_id is empty"), "{dead:#?}");
    assert!(
        dead[1].1.contains("product.product_id is empty"),
        "{dead:#?}"
    );
    assert!(
        dead[2].1.contains("items[0].product_id is empty"),
        "{dead:#?}"
    );
    assert!(dead[3].1.contains("receipt_id is empty"), "{dead:#?}");
    assert!(h.on("customer-actions").next().is_none(), "nothing applied");
}

#[test]
fn times_outside_the_calendar_and_huge_amounts_or_quantities_are_dead_lettered() {
    let t = at(T0);
    let mut h = Harness::new();
    let view = json!({"page_url": "/", "occurred_at": i64::MIN});
    h.site("ex-1", "page_view", "ex", t, view);
    let early = json!({"page_url": "/", "occurred_at": "0001-01-01T00:00:00Z"});
    h.site("ex-2", "page_view", "ex", t, early);
    h.site("ex-3", "purchase", "ex", t, order("o-ex3", 1e300, None));
    h.site(
        "ex-4",
        "add_to_cart",
        "ex",
        t,
        json!({"items": [{"product_id": "p-1", "quantity": 2_000_000, "unit_price": 5.0}]}),
    );
    h.site(
        "ex-5",
        "profile_update",
        "ex",
        t,
        json!({"profile": {"subscription_ends_at": i64::MIN}}),
    );
    h.site("ex-6", "page_view", "ex", t, json!({"occurred_at": 1e300}));
    // Epoch seconds where milliseconds are due: today read as January 1970.
    let seconds = json!({"page_url": "/", "occurred_at": t / 1000});
    h.site("ex-7", "page_view", "ex", t, seconds);
    let reasons: Vec<String> = h
        .on("deadletter")
        .map(|d| d.value["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(reasons.len(), 7, "{reasons:#?}");
    assert!(reasons[0].contains("outside 2000-01-01"), "{reasons:#?}");
    assert!(reasons[1].contains("outside 2000-01-01"), "{reasons:#?}");
    assert!(
        reasons[2].contains("order.total 1e300 is above"),
        "{reasons:#?}"
    );
    assert!(
        reasons[3].contains("items[0].quantity 2000000 is above"),
        "{reasons:#?}"
    );
    assert!(
        reasons[4].contains("profile.subscription_ends_at: timestamp"),
        "{reasons:#?}"
    );
    assert!(reasons[5].contains("outside 2000-01-01"), "{reasons:#?}");
    assert!(
        reasons[6].contains("looks like epoch seconds (2026-03-02T10:00:00.000Z)"),
        "{reasons:#?}"
    );
    assert!(h.on("customer-actions").next().is_none(), "nothing applied");
    assert!(h.on("triggers").next().is_none(), "nothing scheduled");

    // The bounds themselves are accepted.
    let last = json!({"page_url": "/", "occurred_at": "9999-12-31T23:59:59.999Z"});
    let mut h = Harness::new();
    h.site(
        "ex-7",
        "page_view",
        "ex",
        t,
        json!({"page_url": "/", "occurred_at": "2000-01-01T00:00:00Z"}),
    );
    h.site("ex-8", "page_view", "ex", t, last);
    let dead: Vec<String> = h
        .on("deadletter")
        .map(|d| d.value["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        dead.iter().all(|r| !r.contains("outside 2000")),
        "{dead:#?}"
    );
}

#[test]
fn in_wall_clock_mode_an_event_days_ahead_of_the_clock_is_dead_lettered() {
    let mut h = Harness::with(CONFIG, ClockMode::Wall);
    let now = kairos_core::time::wall_now();
    h.site(
        "fu-1",
        "page_view",
        "fu",
        now + 3 * DAY,
        json!({"page_url": "/"}),
    );
    // A device clock a few minutes fast is within the lead.
    h.site(
        "fu-2",
        "page_view",
        "fu",
        now + 5 * MINUTE,
        json!({"page_url": "/"}),
    );
    let dead: Vec<&Output> = h.on("deadletter").collect();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let reason = dead[0].value["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("ahead of this machine's clock")
            && reason.contains("clock.max_event_lead = 1day"),
        "{reason}"
    );
    assert_eq!(dead[0].value["source_offset"], 0, "{:#?}", dead[0].value);
    let visits = h
        .on("customer-actions")
        .filter(|a| a.value["kind"] == "visit")
        .count();
    assert_eq!(visits, 1, "the second event is applied");

    // Kairos' own topics carry times a raw-input processor accepted already.
    let config = CONFIG.replace("[clock]", "[identity]\nenabled = true\n\n[clock]");
    let mut h = Harness::with(&config, ClockMode::Wall);
    h.identified_site(json!({"event_id": "fu-3", "event_type": "page_view",
        "occurred_at": rfc(now + 3 * DAY), "customer_id": "fu", "page_url": "/"}));
    assert_eq!(h.on("deadletter").count(), 0);
    assert_eq!(h.on("customer-actions").count(), 1, "applied");
}

#[test]
fn in_event_time_mode_an_event_far_ahead_of_the_partitions_time_is_dead_lettered() {
    let t0 = at(T0);
    let mut h = Harness::new();
    h.site("ff-1", "page_view", "ff", t0, json!({"page_url": "/"}));
    // A device clock set to the year 2999 must not move the partition's time there.
    h.site(
        "ff-2",
        "page_view",
        "ff",
        at("2999-01-01T00:00:00Z"),
        json!({"page_url": "/"}),
    );
    h.site(
        "ff-3",
        "add_to_cart",
        "ff",
        t0 + 2 * HOUR,
        add_to_cart("p1", 10.0),
    );
    h.advance(t0 + 4 * HOUR);
    let fired = h.triggers("ff", "abandoned_cart");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t0 + 3 * HOUR);
    let dead: Vec<&Output> = h.on("deadletter").collect();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let reason = dead[0].value["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("ahead of the partition's event time")
            && reason.contains("clock.max_event_gap = 1year"),
        "{reason}"
    );
}

/// A replay does not measure event times from this machine's clock, so its result
/// does not depend on when it runs: an event dated today amid older history is refused
/// (a live service would take it, see the runtime's tests).
#[test]
fn in_event_time_mode_a_replay_refuses_an_event_dated_today_amid_older_history() {
    let config = CONFIG.replace("[clock]\n", "[clock]\nmax_event_gap = \"1day\"\n");
    let mut h = Harness::with(&config, ClockMode::Event);
    let t0 = at(T0);
    h.site("td-1", "page_view", "td", t0, json!({"page_url": "/"}));
    h.site(
        "td-2",
        "page_view",
        "td",
        kairos_core::time::wall_now(),
        json!({"page_url": "/"}),
    );
    let dead: Vec<&Output> = h.on("deadletter").collect();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let reason = dead[0].value["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("ahead of the partition's event time")
            && reason.contains("clock.max_event_gap = 1day")
            && !reason.contains("machine's clock"),
        "{reason}"
    );
}

#[test]
fn in_event_time_mode_a_partitions_first_event_far_ahead_of_the_machines_clock_is_dead_lettered() {
    let mut h = Harness::new();
    // The partition's very first event has no event time to compare with.
    h.site(
        "fa-1",
        "page_view",
        "fa",
        at("2999-01-01T00:00:00Z"),
        json!({"page_url": "/"}),
    );
    let t0 = at(T0);
    h.site("fa-2", "add_to_cart", "fa", t0, add_to_cart("p1", 10.0));
    h.advance(t0 + 2 * HOUR);
    let fired = h.triggers("fa", "abandoned_cart");
    assert_eq!(
        fired.len(),
        1,
        "the partition's time stayed in its year: {fired:#?}"
    );
    let dead: Vec<&Output> = h.on("deadletter").collect();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let reason = dead[0].value["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("ahead of this machine's clock")
            && reason.contains("clock.max_event_gap = 1year"),
        "{reason}"
    );
}

/// A harness whose profile reads `identified-events`, as behind the identity processor.
/// A merge record: `from` merged into `into` at `time`.
fn merge_record(id: &str, from: &str, into: &str, time: Millis) -> Value {
    json!({"merge_id": id, "from": from, "into": into,
        "identifier": "email:ann@example.com", "occurred_at": time})
}

/// A merge brings no field back that the survivor cleared after the merged profile
/// stated it (the number removed, the plan without an end), and takes one the merged
/// profile stated after the survivor's clearing.
#[test]
fn a_merge_brings_back_nothing_the_survivor_cleared_since() {
    let t = at("2026-05-01T08:00:00Z");
    let ends = at("2026-06-01T00:00:00Z");
    let mut h = identified_harness();
    let update = |h: &mut Harness, id: &str, customer: &str, at: Millis, profile: Value| {
        h.identified_site(json!({"event_id": id, "event_type": "profile_update",
            "occurred_at": at, "customer_id": customer, "profile": profile}));
    };
    update(
        &mut h,
        "mc-set",
        "sc",
        t,
        json!({"subscription_ends_at": ends, "phone": "+4915100000001", "first_name": "Ann"}),
    );
    update(
        &mut h,
        "mc-old",
        "anon:sc",
        t + HOUR,
        json!({"subscription_ends_at": ends + DAY, "phone": "+4915100000002",
            "last_name": "Lee"}),
    );
    update(
        &mut h,
        "mc-clear",
        "sc",
        t + DAY,
        json!({"cleared": ["subscription_ends_at", "phone", "first_name"]}),
    );
    // Stated by the merged profile after the survivor's clearing: it counts.
    update(
        &mut h,
        "mc-new",
        "anon:sc",
        t + 2 * DAY,
        json!({"first_name": "Anna"}),
    );
    h.merge("m-sc", "anon:sc", "sc", t + 3 * DAY);
    h.advance(ends + 2 * DAY);
    assert!(h.triggers("sc", "subscription_ending").is_empty());
    let p = h.pipeline.profile("sc").expect("read").expect("stored");
    assert_eq!((p.subscription_ends_at, p.phone.as_deref()), (None, None));
    assert_eq!(p.first_name.as_deref(), Some("Anna"));
    assert_eq!(
        p.last_name.as_deref(),
        Some("Lee"),
        "never stated by the survivor"
    );
    // The survivor keeps its own number; its clearing, dated before the merged
    // profile's number and read after the merge, still applies to it.
    update(
        &mut h,
        "md-set",
        "sd",
        t,
        json!({"phone": "+4915100000003"}),
    );
    update(
        &mut h,
        "md-other",
        "anon:sd",
        t + 2 * HOUR,
        json!({"phone": "+4915100000004"}),
    );
    h.merge("m-sd", "anon:sd", "sd", t + 3 * HOUR);
    let p = h.pipeline.profile("sd").expect("read").expect("stored");
    assert_eq!(p.phone.as_deref(), Some("+4915100000003"));
    update(
        &mut h,
        "md-clear",
        "sd",
        t + HOUR,
        json!({"cleared": ["phone"]}),
    );
    h.advance(t + 4 * HOUR);
    let p = h.pipeline.profile("sd").expect("read").expect("stored");
    assert_eq!(p.phone, None);
}

/// A merge that brings a zone whose greeting moment is already past today (Tokyo's
/// 10:00, read at 05:00Z) still greets today, late within the tolerance, as a zone
/// change in an event does; not next year.
#[test]
fn a_merge_that_puts_the_birthday_moment_behind_still_greets_today() {
    let t = at("2026-03-01T12:00:00Z");
    let mut h = identified_harness();
    h.identified_site(json!({"event_id": "mb-1", "event_type": "profile_update",
        "occurred_at": t, "customer_id": "mb", "profile": {"birthday": "1990-03-10"}}));
    h.identified_site(json!({"event_id": "mb-2", "event_type": "profile_update",
        "occurred_at": t, "customer_id": "anon:mb", "profile": {"time_zone": "Asia/Tokyo"}}));
    let merged = at("2026-03-10T05:00:00Z");
    h.advance(merged - MINUTE);
    assert!(
        h.triggers("mb", "birthday").is_empty(),
        "10:00 UTC is still ahead"
    );
    h.merge("m-mb", "anon:mb", "mb", merged);
    h.advance(at("2026-03-11T12:00:00Z"));
    let fired = h.triggers("mb", "birthday");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["contacts"]["time_zone"], "Asia/Tokyo");
}

/// A merge on the birthday after the merged profile was greeted does not greet the
/// person again under the survivor's id, nor does a zone change later that day; next
/// year the survivor is greeted.
#[test]
fn a_merge_after_the_birthday_greeting_does_not_greet_the_person_again() {
    let t = at("2026-03-01T12:00:00Z");
    let mut h = identified_harness();
    h.identified_site(json!({"event_id": "gb-1", "event_type": "profile_update",
        "occurred_at": t, "customer_id": "gb2",
        "consent": {"channel": "email", "granted": true},
        "profile": {"birthday": "1990-03-10", "time_zone": "Europe/Berlin"}}));
    h.identified_site(json!({"event_id": "gb-2", "event_type": "profile_update",
        "occurred_at": t, "customer_id": "gb", "profile": {"first_name": "Gabi"}}));
    let merged = at("2026-03-10T10:00:00Z");
    h.advance(merged - MINUTE);
    assert_eq!(h.triggers("gb2", "birthday").len(), 1, "10:00 in Berlin");
    h.merge("m-gb", "gb2", "gb", merged);
    // London's 10:00 is behind at 11:00Z, within the tolerance.
    h.identified_site(json!({"event_id": "gb-3", "event_type": "profile_update",
        "occurred_at": merged + HOUR, "customer_id": "gb",
        "profile": {"time_zone": "Europe/London"}}));
    h.advance(at("2026-03-11T12:00:00Z"));
    let today = h.triggers("gb", "birthday");
    assert!(today.is_empty(), "greeted as gb2 today: {today:#?}");
    h.advance(at("2027-03-11T12:00:00Z"));
    let fired = h.triggers("gb", "birthday");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], at("2027-03-10T10:00:00Z"));
}

/// The same when the survivor has the same birthday in its own zone: its own greeting,
/// due after the merged profile's, is not sent. Unless the merged profile's greeting
/// could not reach the person (no consented channel): then the survivor's goes out.
#[test]
fn a_merge_after_the_birthday_greeting_silences_the_survivor_s_own_that_day() {
    for reachable in [true, false] {
        let t = at("2026-03-01T12:00:00Z");
        let mut h = identified_harness();
        for (id, customer, zone) in [
            ("gs-1", "gs2", "Europe/Berlin"),
            ("gs-2", "gs", "Europe/London"),
        ] {
            h.identified_site(json!({"event_id": id, "event_type": "profile_update",
                "occurred_at": t, "customer_id": customer,
                "consent": {"channel": "email", "granted": reachable || customer == "gs"},
                "profile": {"birthday": "1990-03-10", "time_zone": zone}}));
        }
        h.advance(at("2026-03-10T09:30:00Z"));
        assert_eq!(h.triggers("gs2", "birthday").len(), 1, "10:00 in Berlin");
        h.merge("m-gs", "gs2", "gs", at("2026-03-10T09:30:00Z"));
        h.advance(at("2026-03-11T12:00:00Z"));
        let today = h.triggers("gs", "birthday");
        let skipped = metric(&h, "kairos_triggers_skipped_total", &["greeted_this_year"]);
        if reachable {
            assert!(today.is_empty(), "greeted as gs2 today: {today:#?}");
            assert_eq!(skipped, 1.0);
        } else {
            assert_eq!(today.len(), 1, "gs2's greeting reached no one: {today:#?}");
            assert_eq!(skipped, 0.0);
        }
        h.advance(at("2027-03-11T12:00:00Z"));
        let fired = h.triggers("gs", "birthday");
        assert_eq!(fired.len(), if reachable { 1 } else { 2 }, "{fired:#?}");
        assert_eq!(
            fired.last().expect("next year")["fired_at"],
            at("2027-03-10T10:00:00Z")
        );
    }
}

/// A survivor that keeps its own, other birthday is greeted on it: the merged
/// profile's greeting was for another date.
#[test]
fn a_merge_after_a_greeting_on_another_date_leaves_the_survivor_s_birthday_alone() {
    let t = at("2026-03-01T12:00:00Z");
    let mut h = identified_harness();
    for (id, customer, birthday) in [("gd-1", "gd2", "1990-03-10"), ("gd-2", "gd", "1990-03-20")] {
        h.identified_site(json!({"event_id": id, "event_type": "profile_update",
            "occurred_at": t, "customer_id": customer,
            "consent": {"channel": "email", "granted": true},
            "profile": {"birthday": birthday, "time_zone": "Europe/Berlin"}}));
    }
    h.advance(at("2026-03-10T09:30:00Z"));
    assert_eq!(h.triggers("gd2", "birthday").len(), 1);
    h.merge("m-gd", "gd2", "gd", at("2026-03-10T09:30:00Z"));
    h.advance(at("2026-03-21T12:00:00Z"));
    let fired = h.triggers("gd", "birthday");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], at("2026-03-20T09:00:00Z"));
}

fn identified_harness() -> Harness {
    identified_harness_with("")
}

/// The identity processor in front of the profile, with more `[identity]` settings.
fn identified_harness_with(identity: &str) -> Harness {
    let config = CONFIG.replace(
        "[clock]",
        &format!("[identity]\nenabled = true\n{identity}\n[clock]"),
    );
    Harness::with(&config, ClockMode::Event)
}

impl Harness {
    /// A site event as the identity processor forwards it, keyed by its customer.
    fn identified_site(&mut self, event: Value) {
        let customer = event["customer_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.feed(
            "identified-events",
            &customer,
            json!({"kind": "site", "record": event}),
        );
    }

    /// A delivery worker's outcome `kind` of e-mail `send` to `customer`, with the id
    /// the webhook gives it (send and kind).
    fn outcome(&mut self, customer: &str, send: &str, kind: &str, at: Millis) {
        self.feed(
            "outcomes",
            customer,
            json!({"outcome_id": format!("{send}-{kind}"), "send_id": send,
                "customer_id": customer, "scenario": "welcome", "channel": "email",
                "category": "trigger", "kind": kind, "reason": null, "occurred_at": at}),
        );
    }

    /// The identity processor's notice to the survivor that `merge` is under way.
    fn merge_expected(&mut self, merge: &Value) {
        let into = merge["into"].as_str().unwrap_or_default().to_string();
        self.feed(
            "identified-events",
            &into,
            json!({"kind": "merge_expected", "record": merge}),
        );
    }

    /// The merge record, keyed by the merged customer (its profile then leaves).
    fn merge_out(&mut self, merge: &Value) {
        let from = merge["from"].as_str().unwrap_or_default().to_string();
        self.feed(
            "identified-events",
            &from,
            json!({"kind": "merge", "record": merge}),
        );
    }

    /// `from` merged into `into` at `time`: the merge record, then the merged profile
    /// the profile sends itself for the survivor.
    fn merge(&mut self, merge_id: &str, from: &str, into: &str, time: Millis) {
        self.merge_out(&merge_record(merge_id, from, into, time));
        let (key, value) = self
            .on("identified-events")
            .find(|r| {
                r.value["kind"] == "merge_in" && r.value["record"]["merge"]["merge_id"] == merge_id
            })
            .map(|r| (r.key.clone(), r.value.clone()))
            .expect("the merged profile is sent to the survivor");
        assert_eq!(key, into);
        self.feed("identified-events", &key, value);
    }
}

/// An e-mail moved from a customer (to the customer who presented it) is no longer
/// that customer's address; one merged away since hands the move to its survivor,
/// which holds the address now.
#[test]
fn an_identifier_moved_from_a_customer_merged_away_is_released_by_the_survivor() {
    let t = at(T0);
    let mut h = identified_harness();
    h.identified_site(json!({"event_id": "im-1", "event_type": "profile_update",
        "occurred_at": rfc(t), "customer_id": "c-h",
        "profile": {"email": "wife@example.com", "phone": "+4915100000001"}}));
    h.identified_site(json!({"event_id": "im-2", "event_type": "page_view",
        "occurred_at": rfc(t), "customer_id": "c-s", "page_url": "/"}));
    h.merge("im-m", "c-h", "c-s", t + HOUR);
    let survivor = |h: &Harness| h.pipeline.profile("c-s").expect("read").expect("c-s");
    assert_eq!(survivor(&h).email.as_deref(), Some("wife@example.com"));
    let moved = |id: &str, identifier: &str| {
        json!({"kind": "identifier_moved", "record": {"move_id": id, "from": "c-h",
            "to": "c-w", "identifier": identifier, "occurred_at": t + 2 * HOUR}})
    };
    h.feed(
        "identified-events",
        "c-h",
        moved("im-mv", "email:wife@example.com"),
    );
    let forwarded = h
        .on("identified-events")
        .find(|r| r.value["kind"] == "identifier_moved" && r.key == "c-s")
        .map(|r| r.value.clone())
        .expect("the move is sent on to the survivor");
    assert_eq!(forwarded["record"]["from"], "c-s");
    h.feed("identified-events", "c-s", forwarded);
    let s = survivor(&h);
    assert_eq!(s.email, None);
    assert_eq!(
        s.phone.as_deref(),
        Some("+4915100000001"),
        "not the moved identifier"
    );
}

/// A merge tells the arbiter the person's contacts: its note of the survivor's is of
/// before the merge, and a message handed over or waiting there goes to the merged
/// guest's phone too.
#[test]
fn a_merge_tells_the_arbiter_the_person_s_contacts() {
    let t = at(T0);
    let mut h = identified_harness();
    h.identified_site(json!({"event_id": "mc-1", "event_type": "profile_update",
        "occurred_at": rfc(t), "customer_id": "c-s",
        "profile": {"email": "s@example.com"}}));
    h.identified_site(json!({"event_id": "mc-2", "event_type": "profile_update",
        "occurred_at": rfc(t), "customer_id": "email:guest@example.com",
        "profile": {"phone": "+4915100000007"}}));
    h.merge("mc-m", "email:guest@example.com", "c-s", t + HOUR);
    let told = h
        .on("customer-actions")
        .filter(|r| r.key == "c-s" && r.value["kind"] == "contacts_changed")
        .last()
        .map(|r| r.value["contacts"].clone())
        .expect("the survivor's contacts told");
    assert_eq!(told["email"], "s@example.com", "{told}");
    assert_eq!(told["phone"], "+4915100000007", "{told}");
}

/// The move of an e-mail can come before the merge that brings it (the tablet's
/// anonymous profile, stitched to the husband, carries the wife's e-mail; the merged
/// profile travels from another partition): the merge does not bring it back.
#[test]
fn an_address_moved_before_the_merge_that_brings_it_stays_out() {
    let t = at(T0);
    let mut h = identified_harness();
    h.identified_site(json!({"event_id": "ib-1", "event_type": "page_view",
        "occurred_at": rfc(t), "customer_id": "c-h", "page_url": "/"}));
    h.identified_site(json!({"event_id": "ib-2", "event_type": "profile_update",
        "occurred_at": rfc(t), "customer_id": "anon:tablet",
        "profile": {"email": "wife2@example.com"}}));
    h.merge_expected(&merge_record("ib-m", "anon:tablet", "c-h", t + HOUR));
    h.feed(
        "identified-events",
        "c-h",
        json!({"kind": "identifier_moved", "record": {"move_id": "ib-mv", "from": "c-h",
            "to": "c-w", "identifier": "email:wife2@example.com",
            "occurred_at": t + 2 * HOUR}}),
    );
    h.merge("ib-m", "anon:tablet", "c-h", t + HOUR);
    let p = h.pipeline.profile("c-h").expect("read").expect("c-h");
    assert_eq!(p.merged_from, ["anon:tablet"]);
    assert_eq!(p.email, None);
}

/// Y merged into X, then X into Z: Z's triggers name Y too. The arbiter may get Y's
/// ledger after X's (they come from different partitions), and must wait for it
/// before it decides for Z.
#[test]
fn a_merge_of_a_merge_names_both_merged_customers_in_the_survivor_s_triggers() {
    let t = at(T0);
    let mut h = identified_harness();
    for c in ["c-y", "c-x", "c-z"] {
        h.identified_site(
            json!({"event_id": format!("mm-{c}"), "event_type": "page_view",
            "occurred_at": rfc(t), "customer_id": c, "page_url": "/"}),
        );
    }
    h.merge("mm-yx", "c-y", "c-x", t + HOUR);
    h.merge("mm-xz", "c-x", "c-z", t + 2 * HOUR);
    let z = h.pipeline.profile("c-z").expect("read").expect("Z");
    assert_eq!(z.merged_from, ["c-y", "c-x"]);
    h.identified_site(json!({"event_id": "mm-cart", "event_type": "add_to_cart",
        "occurred_at": rfc(t + 3 * HOUR), "customer_id": "c-z",
        "product": {"product_id": "p1", "name": "Shoe", "price": 50.0}}));
    h.advance(t + 6 * HOUR);
    let fired = h.triggers("c-z", "abandoned_cart");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["merged_from"], json!(["c-y", "c-x"]));
}

/// A cart reminder chain under way goes on for the survivor of a merge from the step
/// it was at: the reminder sent to the guest is not sent again.
#[test]
fn a_merge_continues_a_cart_reminder_chain_from_its_next_step() {
    let config = CONFIG
        .replace("[clock]", "[identity]\nenabled = true\n[clock]")
        .replace(
            "valid_for = \"12h\"",
            "valid_for = \"12h\"\nsteps = [{ delay = \"1d\", template = \"abandoned_cart_2\" }]",
        );
    let mut h = Harness::with(&config, ClockMode::Event);
    let t = at(T0);
    h.identified_site(json!({"event_id": "mc-add", "event_type": "add_to_cart",
        "occurred_at": rfc(t), "customer_id": "anon:mc", "product": product("p1", 20.0)}));
    h.advance(t + HOUR);
    let first = h.triggers("anon:mc", "abandoned_cart");
    assert_eq!(first.len(), 1, "{first:#?}");
    assert_eq!(first[0]["step"], 0);
    h.merge("m-mc", "anon:mc", "c-mc", t + 2 * HOUR);
    h.advance(t + HOUR + DAY + MINUTE);
    let fired = h.triggers("c-mc", "abandoned_cart");
    let steps: Vec<&Value> = fired.iter().map(|f| &f["step"]).collect();
    assert_eq!(steps, [&json!(1)], "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t + HOUR + DAY);
}

/// A merge announced whose merged profile never comes (its record dead-lettered):
/// the survivor holds its triggers an hour, then lets them go.
#[test]
fn a_merged_profile_that_never_comes_holds_the_survivor_s_triggers_an_hour_only() {
    let mut h = identified_harness();
    let t = at(T0);
    h.identified_site(json!({"event_id": "ml-add", "event_type": "add_to_cart",
        "occurred_at": rfc(t), "customer_id": "c-1", "product": product("p1", 10.0)}));
    let merge = json!({"merge_id": "m-lost", "from": "c-lost", "into": "c-1",
        "identifier": "email:ann@example.com", "occurred_at": t + 10 * MINUTE});
    h.merge_expected(&merge);
    // The reminder is due at t + 1 h, inside the wait (until t + 1 h 10 min).
    h.advance(t + 65 * MINUTE);
    assert!(
        h.triggers("c-1", "abandoned_cart").is_empty(),
        "held while the merge may still come"
    );
    h.advance(t + 3 * HOUR);
    let fired = h.triggers("c-1", "abandoned_cart");
    assert_eq!(fired.len(), 1, "{fired:#?}");
}

/// Two customers on one partition whose ids are `acme` and `acme/` and more keep
/// their held triggers and return marks apart: `acme`'s merge releases, carries and
/// takes none of the other's (whose cart reminder would go out with `acme`'s
/// contacts, and whose returned order would get its review request).
#[test]
fn a_customer_s_held_triggers_and_return_marks_are_not_those_of_a_longer_id() {
    let mut h = identified_harness();
    let t = at(T0);
    let partition = |id: &str| kairos_core::replay::partition_for(id.as_bytes(), 2);
    let jane = (0..)
        .map(|n| format!("acme/jane{n}"))
        .find(|id| partition(id) == partition("acme"))
        .expect("an id on acme's partition");
    let site = |h: &mut Harness, id: &str, kind: &str, customer: &str, at: Millis, extra: Value| {
        let mut e = json!({"event_id": id, "event_type": kind, "occurred_at": rfc(at),
            "customer_id": customer});
        if let (Some(obj), Value::Object(more)) = (e.as_object_mut(), extra) {
            obj.extend(more);
        }
        h.identified_site(e);
    };
    // Jane's order came back before its purchase was read: marked returned.
    site(
        &mut h,
        "j-ret",
        "order_status",
        &jane,
        t,
        order("o-1", 80.0, Some("returned")),
    );
    site(
        &mut h,
        "j-buy",
        "purchase",
        &jane,
        t - DAY,
        order("o-1", 80.0, None),
    );
    // Jane's cart reminder is held while a merge into her is under way.
    site(
        &mut h,
        "j-add",
        "add_to_cart",
        &jane,
        t,
        json!({"product": product("p1", 10.0)}),
    );
    h.merge_expected(&json!({"merge_id": "m-j", "from": "c-lost", "into": jane,
        "identifier": "email:jane@example.com", "occurred_at": t + 10 * MINUTE}));
    h.advance(t + 65 * MINUTE);
    assert!(h.triggers(&jane, "abandoned_cart").is_empty(), "held");
    // `acme` merges into another customer, and another customer into `acme`.
    site(
        &mut h,
        "a-view",
        "page_view",
        "acme",
        t,
        json!({"page_url": "/"}),
    );
    site(
        &mut h,
        "z-view",
        "page_view",
        "c-z",
        t,
        json!({"page_url": "/"}),
    );
    h.merge("m-a", "acme", "c-z", t + 66 * MINUTE);
    site(
        &mut h,
        "a2-view",
        "page_view",
        "acme",
        t + 67 * MINUTE,
        json!({"page_url": "/"}),
    );
    h.merge_expected(&merge_record("m-y", "c-y", "acme", t + 68 * MINUTE));
    site(
        &mut h,
        "y-view",
        "page_view",
        "c-y",
        t,
        json!({"page_url": "/"}),
    );
    h.merge("m-y", "c-y", "acme", t + 68 * MINUTE);
    h.advance(t + 69 * MINUTE);
    let reminders: Vec<Value> = h
        .on("triggers")
        .filter(|o| o.value["scenario"] == "abandoned_cart")
        .map(|o| o.value.clone())
        .collect();
    assert!(reminders.is_empty(), "still held for jane: {reminders:#?}");
    // Jane's return mark stayed hers (not carried to `c-z` with `acme`'s).
    h.commit();
    let marks: Vec<String> = ["rt/", "ret/"]
        .iter()
        .flat_map(|prefix| h.pipeline.profile_state_keys(prefix).expect("keys"))
        .collect();
    assert_eq!(marks, [format!("rt/{jane}\0o-1")]);
    // Her wait ends (the merged profile never came): her reminder, to her.
    h.advance(t + 3 * HOUR);
    let fired = h.triggers(&jane, "abandoned_cart");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    // And no review request for her returned order.
    h.advance(t + 20 * DAY);
    let reviews: Vec<Value> = h
        .on("triggers")
        .filter(|o| o.value["scenario"] == "post_purchase")
        .map(|o| o.value.clone())
        .collect();
    assert!(reviews.is_empty(), "{reviews:#?}");
}

/// X waits for Y's profile and joins Z meanwhile: Z waits for Y in X's place, an hour
/// from then, not for good.
#[test]
fn a_wait_for_a_merged_profile_the_survivor_inherits_is_bounded_too() {
    let mut h = identified_harness();
    let t = at(T0);
    h.identified_site(json!({"event_id": "iw-vx", "event_type": "page_view",
        "occurred_at": rfc(t), "customer_id": "c-x", "page_url": "/"}));
    h.identified_site(json!({"event_id": "iw-add", "event_type": "add_to_cart",
        "occurred_at": rfc(t + 5 * MINUTE), "customer_id": "c-z", "product": product("p1", 10.0)}));
    let yx = merge_record("m-yx", "c-y", "c-x", t);
    let xz = merge_record("m-xz", "c-x", "c-z", t + 10 * MINUTE);
    h.merge_expected(&yx);
    h.merge_expected(&xz);
    h.merge_out(&xz);
    let z = h.pipeline.profile("c-z").expect("read").expect("Z");
    assert_eq!(z.awaiting_merges, ["c-y"]);
    // Z's reminder is due at t + 1 h 5 min; Z waits for Y until t + 1 h 10 min.
    h.advance(t + 67 * MINUTE);
    assert!(h.triggers("c-z", "abandoned_cart").is_empty(), "held");
    h.advance(t + 2 * HOUR);
    assert_eq!(h.triggers("c-z", "abandoned_cart").len(), 1);
    let z = h.pipeline.profile("c-z").expect("read").expect("Z");
    assert!(z.awaiting_merges.is_empty(), "{:?}", z.awaiting_merges);
}

#[test]
fn a_merge_arms_the_birthday_the_merged_profile_brought() {
    let mut h = identified_harness();
    let t = at(T0);
    h.identified_site(json!({"event_id": "mg-1", "event_type": "profile_update",
        "occurred_at": rfc(t), "customer_id": "c-2",
        "profile": {"birthday": "1990-03-10", "time_zone": "UTC"}}));
    h.identified_site(json!({"event_id": "mg-2", "event_type": "page_view",
        "occurred_at": rfc(t + HOUR), "customer_id": "c-1", "page_url": "/"}));
    h.merge("m-1", "c-2", "c-1", t + 2 * HOUR);
    h.advance(at("2026-03-10T10:00:00Z"));
    let fired = h.triggers("c-1", "birthday");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], at("2026-03-10T10:00:00Z"));
    assert!(h.triggers("c-2", "birthday").is_empty());
}

#[test]
fn a_price_drop_reaches_an_anonymous_viewer_who_logged_in() {
    let mut h = identified_harness();
    let t = at(T0);
    h.catalog(
        "pd-cat-1",
        "p1",
        t,
        json!({"name": "Kettle", "price": 100.0, "in_stock": true}),
    );
    h.identified_site(json!({"event_id": "pd-view", "event_type": "product_view",
        "occurred_at": rfc(t + HOUR), "customer_id": "anon:a-7", "product": product("p1", 100.0)}));
    h.identified_site(json!({"event_id": "pd-wish", "event_type": "wishlist_add",
        "occurred_at": rfc(t + HOUR), "customer_id": "anon:a-7", "product": product("p2", 50.0)}));
    h.merge("m-pd", "anon:a-7", "c-7", t + 2 * HOUR);
    h.catalog("pd-cat-2", "p1", t + 3 * HOUR, json!({"price": 80.0}));
    let fired = h.triggers("c-7", "price_drop");
    assert_eq!(fired.len(), 1, "the view came with the merge: {fired:#?}");
    assert_eq!(vars(&fired[0])["new_price"], 80.0);
    h.catalog(
        "pd-cat-3",
        "p2",
        t + 4 * HOUR,
        json!({"name": "Mug", "in_stock": false}),
    );
    h.catalog("pd-cat-4", "p2", t + 5 * HOUR, json!({"in_stock": true}));
    let back = h.triggers("c-7", "back_in_stock");
    assert_eq!(back.len(), 1, "the wish came with the merge: {back:#?}");
}

/// The join indexes a view under the id it came with. When the profile under that id
/// was merged away, and the view was not among the twenty handed over, its occasion
/// goes on to the survivor, under the id the survivor's own would have: a survivor
/// who viewed the product too hears of the drop once.
#[test]
fn a_price_drop_for_a_merged_away_viewer_reaches_the_survivor_once() {
    let mut h = identified_harness();
    let t = at(T0);
    h.catalog(
        "mo-cat",
        "p1",
        t,
        json!({"name": "Kettle", "price": 100.0, "in_stock": true}),
    );
    for (anon, survivor) in [("anon:mo-1", "c-mo-1"), ("anon:mo-2", "c-mo-2")] {
        h.identified_site(
            json!({"event_id": format!("{anon}-view"), "event_type": "product_view",
            "occurred_at": rfc(t + HOUR), "customer_id": anon, "product": product("p1", 100.0)}),
        );
        for i in 0..20 {
            h.identified_site(json!({"event_id": format!("{anon}-view-{i}"),
                "event_type": "product_view", "occurred_at": rfc(t + HOUR + (i + 1) * MINUTE),
                "customer_id": anon, "product": product(&format!("q{i}"), 10.0)}));
        }
        h.identified_site(
            json!({"event_id": format!("{survivor}-login"), "event_type": "page_view",
            "occurred_at": rfc(t + HOUR), "customer_id": survivor}),
        );
    }
    // The second survivor viewed the product under its own id as well.
    h.identified_site(
        json!({"event_id": "c-mo-2-view", "event_type": "product_view",
        "occurred_at": rfc(t + HOUR), "customer_id": "c-mo-2", "product": product("p1", 100.0)}),
    );
    h.merge("m-mo-1", "anon:mo-1", "c-mo-1", t + 2 * HOUR);
    h.merge("m-mo-2", "anon:mo-2", "c-mo-2", t + 2 * HOUR);
    h.catalog("mo-drop", "p1", t + 3 * HOUR, json!({"price": 80.0}));
    h.commit();
    for survivor in ["c-mo-1", "c-mo-2"] {
        let fired = h.triggers(survivor, "price_drop");
        assert_eq!(fired.len(), 1, "{survivor}: {fired:#?}");
        assert_eq!(vars(&fired[0])["old_price"], 100.0);
        assert_eq!(vars(&fired[0])["new_price"], 80.0);
    }
    let forwarded = h
        .on("product-occasions")
        .filter(|o| o.value["customer_id"] == "c-mo-1")
        .count();
    assert_eq!(forwarded, 1, "sent on from the merged id");
}

/// One person on two devices: the wish made on one id and taken off later on the
/// other is off once the ids are joined, in the profile and in the join's index.
#[test]
fn a_wish_taken_off_under_the_merged_id_is_off_for_the_survivor() {
    let mut h = identified_harness();
    let t = at(T0);
    h.catalog("mw-cat", "p2", t, json!({"price": 30.0, "in_stock": false}));
    h.identified_site(json!({"event_id": "mw-wish", "event_type": "wishlist_add",
        "occurred_at": rfc(t + HOUR), "customer_id": "c-mw", "product": product("p2", 30.0)}));
    h.identified_site(json!({"event_id": "mw-unwish", "event_type": "wishlist_remove",
        "occurred_at": rfc(t + 2 * HOUR), "customer_id": "anon:mw", "product": product("p2", 30.0)}));
    h.merge("m-mw", "anon:mw", "c-mw", t + 3 * HOUR);
    let profile = h.pipeline.profile("c-mw").expect("read").expect("stored");
    assert!(profile.wishlist.is_empty(), "{:?}", profile.wishlist);
    h.catalog("mw-back", "p2", t + 4 * HOUR, json!({"in_stock": true}));
    assert!(
        h.on("product-occasions").next().is_none(),
        "the join dropped the wish"
    );
    assert!(h.triggers("c-mw", "back_in_stock").is_empty());
}

// Review fixes: event time over arrival order, price seen, chains, merges, dedupe.

#[test]
fn a_product_viewed_every_ten_days_stays_in_the_price_drop_audience() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog(
        "vr-cat-1",
        "p1",
        t - HOUR,
        json!({"name": "Kettle", "price": 100.0}),
    );
    for day in [0, 10, 20, 29] {
        h.site(
            &format!("vr-view-{day}"),
            "product_view",
            "vr",
            t + day * DAY,
            json!({"product": product("p1", 100.0)}),
        );
    }
    // The view of day 0 left the 30-day audience; the one reported on day 20 did not.
    h.catalog("vr-cat-2", "p1", t + 35 * DAY, json!({"price": 70.0}));
    let fired = h.triggers("vr", "price_drop");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["new_price"], 70.0);
}

/// A customer who kept viewing a product stays in its audience for 30 days after the
/// last view, not after the first one the join heard of: each day's first view is
/// reported, the views of one day once.
#[test]
fn a_product_viewed_day_after_day_stays_in_the_audience_after_the_last_view() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("vd-cat-1", "p1", t - HOUR, json!({"price": 100.0}));
    for (n, minutes) in [0, 5, 14 * 24 * 60].into_iter().enumerate() {
        h.site(
            &format!("vd-view-{n}"),
            "product_view",
            "vd",
            t + minutes * MINUTE,
            json!({"product": product("p1", 100.0)}),
        );
    }
    assert_eq!(h.on("product-interest").count(), 2, "one report per day");
    // 40 days after the first view, 26 after the last.
    h.catalog("vd-cat-2", "p1", t + 40 * DAY, json!({"price": 70.0}));
    let fired = h.triggers("vd", "price_drop");
    assert_eq!(fired.len(), 1, "{fired:#?}");
}

/// `kairos_triggers_skipped_total` of `scenario` for `reason`.
fn skipped(h: &Harness, scenario: &str, reason: &str) -> f64 {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&h.pipeline.profile_metrics().gather())
        .expect("metrics encode");
    let scenario = format!("scenario=\"{scenario}\"");
    let reason = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.starts_with("kairos_triggers_skipped_total{"))
        .filter(|l| l.contains(&scenario) && l.contains(&reason))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_price_drop_processed_days_after_the_update_is_late() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("lt-cat-1", "p5", t, json!({"price": 100.0}));
    h.site(
        "lt-view",
        "product_view",
        "lt",
        t + HOUR,
        json!({"product": product("p5", 100.0)}),
    );
    // The update of day 7 is processed on day 10 (an outage): three days late.
    h.advance(t + 10 * DAY);
    h.catalog("lt-cat-2", "p5", t + 7 * DAY, json!({"price": 70.0}));
    h.commit();
    assert!(h.triggers("lt", "price_drop").is_empty());
    assert_eq!(skipped(&h, "price_drop", "late"), 1.0);
    // Two hours late is within the tolerance; valid until a day after the update.
    h.catalog("lt-cat-3", "p5", t + 10 * DAY, json!({"price": 100.0}));
    h.advance(t + 12 * DAY);
    h.catalog(
        "lt-cat-4",
        "p5",
        t + 12 * DAY - 2 * HOUR,
        json!({"price": 60.0}),
    );
    let fired = h.triggers("lt", "price_drop");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t + 12 * DAY);
    assert_eq!(fired[0]["valid_until"], t + 12 * DAY - 2 * HOUR + DAY);
}

/// The audience window runs 30 days from the last view: the join keeps a day's first
/// view, so it takes the window's first day whole, and the profile, which knows the
/// last view, tells who viewed within it and skips who did not.
#[test]
fn the_audience_window_runs_from_the_last_view_of_a_day() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("fd-0", "p9", t - HOUR, json!({"price": 100.0}));
    for (customer, views) in [("fd", vec![t, t + 10 * HOUR]), ("fo", vec![t])] {
        for (i, seen) in views.into_iter().enumerate() {
            h.site(
                &format!("{customer}-view-{i}"),
                "product_view",
                customer,
                seen,
                json!({"product": product("p9", 100.0)}),
            );
        }
    }
    // 30 days and 2 hours after the first views, 29 days and 16 hours after fd's last.
    h.catalog(
        "fd-3",
        "p9",
        t + 30 * DAY + 2 * HOUR,
        json!({"price": 70.0}),
    );
    h.advance(t + 30 * DAY + 3 * HOUR);
    assert_eq!(h.triggers("fd", "price_drop").len(), 1);
    assert!(h.triggers("fo", "price_drop").is_empty());
    assert_eq!(skipped(&h, "price_drop", "viewed_long_ago"), 1.0);
}

#[test]
fn a_drop_to_more_than_the_customer_saw_is_no_price_drop() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("ps-cat-1", "p6", t, json!({"price": 100.0}));
    h.site(
        "ps-view",
        "product_view",
        "ps",
        t + HOUR,
        json!({"product": product("p6", 100.0)}),
    );
    h.catalog("ps-cat-2", "p6", t + 2 * HOUR, json!({"price": 120.0}));
    // 12.5% below the last price, 5% above what the customer saw.
    h.catalog("ps-cat-3", "p6", t + 3 * HOUR, json!({"price": 105.0}));
    h.advance(t + 4 * HOUR);
    let fired = h.triggers("ps", "price_drop");
    assert!(fired.is_empty(), "{fired:#?}");
    // Counted, so the silence can be explained.
    assert_eq!(skipped(&h, "price_drop", "below_min_drop"), 1.0);
}

#[test]
fn small_steps_down_add_up_to_one_announced_drop() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("ss-cat-0", "p7", t, json!({"price": 100.0}));
    h.site(
        "ss-view",
        "product_view",
        "ss",
        t + HOUR,
        json!({"product": product("p7", 100.0)}),
    );
    for (i, price) in [95.0, 90.0, 85.0].into_iter().enumerate() {
        let i = i as Millis;
        h.catalog(
            &format!("ss-cat-{}", i + 1),
            "p7",
            t + (2 + i) * HOUR,
            json!({"price": price}),
        );
    }
    h.advance(t + 6 * HOUR);
    let fired = h.triggers("ss", "price_drop");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    let v = vars(&fired[0]);
    assert_eq!(
        (v["old_price"].clone(), v["new_price"].clone()),
        (json!(100.0), json!(90.0))
    );
    assert_eq!(fired[0]["fired_at"], t + 3 * HOUR);
}

#[test]
fn a_view_at_the_new_price_after_the_update_hears_of_no_drop() {
    let t = at("2026-03-02T10:00:00Z");
    let mut h = Harness::new();
    h.catalog("pv-cat-1", "p8", t, json!({"price": 100.0}));
    h.site(
        "pv-view",
        "product_view",
        "pv",
        at("2026-03-02T12:30:00Z"),
        json!({"product": product("p8", 80.0)}),
    );
    // The update of 12:00 is processed after the view of 12:30 at the new price.
    h.catalog(
        "pv-cat-2",
        "p8",
        at("2026-03-02T12:00:00Z"),
        json!({"price": 80.0}),
    );
    h.advance(at("2026-03-02T14:00:00Z"));
    let fired = h.triggers("pv", "price_drop");
    assert!(fired.is_empty(), "{fired:#?}");
}

/// (step, fired_at) of the triggers of `customer` in `scenario`.
fn steps(h: &Harness, customer: &str, scenario: &str) -> Vec<(i64, i64)> {
    h.triggers(customer, scenario)
        .iter()
        .map(|t| {
            (
                t["step"].as_i64().unwrap_or(-1),
                t["fired_at"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn a_purchase_processed_before_the_registration_ends_the_welcome_series() {
    let t = at("2026-04-01T09:00:00Z");
    let mut h = Harness::new();
    h.site(
        "wp-buy",
        "purchase",
        "wp",
        t + HOUR,
        order("o-wp", 30.0, None),
    );
    h.site("wp-reg", "registration", "wp", t, json!({}));
    h.advance(t + 10 * DAY);
    let got = steps(&h, "wp", "welcome");
    assert!(
        got.iter().all(|(step, _)| *step == 0),
        "no step after the purchase: {got:?}"
    );
}

#[test]
fn a_till_sale_older_than_the_registration_leaves_the_welcome_series() {
    let t = at("2026-04-01T09:00:00Z");
    let mut h = Harness::new();
    h.site("wt-reg", "registration", "wt", t, json!({}));
    // Bought in a store three days before registering, uploaded after.
    h.receipt("wt-till", "sale", "wt", t - 3 * DAY, 40.0);
    h.advance(t + 10 * DAY);
    assert_eq!(
        steps(&h, "wt", "welcome"),
        [(0, t), (1, t + 2 * DAY), (2, t + 5 * DAY)]
    );
}

#[test]
fn an_older_cart_change_arriving_late_keeps_the_newer_wait() {
    let t = at("2026-03-02T10:00:00Z");
    let mut h = Harness::new();
    h.site(
        "lc-site",
        "add_to_cart",
        "lc",
        t + 40 * MINUTE,
        add_to_cart("p1", 10.0),
    );
    // The app's change of 10:00 arrives after the site's of 10:40.
    h.feed(
        "events.app",
        "lc",
        json!({"event_id": "lc-app", "event_type": "add_to_cart", "occurred_at": rfc(t),
            "customer_id": "lc", "product": product("p2", 20.0)}),
    );
    h.advance(t + 3 * HOUR);
    let fired = h.triggers("lc", "abandoned_cart");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(
        fired[0]["fired_at"],
        t + 100 * MINUTE,
        "an hour after 10:40"
    );
    assert_eq!(fired[0]["cause_event_id"], "lc-site");
    let items = vars(&fired[0])["cart_items"].clone();
    assert_eq!(items.as_array().map(Vec::len), Some(2), "{items}");
}

/// In time order the cart's last change is the removal of 10:20, and the reminder is
/// due an hour after it. Read first, that removal empties the cart; the app's add of
/// 10:10, read late, fills it again: the wait still runs from 10:20.
#[test]
fn an_older_add_read_after_a_later_removal_emptied_the_cart_waits_from_the_removal() {
    let t = at("2026-03-02T10:00:00Z");
    let mut h = Harness::new();
    h.site("le-a", "add_to_cart", "le", t, add_to_cart("p1", 10.0));
    let removal = json!({"product": product("p1", 10.0)});
    h.site("le-rm", "remove_from_cart", "le", t + 20 * MINUTE, removal);
    h.feed(
        "events.app",
        "le",
        json!({"event_id": "le-app", "event_type": "add_to_cart", "occurred_at": rfc(t + 10 * MINUTE),
            "customer_id": "le", "product": product("p2", 20.0)}),
    );
    h.advance(t + 3 * HOUR);
    let fired = h.triggers("le", "abandoned_cart");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t + 80 * MINUTE, "an hour after 10:20");
    let items = vars(&fired[0])["cart_items"].clone();
    assert_eq!(items.as_array().map(Vec::len), Some(1), "{items}");
}

/// A cart change dated before the reminder went out, arriving after it (the app's
/// topic lagging), would have restarted the wait before the reminder in time order:
/// it sends no second reminder. A change after the reminder starts a new wait.
#[test]
fn an_older_cart_change_arriving_after_the_reminder_sends_no_second_one() {
    let t = at("2026-03-02T10:00:00Z");
    let mut h = Harness::new();
    h.site("lr-add", "add_to_cart", "lr", t, add_to_cart("p1", 10.0));
    h.advance(t + 90 * MINUTE);
    assert_eq!(h.triggers("lr", "abandoned_cart").len(), 1);
    h.feed(
        "events.app",
        "lr",
        json!({"event_id": "lr-app", "event_type": "add_to_cart", "occurred_at": rfc(t + 5 * MINUTE),
            "customer_id": "lr", "product": product("p2", 20.0)}),
    );
    h.advance(t + 4 * HOUR);
    let fired = h.triggers("lr", "abandoned_cart");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    h.site(
        "lr-add-later",
        "add_to_cart",
        "lr",
        t + 5 * HOUR,
        add_to_cart("p3", 5.0),
    );
    h.advance(t + 7 * HOUR);
    let fired = h.triggers("lr", "abandoned_cart");
    assert_eq!(fired.len(), 2, "{fired:#?}");
    assert_eq!(fired[1]["cause_event_id"], "lr-add-later");
}

/// Reactivation switched off for a while, then on again: customers whose timer fired
/// meanwhile are armed again at their next visit.
#[test]
fn a_scenario_switched_off_and_on_again_arms_the_customers_whose_timer_fired_meanwhile() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("so-v1", "page_view", "so", t, json!({"page_url": "/"}));
    let off = CONFIG.replace(
        "template = \"reactivation\"\n",
        "template = \"reactivation\"\nenabled = false\n",
    );
    assert_ne!(off, CONFIG);
    h.restart_with(&off);
    h.advance(t + 31 * DAY);
    assert!(h.triggers("so", "reactivation").is_empty(), "switched off");
    h.restart_with(CONFIG);
    h.site(
        "so-v2",
        "page_view",
        "so",
        t + 32 * DAY,
        json!({"page_url": "/"}),
    );
    h.advance(t + 63 * DAY);
    let fired = h.triggers("so", "reactivation");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t + 62 * DAY);
}

/// A birthday greeting switched off for a while (a template being fixed) greets the
/// customers whose day fell in that while again the next year, once it is back on.
#[test]
fn a_birthday_greeting_switched_off_over_a_customer_s_day_greets_them_the_next_year() {
    let t = at("2026-03-01T12:00:00Z");
    let mut h = Harness::new();
    let update = birthday_update("1990-03-10", "Europe/Berlin");
    h.site("bo-up", "profile_update", "bo", t, update);
    let off = CONFIG.replace(
        "template = \"birthday\"\n",
        "template = \"birthday\"\nenabled = false\n",
    );
    assert_ne!(off, CONFIG);
    h.restart_with(&off);
    // Another customer gives a birthday while the greeting is off.
    let update = birthday_update("1991-03-15", "Europe/Berlin");
    h.site("bo2-up", "profile_update", "bo2", t + DAY, update);
    h.advance(t + 20 * DAY);
    assert!(h.triggers("bo", "birthday").is_empty(), "switched off");
    assert!(h.triggers("bo2", "birthday").is_empty(), "switched off");
    h.restart_with(CONFIG);
    h.advance(t + 400 * DAY);
    for (customer, day) in [
        ("bo", "2027-03-10T09:00:00Z"),
        ("bo2", "2027-03-15T09:00:00Z"),
    ] {
        let fired = h.triggers(customer, "birthday");
        assert_eq!(fired.len(), 1, "{fired:#?}");
        assert_eq!(fired[0]["fired_at"], at(day));
    }
}

/// A birthday greeting and a reactivation added to a running shop reach the customers
/// it already knows: the stored profiles are armed by a pass once the new configuration
/// runs, without waiting for each customer's next event (a lapsed one sends none).
#[test]
fn scenarios_added_to_a_running_shop_are_armed_for_the_customers_already_known() {
    let t = at("2026-03-01T12:00:00Z");
    let without = CONFIG
        .replace(
            "[[scenarios]]\nname = \"reactivation\"\nkind = \"reactivation\"\n",
            "[[scenarios]]\nname = \"old_reactivation\"\nkind = \"reactivation\"\nenabled = false\n",
        )
        .replace(
            "[[scenarios]]\nname = \"birthday\"\nkind = \"birthday\"\n",
            "[[scenarios]]\nname = \"old_birthday\"\nkind = \"welcome\"\nenabled = false\n",
        )
        .replace("local_time = \"10:00\"\n", "");
    assert_ne!(without, CONFIG);
    let mut h = Harness::with(&without, ClockMode::Event);
    let update = birthday_update("1990-06-10", "Europe/Berlin");
    h.site("sa-up", "profile_update", "sa", t, update);
    h.site("sa-v", "page_view", "sa", t, json!({"page_url": "/"}));
    // Seen only in a store: away as long.
    h.receipt("ss-till", "sale", "ss", t, 40.0);
    h.advance(t + 60 * DAY);
    assert!(h.triggers("sa", "reactivation").is_empty());
    h.restart_with(CONFIG);
    // Other customers' events, one per partition at least, start the pass.
    visit_every_partition(&mut h, "sa-other-", t + 60 * DAY);
    h.advance(t + 120 * DAY);
    for customer in ["sa", "ss"] {
        let fired = h.triggers(customer, "reactivation");
        assert_eq!(fired.len(), 1, "{customer}: {fired:#?}");
        assert_eq!(fired[0]["fired_at"], t + 60 * DAY, "{customer}");
    }
    let fired = h.triggers("sa", "birthday");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], at("2026-06-10T08:00:00Z"));
    // The others visited since the change: armed by their visits, once.
    h.advance(t + 200 * DAY);
    assert_eq!(h.triggers("sa-other-0", "reactivation").len(), 1);
}

/// Visits by eight customers named `<prefix><n>` at `at`: a record on every partition,
/// which starts the passes arming scenarios added to the configuration.
fn visit_every_partition(h: &mut Harness, prefix: &str, at: Millis) {
    for n in 0..8 {
        let customer = format!("{prefix}{n}");
        h.site(
            &format!("{customer}-v"),
            "page_view",
            &customer,
            at,
            json!({}),
        );
    }
}

/// A till receipt uploaded late, older than the customer's last visit, changes
/// nothing of a reactivation series under way: its next step keeps its time and the
/// first is not sent again.
#[test]
fn a_late_receipt_leaves_a_reactivation_series_under_way_alone() {
    let t = at("2026-03-01T12:00:00Z");
    let series = "\n[[scenarios]]\nname = \"re\"\nkind = \"reactivation\"\nchannels = [\"email\"]\n\
                  template = \"re\"\ndelay = \"30d\"\nsteps = [{ delay = \"7d\", template = \"re_2\" }]\n";
    let mut h = Harness::with(&format!("{CONFIG}{series}"), ClockMode::Event);
    h.site(
        "lr-v",
        "page_view",
        "lr",
        t + 2 * DAY,
        json!({"page_url": "/"}),
    );
    h.advance(t + 33 * DAY);
    assert_eq!(h.triggers("lr", "re").len(), 1, "the first step");
    // A receipt of T, before the visit, uploaded at T+33d; one of T+10d, between the
    // visit and the first step, uploaded at T+34d: the absence the first step was
    // for began then.
    h.receipt("lr-till", "sale", "lr", t, 40.0);
    h.receipt("lr-till-2", "sale", "lr", t + 10 * DAY, 40.0);
    h.advance(t + 45 * DAY);
    // After the last step, a receipt of T+20d (before the first step) uploaded late,
    // and a late page view from another device: the series is not sent again.
    h.receipt("lr-till-3", "sale", "lr", t + 20 * DAY, 40.0);
    h.site(
        "lr-v2",
        "page_view",
        "lr",
        t + 25 * DAY,
        json!({"page_url": "/"}),
    );
    h.advance(t + 80 * DAY);
    let steps: Vec<(Value, Value)> = h
        .triggers("lr", "re")
        .iter()
        .map(|t| (t["step"].clone(), t["fired_at"].clone()))
        .collect();
    assert_eq!(
        steps,
        [
            (json!(0), json!(t + 32 * DAY)),
            (json!(1), json!(t + 39 * DAY))
        ]
    );
    // A visit after the series arms it again, from that visit.
    h.site(
        "lr-v3",
        "page_view",
        "lr",
        t + 81 * DAY,
        json!({"page_url": "/"}),
    );
    h.advance(t + 120 * DAY);
    let again: Vec<Value> = (h.triggers("lr", "re").iter())
        .map(|t| t["fired_at"].clone())
        .collect();
    assert_eq!(again.len(), 4, "{again:?}");
    assert_eq!(again[2], json!(t + 111 * DAY));
}

/// A reactivation series taken out of the configuration and put back while its next
/// step waits is armed by no pass over it: the step waiting stays, nothing is sent
/// twice.
#[test]
fn a_reactivation_put_back_while_its_next_step_waits_is_not_armed_again() {
    let t = at("2026-03-01T12:00:00Z");
    let series = "\n[[scenarios]]\nname = \"re\"\nkind = \"reactivation\"\nchannels = [\"email\"]\n\
                  template = \"re\"\ndelay = \"30d\"\nsteps = [{ delay = \"7d\", template = \"re_2\" }]\n";
    let with = format!("{CONFIG}{series}");
    let mut h = Harness::with(&with, ClockMode::Event);
    h.site("rs-v", "page_view", "rs", t, json!({"page_url": "/"}));
    h.advance(t + 31 * DAY);
    assert_eq!(h.triggers("rs", "re").len(), 1, "the first step");
    h.restart_with(CONFIG);
    visit_every_partition(&mut h, "rs-o", t + 31 * DAY);
    h.restart_with(&with);
    visit_every_partition(&mut h, "rs-x", t + 32 * DAY);
    h.advance(t + 40 * DAY);
    let steps: Vec<(Value, Value)> = h
        .triggers("rs", "re")
        .iter()
        .map(|t| (t["step"].clone(), t["fired_at"].clone()))
        .collect();
    assert_eq!(
        steps,
        [
            (json!(0), json!(t + 30 * DAY)),
            (json!(1), json!(t + 37 * DAY))
        ]
    );
}

/// The pass over stored profiles goes page by page: every profile of a partition
/// holding more than a page is armed.
#[test]
fn a_scenario_added_is_armed_for_more_profiles_than_one_page_of_the_pass() {
    let t = at("2026-03-01T12:00:00Z");
    let without = CONFIG.replace(
        "[[scenarios]]\nname = \"birthday\"\nkind = \"birthday\"\n",
        "[[scenarios]]\nname = \"old_birthday\"\nkind = \"birthday\"\nenabled = false\n",
    );
    let mut h = Harness::with(&without, ClockMode::Event);
    let customers = 4_500;
    for n in 0..customers {
        let update = birthday_update("1990-06-10", "Europe/Berlin");
        h.site(
            &format!("pg-{n}"),
            "profile_update",
            &format!("pg-{n}"),
            t,
            update,
        );
    }
    h.restart_with(CONFIG);
    visit_every_partition(&mut h, "pg-x", t + DAY);
    h.advance(t + 120 * DAY);
    let greeted = h
        .on("triggers")
        .filter(|o| o.value["scenario"] == "birthday")
        .count();
    assert_eq!(greeted, customers);
}

#[test]
fn a_removal_arriving_before_the_addition_it_undoes_leaves_no_cart_to_remind_of() {
    let t = at("2026-03-02T10:00:00Z");
    let mut h = Harness::new();
    // Added on the app at 10:00, removed on the site at 10:10; the site's topic is
    // read first.
    h.site(
        "rb-remove",
        "remove_from_cart",
        "rb",
        t + 10 * MINUTE,
        add_to_cart("p1", 10.0),
    );
    h.feed(
        "events.app",
        "rb",
        json!({"event_id": "rb-add", "event_type": "add_to_cart", "occurred_at": rfc(t),
            "customer_id": "rb", "product": product("p1", 10.0)}),
    );
    // An addition after the removal is a cart of its own: reminded of, with p2 alone.
    h.site(
        "rb-add2",
        "add_to_cart",
        "rb",
        t + 20 * MINUTE,
        add_to_cart("p2", 20.0),
    );
    h.advance(t + 3 * HOUR);
    let fired = h.triggers("rb", "abandoned_cart");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["cause_event_id"], "rb-add2");
    let items = vars(&fired[0])["cart_items"].clone();
    let ids: Vec<_> = items
        .as_array()
        .map(|a| a.iter().map(|i| i["product_id"].clone()).collect())
        .unwrap_or_default();
    assert_eq!(ids, [json!("p2")], "{items}");

    // Only the removal and its addition: no reminder at all.
    let mut h = Harness::new();
    h.site(
        "rc-remove",
        "remove_from_cart",
        "rc",
        t + 10 * MINUTE,
        add_to_cart("p1", 10.0),
    );
    h.site("rc-add", "add_to_cart", "rc", t, add_to_cart("p1", 10.0));
    h.advance(t + 3 * HOUR);
    let fired = h.triggers("rc", "abandoned_cart");
    assert!(fired.is_empty(), "{fired:#?}");
}

#[test]
fn an_older_view_arriving_late_keeps_the_newer_browse_wait() {
    let t = at("2026-03-02T10:00:00Z");
    let mut h = Harness::new();
    h.site(
        "lb-view2",
        "product_view",
        "lb",
        t + 40 * MINUTE,
        json!({"product": product("p8", 60.0)}),
    );
    h.site(
        "lb-view1",
        "product_view",
        "lb",
        t,
        json!({"product": product("p7", 55.0)}),
    );
    h.advance(t + 5 * HOUR);
    let fired = h.triggers("lb", "browse_abandonment");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t + 2 * HOUR + 40 * MINUTE);
    assert_eq!(vars(&fired[0])["product"]["product_id"], "p8");
}

#[test]
fn a_browse_wait_does_not_depend_on_whether_an_older_cart_change_arrives_first() {
    let t = at("2026-03-02T10:00:00Z");
    // A view on the site and an older cart change on the app's topic, in both arrival
    // orders: browse abandonment is for browsing without a cart.
    let browse_triggers = |cart_event: &str, view_first: bool| {
        let mut h = Harness::new();
        let view = |h: &mut Harness| {
            h.site(
                "lc-view",
                "product_view",
                "lc",
                t + 40 * MINUTE,
                json!({"product": product("p9", 60.0)}),
            )
        };
        let cart =
            |h: &mut Harness| h.site("lc-cart", cart_event, "lc", t, add_to_cart("p1", 10.0));
        if view_first {
            view(&mut h);
            cart(&mut h);
        } else {
            cart(&mut h);
            view(&mut h);
        }
        h.advance(t + 5 * HOUR);
        h.triggers("lc", "browse_abandonment").len()
    };
    // The cart was emptied before the browsing: the browsing is abandoned either way.
    assert_eq!(browse_triggers("remove_from_cart", false), 1);
    assert_eq!(browse_triggers("remove_from_cart", true), 1);
    // The cart held something while the customer browsed: no browse abandonment.
    assert_eq!(browse_triggers("add_to_cart", false), 0);
    assert_eq!(browse_triggers("add_to_cart", true), 0);
}

#[test]
fn browse_abandonment_judges_the_cart_at_the_views_time_whatever_order_changes_arrive_in() {
    let t = at("2026-03-02T10:00:00Z");
    // Cart changes and a view, arriving in any order (the site's and the app's topics
    // are consumed independently: a removal may come before the addition it undoes).
    let run = |events: &[(&str, &str, Millis)]| {
        let mut h = Harness::new();
        for (id, kind, when) in events {
            let payload = if *kind == "product_view" {
                json!({"product": product("p9", 60.0)})
            } else {
                add_to_cart("p1", 10.0)
            };
            h.site(id, kind, "lo", *when, payload);
        }
        h.advance(t + 5 * HOUR);
        h.triggers("lo", "browse_abandonment")
            .iter()
            .map(|f| f["cause_event_id"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    let add = ("lo-add", "add_to_cart", t);
    let remove = ("lo-remove", "remove_from_cart", t + 10 * MINUTE);
    let view = ("lo-view", "product_view", t + 20 * MINUTE);
    // Added, removed, then browsed with an empty cart: abandoned in every order.
    for order in [
        [add, remove, view],
        [add, view, remove],
        [view, add, remove],
        [remove, add, view],
        [remove, view, add],
        [view, remove, add],
    ] {
        assert_eq!(run(&order), vec!["lo-view".to_string()], "{order:?}");
    }
    // Browsed with p1 in the cart, removed after: no browse abandonment in any order.
    let view_early = ("lo-view", "product_view", t + 5 * MINUTE);
    for order in [
        [add, view_early, remove],
        [add, remove, view_early],
        [view_early, add, remove],
        [remove, add, view_early],
        [remove, view_early, add],
        [view_early, remove, add],
    ] {
        assert!(run(&order).is_empty(), "{order:?}");
    }
}

#[test]
fn a_welcome_series_whose_first_step_was_late_stops() {
    let t = at("2026-04-01T09:00:00Z");
    let mut h = Harness::new();
    // 36 hours late, the tolerance is a day: no welcome_2 or welcome_3 without welcome.
    h.advance(t + 36 * HOUR);
    h.site("l36-reg", "registration", "l36", t, json!({}));
    h.advance(t + 10 * DAY);
    let got = steps(&h, "l36", "welcome");
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(skipped(&h, "welcome", "late"), 1.0);
}

#[test]
fn a_birthday_follow_up_step_fires_and_next_years_birthday_too() {
    let config = CONFIG.replace(
        "template = \"birthday\"\n",
        "template = \"birthday\"\nsteps = [{ delay = \"6d\", template = \"birthday_2\" }]\n",
    );
    let mut h = Harness::with(&config, ClockMode::Event);
    h.site(
        "by-up",
        "profile_update",
        "by",
        at("2026-03-01T12:00:00Z"),
        birthday_update("1990-03-10", "UTC"),
    );
    for day in ["2026-03-10", "2026-03-16", "2026-03-20", "2027-03-10"] {
        h.advance(at(&format!("{day}T10:00:00Z")));
    }
    assert_eq!(
        steps(&h, "by", "birthday"),
        [
            (0, at("2026-03-10T10:00:00Z")),
            (1, at("2026-03-16T10:00:00Z")),
            (0, at("2027-03-10T10:00:00Z")),
        ]
    );
    let fired = h.triggers("by", "birthday");
    assert_eq!(fired[1]["cause_event_id"], "birthday-2026");
    assert_eq!(fired[1]["template"], "birthday_2");
    assert_eq!(fired[2]["cause_event_id"], "birthday-2027");
}

/// A birthday's follow-up a week later goes out at the greeting's local hour across
/// the change to summer time (10:00 CET, then 10:00 CEST), not an hour later.
#[test]
fn a_birthday_follow_up_keeps_the_local_hour_across_a_change_of_summer_time() {
    let config = CONFIG.replace(
        "template = \"birthday\"\n",
        "template = \"birthday\"\nsteps = [{ delay = \"7d\", template = \"birthday_2\" }]\n",
    );
    let mut h = Harness::with(&config, ClockMode::Event);
    h.site(
        "bd-up",
        "profile_update",
        "bd",
        at("2027-03-01T12:00:00Z"),
        birthday_update("1990-03-25", "Europe/Berlin"),
    );
    h.advance(at("2027-04-10T00:00:00Z"));
    assert_eq!(
        steps(&h, "bd", "birthday"),
        [
            (0, at("2027-03-25T09:00:00Z")),
            (1, at("2027-04-01T08:00:00Z")),
        ]
    );
}

#[test]
fn an_order_status_sent_again_sends_one_message() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("os-buy", "purchase", "os", t, order("o-os", 60.0, None));
    h.site(
        "os-ship-1",
        "order_status",
        "os",
        t + DAY,
        order_status("o-os", "shipped"),
    );
    h.site(
        "os-ship-2",
        "order_status",
        "os",
        t + DAY + HOUR,
        order_status("o-os", "shipped"),
    );
    h.site(
        "os-del-1",
        "order_status",
        "os",
        t + 2 * DAY,
        order_status("o-os", "delivered"),
    );
    h.advance(t + 5 * DAY);
    // Re-sent after the survey went out.
    h.site(
        "os-del-2",
        "order_status",
        "os",
        t + 5 * DAY,
        order_status("o-os", "delivered"),
    );
    h.advance(t + 10 * DAY);
    let updates = h.triggers("os", "order_update");
    assert_eq!(updates.len(), 1, "{updates:#?}");
    assert_eq!(steps(&h, "os", "post_delivery"), [(0, t + 4 * DAY)]);
    // The update's id comes from the order and its status, not from the event.
    let mut other = Harness::new();
    other.site("os-buy", "purchase", "os", t, order("o-os", 60.0, None));
    other.site(
        "os-ship-2",
        "order_status",
        "os",
        t + DAY + HOUR,
        order_status("o-os", "shipped"),
    );
    let again = other.triggers("os", "order_update");
    assert_eq!(again.len(), 1, "{again:#?}");
    assert_eq!(again[0]["trigger_id"], updates[0]["trigger_id"]);
}

#[test]
fn a_customer_whose_only_order_was_cancelled_is_a_prospect() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("cn-buy", "purchase", "cn", t, order("o-cn", 50.0, None));
    h.site(
        "cn-cancel",
        "order_status",
        "cn",
        t + HOUR,
        order_status("o-cn", "cancelled"),
    );
    h.advance(t + 400 * DAY);
    let to = |kind: &str| -> Vec<String> {
        h.transitions("cn")
            .iter()
            .filter(|t| t["kind"] == kind)
            .map(|t| t["to_segment"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(to("lifecycle"), ["new", "prospect"]);
    assert_eq!(
        to("rfm"),
        ["New", "none"],
        "no RFM cell once no order remains"
    );
    let left = find(&h.transitions("cn"), "rfm", "none")
        .cloned()
        .expect("left RFM");
    assert_eq!(left["from_segment"], "New");
    assert_eq!(left["reason"], "cancellation");
    let p = h.pipeline.profile("cn").expect("read").expect("stored");
    assert_eq!((p.orders, p.rfm), (0, None));
    assert_eq!(p.lifecycle.as_deref(), Some("prospect"));
}

/// A delayed scenario for customers left without RFM ("none": every order
/// cancelled) fires while they stay there, and not once they bought again, which the
/// arbiter hears as leaving "none".
#[test]
fn a_delayed_trigger_for_customers_without_rfm_fires_until_they_buy_again() {
    let config = format!(
        "{CONFIG}\n[[scenarios]]\nname = \"all_cancelled\"\nkind = \"segment_entered\"\nsegment = \"none\"\ndelay = \"1d\"\nchannels = [\"email\"]\ntemplate = \"vip\"\n"
    );
    let t = at(T0);
    let mut h = Harness::with(&config, ClockMode::Event);
    for c in ["nx", "ny"] {
        h.site(
            &format!("{c}-buy"),
            "purchase",
            c,
            t,
            order(&format!("o-{c}"), 50.0, None),
        );
        let status = order_status(&format!("o-{c}"), "cancelled");
        h.site(&format!("{c}-cancel"), "order_status", c, t + HOUR, status);
    }
    // ny buys again before the day is out.
    let again = order("o-ny-2", 20.0, None);
    h.site("ny-again", "purchase", "ny", t + 5 * HOUR, again);
    h.advance(t + 3 * DAY);
    assert_eq!(steps(&h, "nx", "all_cancelled"), [(0, t + HOUR + DAY)]);
    assert!(h.triggers("ny", "all_cancelled").is_empty());
    let left: Vec<&Value> = h
        .on("customer-actions")
        .filter(|a| a.value["kind"] == "left_segment" && a.value["customer_id"] == "ny")
        .map(|a| &a.value)
        .collect();
    // A first purchase leaves "none" too (as the transitions' metric counts it), then
    // the one that counts again.
    assert_eq!(left.len(), 2, "{left:#?}");
    assert_eq!(left[1]["occurred_at"], json!(t + 5 * HOUR), "{left:#?}");
    assert!(left.iter().all(|a| a["segment"] == "none"), "{left:#?}");
}

#[test]
fn outcomes_do_not_push_event_ids_out_of_the_duplicate_check() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("oc-add", "add_to_cart", "oc", t, add_to_cart("p1", 10.0));
    for i in 0..40 {
        h.feed(
            "outcomes",
            "oc",
            json!({"outcome_id": format!("oc-out-{i}"), "send_id": format!("s-{i}"),
                "customer_id": "oc", "scenario": "welcome", "channel": "email",
                "category": "trigger", "kind": "delivered", "reason": null,
                "occurred_at": t + MINUTE}),
        );
    }
    // The producer's retry of the cart change.
    h.site("oc-add", "add_to_cart", "oc", t, add_to_cart("p1", 10.0));
    h.advance(t + 2 * HOUR);
    let fired = h.triggers("oc", "abandoned_cart");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["cart_items"][0]["quantity"], 1);
}

#[test]
fn a_merge_keeps_the_merged_customers_review_request() {
    let mut h = identified_harness();
    let t = at(T0);
    h.identified_site(json!({"event_id": "mp-buy", "event_type": "purchase",
        "occurred_at": rfc(t), "customer_id": "c-2",
        "order": {"order_id": "o-2", "total": 80.0}}));
    h.identified_site(json!({"event_id": "mp-v", "event_type": "page_view",
        "occurred_at": rfc(t + HOUR), "customer_id": "c-1", "page_url": "/"}));
    h.merge("m-pp", "c-2", "c-1", t + 2 * HOUR);
    h.advance(t + 20 * DAY);
    let fired = h.triggers("c-1", "post_purchase");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t + 14 * DAY);
    assert_eq!(vars(&fired[0])["order_id"], "o-2");
    assert!(h.triggers("c-2", "post_purchase").is_empty());
}

/// The merged customer was told its plan ends; a merge inside the reminder's lead
/// does not tell the survivor again under its own id, also one within the reminder's
/// tolerance of the lead's start (which would pass as merely late).
#[test]
fn a_merge_within_the_subscription_reminder_s_lead_does_not_tell_it_again() {
    let t = at(T0);
    let ends = t + 30 * DAY;
    for merged_at in [ends - 2 * DAY, ends - 5 * DAY + 2 * HOUR] {
        let mut h = identified_harness();
        h.identified_site(json!({"event_id": "ms-up", "event_type": "profile_update",
            "occurred_at": rfc(t), "customer_id": "c-2",
            "profile": {"subscription_ends_at": ends}}));
        h.identified_site(json!({"event_id": "ms-v", "event_type": "page_view",
            "occurred_at": rfc(t + HOUR), "customer_id": "c-1", "page_url": "/"}));
        h.advance(ends - 5 * DAY + HOUR);
        assert_eq!(h.triggers("c-2", "subscription_ending").len(), 1);
        h.merge("m-se", "c-2", "c-1", merged_at);
        h.advance(ends + DAY);
        let fired = h.triggers("c-1", "subscription_ending");
        assert!(fired.is_empty(), "merged at {merged_at}: {fired:#?}");
    }
}

/// A carrier's "delivered" for an order cancelled before it (read first or not) gives
/// no survey and leaves the pending survey of the order delivered before it.
#[test]
fn a_delivery_reported_for_a_cancelled_order_keeps_the_other_order_s_survey() {
    let t = at(T0);
    for cancellation_first in [true, false] {
        let mut h = Harness::new();
        let buy_2 = (
            "nd-buy-2",
            t + DAY,
            json!({"order_id": "o-2", "total": 60.0}),
        );
        let cancel_2 = (
            "nd-cancel-2",
            t + 2 * DAY,
            json!({"order_id": "o-2", "status": "cancelled"}),
        );
        let (first, second) = match cancellation_first {
            true => (cancel_2, buy_2),
            false => (buy_2, cancel_2),
        };
        for (id, at, order) in [
            ("nd-buy-1", t, json!({"order_id": "o-1", "total": 40.0})),
            (
                "nd-del-1",
                t + 3 * DAY,
                json!({"order_id": "o-1", "status": "delivered"}),
            ),
            first,
            second,
            (
                "nd-del-2",
                t + 4 * DAY,
                json!({"order_id": "o-2", "status": "delivered"}),
            ),
        ] {
            let event_type = match order.get("status") {
                Some(_) => "order_status",
                None => "purchase",
            };
            h.site(id, event_type, "c-nd", at, json!({ "order": order }));
        }
        h.advance(t + 10 * DAY);
        let fired = h.triggers("c-nd", "post_delivery");
        assert_eq!(
            fired.len(),
            1,
            "cancellation first: {cancellation_first}: {fired:#?}"
        );
        assert_eq!(vars(&fired[0])["order_id"], "o-1");
        assert_eq!(fired[0]["fired_at"], t + 5 * DAY);
    }
}

/// The merged customer got its reactivation for an absence; merged within the
/// reminder's tolerance into a customer with no visit of its own, the survivor is not
/// told of the same absence again under its id. Back and away again, it is.
#[test]
fn a_merge_after_a_reactivation_went_out_does_not_send_it_again() {
    let mut h = identified_harness();
    let t = at(T0);
    h.identified_site(json!({"event_id": "mr-v", "event_type": "page_view",
        "occurred_at": rfc(t), "customer_id": "c-r2", "page_url": "/"}));
    h.advance(t + 30 * DAY);
    assert_eq!(h.triggers("c-r2", "reactivation").len(), 1);
    h.merge("m-r", "c-r2", "c-r1", t + 30 * DAY + HOUR);
    h.advance(t + 32 * DAY);
    let fired = h.triggers("c-r1", "reactivation");
    assert!(fired.is_empty(), "{fired:#?}");
    h.identified_site(json!({"event_id": "mr-back", "event_type": "page_view",
        "occurred_at": rfc(t + 40 * DAY), "customer_id": "c-r1", "page_url": "/"}));
    h.advance(t + 70 * DAY);
    assert_eq!(h.triggers("c-r1", "reactivation").len(), 1);
}

/// A reactivation still waiting when its customer is merged (its moment passed during
/// an outage, the merge read first after it) goes out for the survivor, late within its
/// tolerance, rather than being taken for one sent.
#[test]
fn a_merge_before_a_due_reactivation_fired_still_sends_it() {
    let now = kairos_core::time::wall_now();
    // Away 30 days two hours ago: the reactivation was due then.
    let t = now - 30 * DAY - 2 * HOUR;
    let config = CONFIG.replace("[clock]", "[identity]\nenabled = true\n[clock]");
    let mut h = identified_harness();
    h.identified_site(json!({"event_id": "mp-v", "event_type": "page_view",
        "occurred_at": rfc(t), "customer_id": "c-p2", "page_url": "/"}));
    h.advance(t + DAY);
    h.restart_in(&config, ClockMode::Wall);
    h.merge("m-p", "c-p2", "c-p1", now - HOUR);
    h.advance(kairos_core::time::wall_now());
    assert!(h.triggers("c-p2", "reactivation").is_empty());
    let fired = h.triggers("c-p1", "reactivation");
    assert_eq!(fired.len(), 1, "{fired:#?}");
}

#[test]
fn a_merge_keeps_the_merged_customers_welcome_series() {
    let mut h = identified_harness();
    let t = at("2026-04-01T09:00:00Z");
    h.identified_site(json!({"event_id": "mw-reg", "event_type": "registration",
        "occurred_at": rfc(t), "customer_id": "c-4"}));
    h.identified_site(json!({"event_id": "mw-v", "event_type": "page_view",
        "occurred_at": rfc(t + HOUR), "customer_id": "c-3", "page_url": "/"}));
    h.merge("m-w", "c-4", "c-3", t + 2 * HOUR);
    h.advance(t + 10 * DAY);
    assert_eq!(steps(&h, "c-4", "welcome"), [(0, t)]);
    assert_eq!(
        steps(&h, "c-3", "welcome"),
        [(1, t + 2 * DAY), (2, t + 5 * DAY)]
    );
}

#[test]
fn a_merge_keeps_the_merged_customers_nps_survey() {
    let mut h = identified_harness();
    let t = at(T0);
    h.identified_site(json!({"event_id": "md-buy", "event_type": "purchase",
        "occurred_at": rfc(t), "customer_id": "c-6",
        "order": {"order_id": "o-6", "total": 80.0}}));
    h.identified_site(json!({"event_id": "md-del", "event_type": "order_status",
        "occurred_at": rfc(t + DAY), "customer_id": "c-6",
        "order": {"order_id": "o-6", "status": "delivered"}}));
    h.identified_site(json!({"event_id": "md-v", "event_type": "page_view",
        "occurred_at": rfc(t + DAY), "customer_id": "c-5", "page_url": "/"}));
    h.merge("m-d", "c-6", "c-5", t + DAY + HOUR);
    h.advance(t + 10 * DAY);
    let fired = h.triggers("c-5", "post_delivery");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["fired_at"], t + 3 * DAY);
    assert_eq!(vars(&fired[0])["order_id"], "o-6");
}

// Review fixes (2026-12-02, second round).

#[test]
fn a_negative_catalog_price_is_dead_lettered_and_announces_no_drop() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("np-cat-1", "p-np", t, json!({"price": 100.0}));
    h.site(
        "np-view",
        "product_view",
        "np",
        t + HOUR,
        json!({"product": product("p-np", 100.0)}),
    );
    h.catalog("np-cat-2", "p-np", t + 2 * HOUR, json!({"price": -5.0}));
    h.advance(t + 3 * HOUR);
    assert!(h.triggers("np", "price_drop").is_empty());
    assert!(
        h.on("product-occasions").next().is_none(),
        "no audience told"
    );
    let dead: Vec<&Output> = h.on("deadletter").collect();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let reason = dead[0].value["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("price -5"), "{reason}");
    // The last good price stands: a real drop from it is still announced.
    h.catalog("np-cat-3", "p-np", t + 4 * HOUR, json!({"price": 80.0}));
    assert_eq!(h.triggers("np", "price_drop").len(), 1);
}

#[test]
fn an_older_catalog_update_arriving_later_neither_moves_the_price_back_nor_announces() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog(
        "oc-1",
        "p-oc",
        t + HOUR,
        json!({"price": 100.0, "in_stock": false}),
    );
    for (customer, kind) in [("oc1", "product_view"), ("oc2", "wishlist_add")] {
        let seen = json!({"product": product("p-oc", 100.0)});
        h.site(
            &format!("{customer}-see"),
            kind,
            customer,
            t + 2 * HOUR,
            seen,
        );
    }
    // A feed re-sends an update from before the current one: a lower price and the
    // product in stock, both older than what the catalog holds.
    let stale = json!({"price": 70.0, "in_stock": true});
    h.catalog("oc-0", "p-oc", t, stale);
    h.advance(t + 3 * HOUR);
    assert!(
        h.triggers("oc1", "price_drop").is_empty(),
        "no drop from the past"
    );
    assert!(
        h.triggers("oc2", "back_in_stock").is_empty(),
        "still out of stock"
    );
    // Newer updates apply against the price and stock that stood: 100, out of stock.
    h.catalog(
        "oc-2",
        "p-oc",
        t + 4 * HOUR,
        json!({"price": 80.0, "in_stock": true}),
    );
    let drops = h.triggers("oc1", "price_drop");
    assert_eq!(drops.len(), 1, "{drops:#?}");
    assert_eq!(vars(&drops[0])["old_price"], 100.0, "{drops:#?}");
    assert_eq!(h.triggers("oc2", "back_in_stock").len(), 1);
}

#[test]
fn in_wall_clock_mode_a_catalog_update_days_ahead_is_dead_lettered() {
    let mut h = Harness::with(CONFIG, ClockMode::Wall);
    let now = kairos_core::time::wall_now();
    h.catalog("fc-1", "p-fc", now, json!({"price": 100.0}));
    h.catalog("fc-2", "p-fc", now + 3 * DAY, json!({"price": 50.0}));
    let dead: Vec<&Output> = h.on("deadletter").collect();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let reason = dead[0].value["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("ahead of this machine's clock"), "{reason}");
}

fn consent(channel: &str, granted: bool) -> Value {
    json!({"consent": {"channel": channel, "granted": granted}})
}

#[test]
fn a_first_opt_in_starts_the_welcome_series_once_with_or_without_registration() {
    let t = at("2026-04-01T09:00:00Z");
    let mut h = Harness::new();
    // An opt-in alone, then one for another channel.
    h.site("ws-a1", "consent_change", "ws-a", t, consent("email", true));
    h.site(
        "ws-a2",
        "consent_change",
        "ws-a",
        t + HOUR,
        consent("sms", true),
    );
    // An opt-in, then the registration an hour later.
    h.site("ws-b1", "consent_change", "ws-b", t, consent("email", true));
    h.site("ws-b2", "registration", "ws-b", t + HOUR, json!({}));
    // A registration, then the opt-in.
    h.site("ws-c1", "registration", "ws-c", t, json!({}));
    h.site(
        "ws-c2",
        "consent_change",
        "ws-c",
        t + HOUR,
        consent("email", true),
    );
    // An opt-in processed after the registration it came after... and before.
    h.site("ws-d2", "registration", "ws-d", t + HOUR, json!({}));
    h.site("ws-d1", "consent_change", "ws-d", t, consent("email", true));
    // A withdrawal is no subscription.
    h.site(
        "ws-e1",
        "consent_change",
        "ws-e",
        t,
        consent("email", false),
    );
    h.advance(t + 10 * DAY);
    // Each series once, from its cause (a step fires when its partition's clock,
    // moved by the other customers' events, gets there).
    let series = |customer: &str| -> Vec<(i64, String, i64)> {
        h.triggers(customer, "welcome")
            .iter()
            .map(|t| {
                (
                    t["step"].as_i64().unwrap_or(-1),
                    t["cause_event_id"].as_str().unwrap_or_default().to_string(),
                    t["cause_occurred_at"].as_i64().unwrap_or(0),
                )
            })
            .collect()
    };
    let expected = |cause: &str, at: Millis| -> Vec<(i64, String, i64)> {
        (0..3).map(|step| (step, cause.to_string(), at)).collect()
    };
    assert_eq!(series("ws-a"), expected("ws-a1", t));
    assert_eq!(series("ws-b"), expected("ws-b1", t));
    assert_eq!(series("ws-c"), expected("ws-c1", t));
    assert_eq!(series("ws-d"), expected("ws-d2", t + HOUR));
    assert!(series("ws-e").is_empty());
}

#[test]
fn a_welcome_series_started_only_by_registration_ignores_opt_ins() {
    let config = CONFIG.replace(
        "template = \"welcome\"\n",
        "template = \"welcome\"\non = [\"registration\"]\n",
    );
    let mut h = Harness::with(&config, ClockMode::Event);
    let t = at("2026-04-01T09:00:00Z");
    h.site("wo-1", "consent_change", "wo", t, consent("email", true));
    h.advance(t + DAY);
    assert!(steps(&h, "wo", "welcome").is_empty());
    h.site("wo-2", "registration", "wo", t + DAY, json!({}));
    h.advance(t + 10 * DAY);
    assert_eq!(steps(&h, "wo", "welcome").len(), 3);
}

/// The test configuration with a win-back 3 days after entering At Risk, a second
/// step 4 days later, and a purchase ending it.
fn delayed_win_back() -> String {
    let plain = "template = \"win_back\"\n";
    assert!(CONFIG.contains(plain));
    CONFIG.replace(
        plain,
        "template = \"win_back\"\ndelay = \"3d\"\nexit_on_purchase = true\n\
         steps = [{ delay = \"4d\", template = \"win_back_2\" }]\n",
    )
}

/// Five orders of 60, one a day from `t`: At Risk 180 days after the last.
fn five_orders(h: &mut Harness, customer: &str, t: Millis) -> Millis {
    for i in 0..5 {
        h.site(
            &format!("{customer}-buy{i}"),
            "purchase",
            customer,
            t + i * DAY,
            order(&format!("o-{customer}-{i}"), 60.0, None),
        );
    }
    t + 4 * DAY
}

#[test]
fn a_segment_trigger_with_a_delay_fires_after_it_and_runs_its_steps() {
    let t = at(T0);
    let mut h = Harness::with(&delayed_win_back(), ClockMode::Event);
    let last = five_orders(&mut h, "dw", t);
    h.advance(last + 180 * DAY);
    let all = h.transitions("dw");
    let at_risk = find(&all, "rfm", "At Risk").expect("At Risk");
    assert_eq!(at_risk["occurred_at"], last + 180 * DAY);
    h.advance(last + 183 * DAY - MINUTE);
    assert!(
        h.triggers("dw", "win_back").is_empty(),
        "not before the delay"
    );
    h.advance(last + 200 * DAY);
    assert_eq!(
        steps(&h, "dw", "win_back"),
        [(0, last + 183 * DAY), (1, last + 187 * DAY)]
    );
    let fired = h.triggers("dw", "win_back");
    assert_eq!(fired[1]["template"], "win_back_2");
    let v = vars(&fired[0]);
    assert_eq!(v["to_segment"], "At Risk");
    assert_eq!(v["from_segment"], "Loyal");
    assert_eq!(vars(&fired[1])["to_segment"], "At Risk");
}

#[test]
fn a_purchase_during_a_segment_triggers_delay_ends_it() {
    let t = at(T0);
    let mut h = Harness::with(&delayed_win_back(), ClockMode::Event);
    let last = five_orders(&mut h, "dp", t);
    h.advance(last + 181 * DAY);
    h.site(
        "dp-buy",
        "purchase",
        "dp",
        last + 181 * DAY,
        order("o-dp-back", 20.0, None),
    );
    h.advance(last + 200 * DAY);
    assert!(h.triggers("dp", "win_back").is_empty());
}

#[test]
fn a_cancelled_latest_order_leaves_recency_to_the_order_before() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("rc-1", "purchase", "rc", t, order("o-rc1", 50.0, None));
    h.site(
        "rc-2",
        "purchase",
        "rc",
        t + 20 * DAY,
        order("o-rc2", 50.0, None),
    );
    h.site(
        "rc-3",
        "order_status",
        "rc",
        t + 21 * DAY,
        order_status("o-rc2", "cancelled"),
    );
    let p = h.pipeline.profile("rc").expect("read").expect("stored");
    assert_eq!(p.last_purchase_at, Some(t));
    assert_eq!(p.last_order_id.as_deref(), Some("o-rc1"));
    h.advance(t + 120 * DAY);
    let all = h.transitions("rc");
    let dormant = find(&all, "lifecycle", "dormant").expect("dormant");
    assert_eq!(dormant["occurred_at"], t + 90 * DAY);
    // The cancellation made the customer new again (one order, 21 days old).
    let renewed = all
        .iter()
        .find(|x| x["occurred_at"] == t + 21 * DAY && x["kind"] == "lifecycle")
        .expect("a transition at the cancellation");
    assert_eq!(renewed["to_segment"], "new");
    assert_eq!(renewed["reason"], "cancellation");
}

#[test]
fn a_return_that_moves_a_segment_says_return() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("rr-1", "purchase", "rr", t, order("o-rr", 1000.0, None));
    h.site(
        "rr-2",
        "order_status",
        "rr",
        t + DAY,
        order_status("o-rr", "returned"),
    );
    let all = h.transitions("rr");
    let big = find(&all, "rfm", "Big Spenders").expect("Big Spenders");
    assert_eq!(big["reason"], "purchase");
    let back = find(&all, "rfm", "New").expect("New after the return");
    assert_eq!(back["from_segment"], "Big Spenders");
    assert_eq!(back["reason"], "return");
}

#[test]
fn no_nps_survey_for_a_returned_or_cancelled_order() {
    let t = at(T0);
    let mut h = Harness::new();
    for (customer, status) in [("nr", "returned"), ("nc", "cancelled")] {
        let id = format!("o-{customer}");
        h.site(
            &format!("{customer}-buy"),
            "purchase",
            customer,
            t,
            order(&id, 60.0, None),
        );
        h.site(
            &format!("{customer}-del"),
            "order_status",
            customer,
            t + DAY,
            order_status(&id, "delivered"),
        );
        h.site(
            &format!("{customer}-back"),
            "order_status",
            customer,
            t + DAY + HOUR,
            order_status(&id, status),
        );
    }
    h.advance(t + 10 * DAY);
    assert!(h.triggers("nr", "post_delivery").is_empty());
    assert!(h.triggers("nc", "post_delivery").is_empty());
}

/// A form's empty fields come as "": no statement, so the address and name the
/// customer gave stay, and the event is applied, not dead-lettered.
#[test]
fn blank_contact_fields_wipe_nothing_out() {
    let t = at("2026-05-01T08:00:00Z");
    let mut h = Harness::new();
    h.site(
        "bl-reg",
        "registration",
        "bl",
        t,
        json!({"email": "ann@example.com", "phone": "+4915100000002",
            "profile": {"first_name": "Ann", "time_zone": "Europe/Berlin", "birthday": "1990-04-03"}}),
    );
    h.site(
        "bl-buy",
        "purchase",
        "bl",
        t + HOUR,
        json!({"email": "", "phone": " ", "order": {"order_id": "o-bl", "total": 20.0},
            "profile": {"first_name": "", "time_zone": "", "birthday": "", "push_token": ""}}),
    );
    assert_eq!(h.on("deadletter").count(), 0);
    let p = h.pipeline.profile("bl").expect("read").expect("stored");
    assert_eq!(p.orders, 1, "the purchase was applied");
    assert_eq!(p.email.as_deref(), Some("ann@example.com"));
    assert_eq!(p.phone.as_deref(), Some("+4915100000002"));
    assert_eq!(p.first_name.as_deref(), Some("Ann"));
    assert_eq!(p.time_zone.as_deref(), Some("Europe/Berlin"));
    assert_eq!(p.birthday.as_deref(), Some("1990-04-03"));
    assert_eq!(p.push_token, None);
}

#[test]
fn an_older_profile_statement_arriving_later_changes_nothing() {
    let t = at("2026-05-01T08:00:00Z");
    let mut h = Harness::new();
    h.site(
        "so-new",
        "profile_update",
        "so",
        t + 5 * MINUTE,
        json!({"email": "new@example.com", "profile": {"subscription_ends_at": t + 60 * DAY,
            "time_zone": "Europe/Berlin", "phone": "+4915100000002"}}),
    );
    h.site(
        "so-old",
        "profile_update",
        "so",
        t,
        json!({"email": "old@example.com", "profile": {"subscription_ends_at": t + 30 * DAY,
            "time_zone": "UTC", "phone": "+4915100000001", "first_name": "Ann"}}),
    );
    h.advance(t + 70 * DAY);
    assert_eq!(steps(&h, "so", "subscription_ending"), [(0, t + 55 * DAY)]);
    let p = h.pipeline.profile("so").expect("read").expect("stored");
    assert_eq!(p.email.as_deref(), Some("new@example.com"));
    assert_eq!(p.phone.as_deref(), Some("+4915100000002"));
    assert_eq!(p.time_zone.as_deref(), Some("Europe/Berlin"));
    assert_eq!(
        p.first_name.as_deref(),
        Some("Ann"),
        "stated only by the older"
    );
}

#[test]
fn partial_returns_add_up_until_the_order_is_returned() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("pr-buy", "purchase", "pr", t, order("o-pr", 100.0, None));
    h.site(
        "pr-r1",
        "order_status",
        "pr",
        t + DAY,
        order("o-pr", 30.0, Some("returned")),
    );
    h.site(
        "pr-r2",
        "order_status",
        "pr",
        t + 2 * DAY,
        order("o-pr", 20.0, Some("returned")),
    );
    let p = h.pipeline.profile("pr").expect("read").expect("stored");
    assert_eq!((p.revenue, p.returns, p.orders), (50.0, 2, 1));
    // The rest (no amount: what is left of the order), then a status sent again.
    h.site(
        "pr-r3",
        "order_status",
        "pr",
        t + 3 * DAY,
        order_status("o-pr", "returned"),
    );
    h.site(
        "pr-r4",
        "order_status",
        "pr",
        t + 3 * DAY,
        order_status("o-pr", "returned"),
    );
    let p = h.pipeline.profile("pr").expect("read").expect("stored");
    assert_eq!((p.revenue, p.returns, p.orders), (0.0, 3, 1));
    h.advance(t + 20 * DAY);
    assert!(h.triggers("pr", "post_purchase").is_empty());
}

/// The value of the sample of `metric` with every label of `labels`.
fn metric(h: &Harness, metric: &str, labels: &[&str]) -> f64 {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&h.pipeline.profile_metrics().gather())
        .expect("metrics encode");
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of the sample of `metric` without labels, if there is one.
fn unlabelled_metric(h: &Harness, metric: &str) -> Option<f64> {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&h.pipeline.profile_metrics().gather())
        .expect("metrics encode");
    text.lines()
        .find_map(|l| l.strip_prefix(metric)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn events_are_counted_by_source_and_type_and_transitions_by_from_and_to() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("mt-1", "page_view", "mt", t, json!({"page_url": "/"}));
    h.feed(
        "events.app",
        "mt",
        json!({"event_id": "mt-2", "event_type": "app_open", "occurred_at": rfc(t + MINUTE),
            "customer_id": "mt"}),
    );
    h.receipt("mt-3", "sale", "mt", t + HOUR, 40.0);
    let events = "kairos_profile_events_total";
    assert_eq!(
        metric(&h, events, &[r#"source="site""#, r#"type="page_view""#]),
        1.0
    );
    assert_eq!(
        metric(&h, events, &[r#"source="app""#, r#"type="app_open""#]),
        1.0
    );
    assert_eq!(
        metric(&h, events, &[r#"source="offline""#, r#"type="sale""#]),
        1.0
    );
    assert_eq!(
        metric(&h, events, &[r#"source="app""#, r#"type="purchase""#]),
        0.0
    );
    let transitions = "kairos_segment_transitions_total";
    let from_prospect = [r#"kind="lifecycle""#, r#"from="prospect""#, r#"to="new""#];
    assert_eq!(metric(&h, transitions, &from_prospect), 1.0);
    let first = [r#"kind="lifecycle""#, r#"from="none""#, r#"to="prospect""#];
    assert_eq!(metric(&h, transitions, &first), 1.0);
    let rfm = [r#"kind="rfm""#, r#"from="none""#, r#"to="New""#];
    assert_eq!(metric(&h, transitions, &rfm), 1.0);
}

#[test]
fn a_profile_merged_into_a_customer_merged_away_since_reaches_the_last_survivor() {
    let mut h = identified_harness();
    let t = at(T0);
    // Y bought; X and Z visited.
    h.identified_site(json!({"event_id": "ch-buy", "event_type": "purchase",
        "occurred_at": rfc(t), "customer_id": "c-y",
        "order": {"order_id": "o-y", "total": 80.0}}));
    h.identified_site(json!({"event_id": "ch-vx", "event_type": "page_view",
        "occurred_at": rfc(t + HOUR), "customer_id": "c-x", "page_url": "/"}));
    h.identified_site(json!({"event_id": "ch-vz", "event_type": "page_view",
        "occurred_at": rfc(t + HOUR), "customer_id": "c-z", "page_url": "/"}));
    // Y joins X, then X joins Z; each survivor hears of its merge first.
    // Within the hour a survivor waits for a merged profile.
    let yx = merge_record("m-yx", "c-y", "c-x", t + 2 * HOUR);
    let xz = merge_record("m-xz", "c-x", "c-z", t + 2 * HOUR + 50 * MINUTE);
    h.merge_expected(&yx);
    h.merge_expected(&xz);
    // The merges are keyed by the merged customers, whose partitions are read
    // independently: X's is applied first, so X's profile leaves for Z before Y's
    // profile is on its way to X.
    h.merge_out(&xz);
    let z = h.pipeline.profile("c-z").expect("read").expect("Z");
    assert_eq!(z.awaiting_merges, ["c-y"], "Z waits for what X waited for");
    h.merge_out(&yx);
    assert!(
        h.pipeline.profile("c-x").expect("read").is_none(),
        "X is not brought back"
    );
    let forwarded: Vec<Value> = h
        .on("identified-events")
        .filter(|r| r.value["kind"] == "merge_in" && r.key == "c-z")
        .map(|r| r.value["record"]["merge"].clone())
        .collect();
    assert_eq!(forwarded.len(), 2, "{forwarded:#?}");
    assert_eq!(forwarded[1]["from"], "c-y");
    assert_eq!(forwarded[1]["into"], "c-z");
    let z = h.pipeline.profile("c-z").expect("read").expect("Z");
    assert_eq!((z.orders, z.revenue), (1, 80.0));
    assert!(z.awaiting_merges.is_empty(), "{:?}", z.awaiting_merges);
    assert_eq!(z.merged_from, ["c-x", "c-y"]);
    h.advance(t + 20 * DAY);
    let fired = h.triggers("c-z", "post_purchase");
    assert_eq!(fired.len(), 1, "Y's review request, for Z: {fired:#?}");
    assert_eq!(vars(&fired[0])["order_id"], "o-y");
}

#[test]
fn a_merged_customers_forwarding_record_lasts_the_forward_retention() {
    // A profile merged into X arrives `late` after X joined Z: whether it reaches Z.
    let reaches_z = |late: Millis| {
        let mut h = identified_harness_with("forward_retention = \"10d\"");
        let t = at(T0);
        for customer in ["c-x", "c-y", "c-z"] {
            h.identified_site(json!({"event_id": format!("fr-{customer}"),
                "event_type": "page_view", "occurred_at": rfc(t), "customer_id": customer,
                "page_url": "/"}));
        }
        let xz = merge_record("m-xz", "c-x", "c-z", t + HOUR);
        h.merge_out(&xz);
        h.advance(t + HOUR + late);
        let yx = merge_record("m-yx", "c-y", "c-x", t + HOUR + late);
        h.merge_out(&yx);
        let forwarded = h.on("identified-events").any(|r| {
            r.value["kind"] == "merge_in"
                && r.key == "c-z"
                && r.value["record"]["merge"]["from"] == "c-y"
        });
        let x_back = h.pipeline.profile("c-x").expect("read").is_some();
        assert_ne!(forwarded, x_back, "forwarded to Z, or X brought back");
        forwarded
    };
    assert!(reaches_z(9 * DAY), "within the retention: on to Z");
    assert!(
        !reaches_z(11 * DAY),
        "past it the record is gone: the late merge finds X as a new customer"
    );
}

/// Outcomes the profile sent on (`identified-events`, kind `outcome`), as (key,
/// customer id, outcome id); the pipeline feeds them back to the profile as the
/// survivors' partitions would read them.
fn forwarded_outcomes(h: &Harness) -> Vec<(String, String, String)> {
    h.on("identified-events")
        .filter(|r| r.value["kind"] == "outcome")
        .map(|r| {
            let field = |name: &str| r.value["record"][name].as_str().unwrap_or("").to_string();
            (r.key.clone(), field("customer_id"), field("outcome_id"))
        })
        .collect()
}

/// A message sent to the anonymous visitor a customer was: its delivery, open and
/// unsubscribe, reported after the merge, are the survivor's, once each, while the
/// forwarding record lasts; on through a second merge; and not after the retention.
#[test]
fn outcomes_of_a_merged_away_customer_reach_the_survivor() {
    let mut h = identified_harness_with("forward_retention = \"10d\"");
    let t = at(T0);
    for customer in ["anon:ox", "c-ox", "c-oz"] {
        h.identified_site(json!({"event_id": format!("ox-{customer}"),
            "event_type": "consent_change", "occurred_at": rfc(t), "customer_id": customer,
            "email": format!("{customer}@example.com"),
            "consent": {"channel": "email", "granted": true}}));
    }
    h.merge("m-ox", "anon:ox", "c-ox", t + HOUR);
    h.outcome("anon:ox", "ox-s1", "delivered", t + 2 * HOUR);
    h.outcome("anon:ox", "ox-s1", "opened", t + 3 * HOUR);
    // A message after the open, ignored; its delivery reported twice.
    h.outcome("anon:ox", "ox-s2", "delivered", t + 4 * HOUR);
    h.outcome("anon:ox", "ox-s2", "delivered", t + 4 * HOUR);
    // Neither changes a profile that matters here: a send report, and a bounce that
    // names no address (the survivor would take it for its own).
    h.outcome("anon:ox", "ox-s3", "sent", t + 4 * HOUR);
    h.outcome("anon:ox", "ox-s3", "bounced_hard", t + 4 * HOUR);
    h.commit();
    let to = |key: &str, outcome: &str| (key.to_string(), key.to_string(), outcome.to_string());
    assert_eq!(
        forwarded_outcomes(&h),
        [
            to("c-ox", "ox-s1-delivered"),
            to("c-ox", "ox-s1-opened"),
            to("c-ox", "ox-s2-delivered"),
            to("c-ox", "ox-s2-delivered"),
        ]
    );
    let e_mail = kairos_core::contracts::Channel::email;
    let survivor = h.pipeline.profile("c-ox").expect("read").expect("stored");
    let e = survivor
        .engagement
        .get(&e_mail)
        .cloned()
        .unwrap_or_default();
    assert_eq!(e.last_opened_at, Some(t + 3 * HOUR));
    assert_eq!(e.last_delivered_at, Some(t + 4 * HOUR));
    assert_eq!(e.ignored_in_row, 1, "the repeated delivery counts once");
    assert_eq!(survivor.consents.get(&e_mail).copied(), Some(true));
    assert!(survivor.bounced_addresses.is_empty());
    assert!(
        h.pipeline.profile("anon:ox").expect("read").is_none(),
        "the merged id stays merged"
    );
    assert_eq!(
        unlabelled_metric(&h, "kairos_profile_outcomes_forwarded_total"),
        Some(4.0)
    );

    // The survivor joins another customer: an unsubscribe under the first id goes on
    // through both forwarding records.
    h.merge("m-oz", "c-ox", "c-oz", t + 5 * HOUR);
    h.outcome("anon:ox", "ox-s1", "unsubscribed", t + 6 * HOUR);
    h.commit();
    assert_eq!(
        forwarded_outcomes(&h)[4..],
        [
            to("c-ox", "ox-s1-unsubscribed"),
            to("c-oz", "ox-s1-unsubscribed")
        ]
    );
    let last = h.pipeline.profile("c-oz").expect("read").expect("stored");
    assert_eq!(last.consents.get(&e_mail).copied(), Some(false));
    assert_eq!(
        last.engagement.get(&e_mail).and_then(|e| e.last_opened_at),
        Some(t + 3 * HOUR),
        "the open came with c-ox's profile"
    );

    // Past the retention the forwarding record is gone: nothing goes on, and no
    // profile is made for the merged id.
    h.advance(t + 12 * DAY);
    h.outcome("anon:ox", "ox-s4", "opened", t + 12 * DAY);
    h.commit();
    assert_eq!(forwarded_outcomes(&h).len(), 6);
    assert!(h.pipeline.profile("anon:ox").expect("read").is_none());
}

#[test]
fn a_second_partial_return_sends_no_second_order_update() {
    let config = CONFIG.replace(
        "statuses = [\"shipped\"]",
        "statuses = [\"shipped\", \"returned\"]",
    );
    let mut h = Harness::with(&config, ClockMode::Event);
    let t = at(T0);
    h.site("pu-buy", "purchase", "pu", t, order("o-pu", 100.0, None));
    for (i, amount) in [30.0, 20.0].into_iter().enumerate() {
        h.site(
            &format!("pu-r{i}"),
            "order_status",
            "pu",
            t + (i as i64 + 1) * DAY,
            order("o-pu", amount, Some("returned")),
        );
    }
    let p = h.pipeline.profile("pu").expect("read").expect("stored");
    assert_eq!((p.revenue, p.returns), (50.0, 2));
    assert_eq!(h.triggers("pu", "order_update").len(), 1);
}

#[test]
fn triggers_held_by_a_customer_merged_away_go_to_the_survivor() {
    let mut h = identified_harness();
    let t = at(T0);
    h.identified_site(json!({"event_id": "hd-vy", "event_type": "page_view",
        "occurred_at": rfc(t), "customer_id": "c-y", "page_url": "/"}));
    h.identified_site(json!({"event_id": "hd-cart", "event_type": "add_to_cart",
        "occurred_at": rfc(t + 90 * MINUTE), "customer_id": "c-x",
        "product": product("p1", 10.0)}));
    h.identified_site(json!({"event_id": "hd-vz", "event_type": "page_view",
        "occurred_at": rfc(t + 90 * MINUTE), "customer_id": "c-z", "page_url": "/"}));
    // Within the hour a survivor waits for a merged profile.
    let yx = merge_record("m-yx", "c-y", "c-x", t + 2 * HOUR);
    let xz = merge_record("m-xz", "c-x", "c-z", t + 2 * HOUR + 50 * MINUTE);
    h.merge_expected(&yx);
    // X's cart reminder comes due while X waits for Y's profile: held.
    h.advance(t + 2 * HOUR + 45 * MINUTE);
    assert!(h.on("triggers").next().is_none(), "held");
    h.merge_expected(&xz);
    h.merge_out(&xz);
    assert!(h.on("triggers").next().is_none(), "Z waits for Y too");
    h.merge_out(&yx);
    let fired = h.triggers("c-z", "abandoned_cart");
    assert_eq!(
        fired.len(),
        1,
        "{:#?}",
        h.on("triggers").collect::<Vec<_>>()
    );
    assert_eq!(fired[0]["cause_event_id"], "hd-cart");
    assert_eq!(fired[0]["merged_from"], json!(["c-x", "c-y"]));
    assert_eq!(h.on("triggers").count(), 1);
}

// Review fixes (2026-12-02, third round).

/// The test configuration with a win-back 2 days after entering At Risk.
fn win_back_after_two_days() -> String {
    let plain = "template = \"win_back\"\n";
    assert!(CONFIG.contains(plain));
    CONFIG.replace(plain, "template = \"win_back\"\ndelay = \"2d\"\n")
}

#[test]
fn a_delayed_segment_trigger_does_not_fire_after_the_customer_left_the_segment() {
    let t = at(T0);
    let mut h = Harness::with(&win_back_after_two_days(), ClockMode::Event);
    let last = five_orders(&mut h, "ls", t);
    let entered = last + 180 * DAY;
    h.advance(entered);
    assert!(find(&h.transitions("ls"), "rfm", "At Risk").is_some());
    // A purchase a day later moves the customer out (win-back does not end on one).
    h.site(
        "ls-back",
        "purchase",
        "ls",
        entered + DAY,
        order("o-ls-back", 60.0, None),
    );
    let p = h.pipeline.profile("ls").expect("read").expect("stored");
    assert_ne!(p.rfm.as_ref().map(|r| r.segment.as_str()), Some("At Risk"));
    h.advance(entered + 3 * DAY);
    assert!(h.triggers("ls", "win_back").is_empty());
    assert_eq!(
        metric(
            &h,
            "kairos_triggers_skipped_total",
            &["win_back", "left_segment"]
        ),
        1.0
    );
}

#[test]
fn leaving_a_segment_a_scenario_targets_tells_the_arbiter() {
    let t = at(T0);
    let mut h = Harness::with(CONFIG, ClockMode::Event);
    let last = five_orders(&mut h, "lv", t);
    let entered = last + 180 * DAY;
    h.advance(entered);
    assert!(find(&h.transitions("lv"), "rfm", "At Risk").is_some());
    let back = entered + DAY;
    h.site(
        "lv-back",
        "purchase",
        "lv",
        back,
        order("o-lv-back", 60.0, None),
    );
    // Only segments a `segment_entered` scenario targets are reported, one action per
    // transition out of one.
    let targeted = ["At Risk", "Champions"];
    let left: Vec<&Value> = h
        .on("customer-actions")
        .filter(|a| a.value["kind"] == "left_segment")
        .map(|a| &a.value)
        .collect();
    let transitions_out = h
        .transitions("lv")
        .iter()
        .filter(|t| targeted.contains(&t["from_segment"].as_str().unwrap_or_default()))
        .count();
    assert!(transitions_out >= 1);
    assert_eq!(left.len(), transitions_out, "{left:#?}");
    let out_of_risk = left
        .iter()
        .find(|a| a["segment"] == "At Risk")
        .expect("leaving At Risk is reported");
    assert_eq!(out_of_risk["occurred_at"], json!(back));
    assert_eq!(out_of_risk["customer_id"], "lv");
}

#[test]
fn a_delayed_segment_trigger_fires_while_the_customer_stays_in_the_segment() {
    let t = at(T0);
    let mut h = Harness::with(&win_back_after_two_days(), ClockMode::Event);
    let last = five_orders(&mut h, "st", t);
    let entered = last + 180 * DAY;
    h.advance(entered);
    h.site(
        "st-v",
        "page_view",
        "st",
        entered + DAY,
        json!({"page_url": "/"}),
    );
    h.advance(entered + 3 * DAY);
    assert_eq!(steps(&h, "st", "win_back"), [(0, entered + 2 * DAY)]);
}

/// The test configuration with a welcome of three messages a day apart.
fn daily_welcome() -> String {
    let steps = "    { delay = \"2d\", template = \"welcome_2\" },\n    { delay = \"3d\", template = \"welcome_3\" },";
    assert!(CONFIG.contains(steps));
    CONFIG
        .replace(steps, "    { delay = \"1d\", template = \"welcome_2\" },\n    { delay = \"1d\", template = \"welcome_3\" },")
        .replace("[clock]", "[identity]\nenabled = true\n\n[clock]")
}

#[test]
fn a_merge_keeps_the_welcome_series_of_an_anonymous_subscriber() {
    let mut h = Harness::with(&daily_welcome(), ClockMode::Event);
    let t = at("2026-04-01T09:00:00Z");
    h.identified_site(json!({"event_id": "as-opt", "event_type": "consent_change",
        "occurred_at": rfc(t), "customer_id": "c-a1",
        "consent": {"channel": "email", "granted": true}}));
    h.identified_site(json!({"event_id": "as-v", "event_type": "page_view",
        "occurred_at": rfc(t + HOUR), "customer_id": "c-b1", "page_url": "/"}));
    h.merge("m-as", "c-a1", "c-b1", t + 2 * HOUR);
    h.advance(t + 10 * DAY);
    assert_eq!(steps(&h, "c-a1", "welcome"), [(0, t)]);
    assert_eq!(
        steps(&h, "c-b1", "welcome"),
        [(1, t + DAY), (2, t + 2 * DAY)]
    );
}

#[test]
fn a_merge_re_arms_the_welcome_series_from_its_first_cause() {
    let mut h = Harness::with(&daily_welcome(), ClockMode::Event);
    let t = at("2026-04-01T09:00:00Z");
    h.identified_site(json!({"event_id": "sr-opt", "event_type": "consent_change",
        "occurred_at": rfc(t), "customer_id": "c-a2",
        "consent": {"channel": "email", "granted": true}}));
    h.identified_site(json!({"event_id": "sr-reg", "event_type": "registration",
        "occurred_at": rfc(t + DAY / 2), "customer_id": "c-a2"}));
    h.identified_site(json!({"event_id": "sr-v", "event_type": "page_view",
        "occurred_at": rfc(t + DAY + HOUR), "customer_id": "c-b2", "page_url": "/"}));
    h.advance(t + DAY + HOUR);
    h.merge("m-sr", "c-a2", "c-b2", t + DAY + DAY / 5);
    h.advance(t + 10 * DAY);
    let mut all = steps(&h, "c-a2", "welcome");
    all.extend(steps(&h, "c-b2", "welcome"));
    all.sort();
    assert_eq!(all, [(0, t), (1, t + DAY), (2, t + 2 * DAY)]);
}

#[test]
fn the_same_partial_return_sent_again_takes_revenue_off_once() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("sp-buy", "purchase", "sp", t, order("o-sp", 100.0, None));
    for id in ["sp-r1", "sp-r1-again"] {
        h.site(
            id,
            "order_status",
            "sp",
            t + DAY,
            order("o-sp", 30.0, Some("returned")),
        );
    }
    let p = h.pipeline.profile("sp").expect("read").expect("stored");
    assert_eq!((p.revenue, p.returns), (70.0, 1));
    // Another part (another time) is a further return.
    h.site(
        "sp-r2",
        "order_status",
        "sp",
        t + 2 * DAY,
        order("o-sp", 30.0, Some("returned")),
    );
    let p = h.pipeline.profile("sp").expect("read").expect("stored");
    assert_eq!((p.revenue, p.returns), (40.0, 2));
}

#[test]
fn an_opt_in_after_a_first_consent_that_was_a_withdrawal_starts_the_welcome() {
    let t = at("2026-04-01T09:00:00Z");
    let mut h = Harness::new();
    // The first consent ever stated is a withdrawal: no subscription yet.
    h.site("lo-1", "consent_change", "lo", t, consent("email", false));
    let p = h.pipeline.profile("lo").expect("read").expect("stored");
    assert_eq!(
        p.consents.get(&kairos_core::contracts::Channel::email),
        Some(&false)
    );
    assert!(!p.consent_at.is_empty());
    assert_eq!(p.subscribed_at, None);
    h.site(
        "lo-2",
        "consent_change",
        "lo",
        t + DAY,
        consent("email", true),
    );
    h.advance(t + 10 * DAY);
    let steps: Vec<(i64, String)> = h
        .triggers("lo", "welcome")
        .iter()
        .map(|w| {
            (
                w["step"].as_i64().unwrap_or(-1),
                w["cause_event_id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        (0..3)
            .map(|step| (step, "lo-2".to_string()))
            .collect::<Vec<_>>()
    );
}

// Merges carry the chains a profile cannot rebuild (2026-12-03).

/// `config` with identity resolution on: events come from `identified-events`.
fn identified(config: &str) -> Harness {
    let config = config.replace("[clock]", "[identity]\nenabled = true\n[clock]");
    Harness::with(&config, ClockMode::Event)
}

/// [`five_orders`] through `identified-events`.
fn identified_five_orders(h: &mut Harness, customer: &str, t: Millis) -> Millis {
    for i in 0..5 {
        h.identified_site(json!({"event_id": format!("{customer}-buy{i}"),
            "event_type": "purchase", "occurred_at": rfc(t + i * DAY), "customer_id": customer,
            "order": {"order_id": format!("o-{customer}-{i}"), "total": 60.0}}));
    }
    t + 4 * DAY
}

#[test]
fn a_merge_carries_the_merged_customers_segment_chain_on_without_starting_it_again() {
    let mut h = identified(&delayed_win_back());
    let t = at(T0);
    let last = identified_five_orders(&mut h, "c-8", t);
    // At Risk at +180 days, the win-back's first step at +183, its second due at +187.
    h.advance(last + 183 * DAY);
    assert_eq!(steps(&h, "c-8", "win_back"), [(0, last + 183 * DAY)]);
    h.identified_site(json!({"event_id": "sc-v", "event_type": "page_view",
        "occurred_at": rfc(last + 183 * DAY + HOUR), "customer_id": "c-7", "page_url": "/"}));
    h.merge("m-sc", "c-8", "c-7", last + 184 * DAY);
    let p = h.pipeline.profile("c-7").expect("read").expect("stored");
    assert_eq!(p.rfm.as_ref().map(|r| r.segment.as_str()), Some("At Risk"));
    h.advance(last + 200 * DAY);
    // The person gets the second step when it was due, and not the first again.
    assert_eq!(steps(&h, "c-7", "win_back"), [(1, last + 187 * DAY)]);
    assert_eq!(h.triggers("c-7", "win_back")[0]["template"], "win_back_2");
    assert_eq!(steps(&h, "c-8", "win_back"), [(0, last + 183 * DAY)]);
}

#[test]
fn a_merge_carries_the_merged_customers_birthday_follow_up() {
    let config = CONFIG.replace(
        "template = \"birthday\"\n",
        "template = \"birthday\"\nsteps = [{ delay = \"6d\", template = \"birthday_2\" }]\n",
    );
    let mut h = identified(&config);
    h.identified_site(json!({"event_id": "bf-up", "event_type": "profile_update",
        "occurred_at": "2026-03-01T12:00:00Z", "customer_id": "c-10",
        "profile": {"birthday": "1990-03-10", "time_zone": "UTC"}}));
    h.advance(at("2026-03-10T10:00:00Z"));
    h.identified_site(json!({"event_id": "bf-v", "event_type": "page_view",
        "occurred_at": "2026-03-11T09:00:00Z", "customer_id": "c-9", "page_url": "/"}));
    h.merge("m-bf", "c-10", "c-9", at("2026-03-12T09:00:00Z"));
    h.advance(at("2026-03-20T10:00:00Z"));
    assert_eq!(
        steps(&h, "c-10", "birthday"),
        [(0, at("2026-03-10T10:00:00Z"))]
    );
    assert_eq!(
        steps(&h, "c-9", "birthday"),
        [(1, at("2026-03-16T10:00:00Z"))]
    );
    let fired = h.triggers("c-9", "birthday");
    assert_eq!(fired[0]["cause_event_id"], "birthday-2026");
    assert_eq!(fired[0]["template"], "birthday_2");
}

#[test]
/// The merged customer's win-back went to the arbiter, which decided it or, if it
/// still waited there (quiet hours, a cap), hands it to the survivor with the merge:
/// the merge moving the survivor into At Risk is no new entry for the person, so the
/// win-back does not start again.
fn a_merge_into_a_segment_the_merged_customer_was_in_does_not_start_its_trigger_again() {
    let mut h = identified(CONFIG);
    let t = at(T0);
    let last = identified_five_orders(&mut h, "c-12", t);
    h.advance(last + 181 * DAY);
    assert_eq!(
        h.triggers("c-12", "win_back").len(),
        1,
        "At Risk at +180 days"
    );
    h.identified_site(json!({"event_id": "sn-v", "event_type": "page_view",
        "occurred_at": rfc(last + 181 * DAY), "customer_id": "c-11", "page_url": "/"}));
    h.merge("m-sn", "c-12", "c-11", last + 182 * DAY);
    h.advance(last + 190 * DAY);
    let transitions = h.transitions("c-11");
    let into_at_risk = find(&transitions, "rfm", "At Risk").expect("transition");
    assert_eq!(into_at_risk["reason"], "merge");
    assert_eq!(h.triggers("c-11", "win_back").len(), 0);
    assert_eq!(h.triggers("c-12", "win_back").len(), 1);
}

/// Neither customer was a Champion; together they are: the merge is the person's
/// entry into the segment, and its trigger goes to the survivor.
#[test]
fn a_merge_into_a_segment_neither_customer_was_in_starts_its_trigger_for_the_survivor() {
    let mut h = identified(CONFIG);
    let t = at(T0);
    for (customer, orders) in [("c-21", 0..3), ("c-22", 3..5)] {
        for i in orders {
            h.identified_site(json!({"event_id": format!("{customer}-buy{i}"),
                "event_type": "purchase", "occurred_at": rfc(t + i * DAY),
                "customer_id": customer,
                "order": {"order_id": format!("o-{customer}-{i}"), "total": 200.0}}));
        }
    }
    for customer in ["c-21", "c-22"] {
        assert!(find(&h.transitions(customer), "rfm", "Champions").is_none());
    }
    h.merge("m-ch", "c-21", "c-22", t + 5 * DAY);
    h.advance(t + 6 * DAY);
    let transitions = h.transitions("c-22");
    let champions = find(&transitions, "rfm", "Champions").expect("transition");
    assert_eq!(champions["reason"], "merge");
    assert_eq!(h.triggers("c-22", "vip").len(), 1);
    assert_eq!(h.triggers("c-21", "vip").len(), 0);
}

/// A merge record as the profile sends it, made to look like an earlier version's:
/// no carried steps, so the survivor rebuilds the chains from the merged profile.
fn without_carried_chains(mut record: Value) -> Value {
    let inner = record["record"].as_object_mut().expect("merge_in record");
    inner.remove("steps");
    inner.remove("chains_carried");
    record
}

/// The registration of `customer` at `t`, 36 hours late (the welcome's tolerance is a
/// day): its series stops, then `customer` merges into `survivor`.
fn merge_after_a_stopped_welcome(h: &mut Harness, customer: &str, survivor: &str, t: Millis) {
    h.advance(t + 36 * HOUR);
    h.identified_site(
        json!({"event_id": format!("{customer}-reg"), "event_type": "registration",
        "occurred_at": rfc(t), "customer_id": customer}),
    );
    h.identified_site(
        json!({"event_id": format!("{survivor}-v"), "event_type": "page_view",
        "occurred_at": rfc(t + 37 * HOUR), "customer_id": survivor, "page_url": "/"}),
    );
    let merge = json!({"merge_id": format!("m-{customer}"), "from": customer, "into": survivor,
        "identifier": "email:ann@example.com", "occurred_at": t + 38 * HOUR});
    h.feed(
        "identified-events",
        customer,
        json!({"kind": "merge", "record": merge}),
    );
}

#[test]
fn a_merge_does_not_resume_a_welcome_series_that_had_stopped() {
    let t = at("2026-04-01T09:00:00Z");
    let mut h = identified(CONFIG);
    merge_after_a_stopped_welcome(&mut h, "c-14", "c-13", t);
    let record = h
        .on("identified-events")
        .find(|r| r.value["kind"] == "merge_in")
        .map(|r| r.value.clone())
        .expect("merge_in");
    h.feed("identified-events", "c-13", record.clone());
    // The same profile in an earlier version's record, which carries no steps (for a
    // customer c-17 into c-18, so that it is no re-sent merge): the series is rebuilt
    // from the merged profile, from its first step due after the merge.
    let mut legacy = without_carried_chains(record);
    legacy["record"]["merge"]["from"] = json!("c-17");
    legacy["record"]["merge"]["into"] = json!("c-18");
    legacy["record"]["merge"]["merge_id"] = json!("m-c-17");
    h.feed("identified-events", "c-18", legacy);
    h.advance(t + 10 * DAY);
    assert!(steps(&h, "c-14", "welcome").is_empty());
    assert!(steps(&h, "c-13", "welcome").is_empty());
    assert_eq!(skipped(&h, "welcome", "late"), 1.0);
    assert_eq!(
        steps(&h, "c-18", "welcome"),
        [(1, t + 2 * DAY), (2, t + 5 * DAY)]
    );
}

#[test]
fn a_merge_carries_a_post_purchase_chain_on_at_its_next_step() {
    let plain = "template = \"post_purchase\"\ndelay = \"14d\"\n";
    assert!(CONFIG.contains(plain));
    let config = CONFIG.replace(
        plain,
        "template = \"post_purchase\"\ndelay = \"14d\"\nsteps = [{ delay = \"7d\", template = \"care\" }]\n",
    );
    let mut h = identified(&config);
    let t = at(T0);
    h.identified_site(json!({"event_id": "pc-buy", "event_type": "purchase",
        "occurred_at": rfc(t), "customer_id": "c-22",
        "order": {"order_id": "o-22", "total": 80.0}}));
    // The review request went out at +14 days; the care step is due at +21.
    h.advance(t + 15 * DAY);
    h.identified_site(json!({"event_id": "pc-v", "event_type": "page_view",
        "occurred_at": rfc(t + 15 * DAY), "customer_id": "c-21", "page_url": "/"}));
    h.merge("m-pc", "c-22", "c-21", t + 15 * DAY + HOUR);
    h.advance(t + 30 * DAY);
    assert_eq!(steps(&h, "c-22", "post_purchase"), [(0, t + 14 * DAY)]);
    assert_eq!(steps(&h, "c-21", "post_purchase"), [(1, t + 21 * DAY)]);
    let fired = h.triggers("c-21", "post_purchase");
    assert_eq!(fired[0]["template"], "care");
    assert_eq!(vars(&fired[0])["order_id"], "o-22");
}

/// The merged customer's later order held the follow-up; cancelled after the merge,
/// it gives the follow-up back to the earlier order, which still names its items.
#[test]
fn a_follow_up_carried_by_a_merge_still_remembers_the_order_it_took_the_place_of() {
    let mut h = identified_harness();
    let t = at(T0);
    for (n, product) in [(0, "p-kettle"), (1, "p-mug")] {
        h.identified_site(
            json!({"event_id": format!("gw-buy-{n}"), "event_type": "purchase",
            "occurred_at": rfc(t + n * DAY), "customer_id": "c-42",
            "order": {"order_id": format!("o-gw-{n}"), "total": 50.0},
            "items": [{"product_id": product, "quantity": 1, "unit_price": 50.0}]}),
        );
    }
    h.identified_site(json!({"event_id": "gw-v", "event_type": "page_view",
        "occurred_at": rfc(t + DAY), "customer_id": "c-41", "page_url": "/"}));
    h.merge("m-gw", "c-42", "c-41", t + DAY + HOUR);
    h.advance(t + DAY + 2 * HOUR);
    order_event(
        &mut h,
        "gw-cancel",
        "order_status",
        "c-41",
        t + 2 * DAY,
        json!({"order_id": "o-gw-1", "status": "cancelled"}),
    );
    h.advance(t + 20 * DAY);
    follow_up_names(&h, "c-41", "o-gw-0", "p-kettle");
}

#[test]
fn a_merge_keeps_the_survivors_later_order_follow_ups_in_their_slots() {
    let mut h = identified_harness();
    let t = at(T0);
    for (customer, after) in [("c-24", 0), ("c-23", HOUR)] {
        h.identified_site(json!({"event_id": format!("{customer}-buy"),
            "event_type": "purchase", "occurred_at": rfc(t + after), "customer_id": customer,
            "order": {"order_id": format!("o-{customer}"), "total": 80.0}}));
        h.identified_site(json!({"event_id": format!("{customer}-del"),
            "event_type": "order_status", "occurred_at": rfc(t + DAY + after),
            "customer_id": customer,
            "order": {"order_id": format!("o-{customer}"), "status": "delivered"}}));
    }
    h.merge("m-slot", "c-24", "c-23", t + DAY + 2 * HOUR);
    h.advance(t + 20 * DAY);
    // The survivor bought and got its order later: its own follow-ups hold the slots,
    // as one customer's later order would have.
    for scenario in ["post_purchase", "post_delivery"] {
        let fired = h.triggers("c-23", scenario);
        assert_eq!(fired.len(), 1, "{scenario}: {fired:#?}");
        assert_eq!(vars(&fired[0])["order_id"], "o-c-23", "{scenario}");
        assert!(h.triggers("c-24", scenario).is_empty(), "{scenario}");
    }
}

#[test]
fn a_merge_keeps_the_mark_of_an_order_returned_before_its_purchase_came() {
    let mut h = identified_harness();
    let t = at(T0);
    // The return arrives first, then the purchase it undoes: only the mark knows.
    h.identified_site(json!({"event_id": "rb-ret", "event_type": "order_status",
        "occurred_at": rfc(t), "customer_id": "c-26",
        "order": {"order_id": "o-26", "total": 80.0, "status": "returned"}}));
    h.identified_site(json!({"event_id": "rb-buy", "event_type": "purchase",
        "occurred_at": rfc(t - DAY), "customer_id": "c-26",
        "order": {"order_id": "o-26", "total": 80.0}}));
    h.identified_site(json!({"event_id": "rb-v", "event_type": "page_view",
        "occurred_at": rfc(t + HOUR), "customer_id": "c-25", "page_url": "/"}));
    h.merge("m-rb", "c-26", "c-25", t + 2 * HOUR);
    h.commit();
    assert_eq!(
        h.pipeline.profile_state_keys("rt/").expect("keys"),
        ["rt/c-25\0o-26"]
    );
    h.advance(t + 20 * DAY);
    assert!(h.triggers("c-25", "post_purchase").is_empty());
    assert!(h.triggers("c-26", "post_purchase").is_empty());
}

/// An identified site event about an order.
fn order_event(h: &mut Harness, id: &str, kind: &str, customer: &str, time: Millis, order: Value) {
    h.identified_site(json!({"event_id": id, "event_type": kind,
        "occurred_at": rfc(time), "customer_id": customer, "order": order}));
}

/// The profile's record of a recent order.
fn recent_order(
    p: &kairos_profile::profile::CustomerProfile,
    id: &str,
) -> kairos_profile::profile::OrderRecord {
    let o = p.recent_orders.iter().find(|o| o.order_id == id);
    o.cloned().expect("order kept")
}

#[test]
fn a_merge_applies_a_reversal_that_reached_one_id_to_the_order_of_the_other() {
    let mut h = identified_harness();
    let t = at(T0);
    // The survivor's own order, then three orders of the customer merged into it.
    order_event(
        &mut h,
        "er-32",
        "purchase",
        "c-32",
        t,
        json!({"order_id": "o-32", "total": 20.0}),
    );
    for (order, total) in [("o-31", 80.0), ("o-33", 100.0), ("o-34", 50.0)] {
        order_event(
            &mut h,
            &format!("er-{order}"),
            "purchase",
            "c-31",
            t,
            json!({"order_id": order, "total": total}),
        );
    }
    // Their reversals reach the survivor's id before the merge: orders it never saw.
    let reversals = [
        (
            "er-r31",
            json!({"order_id": "o-31", "total": 80.0, "status": "returned"}),
        ),
        (
            "er-r33",
            json!({"order_id": "o-33", "total": 30.0, "status": "returned"}),
        ),
        (
            "er-c34",
            json!({"order_id": "o-34", "total": 50.0, "status": "cancelled"}),
        ),
    ];
    for (id, order) in &reversals {
        order_event(&mut h, id, "order_status", "c-32", t + DAY, order.clone());
    }
    h.merge("m-er", "c-31", "c-32", t + 2 * DAY);
    // The part returned again under a new event id, after the merge: applied once.
    order_event(
        &mut h,
        "er-r33-again",
        "order_status",
        "c-32",
        t + DAY,
        reversals[1].1.clone(),
    );
    h.commit();
    let p = h.pipeline.profile("c-32").expect("read").expect("stored");
    // As if everything had come to one profile: 20 + (100 - 30); o-34 no order.
    assert!((p.revenue - 90.0).abs() < 1e-9, "revenue {}", p.revenue);
    assert_eq!(p.orders, 3);
    assert_eq!(p.returns, 2);
    let order = |id: &str| recent_order(&p, id);
    assert!(order("o-31").reversed);
    assert!(!order("o-33").reversed);
    assert!((order("o-33").returned_amount - 30.0).abs() < 1e-9);
    assert!(order("o-34").cancelled);
    assert!(p.early_reversals.is_empty(), "{:?}", p.early_reversals);
}

#[test]
fn a_merge_settles_a_reversal_either_way_once_and_before_trimming_the_lists() {
    let mut h = identified_harness();
    let t = at(T0);
    // The survivor's two orders, the later one its latest purchase.
    order_event(
        &mut h,
        "es-44a",
        "purchase",
        "c-44",
        t - 2 * DAY,
        json!({"order_id": "o-44a", "total": 40.0}),
    );
    order_event(
        &mut h,
        "es-44b",
        "purchase",
        "c-44",
        t + HOUR,
        json!({"order_id": "o-44b", "total": 60.0}),
    );
    // A part of the merged customer's order is returned, and the survivor's id hears
    // of the same return first; then of seven orders neither holds, which fill its
    // list of early reversals (8) with the shared one the oldest.
    let part = json!({"order_id": "o-43", "total": 30.0, "status": "returned"});
    order_event(
        &mut h,
        "es-r43-b",
        "order_status",
        "c-44",
        t + DAY,
        part.clone(),
    );
    for n in 1..=7 {
        order_event(
            &mut h,
            &format!("es-u{n}"),
            "order_status",
            "c-44",
            t + 2 * DAY + n * HOUR,
            json!({"order_id": format!("u-{n}"), "total": 5.0, "status": "returned"}),
        );
    }
    order_event(
        &mut h,
        "es-43",
        "purchase",
        "c-43",
        t,
        json!({"order_id": "o-43", "total": 100.0}),
    );
    order_event(&mut h, "es-r43", "order_status", "c-43", t + DAY, part);
    // The other way round: the merged id hears the survivor's order cancelled.
    order_event(
        &mut h,
        "es-c44b",
        "order_status",
        "c-43",
        t + 3 * DAY,
        json!({"order_id": "o-44b", "total": 60.0, "status": "cancelled"}),
    );
    h.merge("m-es", "c-43", "c-44", t + 4 * DAY);
    h.commit();
    let p = h.pipeline.profile("c-44").expect("read").expect("stored");
    // One profile would hold o-44a (40) and what is left of o-43 (70); the seven
    // returns of orders it never held take nothing (it holds every order it counted);
    // o-43's part returned once.
    assert!((p.revenue - 110.0).abs() < 1e-9, "revenue {}", p.revenue);
    assert_eq!((p.orders, p.returns), (2, 8));
    let order = |id: &str| recent_order(&p, id);
    assert!((order("o-43").returned_amount - 30.0).abs() < 1e-9);
    assert!(order("o-44b").cancelled);
    // The cancelled order no longer counts as the latest purchase.
    assert_eq!(p.last_purchase_at, Some(t));
    assert_eq!(p.last_order_id.as_deref(), Some("o-43"));
    let waiting: Vec<&str> = p
        .early_reversals
        .iter()
        .map(|r| r.order_id.as_str())
        .collect();
    assert_eq!(waiting, ["u-1", "u-2", "u-3", "u-4", "u-5", "u-6", "u-7"]);
}

#[test]
fn an_anonymous_profile_without_an_event_for_the_retention_is_forgotten() {
    let t = at(T0);
    let mut h = Harness::new();
    h.catalog("ax-cat-1", "p1", t, json!({"price": 100.0}));
    let visit = |h: &mut Harness, event_id: &str, kind: &str, visitor: &str, time: Millis| {
        // Keyed as the profile is, so `Pipeline::profile` finds its partition.
        h.feed(
            "events.site",
            &format!("anon:{visitor}"),
            json!({"event_id": event_id, "event_type": kind, "occurred_at": rfc(time),
                "anonymous_id": visitor, "product": product("p1", 100.0)}),
        );
    };
    // Two visitors and a known customer wish the same product; one visitor comes back
    // within the retention (400 days).
    visit(&mut h, "ax-1", "wishlist_add", "v-1", t + HOUR);
    visit(&mut h, "ax-2", "wishlist_add", "v-2", t + HOUR);
    visit(&mut h, "ax-3", "product_view", "v-2", t + 300 * DAY);
    // A third one only opens a message, at day 300.
    visit(&mut h, "ax-6", "page_view", "v-3", t + HOUR);
    h.feed(
        "outcomes",
        "anon:v-3",
        json!({"outcome_id": "ax-open", "send_id": "ax-s", "customer_id": "anon:v-3",
            "scenario": "welcome", "channel": "email", "category": "trigger",
            "kind": "opened", "reason": null, "occurred_at": t + 300 * DAY}),
    );
    h.site(
        "ax-4",
        "wishlist_add",
        "ax-c1",
        t + HOUR,
        json!({"product": product("p1", 100.0)}),
    );
    h.advance(t + 401 * DAY);
    assert_eq!(
        unlabelled_metric(&h, "kairos_profile_anonymous_profiles_expired_total"),
        Some(1.0),
        "one profile forgotten"
    );
    h.commit();
    let stored = |h: &Harness, customer: &str| h.pipeline.profile(customer).expect("read");
    assert!(stored(&h, "anon:v-1").is_none());
    assert!(stored(&h, "anon:v-2").is_some(), "visited on day 300");
    assert!(
        stored(&h, "anon:v-3").is_some(),
        "opened a message on day 300"
    );
    let forgotten: Vec<Value> = h
        .on("customer-actions")
        .filter(|o| o.value["kind"] == "forgotten")
        .map(|o| o.value["customer_id"].clone())
        .collect();
    assert_eq!(forgotten, [json!("anon:v-1")], "the arbiter is told");
    h.catalog("ax-cat-2", "p1", t + 402 * DAY, json!({"price": 50.0}));
    assert!(
        h.triggers("anon:v-1", "price_drop").is_empty(),
        "the join forgot the wish of the forgotten visitor"
    );
    let occasions_for = |h: &Harness, customer: &str| {
        h.on("product-occasions")
            .filter(|o| o.value["customer_id"] == customer)
            .count()
    };
    assert_eq!(occasions_for(&h, "anon:v-1"), 0, "its wish left the join");
    assert_eq!(occasions_for(&h, "anon:v-2"), 1);
    assert_eq!(h.triggers("anon:v-2", "price_drop").len(), 1);
    assert_eq!(h.triggers("ax-c1", "price_drop").len(), 1, "known: kept");
    // The visitor comes back: a new profile, whose first event it is again.
    visit(&mut h, "ax-5", "page_view", "v-1", t + 403 * DAY);
    let firsts = |h: &Harness, customer: &str| {
        h.transitions(customer)
            .iter()
            .filter(|x| x["reason"] == "first event")
            .count()
    };
    assert_eq!(firsts(&h, "anon:v-1"), 2);
    assert_eq!(firsts(&h, "anon:v-2"), 1);
}

#[test]
fn a_producer_retry_after_forty_other_events_of_the_day_is_applied_once() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("rt-add", "add_to_cart", "rt", t, add_to_cart("p1", 10.0));
    for i in 0..40 {
        h.site(
            &format!("rt-view-{i}"),
            "page_view",
            "rt",
            t + (i + 1) * MINUTE,
            json!({}),
        );
    }
    // The producer's retry of the cart change, after 40 other events.
    h.site("rt-add", "add_to_cart", "rt", t, add_to_cart("p1", 10.0));
    h.advance(t + 3 * HOUR);
    let fired = h.triggers("rt", "abandoned_cart");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(vars(&fired[0])["cart_items"][0]["quantity"], 1);
}

/// A phone flushes a queue of events two days old and, its request timed out, sends
/// it again: the retry is applied once, though those events are older than the day
/// for which ids are kept beyond the last 32 (the day counts from when they are read).
#[test]
fn a_retried_offline_queue_of_events_two_days_old_is_applied_once() {
    let t = at(T0);
    let mut h = Harness::new();
    h.site("oq-now", "page_view", "oq", t + 2 * DAY, json!({}));
    for _ in 0..2 {
        for i in 0..40 {
            let product = format!("p{i}");
            let id = format!("oq-add-{i}");
            h.site(
                &id,
                "add_to_cart",
                "oq",
                t + i * MINUTE,
                add_to_cart(&product, 10.0),
            );
        }
    }
    h.commit();
    let p = h.pipeline.profile("oq").expect("read").expect("a profile");
    assert_eq!(p.cart.len(), 40);
    assert!(p.cart.iter().all(|item| item.quantity == 1), "{:?}", p.cart);
}

/// The test configuration with anonymous profiles kept for good (as before the
/// retention existed).
fn retention_off() -> String {
    CONFIG.replace(
        "[clock]",
        "[identity]\nanonymous_retention = \"0s\"\n[clock]",
    )
}

#[test]
fn an_anonymous_profile_stored_before_the_retention_is_armed_when_next_touched() {
    let t = at(T0);
    let mut h = Harness::with(&retention_off(), ClockMode::Event);
    h.feed(
        "events.site",
        "anon:v-9",
        json!({"event_id": "ar-1", "event_type": "page_view", "occurred_at": rfc(t),
            "anonymous_id": "v-9"}),
    );
    // The upgrade: retention on. The visit's reactivation timer (30 days) touches the
    // profile, which then waits out the retention from its last event.
    h.restart_with(CONFIG);
    h.advance(t + 399 * DAY);
    h.commit();
    assert!(h.pipeline.profile("anon:v-9").expect("read").is_some());
    h.advance(t + 401 * DAY);
    h.commit();
    assert!(h.pipeline.profile("anon:v-9").expect("read").is_none());
}

#[test]
fn an_anonymous_profile_that_absorbed_another_is_kept_as_its_identity_node_is() {
    let mut h = identified_harness();
    let t = at(T0);
    for (event_id, visitor) in [("ak-1", "anon:a-1"), ("ak-2", "anon:a-2")] {
        h.identified_site(json!({"event_id": event_id, "event_type": "page_view",
            "occurred_at": rfc(t), "customer_id": visitor}));
    }
    h.merge("m-ak", "anon:a-2", "anon:a-1", t + HOUR);
    h.advance(t + 500 * DAY);
    h.commit();
    assert!(h.pipeline.profile("anon:a-1").expect("read").is_some());
    assert!(
        h.pipeline.profile("anon:a-2").expect("read").is_none(),
        "merged"
    );
}

#[test]
fn an_anonymous_profile_found_past_its_retention_is_forgotten_as_of_then() {
    let t = at(T0);
    let mut h = Harness::with(&retention_off(), ClockMode::Event);
    h.catalog("ap-cat-1", "p1", t, json!({"price": 100.0}));
    h.feed(
        "events.site",
        "anon:v-8",
        json!({"event_id": "ap-1", "event_type": "wishlist_add", "occurred_at": rfc(t),
            "anonymous_id": "v-8", "product": product("p1", 100.0)}),
    );
    // Its timers fire while retention is off; on again, the first thing to touch it
    // (a price drop of its wish, on day 450) finds it 50 days past the retention.
    h.advance(t + 100 * DAY);
    h.restart_with(CONFIG);
    h.catalog("ap-cat-2", "p1", t + 450 * DAY, json!({"price": 50.0}));
    h.advance(t + 451 * DAY);
    h.commit();
    assert!(h.pipeline.profile("anon:v-8").expect("read").is_none());
    let forgotten: Vec<Value> = h
        .on("customer-actions")
        .filter(|o| o.value["kind"] == "forgotten")
        .map(|o| o.value["occurred_at"].clone())
        .collect();
    assert_eq!(
        forgotten,
        [json!(t + 450 * DAY)],
        "dated when it was forgotten"
    );
}

#[test]
fn a_merged_customer_s_wishes_leave_the_catalog_join_under_its_old_id() {
    let mut h = identified_harness();
    let t = at(T0);
    h.catalog(
        "mw-cat-1",
        "p2",
        t,
        json!({"name": "Mug", "in_stock": false}),
    );
    h.identified_site(json!({"event_id": "mw-wish", "event_type": "wishlist_add",
        "occurred_at": rfc(t + HOUR), "customer_id": "anon:a-9", "product": product("p2", 50.0)}));
    h.merge("m-mw", "anon:a-9", "c-9", t + 2 * HOUR);
    h.catalog("mw-cat-2", "p2", t + 3 * HOUR, json!({"in_stock": true}));
    let occasions_for = |customer: &str| {
        h.on("product-occasions")
            .filter(|o| o.value["customer_id"] == customer)
            .count()
    };
    assert_eq!(occasions_for("c-9"), 1, "the survivor took the wish over");
    assert_eq!(occasions_for("anon:a-9"), 0, "none for the old id");
}

/// A customer greeted late on 31 December who then moves east is greeted again the
/// next 31 December: the greeting counts for the year it was for, not for the year
/// its moment reads as in the new zone.
#[test]
fn a_new_year_s_eve_birthday_is_greeted_the_next_year_after_a_move_east() {
    let mut h = Harness::new();
    h.site(
        "ny-1",
        "profile_update",
        "ny",
        at("2026-06-01T00:00:00Z"),
        birthday_update("1990-12-31", "America/New_York"),
    );
    h.advance(at("2026-12-31T15:01:00Z"));
    assert_eq!(h.triggers("ny", "birthday").len(), 1, "10:00 in New York");
    h.site(
        "ny-2",
        "profile_update",
        "ny",
        at("2027-06-01T00:00:00Z"),
        json!({"profile": {"time_zone": "Australia/Sydney"}}),
    );
    h.advance(at("2027-12-30T23:01:00Z"));
    let fired = h.triggers("ny", "birthday");
    assert_eq!(fired.len(), 2, "{fired:#?}");
    assert_eq!(
        fired[1]["fired_at"],
        at("2027-12-30T23:00:00Z"),
        "10:00 in Sydney"
    );
}
