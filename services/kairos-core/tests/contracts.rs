//! The Rust contracts do not drift from `schemas/*.avsc`.
//!
//! For every topic type: the schema derived from the Rust type equals the file (Parsing
//! Canonical Form); sample values survive an Avro round trip through the file schema and a
//! JSON round trip; the JSON field names are the Avro field names. And every record, enum
//! and field of every file is documented for producers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::Path;

use apache_avro::{from_avro_datum, from_value, to_avro_datum, to_value, AvroSchema, Schema};
use kairos_core::contracts::*;
use kairos_core::schemas;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value as Json};

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// Parsing Canonical Form of `schema`.
///
/// apache-avro 0.17 strips `logicalType` but then leaves `{"type":"long"}` where the
/// specification's [PRIMITIVES] rule gives `"long"` (see its own test
/// `avro_4004_canonical_form_strip_logical_types`). The derived schemas carry no logical
/// types while the files mark timestamps as `timestamp-millis`, so finish the job on both
/// sides. With a fixed apache-avro this is a no-op.
fn canonical(schema: &Schema) -> String {
    let mut pcf = schema.canonical_form();
    for p in PRIMITIVES {
        pcf = pcf.replace(&format!(r#"{{"type":"{p}"}}"#), &format!(r#""{p}""#));
    }
    pcf
}

/// Where two canonical forms first differ, with some context.
fn first_difference(a: &str, b: &str) -> String {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let at = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let around = |s: &[char]| -> String {
        let start = at.saturating_sub(60);
        let end = (at + 60).min(s.len());
        s[start..end].iter().collect()
    };
    format!(
        "at character {at}\n    rust: ...{}...\n    file: ...{}...",
        around(&a[..]),
        around(&b[..])
    )
}

fn file_text(file: &str) -> &'static str {
    schemas::ALL
        .iter()
        .find(|f| f.file == file)
        .unwrap_or_else(|| panic!("{file} is not listed in kairos_core::schemas::ALL"))
        .text
}

/// The whole contract of one topic type: (a) canonical form, (b) Avro and JSON round
/// trips, (d) JSON field names, for each sample.
fn check_contract<T>(file: &str, schema: &Schema, samples: &[T])
where
    T: AvroSchema + Serialize + DeserializeOwned + PartialEq + Debug,
{
    let type_name = std::any::type_name::<T>();

    // (a) The derived schema is the file's schema.
    let derived = canonical(&T::get_schema());
    let declared = canonical(schema);
    assert!(
        derived == declared,
        "schemas/{file} and the Rust type {type_name} have drifted apart: \
         first difference {}\n  derived from Rust: {derived}\n  schemas/{file}: {declared}",
        first_difference(&derived, &declared),
    );

    let raw: Json = serde_json::from_str(file_text(file))
        .unwrap_or_else(|e| panic!("schemas/{file} is not valid JSON: {e}"));
    let mut named = BTreeMap::new();
    collect_named(&raw, None, &mut named);

    for (i, sample) in samples.iter().enumerate() {
        let what = format!("{file}, sample {i}");

        // (b) Avro round trip through the file schema.
        let value = to_value(sample).unwrap_or_else(|e| panic!("{what}: to_value: {e}"));
        let value = value
            .resolve(schema)
            .unwrap_or_else(|e| panic!("{what}: does not resolve against the file schema: {e}"));
        let bytes = to_avro_datum(schema, value)
            .unwrap_or_else(|e| panic!("{what}: cannot be encoded with the file schema: {e}"));
        let decoded = from_avro_datum(schema, &mut bytes.as_slice(), None)
            .unwrap_or_else(|e| panic!("{what}: cannot be decoded with the file schema: {e}"));
        let back: T = from_value(&decoded)
            .unwrap_or_else(|e| panic!("{what}: decoded Avro does not deserialize: {e}"));
        assert_eq!(
            &back, sample,
            "{what}: the Avro round trip changed the value"
        );

        // (b) JSON round trip.
        let text = serde_json::to_string(sample).expect("serialize to JSON");
        let back: T = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{what}: JSON does not read back: {e}\n{text}"));
        assert_eq!(
            &back, sample,
            "{what}: the JSON round trip changed the value"
        );

        // (d) JSON field names are the Avro field names, at every level.
        let json = serde_json::to_value(sample).expect("serialize to JSON");
        let mut problems = Vec::new();
        compare_json(&json, &raw, &named, "$", &mut problems);
        assert!(
            problems.is_empty(),
            "{what}: JSON and Avro disagree:\n  {}",
            problems.join("\n  ")
        );
    }
}

/// Named types (records and enums) of a raw schema, by full name.
fn collect_named(schema: &Json, namespace: Option<&str>, out: &mut BTreeMap<String, Json>) {
    match schema {
        Json::Array(branches) => {
            for b in branches {
                collect_named(b, namespace, out);
            }
        }
        Json::Object(o) => match o.get("type") {
            Some(Json::String(t)) if t == "record" || t == "enum" => {
                let ns = o.get("namespace").and_then(Json::as_str).or(namespace);
                let name = o.get("name").and_then(Json::as_str).unwrap_or_default();
                let full = match ns {
                    Some(ns) if !name.contains('.') => format!("{ns}.{name}"),
                    _ => name.to_string(),
                };
                out.insert(full, schema.clone());
                for f in o
                    .get("fields")
                    .and_then(Json::as_array)
                    .into_iter()
                    .flatten()
                {
                    collect_named(&f["type"], ns, out);
                }
            }
            Some(Json::String(t)) if t == "array" => collect_named(&o["items"], namespace, out),
            Some(Json::String(t)) if t == "map" => collect_named(&o["values"], namespace, out),
            Some(nested @ (Json::Object(_) | Json::Array(_))) => {
                collect_named(nested, namespace, out)
            }
            _ => {}
        },
        _ => {}
    }
}

/// Walks a JSON value and its Avro schema side by side.
fn compare_json(
    value: &Json,
    schema: &Json,
    named: &BTreeMap<String, Json>,
    path: &str,
    problems: &mut Vec<String>,
) {
    match schema {
        Json::String(name) if PRIMITIVES.contains(&name.as_str()) => {}
        Json::String(name) => {
            let def = named
                .get(name)
                .or_else(|| named.get(&format!("{NAMESPACE}.{name}")));
            match def {
                Some(def) => compare_json(value, def, named, path, problems),
                None => problems.push(format!("{path}: unknown type {name}")),
            }
        }
        Json::Array(branches) => {
            if value.is_null() {
                return;
            }
            let non_null: Vec<&Json> = branches
                .iter()
                .filter(|b| b.as_str() != Some("null"))
                .collect();
            match non_null[..] {
                [only] => compare_json(value, only, named, path, problems),
                _ => problems.push(format!(
                    "{path}: union with several non-null branches, extend this test"
                )),
            }
        }
        Json::Object(o) => match o.get("type") {
            Some(Json::String(t)) if t == "record" => {
                let name = o.get("name").and_then(Json::as_str).unwrap_or_default();
                let Some(object) = value.as_object() else {
                    problems.push(format!("{path}: record {name} but JSON {value}"));
                    return;
                };
                let fields = o
                    .get("fields")
                    .and_then(Json::as_array)
                    .cloned()
                    .unwrap_or_default();
                let avro: BTreeSet<&str> =
                    fields.iter().filter_map(|f| f["name"].as_str()).collect();
                let json: BTreeSet<&str> = object.keys().map(String::as_str).collect();
                if avro != json {
                    problems.push(format!(
                        "{path} ({name}): only in JSON: {:?}; only in Avro: {:?}",
                        json.difference(&avro).collect::<Vec<_>>(),
                        avro.difference(&json).collect::<Vec<_>>(),
                    ));
                }
                for f in &fields {
                    if let Some(field) = f["name"].as_str() {
                        if let Some(v) = object.get(field) {
                            compare_json(
                                v,
                                &f["type"],
                                named,
                                &format!("{path}.{field}"),
                                problems,
                            );
                        }
                    }
                }
            }
            Some(Json::String(t)) if t == "enum" => {
                let symbols = o.get("symbols").and_then(Json::as_array);
                let known = value.as_str().is_some_and(|s| {
                    symbols.is_some_and(|all| all.iter().any(|x| x.as_str() == Some(s)))
                });
                if !known {
                    problems.push(format!("{path}: JSON {value} is not a symbol of the enum"));
                }
            }
            Some(Json::String(t)) if t == "array" => match value.as_array() {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        compare_json(item, &o["items"], named, &format!("{path}[{i}]"), problems);
                    }
                }
                None => problems.push(format!("{path}: array but JSON {value}")),
            },
            // A primitive with a logical type.
            _ => {}
        },
        other => problems.push(format!("{path}: invalid schema {other}")),
    }
}

