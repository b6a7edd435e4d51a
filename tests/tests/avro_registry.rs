//! Avro input in the Confluent wire format, resolved through a schema registry.
//!
//! No real registry runs on these machines, so the test serves the registry's
//! documented endpoint (`GET /schemas/ids/{id}` -> `{"schema": "..."}`) itself.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::Duration;

use kairos_core::contracts::{ConsentChange, CustomerEvent, EventType, Product};
use kairos_core::encoding::encode_confluent_avro;
use kairos_core::schemas;
use kairos_tests::{now_millis, Options, Pipeline};

/// A producer's schema Kairos cannot read: it has no event id (or type).
const NO_EVENT_ID: &str = r#"{"type":"record","name":"CustomerEvent","namespace":"io.kairos",
  "fields":[{"name":"occurred_at","type":"long"},{"name":"customer_id","type":"string"}]}"#;

/// Serves schema id 7 as the Kairos customer-event schema and id 8 as
/// [`NO_EVENT_ID`]; every other id is 404.
fn start_registry() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut line = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                    break;
                }
            }
            let (status, body) = if line.starts_with("GET /schemas/ids/7 ") {
                (
                    "200 OK",
                    serde_json::json!({"schema": schemas::CUSTOMER_EVENT}).to_string(),
                )
            } else if line.starts_with("GET /schemas/ids/8 ") {
                (
                    "200 OK",
                    serde_json::json!({"schema": NO_EVENT_ID}).to_string(),
                )
            } else {
                (
                    "404 Not Found",
                    r#"{"error_code":40403,"message":"Schema not found"}"#.to_string(),
                )
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}")
}

fn event(id: &str, t: EventType, customer: &str, at: i64) -> CustomerEvent {
    CustomerEvent {
        event_id: id.into(),
        event_type: t,
        occurred_at: at,
        platform: None,
        customer_id: Some(customer.into()),
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
    }
}

#[test]
fn confluent_avro_events_are_decoded_through_the_registry() {
    let url = start_registry();
    let p = Pipeline::start(Options {
        env: vec![("KAIROS__SCHEMA_REGISTRY__URL".into(), url)],
        ..Options::default()
    });
    let schema = schemas::customer_event();
    let t = now_millis();
    let mut reg = event("avro-reg", EventType::registration, "c-avro", t);
    reg.email = Some("c-avro@example.com".into());
    reg.consent = Some(ConsentChange {
        channel: kairos_core::contracts::Channel::email,
        granted: true,
    });
    let mut cart = event("avro-cart", EventType::add_to_cart, "c-avro", t + 1);
    cart.product = Some(Product {
        product_id: "p7".into(),
        name: Some("Blue bag".into()),
        category: None,
        price: Some(20.0),
    });
    let reg_bytes = encode_confluent_avro(&reg, schema, 7).unwrap();
    let cart_bytes = encode_confluent_avro(&cart, schema, 7).unwrap();
    // Schema id 9 is unknown to the registry: a dead letter, not a stall.
    let unknown = kairos_core::encoding::confluent_frame(9, &cart_bytes[5..]);
    // Schema id 8 is known but lacks the event id: a dead letter that says so.
    let no_id_schema = apache_avro::Schema::parse_str(NO_EVENT_ID).unwrap();
    let no_id = apache_avro::to_avro_datum(
        &no_id_schema,
        apache_avro::types::Value::Record(vec![
            ("occurred_at".into(), apache_avro::types::Value::Long(t)),
            (
                "customer_id".into(),
                apache_avro::types::Value::String("c-avro".into()),
            ),
        ]),
    )
    .unwrap();
    p.produce(
        "events.app",
        &[
            ("c-avro", reg_bytes),
            ("c-avro", unknown),
            ("c-avro", kairos_core::encoding::confluent_frame(8, &no_id)),
            ("c-avro", cart_bytes),
        ],
    );
    let sends = p.read_json_until("send.email", Duration::from_secs(60), |v| {
        v.iter().any(|s| s["customer_id"] == "c-avro")
    });
    let send = sends
        .iter()
        .find(|s| s["customer_id"] == "c-avro")
        .expect("a send");
    assert_eq!(send["address"], "c-avro@example.com");
    let letters = p.read_json_until("deadletter", Duration::from_secs(10), |v| v.len() >= 2);
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(letters[0]["reason_code"], "unknown_schema_id");
    assert_eq!(letters[1]["reason_code"], "bad_avro");
    let reason = letters[1]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("Kairos cannot read schema id 8") && reason.contains("'event_id'"),
        "{reason}"
    );
}

/// `kairos --config config/kairos.toml schemas <args>`, run from the repository root.
fn kairos_schemas(args: &[&str]) -> std::process::Output {
    std::process::Command::new(kairos_tests::kairos_bin())
        .current_dir(kairos_tests::repo_root())
        .args(["--config", "config/kairos.toml", "schemas"])
        .args(args)
        .output()
        .expect("run kairos schemas")
}

/// `kairos schemas check`, as a producer runs it before registering a schema: a
/// schema that evolved compatibly passes, one Kairos cannot read fails with the
/// field, and a broken file or a topic that is not an input is a usage error.
#[test]
fn producers_check_their_schema_against_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let mut contract: serde_json::Value = serde_json::from_str(schemas::CUSTOMER_EVENT).unwrap();
    let fields = contract["fields"].as_array_mut().unwrap();
    fields.push(serde_json::json!({"name": "ab_bucket", "type": "string"}));
    let evolved = dir.path().join("evolved.avsc");
    std::fs::write(&evolved, contract.to_string()).unwrap();
    let broken = dir.path().join("broken.avsc");
    std::fs::write(
        &broken,
        "{\"type\": \"record\",\n \"name\": \"X\", fields: []}",
    )
    .unwrap();
    let no_id = dir.path().join("no_id.avsc");
    std::fs::write(&no_id, NO_EVENT_ID).unwrap();
    let check = |topic: &str, file: &std::path::Path| {
        let out = kairos_schemas(&["check", topic, &file.display().to_string()]);
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };

    let (code, stdout, _) = check("kairos.events.site", &evolved);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("compatible:"), "{stdout}");

    let (code, _, stderr) = check("events.app", &no_id);
    assert_eq!(code, Some(1));
    assert!(
        stderr.starts_with("incompatible:") && stderr.contains("'event_id'"),
        "{stderr}"
    );

    let (code, _, stderr) = check("events.site", &broken);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("broken.avsc:2:15: not JSON"), "{stderr}");

    let (code, _, stderr) = check("kairos.triggers", &evolved);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("kairos.events.offline"), "{stderr}");

    let shown = kairos_schemas(&["show", "events.offline"]);
    assert!(shown.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["name"], "OfflineReceipt");
}
