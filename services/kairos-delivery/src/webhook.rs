//! Provider webhooks: delivery reports and engagement (delivered, bounced, opened,
//! clicked, unsubscribed, complained) arrive on the worker's admin port as
//! `POST /webhooks/events`, one JSON event or an array of them:
//!
//! ```json
//! {"send_id": "...", "customer_id": "...", "scenario": "abandoned_cart",
//!  "channel": "email", "category": "trigger", "event": "opened",
//!  "occurred_at": 1767603600000}
//! ```
//!
//! A `bounced_hard` event may name the dead `address`.
//!
//! The send id, customer, scenario and category travel to the provider with the send
//! (custom arguments / metadata) and come back with its events. Each event becomes an
//! outcome on the outcomes topic, keyed by customer, with the id `hash(send id, kind)`:
//! a provider repeating a webhook yields the same outcome id, which every consumer
//! deduplicates. The answer is 202 only once the broker has the outcomes, so a provider
//! retries what did not make it. An event the worker cannot take goes to the
//! dead-letter topic with its bytes and the reason, and the answer lists it (`{"accepted":
//! n, "rejected": [{"event": i, "reason": ...}]}`); the others count. Still 202 when none
//! could be taken (a provider retries any other answer, and a rejected event stays
//! rejected: it is kept, for a re-drive once fixed), 400 for a body that is no event at all, 413 for one of more than
//! [`MAX_EVENTS_PER_REQUEST`] events (dead-lettered whole, in parts if it is too large
//! for one letter) or of more than [`MAX_BODY_BYTES`] (not kept). Requests are handled
//! a few at a time, the token checked before a request waits for its turn and the body
//! read under it, so memory stays bounded (see `one_turn`: 503 after 10 s waiting for
//! a turn, 408 for a body that takes longer than that to come).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use kairos_core::admin::AdminState;
use kairos_core::config::{topics, Config};
use kairos_core::contracts::{
    Channel, DeadLetter, DeadLetterReason, MessageCategory, Outcome, OutcomeKind,
};
use kairos_core::encoding::encode_internal;
use kairos_core::identifiers::{IdentifierKind, Normalizer};
use kairos_core::ids::deterministic_id;
use kairos_core::metrics;
use kairos_core::runtime::DEAD_LETTER_WHOLE_PAYLOAD;
use kairos_core::time::{wall_now, Millis};
use prometheus::IntCounterVec;
use rdkafka::producer::FutureProducer;
use serde::Deserialize;