fn has_doc(o: &serde_json::Map<String, Json>) -> bool {
    o.get("doc")
        .and_then(Json::as_str)
        .is_some_and(|d| !d.trim().is_empty())
}

/// (c) Every record, enum and field has a doc; plus the conventions of the files.
fn check_docs(schema: &Json, path: &str, problems: &mut Vec<String>) {
    match schema {
        Json::Array(branches) => {
            for b in branches {
                check_docs(b, path, problems);
            }
        }
        Json::Object(o) => match o.get("type").and_then(Json::as_str) {
            Some(kind @ ("record" | "enum")) => {
                let name = o.get("name").and_then(Json::as_str).unwrap_or("?");
                if !has_doc(o) {
                    problems.push(format!("{path}: {kind} {name} has no doc"));
                }
                if o.get("namespace").and_then(Json::as_str) != Some(NAMESPACE) {
                    problems.push(format!(
                        "{path}: {kind} {name} is not in namespace {NAMESPACE}"
                    ));
                }
                for f in o
                    .get("fields")
                    .and_then(Json::as_array)
                    .into_iter()
                    .flatten()
                {
                    let Some(field) = f.as_object() else {
                        problems.push(format!("{name}: field {f} is not an object"));
                        continue;
                    };
                    let fname = field.get("name").and_then(Json::as_str).unwrap_or("?");
                    let here = format!("{name}.{fname}");
                    if !has_doc(field) {
                        problems.push(format!("{here}: field has no doc"));
                    }
                    let ty = &f["type"];
                    let optional = ty.as_array().and_then(|b| b.first()).and_then(Json::as_str)
                        == Some("null");
                    if optional && field.get("default") != Some(&Json::Null) {
                        problems.push(format!("{here}: optional field without \"default\": null"));
                    }
                    let timestamp = json!({"type": "long", "logicalType": "timestamp-millis"});
                    let optional_timestamp = json!(["null", timestamp]);
                    if (fname.ends_with("_at") || fname.ends_with("_until"))
                        && *ty != timestamp
                        && *ty != optional_timestamp
                    {
                        problems.push(format!(
                            "{here}: timestamps are {timestamp} (or {optional_timestamp})"
                        ));
                    }
                    check_docs(ty, &here, problems);
                }
            }
            Some("array") => check_docs(&o["items"], path, problems),
            _ => {}
        },
        _ => {}
    }
}

