//! Message encodings.
//!
//! Input topics accept either
//! - JSON: one object per message (what `kcat -P` sends), or
//! - Avro in the Confluent wire format: magic byte 0, a 4-byte big-endian schema id,
//!   then the Avro binary datum. The writer schema is fetched once per id from the
//!   Confluent-compatible registry at `[schema_registry] url` and resolved against the
//!   Kairos schema (schemas/*.avsc), so producers may evolve compatibly.
//!
//! Internal topics (triggers, decisions, send commands, outcomes, dead letters) carry
//! JSON objects whose fields are exactly the fields of the matching .avsc file.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::Schema;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::contracts::DeadLetterReason;

/// Why a message could not be decoded; becomes a dead letter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason:?}: {message}")]
pub struct Rejection {
    pub reason: DeadLetterReason,
    pub message: String,
}

/// The longest reason a rejection keeps. Reasons quote what was wrong (serde's
/// "invalid type: string ..."), and a field of half a megabyte quoted whole made a
/// dead letter, and its changelog copy, larger than the broker takes: refused and
/// retried for ever, with every later publish of the service waiting behind it.
pub const MAX_REASON_BYTES: usize = 1024;

impl Rejection {
    pub fn new(reason: DeadLetterReason, message: impl Into<String>) -> Self {
        Rejection {
            reason,
            message: cut_reason(message.into()),
        }
    }
}

/// Cuts a dead letter's reason to [`MAX_REASON_BYTES`] on a character boundary, noting
/// how long it was: every dead letter's reason goes through it.
pub fn cut_reason(mut message: String) -> String {
    if message.len() > MAX_REASON_BYTES {
        let whole = message.len();
        let mut cut = MAX_REASON_BYTES;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str(&format!("... ({whole} bytes, cut)"));
    }
    message
}

/// The most schema ids whose refusal a registry keeps (the ids come from message
/// bytes: junk must not grow the map without end).
const REFUSALS_KEPT: usize = 1_024;

/// Confluent wire-format magic byte.
pub const CONFLUENT_MAGIC: u8 = 0;

/// Returns the schema id of a Confluent-framed message.
pub fn confluent_schema_id(payload: &[u8]) -> Option<u32> {
    if payload.len() >= 5 && payload[0] == CONFLUENT_MAGIC {
        Some(u32::from_be_bytes([
            payload[1], payload[2], payload[3], payload[4],
        ]))
    } else {
        None
    }
}

/// Frames an Avro datum in the Confluent wire format.
pub fn confluent_frame(schema_id: u32, datum: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + datum.len());
    v.push(CONFLUENT_MAGIC);
    v.extend_from_slice(&schema_id.to_be_bytes());
    v.extend_from_slice(datum);
    v
}

/// Writer schemas by registry id. Fetching is async; decoding is sync and only reads
/// the cache, so the processing loop never waits on HTTP while holding state.
#[derive(Clone)]
pub struct SchemaRegistry {
    url: Option<String>,
    http: reqwest::Client,
    cache: Arc<RwLock<HashMap<u32, Arc<Schema>>>>,
    /// Why an id has no schema (no registry configured, none under the id, one that
    /// does not parse): what its messages' dead letters say, and whether that is
    /// settled (not asked again).
    refused: Arc<RwLock<HashMap<u32, (Rejection, bool)>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("message uses schema id {0} but no [schema_registry] url is configured")]
    NotConfigured(u32),
    #[error("schema registry request for id {id} failed: {message}")]
    Http { id: u32, message: String },
    #[error("schema registry has no schema with id {0}")]
    NotFound(u32),
    #[error("schema id {id} from the registry does not parse: {message}")]
    BadSchema { id: u32, message: String },
}

impl SchemaRegistry {
    pub fn new(url: Option<String>) -> Self {
        SchemaRegistry {
            url: url.map(|u| u.trim_end_matches('/').to_string()),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            cache: Arc::default(),
            refused: Arc::default(),
        }
    }