/// What providers report through the webhook: never "sent", "failed" or "deferred",
/// which only the worker itself knows (a provider's deferral, reported in any order
/// and with no end the worker sees, would hold a cascade to its valid-until).
pub const WEBHOOK_KINDS: [OutcomeKind; 7] = [
    OutcomeKind::delivered,
    OutcomeKind::bounced_hard,
    OutcomeKind::bounced_soft,
    OutcomeKind::opened,
    OutcomeKind::clicked,
    OutcomeKind::unsubscribed,
    OutcomeKind::complained,
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderEvent {
    pub send_id: String,
    pub customer_id: String,
    pub scenario: String,
    pub channel: Channel,
    pub category: MessageCategory,
    pub event: OutcomeKind,
    #[serde(default)]
    pub occurred_at: Option<Millis>,
    #[serde(default)]
    pub reason: Option<String>,
    /// The address the message went to, as the provider reports it (a hard bounce's
    /// dead address: the worker stops what waits for it at once).
    #[serde(default)]
    pub address: Option<String>,
}

struct WebhookState {
    channel: Channel,
    /// The worker's name, for its dead letters.
    service: String,
    token: Option<String>,
    producer: FutureProducer,
    outcomes_topic: String,
    dead_letter_topic: String,
    received: IntCounterVec,
    /// The process's dead letters by reason (the runtime counts its own there too).
    dead_letters: IntCounterVec,
    /// Puts a reported address in the form Kairos keeps addresses in.
    normalizer: Normalizer,
    /// Turns to handle a request ([`CONCURRENT_REQUESTS`]).
    turns: tokio::sync::Semaphore,
}

/// The webhook route for the worker of `channel`.
pub fn router(config: &Config, channel: Channel, admin: &AdminState) -> anyhow::Result<Router> {
    let received = metrics::counter_vec(
        &admin.registry,
        "kairos_webhook_events_total",
        "Provider webhook events, by channel, event and result: accepted, or rejected (dead-lettered; event \"unparsed\" when it names none); a request whose records the broker did not take counts once as event \"any\", result \"failed\"; a body over the size limit (not kept) as event \"unparsed\", result \"too_large\".",
        &["channel", "event", "result"],
    );
    for kind in WEBHOOK_KINDS {
        for result in ["accepted", "rejected"] {
            received.with_label_values(&[channel.as_str(), kind.as_str(), result]);
        }
    }
    received.with_label_values(&[channel.as_str(), "unparsed", "rejected"]);
    received.with_label_values(&[channel.as_str(), "any", "failed"]);
    received.with_label_values(&[channel.as_str(), "unparsed", "too_large"]);
    let state = Arc::new(WebhookState {
        channel,
        token: config
            .delivery
            .get(&channel)
            .and_then(|d| d.webhook_token.clone()),
        producer: kairos_core::kafka::producer(config)?,
        outcomes_topic: config.topic(topics::OUTCOMES),
        dead_letter_topic: config.topic(topics::DEAD_LETTER),
        service: format!("deliver-{channel}"),
        received,
        dead_letters: admin.dead_letters.clone(),
        turns: tokio::sync::Semaphore::new(CONCURRENT_REQUESTS),
        normalizer: Normalizer::new(&config.identity.default_country)
            .map_err(|e| anyhow::anyhow!("identity.default_country: {e}"))?,
    });
    Ok(Router::new()
        .route("/webhooks/events", post(receive))
        // The body is read (and bounded) by `one_turn`, under its turn.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            one_turn,
        ))
        .with_state(state))
}

/// The token of an `Authorization: Bearer <token>` header (the scheme's name in any
/// case, as HTTP has it).
pub(crate) fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Lets a request in: its token first, then a turn, then its body, read within
/// [`TURN_WAIT`]. Each request holds its body and its events' records until the broker
/// has them, so memory stays bounded however many come at once; one without the token
/// takes no turn, and a client that trickles its body cannot hold one for long. One
/// that waits longer than a provider would for its turn is told to come back (503).
async fn one_turn(
    State(state): State<Arc<WebhookState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Some(token) = &state.token {
        let presented = bearer_token(request.headers());
        if !presented.is_some_and(|p| kairos_core::ids::same_secret(p, token)) {
            return (StatusCode::UNAUTHORIZED, "missing or wrong webhook token").into_response();
        }
    }
    let turn = tokio::time::timeout(TURN_WAIT, state.turns.acquire()).await;
    let Ok(Ok(_turn)) = turn else {
        return (StatusCode::SERVICE_UNAVAILABLE, "busy; retry later").into_response();
    };
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(TURN_WAIT, axum::body::to_bytes(body, MAX_BODY_BYTES));
    let body = match read.await {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => {
            // Nothing of it is kept: said in the log and counted, for the operator.
            tracing::warn!(
                channel = state.channel.as_str(),
                "webhook body of more than {MAX_BODY_BYTES} bytes, or cut short: refused, not kept"
            );
            state
                .received
                .with_label_values(&[state.channel.as_str(), "unparsed", "too_large"])
                .inc();
            let message = format!("a body of more than {MAX_BODY_BYTES} bytes, or cut short");
            return (StatusCode::PAYLOAD_TOO_LARGE, message).into_response();
        }
        Err(_) => {
            return (
                StatusCode::REQUEST_TIMEOUT,
                "the body took too long to come",
            )
                .into_response()
        }
    };
    let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(body));
    next.run(request).await
}