#[test]
fn every_schema_element_is_documented() {
    let mut problems = Vec::new();
    for f in schemas::ALL {
        let raw: Json = serde_json::from_str(f.text)
            .unwrap_or_else(|e| panic!("schemas/{} is not valid JSON: {e}", f.file));
        let mut here = Vec::new();
        check_docs(&raw, f.file, &mut here);
        problems.extend(here.into_iter().map(|p| format!("{}: {p}", f.file)));
    }
    assert!(
        problems.is_empty(),
        "undocumented schema elements:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn every_schema_file_is_embedded_and_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".avsc"))
        .collect();
    let embedded: BTreeSet<String> = schemas::ALL.iter().map(|f| f.file.to_string()).collect();
    assert_eq!(
        on_disk, embedded,
        "schemas/*.avsc and kairos_core::schemas::ALL differ"
    );
    for f in schemas::ALL {
        if let Err(e) = Schema::parse_str(f.text) {
            panic!("schemas/{} does not parse: {e}", f.file);
        }
    }
}

// Samples. The first of each type is a kitchen sink: every Option set, every Vec
// non-empty, enums off their first variant (no real message sets all of these at once).
// The second is as sparse as the type allows.

const T0: i64 = 1_764_000_000_123; // 2025-11-24T16:00:00.123Z

fn line_item(product_id: &str, quantity: i32, unit_price: f64) -> LineItem {
    LineItem {
        product_id: product_id.into(),
        name: Some(format!("Product {product_id}")),
        category: Some("shoes/running".into()),
        quantity,
        unit_price,
    }
}

#[test]
fn customer_event_matches_its_schema() {
    let full = CustomerEvent {
        event_id: "0b8f6c1e-8a0e-4d55-9b1e-3f3c2a7d9e01".into(),
        event_type: EventType::purchase,
        occurred_at: T0,
        platform: Some(Platform::ios),
        customer_id: Some("c-1042".into()),
        anonymous_id: Some("anon-7f3a".into()),
        device_id: Some("dev-51c2".into()),
        session_id: Some("sess-9001".into()),
        email: Some("ada@example.com".into()),
        phone: Some("+4915112345678".into()),
        loyalty_card: Some("LC-0042-1234".into()),
        page_url: Some("https://shop.example.com/checkout?step=pay".into()),
        search_query: Some("trail running shoes".into()),
        product: Some(Product {
            product_id: "sku-10042".into(),
            name: Some("Trail Runner 2".into()),
            category: Some("shoes/running".into()),
            price: Some(89.5),
        }),
        items: vec![
            line_item("sku-10042", 2, 89.5),
            line_item("sku-20007", 1, 12.25),
        ],
        order: Some(Order {
            order_id: "ord-2025-000123".into(),
            total: Some(191.25),
            currency: Some("EUR".into()),
            status: Some(OrderStatus::shipped),
        }),
        consent: Some(ConsentChange {
            channel: Channel::sms,
            granted: true,
        }),
        profile: Some(ProfileUpdate {
            first_name: Some("Ada".into()),
            last_name: Some("Lovelace".into()),
            birthday: Some("1990-04-17".into()),
            time_zone: Some("Europe/Berlin".into()),
            email: Some("ada@example.com".into()),
            phone: Some("+4915112345678".into()),
            push_token: Some("fcm:APA91bH-example".into()),
            messenger_id: Some("tg:123456789".into()),
            subscription_ends_at: Some(T0 + 5 * 86_400_000),
            cleared: vec![ProfileField::last_name, ProfileField::messenger_id],
        }),
        interaction: Some(MessageInteraction {
            send_id: Some("send-5f2e".into()),
            channel: Channel::push,
            action: InteractionAction::clicked,
        }),
    };
    let sparse = CustomerEvent {
        event_id: "0b8f6c1e-8a0e-4d55-9b1e-3f3c2a7d9e02".into(),
        event_type: EventType::heartbeat,
        occurred_at: T0 + 1,
        platform: None,
        customer_id: None,
        anonymous_id: None,
        device_id: None,
        session_id: None,
        email: None,
        phone: None,
        loyalty_card: None,
        page_url: None,
        search_query: None,
        product: None,
        items: vec![],
        order: None,
        consent: None,
        profile: None,
        interaction: None,
    };
    // A profile update that carries nothing but the optional timestamp.
    let sparse_profile = CustomerEvent {
        event_id: "0b8f6c1e-8a0e-4d55-9b1e-3f3c2a7d9e03".into(),
        event_type: EventType::profile_update,
        occurred_at: T0 + 2,
        customer_id: Some("c-7".into()),
        profile: Some(ProfileUpdate {
            subscription_ends_at: Some(T0 + 30 * 86_400_000),
            ..ProfileUpdate::default()
        }),
        ..sparse.clone()
    };
    check_contract(
        "customer_event.avsc",
        schemas::customer_event(),
        &[full, sparse, sparse_profile],
    );
}

/// A hand-written JSON event with only the required fields (and an RFC 3339 time) is
/// accepted by serde and, with the schema's defaults, by Avro.
#[test]
fn minimal_customer_event_json_is_accepted() {
    let event: CustomerEvent = serde_json::from_str(
        r#"{"event_id": "e-1", "event_type": "page_view", "occurred_at": "2025-11-24T16:00:00.123Z"}"#,
    )
    .expect("minimal JSON event");
    assert_eq!(event.occurred_at, T0);
    assert!(event.items.is_empty() && event.customer_id.is_none());
    let value = to_value(&event).expect("to_value");
    let value = value.resolve(schemas::customer_event()).expect("resolve");
    to_avro_datum(schemas::customer_event(), value).expect("encode");
}

#[test]
fn offline_receipt_matches_its_schema() {
    let full = OfflineReceipt {
        event_id: "6a1d3b2c-0000-4000-8000-000000000001".into(),
        occurred_at: T0,
        receipt_id: "store-17/2025-11-24/0042".into(),
        kind: ReceiptKind::refund,
        store_id: "store-17".into(),
        customer_id: Some("c-1042".into()),
        loyalty_card: Some("LC-0042-1234".into()),
        phone: Some("+4915112345678".into()),
        items: vec![
            line_item("sku-10042", 1, 89.5),
            line_item("sku-30001", 3, 4.25),
        ],
        total: 102.25,
        currency: "EUR".into(),
    };
    let sparse = OfflineReceipt {
        event_id: "6a1d3b2c-0000-4000-8000-000000000002".into(),
        occurred_at: T0 + 1,
        receipt_id: "store-3/0001".into(),
        kind: ReceiptKind::sale,
        store_id: "store-3".into(),
        customer_id: None,
        loyalty_card: None,
        phone: None,
        items: vec![LineItem {
            product_id: "sku-30001".into(),
            name: None,
            category: None,
            quantity: 1,
            unit_price: 4.25,
        }],
        total: 4.25,
        currency: "PLN".into(),
    };
    check_contract(
        "offline_receipt.avsc",
        schemas::offline_receipt(),
        &[full, sparse],
    );
}

#[test]
fn catalog_update_matches_its_schema() {
    let full = CatalogUpdate {
        event_id: "cat-0001".into(),
        occurred_at: T0,
        product_id: "sku-10042".into(),
        name: Some("Trail Runner 2".into()),
        category: Some("shoes/running".into()),
        price: Some(79.5),
        in_stock: Some(true),
    };
    let sparse = CatalogUpdate {
        event_id: "cat-0002".into(),
        occurred_at: T0 + 1,
        product_id: "sku-10042".into(),
        name: None,
        category: None,
        price: None,
        in_stock: None,
    };
    check_contract(
        "catalog_update.avsc",
        schemas::catalog_update(),
        &[full, sparse],
    );
}

#[test]
fn product_interest_matches_its_schema() {
    let full = ProductInterest {
        interest_id: "pi-c-1042-sku-10042-1".into(),
        customer_id: "c-1042".into(),
        product_id: "sku-10042".into(),
        kind: InterestKind::wishlisted,
        price_seen: Some(89.5),
        occurred_at: T0,
    };
    let sparse = ProductInterest {
        interest_id: "pi-c-7-sku-20007-1".into(),
        customer_id: "c-7".into(),
        product_id: "sku-20007".into(),
        kind: InterestKind::viewed,
        price_seen: None,
        occurred_at: T0 + 1,
    };
    check_contract(
        "product_interest.avsc",
        schemas::product_interest(),
        &[full, sparse],
    );
}

#[test]
fn product_occasion_matches_its_schema() {
    let full = ProductOccasion {
        occasion_id: "po-cat-0001-c-1042".into(),
        customer_id: "c-1042".into(),
        product_id: "sku-10042".into(),
        product_name: Some("Trail Runner 2".into()),
        kind: ProductOccasionKind::back_in_stock,
        old_price: Some(89.5),
        new_price: Some(79.5),
        cause_event_id: "cat-0001".into(),
        occurred_at: T0,
        lowest_price: Some(74.5),
    };
    let sparse = ProductOccasion {
        occasion_id: "po-cat-0002-c-7".into(),
        customer_id: "c-7".into(),
        product_id: "sku-20007".into(),
        product_name: None,
        kind: ProductOccasionKind::price_drop,
        old_price: None,
        new_price: None,
        cause_event_id: "cat-0002".into(),
        occurred_at: T0 + 1,
        lowest_price: None,
    };
    check_contract(
        "product_occasion.avsc",
        schemas::product_occasion(),
        &[full, sparse],
    );
}

#[test]
fn segment_transition_matches_its_schema() {
    let full = SegmentTransition {
        transition_id: "st-c-1042-7".into(),
        customer_id: "c-1042".into(),
        kind: SegmentKind::lifecycle,
        from_segment: Some("regular".into()),
        to_segment: "dormant".into(),
        reason: "no visit or purchase for 92 days".into(),
        occurred_at: T0,
    };
    let sparse = SegmentTransition {
        transition_id: "st-c-1042-1".into(),
        customer_id: "c-1042".into(),
        kind: SegmentKind::rfm,
        from_segment: None,
        to_segment: "New".into(),
        reason: "first purchase".into(),
        occurred_at: T0 + 1,
    };
    check_contract(
        "segment_transition.avsc",
        schemas::segment_transition(),
        &[full, sparse],
    );
}

#[test]
fn trigger_matches_its_schema() {
    let full = Trigger {
        merged_from: Vec::new(),
        trigger_id: "tr-c-1042-abandoned_cart-1".into(),
        scenario: "abandoned_cart".into(),
        customer_id: "c-1042".into(),
        category: MessageCategory::promo,
        step: 2,
        template: "abandoned_cart_2".into(),
        channels: vec![Channel::push, Channel::email, Channel::sms],
        priority: 70,
        fired_at: T0,
        valid_until: T0 + 86_400_000,
        cause_event_id: Some("0b8f6c1e-8a0e-4d55-9b1e-3f3c2a7d9e01".into()),
        cause_occurred_at: T0 - 3_600_000,
        contacts: Contacts {
            email: Some("ada@example.com".into()),
            phone: Some("+4915112345678".into()),
            push_token: Some("fcm:APA91bH-example".into()),
            messenger_id: Some("tg:123456789".into()),
            time_zone: Some("Europe/Berlin".into()),
            consented_channels: vec![Channel::email, Channel::push, Channel::webhook],
        },
        variables: r#"{"first_name":"Ada","cart_total":191.25}"#.into(),
    };
    let sparse = Trigger {
        merged_from: Vec::new(),
        trigger_id: "tr-c-7-welcome-1".into(),
        scenario: "welcome".into(),
        customer_id: "c-7".into(),
        category: MessageCategory::trigger,
        step: 1,
        template: "welcome_1".into(),
        channels: vec![Channel::email],
        priority: 50,
        fired_at: T0,
        valid_until: T0 + 1,
        cause_event_id: None,
        cause_occurred_at: T0,
        contacts: Contacts::default(),
        variables: "{}".into(),
    };
    check_contract("trigger.avsc", schemas::trigger(), &[full, sparse]);
}

#[test]
fn decision_matches_its_schema() {
    let full = Decision {
        decision_id: "dc-tr-c-1042-abandoned_cart-1".into(),
        trigger_id: "tr-c-1042-abandoned_cart-1".into(),
        customer_id: "c-1042".into(),
        scenario: "abandoned_cart".into(),
        category: MessageCategory::promo,
        outcome: DecisionOutcome::deferred,
        channel: Some(Channel::messenger),
        send_id: Some("send-5f2e".into()),
        rule: "pause_after_key_action".into(),
        reason: "purchase 20 h ago, pause is 48 h".into(),
        decided_at: T0,
        group: Some(ExperimentGroup::treatment),
    };
    let sparse = Decision {
        decision_id: "dc-tr-c-7-welcome-1".into(),
        trigger_id: "tr-c-7-welcome-1".into(),
        customer_id: "c-7".into(),
        scenario: "welcome".into(),
        category: MessageCategory::transactional,
        outcome: DecisionOutcome::held_out,
        channel: None,
        send_id: None,
        rule: "control_group".into(),
        reason: "customer is in the 10% control group".into(),
        decided_at: T0 + 1,
        group: None,
    };
    check_contract("decision.avsc", schemas::decision(), &[full, sparse]);
}

#[test]
fn send_command_matches_its_schema() {
    let full = SendCommand {
        send_id: "send-5f2e".into(),
        trigger_id: "tr-c-1042-abandoned_cart-1".into(),
        customer_id: "c-1042".into(),
        scenario: "abandoned_cart".into(),
        channel: Channel::sms,
        category: MessageCategory::promo,
        template: "abandoned_cart_2".into(),
        address: Some("+4915112345678".into()),
        variables: r#"{"first_name":"Ada","cart_total":191.25}"#.into(),
        created_at: T0,
        valid_until: T0 + 86_400_000,
        cause_occurred_at: T0 - 3_600_000,
        reasons: vec![
            "consent: sms granted".into(),
            "daily cap: 0 of 2 sent".into(),
        ],
    };
    let sparse = SendCommand {
        send_id: "send-0001".into(),
        trigger_id: "tr-c-7-welcome-1".into(),
        customer_id: "c-7".into(),
        scenario: "welcome".into(),
        channel: Channel::in_app,
        category: MessageCategory::trigger,
        template: "welcome_1".into(),
        address: None,
        variables: "{}".into(),
        created_at: T0,
        valid_until: T0 + 1,
        cause_occurred_at: T0,
        reasons: vec![],
    };
    check_contract(
        "send_command.avsc",
        schemas::send_command(),
        &[full, sparse],
    );
}

#[test]
fn outcome_matches_its_schema() {
    let full = Outcome {
        outcome_id: "oc-send-5f2e-bounced_hard".into(),
        send_id: "send-5f2e".into(),
        customer_id: "c-1042".into(),
        scenario: "abandoned_cart".into(),
        channel: Channel::email,
        category: MessageCategory::promo,
        kind: OutcomeKind::bounced_hard,
        reason: Some("550 5.1.1 user unknown".into()),
        occurred_at: T0,
        address: Some("anna@example.com".into()),
    };
    let sparse = Outcome {
        outcome_id: "oc-send-0001-clicked".into(),
        send_id: "send-0001".into(),
        customer_id: "c-7".into(),
        scenario: "welcome".into(),
        channel: Channel::in_app,
        category: MessageCategory::trigger,
        kind: OutcomeKind::clicked,
        reason: None,
        occurred_at: T0 + 1,
        address: None,
    };
    check_contract("outcome.avsc", schemas::outcome(), &[full, sparse]);
}

#[test]
fn dead_letter_matches_its_schema() {
    let full = DeadLetter {
        dead_letter_id: "dl-kairos.events.site-3-1042".into(),
        service: "profile".into(),
        source_topic: "kairos.events.site".into(),
        source_partition: 3,
        source_offset: 1042,
        reason_code: DeadLetterReason::invalid_field,
        reason: "occurred_at: invalid RFC 3339 timestamp \"yesterday\"".into(),
        key_base64: Some("Yy0xMDQy".into()),
        payload_base64: "eyJldmVudF9pZCI6ImUtMSJ9".into(),
        failed_at: T0,
    };
    let sparse = DeadLetter {
        dead_letter_id: "dl-kairos.events.app-0-7".into(),
        service: "profile".into(),
        source_topic: "kairos.events.app".into(),
        source_partition: 0,
        source_offset: 7,
        reason_code: DeadLetterReason::empty_message,
        reason: "the message has no payload".into(),
        key_base64: None,
        payload_base64: String::new(),
        failed_at: T0 + 1,
    };
    check_contract("dead_letter.avsc", schemas::dead_letter(), &[full, sparse]);
}