    /// Why `id` has no schema, if the registry said (or none is configured).
    fn refusal(&self, id: u32) -> Option<Rejection> {
        Some(self.refused.read().ok()?.get(&id)?.0.clone())
    }

    pub fn cached(&self, id: u32) -> Option<Arc<Schema>> {
        self.cache.read().ok()?.get(&id).cloned()
    }

    /// Makes sure the writer schema of `payload` (if Confluent-framed) is cached.
    /// `GET {url}/schemas/ids/{id}` answers `{"schema": "<schema JSON as a string>"}`.
    pub async fn prefetch(&self, payload: &[u8]) -> Result<(), RegistryError> {
        let Some(id) = confluent_schema_id(payload) else {
            return Ok(());
        };
        if self.cached(id).is_some() {
            return Ok(());
        }
        // Settled: no registry configured, or a schema that does not parse (an id's
        // schema never changes). The dead letter says why.
        let settled = |refused: &HashMap<u32, (Rejection, bool)>| {
            refused.get(&id).is_some_and(|(_, settled)| *settled)
        };
        if self.refused.read().is_ok_and(|r| settled(&r)) {
            return Ok(());
        }
        let fetched = self.fetch(id).await;
        // Kept for the dead letters; an id the registry does not know is asked again
        // (it may be registered meanwhile). Bounded: ids come from message bytes.
        let refusal = match &fetched {
            Err(e @ RegistryError::NotFound(_)) => Some((
                Rejection::new(DeadLetterReason::unknown_schema_id, e.to_string()),
                false,
            )),
            Err(e @ RegistryError::NotConfigured(_)) => Some((
                Rejection::new(DeadLetterReason::unknown_schema_id, e.to_string()),
                true,
            )),
            Err(e @ RegistryError::BadSchema { .. }) => Some((
                Rejection::new(DeadLetterReason::bad_avro, e.to_string()),
                true,
            )),
            Err(RegistryError::Http { .. }) | Ok(()) => None,
        };
        if let (Some(refusal), Ok(mut refused)) = (refusal, self.refused.write()) {
            if refused.len() >= REFUSALS_KEPT {
                refused.clear();
            }
            refused.insert(id, refusal);
        }
        fetched
    }

    async fn fetch(&self, id: u32) -> Result<(), RegistryError> {
        let url = self.url.as_ref().ok_or(RegistryError::NotConfigured(id))?;
        let resp = self
            .http
            .get(format!("{url}/schemas/ids/{id}"))
            .header("Accept", "application/vnd.schemaregistry.v1+json")
            .send()
            .await
            .map_err(|e| RegistryError::Http {
                id,
                message: e.to_string(),
            })?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(RegistryError::NotFound(id));
        }
        if !resp.status().is_success() {
            return Err(RegistryError::Http {
                id,
                message: format!("status {}", resp.status()),
            });
        }
        #[derive(serde::Deserialize)]
        struct SchemaResponse {
            schema: String,
        }
        let body: SchemaResponse = resp.json().await.map_err(|e| RegistryError::Http {
            id,
            message: e.to_string(),
        })?;
        let schema = Schema::parse_str(&body.schema).map_err(|e| RegistryError::BadSchema {
            id,
            message: e.to_string(),
        })?;
        if let Ok(mut cache) = self.cache.write() {
            cache.insert(id, Arc::new(schema));
        }
        Ok(())
    }
}

/// Decodes an input message (JSON or Confluent Avro) into `T`.
///
/// `reader` is the Kairos schema of `T`; `registry` must already hold the writer
/// schema (see [`SchemaRegistry::prefetch`]).
pub fn decode_input<T: DeserializeOwned>(
    payload: &[u8],
    reader: &Schema,
    registry: &SchemaRegistry,
) -> Result<T, Rejection> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        None => Err(Rejection::new(
            DeadLetterReason::empty_message,
            "empty message",
        )),
        Some(&CONFLUENT_MAGIC) if payload[0] == CONFLUENT_MAGIC => {
            decode_confluent_avro(payload, reader, registry)
        }
        Some(_) => decode_json(payload),
    }
}