/// Checks an event and turns it into its outcome.
pub fn outcome_of(
    event: &ProviderEvent,
    channel: Channel,
    now: Millis,
    normalizer: &Normalizer,
) -> Result<Outcome, String> {
    if !WEBHOOK_KINDS.contains(&event.event) {
        return Err(format!(
            "event {:?} is not reported by providers (one of {})",
            event.event.as_str(),
            WEBHOOK_KINDS.map(|k| k.as_str()).join(", ")
        ));
    }
    if event.channel != channel {
        return Err(format!(
            "event for channel {} sent to the {channel} worker",
            event.channel
        ));
    }
    if event.send_id.trim().is_empty() || event.customer_id.trim().is_empty() {
        return Err("send_id and customer_id must not be empty".into());
    }
    // Read for a hard bounce only (providers name the recipient on every event), in
    // the form Kairos keeps addresses in, so it matches the sends that wait for it. An
    // address that does not read as one still leaves the bounce: the arbiter knows
    // the send's address by its id.
    let address = match (event.event, event.address.as_deref()) {
        (OutcomeKind::bounced_hard, Some(raw)) if !raw.trim().is_empty() => {
            match reported_address(channel, raw, normalizer) {
                Ok(address) => Some(address),
                Err(why) => {
                    tracing::warn!(send_id = %event.send_id, "hard bounce without a usable {why}");
                    None
                }
            }
        }
        _ => None,
    };
    // A time from the future would move event-time clocks ahead.
    if event.occurred_at.is_some_and(|t| t > now + MAX_CLOCK_SKEW) {
        return Err("occurred_at lies in the future".into());
    }
    // A time in seconds reads as January 1970: an unsubscribe dated then is older than
    // every opt-in and would change nothing.
    if event
        .occurred_at
        .is_some_and(|t| t < now.saturating_sub(MAX_OUTCOME_AGE))
    {
        return Err(
            "occurred_at lies more than a year in the past (times are milliseconds since the epoch, not seconds)"
                .into(),
        );
    }
    Ok(Outcome {
        outcome_id: deterministic_id(&[&event.send_id, event.event.as_str()]),
        send_id: event.send_id.clone(),
        customer_id: event.customer_id.clone(),
        scenario: event.scenario.clone(),
        channel: event.channel,
        category: event.category,
        kind: event.event,
        reason: event.reason.clone(),
        occurred_at: event.occurred_at.unwrap_or(now),
        // The arbiter knows it by the send id anyway; the worker only from here.
        address,
    })
}

/// A bounced address as the provider reports it, normalized as Kairos keeps the
/// channel's addresses (an e-mail's domain in ASCII and lower case, a phone number in
/// E.164); an identifier of the other channels as it is, trimmed.
fn reported_address(
    channel: Channel,
    raw: &str,
    normalizer: &Normalizer,
) -> Result<String, String> {
    let kind = match channel {
        Channel::email => Some(IdentifierKind::email),
        Channel::sms => Some(IdentifierKind::phone),
        _ => None,
    };
    match kind {
        Some(kind) => normalizer
            .normalize(kind, raw)
            .map(|id| id.value)
            .map_err(|e| format!("address: {}", e.reason)),
        None => kairos_core::identifiers::key_id(raw)
            .map(str::to_string)
            .map_err(|why| format!("address: {why}")),
    }
}

/// How far ahead of this machine's clock a provider's timestamp may be.
const MAX_CLOCK_SKEW: Millis = 5 * 60 * 1000;

/// How long after a send a provider may still report on it (an old e-mail opened months
/// later still counts).
const MAX_OUTCOME_AGE: Millis = 366 * kairos_core::time::DAY;

