//! In-app and on-site messages: the in_app worker's "provider" is an inbox per
//! customer, which the site or app polls over HTTP on the worker's admin port:
//!
//! - `GET /in-app/{customer_id}` returns the customer's messages that have not expired
//!   (valid-until in the future), newest first, and marks unseen ones seen; the first
//!   fetch of a message reports it `delivered` on the outcomes topic;
//! - clicks come back through the provider webhook (`POST /webhooks/events`).
//!
//! The inbox is part of the worker's partition state (`n/<customer>\0<send id>`), so
//! it commits with the send's offset and its `sent` report, goes to the changelog, and
//! follows its partition to whichever instance owns it next. A poll is served on the
//! processing loop of the instance that owns the customer's partition (the send
//! topic's, keyed by customer id), and its "seen" marks and `delivered` report commit
//! before it is answered; an instance that does not own it answers 421 Misdirected
//! Request naming the partition, and every instance lists the partitions it owns at
//! `GET /partitions`, so a router can send the poll to the owner.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use kairos_core::contracts::SendCommand;
use kairos_core::runtime::{Ctx, ServeRequest, Served};
use kairos_core::time::Millis;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::templates::RenderedMessage;

/// Messages kept per customer at most: a new one beyond pushes the oldest out (an
/// app shows a handful; a runaway scenario must not grow one customer's state).
pub const INBOX_KEPT: usize = 100;

/// Prefix of the ids of the timers that delete a message once it expires.
pub const EXPIRY_TIMER_PREFIX: &str = "inbox/";

/// How long a poll waits for the processing loop before it is answered 503.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The customer's messages: `\0` ends the id, so `c1`'s prefix does not reach `c10`.
fn customer_prefix(customer_id: &str) -> String {
    format!("n/{customer_id}\0")
}

fn message_key(customer_id: &str, send_id: &str) -> String {
    format!("{}{send_id}", customer_prefix(customer_id))
}

fn expiry_timer(send_id: &str) -> String {
    format!("{EXPIRY_TIMER_PREFIX}{send_id}")
}

/// The customer's messages, in key order.
fn messages(ctx: &Ctx<'_>, customer_id: &str) -> anyhow::Result<Vec<(String, InboxMessage)>> {
    ctx.scan(&customer_prefix(customer_id))
}

