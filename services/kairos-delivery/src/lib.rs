//! Delivery workers: one per channel, each consuming its send topic.
//!
//! A worker renders the send's template, hands it to the channel's provider (SMTP,
//! HTTP or the simulator) and reports what happened on the outcomes topic, with
//! deterministic outcome ids. Exactly once toward the provider:
//!
//! - every send id it finished is recorded in the partition store, committed with the
//!   input offset, so a send command delivered twice reaches the provider once;
//! - the provider's acceptance is written to RocksDB the moment it arrives, before
//!   anything else, so a send accepted just before a crash is reported after the
//!   restart, not repeated. A send whose attempt a crash cut short before acceptance
//!   goes again. An SMTP send also writes a commit point just before the final ".",
//!   replicated without waiting (see `Ctx::put_now_unawaited`): a crash that moves
//!   the partition before the broker holds it repeats that send elsewhere. What
//!   remains beyond that is the instant between the provider's acceptance and its
//!   write; HTTP providers also get the send id as idempotency key, so a repeat is
//!   dropped on their side, and SMTP messages carry the send id as Message-ID.
//! - in-app messages are no provider call: they are kept in the customer's inbox in
//!   the partition store (see [`inbox`]), committed with the send.
//!
//! Transient provider errors are retried with exponential backoff and jitter, up to
//! `retry.max_attempts`, after which the send goes to the dead-letter topic; permanent
//! errors are not retried. A token bucket holds the provider's rate, and a circuit
//! breaker leaves a failing provider alone for a while. The worker handles one send at
//! a time per process, so a slow provider slows consumption (back-pressure) instead of
//! growing memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use kairos_core::admin::AdminState;
use kairos_core::config::{topics, Config, DeliveryChannelConfig, ProviderKind};
use kairos_core::contracts::{
    Channel, CustomerAction, CustomerActionKind, DeadLetter, DeadLetterReason, MessageCategory,
    Outcome, OutcomeKind, SendCommand,
};
use kairos_core::dedup::{Seen, SeenIds};
use kairos_core::encoding::{decode_internal, Rejection, SchemaRegistry};
use kairos_core::ids::deterministic_id;
use kairos_core::metrics;
use kairos_core::runtime::{Ctx, PartitionClaimed, Processor, Record};
use kairos_core::store::DueTimer;
use kairos_core::time::Millis;
use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec};
use serde::{Deserialize, Serialize};

pub mod inbox;
pub mod provider;
pub mod retry;
pub mod simulator;
pub mod templates;
#[cfg(test)]
mod test_smtp;
pub mod webhook;

use provider::{Provider, ProviderError};
use retry::CircuitBreaker;
use templates::{RenderedMessage, TemplateSet};

/// The value of a send's commit-point record (`k/<send id>`) once the server refused
/// the message after its "." (a 4xx or 5xx answer to the data): the message was not
/// kept, so the record no longer means "handed over". Real values are times, never
/// negative.
const COMMIT_POINT_WITHDRAWN: Millis = -1;

/// An outcome to report later (engagement arrives after delivery).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LaterOutcome {
    send: SendSummary,
    kind: OutcomeKind,
}

/// The part of a send command outcomes need.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SendSummary {
    send_id: String,
    customer_id: String,
    scenario: String,
    channel: Channel,
    category: kairos_core::contracts::MessageCategory,
    /// Where the send went, so a hard bounce names the address (absent in summaries
    /// stored by earlier versions).
    #[serde(default)]
    address: Option<String>,
}

impl From<&SendCommand> for SendSummary {
    fn from(c: &SendCommand) -> Self {
        SendSummary {
            send_id: c.send_id.clone(),
            customer_id: c.customer_id.clone(),
            scenario: c.scenario.clone(),
            channel: c.channel,
            category: c.category,
            address: c.address.clone(),
        }
    }
}

/// The prefix of the timer that tries a deferred send again (see [`DeferredSend`]).
/// Send ids are hex; the simulator's timers are `<send id>/<outcome>`.
const DEFERRED_TIMER_PREFIX: &str = "~deferred/";

/// How long before its valid-until a deferred send is tried for the last time: a try
/// due at the valid-until itself would find it expired (the wall clock has moved on
/// when the timer fires, and while the try waits for the rate limit).
const LAST_TRY_BEFORE_EXPIRY: Millis = kairos_core::time::MINUTE;

/// How often, and with what answer, the recipient's server put a send off.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Deferral {
    times: u32,
    last_reply: String,
}

/// A send the recipient's server put off (greylisting, a full mailbox: a 4xx to
/// `RCPT TO`), set aside as the payload of the timer that tries it again
/// (`~deferred/<send id>`), so the worker goes on with other customers' sends
/// meanwhile; a consent withdrawn or an address bounced in between is read before the
/// next try. Its send id stays taken: a copy of the command is skipped.
#[derive(Debug, Serialize, Deserialize)]
struct DeferredSend {
    /// The command as JSON (the contract's own encoding, whatever fields it gains).
    command: String,
    topic: String,
    offset: i64,
    deferral: Deferral,
}

/// What a URL may carry of an id as it is (RFC 3986's unreserved characters); the
/// rest is percent-encoded, so an id with "&", "#" or ">" neither changes the link
/// nor ends the header's "<...>".
const URL_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The opt-out link `template` of one send: `{customer_id}` and `{send_id}` filled in,
/// percent-encoded, and `{token}` made under `secret`.
fn unsubscribe_url(
    template: &str,
    customer_id: &str,
    send_id: &str,
    secret: Option<&str>,
) -> String {
    let encode = |v: &str| percent_encoding::utf8_percent_encode(v, URL_VALUE).to_string();
    let url = template
        .replace("{customer_id}", &encode(customer_id))
        .replace("{send_id}", &encode(send_id));
    match secret {
        Some(secret) => url.replace(
            "{token}",
            &kairos_core::ids::unsubscribe_token(secret, customer_id, send_id),
        ),
        None => url,
    }
}

/// The reason of a send that expired, after `earlier` deferrals if any.
fn expired_reason(earlier: Option<&Deferral>) -> String {
    match earlier {
        None => "expired".to_string(),
        Some(d) => format!(
            "expired: the recipient's server put it off {} times, last: {}",
            d.times, d.last_reply
        ),
    }
}

/// A send command with where it came from (for the dead-letter record).
pub struct SendInput {
    pub command: SendCommand,
    pub topic: String,
    pub offset: i64,
}

/// What a delivery worker reads: send commands, and what withdraws or gives back the
/// customer's consent after the arbiter decided (a command may wait on the send topic
/// behind a backlog while the customer unsubscribes).
pub enum DeliveryInput {
    Send(Box<SendInput>),
    Consent(ConsentSignal),
    /// Another outcome or action, or one this version cannot read: the arbiter is
    /// the one that dead-letters those.
    Ignored,
}

/// A change of the customer's consent that concerns this worker's sends.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsentSignal {
    pub customer_id: String,
    pub change: ConsentChange,
    pub at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsentChange {
    /// Unsubscribed or opted out on this worker's channel.
    Withdrawn,
    /// Opted in again on this worker's channel.
    Given,
    /// Marked a message (on any channel) as spam: no promo.
    Complained,
    /// An address of this worker's channel bounced hard: it is dead.
    Bounced(String),
}

/// How many dead addresses a customer's consent record keeps per worker (the newest).
const DEAD_ADDRESSES_KEPT: usize = 8;

/// A customer's consent as this worker knows it (`cs/<customer>`): the latest
/// withdrawal, opt-in and complaint it read, written only for customers who had one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct ConsentState {
    withdrawn_at: Option<Millis>,
    given_at: Option<Millis>,
    complained_at: Option<Millis>,
}

/// Addresses of this worker's channel that bounced hard for a customer, with when
/// (`cd/<customer>`, newest last): never sent to again, as the arbiter never sends to
/// them. A key of its own, so a worker of an earlier version still reads `cs/`.
type DeadAddresses = Vec<(String, Millis)>;

fn dead_addresses_key(customer_id: &str) -> String {
    ["cd/", customer_id].concat()
}

/// Why a send to `address` may not go out: it bounced hard already.
fn dead_address_block(dead: &DeadAddresses, address: &str) -> Option<String> {
    dead.iter()
        .find(|(a, _)| kairos_core::identifiers::same_address(a, address))
        .map(|(address, at)| {
            format!("invalid_address: {address} bounced hard at {at}, after the decision")
        })
}

/// Why `cmd` may not go out because its address bounced hard, if so.
fn dead_address(ctx: &Ctx<'_>, cmd: &SendCommand) -> anyhow::Result<Option<String>> {
    let Some(address) = &cmd.address else {
        return Ok(None);
    };
    let dead: Option<DeadAddresses> = ctx.get(&dead_addresses_key(&cmd.customer_id))?;
    Ok(dead.and_then(|d| dead_address_block(&d, address)))
}

/// Records `address` of `customer_id` as bounced hard at `at` (once; the newest
/// `DEAD_ADDRESSES_KEPT`).
fn note_dead_address(
    ctx: &mut Ctx<'_>,
    customer_id: &str,
    address: &str,
    at: Millis,
) -> anyhow::Result<()> {
    let key = dead_addresses_key(customer_id);
    let mut dead: DeadAddresses = ctx.get(&key)?.unwrap_or_default();
    if dead_address_block(&dead, address).is_some() {
        return Ok(());
    }
    if dead.len() >= DEAD_ADDRESSES_KEPT {
        dead.remove(0);
    }
    dead.push((address.to_string(), at));
    ctx.put(&key, &dead)
}

impl ConsentState {
    /// Why a send of `category` may not go out, if so. The arbiter's rules: a
    /// withdrawal holds until a later opt-in (one at the same instant loses), for
    /// transactional messages too, and a complaint ends promo. Whenever the withdrawal
    /// came: the arbiter may have decided before it read one dated earlier (the
    /// profile behind, a deferred message waking on its own timer).
    fn block(&self, channel: Channel, category: MessageCategory) -> Option<String> {
        if let Some(at) = self
            .withdrawn_at
            .filter(|w| self.given_at.is_none_or(|g| *w >= g))
        {
            return Some(format!(
                "consent_withdrawn: the customer unsubscribed from {channel} at {at}"
            ));
        }
        match (category, self.complained_at) {
            (MessageCategory::promo, Some(at)) => Some(format!(
                "consent_withdrawn: the customer marked a message as spam at {at}: no promo"
            )),
            _ => None,
        }
    }
}

fn consent_key(customer_id: &str) -> String {
    ["cs/", customer_id].concat()
}

/// How the provider attempts of one send ended.
#[derive(Debug)]
enum Delivery {
    Sent,
    /// The provider refused the address (a dead mailbox at `RCPT TO`, a 410).
    HardBounce(String),
    /// An address no provider is asked about (it does not parse): dead, never sent.
    DeadAddress(String),
    Failed(String),
    Expired,
    /// The message was handed over completely, but no answer came back.
    InDoubt(String),
    /// Every attempt failed transiently.
    Exhausted(String),
    /// The recipient's server put the message off (an answer to `RCPT TO`, before
    /// anything was handed over): tried again in minutes, not retried now.
    Deferred(String),
    /// No retry: the partition was claimed by another instance, or the attempt record
    /// could not be written.
    Stopped(anyhow::Error),
}

/// The results of `kairos_provider_requests_total` every worker has from the start
/// (an in-app worker also has `inbox_full`).
const PROVIDER_RESULTS: [&str; 5] = [
    "accepted",
    "transient_error",
    "permanent_error",
    "refused",
    "bounced",
];

struct DeliveryMetrics {
    provider_requests: IntCounterVec,
    provider_latency: HistogramVec,
    retries: IntCounterVec,
    circuit_open: IntGaugeVec,
    dead_letters: IntCounterVec,
    resumed: IntCounterVec,
    in_doubt: IntCounterVec,
    duplicates: IntCounterVec,
    consent_blocked: IntCounterVec,
    consent_changes: IntCounterVec,
    deferred: IntCounterVec,
}

pub struct DeliveryProcessor {
    channel: Channel,
    name: String,
    settings: DeliveryChannelConfig,
    send_topic: String,
    outcomes_topic: String,
    /// Read with the outcomes for consent withdrawn or given after a decision.
    actions_topic: String,
    dead_letter_topic: String,
    templates: TemplateSet,
    /// None for the simulator and the in-app inbox, which call nobody.
    provider: Option<Provider>,
    limiter: DefaultDirectRateLimiter,
    breaker: CircuitBreaker,
    /// Told the worker is alive between a send's attempts: retrying one send against a
    /// provider that is down can take longer than `/healthz` allows a silent loop, and
    /// a restart would not help.
    alive: Option<Arc<AdminState>>,
    metrics: DeliveryMetrics,
    /// Send ids taken, kept for `state.dedup_window` (the key `s/<send id>` as before
    /// ids expired).
    sends_seen: SeenIds,
}