/// Takes a request [`one_turn`] let in (token checked, body read).
async fn receive(State(state): State<Arc<WebhookState>>, body: Bytes) -> (StatusCode, String) {
    let now = wall_now();
    // Each event stands alone: one the worker cannot take is dead-lettered with its
    // bytes and reason, and the others still count (a provider that drops a refused
    // batch would lose them, one that retries it would retry for ever).
    let events: Vec<Box<serde_json::value::RawValue>> = match parse_events(&body) {
        Some(events) => events,
        None => {
            let reason = "not a provider event: expected a JSON object or an array of them";
            let refusal = (StatusCode::BAD_REQUEST, DeadLetterReason::not_json);
            return refuse_whole(&state, refusal, &body, reason, now).await;
        }
    };
    if events.len() > MAX_EVENTS_PER_REQUEST {
        let reason = format!(
            "{} events in one request, more than the {MAX_EVENTS_PER_REQUEST} a request may carry: send them in smaller batches",
            events.len()
        );
        let refusal = (
            StatusCode::PAYLOAD_TOO_LARGE,
            DeadLetterReason::invalid_field,
        );
        return refuse_whole(&state, refusal, &body, &reason, now).await;
    }
    let mut records = Vec::with_capacity(events.len());
    let mut counts = Vec::with_capacity(events.len());
    let mut rejected = Vec::new();
    let mut accepted = 0;
    for (i, raw) in events.iter().enumerate() {
        let event = serde_json::from_str::<ProviderEvent>(raw.get())
            .map_err(|e| format!("not a provider event: {e}"));
        let kind = event.as_ref().map_or("unparsed", |e| e.event.as_str());
        match event.and_then(|e| outcome_of(&e, state.channel, now, &state.normalizer)) {
            Ok(o) => {
                counts.push((o.kind.as_str(), "accepted"));
                accepted += 1;
                records.push((
                    &state.outcomes_topic,
                    (o.customer_id.clone(), encode_internal(&o)),
                ));
            }
            Err(reason) => {
                counts.push((kind, "rejected"));
                // The provider's own bytes, as they came.
                for letter in dead_letters_of(
                    &state.service,
                    raw.get().as_bytes(),
                    DeadLetterReason::invalid_field,
                    &format!("event {i}: {reason}"),
                    now,
                ) {
                    records.push((&state.dead_letter_topic, letter));
                }
                rejected.push(serde_json::json!({"event": i, "reason": reason}));
            }
        }
    }
    if let Err(answer) = publish(&state, &records).await {
        return answer;
    }
    // Counted once stored: a provider's retry after a failure is not counted twice.
    for (kind, result) in counts {
        state
            .received
            .with_label_values(&[state.channel.as_str(), kind, result])
            .inc();
    }
    count_dead_letters(&state, DeadLetterReason::invalid_field, rejected.len());
    // 202 even when every event was rejected: each is kept in the dead-letter topic, and
    // providers retry any other answer (for a day or more), which would only
    // dead-letter the same events again.
    let answer = serde_json::json!({"accepted": accepted, "rejected": rejected}).to_string();
    (StatusCode::ACCEPTED, answer)
}

/// Counts dead-lettered inputs (a body or an event, whatever its letters' parts) in
/// the process's family.
fn count_dead_letters(state: &WebhookState, reason: DeadLetterReason, inputs: usize) {
    state
        .dead_letters
        .with_label_values(&[reason.as_str()])
        .inc_by(inputs as u64);
}

/// Refuses a whole request with `status`: its body goes to the dead-letter topic (in
/// parts if it is too large for one letter), and the provider is told once the broker
/// has it.
async fn refuse_whole(
    state: &WebhookState,
    (status, code): (StatusCode, DeadLetterReason),
    body: &[u8],
    reason: &str,
    now: Millis,
) -> (StatusCode, String) {
    let letters: Vec<_> = dead_letters_of(&state.service, body, code, reason, now)
        .into_iter()
        .map(|letter| (&state.dead_letter_topic, letter))
        .collect();
    if let Err(answer) = publish(state, &letters).await {
        return answer;
    }
    // One bad input, however many parts its letters take.
    count_dead_letters(state, code, 1);
    (status, reason.into())
}

/// Events one request may carry. Providers batch a few hundred to a thousand; each
/// event costs its outcome or dead letter in memory until the broker has it.
pub const MAX_EVENTS_PER_REQUEST: usize = 10_000;

