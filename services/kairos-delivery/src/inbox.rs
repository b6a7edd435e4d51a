//! In-app and on-site messages: the in_app worker's "provider" is an inbox per
//! customer in RocksDB, which the site or app polls over HTTP on the worker's admin
//! port:
//!
//! - `GET /in-app/{customer_id}` returns the customer's messages that have not expired
//!   (valid-until in the future), newest first, and marks unseen ones seen; the first
//!   fetch of a message reports it `delivered` on the outcomes topic;
//! - clicks come back through the provider webhook (`POST /webhooks/events`).
//!
//! The inbox lives next to the worker's state; a deployment with several in_app
//! instances routes each customer's polls to the instance that owns the customer's
//! partition (the same hash as the send topic).

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use kairos_core::config::{topics, Config};
use kairos_core::contracts::{Outcome, OutcomeKind, SendCommand};
use kairos_core::encoding::encode_internal;
use kairos_core::ids::deterministic_id;
use kairos_core::time::{wall_now, Millis};
use rdkafka::producer::FutureProducer;
use serde::{Deserialize, Serialize};

use crate::templates::RenderedMessage;

/// One message in a customer's inbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboxMessage {
    pub send_id: String,
    pub customer_id: String,
    pub scenario: String,
    pub category: kairos_core::contracts::MessageCategory,
    pub title: Option<String>,
    pub text: String,
    pub created_at: Millis,
    pub valid_until: Millis,
    pub seen_at: Option<Millis>,
}

#[derive(Clone)]
pub struct Inbox {
    db: Arc<rocksdb::DB>,
}

fn key(customer_id: &str, send_id: &str) -> Vec<u8> {
    let mut k = customer_prefix(customer_id);
    k.extend_from_slice(send_id.as_bytes());
    k
}

fn customer_prefix(customer_id: &str) -> Vec<u8> {
    let mut k = customer_id.as_bytes().to_vec();
    k.push(0);
    k
}

impl Inbox {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        let db = rocksdb::DB::open(&options, path)
            .map_err(|e| anyhow::anyhow!("cannot open the in-app inbox {}: {e}", path.display()))?;
        Ok(Inbox { db: Arc::new(db) })
    }

    /// Stores a message; storing the same send again changes nothing.
    pub fn put(&self, cmd: &SendCommand, message: &RenderedMessage) -> anyhow::Result<()> {
        let k = key(&cmd.customer_id, &cmd.send_id);
        if self.db.get(&k)?.is_some() {
            return Ok(());
        }
        let m = InboxMessage {
            send_id: cmd.send_id.clone(),
            customer_id: cmd.customer_id.clone(),
            scenario: cmd.scenario.clone(),
            category: cmd.category,
            title: message.subject.clone(),
            text: message.body.clone(),
            created_at: cmd.created_at,
            valid_until: cmd.valid_until,
            seen_at: None,
        };
        self.db.put(k, serde_json::to_vec(&m)?)?;
        Ok(())
    }

    /// The customer's live messages, newest first; expired ones are removed, unseen
    /// ones marked seen. Returns them with the ones seen for the first time.
    pub fn fetch(
        &self,
        customer_id: &str,
        now: Millis,
    ) -> anyhow::Result<(Vec<InboxMessage>, Vec<InboxMessage>)> {
        let prefix = customer_prefix(customer_id);
        let mut live = Vec::new();
        let mut first_seen = Vec::new();
        let mut batch = rocksdb::WriteBatch::default();
        for item in self.db.prefix_iterator(&prefix) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let mut m: InboxMessage = serde_json::from_slice(&v)?;
            if m.valid_until <= now {
                batch.delete(&k);
                continue;
            }
            if m.seen_at.is_none() {
                m.seen_at = Some(now);
                batch.put(&k, serde_json::to_vec(&m)?);
                first_seen.push(m.clone());
            }
            live.push(m);
        }
        self.db.write(batch)?;
        live.sort_by_key(|m| std::cmp::Reverse(m.created_at));
        Ok((live, first_seen))
    }
}