/// Parses a JSON object into `T`, classifying failures for the dead-letter topic.
pub fn decode_json<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Rejection> {
    // The fast path parses straight into `T` with a SIMD parser; only failures pay
    // for a second look, by serde_json, whose errors name the field.
    if let Ok(v) = sonic_rs::from_slice::<T>(payload) {
        return Ok(v);
    }
    let value: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| Rejection::new(DeadLetterReason::not_json, format!("not JSON: {e}")))?;
    if !value.is_object() {
        return Err(Rejection::new(
            DeadLetterReason::not_json,
            "expected a JSON object",
        ));
    }
    // From the bytes, not from `value`: a map keeps the last of two equal keys, and
    // `{"total": 10, "total": 10000}` must be refused, not read as 10000.
    serde_json::from_slice(payload).map_err(|e| classify_serde_error(&e.to_string()))
}

fn classify_serde_error(message: &str) -> Rejection {
    let reason = if message.starts_with("missing field") {
        DeadLetterReason::missing_field
    } else if message.starts_with("unknown variant") && message.contains("page_view") {
        // Only the event-type enum lists page_view among its symbols.
        DeadLetterReason::unknown_event_type
    } else {
        DeadLetterReason::invalid_field
    };
    Rejection::new(reason, message.to_string())
}

/// The most bytes, or items of an array or map, an Avro datum may announce. A record
/// is at most the broker's limit of about a megabyte, and each item takes a byte at
/// least; apache-avro's default (512 MiB) would let 30 bytes announcing 500 million
/// items reserve tens of gigabytes and abort the process, again at every restart.
pub const MAX_AVRO_ALLOCATION: usize = 1 << 20;

fn decode_confluent_avro<T: DeserializeOwned>(
    payload: &[u8],
    reader: &Schema,
    registry: &SchemaRegistry,
) -> Result<T, Rejection> {
    // Set once, before the first datum is read (a later call changes nothing).
    apache_avro::max_allocation_bytes(MAX_AVRO_ALLOCATION);
    let id = confluent_schema_id(payload).ok_or_else(|| {
        Rejection::new(
            DeadLetterReason::bad_avro,
            "Confluent frame shorter than 5 bytes",
        )
    })?;
    let writer = registry.cached(id).ok_or_else(|| {
        registry.refusal(id).unwrap_or_else(|| {
            Rejection::new(
                DeadLetterReason::unknown_schema_id,
                format!("schema id {id} is not known to the schema registry"),
            )
        })
    })?;
    let mut datum = &payload[5..];
    let value = apache_avro::from_avro_datum(&writer, &mut datum, Some(reader)).map_err(|e| {
        if let Some(symbol) = unknown_event_type(&writer, reader, &payload[5..]) {
            return Rejection::new(
                DeadLetterReason::unknown_event_type,
                format!("event_type {symbol:?} is not a known EventType symbol (schema id {id})"),
            );
        }
        // Say whether the producer's schema is the cause (checked only on failure).
        let schema = match crate::schemas::check_readable(&writer, reader) {
            Ok(()) => String::new(),
            Err(why) => format!("; Kairos cannot read schema id {id}: {why}"),
        };
        Rejection::new(
            DeadLetterReason::bad_avro,
            format!("Avro datum (schema id {id}) does not decode: {e}{schema}"),
        )
    })?;
    // A datum read with the wrong schema can end early and still decode: what is left
    // over says the frame's schema id is not the one it was written with.
    if !datum.is_empty() {
        return Err(Rejection::new(
            DeadLetterReason::bad_avro,
            format!(
                "Avro datum (schema id {id}) has {} bytes left over after it: not written \
                 with that schema",
                datum.len()
            ),
        ));
    }
    apache_avro::from_value::<T>(&value).map_err(|e| {
        Rejection::new(
            DeadLetterReason::bad_avro,
            format!("Avro datum (schema id {id}) does not fit the Kairos type: {e}"),
        )
    })
}