/// The largest body the webhook reads: a larger one is answered 413, logged and counted,
/// but not kept (the limit bounds each turn's memory).
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// Requests handled at once; the others wait their turn, for up to [`TURN_WAIT`].
const CONCURRENT_REQUESTS: usize = 4;

/// How long a request waits for its turn before it is answered 503, and how long its
/// body may then take to come (408 after).
const TURN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The events of a webhook body, each as its own bytes: one JSON object, or an array
/// of them (anything in the array is an event, to be checked one by one). None for a
/// body that is neither.
fn parse_events(body: &[u8]) -> Option<Vec<Box<serde_json::value::RawValue>>> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => serde_json::from_slice(body).ok(),
        Some(b'{') => serde_json::from_slice(body).ok().map(|one| vec![one]),
        _ => None,
    }
}

/// Publishes `(topic, (key, payload))` records; a failure is the answer to give (503:
/// the provider retries, and every record's id makes its repeat harmless).
async fn publish(
    state: &WebhookState,
    records: &[(&String, (String, Vec<u8>))],
) -> Result<(), (StatusCode, String)> {
    let records: Vec<(&str, &[u8], &[u8])> = records
        .iter()
        .map(|(topic, (key, payload))| (topic.as_str(), key.as_bytes(), payload.as_slice()))
        .collect();
    if let Err(e) = kairos_core::kafka::send_in_order(&state.producer, &records).await {
        state
            .received
            .with_label_values(&[state.channel.as_str(), "any", "failed"])
            .inc();
        tracing::error!(error = %e, "webhook records not published");
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "outcomes not stored; retry later".into(),
        ));
    }
    Ok(())
}

/// The dead letters of bytes the worker cannot take, keyed by their ids: the same
/// bytes (a provider's retry) give the same letters. Bytes too large for one
/// letter are cut into parts, each letter saying which, so none is lost.
pub fn dead_letters_of(
    service: &str,
    raw: &[u8],
    code: DeadLetterReason,
    reason: &str,
    now: Millis,
) -> Vec<(String, Vec<u8>)> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let whole = String::from_utf8_lossy(raw);
    let parts: Vec<&[u8]> = if raw.is_empty() {
        vec![raw]
    } else {
        raw.chunks(DEAD_LETTER_WHOLE_PAYLOAD).collect()
    };
    let count = parts.len();
    // serde's message quotes the field it could not read, whole.
    let reason = kairos_core::encoding::cut_reason(reason.to_string());
    parts
        .into_iter()
        .enumerate()
        .map(|(i, part)| {
            let (id, reason) = if count == 1 {
                let id = deterministic_id(&[service, "webhook", &whole]);
                (id, reason.to_string())
            } else {
                let start = i * DEAD_LETTER_WHOLE_PAYLOAD;
                let id = deterministic_id(&[service, "webhook", &whole, &i.to_string()]);
                let reason = format!(
                    "{reason}; part {} of {count}: bytes {start} to {} of {}",
                    i + 1,
                    start + part.len(),
                    raw.len()
                );
                (id, reason)
            };
            let letter = DeadLetter {
                dead_letter_id: id.clone(),
                service: service.to_string(),
                source_topic: WEBHOOK_SOURCE.into(),
                source_partition: -1,
                source_offset: -1,
                reason_code: code,
                reason,
                key_base64: None,
                payload_base64: b64.encode(part),
                failed_at: now,
            };
            (id, encode_internal(&letter))
        })
        .collect()
}

/// The `source_topic` of a dead-lettered webhook event: it came over HTTP.
pub const WEBHOOK_SOURCE: &str = "webhook:/webhooks/events";

#[cfg(test)]
mod tests {
    use super::*;