impl DeliveryProcessor {
    pub fn new(
        config: &Config,
        channel: Channel,
        settings: DeliveryChannelConfig,
        registry: &prometheus::Registry,
    ) -> anyhow::Result<Self> {
        let templates = load_templates(config, channel)?;
        let provider = match settings.provider {
            ProviderKind::Smtp => {
                let smtp = settings.smtp.as_ref().ok_or_else(|| {
                    anyhow::anyhow!(
                        "delivery.{channel}: provider smtp needs [delivery.{channel}.smtp]"
                    )
                })?;
                let smtp = provider::SmtpProvider::new(smtp)?;
                Some(Provider::Smtp(Box::new(smtp)))
            }
            ProviderKind::Http => {
                let http = settings.http.as_ref().ok_or_else(|| {
                    anyhow::anyhow!(
                        "delivery.{channel}: provider http needs [delivery.{channel}.http]"
                    )
                })?;
                // A certificate file named relative to the configuration file.
                let mut http = http.clone();
                http.ca_file = http.ca_file.map(|f| config.beside_file(&f));
                let http = provider::HttpProvider::new(&http)?;
                Some(Provider::Http(http))
            }
            ProviderKind::Simulator | ProviderKind::InApp => None,
        };
        let quota = Quota::per_second(nonzero(settings.rate_limit.per_second))
            .allow_burst(nonzero(settings.rate_limit.burst));
        let m = DeliveryMetrics {
            provider_requests: metrics::counter_vec(
                registry,
                "kairos_provider_requests_total",
                "Requests to the delivery provider, by channel, provider and result: accepted, transient_error (retried), permanent_error (the request will never succeed), refused (the provider refuses the worker: credentials, sender, route), bounced (the address does not exist), inbox_full (in-app: older than every message the inbox keeps).",
                &["channel", "provider", "result"],
            ),
            provider_latency: metrics::histogram_vec(
                registry,
                "kairos_provider_request_duration_seconds",
                "Time the delivery provider took to answer a send request.",
                &["channel", "provider"],
                metrics::latency_buckets(),
            ),
            retries: metrics::counter_vec(
                registry,
                "kairos_provider_retries_total",
                "Provider requests repeated after a transient error.",
                &["channel", "provider"],
            ),
            circuit_open: metrics::gauge_vec(
                registry,
                "kairos_provider_circuit_open",
                "1 while the circuit breaker keeps requests away from a failing provider.",
                &["channel", "provider"],
            ),
            dead_letters: metrics::counter_vec(
                registry,
                "kairos_delivery_dead_letters_total",
                "Sends given up after every attempt failed, sent to the dead-letter topic.",
                &["channel"],
            ),
            resumed: metrics::counter_vec(
                registry,
                "kairos_delivery_resumed_sends_total",
                "Sends whose provider call a crash interrupted before acceptance, attempted again after the restart.",
                &["channel"],
            ),
            in_doubt: metrics::counter_vec(
                registry,
                "kairos_delivery_in_doubt_total",
                "Sends handed over completely whose answer a crash or timeout cut off: reported sent, not repeated.",
                &["channel"],
            ),
            consent_blocked: metrics::counter_vec(
                registry,
                "kairos_delivery_consent_withdrawn_total",
                "Sends not made because the customer withdrew consent (unsubscribed, opted out, complained of promo) after the decision.",
                &["channel"],
            ),
            consent_changes: metrics::counter_vec(
                registry,
                "kairos_delivery_consent_changes_total",
                "Unsubscribes, opt-outs, opt-ins and complaints the worker noted for its channel (read from outcomes and customer actions).",
                &["channel"],
            ),
            deferred: metrics::counter_vec(
                registry,
                "kairos_delivery_deferred_total",
                "Sends the recipient's server put off (a 4xx to RCPT TO: greylisting, a full mailbox), set aside and tried again after retry.deferral_backoff.",
                &["channel"],
            ),
            duplicates: metrics::counter_vec(
                registry,
                "kairos_delivery_duplicate_sends_total",
                "Send commands skipped because their send id was handled already (a copy of the command, or one re-produced after it went out).",
                &["channel"],
            ),
        };
        let processor = DeliveryProcessor {
            channel,
            name: format!("deliver-{}", channel.as_str()),
            send_topic: config.send_topic(channel),
            outcomes_topic: config.topic(topics::OUTCOMES),
            actions_topic: config.topic(topics::CUSTOMER_ACTIONS),
            dead_letter_topic: config.topic(topics::DEAD_LETTER),
            templates,
            provider,
            limiter: RateLimiter::direct(quota),
            breaker: CircuitBreaker::new(settings.circuit_breaker.clone()),
            alive: None,
            metrics: m,
            sends_seen: SeenIds::new("s/", "sx", config.state.dedup_window),
            settings,
        };
        // Every series exists from the start, so rates and alerts see zeros, not gaps.
        let labels = [channel.as_str(), processor.provider_name()];
        let in_app_results = processor.in_app().then_some("inbox_full");
        for result in PROVIDER_RESULTS.into_iter().chain(in_app_results) {
            processor
                .metrics
                .provider_requests
                .with_label_values(&[labels[0], labels[1], result]);
        }
        processor
            .metrics
            .provider_latency
            .with_label_values(&labels);
        processor.metrics.retries.with_label_values(&labels);
        processor.metrics.circuit_open.with_label_values(&labels);
        for per_channel in [
            &processor.metrics.dead_letters,
            &processor.metrics.resumed,
            &processor.metrics.in_doubt,
            &processor.metrics.duplicates,
            &processor.metrics.consent_blocked,
            &processor.metrics.consent_changes,
            &processor.metrics.deferred,
        ] {
            per_channel.with_label_values(&[labels[0]]);
        }
        Ok(processor)
    }

    /// Messages go to the customers' inboxes (see [`inbox`]).
    fn in_app(&self) -> bool {
        self.settings.provider == ProviderKind::InApp
    }