struct InboxState {
    inbox: Inbox,
    producer: FutureProducer,
    outcomes_topic: String,
}

/// `GET /in-app/{customer_id}`.
pub fn router(config: &Config, inbox: Inbox) -> anyhow::Result<Router> {
    let state = Arc::new(InboxState {
        inbox,
        producer: kairos_core::kafka::producer(config)?,
        outcomes_topic: config.topic(topics::OUTCOMES),
    });
    Ok(Router::new()
        .route("/in-app/{customer_id}", get(fetch))
        .with_state(state))
}

async fn fetch(
    State(state): State<Arc<InboxState>>,
    UrlPath(customer_id): UrlPath<String>,
) -> Result<Json<Vec<InboxMessage>>, (StatusCode, String)> {
    let now = wall_now();
    let (live, first_seen) = state
        .inbox
        .fetch(&customer_id, now)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    for m in &first_seen {
        let outcome = Outcome {
            outcome_id: deterministic_id(&[&m.send_id, OutcomeKind::delivered.as_str()]),
            send_id: m.send_id.clone(),
            customer_id: m.customer_id.clone(),
            scenario: m.scenario.clone(),
            channel: kairos_core::contracts::Channel::in_app,
            category: m.category,
            kind: OutcomeKind::delivered,
            reason: None,
            occurred_at: now,
            address: None,
        };
        // Seen is already recorded; a lost report only loses a metric, so it is logged.
        if let Err(e) = kairos_core::kafka::send(
            &state.producer,
            &state.outcomes_topic,
            m.customer_id.as_bytes(),
            &encode_internal(&outcome),
        )
        .await
        {
            tracing::warn!(error = %e, send_id = %m.send_id, "in-app delivered report not published");
        }
    }
    Ok(Json(live))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_core::contracts::{Channel, MessageCategory};

    fn command(
        send_id: &str,
        customer: &str,
        created_at: Millis,
        valid_until: Millis,
    ) -> SendCommand {
        SendCommand {
            send_id: send_id.into(),
            trigger_id: "t".into(),
            customer_id: customer.into(),
            scenario: "welcome".into(),
            channel: Channel::in_app,
            category: MessageCategory::trigger,
            template: "welcome".into(),
            address: None,
            variables: "{}".into(),
            created_at,
            valid_until,
            cause_occurred_at: created_at,
            reasons: vec![],
        }
    }

    #[test]
    fn messages_are_served_newest_first_seen_once_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path()).unwrap();
        let msg = RenderedMessage {
            subject: Some("Hi".into()),
            preheader: None,
            body: "Welcome".into(),
        };
        inbox.put(&command("s1", "c1", 100, 1_000), &msg).unwrap();
        inbox.put(&command("s2", "c1", 200, 10_000), &msg).unwrap();
        inbox.put(&command("s2", "c1", 200, 10_000), &msg).unwrap();
        inbox.put(&command("s3", "c10", 300, 10_000), &msg).unwrap();

        let (live, first) = inbox.fetch("c1", 500).unwrap();
        assert_eq!(
            live.iter().map(|m| m.send_id.as_str()).collect::<Vec<_>>(),
            ["s2", "s1"]
        );
        assert_eq!(first.len(), 2);
        assert!(live.iter().all(|m| m.seen_at == Some(500)));

        let (live, first) = inbox.fetch("c1", 2_000).unwrap();
        assert_eq!(live.len(), 1, "s1 expired at 1000");
        assert!(first.is_empty(), "seen messages are not reported again");
        assert_eq!(live[0].seen_at, Some(500));
        let (other, _) = inbox.fetch("c10", 2_000).unwrap();
        assert_eq!(other.len(), 1, "c1's prefix does not reach into c10");
    }
}
