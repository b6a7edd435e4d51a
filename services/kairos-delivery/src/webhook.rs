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
//! The send id, customer, scenario and category travel to the provider with the send
//! (custom arguments / metadata) and come back with its events. Each event becomes an
//! outcome on the outcomes topic, keyed by customer, with the id `hash(send id, kind)`:
//! a provider repeating a webhook yields the same outcome id, which every consumer
//! deduplicates. The answer is 202 only once the broker has the outcomes, so a provider
//! retries what did not make it; bad events get 400 or 422 with the reason.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use kairos_core::config::{topics, Config};
use kairos_core::contracts::{Channel, MessageCategory, Outcome, OutcomeKind};
use kairos_core::encoding::encode_internal;
use kairos_core::ids::deterministic_id;
use kairos_core::metrics;
use kairos_core::time::{wall_now, Millis};
use prometheus::IntCounterVec;
use rdkafka::producer::FutureProducer;
use serde::Deserialize;

/// What providers report through the webhook: never "sent" or "failed", which only the
/// worker itself knows.
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
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Events {
    One(Box<ProviderEvent>),
    Many(Vec<ProviderEvent>),
}

struct WebhookState {
    channel: Channel,
    token: Option<String>,
    producer: FutureProducer,
    outcomes_topic: String,
    received: IntCounterVec,
}

/// The webhook route for the worker of `channel`.
pub fn router(
    config: &Config,
    channel: Channel,
    registry: &prometheus::Registry,
) -> anyhow::Result<Router> {
    let received = metrics::counter_vec(
        registry,
        "kairos_webhook_events_total",
        "Provider webhook events, by channel, event and result (accepted, rejected, failed).",
        &["channel", "event", "result"],
    );
    for kind in WEBHOOK_KINDS {
        for result in ["accepted", "rejected", "failed"] {
            received.with_label_values(&[channel.as_str(), kind.as_str(), result]);
        }
    }
    let state = Arc::new(WebhookState {
        channel,
        token: config
            .delivery
            .get(&channel)
            .and_then(|d| d.webhook_token.clone()),
        producer: kairos_core::kafka::producer(config)?,
        outcomes_topic: config.topic(topics::OUTCOMES),
        received,
    });
    Ok(Router::new()
        .route("/webhooks/events", post(receive))
        .with_state(state))
}

/// Checks an event and turns it into its outcome.
pub fn outcome_of(event: &ProviderEvent, channel: Channel, now: Millis) -> Result<Outcome, String> {
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
    // A time from the future would move event-time clocks ahead.
    if event.occurred_at.is_some_and(|t| t > now + MAX_CLOCK_SKEW) {
        return Err("occurred_at lies in the future".into());
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
        // The provider's report does not say; the arbiter knows it by the send id.
        address: None,
    })
}

/// How far ahead of this machine's clock a provider's timestamp may be.
const MAX_CLOCK_SKEW: Millis = 5 * 60 * 1000;

async fn receive(
    State(state): State<Arc<WebhookState>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    if let Some(token) = &state.token {
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if presented != Some(token.as_str()) {
            return (
                StatusCode::UNAUTHORIZED,
                "missing or wrong webhook token".into(),
            );
        }
    }
    let events = match serde_json::from_slice::<Events>(&body) {
        Ok(Events::One(e)) => vec![*e],
        Ok(Events::Many(v)) => v,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("not a provider event: {e}"),
            )
        }
    };
    let now = wall_now();
    let mut outcomes = Vec::with_capacity(events.len());
    for (i, event) in events.iter().enumerate() {
        match outcome_of(event, state.channel, now) {
            Ok(o) => outcomes.push(o),
            Err(reason) => {
                state
                    .received
                    .with_label_values(&[state.channel.as_str(), event.event.as_str(), "rejected"])
                    .inc();
                return (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("event {i}: {reason}"),
                );
            }
        }
    }
    for o in &outcomes {
        let payload = encode_internal(o);
        let result = kairos_core::kafka::send(
            &state.producer,
            &state.outcomes_topic,
            o.customer_id.as_bytes(),
            &payload,
        )
        .await;
        let label = if result.is_ok() { "accepted" } else { "failed" };
        state
            .received
            .with_label_values(&[state.channel.as_str(), o.kind.as_str(), label])
            .inc();
        if let Err(e) = result {
            tracing::error!(error = %e, "webhook outcome not published");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "outcomes not stored; retry later".into(),
            );
        }
    }
    (
        StatusCode::ACCEPTED,
        format!("{{\"accepted\":{}}}", outcomes.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