    fn provider_name(&self) -> &'static str {
        self.settings.provider.as_str()
    }

    fn emit_outcome(
        &self,
        ctx: &mut Ctx<'_>,
        send: &SendSummary,
        kind: OutcomeKind,
        reason: Option<String>,
        at: Millis,
    ) {
        let outcome_id = deterministic_id(&[&send.send_id, kind.as_str()]);
        self.emit_outcome_with_id(ctx, send, outcome_id, kind, reason, at);
    }

    /// As [`Self::emit_outcome`], for an outcome a send may have several of (each
    /// time the recipient's server puts it off).
    fn emit_outcome_with_id(
        &self,
        ctx: &mut Ctx<'_>,
        send: &SendSummary,
        outcome_id: String,
        kind: OutcomeKind,
        reason: Option<String>,
        at: Millis,
    ) {
        let outcome = Outcome {
            outcome_id,
            send_id: send.send_id.clone(),
            customer_id: send.customer_id.clone(),
            scenario: send.scenario.clone(),
            channel: send.channel,
            category: send.category,
            kind,
            reason,
            occurred_at: at,
            address: send.address.clone(),
        };
        let topic = self.outcomes_topic.clone();
        ctx.emit(&topic, &send.customer_id, &outcome);
    }

    /// Reports a hard bounce of the send's address, noted at once, not only when the
    /// outcome comes back from its topic: the next send to the address may be the
    /// next record.
    fn report_dead_address(
        &self,
        ctx: &mut Ctx<'_>,
        send: &SendSummary,
        reason: String,
        now: Millis,
    ) -> anyhow::Result<()> {
        if let Some(address) = &send.address {
            note_dead_address(ctx, &send.customer_id, address, now)?;
        }
        self.emit_outcome(ctx, send, OutcomeKind::bounced_hard, Some(reason), now);
        Ok(())
    }

    /// The send's message: its template over its variables and what every template
    /// may use besides, with the send's opt-out link.
    fn render(&self, cmd: &SendCommand) -> Result<RenderedMessage, String> {
        let mut vars: serde_json::Value = serde_json::from_str(&cmd.variables)
            .map_err(|e| format!("template: variables are not JSON: {e}"))?;
        let unsubscribe_url = self.settings.list_unsubscribe().map(|url| {
            let secret = self.settings.unsubscribe_secret.as_deref();
            unsubscribe_url(url, &cmd.customer_id, &cmd.send_id, secret)
        });
        if let Some(m) = vars.as_object_mut() {
            m.entry("customer_id")
                .or_insert(cmd.customer_id.clone().into());
            m.insert("send_id".into(), cmd.send_id.clone().into());
            m.insert("scenario".into(), cmd.scenario.clone().into());
            // The link of the `List-Unsubscribe` header, for the body too: a mail
            // client that does not show the header still shows an opt-out.
            if let Some(url) = &unsubscribe_url {
                m.insert("unsubscribe_url".into(), url.as_str().into());
            }
        }
        let message = self
            .templates
            .render(&cmd.template, &vars)
            .map_err(|e| format!("template: {e}"))?;
        Ok(RenderedMessage {
            unsubscribe_url,
            ..message
        })
    }

    fn simulate(&self, ctx: &mut Ctx<'_>, cmd: &SendCommand) -> anyhow::Result<()> {
        let now = ctx.now();
        let send = SendSummary::from(cmd);
        let started = Instant::now();
        let plan = simulator::plan(&self.settings.simulator, &cmd.send_id, now);
        self.metrics
            .provider_requests
            .with_label_values(&[self.channel.as_str(), "simulator", "accepted"])
            .inc();
        self.metrics
            .provider_latency
            .with_label_values(&[self.channel.as_str(), "simulator"])
            .observe(started.elapsed().as_secs_f64());
        self.emit_outcome(ctx, &send, OutcomeKind::sent, None, now);
        for (kind, at) in plan {
            if at <= now {
                self.emit_outcome(ctx, &send, kind, None, now);
            } else {
                ctx.schedule(
                    &format!("{}/{}", cmd.send_id, kind.as_str()),
                    at,
                    &LaterOutcome {
                        send: send.clone(),
                        kind,
                    },
                )?;
            }
        }
        Ok(())
    }

    /// Reports to `admin`'s health check between a send's attempts too.
    pub fn reporting_to(mut self, admin: Arc<AdminState>) -> Self {
        self.alive = Some(admin);
        self
    }

    fn beat(&self) {
        if let Some(admin) = &self.alive {
            admin.heartbeat();
        }
    }

    /// Waits `total` (a backoff, an open breaker) with heartbeats (see
    /// [`sleep_beating`]).
    async fn wait_beating(&self, total: Duration) {
        sleep_beating(total, || self.beat()).await;
    }

    /// Attempts the send until it succeeds, fails for good, expires or runs out of
    /// attempts.
    async fn attempts(
        &mut self,
        cmd: &SendCommand,
        message: &RenderedMessage,
        now: Millis,
        hooks: AttemptHooks<'_>,
    ) -> Delivery {
        let AttemptHooks {
            commit_point,
            withdraw_commit_point,
            before_call,
            resumed,
        } = hooks;
        let committed = std::cell::Cell::new(false);
        let mark = || {
            committed.set(true);
            commit_point();
        };
        let Some(provider) = &self.provider else {
            return Delivery::Failed("no provider".into());
        };
        // Refused before any request: the breaker is neither helped nor hurt (a
        // half-open one would otherwise close on an address that does not parse).
        let prepared = match provider.prepare(cmd, message) {
            Ok(prepared) => prepared,
            Err(ProviderError::HardBounce(e)) => return Delivery::DeadAddress(e),
            Err(ProviderError::Permanent(e)) => return Delivery::Failed(e),
            Err(e) => return Delivery::Failed(e.to_string()),
        };
        let labels = [self.channel.as_str(), provider.name()];
        let max = self.settings.retry.max_attempts;
        // The partition's clock at the start, advanced by the time spent retrying (so
        // event-time replays do not expire on the wall clock).
        let (now_at_start, started_all) = (now, Instant::now());
        let mut last_error = String::new();
        let past_valid =
            || cmd.valid_until < now_at_start + started_all.elapsed().as_millis() as Millis;
        let expired = |may_be_held: Option<String>| match may_be_held {
            Some(e) => Delivery::InDoubt(format!("{e}, then it expired")),
            None => Delivery::Expired,
        };
        // Set once an attempt may have left the message with an HTTP gateway (a 409 for
        // its idempotency key, or no answer in time): if the attempts then run out or
        // the message expires, it is in doubt (reported sent, not repeated), not
        // failed and dead-lettered, whose re-drive could send it again. (An SMTP
        // conversation that got no answer before the "." left nothing behind.)
        // A request a crash cut short (this send is resumed) may be held already.
        let mut may_be_held: Option<String> = (resumed && matches!(provider, Provider::Http(_)))
            .then(|| "a crash cut an earlier request to the gateway short".to_string());
        for attempt in 1..=max {
            // Each attempt and each wait is bounded (the provider's timeout, the
            // backoff's cap, the breaker's `open_for`): a beat before each keeps a
            // retrying worker healthy, and a hung one still goes silent.
            self.beat();
            // Until neither the breaker nor a provider's asked-for wait holds it.
            loop {
                let wait = self.breaker.wait(Instant::now());
                if wait.is_zero() {
                    break;
                }
                self.show_breaker(&labels);
                self.wait_beating(wait).await;
            }
            self.show_breaker(&labels);
            self.limiter.until_ready().await;
            // Expired in a wait: no attempt record is written for a call never made.
            if past_valid() {
                return expired(may_be_held);
            }
            // Every call must find the partition still this instance's: a worker
            // paused or cut off during a backoff (or while the breaker held the first
            // call) would otherwise make a call its new owner makes too. The write
            // that checks it is also the record that a call is under way, which a
            // restart after a crash finds (see `deliver`).
            if let Err(e) = before_call() {
                return Delivery::Stopped(e);
            }
            // After every wait, the acknowledged write just above included: a call
            // past the message's valid-until is not made.
            if past_valid() {
                return expired(may_be_held);
            }
            let started = Instant::now();
            // Only this attempt's "." can leave the message in doubt.
            committed.set(false);
            let result = provider.send(cmd, message, &prepared, &mark).await;
            // The server answered after the "." and refused: it does not keep the
            // message, so neither a later attempt's lost answer nor a crash may take it
            // as handed over.
            let refused = matches!(
                result,
                Err(ProviderError::Transient(_)
                    | ProviderError::RecipientDeferred(_)
                    | ProviderError::Throttled(..)
                    | ProviderError::Permanent(_)
                    | ProviderError::HardBounce(_)
                    | ProviderError::Refused(_))
            );
            let refused_after_dot = refused && committed.get();
            match &result {
                Err(ProviderError::InProgress(e)) => {
                    may_be_held = Some(format!("the gateway had the request in progress ({e})"))
                }
                Err(ProviderError::NoAnswer(e)) if matches!(provider, Provider::Http(_)) => {
                    may_be_held = Some(format!("the gateway did not answer ({e})"))
                }
                _ => {}
            }
            if refused_after_dot {
                withdraw_commit_point();
                committed.set(false);
            }
            self.metrics
                .provider_latency
                .with_label_values(&labels)
                .observe(started.elapsed().as_secs_f64());
            let result_label = match &result {
                Ok(()) => "accepted",
                Err(
                    ProviderError::Transient(_)
                    | ProviderError::RecipientDeferred(_)
                    | ProviderError::Throttled(..)
                    | ProviderError::NoAnswer(_)
                    | ProviderError::InProgress(_),
                ) => "transient_error",
                Err(ProviderError::Refused(_)) => "refused",
                // The address's fault, not the provider's: the bounce rate's business.
                Err(ProviderError::HardBounce(_)) => "bounced",
                Err(_) => "permanent_error",
            };
            self.metrics
                .provider_requests
                .with_label_values(&[labels[0], labels[1], result_label])
                .inc();
            // The gauge follows the breaker now, not at the next send: the failure
            // that opens it may be the last attempt before the topic goes quiet.
            let asked_to_wait = match &result {
                Err(ProviderError::Throttled(_, wait)) => Some(*wait),
                _ => None,
            };
            if let Some(wait) = asked_to_wait {
                // Also after the last attempt: the next send waits too.
                self.breaker.hold_off(Instant::now(), wait);
            }
            let delivery = Self::judge(
                &mut self.breaker,
                cmd,
                attempt,
                result,
                committed.get(),
                &mut last_error,
            );
            self.show_breaker(&labels);
            match delivery {
                Some(delivery) => return delivery,
                None if attempt < max => {
                    self.metrics.retries.with_label_values(&labels).inc();
                    let backoff =
                        retry::backoff(&self.settings.retry, attempt, &mut rand::thread_rng());
                    self.wait_beating(retry::after_asked(backoff, asked_to_wait))
                        .await;
                }
                None => {}
            }
        }
        match may_be_held {
            Some(e) => Delivery::InDoubt(format!("{e}; the attempts ran out ({last_error})")),
            None => Delivery::Exhausted(last_error),
        }
    }

    fn show_breaker(&self, labels: &[&str; 2]) {
        let open = self.breaker.is_open(Instant::now());
        self.metrics
            .circuit_open
            .with_label_values(labels)
            .set(i64::from(open));
    }

    /// What an attempt's `result` means for the send (None: try again) and for the
    /// breaker; a retried error becomes `last_error`.
    fn judge(
        breaker: &mut CircuitBreaker,
        cmd: &SendCommand,
        attempt: u32,
        result: Result<(), ProviderError>,
        committed: bool,
        last_error: &mut String,
    ) -> Option<Delivery> {
        match result {
            Ok(()) => {
                breaker.success();
                Some(Delivery::Sent)
            }
            // The provider answered: it is healthy, the message is not.
            Err(ProviderError::HardBounce(e)) => {
                breaker.success();
                Some(Delivery::HardBounce(e))
            }
            Err(ProviderError::Permanent(e)) => {
                breaker.success();
                Some(Delivery::Failed(e))
            }
            // The whole message went out but the answer did not come back: the
            // provider may well keep it, so it is not sent again.
            Err(ProviderError::NoAnswer(e)) if committed => {
                breaker.failure(Instant::now());
                Some(Delivery::InDoubt(e))
            }
            // The gateway answered: it holds the message, whose request is still in
            // progress. Asked again; once the attempts run out, in doubt (see
            // `may_be_held` in `attempts`).
            Err(ProviderError::InProgress(e)) => {
                breaker.success();
                *last_error = e;
                None
            }
            // The server answered and puts off this recipient only: set aside and
            // tried again in minutes (greylisting asks for that much), the provider
            // taken as up (a few greylisted addresses in a row must not hold back
            // every other customer's message).
            Err(e @ ProviderError::RecipientDeferred(_)) => {
                tracing::info!(send_id = %cmd.send_id, attempt, error = %e, "recipient deferred");
                breaker.success();
                Some(Delivery::Deferred(e.to_string()))
            }
            // A refusal of the worker itself counts against the breaker like an
            // outage, so a misconfigured provider is left alone instead of
            // failing the backlog at full speed.
            Err(
                e @ (ProviderError::Transient(_)
                | ProviderError::Throttled(..)
                | ProviderError::NoAnswer(_)
                | ProviderError::Refused(_)),
            ) => {
                tracing::warn!(send_id = %cmd.send_id, attempt, error = %e, "provider error");
                breaker.failure(Instant::now());
                *last_error = e.to_string();
                None
            }
        }
    }

    /// A crash after the provider accepted the send, or after the whole message was
    /// handed over (the provider keeps it then): reported sent, never repeated, before
    /// anything else is checked (it may have expired or its template changed since,
    /// but it went out). True if the send was finished so.
    fn finish_handed_over_before_crash(
        &mut self,
        ctx: &mut Ctx<'_>,
        cmd: &SendCommand,
    ) -> anyhow::Result<bool> {
        let before_crash = if ctx.get::<Millis>(&format!("a/{}", cmd.send_id))?.is_some() {
            Some(None)
        } else if ctx
            .get::<Millis>(&format!("k/{}", cmd.send_id))?
            .is_some_and(|at| at != COMMIT_POINT_WITHDRAWN)
        {
            self.metrics
                .in_doubt
                .with_label_values(&[self.channel.as_str()])
                .inc();
            Some(Some(
                "in_doubt: handed over completely before a crash; not repeated".to_string(),
            ))
        } else {
            None
        };
        let Some(reason) = before_crash else {
            return Ok(false);
        };
        self.emit_outcome(
            ctx,
            &SendSummary::from(cmd),
            OutcomeKind::sent,
            reason,
            ctx.now(),
        );
        self.forget_attempt(ctx, &cmd.send_id);
        Ok(true)
    }

    fn deliver(
        &mut self,
        ctx: &mut Ctx<'_>,
        input: &SendInput,
        message: RenderedMessage,
        earlier: Option<&Deferral>,
    ) -> anyhow::Result<()> {
        let cmd = &input.command;
        let send = SendSummary::from(cmd);
        let committed_key = format!("k/{}", cmd.send_id);
        let attempt_key = format!("w/{}", cmd.send_id);
        // Written (acknowledged) just before each call: found here, a call was under
        // way when a crash came, and the provider may have it.
        let resumed = ctx.get::<Millis>(&attempt_key)?.is_some();
        if resumed {
            // An attempt was cut short before the provider accepted it: it goes again.
            self.metrics
                .resumed
                .with_label_values(&[self.channel.as_str()])
                .inc();
        }
        let started_at = ctx.now();
        let commit_point = || {
            // Not awaited: the "." follows at once, and a kill while the broker is
            // asked would leave a send recorded as handed over that never was.
            if let Err(e) = ctx.put_now_unawaited(&committed_key, &started_at) {
                tracing::error!(send_id = %cmd.send_id, error = %e, "cannot record the commit point");
            }
        };
        let withdraw_commit_point = || {
            if let Err(e) = ctx.put_now_unawaited(&committed_key, &COMMIT_POINT_WITHDRAWN) {
                tracing::error!(send_id = %cmd.send_id, error = %e, "cannot withdraw the commit point");
            }
        };
        // The attempt record, written and acknowledged before each call, checks the
        // claim.
        let before_call = || ctx.put_now(&attempt_key, &started_at);
        let delivery = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(self.attempts(
                cmd,
                &message,
                started_at,
                AttemptHooks {
                    commit_point: &commit_point,
                    withdraw_commit_point: &withdraw_commit_point,
                    before_call: &before_call,
                    resumed,
                },
            ))
        });
        let now = ctx.now();
        match delivery {
            // No further call: the partition's new owner makes it, or the broker does
            // not take the attempt record (the batch fails, and the send is resumed).
            Delivery::Stopped(e) => return Err(e),
            Delivery::Sent => {
                // Durable at once: the moment between the provider's acceptance and
                // this write is the only one in which a crash can repeat the send.
                // Should the changelog not take it, the local record and the batch's
                // `s/` record still guard; failing the batch here would stop the
                // process and hand the partition to an instance that knows neither.
                if let Err(e) = ctx.put_now(&format!("a/{}", cmd.send_id), &now) {
                    if e.downcast_ref::<PartitionClaimed>().is_some() {
                        // The record is written, but the partition has a new owner,
                        // which reports this send from what it restored: this instance
                        // makes no further call and stops (see `Ctx::put_now`).
                        return Err(e);
                    }
                    tracing::error!(send_id = %cmd.send_id, error = %e, "cannot record the provider's acceptance");
                }
                self.emit_outcome(ctx, &send, OutcomeKind::sent, None, now)
            }
            Delivery::HardBounce(e) => {
                // Sent as ESPs count sends, bounces included: a bounce at the provider's
                // door is one of the messages the bounce and delivery rates are over.
                self.emit_outcome(ctx, &send, OutcomeKind::sent, None, now);
                self.report_dead_address(ctx, &send, e, now)?
            }
            // An address that does not parse reached no provider: not sent.
            Delivery::DeadAddress(e) => self.report_dead_address(ctx, &send, e, now)?,
            Delivery::Failed(e) => {
                let reason = if e.starts_with("invalid_address") {
                    e
                } else {
                    format!("permanent: {e}")
                };
                self.emit_outcome(ctx, &send, OutcomeKind::failed, Some(reason), now)
            }
            Delivery::Expired => {
                let reason = expired_reason(earlier);
                self.emit_outcome(ctx, &send, OutcomeKind::failed, Some(reason), now)
            }
            // Nothing was handed over: its write-ahead records go as for a finished
            // send, and the next try writes its own.
            Delivery::Deferred(reply) => self.defer(ctx, input, &send, earlier, reply, now)?,
            Delivery::InDoubt(e) => {
                self.metrics
                    .in_doubt
                    .with_label_values(&[self.channel.as_str()])
                    .inc();
                self.emit_outcome(
                    ctx,
                    &send,
                    OutcomeKind::sent,
                    Some(format!(
                        "in_doubt: handed over completely, then {e}; not repeated"
                    )),
                    now,
                )
            }
            Delivery::Exhausted(e) => {
                let reason = format!(
                    "retries_exhausted: {} attempts, last error: {e}",
                    self.settings.retry.max_attempts
                );
                self.give_up(ctx, input, &reason, now)?;
                self.emit_outcome(ctx, &send, OutcomeKind::failed, Some(reason), now);
            }
        }
        self.forget_attempt(ctx, &cmd.send_id);
        Ok(())
    }

    /// Sets a send the recipient's server put off aside (see [`DeferredSend`]) until
    /// the next try, [`LAST_TRY_BEFORE_EXPIRY`] before its valid-until at the latest;
    /// one that has no try left fails as expired.
    fn defer(
        &self,
        ctx: &mut Ctx<'_>,
        input: &SendInput,
        send: &SendSummary,
        earlier: Option<&Deferral>,
        reply: String,
        now: Millis,
    ) -> anyhow::Result<()> {
        let cmd = &input.command;
        let deferral = Deferral {
            times: earlier.map_or(0, |d| d.times) + 1,
            last_reply: reply,
        };
        self.metrics
            .deferred
            .with_label_values(&[self.channel.as_str()])
            .inc();
        let wait = retry::deferral_wait(&self.settings.retry, deferral.times).as_millis();
        let retry_at = now
            .saturating_add(Millis::try_from(wait).unwrap_or(Millis::MAX))
            .min(cmd.valid_until - LAST_TRY_BEFORE_EXPIRY);
        if retry_at <= now {
            let reason = expired_reason(Some(&deferral));
            self.emit_outcome(ctx, send, OutcomeKind::failed, Some(reason), now);
            return Ok(());
        }
        tracing::info!(
            send_id = %cmd.send_id,
            times = deferral.times,
            retry_at,
            reply = %deferral.last_reply,
            "the recipient's server put the send off; set aside"
        );
        // Told, so that the arbiter holds the next step of a cascade until the
        // message has left (and explain shows why it has not yet).
        let times = deferral.times.to_string();
        self.emit_outcome_with_id(
            ctx,
            send,
            deterministic_id(&[&cmd.send_id, OutcomeKind::deferred.as_str(), &times]),
            OutcomeKind::deferred,
            Some(format!(
                "the recipient's server put it off ({times}): {}; tried again at {retry_at}",
                deferral.last_reply
            )),
            now,
        );
        let set_aside = DeferredSend {
            command: serde_json::to_string(cmd).context("cannot keep the deferred command")?,
            topic: input.topic.clone(),
            offset: input.offset,
            deferral,
        };
        ctx.schedule(
            &[DEFERRED_TIMER_PREFIX, &cmd.send_id].concat(),
            retry_at,
            &set_aside,
        )
    }

    /// Drops the write-ahead records of a finished send in the batch that records it
    /// finished (`s/<send id>`), which is what guards against a repeat from then on.
    fn forget_attempt(&self, ctx: &mut Ctx<'_>, send_id: &str) {
        for prefix in ["w", "k", "a"] {
            ctx.delete(&format!("{prefix}/{send_id}"));
        }
    }

    /// A send that ends without a call (consent withdrawn, address dead, expired,
    /// template broken): failed with `reason`. One whose attempt a crash cut short
    /// drops its write-ahead records too, or they would stay for good; if that attempt
    /// was an HTTP request, the gateway may hold it (no "." tells, as in SMTP): it is
    /// sent and in doubt, not failed.
    fn end_without_call(
        &self,
        ctx: &mut Ctx<'_>,
        cmd: &SendCommand,
        send: &SendSummary,
        reason: String,
    ) -> anyhow::Result<OutcomeKind> {
        let cut =
            self.provider.is_some() && ctx.get::<Millis>(&format!("w/{}", cmd.send_id))?.is_some();
        let (kind, reason) = if cut && matches!(self.provider, Some(Provider::Http(_))) {
            self.metrics
                .in_doubt
                .with_label_values(&[self.channel.as_str()])
                .inc();
            let doubt = format!(
                "in_doubt: a crash cut a request to the gateway short, which may hold it; \
                 then {reason}; not repeated"
            );
            (OutcomeKind::sent, doubt)
        } else {
            (OutcomeKind::failed, reason)
        };
        self.emit_outcome(ctx, send, kind, Some(reason), ctx.now());
        if cut {
            self.forget_attempt(ctx, &cmd.send_id);
        }
        Ok(kind)
    }

    /// Gives a send that went nowhere up to the dead-letter topic with `reason` and
    /// frees its send id: the command re-produced from there (once the provider or
    /// the template is fixed) is sent, not skipped as a copy.
    fn give_up(
        &self,
        ctx: &mut Ctx<'_>,
        input: &SendInput,
        reason: &str,
        now: Millis,
    ) -> anyhow::Result<()> {
        self.dead_letter(ctx, input, reason, now);
        self.sends_seen.forget(ctx, &input.command.send_id)
    }

    fn dead_letter(&self, ctx: &mut Ctx<'_>, input: &SendInput, reason: &str, now: Millis) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let cmd = &input.command;
        // The input's place in the id: the same command re-driven from the letter and
        // failing again is another letter, not a copy of the first.
        let letter = DeadLetter {
            dead_letter_id: deterministic_id(&[
                &self.name,
                &cmd.send_id,
                "undeliverable",
                &input.topic,
                &ctx.partition.to_string(),
                &input.offset.to_string(),
            ]),
            service: self.name.clone(),
            source_topic: input.topic.clone(),
            source_partition: ctx.partition,
            source_offset: input.offset,
            reason_code: DeadLetterReason::processing_error,
            reason: kairos_core::encoding::cut_reason(reason.to_string()),
            key_base64: Some(b64.encode(cmd.customer_id.as_bytes())),
            payload_base64: b64.encode(serde_json::to_vec(cmd).unwrap_or_default()),
            failed_at: now,
        };
        self.metrics
            .dead_letters
            .with_label_values(&[self.channel.as_str()])
            .inc();
        ctx.dead_letter(&self.dead_letter_topic, &cmd.customer_id, &letter);
    }
}

/// What a send's attempts tell the worker's state, and what it tells them.
#[derive(Clone, Copy)]
struct AttemptHooks<'a> {
    /// The whole message was handed over (an SMTP "."): recorded at once.
    commit_point: &'a dyn Fn(),
    /// The server refused what was handed over: the commit point no longer holds.
    withdraw_commit_point: &'a dyn Fn(),
    /// Before each call: an acknowledged write (the record that a call is under way)
    /// that fails once another instance claimed the partition.
    before_call: &'a dyn Fn() -> anyhow::Result<()>,
    /// An earlier attempt of this send was cut short by a crash.
    resumed: bool,
}

#[cfg(test)]
impl AttemptHooks<'static> {
    /// Hooks that record nothing and find the partition always this instance's.
    const NONE: Self = AttemptHooks {
        commit_point: &|| {},
        withdraw_commit_point: &|| {},
        before_call: &|| Ok(()),
        resumed: false,
    };
}

fn nonzero(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n.max(1)).unwrap_or(std::num::NonZeroU32::MIN)
}