    /// HTTP's scheme names are case-insensitive: a provider sending `bearer` is let in.
    #[test]
    fn a_bearer_token_is_read_whatever_the_scheme_s_case() {
        let token = |value: &str| {
            let mut headers = axum::http::HeaderMap::new();
            headers.insert(
                axum::http::header::AUTHORIZATION,
                value.parse().expect("a header value"),
            );
            bearer_token(&headers).map(str::to_string)
        };
        assert_eq!(token("Bearer s3cret").as_deref(), Some("s3cret"));
        assert_eq!(token("bearer s3cret").as_deref(), Some("s3cret"));
        assert_eq!(token("BEARER  s3cret ").as_deref(), Some("s3cret"));
        assert_eq!(token("Basic s3cret"), None);
        assert_eq!(token("Bearer "), None);
        assert_eq!(token("s3cret"), None);
        assert!(kairos_core::ids::same_secret("s3cret", "s3cret"));
        assert!(!kairos_core::ids::same_secret("s3cre", "s3cret"));
    }

    /// [`super::outcome_of`] with German numbers for phones without a country code.
    fn outcome_of(event: &ProviderEvent, channel: Channel, now: Millis) -> Result<Outcome, String> {
        let normalizer = Normalizer::new("DE").expect("country");
        super::outcome_of(event, channel, now, &normalizer)
    }

    fn event(kind: OutcomeKind, channel: Channel) -> ProviderEvent {
        ProviderEvent {
            send_id: "s1".into(),
            customer_id: "c1".into(),
            scenario: "welcome".into(),
            channel,
            category: MessageCategory::trigger,
            event: kind,
            occurred_at: Some(42),
            reason: None,
            address: None,
        }
    }

    /// A hard bounce may name its dead address, which the outcome carries to the worker
    /// in the form Kairos keeps addresses in; another kind's is ignored, a malformed
    /// one refused.
    #[test]
    fn a_hard_bounce_names_its_dead_address() {
        let bounce = |kind, address: &str| ProviderEvent {
            address: Some(address.into()),
            ..event(kind, Channel::email)
        };
        let outcome = outcome_of(
            &bounce(OutcomeKind::bounced_hard, " anna@example.com "),
            Channel::email,
            1,
        )
        .expect("accepted");
        assert_eq!(outcome.address.as_deref(), Some("anna@example.com"));
        let named = outcome_of(
            &bounce(OutcomeKind::bounced_hard, "Anna <anna@Bücher.DE>"),
            Channel::email,
            1,
        )
        .expect("accepted");
        assert_eq!(named.address.as_deref(), Some("anna@xn--bcher-kva.de"));
        let phone = ProviderEvent {
            address: Some("0170 1234567".into()),
            ..event(OutcomeKind::bounced_hard, Channel::sms)
        };
        let phone = outcome_of(&phone, Channel::sms, 1).expect("accepted");
        assert_eq!(phone.address.as_deref(), Some("+491701234567"));
        let plain = outcome_of(
            &event(OutcomeKind::bounced_hard, Channel::email),
            Channel::email,
            1,
        )
        .expect("accepted");
        assert_eq!(plain.address, None);
        // Providers name the recipient on every event: read for a hard bounce only.
        let opened = outcome_of(
            &bounce(OutcomeKind::opened, "a@x.example"),
            Channel::email,
            1,
        )
        .expect("accepted");
        assert_eq!(opened.address, None);
        // One that does not read as an address is left out, and the bounce kept.
        let garbled = outcome_of(
            &bounce(OutcomeKind::bounced_hard, "a\u{7}@x"),
            Channel::email,
            1,
        )
        .expect("the bounce is kept");
        assert_eq!(
            (garbled.kind, garbled.address),
            (OutcomeKind::bounced_hard, None)
        );
    }