/// The `event_type` of a datum that failed to decode, when that is the reason: read
/// with the producer's schema alone, it is a symbol (or string) the reader's
/// `EventType` does not list. The same reason a JSON event with that type gets.
fn unknown_event_type(writer: &Schema, reader: &Schema, mut datum: &[u8]) -> Option<String> {
    use apache_avro::schema::{EnumSchema, RecordSchema};
    use apache_avro::types::Value;
    let Schema::Record(RecordSchema { fields, .. }) = reader else {
        return None;
    };
    let field = fields.iter().find(|f| f.name == "event_type")?;
    let Schema::Enum(EnumSchema { symbols, .. }) = &field.schema else {
        return None;
    };
    let Ok(Value::Record(values)) = apache_avro::from_avro_datum(writer, &mut datum, None) else {
        return None;
    };
    let symbol = match values.into_iter().find(|(name, _)| name == "event_type")?.1 {
        Value::Enum(_, s) | Value::String(s) => s,
        _ => return None,
    };
    (!symbols.contains(&symbol)).then_some(symbol)
}

/// Encodes an internal-topic value as JSON.
pub fn encode_internal<T: Serialize>(value: &T) -> Vec<u8> {
    // sonic-rs writes the same compact JSON as serde_json (its serializer is a fork of
    // it), escaping strings with SIMD: the embedded template variables of every trigger
    // and send command made serde_json's byte-wise escaping a twentieth of the arbiter.
    // Serializing our own plain data types to JSON cannot fail (no maps with non-string
    // keys, no failing Serialize impls).
    with_scratch(|buf| sonic_rs::to_writer(buf, value)).unwrap_or_default()
}

thread_local! {
    /// A reusable encoding buffer: values of a few KiB would otherwise grow a fresh
    /// buffer several times each (every grow copies).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(8192));
}

/// Runs `encode` into the thread's scratch buffer and returns an exact-size copy (a
/// fresh buffer if the scratch one is in use further up the stack).
fn with_scratch<E>(encode: impl FnOnce(&mut Vec<u8>) -> Result<(), E>) -> Result<Vec<u8>, E> {
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            encode(&mut buf)?;
            let out = buf.to_vec();
            // Do not keep an outsized buffer after a rare huge value.
            if buf.capacity() > 1 << 20 {
                *buf = Vec::with_capacity(8192);
            }
            Ok(out)
        }
        Err(_) => {
            let mut buf = Vec::with_capacity(256);
            encode(&mut buf)?;
            Ok(buf)
        }
    })
}

/// Decodes an internal-topic JSON value.
pub fn decode_internal<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Rejection> {
    decode_json(payload)
}

/// First byte of a state value in MessagePack: 0xC1 is the one byte MessagePack never
/// uses and no JSON text starts with, so a value written as JSON by earlier versions
/// (an object, but also a bare `true` or timestamp) is never mistaken for it.
const STATE_MSGPACK: u8 = 0xC1;

/// Encodes a state value or timer payload: a marker byte, then MessagePack with structs
/// as arrays of their fields, without field names. Names were nearly half of a
/// profile's bytes, written again at every commit (dropping them halved the profile
/// store and made the 1M-event replay about 5% faster). The price is the rule of
/// positional formats: a field may only be appended at the end of a stored struct,
/// with `#[serde(default)]` (on the field or the struct), never removed or reordered.
/// Values written with names by earlier versions still read (a struct reads from a
/// map as well as from an array), as does JSON from before MessagePack.
pub fn encode_state<T: Serialize>(value: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    with_scratch(|buf| encode_state_into(buf, value))
}

/// [`encode_state`], appended to `buf`.
pub fn encode_state_into<T: Serialize>(
    buf: &mut Vec<u8>,
    value: &T,
) -> Result<(), rmp_serde::encode::Error> {
    buf.push(STATE_MSGPACK);
    rmp_serde::encode::write(buf, value)
}