/// Loads the channel's templates and checks that every scenario sending on the
/// channel has its templates there, so a missing file stops the worker at start-up,
/// not at the first send.
pub fn load_templates(config: &Config, channel: Channel) -> anyhow::Result<TemplateSet> {
    let dir = config.templates_dir();
    let templates = TemplateSet::load(&dir, channel)?;
    for s in config
        .scenarios
        .iter()
        .filter(|s| s.enabled && s.channels.contains(&channel))
    {
        for t in std::iter::once(&s.template).chain(s.steps.iter().map(|st| &st.template)) {
            if !templates.contains(t) {
                anyhow::bail!(
                    "{}: scenario {:?} sends template {t:?} on {channel}, but {} has no [{channel}] section (or does not exist)",
                    config.source_file.display(),
                    s.name,
                    dir.join(format!("{t}.toml")).display()
                );
            }
        }
    }
    Ok(templates)
}

impl DeliveryProcessor {
    /// Reads an outcome or a customer action for what it says of consent on this
    /// worker's channel.
    fn consent_signal(&self, record: &Record<'_>) -> DeliveryInput {
        let from_outcome = |o: &Outcome| {
            let change = match o.kind {
                OutcomeKind::unsubscribed if o.channel == self.channel => ConsentChange::Withdrawn,
                OutcomeKind::complained => ConsentChange::Complained,
                OutcomeKind::bounced_hard if o.channel == self.channel => match &o.address {
                    Some(address) => ConsentChange::Bounced(address.clone()),
                    None => return DeliveryInput::Ignored,
                },
                _ => return DeliveryInput::Ignored,
            };
            DeliveryInput::Consent(ConsentSignal {
                customer_id: o.customer_id.clone(),
                change,
                at: o.occurred_at,
            })
        };
        if record.topic == self.outcomes_topic {
            return match decode_internal::<Outcome>(record.payload) {
                Ok(o) => from_outcome(&o),
                Err(_) => DeliveryInput::Ignored,
            };
        }
        let Ok(a) = decode_internal::<CustomerAction>(record.payload) else {
            return DeliveryInput::Ignored;
        };
        let change = match a.kind {
            // An outcome of a merged-away id, sent on to this customer by the arbiter.
            CustomerActionKind::outcome => {
                return match a.state.as_deref().map(serde_json::from_str::<Outcome>) {
                    Some(Ok(o)) => from_outcome(&o),
                    _ => DeliveryInput::Ignored,
                };
            }
            _ if a.channel != Some(self.channel) => return DeliveryInput::Ignored,
            CustomerActionKind::opt_out => ConsentChange::Withdrawn,
            CustomerActionKind::opt_in => ConsentChange::Given,
            _ => return DeliveryInput::Ignored,
        };
        DeliveryInput::Consent(ConsentSignal {
            customer_id: a.customer_id,
            change,
            at: a.occurred_at,
        })
    }

    fn apply_consent(&self, ctx: &mut Ctx<'_>, signal: &ConsentSignal) -> anyhow::Result<()> {
        let at = signal.at;
        let field: fn(&mut ConsentState) -> &mut Option<Millis> = match &signal.change {
            ConsentChange::Bounced(address) => {
                return note_dead_address(ctx, &signal.customer_id, address, at)
            }
            ConsentChange::Withdrawn => |s| &mut s.withdrawn_at,
            ConsentChange::Given => |s| &mut s.given_at,
            ConsentChange::Complained => |s| &mut s.complained_at,
        };
        let key = consent_key(&signal.customer_id);
        let mut state: ConsentState = ctx.get(&key)?.unwrap_or_default();
        let slot = field(&mut state);
        if slot.is_some_and(|known| known >= at) {
            return Ok(()); // a repeat, or older than what is known
        }
        *slot = Some(at);
        self.metrics
            .consent_changes
            .with_label_values(&[self.channel.as_str()])
            .inc();
        ctx.put(&key, &state)
    }

    /// Why the customer's consent no longer allows `cmd`, if so.
    fn consent_block(&self, ctx: &Ctx<'_>, cmd: &SendCommand) -> anyhow::Result<Option<String>> {
        let state: Option<ConsentState> = ctx.get(&consent_key(&cmd.customer_id))?;
        Ok(state.and_then(|s| s.block(self.channel, cmd.category)))
    }
}

impl Processor for DeliveryProcessor {
    type Input = DeliveryInput;

    fn name(&self) -> &str {
        &self.name
    }

    /// Provider-call records go to the changelog before each call.
    fn writes_ahead(&self) -> bool {
        true
    }

    /// The breaker's gauge falls back to 0 once `open_for` is over, whether or not a
    /// send comes to try the provider again.
    fn refresh_gauges(&self) {
        if let Some(provider) = &self.provider {
            self.show_breaker(&[self.channel.as_str(), provider.name()]);
        }
    }

    fn inputs(&self) -> Vec<String> {
        vec![
            self.send_topic.clone(),
            self.outcomes_topic.clone(),
            self.actions_topic.clone(),
        ]
    }

    /// Only sends are slow; consent records ride along in their batches.
    fn counts_towards_batch(&self, topic: &str) -> bool {
        topic == self.send_topic
    }

    fn outputs(&self) -> Vec<String> {
        vec![self.outcomes_topic.clone()]
    }

    /// Provider calls take milliseconds to seconds each: one send per batch keeps the
    /// consumer polling (and the liveness heartbeat beating) between sends.
    fn max_batch_records(&self) -> Option<usize> {
        self.provider.as_ref().map(|_| 1)
    }

    /// A deferred send's timer makes a provider call: one a round, each committed and
    /// published as it finishes.
    fn max_timers_per_round(&self) -> Option<usize> {
        self.provider.as_ref().map(|_| 1)
    }

    fn decode(&self, record: &Record<'_>) -> Result<DeliveryInput, Rejection> {
        if record.topic != self.send_topic {
            return Ok(self.consent_signal(record));
        }
        let cmd: SendCommand = decode_internal(record.payload)?;
        if cmd.channel != self.channel {
            return Err(Rejection::new(
                DeadLetterReason::invalid_field,
                format!(
                    "send command for channel {} on the {} topic",
                    cmd.channel, self.channel
                ),
            ));
        }
        Ok(DeliveryInput::Send(Box::new(SendInput {
            command: cmd,
            topic: record.topic.to_string(),
            offset: record.offset,
        })))
    }

    /// Sends move the clock in event time; consent records, dated by whoever reported
    /// them, do not.
    fn event_time(&self, input: &DeliveryInput) -> Option<Millis> {
        match input {
            DeliveryInput::Send(s) => Some(s.command.created_at),
            _ => None,
        }
    }

    fn process(&mut self, ctx: &mut Ctx<'_>, input: DeliveryInput) -> anyhow::Result<()> {
        let input = match input {
            DeliveryInput::Send(send) => send,
            DeliveryInput::Consent(signal) => return self.apply_consent(ctx, &signal),
            DeliveryInput::Ignored => return Ok(()),
        };
        let cmd = &input.command;
        let now = ctx.now();
        let send = SendSummary::from(cmd);
        match self.sends_seen.check(ctx, &cmd.send_id, cmd.created_at)? {
            Seen::First => {}
            Seen::Again => {
                tracing::info!(send_id = %cmd.send_id, "send id handled already; command skipped");
                self.metrics
                    .duplicates
                    .with_label_values(&[self.channel.as_str()])
                    .inc();
                return Ok(());
            }
            Seen::BeforeWindow => {
                // Its id may have been taken and forgotten: never sent, whatever its
                // valid-until says (the configuration keeps validities shorter).
                let reason = "expired: created before state.dedup_window".to_string();
                self.emit_outcome(ctx, &send, OutcomeKind::failed, Some(reason), now);
                return Ok(());
            }
        }
        self.send(ctx, &input, None)
    }

    /// An in-app poll: the request is the customer id, the answer their live messages
    /// as JSON; the first fetch of each reports it delivered.
    fn serve(&mut self, ctx: &mut Ctx<'_>, request: &[u8]) -> anyhow::Result<Vec<u8>> {
        anyhow::ensure!(self.in_app(), "{} keeps no inbox", self.name);
        let customer_id = std::str::from_utf8(request)
            .map_err(|e| anyhow::anyhow!("a customer id is not UTF-8: {e}"))?;
        let now = ctx.now();
        // A message kept before the customer withdrew consent is not shown any more.
        let consent: ConsentState = ctx.get(&consent_key(customer_id))?.unwrap_or_default();
        let withdrawn = |m: &inbox::InboxMessage| consent.block(self.channel, m.category).is_some();
        let (live, first_seen) = inbox::fetch(ctx, customer_id, now, withdrawn)?;
        for m in &first_seen {
            let send = SendSummary {
                send_id: m.send_id.clone(),
                customer_id: m.customer_id.clone(),
                scenario: m.scenario.clone(),
                channel: self.channel,
                category: m.category,
                address: None,
            };
            self.emit_outcome(ctx, &send, OutcomeKind::delivered, None, now);
        }
        serde_json::to_vec(&live).map_err(|e| anyhow::anyhow!("cannot encode the inbox: {e}"))
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: &DueTimer) -> anyhow::Result<()> {
        if timer.timer_id == self.sends_seen.timer_id() {
            return self.sends_seen.sweep(ctx, timer);
        }
        if timer.timer_id.starts_with(DEFERRED_TIMER_PREFIX) {
            let set_aside: DeferredSend = timer.decode()?;
            let command = serde_json::from_str(&set_aside.command)
                .with_context(|| format!("deferred send {}", timer.timer_id))?;
            let input = SendInput {
                command,
                topic: set_aside.topic,
                offset: set_aside.offset,
            };
            return self.send(ctx, &input, Some(&set_aside.deferral));
        }
        // Also once the channel's provider no longer keeps an inbox (changed while
        // messages waited): the message goes. (A simulated outcome's timer is named
        // after its send id, whose payload does not read as a key.)
        if timer.timer_id.starts_with(inbox::EXPIRY_TIMER_PREFIX)
            && (self.in_app() || timer.decode::<String>().is_ok())
        {
            return inbox::expire(ctx, timer);
        }
        let later: LaterOutcome = timer.decode()?;
        self.emit_outcome(ctx, &later.send, later.kind, None, timer.fire_at);
        Ok(())
    }
}

impl DeliveryProcessor {
    /// Makes a send whose id was taken now (`earlier` deferrals if it was set aside):
    /// unless its consent, address or validity stopped it meanwhile.
    fn send(
        &mut self,
        ctx: &mut Ctx<'_>,
        input: &SendInput,
        earlier: Option<&Deferral>,
    ) -> anyhow::Result<()> {
        let cmd = &input.command;
        let now = ctx.now();
        let send = SendSummary::from(cmd);
        // Only real providers write ahead of their calls.
        if self.provider.is_some() && self.finish_handed_over_before_crash(ctx, cmd)? {
            return Ok(());
        }
        // The address bounced hard after the decision, while the command waited, or
        // the customer withdrew consent.
        let blocked = match dead_address(ctx, cmd)? {
            Some(why) => Some(why),
            None => self.consent_block(ctx, cmd)?.inspect(|_| {
                self.metrics
                    .consent_blocked
                    .with_label_values(&[self.channel.as_str()])
                    .inc();
            }),
        };
        let ended = match blocked {
            Some(reason) => {
                tracing::info!(send_id = %cmd.send_id, %reason, "send not made");
                Some(reason)
            }
            None if cmd.valid_until < now => Some(expired_reason(earlier)),
            None => None,
        };
        if let Some(reason) = ended {
            self.end_without_call(ctx, cmd, &send, reason)?;
            return Ok(());
        }
        // No "Hello, !": a template that cannot render fails the send, and the command
        // goes to the dead-letter topic, to be produced again once the template or the
        // variables are fixed (its send id is free again; nothing went out).
        let message = match self.render(cmd) {
            Ok(m) => m,
            Err(reason) => {
                tracing::warn!(send_id = %cmd.send_id, %reason, "template failed");
                if self.end_without_call(ctx, cmd, &send, reason.clone())? == OutcomeKind::failed {
                    self.give_up(ctx, input, &reason, now)?;
                }
                return Ok(());
            }
        };
        if self.in_app() {
            let kept = inbox::store(ctx, cmd, &message)?;
            let (result, kind, reason) = match kept {
                true => ("accepted", OutcomeKind::sent, None),
                // Older than every message the inbox keeps (it came late): never shown.
                false => (
                    "inbox_full",
                    OutcomeKind::failed,
                    Some(format!(
                        "inbox_full: older than the {} newest messages the customer's inbox keeps",
                        inbox::INBOX_KEPT
                    )),
                ),
            };
            self.metrics
                .provider_requests
                .with_label_values(&[self.channel.as_str(), self.provider_name(), result])
                .inc();
            self.emit_outcome(ctx, &send, kind, reason, now);
            return Ok(());
        }
        if self.provider.is_none() {
            return self.simulate(ctx, cmd);
        }
        self.deliver(ctx, input, message, earlier)
    }
}

/// The in-app inbox's client (for [`routes`]) and the queue of polls its worker
/// serves (for [`run`]), if `channel`'s provider is `in_app`.
pub fn inbox_channel(
    config: &Config,
    channel: Channel,
) -> Option<(
    inbox::InboxClient,
    tokio::sync::mpsc::Receiver<kairos_core::runtime::ServeRequest>,
)> {
    match config.delivery.get(&channel).map(|d| d.provider) {
        Some(ProviderKind::InApp) => Some(inbox::channel()),
        _ => None,
    }
}

/// The worker's routes on its admin port: provider webhooks, and the inbox for in-app.
pub fn routes(
    config: &Config,
    channel: Channel,
    admin: &AdminState,
    inbox: Option<inbox::InboxClient>,
) -> anyhow::Result<axum::Router> {
    let mut router = webhook::router(config, channel, admin)?;
    if let Some(inbox) = inbox {
        let secret = config
            .delivery
            .get(&channel)
            .and_then(|d| d.inbox_secret.clone());
        router = router.merge(inbox::router(inbox, secret));
    }
    Ok(router)
}

/// Runs the delivery worker of `channel` until `cancel` fires.
pub async fn run(
    config: Arc<Config>,
    channel: Channel,
    admin: Arc<AdminState>,
    cancel: tokio_util::sync::CancellationToken,
    inbox_polls: Option<tokio::sync::mpsc::Receiver<kairos_core::runtime::ServeRequest>>,
) -> anyhow::Result<()> {
    let settings = config.delivery.get(&channel).cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "{}: no [delivery.{}] section configures this channel",
            config.source_file.display(),
            channel
        )
    })?;
    let no_opt_out = config.marketing_email_without_opt_out();
    if channel == Channel::email && !no_opt_out.is_empty() {
        // `check-config` refuses this; a worker started anyway says so loudly.
        tracing::warn!(scenarios = %no_opt_out.join(", "), "marketing e-mail goes out without an opt-out link: set list_unsubscribe for the e-mail provider");
    }
    let processor = DeliveryProcessor::new(&config, channel, settings, &admin.registry)?
        .reporting_to(admin.clone());
    kairos_core::runtime::run_serving(
        &config,
        processor,
        admin,
        SchemaRegistry::new(None),
        cancel,
        inbox_polls,
    )
    .await
}