    /// A body too large for one dead letter is kept whole across several, each saying
    /// which part it holds; a small one is one letter, under the id it always had.
    #[test]
    fn a_body_too_large_for_one_dead_letter_is_kept_in_parts() {
        use base64::Engine as _;
        let pattern = b"[{\"x\": 1},";
        let body: Vec<u8> = (0..DEAD_LETTER_WHOLE_PAYLOAD * 2 + 10)
            .map(|i| pattern[i % pattern.len()])
            .collect();
        let decode = |letters: &[(String, Vec<u8>)]| -> Vec<DeadLetter> {
            letters
                .iter()
                .map(|(_, bytes)| serde_json::from_slice(bytes).expect("a dead letter"))
                .collect()
        };
        let letters = dead_letters_of("deliver-email", &body, DeadLetterReason::not_json, "bad", 7);
        let decoded = decode(&letters);
        assert_eq!(decoded.len(), 3);
        let mut joined = Vec::new();
        for (i, letter) in decoded.iter().enumerate() {
            joined.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(&letter.payload_base64)
                    .expect("base64"),
            );
            assert!(
                letter.reason.starts_with("bad; ")
                    && letter.reason.contains(&format!("part {} of 3", i + 1)),
                "{}",
                letter.reason
            );
            assert_eq!(letter.dead_letter_id, letters[i].0);
        }
        assert_eq!(joined, body, "every byte is kept, in order");
        let ids: std::collections::BTreeSet<_> = letters.iter().map(|(id, _)| id).collect();
        assert_eq!(ids.len(), 3, "each part has its own id");
        let again = dead_letters_of("deliver-email", &body, DeadLetterReason::not_json, "bad", 9);
        assert_eq!(
            again.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            letters.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            "a retried body gives the same letters"
        );
        let small = dead_letters_of(
            "deliver-email",
            b"nope",
            DeadLetterReason::not_json,
            "bad",
            7,
        );
        let decoded = decode(&small);
        assert_eq!(decoded.len(), 1);
        assert_eq!(decoded[0].reason, "bad");
        assert_eq!(
            small[0].0,
            deterministic_id(&["deliver-email", "webhook", "nope"])
        );
        // A reason quoting a huge field (serde's "invalid type: string ...") is cut, so
        // each letter stays within what the broker takes.
        let quoted = format!(
            "not a provider event: invalid type: string {:?}",
            "x".repeat(500_000)
        );
        let letters = dead_letters_of(
            "deliver-email",
            &body,
            DeadLetterReason::not_json,
            &quoted,
            7,
        );
        for letter in decode(&letters) {
            assert!(letter.reason.len() < 2 * 1024, "{}", letter.reason.len());
            assert!(
                letter.reason.contains("bytes, cut"),
                "{}",
                &letter.reason[..80]
            );
        }
    }

    #[test]
    fn a_repeated_event_maps_to_the_same_outcome_id() {
        let a = outcome_of(
            &event(OutcomeKind::opened, Channel::email),
            Channel::email,
            1,
        )
        .unwrap();
        let b = outcome_of(
            &event(OutcomeKind::opened, Channel::email),
            Channel::email,
            2,
        )
        .unwrap();
        assert_eq!(a.outcome_id, b.outcome_id);
        assert_eq!(a.occurred_at, 42);
        let clicked = outcome_of(
            &event(OutcomeKind::clicked, Channel::email),
            Channel::email,
            1,
        )
        .unwrap();
        assert_ne!(a.outcome_id, clicked.outcome_id);
    }

    #[test]
    fn worker_only_kinds_and_foreign_channels_are_rejected() {
        let err =
            outcome_of(&event(OutcomeKind::sent, Channel::email), Channel::email, 1).unwrap_err();
        assert!(err.contains("not reported by providers"), "{err}");
        let err =
            outcome_of(&event(OutcomeKind::opened, Channel::sms), Channel::email, 1).unwrap_err();
        assert!(err.contains("sms"), "{err}");
    }

    #[test]
    fn a_time_in_seconds_is_rejected_and_an_old_open_still_counts() {
        use kairos_core::time::DAY;
        let now = 1_767_603_600_000;
        let at = |t| ProviderEvent {
            occurred_at: Some(t),
            ..event(OutcomeKind::unsubscribed, Channel::email)
        };
        let err = outcome_of(&at(1_767_603_600), Channel::email, now).unwrap_err();
        assert!(err.contains("seconds"), "{err}");
        let months_ago = now - 200 * DAY;
        let outcome = outcome_of(&at(months_ago), Channel::email, now).expect("accepted");
        assert_eq!(outcome.occurred_at, months_ago);
        assert!(outcome_of(&at(now - 367 * DAY), Channel::email, now).is_err());
    }
}