/// Decodes a state value or timer payload written by [`encode_state`], or as JSON by
/// Kairos versions before it.
pub fn decode_state<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateDecodeError> {
    match bytes.split_first() {
        Some((&STATE_MSGPACK, msgpack)) => {
            rmp_serde::from_slice(msgpack).map_err(|e| StateDecodeError(e.to_string()))
        }
        _ => serde_json::from_slice(bytes).map_err(|e| StateDecodeError(e.to_string())),
    }
}

/// A state value that is neither MessagePack nor JSON of the expected type.
#[derive(Debug, thiserror::Error)]
#[error("state value does not decode: {0}")]
pub struct StateDecodeError(String);

/// Encodes `value` as a Confluent-framed Avro datum of `schema` (used by producers,
/// the generator's Avro mode and the tests).
pub fn encode_confluent_avro<T: Serialize>(
    value: &T,
    schema: &Schema,
    schema_id: u32,
) -> Result<Vec<u8>, Box<apache_avro::Error>> {
    let v = apache_avro::to_value(value)?.resolve(schema)?;
    let datum = apache_avro::to_avro_datum(schema, v)?;
    Ok(confluent_frame(schema_id, &datum))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contracts::{CustomerEvent, EventType};
    use crate::schemas;
    use serde::Deserialize;

    /// An Avro message read without a registry configured says so in its dead
    /// letter, instead of blaming the registry for not knowing its id.
    #[test]
    fn an_avro_message_without_a_registry_configured_is_dead_lettered_saying_so() {
        let registry = SchemaRegistry::new(None);
        let payload = confluent_frame(7, b"\x02");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let fetched = runtime.block_on(registry.prefetch(&payload));
        // Settled: the next message of the id does not ask again.
        assert!(runtime.block_on(registry.prefetch(&payload)).is_ok());
        assert!(
            matches!(fetched, Err(RegistryError::NotConfigured(7))),
            "{fetched:?}"
        );
        let refused = decode_input::<CustomerEvent>(&payload, schemas::customer_event(), &registry)
            .unwrap_err();
        assert_eq!(refused.reason, DeadLetterReason::unknown_schema_id);
        assert!(
            refused
                .message
                .contains("no [schema_registry] url is configured"),
            "{}",
            refused.message
        );
    }

    #[test]
    fn internal_records_are_the_json_serde_json_writes() {
        // Consumers and stored outputs (and the replay's output files) must not change
        // when the serializer does: escapes, non-ASCII text, floats and non-finite
        // numbers come out byte for byte as serde_json writes them.
        let text =
            "quote \" backslash \\ tab \t nul \u{0} bell \u{7} del \u{7f} \u{2028} é 日本 🎉";
        let floats = [
            0.1,
            -0.0,
            1.0,
            35.39,
            119.8,
            1e21,
            1e-7,
            123_456_789.125,
            f64::MAX,
            5e-324,
            f64::NAN,
            f64::INFINITY,
        ];
        let value = serde_json::json!({
            "text": text,
            "floats": floats,
            "ints": [0, -1, i64::MIN, u64::MAX],
            "nested": {"b": [true, null, {"c": text}], "a": ""},
        });
        let trigger = crate::contracts::Trigger {
            trigger_id: "t-1".into(),
            scenario: "welcome".into(),
            customer_id: text.into(),
            category: crate::contracts::MessageCategory::trigger,
            step: 2,
            template: "welcome_2".into(),
            channels: vec![crate::contracts::Channel::email],
            priority: -5,
            fired_at: 1_767_225_600_000,
            valid_until: i64::MAX,
            cause_event_id: None,
            cause_occurred_at: -1,
            contacts: Default::default(),
            variables: value.to_string(),
            merged_from: vec![text.into()],
        };
        assert_eq!(
            String::from_utf8(encode_internal(&value)).unwrap(),
            serde_json::to_string(&value).unwrap()
        );
        let floats_only: Vec<u8> = encode_internal(&floats);
        assert_eq!(floats_only, serde_json::to_vec(&floats).unwrap());
        assert_eq!(
            String::from_utf8(encode_internal(&trigger)).unwrap(),
            serde_json::to_string(&trigger).unwrap()
        );
    }

    /// The borrowed decision and send command write the bytes of the owned ones, with
    /// and without their optional fields, so a field added to one and not the other
    /// fails here.
    #[test]
    fn borrowed_outputs_write_the_bytes_of_the_owned_ones() {
        use crate::contracts::{
            Channel, Decision, DecisionOutcome, DecisionRef, ExperimentGroup, MessageCategory,
            SendCommand, SendCommandRef,
        };
        let text = "quote \" é \u{2028} 🎉";
        for present in [false, true] {
            let decision = Decision {
                decision_id: "d-1".into(),
                trigger_id: "t-1".into(),
                customer_id: text.into(),
                scenario: "welcome".into(),
                category: MessageCategory::promo,
                outcome: DecisionOutcome::sent,
                channel: present.then_some(Channel::sms),
                send_id: present.then(|| "s-1".to_string()),
                rule: "channel_choice".into(),
                reason: text.into(),
                decided_at: -3,
                group: present.then_some(ExperimentGroup::control),
            };
            let borrowed = DecisionRef {
                decision_id: &decision.decision_id,
                trigger_id: &decision.trigger_id,
                customer_id: &decision.customer_id,
                scenario: &decision.scenario,
                category: decision.category,
                outcome: decision.outcome,
                channel: decision.channel,
                send_id: decision.send_id.as_deref(),
                rule: &decision.rule,
                reason: &decision.reason,
                decided_at: decision.decided_at,
                group: decision.group,
            };
            assert_eq!(encode_internal(&borrowed), encode_internal(&decision));
            let send = SendCommand {
                send_id: "s-1".into(),
                trigger_id: "t-1".into(),
                customer_id: "c-1".into(),
                scenario: "welcome".into(),
                channel: Channel::push,
                category: MessageCategory::trigger,
                template: "welcome_1".into(),
                address: present.then(|| text.to_string()),
                variables: r#"{"first_name":"Ann\"a"}"#.into(),
                created_at: 1,
                valid_until: i64::MAX,
                cause_occurred_at: 0,
                reasons: vec![text.into()],
            };
            let reasons: Vec<&str> = send.reasons.iter().map(String::as_str).collect();
            let borrowed = SendCommandRef {
                send_id: &send.send_id,
                trigger_id: &send.trigger_id,
                customer_id: &send.customer_id,
                scenario: &send.scenario,
                channel: send.channel,
                category: send.category,
                template: &send.template,
                address: send.address.as_deref(),
                variables: &send.variables,
                created_at: send.created_at,
                valid_until: send.valid_until,
                cause_occurred_at: send.cause_occurred_at,
                reasons: &reasons,
            };
            assert_eq!(encode_internal(&borrowed), encode_internal(&send));
        }
    }

    #[test]
    fn json_errors_are_classified() {
        let r = decode_json::<CustomerEvent>(b"not json").unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::not_json);
        let r = decode_json::<CustomerEvent>(
            br#"{"event_id":"1","event_type":"teleport","occurred_at":1764950000000}"#,
        )
        .unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::unknown_event_type);
        let r = decode_json::<CustomerEvent>(
            br#"{"event_type":"page_view","occurred_at":1764950000000}"#,
        )
        .unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::missing_field);
        assert!(r.message.contains("event_id"), "{}", r.message);
        // Two values for one field: which is meant is unknown, so neither is taken.
        for twice in [
            r#"{"event_id":"1","event_type":"purchase","occurred_at":1764950000000,"customer_id":"c1","order":{"order_id":"o1","total":10.0,"total":10000.0}}"#,
            r#"{"event_id":"1","event_type":"page_view","event_type":"purchase","occurred_at":1764950000000,"customer_id":"c1"}"#,
        ] {
            let r = decode_json::<CustomerEvent>(twice.as_bytes()).unwrap_err();
            assert_eq!(r.reason, DeadLetterReason::invalid_field, "{twice}");
            assert!(r.message.contains("duplicate field"), "{}", r.message);
        }
    }

    #[test]
    fn state_values_round_trip_as_messagepack_and_old_json_still_reads() {
        #[derive(Debug, PartialEq, Serialize, Deserialize, Default)]
        #[serde(default)]
        struct Old {
            id: String,
            count: u32,
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize, Default)]
        #[serde(default)]
        struct New {
            id: String,
            count: u32,
            channels: std::collections::BTreeMap<crate::contracts::Channel, bool>,
            amount: Option<f64>,
        }
        let old = Old {
            id: "c-1".into(),
            count: 3,
        };
        let bytes = encode_state(&old).unwrap();
        assert_eq!(bytes.first(), Some(&0xC1), "marked as MessagePack");
        assert!(bytes.len() < serde_json::to_vec(&old).unwrap().len());
        // A field appended since reads as its default.
        let new: New = decode_state(&bytes).unwrap();
        assert_eq!((new.id.as_str(), new.count, new.amount), ("c-1", 3, None));
        let mut new = new;
        new.channels.insert(crate::contracts::Channel::sms, true);
        new.amount = Some(12.25);
        assert_eq!(
            decode_state::<New>(&encode_state(&new).unwrap()).unwrap(),
            new
        );
        // State written as JSON by earlier versions: objects and bare values alike.
        let json = br#"{"id":"c-2","count":7,"channels":{"email":false}}"#;
        let back: New = decode_state(json).unwrap();
        assert_eq!(back.count, 7);
        assert_eq!(
            back.channels.get(&crate::contracts::Channel::email),
            Some(&false)
        );
        assert!(decode_state::<bool>(b"true").unwrap());
        assert_eq!(
            decode_state::<i64>(b"1767225916248").unwrap(),
            1_767_225_916_248
        );
        assert_eq!(decode_state::<i64>(b"7").unwrap(), 7);
        // Bare values in the new format, including the bytes JSON would start with.
        for n in [7u64, 49, 123, 1_767_225_916_248] {
            assert_eq!(decode_state::<u64>(&encode_state(&n).unwrap()).unwrap(), n);
        }
        assert!(decode_state::<bool>(&encode_state(&true).unwrap()).unwrap());
        // Written with field names by the version before this one.
        let mut named = vec![STATE_MSGPACK];
        rmp_serde::encode::write_named(&mut named, &new).unwrap();
        assert!(named.len() > encode_state(&new).unwrap().len());
        assert_eq!(decode_state::<New>(&named).unwrap(), new);
        assert!(decode_state::<New>(b"\xc1 not state").is_err());
        assert!(decode_state::<New>(b"not state either").is_err());
    }

    #[test]
    fn confluent_avro_round_trip_through_registry_cache() {
        let registry = SchemaRegistry::new(None);
        let schema = schemas::customer_event().clone();
        registry
            .cache
            .write()
            .unwrap()
            .insert(7, Arc::new(schema.clone()));
        let event: CustomerEvent = decode_json(
            br#"{"event_id":"e1","event_type":"add_to_cart","occurred_at":1764950000000,"customer_id":"c1"}"#,
        )
        .unwrap();
        let bytes = encode_confluent_avro(&event, &schema, 7).unwrap();
        assert_eq!(confluent_schema_id(&bytes), Some(7));
        let back: CustomerEvent = decode_input(&bytes, &schema, &registry).unwrap();
        assert_eq!(back, event);
        assert_eq!(back.event_type, EventType::add_to_cart);
        let unknown = confluent_frame(8, &bytes[5..]);
        let r = decode_input::<CustomerEvent>(&unknown, &schema, &registry).unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::unknown_schema_id);
        // Bytes after the datum: not a datum of that schema.
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[2, 4, 6]);
        let r = decode_input::<CustomerEvent>(&longer, &schema, &registry).unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::bad_avro);
        assert!(r.message.contains("3 bytes left over"), "{}", r.message);
    }

    #[test]
    fn an_avro_event_of_an_unknown_type_is_dead_lettered_as_such() {
        let registry = SchemaRegistry::new(None);
        // The producer's schema has a symbol Kairos does not know.
        let mut contract: serde_json::Value =
            serde_json::from_str(schemas::CUSTOMER_EVENT).unwrap();
        let symbols = contract["fields"][1]["type"]["symbols"]
            .as_array_mut()
            .unwrap();
        symbols.push("video_view".into());
        let writer = Schema::parse_str(&contract.to_string()).unwrap();
        registry
            .cache
            .write()
            .unwrap()
            .insert(10, Arc::new(writer.clone()));
        let event: CustomerEvent = decode_json(
            br#"{"event_id":"e1","event_type":"page_view","occurred_at":1764950000000,"customer_id":"c1"}"#,
        )
        .unwrap();
        let frame = |event_type: &str| {
            let mut value = apache_avro::to_value(&event).unwrap();
            if let apache_avro::types::Value::Record(fields) = &mut value {
                fields[1].1 = apache_avro::types::Value::String(event_type.into());
            }
            let value = value.resolve(&writer).unwrap();
            confluent_frame(10, &apache_avro::to_avro_datum(&writer, value).unwrap())
        };
        let known = decode_input::<CustomerEvent>(
            &frame("page_view"),
            schemas::customer_event(),
            &registry,
        )
        .expect("a known type reads through the evolved schema");
        assert_eq!(known.event_type, EventType::page_view);
        let r = decode_input::<CustomerEvent>(
            &frame("video_view"),
            schemas::customer_event(),
            &registry,
        )
        .unwrap_err();
        assert_eq!(
            r.reason,
            DeadLetterReason::unknown_event_type,
            "{}",
            r.message
        );
        assert!(r.message.contains("\"video_view\""), "{}", r.message);
    }

    /// A datum announcing more items than a record can hold is refused before anything
    /// is reserved for them (before, 500 million items reserved some 25 GB and aborted
    /// the process).
    #[test]
    fn an_avro_datum_announcing_millions_of_items_is_refused_not_reserved() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Basket {
            items: Vec<String>,
        }
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"Basket","namespace":"io.kairos",
                "fields":[{"name":"items","type":{"type":"array","items":"string"}}]}"#,
        )
        .unwrap();
        let registry = SchemaRegistry::new(None);
        registry
            .cache
            .write()
            .unwrap()
            .insert(11, Arc::new(schema.clone()));
        // A block of 500,000,000 items: the zigzag varint of 1,000,000,000.
        let mut count = 1_000_000_000u64;
        let mut datum = Vec::new();
        while count >= 0x80 {
            datum.push((count as u8 & 0x7f) | 0x80);
            count >>= 7;
        }
        datum.push(count as u8);
        let r =
            decode_input::<Basket>(&confluent_frame(11, &datum), &schema, &registry).unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::bad_avro);
        assert!(
            r.message
                .contains(&format!("maximum allowed: {MAX_AVRO_ALLOCATION}")),
            "{}",
            r.message
        );
    }

    #[test]
    fn a_datum_of_a_schema_kairos_cannot_read_says_which_field() {
        let registry = SchemaRegistry::new(None);
        // A producer's schema without the event id (and type) Kairos requires.
        let writer = Schema::parse_str(
            r#"{"type":"record","name":"CustomerEvent","namespace":"io.kairos",
                "fields":[{"name":"occurred_at","type":"long"}]}"#,
        )
        .unwrap();
        registry
            .cache
            .write()
            .unwrap()
            .insert(9, Arc::new(writer.clone()));
        let datum = apache_avro::to_avro_datum(
            &writer,
            apache_avro::types::Value::Record(vec![(
                "occurred_at".into(),
                apache_avro::types::Value::Long(5),
            )]),
        )
        .unwrap();
        let r = decode_input::<CustomerEvent>(
            &confluent_frame(9, &datum),
            schemas::customer_event(),
            &registry,
        )
        .unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::bad_avro);
        assert!(
            r.message.contains("Kairos cannot read schema id 9")
                && r.message.contains("'event_id'"),
            "{}",
            r.message
        );
    }
}