/// Waits `total`, calling `beat` at least every 10 s and at the end: a breaker open
/// for two minutes is a worker waiting out its provider, not a hung one for the
/// health check (silent for 60 s).
async fn sleep_beating(total: Duration, beat: impl Fn()) {
    const SLICE: Duration = Duration::from_secs(10);
    let until = tokio::time::Instant::now() + total;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(left.min(SLICE)).await;
        beat();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_core::contracts::MessageCategory;

    /// Recipients a server puts off (greylisting) are set aside for a later try
    /// without opening the breaker; as many outages in a row are retried now and do
    /// open it.
    #[test]
    fn deferred_recipients_do_not_open_the_breaker_an_outage_does() {
        let cmd: SendCommand = serde_json::from_value(serde_json::json!({
            "send_id": "s1", "trigger_id": "t1", "customer_id": "c1",
            "scenario": "welcome", "channel": "email", "category": "trigger",
            "template": "welcome", "address": "a@example.com", "variables": "{}",
            "created_at": 0, "valid_until": 1, "cause_occurred_at": 0, "reasons": []
        }))
        .expect("command");
        let config = kairos_core::config::CircuitBreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(60),
        };
        let outcome = |error: fn(String) -> ProviderError| {
            let mut breaker = CircuitBreaker::new(config.clone());
            let mut last_error = String::new();
            let mut deferred = 0;
            for attempt in 1..=5 {
                let result = Err(error("450 4.2.0 greylisted".into()));
                let judged = DeliveryProcessor::judge(
                    &mut breaker,
                    &cmd,
                    attempt,
                    result,
                    false,
                    &mut last_error,
                );
                match judged {
                    None => assert!(last_error.contains("greylisted"), "{last_error}"),
                    Some(Delivery::Deferred(reply)) => {
                        assert!(reply.contains("greylisted"), "{reply}");
                        deferred += 1;
                    }
                    Some(other) => panic!("{other:?}"),
                }
            }
            (deferred, breaker.is_open(Instant::now()))
        };
        assert_eq!(outcome(ProviderError::RecipientDeferred), (5, false));
        assert_eq!(outcome(ProviderError::Transient), (0, true));
    }

    /// The shipped configuration in event time, its state in `dir`, with `extra`
    /// settings (`KAIROS__...` names).
    fn test_config(dir: &std::path::Path, extra: &[(&str, &str)]) -> Config {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/kairos.toml");
        let text = std::fs::read_to_string(&path).expect("config file");
        let mut env = vec![
            ("KAIROS__STATE__DIR".to_string(), dir.display().to_string()),
            ("KAIROS__CLOCK__MODE".to_string(), "event".to_string()),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Config::from_text(&path, &text, &env).expect("config")
    }

    /// The e-mail worker on the simulator over [`test_config`] in `dir`, in a replayer:
    /// the config, the metrics registry and the replayer.
    fn simulated_email_worker(
        dir: &std::path::Path,
    ) -> (
        Config,
        prometheus::Registry,
        kairos_core::replay::Replayer<DeliveryProcessor>,
    ) {
        let config = test_config(dir, &[("KAIROS__DELIVERY__EMAIL__PROVIDER", "simulator")]);
        let (registry, replayer) = email_worker(&config);
        (config, registry, replayer)
    }

    /// The e-mail worker of `config` in a replayer, with its metrics registry.
    fn email_worker(
        config: &Config,
    ) -> (
        prometheus::Registry,
        kairos_core::replay::Replayer<DeliveryProcessor>,
    ) {
        let registry = prometheus::Registry::new();
        let settings = config.delivery[&Channel::email].clone();
        let processor =
            DeliveryProcessor::new(config, Channel::email, settings, &registry).expect("processor");
        let replayer =
            kairos_core::replay::Replayer::new(processor, config, &registry).expect("replayer");
        (registry, replayer)
    }

    /// [`test_config`] with the e-mail worker on SMTP to a port nobody listens on.
    fn smtp_to_nowhere(dir: &std::path::Path, extra: &[(&str, &str)]) -> Config {
        smtp_on(dir, 1, extra)
    }

    /// [`test_config`] with the e-mail worker on SMTP at `port` on this machine.
    fn smtp_on(dir: &std::path::Path, port: u16, extra: &[(&str, &str)]) -> Config {
        let port = port.to_string();
        let mut settings = vec![
            ("KAIROS__DELIVERY__EMAIL__PROVIDER", "smtp"),
            ("KAIROS__DELIVERY__EMAIL__SMTP__HOST", "127.0.0.1"),
            ("KAIROS__DELIVERY__EMAIL__SMTP__PORT", port.as_str()),
            (
                "KAIROS__DELIVERY__EMAIL__SMTP__FROM",
                "Shop <news@shop.example>",
            ),
        ];
        settings.extend_from_slice(extra);
        test_config(dir, &settings)
    }

    /// Writes what a crashed e-mail worker left in c1's partition store (`key`, time
    /// pairs), before the worker opens it; returns the partition.
    fn left_by_crash(config: &Config, records: &[(&str, Millis)]) -> i32 {
        let partition = kairos_core::replay::partition_for(b"c1", config.kafka.partitions);
        let stores = kairos_core::store::StoreFactory::new(
            &config.state.dir.join("deliver-email"),
            config.state.block_cache_bytes,
        )
        .expect("stores");
        let store = stores.open(partition).expect("store");
        for (key, at) in records {
            let value = kairos_core::encoding::encode_state(at).expect("encode");
            store.put_now(key.as_bytes(), &value).expect("write");
        }
        partition
    }

    /// A long wait beats every 10 s, so the health check sees a worker waiting out
    /// its provider, not a hung one.
    #[tokio::test(start_paused = true)]
    async fn a_long_wait_keeps_beating() {
        let beats = std::cell::RefCell::new(Vec::new());
        let start = tokio::time::Instant::now();
        sleep_beating(Duration::from_secs(25), || {
            beats.borrow_mut().push(start.elapsed().as_secs())
        })
        .await;
        assert_eq!(*beats.borrow(), [10, 20, 25]);
        assert_eq!(start.elapsed(), Duration::from_secs(25));
    }

    /// The shipped marketing e-mails end with the opt-out link of the provider's
    /// `List-Unsubscribe` header, for clients that do not show the header; without one
    /// configured they render as before.
    #[test]
    fn a_marketing_email_carries_the_unsubscribe_link_of_its_header() {
        let we_miss_you = |extra: &[(&str, &str)]| {
            let dir = tempfile::tempdir().expect("temp dir");
            let config = smtp_to_nowhere(dir.path(), extra);
            let registry = prometheus::Registry::new();
            let settings = config.delivery[&Channel::email].clone();
            let processor = DeliveryProcessor::new(&config, Channel::email, settings, &registry)
                .expect("processor");
            processor
                .render(&email_command(0, "we_miss_you"))
                .expect("rendered")
        };
        let url = (
            "KAIROS__DELIVERY__EMAIL__SMTP__LIST_UNSUBSCRIBE",
            "https://shop.example/u?c={customer_id}&s={send_id}",
        );
        let m = we_miss_you(&[url]);
        assert!(
            m.body
                .ends_with("\n\nUnsubscribe: https://shop.example/u?c=c1&s=s-1\n"),
            "{}",
            m.body
        );
        assert_eq!(
            m.unsubscribe_url.as_deref(),
            Some("https://shop.example/u?c=c1&s=s-1"),
            "the header's link"
        );
        // With a token: the body's link and the header's are the one made under the
        // secret.
        let secret = "0123456789abcdef-secret";
        let m = we_miss_you(&[
            (
                "KAIROS__DELIVERY__EMAIL__SMTP__LIST_UNSUBSCRIBE",
                "https://shop.example/u?c={customer_id}&t={token}",
            ),
            ("KAIROS__DELIVERY__EMAIL__UNSUBSCRIBE_SECRET", secret),
        ]);
        let token = kairos_core::ids::unsubscribe_token(secret, "c1", "s-1");
        let link = format!("https://shop.example/u?c=c1&t={token}");
        assert_eq!(m.unsubscribe_url.as_deref(), Some(link.as_str()));
        assert!(
            m.body.ends_with(&format!("\n\nUnsubscribe: {link}\n")),
            "{}",
            m.body
        );
        // None configured, or a blank one: no link at all (no empty header).
        for blank in [
            &[][..],
            &[("KAIROS__DELIVERY__EMAIL__SMTP__LIST_UNSUBSCRIBE", "  ")],
        ] {
            let m = we_miss_you(blank);
            assert!(!m.body.contains("Unsubscribe"), "{}", m.body);
            assert!(m.body.ends_with("https://shop.example/new\n"), "{}", m.body);
            assert_eq!(m.unsubscribe_url, None);
        }
    }

    /// An e-mail of `template` to c1 (first name Ann), made at `t0`, valid for a second.
    fn email_command(t0: Millis, template: &str) -> SendCommand {
        SendCommand {
            send_id: "s-1".into(),
            trigger_id: "t-1".into(),
            customer_id: "c1".into(),
            scenario: template.into(),
            channel: Channel::email,
            category: MessageCategory::trigger,
            template: template.into(),
            address: Some("c1@example.com".into()),
            variables: r#"{"first_name":"Ann"}"#.into(),
            created_at: t0,
            valid_until: t0 + 1_000,
            cause_occurred_at: t0,
            reasons: vec![],
        }
    }

    /// After a crash that came between the provider's acceptance and the batch's
    /// commit, the send is reported sent when it comes again, even past its valid-until
    /// (the restart came late): it went out, and no key of its attempt stays behind.
    #[test]
    fn a_send_accepted_before_a_crash_is_reported_sent_even_once_expired() {
        use kairos_core::time::DAY;
        let dir = tempfile::tempdir().expect("temp dir");
        // Never called: the send was accepted before the crash.
        let config = smtp_to_nowhere(dir.path(), &[]);
        let t0 = 20_000 * DAY;
        // The template needs cart_items: rendering it now would fail too.
        let cmd = email_command(t0, "abandoned_cart");
        let topic = config.send_topic(Channel::email);
        // What the crashed worker left: the attempt and the provider's acceptance.
        left_by_crash(&config, &[("w/s-1", t0), ("a/s-1", t0)]);
        let settings = config.delivery[&Channel::email].clone();
        let registry = prometheus::Registry::new();
        let processor = DeliveryProcessor::new(&config, Channel::email, settings, &registry)
            .expect("processor");
        assert_eq!(processor.name(), "deliver-email");
        // Every result series exists at zero from the start, so the first refusal is an
        // increase the alert sees.
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .expect("metrics text");
        for result in PROVIDER_RESULTS {
            let series = format!("provider=\"smtp\",result=\"{result}\"}} 0");
            assert!(text.contains(&series), "{series} in {text}");
        }
        let mut replayer =
            kairos_core::replay::Replayer::new(processor, &config, &registry).expect("replayer");
        // The partition's clock is a day past the send's valid-until.
        let late = serde_json::to_vec(&SendCommand {
            send_id: "s-0".into(),
            created_at: t0 + DAY,
            valid_until: t0 + DAY,
            ..cmd.clone()
        })
        .expect("encode");
        replayer.push(&topic, b"c1", &late).expect("push");
        let mut out = replayer
            .push(&topic, b"c1", &serde_json::to_vec(&cmd).expect("encode"))
            .expect("push");
        out.extend(replayer.commit().expect("commit"));
        let outcomes: Vec<Outcome> = out
            .iter()
            .filter(|o| o.topic == config.topic(topics::OUTCOMES))
            .map(|o| serde_json::from_slice::<Outcome>(&o.payload).expect("outcome"))
            .filter(|o| o.send_id == "s-1")
            .collect();
        assert_eq!(outcomes.len(), 1, "{outcomes:#?}");
        assert_eq!(outcomes[0].kind, OutcomeKind::sent, "{outcomes:#?}");
    }

    /// A send a crash cut short before the provider accepted it, which has expired by
    /// the restart, is failed without a call, and its write-ahead records go with it.
    #[test]
    fn a_cut_attempt_that_expired_meanwhile_leaves_no_records_behind() {
        use kairos_core::time::DAY;
        let dir = tempfile::tempdir().expect("temp dir");
        // Never called: the send expired.
        let config = smtp_to_nowhere(dir.path(), &[]);
        let t0 = 20_000 * DAY;
        // What the crashed worker left: the attempt and a withdrawn commit point.
        let left = [("w/s-1", t0), ("k/s-1", COMMIT_POINT_WITHDRAWN)];
        let (outcomes, replayer, partition) = restart_after_cut_attempt(&config, &left, t0);
        let outcome = outcomes
            .iter()
            .find(|o| o.send_id == "s-1")
            .expect("an outcome");
        assert_eq!(
            (outcome.kind, outcome.reason.as_deref()),
            (OutcomeKind::failed, Some("expired"))
        );
        let store = replayer.engine.store(partition).expect("store");
        for key in ["w/s-1", "k/s-1"] {
            let left = store
                .get(&Default::default(), key.as_bytes())
                .expect("read");
            assert!(left.is_none(), "{key} stays");
        }
    }

    /// An HTTP request a crash cut short may have reached the gateway: a send that has
    /// expired by the restart is reported sent and in doubt, not failed (a re-drive
    /// could send it twice), without a call, and its records go.
    #[test]
    fn a_cut_http_request_that_expired_meanwhile_is_in_doubt() {
        use kairos_core::time::DAY;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = http_email_to_nowhere(dir.path(), &[]);
        let t0 = 20_000 * DAY;
        let (outcomes, replayer, partition) =
            restart_after_cut_attempt(&config, &[("w/s-1", t0)], t0);
        let of = |id: &str| {
            outcomes
                .iter()
                .find(|o| o.send_id == id)
                .expect("an outcome")
        };
        let cut = of("s-1");
        assert_eq!(cut.kind, OutcomeKind::sent, "{outcomes:#?}");
        let reason = cut.reason.as_deref().unwrap_or_default();
        assert!(
            reason.starts_with("in_doubt") && reason.contains("expired"),
            "{reason}"
        );
        // One never attempted expires as before.
        assert_eq!(
            (of("s-0").kind, of("s-0").reason.as_deref()),
            (OutcomeKind::failed, Some("expired"))
        );
        let store = replayer.engine.store(partition).expect("store");
        let left = store.get(&Default::default(), b"w/s-1").expect("read");
        assert!(left.is_none(), "the attempt record stays");
    }

    /// A request a crash cut short, resumed after the restart against a gateway that
    /// now refuses every attempt: the gateway may hold the first request (no answer
    /// came), so the send is in doubt (reported sent), not failed and dead-lettered,
    /// whose re-drive could send it twice.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_resumed_http_request_whose_attempts_run_out_is_in_doubt() {
        use kairos_core::time::DAY;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = http_email_to_nowhere(
            dir.path(),
            &[
                ("KAIROS__DELIVERY__EMAIL__RETRY__MAX_ATTEMPTS", "2"),
                ("KAIROS__DELIVERY__EMAIL__RETRY__INITIAL_BACKOFF", "10ms"),
            ],
        );
        let t0 = 20_000 * DAY;
        left_by_crash(&config, &[("w/s-1", t0)]);
        let (_registry, mut replayer) = email_worker(&config);
        let cmd = SendCommand {
            valid_until: t0 + DAY,
            ..email_command(t0, "welcome")
        };
        let payload = serde_json::to_vec(&cmd).expect("encode");
        let topic = config.send_topic(Channel::email);
        let mut out = replayer.push(&topic, b"c1", &payload).expect("push");
        out.extend(replayer.commit().expect("commit"));
        let outcomes = outcomes_in(&config, &out);
        assert_eq!(outcomes.len(), 1, "{outcomes:#?}");
        assert_eq!(outcomes[0].kind, OutcomeKind::sent, "{outcomes:#?}");
        let reason = outcomes[0].reason.as_deref().unwrap_or_default();
        assert!(
            reason.starts_with("in_doubt") && reason.contains("attempts ran out"),
            "{reason}"
        );
        assert!(
            !out.iter()
                .any(|o| o.topic == config.topic(topics::DEAD_LETTER)),
            "not dead-lettered"
        );
    }

    /// The e-mail worker restarted over what a crash `left` (state records), fed a
    /// send `s-0` that moves its clock a day past `t0`, then `s-1` (created at `t0`):
    /// their outcomes, the replayer and the partition.
    fn restart_after_cut_attempt(
        config: &Config,
        left: &[(&str, Millis)],
        t0: Millis,
    ) -> (
        Vec<Outcome>,
        kairos_core::replay::Replayer<DeliveryProcessor>,
        i32,
    ) {
        use kairos_core::time::DAY;
        let partition = left_by_crash(config, left);
        let (_registry, mut replayer) = email_worker(config);
        let cmd = email_command(t0, "welcome");
        let topic = config.send_topic(Channel::email);
        let later = SendCommand {
            send_id: "s-0".into(),
            created_at: t0 + DAY,
            valid_until: t0 + DAY - 1,
            ..cmd.clone()
        };
        let mut out = Vec::new();
        for c in [&later, &cmd] {
            let payload = serde_json::to_vec(c).expect("encode");
            out.extend(replayer.push(&topic, b"c1", &payload).expect("push"));
        }
        out.extend(replayer.commit().expect("commit"));
        (outcomes_in(config, &out), replayer, partition)
    }

    /// The outcomes among a worker's outputs `out`.
    fn outcomes_in(config: &Config, out: &[kairos_core::store::OutboxEntry]) -> Vec<Outcome> {
        out.iter()
            .filter(|o| o.topic == config.topic(topics::OUTCOMES))
            .map(|o| serde_json::from_slice::<Outcome>(&o.payload).expect("outcome"))
            .collect()
    }

    /// An e-mail worker on an HTTP gateway where nobody listens, with more settings.
    fn http_email_to_nowhere(dir: &std::path::Path, extra: &[(&str, &str)]) -> Config {
        let mut settings = vec![
            ("KAIROS__DELIVERY__EMAIL__PROVIDER", "http"),
            (
                "KAIROS__DELIVERY__EMAIL__HTTP__URL",
                "http://127.0.0.1:9/mail",
            ),
            (
                "KAIROS__DELIVERY__EMAIL__HTTP__LIST_UNSUBSCRIBE",
                "https://shop.example/u/{customer_id}",
            ),
        ];
        settings.extend_from_slice(extra);
        test_config(dir, &settings)
    }

    /// A worker retrying a send against a provider that does not answer tells its
    /// health check it is alive between the attempts, so `/healthz` does not report a
    /// stall (and an orchestrator restart it in a loop) while the provider is down; the
    /// breaker's gauge shows it open as soon as it opens.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_worker_retrying_a_send_stays_alive_for_its_health_check() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Nobody listens: every attempt fails without an answer.
        let config = smtp_to_nowhere(
            dir.path(),
            &[
                ("KAIROS__DELIVERY__EMAIL__RETRY__MAX_ATTEMPTS", "3"),
                ("KAIROS__DELIVERY__EMAIL__RETRY__INITIAL_BACKOFF", "20ms"),
                (
                    "KAIROS__DELIVERY__EMAIL__CIRCUIT_BREAKER__FAILURE_THRESHOLD",
                    "3",
                ),
                ("KAIROS__DELIVERY__EMAIL__CIRCUIT_BREAKER__OPEN_FOR", "2s"),
            ],
        );
        let admin = AdminState::new(prometheus::Registry::new());
        let settings = config.delivery[&Channel::email].clone();
        let mut processor =
            DeliveryProcessor::new(&config, Channel::email, settings, &admin.registry)
                .expect("processor")
                .reporting_to(admin.clone());
        let cmd = SendCommand {
            valid_until: Millis::MAX / 2,
            ..email_command(0, "welcome")
        };
        let message = templates::RenderedMessage {
            subject: Some("Hello".into()),
            preheader: None,
            body: "hi".into(),
            unsubscribe_url: None,
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let before = admin.last_heartbeat();
        let delivery = processor
            .attempts(&cmd, &message, 0, AttemptHooks::NONE)
            .await;
        assert!(matches!(delivery, Delivery::Exhausted(_)), "{delivery:?}");
        assert!(
            admin.last_heartbeat() > before,
            "the attempts beat: {} after {before}",
            admin.last_heartbeat()
        );
        // The last attempt's failure opened the breaker, and the gauge says so at once,
        // not when the next send comes.
        let text = admin.render_metrics();
        let open = "kairos_provider_circuit_open{channel=\"email\",provider=\"smtp\"} 1";
        assert!(text.contains(open), "{open} in {text}");
        // An address that does not parse is refused before any request: it neither
        // waits for the breaker nor closes it.
        let unparsable = SendCommand {
            address: Some("not an address".into()),
            ..cmd.clone()
        };
        let delivery = processor
            .attempts(&unparsable, &message, 0, AttemptHooks::NONE)
            .await;
        assert!(matches!(delivery, Delivery::DeadAddress(_)), "{delivery:?}");
        assert!(
            matches!(processor.breaker.state(), retry::BreakerState::Open(_)),
            "{:?}",
            processor.breaker.state()
        );
        // Once `open_for` is over, the gauge says so without another send (the
        // runtime refreshes gauges every few seconds).
        processor.refresh_gauges();
        assert!(admin.render_metrics().contains(open), "still open");
        tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
        processor.refresh_gauges();
        let closed = "kairos_provider_circuit_open{channel=\"email\",provider=\"smtp\"} 0";
        let text = admin.render_metrics();
        assert!(text.contains(closed), "{closed} in {text}");
    }

    /// Once an attempt may have left the message with the gateway (a 409 for its
    /// idempotency key, or no answer in time), the send ends in doubt (reported sent,
    /// not dead-lettered for a re-drive that could send it again) whether the later
    /// attempts fail, answer 409 again, or the message expires meanwhile; a gateway
    /// that refuses every attempt outright still fails it.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_request_the_gateway_may_hold_is_in_doubt_however_the_attempts_end() {
        use std::sync::atomic::{AtomicU32, Ordering};
        // Per case: what the gateway answers to the first attempt and the later ones,
        // how long the message is valid, and whether the send ends in doubt.
        // And how many requests the gateway gets: every attempt (for the one that
        // expires, up to the backoff's jitter: none once it expired).
        let cases = [
            (
                "conflict throughout",
                409,
                409,
                Millis::MAX / 2,
                true,
                3..=3,
            ),
            (
                "conflict, then unavailable",
                409,
                503,
                Millis::MAX / 2,
                true,
                3..=3,
            ),
            ("conflict, then expired", 409, 503, 30, true, 1..=3),
            ("no answer in time", 0, 0, Millis::MAX / 2, true, 3..=3),
            (
                "unavailable throughout",
                503,
                503,
                Millis::MAX / 2,
                false,
                3..=3,
            ),
        ];
        for (case, first, later, valid_for, in_doubt, requests) in cases {
            let calls = Arc::new(AtomicU32::new(0));
            let counted = calls.clone();
            let app = axum::Router::new().route(
                "/sms",
                axum::routing::post(move || {
                    let n = counted.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let status = if n == 0 { first } else { later };
                        if status == 0 {
                            // Well past the timeout, so a loaded machine's slow answer
                            // is not taken for none.
                            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                        }
                        let code =
                            axum::http::StatusCode::from_u16(status.max(200)).expect("status");
                        (code, "answer")
                    }
                }),
            );
            let url = serve_sms_gateway(app).await;
            let dir = tempfile::tempdir().expect("temp dir");
            let config = test_config(
                dir.path(),
                &[
                    ("KAIROS__DELIVERY__SMS__PROVIDER", "http"),
                    ("KAIROS__DELIVERY__SMS__HTTP__URL", &url),
                    ("KAIROS__DELIVERY__SMS__HTTP__TIMEOUT", "1s"),
                    ("KAIROS__DELIVERY__SMS__RETRY__MAX_ATTEMPTS", "3"),
                    ("KAIROS__DELIVERY__SMS__RETRY__INITIAL_BACKOFF", "50ms"),
                ],
            );
            let registry = prometheus::Registry::new();
            let settings = config.delivery[&Channel::sms].clone();
            let mut processor = DeliveryProcessor::new(&config, Channel::sms, settings, &registry)
                .expect("processor");
            let cmd = SendCommand {
                channel: Channel::sms,
                address: Some("+491701234567".into()),
                valid_until: valid_for,
                ..email_command(0, "welcome")
            };
            let message = templates::RenderedMessage {
                subject: None,
                preheader: None,
                body: "hi".into(),
                unsubscribe_url: None,
            };
            let delivery = processor
                .attempts(&cmd, &message, 0, AttemptHooks::NONE)
                .await;
            let doubt = matches!(delivery, Delivery::InDoubt(_));
            assert_eq!(doubt, in_doubt, "{case}: {delivery:?}");
            let made = calls.load(Ordering::SeqCst);
            assert!(requests.contains(&made), "{case}: {made} requests");
        }
    }

    /// Every wait before a call is followed by the partition's claim check, the first
    /// call's too (the breaker held it), and by the valid-until check, the claim
    /// check's own wait included: a worker paused in a wait makes no call its new
    /// owner makes, and none past the message's validity.
    #[tokio::test(flavor = "multi_thread")]
    async fn no_call_follows_a_wait_without_the_claim_and_validity_checks() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let calls = Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        let app = axum::Router::new().route(
            "/sms",
            axum::routing::post(move || {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    let status = if n == 0 { 503 } else { 200 };
                    let code = axum::http::StatusCode::from_u16(status).expect("status");
                    (code, "answer")
                }
            }),
        );
        let url = serve_sms_gateway(app).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut processor, cmd, message) = sms_worker(dir.path(), &url, "1s");

        // The breaker holds the first call; meanwhile another instance claimed the
        // partition.
        processor
            .breaker
            .hold_off(Instant::now(), std::time::Duration::from_millis(100));
        let claimed = || Err(anyhow::anyhow!("the partition was claimed"));
        let delivery = processor
            .attempts(
                &cmd,
                &message,
                0,
                AttemptHooks {
                    before_call: &claimed,
                    ..AttemptHooks::NONE
                },
            )
            .await;
        assert!(matches!(delivery, Delivery::Stopped(_)), "{delivery:?}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "no call after the takeover"
        );

        // The first call is refused; the claim check before the second takes longer
        // than the message stays valid.
        let brief = SendCommand {
            valid_until: 300,
            ..cmd
        };
        let claims = std::cell::Cell::new(0);
        let slow_claim = || {
            claims.set(claims.get() + 1);
            if claims.get() > 1 {
                std::thread::sleep(std::time::Duration::from_millis(400));
            }
            Ok(())
        };
        let delivery = processor
            .attempts(
                &brief,
                &message,
                0,
                AttemptHooks {
                    before_call: &slow_claim,
                    ..AttemptHooks::NONE
                },
            )
            .await;
        assert!(matches!(delivery, Delivery::Expired), "{delivery:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the refused call only");
    }

    /// A gateway that answers an error with an endless page: the worker reads the
    /// page's start for the error, not the page until the request times out.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_error_answer_s_endless_body_is_read_only_as_far_as_the_error_needs() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/sms", listener.local_addr().expect("address"));
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = socket.read(&mut request).await;
                    let head = "HTTP/1.1 500 Internal Server Error\r\n\
                                Content-Type: text/plain\r\n\
                                Transfer-Encoding: chunked\r\n\r\n";
                    if socket.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    // One chunk of 64 bytes, again and again.
                    let page = "gateway down ".repeat(5);
                    let chunk = format!("40\r\n{}\r\n", &page[..64]);
                    while socket.write_all(chunk.as_bytes()).await.is_ok() {
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    }
                });
            }
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut processor, cmd, message) = sms_worker(dir.path(), &url, "3s");
        let started = Instant::now();
        let delivery = processor
            .attempts(&cmd, &message, 0, AttemptHooks::NONE)
            .await;
        let Delivery::Exhausted(error) = &delivery else {
            panic!("{delivery:?}");
        };
        assert!(
            error.starts_with(
                "transient: HTTP 500 Internal Server Error: gateway down gateway down"
            ),
            "{error}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "three attempts, none waiting for the page's end"
        );
    }

    /// Serves `app` as an SMS gateway on a port the kernel picks; returns its URL.
    async fn serve_sms_gateway(app: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/sms", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    /// An SMS command and its rendered text for the HTTP gateway at `url`, with its
    /// worker (`timeout` per request, three attempts 50 ms apart at first).
    fn sms_worker(
        dir: &std::path::Path,
        url: &str,
        timeout: &str,
    ) -> (DeliveryProcessor, SendCommand, templates::RenderedMessage) {
        let config = test_config(
            dir,
            &[
                ("KAIROS__DELIVERY__SMS__PROVIDER", "http"),
                ("KAIROS__DELIVERY__SMS__HTTP__URL", url),
                ("KAIROS__DELIVERY__SMS__HTTP__TIMEOUT", timeout),
                ("KAIROS__DELIVERY__SMS__RETRY__MAX_ATTEMPTS", "3"),
                ("KAIROS__DELIVERY__SMS__RETRY__INITIAL_BACKOFF", "50ms"),
            ],
        );
        let registry = prometheus::Registry::new();
        let settings = config.delivery[&Channel::sms].clone();
        let processor =
            DeliveryProcessor::new(&config, Channel::sms, settings, &registry).expect("processor");
        let cmd = SendCommand {
            channel: Channel::sms,
            address: Some("+491701234567".into()),
            valid_until: Millis::MAX / 2,
            ..email_command(0, "welcome")
        };
        let message = templates::RenderedMessage {
            subject: None,
            preheader: None,
            body: "hi".into(),
            unsubscribe_url: None,
        };
        (processor, cmd, message)
    }

    /// A gateway whose host takes no connection (it drops them: a firewall, a load
    /// balancer without backends) never had the message: the send is retried and then
    /// dead-lettered for a re-drive, not reported sent "in doubt".
    #[tokio::test(flavor = "multi_thread")]
    async fn a_gateway_that_takes_no_connection_never_had_the_message() {
        // A listener whose one-place accept queue is full: the kernel drops further
        // connection attempts, so they hang as against a silent host.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let address = socket.local_addr().expect("address");
        let _listener = socket.listen(0).expect("listen");
        let mut queued = Vec::new();
        let full = (0..16).any(|_| {
            match std::net::TcpStream::connect_timeout(
                &address,
                std::time::Duration::from_millis(300),
            ) {
                Ok(stream) => {
                    queued.push(stream);
                    false
                }
                Err(_) => true,
            }
        });
        assert!(full, "the accept queue never filled");
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("http://{address}/sms");
        let (mut processor, cmd, message) = sms_worker(dir.path(), &url, "600ms");
        let delivery = processor
            .attempts(&cmd, &message, 0, AttemptHooks::NONE)
            .await;
        assert!(
            matches!(&delivery, Delivery::Exhausted(e) if e.contains("request failed")),
            "{delivery:?}"
        );
    }

    /// A send that bounces hard marks its address dead at once: the next send to it,
    /// already decided and waiting on the topic, is not made (the gateway is asked
    /// once), while a send to the customer's other address is.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_hard_bounce_stops_the_next_send_to_its_address() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let calls = Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        let app = axum::Router::new().route(
            "/sms",
            axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    match body["to"].as_str() {
                        Some("+491701234567") => (axum::http::StatusCode::GONE, "gone"),
                        _ => (axum::http::StatusCode::OK, "ok"),
                    }
                }
            }),
        );
        let url = serve_sms_gateway(app).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let (processor, cmd, _) = sms_worker(dir.path(), &url, "2s");
        let config = test_config(dir.path(), &[]);
        let registry = prometheus::Registry::new();
        let mut replayer =
            kairos_core::replay::Replayer::new(processor, &config, &registry).expect("replayer");
        let topic = config.send_topic(Channel::sms);
        let now = kairos_core::time::wall_now();
        let send = |id: &str, address: &str| SendCommand {
            send_id: id.into(),
            address: Some(address.into()),
            created_at: now,
            valid_until: now + 3_600_000,
            ..cmd.clone()
        };
        let mut out = Vec::new();
        for command in [
            send("s-1", "+491701234567"),
            send("s-2", "+491701234567"),
            send("s-3", "+491709999999"),
        ] {
            let payload = serde_json::to_vec(&command).expect("encode");
            out.extend(replayer.push(&topic, b"c1", &payload).expect("push"));
        }
        out.extend(replayer.commit().expect("commit"));
        let outcomes = |id: &str| -> Vec<(OutcomeKind, String)> {
            out.iter()
                .filter_map(|o| serde_json::from_slice::<Outcome>(&o.payload).ok())
                .filter(|o| o.send_id == id)
                .map(|o| (o.kind, o.reason.unwrap_or_default()))
                .collect()
        };
        let outcome = |id: &str| {
            let all = outcomes(id);
            all.last()
                .cloned()
                .unwrap_or_else(|| panic!("no outcome of {id}"))
        };
        // The dead number was sent (the bounce and delivery rates are over sends) and
        // bounced.
        let kinds: Vec<OutcomeKind> = outcomes("s-1").into_iter().map(|o| o.0).collect();
        assert_eq!(kinds, [OutcomeKind::sent, OutcomeKind::bounced_hard]);
        let (kind, reason) = outcome("s-2");
        assert_eq!(kind, OutcomeKind::failed, "{reason}");
        assert!(
            reason.starts_with("invalid_address: +491701234567"),
            "{reason}"
        );
        assert_eq!(outcome("s-3").0, OutcomeKind::sent);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "s-2 never reached the gateway"
        );
    }

    /// A gateway that answers 429 with `Retry-After` is asked again after that wait,
    /// not after the (shorter) backoff, and then takes the message.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_gateway_s_retry_after_is_waited_for() {
        let calls = Arc::new(std::sync::Mutex::new(Vec::<std::time::Instant>::new()));
        let seen = calls.clone();
        let app = axum::Router::new().route(
            "/sms",
            axum::routing::post(move || {
                let seen = seen.clone();
                async move {
                    let mut seen = seen.lock().expect("calls");
                    seen.push(std::time::Instant::now());
                    match seen.len() {
                        1 => (
                            axum::http::StatusCode::TOO_MANY_REQUESTS,
                            [("retry-after", "1")],
                            "slow down",
                        ),
                        _ => (axum::http::StatusCode::OK, [("x-any", "0")], "ok"),
                    }
                }
            }),
        );
        let url = serve_sms_gateway(app).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut processor, cmd, message) = sms_worker(dir.path(), &url, "2s");
        let delivery = processor
            .attempts(&cmd, &message, 0, AttemptHooks::NONE)
            .await;
        assert!(matches!(delivery, Delivery::Sent), "{delivery:?}");
        let calls = calls.lock().expect("calls");
        assert_eq!(calls.len(), 2);
        let waited = calls[1] - calls[0];
        assert!(
            waited >= std::time::Duration::from_millis(950),
            "asked again after {waited:?}"
        );
    }

    /// A gateway's `Retry-After` holds the next send too: a send whose attempts ran out
    /// on 429s does not let the next one go before the wait asked for.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_gateway_s_retry_after_holds_the_next_send_too() {
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = calls.clone();
        let app = axum::Router::new().route(
            "/sms",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let seen = seen.clone();
                async move {
                    let key = (headers.get("idempotency-key"))
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let throttled = key == "s-a";
                    seen.lock()
                        .expect("calls")
                        .push((key, std::time::Instant::now()));
                    if throttled {
                        (
                            axum::http::StatusCode::TOO_MANY_REQUESTS,
                            [("retry-after", "1")],
                        )
                    } else {
                        (axum::http::StatusCode::OK, [("retry-after", "0")])
                    }
                }
            }),
        );
        let url = serve_sms_gateway(app).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut processor, cmd, message) = sms_worker(dir.path(), &url, "2s");
        let first = SendCommand {
            send_id: "s-a".into(),
            ..cmd.clone()
        };
        let delivery = processor
            .attempts(&first, &message, 0, AttemptHooks::NONE)
            .await;
        assert!(matches!(delivery, Delivery::Exhausted(_)), "{delivery:?}");
        let next = SendCommand {
            send_id: "s-b".into(),
            ..cmd
        };
        let delivery = processor
            .attempts(&next, &message, 0, AttemptHooks::NONE)
            .await;
        assert!(matches!(delivery, Delivery::Sent), "{delivery:?}");
        let calls = calls.lock().expect("calls");
        let keys: Vec<&str> = calls.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["s-a", "s-a", "s-a", "s-b"]);
        let waited = calls[3].1 - calls[2].1;
        assert!(
            waited >= std::time::Duration::from_millis(950),
            "the next send went {waited:?} after the last 429"
        );
    }

    /// A send id is taken once within `state.dedup_window`; once the window has passed
    /// and the id is swept, a copy of the command (created before the window) is
    /// failed, never sent again, whatever valid-until it carries.
    /// A send command waits on its topic (a backlog, the breaker) while the customer
    /// withdraws consent, or the arbiter decided it before reading the withdrawal: it
    /// is not made, unless the customer opted in again later. Nor is one to an address
    /// that bounced hard meanwhile.
    #[test]
    fn withdrawn_consent_stops_a_waiting_send() {
        use kairos_core::time::DAY;
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = simulated_email_worker(dir.path());
        let t0 = 20_000 * DAY;
        let (sends, outcomes, actions) = (
            config.send_topic(Channel::email),
            config.topic(topics::OUTCOMES),
            config.topic(topics::CUSTOMER_ACTIONS),
        );
        let outcome = |customer: &str, channel, kind, at| Outcome {
            outcome_id: format!("o-{customer}-{at}"),
            send_id: format!("earlier-{customer}"),
            customer_id: customer.into(),
            scenario: "weekly_promo".into(),
            channel,
            category: MessageCategory::promo,
            kind,
            reason: None,
            occurred_at: at,
            address: None,
        };
        let action = |customer: &str, kind, at| CustomerAction {
            channel: Some(Channel::email),
            ..CustomerAction::new(format!("a-{customer}-{at}"), customer.into(), kind, at)
        };
        let command = |id: &str, customer: &str, category| SendCommand {
            send_id: id.into(),
            trigger_id: format!("t-{id}"),
            customer_id: customer.into(),
            scenario: "welcome".into(),
            channel: Channel::email,
            category,
            template: "welcome".into(),
            address: Some(format!("{customer}@example.com")),
            variables: r#"{"first_name":"Ann"}"#.into(),
            created_at: t0,
            valid_until: t0 + DAY,
            cause_occurred_at: t0,
            reasons: vec![],
        };
        fn json<T: Serialize>(v: &T) -> Vec<u8> {
            serde_json::to_vec(v).expect("encode")
        }
        let mut out = Vec::new();
        let mut push = |topic: &str, key: &str, payload: Vec<u8>| {
            out.extend(
                replayer
                    .push(topic, key.as_bytes(), &payload)
                    .expect("push"),
            );
        };
        // Unsubscribed after the decision: not sent.
        push(
            &outcomes,
            "c1",
            json(&outcome(
                "c1",
                Channel::email,
                OutcomeKind::unsubscribed,
                t0 + 10,
            )),
        );
        push(
            &sends,
            "c1",
            json(&command("s-1", "c1", MessageCategory::trigger)),
        );
        // Before it, and read by the arbiter only after it decided (the profile
        // behind): not sent either.
        push(
            &outcomes,
            "c2",
            json(&outcome(
                "c2",
                Channel::email,
                OutcomeKind::unsubscribed,
                t0 - 10,
            )),
        );
        push(
            &sends,
            "c2",
            json(&command("s-2", "c2", MessageCategory::trigger)),
        );
        // Opted out and in again after it: sent.
        push(
            &actions,
            "c3",
            json(&action("c3", CustomerActionKind::opt_out, t0 + 5)),
        );
        push(
            &actions,
            "c3",
            json(&action("c3", CustomerActionKind::opt_in, t0 + 6)),
        );
        push(
            &sends,
            "c3",
            json(&command("s-3", "c3", MessageCategory::trigger)),
        );
        // A complaint about a push message: no promo on any channel; other messages go.
        push(
            &outcomes,
            "c4",
            json(&outcome(
                "c4",
                Channel::push,
                OutcomeKind::complained,
                t0 + 5,
            )),
        );
        push(
            &sends,
            "c4",
            json(&command("s-4", "c4", MessageCategory::promo)),
        );
        push(
            &sends,
            "c4",
            json(&command("s-5", "c4", MessageCategory::trigger)),
        );
        // An unsubscribe from push leaves e-mail alone.
        push(
            &outcomes,
            "c5",
            json(&outcome(
                "c5",
                Channel::push,
                OutcomeKind::unsubscribed,
                t0 + 5,
            )),
        );
        push(
            &sends,
            "c5",
            json(&command("s-6", "c5", MessageCategory::trigger)),
        );
        // An address that bounced hard (an earlier send's, reported by the provider)
        // is not sent to again; the customer's new address is. A push token that
        // bounced leaves e-mail alone.
        let bounced = |customer: &str, channel, address: &str| Outcome {
            address: Some(address.into()),
            ..outcome(customer, channel, OutcomeKind::bounced_hard, t0 + 5)
        };
        push(
            &outcomes,
            "c6",
            json(&bounced("c6", Channel::email, "c6@example.com")),
        );
        push(
            &sends,
            "c6",
            json(&command("s-7", "c6", MessageCategory::trigger)),
        );
        let moved = SendCommand {
            address: Some("c6-new@example.com".into()),
            ..command("s-8", "c6", MessageCategory::trigger)
        };
        push(&sends, "c6", json(&moved));
        push(
            &outcomes,
            "c7",
            json(&bounced("c7", Channel::push, "c7@example.com")),
        );
        push(
            &sends,
            "c7",
            json(&command("s-9", "c7", MessageCategory::trigger)),
        );
        out.extend(replayer.commit().expect("commit"));
        let first = |id: &str| {
            out.iter()
                .filter(|o| o.topic == outcomes)
                .map(|o| serde_json::from_slice::<Outcome>(&o.payload).expect("outcome"))
                .find(|o| o.send_id == id)
                .map(|o| (o.kind, o.reason.unwrap_or_default()))
                .unwrap_or_else(|| panic!("no outcome of {id}"))
        };
        for id in ["s-1", "s-2", "s-4"] {
            let (kind, reason) = first(id);
            assert_eq!(kind, OutcomeKind::failed, "{id}: {reason}");
            assert!(reason.starts_with("consent_withdrawn"), "{id}: {reason}");
        }
        for id in ["s-3", "s-5", "s-6", "s-8", "s-9"] {
            assert_eq!(first(id).0, OutcomeKind::sent, "{id}");
        }
        let (kind, reason) = first("s-7");
        assert_eq!(kind, OutcomeKind::failed, "{reason}");
        assert!(
            reason.starts_with("invalid_address: c6@example.com bounced hard"),
            "{reason}"
        );
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .expect("metrics text");
        assert!(
            text.contains("kairos_delivery_consent_withdrawn_total{channel=\"email\"} 3"),
            "{text}"
        );
    }

    /// A command whose template cannot render (a variable missing) fails the send and
    /// goes to the dead-letter topic with the reason, counted by reason; produced
    /// again from there with the variables fixed, it is sent, not skipped as a copy.
    #[test]
    fn a_send_whose_template_fails_is_dead_lettered_and_can_be_sent_again() {
        use kairos_core::contracts::DeadLetter;
        use kairos_core::time::DAY;
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = simulated_email_worker(dir.path());
        let (sends, outcomes) = (
            config.send_topic(Channel::email),
            config.topic(topics::OUTCOMES),
        );
        let dead_letters = config.topic(topics::DEAD_LETTER);
        let t0 = 20_000 * DAY;
        let broken = SendCommand {
            valid_until: t0 + DAY,
            ..email_command(t0, "abandoned_cart")
        };
        let mut out = Vec::new();
        for cmd in [&broken, &broken] {
            let payload = serde_json::to_vec(cmd).expect("encode");
            out.extend(replayer.push(&sends, b"c1", &payload).expect("push"));
            out.extend(replayer.commit().expect("commit"));
        }
        let letters: Vec<DeadLetter> = out
            .iter()
            .filter(|o| o.topic == dead_letters)
            .map(|o| serde_json::from_slice(&o.payload).expect("dead letter"))
            .collect();
        assert_eq!(
            letters.len(),
            2,
            "each copy is a letter of its own: {letters:#?}"
        );
        assert_ne!(letters[0].dead_letter_id, letters[1].dead_letter_id);
        assert!(
            letters[0].reason.starts_with("template: "),
            "{}",
            letters[0].reason
        );
        assert_eq!(letters[0].reason_code, DeadLetterReason::processing_error);
        let outcomes_of = |out: &[kairos_core::store::OutboxEntry]| -> Vec<(OutcomeKind, String)> {
            out.iter()
                .filter(|o| o.topic == outcomes)
                .map(|o| serde_json::from_slice::<Outcome>(&o.payload).expect("outcome"))
                .filter(|o| o.send_id == "s-1")
                .map(|o| (o.kind, o.reason.unwrap_or_default()))
                .collect()
        };
        let failed = outcomes_of(&out);
        assert!(
            failed
                .iter()
                .all(|(kind, reason)| *kind == OutcomeKind::failed
                    && reason.starts_with("template: ")),
            "{failed:?}"
        );
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .expect("metrics text");
        assert!(
            text.contains("kairos_dead_letters_total{reason=\"processing_error\"} 2"),
            "{text}"
        );
        // Re-produced from the letter with the cart's items: it goes out.
        let fixed = SendCommand {
            variables: r#"{"first_name":"Ann","cart_items":[{"product_id":"p1","name":"Shoes","quantity":1}],"cart_value":59.9}"#.into(),
            ..broken.clone()
        };
        let payload = serde_json::to_vec(&fixed).expect("encode");
        let mut out = replayer.push(&sends, b"c1", &payload).expect("push");
        out.extend(replayer.commit().expect("commit"));
        let sent = outcomes_of(&out);
        assert_eq!(
            sent.first().map(|(kind, _)| *kind),
            Some(OutcomeKind::sent),
            "{sent:?}"
        );
    }

    #[test]
    fn a_send_id_is_taken_once_and_a_copy_older_than_the_window_is_never_sent() {
        use kairos_core::time::DAY;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = test_config(dir.path(), &[]);
        let mut settings = config.delivery[&Channel::email].clone();
        settings.provider = ProviderKind::Simulator;
        let registry = prometheus::Registry::new();
        let processor = DeliveryProcessor::new(&config, Channel::email, settings, &registry)
            .expect("processor");
        let mut replayer =
            kairos_core::replay::Replayer::new(processor, &config, &registry).expect("replayer");
        let topic = config.send_topic(Channel::email);
        let outcomes_topic = config.topic(topics::OUTCOMES);
        let t0 = 20_000 * DAY;
        let mut push = |send_id: &str, created_at: Millis| -> Vec<Outcome> {
            let cmd = SendCommand {
                send_id: send_id.into(),
                trigger_id: format!("t-{send_id}"),
                customer_id: "c1".into(),
                scenario: "abandoned_cart".into(),
                channel: Channel::email,
                category: MessageCategory::trigger,
                template: "abandoned_cart".into(),
                address: Some("c1@example.com".into()),
                variables: r#"{"first_name":"Ann","cart_items":[],"cart_value":1.0}"#.into(),
                created_at,
                // Far ahead: only the window keeps an old copy from going out again.
                valid_until: created_at + 1_000 * DAY,
                cause_occurred_at: created_at,
                reasons: vec![],
            };
            let payload = serde_json::to_vec(&cmd).expect("encode");
            let mut out = replayer.push(&topic, b"c1", &payload).expect("push");
            out.extend(replayer.commit().expect("commit"));
            out.iter()
                .filter(|o| o.topic == outcomes_topic)
                .map(|o| serde_json::from_slice::<Outcome>(&o.payload).expect("outcome"))
                .filter(|o| o.send_id == send_id)
                .collect()
        };
        let sent = |outcomes: &[Outcome]| {
            outcomes
                .iter()
                .filter(|o| o.kind == OutcomeKind::sent)
                .count()
        };
        assert_eq!(sent(&push("a", t0)), 1);
        assert_eq!(
            push("a", t0).len(),
            0,
            "a copy within the window does nothing"
        );
        // Past the window (60 days by default) the sweep forgets "a".
        assert_eq!(sent(&push("b", t0 + 62 * DAY)), 1);
        let again = push("a", t0);
        assert_eq!(sent(&again), 0, "{again:?}");
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!(again[0].kind, OutcomeKind::failed);
        assert_eq!(
            again[0].reason.as_deref(),
            Some("expired: created before state.dedup_window")
        );
    }

    /// A later outcome stored before the send's address was appended still reads.
    #[test]
    fn later_outcomes_stored_without_the_address_still_read() {
        #[derive(Serialize)]
        struct OldSummary {
            send_id: String,
            customer_id: String,
            scenario: String,
            channel: Channel,
            category: MessageCategory,
        }
        #[derive(Serialize)]
        struct OldLater {
            send: OldSummary,
            kind: OutcomeKind,
        }
        let old = OldLater {
            send: OldSummary {
                send_id: "s1".into(),
                customer_id: "c1".into(),
                scenario: "welcome".into(),
                channel: Channel::email,
                category: MessageCategory::trigger,
            },
            kind: OutcomeKind::delivered,
        };
        let bytes = kairos_core::encoding::encode_state(&old).expect("encode");
        let later: LaterOutcome = kairos_core::encoding::decode_state(&bytes).expect("decode");
        assert_eq!(later.send.send_id, "s1");
        assert_eq!(later.send.address, None);
        assert_eq!(later.kind, OutcomeKind::delivered);
    }

    /// With a secret, the link carries the token of its customer and send, which a
    /// link made up for another customer cannot have.
    #[test]
    fn the_unsubscribe_link_carries_a_token_only_the_secret_makes() {
        let secret = "0123456789abcdef-secret";
        let template = "https://shop.example/u?c={customer_id}&t={token}";
        let token = kairos_core::ids::unsubscribe_token(secret, "c1", "s1");
        assert_eq!(token.len(), 64);
        assert_eq!(
            unsubscribe_url(template, "c1", "s1", Some(secret)),
            format!("https://shop.example/u?c=c1&t={token}")
        );
        assert_ne!(
            token,
            kairos_core::ids::unsubscribe_token(secret, "c2", "s1")
        );
        assert_ne!(
            token,
            kairos_core::ids::unsubscribe_token(secret, "c1", "s2")
        );
        assert_ne!(
            token,
            kairos_core::ids::unsubscribe_token("another secret!!", "c1", "s1")
        );
    }

    #[test]
    fn ids_in_the_unsubscribe_url_are_percent_encoded() {
        let template = "https://shop.example/unsubscribe?c={customer_id}&s={send_id}";
        assert_eq!(
            unsubscribe_url(template, "c-1_a.b~", "s-1", None),
            "https://shop.example/unsubscribe?c=c-1_a.b~&s=s-1"
        );
        assert_eq!(
            unsubscribe_url(template, "a>, <mailto:x@evil>&x=1#f", "s 1", None),
            "https://shop.example/unsubscribe?c=a%3E%2C%20%3Cmailto%3Ax%40evil%3E%26x%3D1%23f&s=s%201"
        );
    }

    /// The e-mail worker in event time on SMTP at `port` on this machine: the config,
    /// the metrics registry and the replayer.
    fn smtp_worker_at(
        dir: &std::path::Path,
        port: u16,
    ) -> (
        Config,
        prometheus::Registry,
        kairos_core::replay::Replayer<DeliveryProcessor>,
    ) {
        let config = smtp_on(dir, port, &[]);
        let (registry, replayer) = email_worker(&config);
        (config, registry, replayer)
    }

    /// `kairos_delivery_deferred_total` of the e-mail worker.
    fn deferrals(registry: &prometheus::Registry) -> u64 {
        let families = registry.gather();
        let family = families
            .iter()
            .find(|f| f.name() == "kairos_delivery_deferred_total")
            .expect("the deferral counter");
        family.get_metric()[0].get_counter().get_value() as u64
    }

    const GREYLISTED: &str = "450 4.7.1 greylisted, try again in 5 minutes";

    /// A greylisting server refuses a recipient's first tries for minutes: the send is
    /// set aside (no outcome, no retry within seconds) and tried again after 5 and
    /// then 10 more minutes, when the server takes it. A copy of the command that
    /// comes meanwhile is skipped.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_greylisted_send_is_set_aside_and_tried_again_minutes_later() {
        use kairos_core::time::{DAY, MINUTE};
        let (port, kept) = test_smtp::scripted_smtp_by_rcpt(
            |n| if n < 2 { GREYLISTED } else { "250 ok" },
            false,
            true,
        )
        .await;
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, registry, mut replayer) = smtp_worker_at(dir.path(), port);
        let t0 = 20_000 * DAY;
        let cmd = SendCommand {
            valid_until: t0 + DAY,
            ..email_command(t0, "welcome")
        };
        let payload = serde_json::to_vec(&cmd).expect("encode");
        let topic = config.send_topic(Channel::email);
        // Each time it is put off is told, with the server's answer and the next try.
        let told_deferred = |out: &[kairos_core::store::OutboxEntry], times: u32, next: Millis| {
            let outcomes = outcomes_in(&config, out);
            assert_eq!(outcomes.len(), 1, "{outcomes:#?}");
            let o = &outcomes[0];
            assert_eq!((o.kind, o.send_id.as_str()), (OutcomeKind::deferred, "s-1"));
            let reason = o.reason.as_deref().unwrap_or_default();
            assert!(
                reason.starts_with(&format!("the recipient's server put it off ({times}): "))
                    && reason.contains("4.7.1 greylisted")
                    && reason.ends_with(&format!("tried again at {next}")),
                "{reason}"
            );
            o.outcome_id.clone()
        };
        let mut out = replayer.push(&topic, b"c1", &payload).expect("push");
        out.extend(replayer.commit().expect("commit"));
        let first = told_deferred(&out, 1, t0 + 5 * MINUTE);
        assert_eq!(deferrals(&registry), 1);
        // The copy is skipped; nothing is due before five minutes.
        out = replayer.push(&topic, b"c1", &payload).expect("push");
        out.extend(replayer.advance_to(t0 + 5 * MINUTE - 1).expect("advance"));
        assert!(outcomes_in(&config, &out).is_empty(), "{out:?}");
        out = replayer.advance_to(t0 + 5 * MINUTE).expect("advance");
        let second = told_deferred(&out, 2, t0 + 15 * MINUTE);
        assert_ne!(first, second, "each one a record of its own");
        assert_eq!(deferrals(&registry), 2, "greylisted again");
        out = replayer.advance_to(t0 + 15 * MINUTE - 1).expect("advance");
        assert!(outcomes_in(&config, &out).is_empty(), "{out:?}");
        out = replayer.advance_to(t0 + 15 * MINUTE).expect("advance");
        let outcomes = outcomes_in(&config, &out);
        assert_eq!(outcomes.len(), 1, "{outcomes:#?}");
        assert_eq!(
            (outcomes[0].kind, outcomes[0].reason.as_deref()),
            (OutcomeKind::sent, None)
        );
        assert_eq!(outcomes[0].occurred_at, t0 + 15 * MINUTE);
        assert_eq!(kept.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(deferrals(&registry), 2);
        // Nothing of it is left to fire.
        out = replayer.advance_to(t0 + DAY).expect("advance");
        assert!(outcomes_in(&config, &out).is_empty(), "{out:?}");
        assert_eq!(kept.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// A send set aside is not made once the customer unsubscribed meanwhile (no
    /// server is asked); one the server keeps putting off is tried one last time a
    /// minute before its valid-until, then fails as expired with the server's last
    /// answer.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_send_set_aside_ends_at_an_unsubscribe_or_its_valid_until() {
        use kairos_core::time::{DAY, MINUTE};
        let rcpts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = rcpts.clone();
        let (port, kept) = test_smtp::scripted_smtp_by_rcpt(
            move |n| {
                counted.store(n + 1, std::sync::atomic::Ordering::SeqCst);
                GREYLISTED
            },
            false,
            true,
        )
        .await;
        let dir = tempfile::tempdir().expect("temp dir");
        let (config, _registry, mut replayer) = smtp_worker_at(dir.path(), port);
        let t0 = 20_000 * DAY;
        let topic = config.send_topic(Channel::email);
        let unsubscribing = SendCommand {
            valid_until: t0 + DAY,
            ..email_command(t0, "welcome")
        };
        let expiring = SendCommand {
            send_id: "s-2".into(),
            customer_id: "c2".into(),
            address: Some("c2@example.com".into()),
            valid_until: t0 + 20 * MINUTE,
            ..email_command(t0, "welcome")
        };
        let mut out = Vec::new();
        for cmd in [&unsubscribing, &expiring] {
            let payload = serde_json::to_vec(cmd).expect("encode");
            let key = cmd.customer_id.as_bytes();
            out.extend(replayer.push(&topic, key, &payload).expect("push"));
        }
        let unsubscribed = Outcome {
            outcome_id: "o-1".into(),
            send_id: "earlier".into(),
            customer_id: "c1".into(),
            scenario: "weekly_promo".into(),
            channel: Channel::email,
            category: MessageCategory::promo,
            kind: OutcomeKind::unsubscribed,
            reason: None,
            occurred_at: t0 + MINUTE,
            address: None,
        };
        let payload = serde_json::to_vec(&unsubscribed).expect("encode");
        let outcomes_topic = config.topic(topics::OUTCOMES);
        out.extend(
            replayer
                .push(&outcomes_topic, b"c1", &payload)
                .expect("push"),
        );
        for t in [5, 15, 19, 20] {
            out.extend(replayer.advance_to(t0 + t * MINUTE).expect("advance"));
        }
        let (put_off, outcomes): (Vec<Outcome>, Vec<Outcome>) = outcomes_in(&config, &out)
            .into_iter()
            .partition(|o| o.kind == OutcomeKind::deferred);
        let times_put_off = |id: &str| put_off.iter().filter(|o| o.send_id == id).count();
        // s-1 at 0; s-2 at 0, 5 and 15 minutes (at 19 it has no try left: failed).
        assert_eq!((times_put_off("s-1"), times_put_off("s-2")), (1, 3));
        assert_eq!(outcomes.len(), 2, "{outcomes:#?}");
        let of = |id: &str| outcomes.iter().find(|o| o.send_id == id).expect(id);
        let stopped = of("s-1");
        assert_eq!(stopped.kind, OutcomeKind::failed);
        assert_eq!(stopped.occurred_at, t0 + 5 * MINUTE);
        let reason = stopped.reason.as_deref().unwrap_or_default();
        assert!(reason.starts_with("consent_withdrawn"), "{reason}");
        let expired = of("s-2");
        assert_eq!(expired.kind, OutcomeKind::failed);
        assert_eq!(expired.occurred_at, t0 + 19 * MINUTE);
        let reason = expired.reason.as_deref().unwrap_or_default();
        assert!(
            reason.starts_with("expired: the recipient's server put it off 4 times, last: ")
                && reason.contains("4.7.1 greylisted"),
            "{reason}"
        );
        // s-1 once; s-2 at 0, 5, 15 and 19 minutes.
        assert_eq!(rcpts.load(std::sync::atomic::Ordering::SeqCst), 5);
        assert_eq!(kept.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