/// Stores a message with the timer that deletes it once it expires, and pushes the
/// customer's oldest out beyond [`INBOX_KEPT`]. Storing the same send again changes
/// nothing. False if the message itself was the oldest, and so is not kept.
pub fn store(
    ctx: &mut Ctx<'_>,
    cmd: &SendCommand,
    message: &RenderedMessage,
) -> anyhow::Result<bool> {
    let key = message_key(&cmd.customer_id, &cmd.send_id);
    if ctx.get::<InboxMessage>(&key)?.is_some() {
        return Ok(true);
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
    ctx.put(&key, &m)?;
    ctx.schedule(&expiry_timer(&cmd.send_id), cmd.valid_until, &key)?;
    let mut kept = messages(ctx, &cmd.customer_id)?;
    let mut stored = true;
    if kept.len() > INBOX_KEPT {
        kept.sort_by(|(ka, a), (kb, b)| (a.created_at, ka).cmp(&(b.created_at, kb)));
        for (old_key, old) in &kept[..kept.len() - INBOX_KEPT] {
            ctx.delete(old_key);
            ctx.cancel(&expiry_timer(&old.send_id))?;
            stored &= *old_key != key;
        }
    }
    Ok(stored)
}

/// The customer's live messages at `now`, newest first: expired ones, and ones the
/// customer's consent no longer allows (`withdrawn`), are deleted, unseen ones marked
/// seen. Returns them with the ones seen for the first time.
pub fn fetch(
    ctx: &mut Ctx<'_>,
    customer_id: &str,
    now: Millis,
    withdrawn: impl Fn(&InboxMessage) -> bool,
) -> anyhow::Result<(Vec<InboxMessage>, Vec<InboxMessage>)> {
    let mut live = Vec::new();
    let mut first_seen = Vec::new();
    for (key, mut m) in messages(ctx, customer_id)? {
        if m.valid_until <= now || withdrawn(&m) {
            ctx.delete(&key);
            ctx.cancel(&expiry_timer(&m.send_id))?;
            continue;
        }
        if m.seen_at.is_none() {
            m.seen_at = Some(now);
            ctx.put(&key, &m)?;
            first_seen.push(m.clone());
        }
        live.push(m);
    }
    live.sort_by(|a, b| (b.created_at, &b.send_id).cmp(&(a.created_at, &a.send_id)));
    Ok((live, first_seen))
}

/// A message's expiry timer fired: the message goes (its key is the payload).
pub fn expire(ctx: &mut Ctx<'_>, timer: &kairos_core::store::DueTimer) -> anyhow::Result<()> {
    let key: String = timer.decode()?;
    ctx.delete(&key);
    Ok(())
}

/// Hands polls to the worker's processing loop (see [`kairos_core::runtime::run_serving`]).
#[derive(Clone)]
pub struct InboxClient {
    requests: mpsc::Sender<ServeRequest>,
}

/// A client for the routes and the queue of requests its worker serves.
pub fn channel() -> (InboxClient, mpsc::Receiver<ServeRequest>) {
    // Polls beyond this many waiting are answered 503 at once.
    let (requests, queue) = mpsc::channel(1_024);
    (InboxClient { requests }, queue)
}

/// `GET /in-app/{customer_id}`; with `secret` (`delivery.in_app.inbox_secret`), only
/// with the customer's token (see [`kairos_core::ids::inbox_token`]).
pub fn router(client: InboxClient, secret: Option<String>) -> Router {
    Router::new()
        .route("/in-app/{customer_id}", get(poll))
        .with_state(Arc::new(Inbox { client, secret }))
}

struct Inbox {
    client: InboxClient,
    secret: Option<String>,
}

async fn poll(
    State(inbox): State<Arc<Inbox>>,
    UrlPath(customer_id): UrlPath<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Some(secret) = &inbox.secret {
        // Checked before the poll reaches the worker: a poll without the token marks
        // nothing seen and reports nothing delivered.
        let presented = crate::webhook::bearer_token(&headers);
        if !presented.is_some_and(|t| kairos_core::ids::is_inbox_token(secret, &customer_id, t)) {
            return (
                StatusCode::UNAUTHORIZED,
                "missing or wrong inbox token for this customer",
            )
                .into_response();
        }
    }
    let client = &inbox.client;
    let (reply, answer) = oneshot::channel();
    let request = ServeRequest {
        key: customer_id.clone().into_bytes(),
        body: customer_id.into_bytes(),
        reply,
    };
    if client.requests.try_send(request).is_err() {
        return unavailable("the worker has too many polls waiting, or is stopping");
    }
    match tokio::time::timeout(POLL_TIMEOUT, answer).await {
        Ok(Ok(Served::Done(body))) => {
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Ok(Ok(Served::NotOwner(partition))) => (
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "partition {partition}, which holds this customer's inbox, is owned by another instance (or a rebalance is under way); GET /partitions on each instance lists the partitions it owns"
            ),
        )
            .into_response(),
        Ok(Ok(Served::Failed(e))) => unavailable(&e),
        Ok(Err(_)) => unavailable("the worker is stopping"),
        Err(_) => unavailable("the worker did not serve the poll in time"),
    }
}

fn unavailable(reason: &str) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, reason.to_string()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_core::config::{topics, Config};
    use kairos_core::contracts::{Channel, MessageCategory, Outcome, OutcomeKind};
    use kairos_core::replay::Replayer;
    use kairos_core::runtime::Processor as _;
    use kairos_core::store::OutboxEntry;
    use kairos_core::time::DAY;

    const T0: Millis = 20_000 * DAY;

    fn command(send_id: &str, customer: &str, created_at: Millis, valid_until: Millis) -> Vec<u8> {
        serde_json::to_vec(&SendCommand {
            send_id: send_id.into(),
            trigger_id: format!("t-{send_id}"),
            customer_id: customer.into(),
            scenario: "welcome".into(),
            channel: Channel::in_app,
            category: MessageCategory::trigger,
            template: "welcome".into(),
            address: None,
            variables: r#"{"first_name":"Ann"}"#.into(),
            created_at: T0 + created_at,
            valid_until: T0 + valid_until,
            cause_occurred_at: T0 + created_at,
            reasons: vec![],
        })
        .expect("encode")
    }

    /// The in-app worker over the shipped configuration in event time, its state in
    /// `dir`.
    /// An `in_app` worker on the shipped configuration in event time, and the
    /// registry of its metrics.
    fn worker(
        dir: &std::path::Path,
    ) -> (
        Config,
        Replayer<crate::DeliveryProcessor>,
        prometheus::Registry,
    ) {
        worker_with(dir, &[])
    }

    /// [`worker`] with more settings (environment overrides).
    fn worker_with(
        dir: &std::path::Path,
        extra: &[(&str, &str)],
    ) -> (
        Config,
        Replayer<crate::DeliveryProcessor>,
        prometheus::Registry,
    ) {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/kairos.toml");
        let text = std::fs::read_to_string(&path).expect("config file");
        let config = Config::from_text(
            &path,
            &text,
            &[
                ("KAIROS__STATE__DIR".into(), dir.display().to_string()),
                ("KAIROS__CLOCK__MODE".into(), "event".into()),
            ]
            .into_iter()
            .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .collect::<Vec<_>>(),
        )
        .expect("config");
        let settings = config.delivery[&Channel::in_app].clone();
        let registry = prometheus::Registry::new();
        let processor =
            crate::DeliveryProcessor::new(&config, Channel::in_app, settings, &registry)
                .expect("processor");
        assert_eq!(processor.name(), "deliver-in_app");
        let replayer = Replayer::new(processor, &config, &registry).expect("replayer");
        (config, replayer, registry)
    }

    fn poll(
        replayer: &mut Replayer<crate::DeliveryProcessor>,
        customer: &str,
    ) -> (Vec<InboxMessage>, Vec<OutboxEntry>) {
        let (answer, out) = replayer
            .serve(customer.as_bytes(), customer.as_bytes())
            .expect("serve");
        (serde_json::from_slice(&answer).expect("a JSON list"), out)
    }

    fn ids(messages: &[InboxMessage]) -> Vec<&str> {
        messages.iter().map(|m| m.send_id.as_str()).collect()
    }

    fn outcomes(config: &Config, out: &[OutboxEntry], kind: OutcomeKind) -> Vec<String> {
        out.iter()
            .filter(|o| o.topic == config.topic(topics::OUTCOMES))
            .map(|o| serde_json::from_slice::<Outcome>(&o.payload).expect("outcome"))
            .filter(|o| o.kind == kind)
            .map(|o| o.send_id)
            .collect()
    }

    /// Messages are kept in the partition's state: served newest first, marked seen
    /// (and reported delivered) once, deleted by their timer when they expire.
    #[test]
    fn messages_are_served_newest_first_seen_once_and_expire() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, mut replayer, _) = worker(dir.path());
        let topic = config.send_topic(Channel::in_app);
        let mut out = Vec::new();
        for (key, payload) in [
            ("c1", command("s1", "c1", 100, 1_000)),
            ("c1", command("s2", "c1", 200, 10_000)),
            ("c1", command("s2", "c1", 200, 10_000)),
            ("c10", command("s3", "c10", 300, 10_000)),
        ] {
            out.extend(
                replayer
                    .push(&topic, key.as_bytes(), &payload)
                    .expect("push"),
            );
        }
        out.extend(replayer.commit().expect("commit"));
        assert_eq!(
            outcomes(&config, &out, OutcomeKind::sent),
            ["s1", "s2", "s3"]
        );

        let (live, out) = poll(&mut replayer, "c1");
        assert_eq!(ids(&live), ["s2", "s1"]);
        assert_eq!(live[0].title.as_deref(), Some("Welcome, Ann!"));
        let seen_at = live[0].seen_at;
        assert!(seen_at.is_some() && live.iter().all(|m| m.seen_at == seen_at));
        let mut delivered = outcomes(&config, &out, OutcomeKind::delivered);
        delivered.sort();
        assert_eq!(delivered, ["s1", "s2"]);

        let (again, out) = poll(&mut replayer, "c1");
        assert_eq!(again, live, "seen once");
        assert!(outcomes(&config, &out, OutcomeKind::delivered).is_empty());

        // s1's timer deletes it once it expires, with no poll.
        replayer.advance_to(T0 + 1_000).expect("advance");
        let stored = |replayer: &Replayer<crate::DeliveryProcessor>| {
            let mut keys = Vec::new();
            for p in replayer.engine.owned() {
                let store = replayer.engine.store(p).expect("store");
                for (key, _) in store.scan_state(b"n/").expect("scan") {
                    keys.push(String::from_utf8_lossy(&key).into_owned());
                }
            }
            keys.sort();
            keys
        };
        assert_eq!(stored(&replayer), ["n/c1\0s2", "n/c10\0s3"]);
        let (live, _) = poll(&mut replayer, "c1");
        assert_eq!(ids(&live), ["s2"]);
        let (other, _) = poll(&mut replayer, "c10");
        assert_eq!(ids(&other), ["s3"], "c1's messages are not c10's");
        assert!(poll(&mut replayer, "c2").0.is_empty());
    }

    /// A message's expiry timer still deletes it once the channel's provider no longer
    /// keeps an inbox (changed while messages waited): the worker goes on instead of
    /// failing every batch on a timer it cannot read.
    #[test]
    fn an_inbox_timer_left_after_the_provider_changed_deletes_its_message() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, mut replayer, _) = worker(dir.path());
        let topic = config.send_topic(Channel::in_app);
        replayer
            .push(&topic, b"c1", &command("s1", "c1", 100, 1_000))
            .expect("push");
        replayer.commit().expect("commit");
        drop(replayer);
        let (_, mut replayer, _) = worker_with(
            dir.path(),
            &[("KAIROS__DELIVERY__IN_APP__PROVIDER", "simulator")],
        );
        replayer.advance_to(T0 + 1_000).expect("the timer fires");
        replayer.commit().expect("commit");
        let partition = kairos_core::replay::partition_for(b"c1", config.kafka.partitions);
        let store = replayer.engine.store(partition).expect("store");
        assert!(store.scan_state(b"n/").expect("scan").is_empty());
    }

    /// A customer keeps the newest [`INBOX_KEPT`] messages; older ones go, with their
    /// expiry timers.
    /// A message kept before the customer opted out of in-app messages, or complained
    /// of promo, is not shown at the next poll, nor reported delivered.
    #[test]
    fn a_kept_message_goes_when_the_customer_withdraws_consent() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, mut replayer, _) = worker(dir.path());
        let topic = config.send_topic(Channel::in_app);
        let promo = |id: &str, customer: &str| {
            let mut cmd: SendCommand =
                serde_json::from_slice(&command(id, customer, 0, DAY)).expect("decode");
            cmd.category = MessageCategory::promo;
            serde_json::to_vec(&cmd).expect("encode")
        };
        for (id, customer, payload) in [
            ("m-1", "c1", promo("m-1", "c1")),
            ("m-2", "c1", command("m-2", "c1", 1, DAY)),
            ("m-3", "c2", command("m-3", "c2", 0, DAY)),
        ] {
            replayer
                .push(&topic, customer.as_bytes(), &payload)
                .unwrap_or_else(|e| panic!("{id}: {e}"));
        }
        // c1 complains of a promo on another channel; c2 opts out of in-app messages.
        let complaint = Outcome {
            outcome_id: "o-1".into(),
            send_id: "earlier".into(),
            customer_id: "c1".into(),
            scenario: "weekly_promo".into(),
            channel: Channel::email,
            category: MessageCategory::promo,
            kind: OutcomeKind::complained,
            reason: None,
            occurred_at: T0 + 2,
            address: None,
        };
        let opt_out = kairos_core::contracts::CustomerAction {
            channel: Some(Channel::in_app),
            ..kairos_core::contracts::CustomerAction::new(
                "a-1".into(),
                "c2".into(),
                kairos_core::contracts::CustomerActionKind::opt_out,
                T0 + 2,
            )
        };
        fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
            serde_json::to_vec(v).expect("encode")
        }
        replayer
            .push(&config.topic(topics::OUTCOMES), b"c1", &encode(&complaint))
            .expect("push");
        replayer
            .push(
                &config.topic(topics::CUSTOMER_ACTIONS),
                b"c2",
                &encode(&opt_out),
            )
            .expect("push");
        replayer.commit().expect("commit");
        let (c1, out) = poll(&mut replayer, "c1");
        assert_eq!(ids(&c1), ["m-2"], "the promo goes, the other stays");
        let delivered: Vec<Outcome> = out
            .iter()
            .filter(|o| o.topic == config.topic(topics::OUTCOMES))
            .map(|o| serde_json::from_slice(&o.payload).expect("outcome"))
            .collect();
        assert_eq!(delivered.len(), 1, "{delivered:?}");
        assert_eq!(delivered[0].send_id, "m-2");
        let (c2, _) = poll(&mut replayer, "c2");
        assert!(c2.is_empty(), "{c2:?}");
    }

    #[test]
    fn an_inbox_keeps_the_newest_messages() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, mut replayer, registry) = worker(dir.path());
        let topic = config.send_topic(Channel::in_app);
        let count = INBOX_KEPT as Millis + 2;
        for n in 0..count {
            let id = format!("s{n:03}");
            replayer
                .push(&topic, b"c1", &command(&id, "c1", n, DAY))
                .expect("push");
        }
        replayer.commit().expect("commit");
        let (live, _) = poll(&mut replayer, "c1");
        assert_eq!(live.len(), INBOX_KEPT);
        assert_eq!(live[0].send_id, format!("s{:03}", count - 1));
        assert_eq!(live[INBOX_KEPT - 1].send_id, "s002");
        let partition = kairos_core::replay::partition_for(b"c1", config.kafka.partitions);
        let store = replayer.engine.store(partition).expect("store");
        assert_eq!(store.scan_state(b"n/").expect("scan").len(), INBOX_KEPT);
        assert_eq!(
            store.timers_pending(),
            INBOX_KEPT as i64 + 1,
            "one expiry per message kept, and the send ids' sweep"
        );
        // One older than all of them, arriving late, is not shown: failed, not sent.
        let mut out = replayer
            .push(&topic, b"c1", &command("late", "c1", 0, DAY))
            .expect("push");
        out.extend(replayer.commit().expect("commit"));
        assert_eq!(outcomes(&config, &out, OutcomeKind::failed), ["late"]);
        assert!(outcomes(&config, &out, OutcomeKind::sent).is_empty());
        assert_eq!(poll(&mut replayer, "c1").0.len(), INBOX_KEPT);
        let requests = |result: &str| {
            let text = prometheus::TextEncoder::new()
                .encode_to_string(&registry.gather())
                .expect("metrics encode");
            let labels = format!("result=\"{result}\"");
            text.lines()
                .filter(|l| l.starts_with("kairos_provider_requests_total{"))
                .filter(|l| l.contains(&labels))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        };
        assert_eq!(
            (requests("accepted"), requests("inbox_full")),
            (count as f64, 1.0),
            "the late message was not taken"
        );
    }
}
