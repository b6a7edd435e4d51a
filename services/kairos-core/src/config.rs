//! Configuration: one TOML file (config/kairos.toml) with environment overrides.
//!
//! `KAIROS__KAFKA__BOOTSTRAP_SERVERS=host:9092` overrides `[kafka] bootstrap_servers`:
//! the prefix `KAIROS__`, then the key path separated by `__`. Errors name the file, line,
//! column and key, or the environment variable that caused them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::contracts::{Channel, MessageCategory, OrderStatus};
use crate::time::ClockMode;

pub const ENV_PREFIX: &str = "KAIROS__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}: {message}")]
    Semantic { file: PathBuf, message: String },
    #[error("environment override {var}: {message}")]
    Env { var: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub clock: ClockConfig,
    #[serde(default)]
    pub schema_registry: SchemaRegistryConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub profile: ProfileConfig,
    #[serde(default)]
    pub catalog: CatalogConfig,
    #[serde(default)]
    pub arbiter: ArbiterConfig,
    #[serde(default)]
    pub feedback: FeedbackConfig,
    #[serde(default)]
    pub delivery: BTreeMap<Channel, DeliveryChannelConfig>,
    #[serde(default)]
    pub templates: TemplatesConfig,
    #[serde(default)]
    pub generator: GeneratorConfig,
    #[serde(default)]
    pub segments: SegmentsConfig,
    #[serde(default)]
    pub scenarios: Vec<ScenarioConfig>,
    /// Where this config was read from; set by `load`.
    #[serde(skip)]
    pub source_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Kafka bootstrap servers. Empty: read `broker_address_file`, written by `kairos dev-broker`.
    pub bootstrap_servers: String,
    pub broker_address_file: PathBuf,
    /// Prefix of every topic name (`kairos.` gives `kairos.events.site`, ...).
    pub topic_prefix: String,
    /// Prefix of every consumer group id.
    pub group_prefix: String,
    /// Partition count of every topic; co-partitioned topics must agree.
    pub partitions: i32,
    pub replication_factor: i32,
    /// Create missing topics at start-up (needs CreateTopics rights on real clusters).
    pub create_topics: bool,
    /// Extra librdkafka properties for every client (security.protocol, sasl.*, ...).
    pub client: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: String::new(),
            broker_address_file: PathBuf::from("var/broker.addr"),
            topic_prefix: "kairos.".into(),
            group_prefix: "kairos-".into(),
            partitions: 4,
            replication_factor: 1,
            create_topics: true,
            client: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Root of the RocksDB stores; each service and partition gets a directory below it.
    pub dir: PathBuf,
    /// One LRU block cache shared by every store of a process.
    pub block_cache_bytes: usize,
    /// Records processed per state commit.
    pub max_batch_records: usize,
    /// Longest wait to fill a batch.
    #[serde(with = "humantime_serde")]
    pub max_batch_wait: Duration,
    /// How often due timers are looked for (wall-clock mode).
    #[serde(with = "humantime_serde")]
    pub timer_tick: Duration,
    /// Hot entries a processor keeps decoded in memory (write-back cache), per process.
    pub cache_entries: usize,
    /// Persistent timers a processor holds in memory, per process, shared out evenly
    /// over `kafka.partitions`: each partition holds its earliest ones (firing never
    /// reads the store) and reads the next ones back from RocksDB once it has fired
    /// those. Each costs its payload plus about 100 bytes.
    pub timers_in_memory: usize,
    /// Replicate state to `<prefix><service>-changelog` topics, so partitions can move
    /// between instances with their state.
    pub changelog: bool,
    /// How long ids that records are deduplicated by (feedback's outcomes, decisions
    /// and purchases, a delivery worker's send ids) are kept after they were first
    /// seen, then deleted so that state does not grow for ever. A redelivered copy
    /// (after a crash, a producer retry) comes minutes later; a record whose own time
    /// is older than this is not counted (feedback) or not sent (delivery), as a copy
    /// of it may have been forgotten. Must be longer than any message's validity.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: PathBuf::from("var/state"),
            block_cache_bytes: 64 << 20,
            max_batch_records: 1000,
            max_batch_wait: Duration::from_millis(20),
            timer_tick: Duration::from_millis(250),
            cache_entries: 100_000,
            timers_in_memory: 1_000_000,
            changelog: true,
            dedup_window: Duration::from_secs(60 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockConfig {
    pub mode: ClockMode,
    /// Wall-clock mode: an input record whose event time is further than this ahead
    /// of the machine's clock goes to the dead-letter topic (a device clock set years
    /// ahead would otherwise hold a customer's "latest" times there for good).
    /// Event-time mode checks against the partition's event time instead, with
    /// `max_event_gap`; a live service (not a replay) in event time still takes an
    /// event no further than this ahead of the machine's clock, so a partition quiet
    /// for longer than the gap does not refuse its input for good.
    #[serde(with = "humantime_serde")]
    pub max_event_lead: Duration,
    /// Event-time mode: an input record whose event time is further than this ahead of
    /// its partition's event time (of this machine's clock for the partition's first
    /// event) goes to the dead-letter topic: one event dated years ahead would move the partition's clock there and
    /// make every later timer late. At least `max_event_lead`, as input replayed
    /// from history may pause for weeks on a partition.
    #[serde(with = "humantime_serde")]
    pub max_event_gap: Duration,
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig {
            mode: ClockMode::Wall,
            max_event_lead: Duration::from_secs(24 * 3600),
            // A year as humantime counts it (365.25 days), so it reads "1year".
            max_event_gap: Duration::from_secs(31_557_600),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaRegistryConfig {
    /// Confluent-compatible schema registry; needed only for Avro input.
    pub url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Plain,
    Json,
}

/// Settings every service's admin server shares (each service has its own
/// `admin_listen`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where a service writes the admin address it bound, once it listens. With an
    /// `admin_listen` port of 0 the kernel picks a free port and this file says which:
    /// no port is chosen before the service binds it, so none can be taken meanwhile.
    pub address_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// tracing-subscriber filter, e.g. `info,kairos_profile=debug`; RUST_LOG wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Plain,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileConfig {
    pub admin_listen: SocketAddr,
    /// The currency revenue is counted in (ISO 4217, "EUR"). Unset: amounts count as
    /// given, whatever currency an order names.
    pub currency: Option<String>,
    /// Units of `currency` per unit of another (`USD = 0.92`): orders and receipts in
    /// it are converted when read; one in a currency neither `currency` nor here is
    /// dead-lettered.
    pub exchange_rates: BTreeMap<String, f64>,
    /// Customers the catalog join tells of a price drop or a return to stock per
    /// commit, at most: a larger audience (a bestseller's) is kept in chunks and told
    /// over the next commits, so one update does not put millions of records in one.
    pub audience_per_commit: usize,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        ProfileConfig {
            admin_listen: ([127, 0, 0, 1], 9101).into(),
            currency: None,
            exchange_rates: BTreeMap::new(),
            audience_per_commit: 20_000,
        }
    }
}

/// Which customer the survivor of a merge is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SurvivorRule {
    /// The customer whose earliest event read so far is the older, in event time
    /// (ties: the smaller id).
    FirstSeen,
    /// The smaller customer id: the same survivor whatever order events arrive in.
    SmallestId,
}

/// `[identity]`: the identity processor in front of the profile processor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Resolve every raw event to one customer before the profile sees it. Off: the
    /// profile reads the raw topics and keys state by customer id as given.
    pub enabled: bool,
    pub admin_listen: SocketAddr,
    /// Region of phone numbers written without a country code (ISO 3166, e.g. "DE").
    pub default_country: String,
    /// Identifiers trusted to prove that two known customers are one person.
    pub merge_on: Vec<crate::identifiers::IdentifierKind>,
    /// An identifier presented by more customers than this stops linking (a family
    /// phone, a shop's test card) and is reported.
    pub max_customers_per_identifier: usize,
    /// A customer holding this many identifiers links no more, and absorbs no
    /// anonymous profile that would take it past them: a producer's placeholder id
    /// (a till's "walk-in" customer with every buyer's phone) would otherwise grow one
    /// graph entry, rewritten whole at each new identifier, until the broker refuses it.
    pub max_identifiers_per_customer: usize,
    pub survivor: SurvivorRule,
    /// How long the profile processor keeps a merged customer's forwarding record
    /// (where a late merge into that customer goes on to), from the merge: merges
    /// travel between partitions in seconds, so the record is kept well past that,
    /// then deleted, so that merged customers leave no state for good.
    #[serde(with = "humantime_serde")]
    pub forward_retention: Duration,
    /// How long a profile known only by anonymous identifiers (a cookie, a device, an
    /// e-mail left without a login) is kept after its last event or opened or clicked
    /// message: the profile processor then forgets its state (with identity resolution
    /// on or off) and tells the identity processor, which deletes its graph entries, so
    /// the graph does not grow with every visitor who never comes back. A profile
    /// stitched to a customer, or one that absorbed another, is kept. 0 keeps them all.
    #[serde(with = "humantime_serde")]
    pub anonymous_retention: Duration,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        use crate::identifiers::IdentifierKind;
        IdentityConfig {
            enabled: false,
            admin_listen: ([127, 0, 0, 1], 9107).into(),
            default_country: "US".into(),
            merge_on: vec![IdentifierKind::email, IdentifierKind::loyalty_card],
            max_customers_per_identifier: 3,
            max_identifiers_per_customer: 1_000,
            survivor: SurvivorRule::SmallestId,
            forward_retention: Duration::from_secs(30 * 24 * 3600),
            anonymous_retention: Duration::from_secs(400 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    pub admin_listen: SocketAddr,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        CatalogConfig {
            admin_listen: ([127, 0, 0, 1], 9104).into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArbiterConfig {
    pub admin_listen: SocketAddr,
    /// Share of customers in the global control group, 0-100.
    pub control_group_percent: u8,
    /// Salt of the control-group hash; changing it reshuffles the group.
    pub control_group_salt: String,
    /// Marketing messages per calendar day in the customer's time zone.
    pub daily_cap: u32,
    /// Marketing messages per rolling 7 days.
    pub weekly_cap: u32,
    /// Least time between two marketing messages to one customer.
    #[serde(with = "humantime_serde")]
    pub min_gap: Duration,
    /// Quiet hours in the customer's local time ("HH:MM", the window may span
    /// midnight): marketing messages wait until the end, they are not dropped for it.
    pub quiet_hours_start: Option<String>,
    pub quiet_hours_end: Option<String>,
    /// Time zone of customers whose zone is unknown.
    pub default_time_zone: String,
    /// No promo for this long after a purchase (0 turns the pause off).
    #[serde(with = "humantime_serde")]
    pub pause_after_purchase: Duration,
    /// Marketing messages within this window stay on one channel: a message that
    /// would need another channel waits until the window is over.
    #[serde(with = "humantime_serde")]
    pub conflict_window: Duration,
    /// The same offer (`offer_id` or `promo_code` variable) is not sent again within
    /// this window.
    #[serde(with = "humantime_serde")]
    pub offer_repeat_window: Duration,
    /// No promo to a customer who ignored this many marketing messages in a row (0
    /// turns the sunset off); an open or click ends it.
    pub sunset_after_ignored: u32,
    /// No promo to a customer without a visit for this long (0 turns it off); only
    /// customers whose activity the arbiter has seen are judged.
    #[serde(with = "humantime_serde")]
    pub sunset_inactive_after: Duration,
    /// What happens to a marketing message of another scenario while a chain with a
    /// higher or equal priority holds the customer (the main scenario): it waits until
    /// the chain is over, or it is dropped.
    pub lower_priority: LowerPriority,
    /// Caps of one channel (`[arbiter.channel_caps.sms] daily_cap = 1`), on top of the
    /// overall caps: a channel at its cap is skipped for the next one.
    pub channel_caps: BTreeMap<Channel, CapConfig>,
    /// Caps of one category (`[arbiter.category_caps.promo] weekly_cap = 3`).
    pub category_caps: BTreeMap<MessageCategory, CapConfig>,
    /// Cost class of a channel (`channel_costs = { messenger = "paid" }`): free
    /// channels are chosen before paid ones. Unlisted: SMS paid, the rest free.
    pub channel_costs: BTreeMap<Channel, ChannelCost>,
}

/// What a message on a channel costs, for the channel choice: free first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelCost {
    Free,
    Paid,
}

impl ChannelCost {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelCost::Free => "free",
            ChannelCost::Paid => "paid",
        }
    }
}

/// Marketing messages per calendar day in the customer's zone and per rolling 7 days.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapConfig {
    pub daily_cap: Option<u32>,
    pub weekly_cap: Option<u32>,
}

impl CapConfig {
    /// The first cap set to 0, which would hold every message it covers until it
    /// expires.
    fn zero_field(&self) -> Option<&'static str> {
        [
            ("daily_cap", self.daily_cap),
            ("weekly_cap", self.weekly_cap),
        ]
        .into_iter()
        .find(|(_, cap)| *cap == Some(0))
        .map(|(field, _)| field)
    }
}

/// See [`ArbiterConfig::lower_priority`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LowerPriority {
    Wait,
    Drop,
}

impl ArbiterConfig {
    /// The cost class of `channel`: configured, or SMS paid and the rest free.
    pub fn cost_of(&self, channel: Channel) -> ChannelCost {
        match self.channel_costs.get(&channel) {
            Some(cost) => *cost,
            None if channel == Channel::sms => ChannelCost::Paid,
            None => ChannelCost::Free,
        }
    }

    /// The quiet window as (start, end) local times, if configured.
    pub fn quiet_hours(&self) -> Option<(chrono::NaiveTime, chrono::NaiveTime)> {
        let parse =
            |s: &Option<String>| chrono::NaiveTime::parse_from_str(s.as_deref()?, "%H:%M").ok();
        Some((
            parse(&self.quiet_hours_start)?,
            parse(&self.quiet_hours_end)?,
        ))
    }
}

impl Default for ArbiterConfig {
    fn default() -> Self {
        ArbiterConfig {
            admin_listen: ([127, 0, 0, 1], 9102).into(),
            control_group_percent: 10,
            control_group_salt: "kairos".into(),
            daily_cap: 2,
            weekly_cap: 6,
            min_gap: Duration::ZERO,
            quiet_hours_start: None,
            quiet_hours_end: None,
            default_time_zone: "UTC".into(),
            pause_after_purchase: Duration::from_secs(2 * 86_400),
            conflict_window: Duration::from_secs(3_600),
            offer_repeat_window: Duration::from_secs(14 * 86_400),
            sunset_after_ignored: 10,
            sunset_inactive_after: Duration::from_secs(180 * 86_400),
            lower_priority: LowerPriority::Wait,
            channel_caps: BTreeMap::new(),
            category_caps: BTreeMap::new(),
            channel_costs: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedbackConfig {
    pub admin_listen: SocketAddr,
    /// How long after a message (or a held-out decision) a purchase still counts as
    /// its conversion; the last touch before the purchase takes it.
    #[serde(with = "humantime_serde")]
    pub attribution_window: Duration,
    /// How long a purchase waits before it is attributed, so that the decisions before
    /// it read a little after it (each topic is read at its own speed; after an outage
    /// a backlog of purchases can come first) are in; `0s` attributes at once.
    #[serde(with = "humantime_serde")]
    pub attribution_delay: Duration,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        FeedbackConfig {
            admin_listen: ([127, 0, 0, 1], 9103).into(),
            attribution_window: Duration::from_secs(72 * 3600),
            attribution_delay: Duration::from_secs(5 * 60),
        }
    }
}

/// Where message templates live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplatesConfig {
    /// Directory of `<template>.toml` files; a relative path is relative to the
    /// directory of the configuration file.
    pub dir: PathBuf,
}

impl Default for TemplatesConfig {
    fn default() -> Self {
        TemplatesConfig {
            dir: PathBuf::from("templates"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Realistic simulated delivery and engagement, for demos and load tests.
    Simulator,
    /// A real SMTP conversation (e-mail).
    Smtp,
    /// JSON POST to an HTTP API (SMS gateways, push services, messenger bots, webhooks).
    Http,
    /// An inbox per customer that the site or app polls (in-app and on-site messages).
    InApp,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Simulator => "simulator",
            ProviderKind::Smtp => "smtp",
            ProviderKind::Http => "http",
            ProviderKind::InApp => "in_app",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryChannelConfig {
    pub admin_listen: SocketAddr,
    #[serde(default = "default_provider")]
    pub provider: ProviderKind,
    #[serde(default)]
    pub simulator: SimulatorConfig,
    #[serde(default)]
    pub smtp: Option<SmtpConfig>,
    #[serde(default)]
    pub http: Option<HttpProviderConfig>,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    /// Token providers must send as `Authorization: Bearer <token>` to the webhook;
    /// without one the webhook is open (for a trusted network only).
    #[serde(default)]
    pub webhook_token: Option<String>,
    /// In-app only: the secret under which a poll of a customer's inbox must carry its
    /// token, `Authorization: Bearer <HMAC-SHA256 of the customer id, hex>` (see
    /// `kairos_core::ids::inbox_token`); without one the inbox is open to whoever
    /// reaches the port (a backend polling for the site on a trusted network).
    #[serde(default)]
    pub inbox_secret: Option<String>,
    /// The secret under which `{token}` in `list_unsubscribe` is filled in (see
    /// `kairos_core::ids::unsubscribe_token`), so the shop's unsubscribe endpoint can
    /// tell a link Kairos sent from one made up for someone else's customer id.
    #[serde(default)]
    pub unsubscribe_secret: Option<String>,
    /// In-app only: serve the inbox without `inbox_secret` on an address other than
    /// loopback (a backend polling it on a trusted network). Without it such a
    /// configuration is refused: every customer's messages would be open to whoever
    /// reaches the port.
    #[serde(default)]
    pub open_inbox: bool,
    /// Take provider webhook events without `webhook_token` on an address other than
    /// loopback (providers posting from a trusted network). Without it such a
    /// configuration is refused: anyone reaching the port could post forged hard
    /// bounces, unsubscribes and complaints, which suppress customers for good.
    #[serde(default)]
    pub open_webhook: bool,
}

impl DeliveryChannelConfig {
    /// The opt-out URL template of the configured provider (`smtp.list_unsubscribe` or
    /// `http.list_unsubscribe`), if it has a non-blank one.
    pub fn list_unsubscribe(&self) -> Option<&str> {
        let link = match self.provider {
            ProviderKind::Smtp => self
                .smtp
                .as_ref()
                .and_then(|s| s.list_unsubscribe.as_deref()),
            ProviderKind::Http => self
                .http
                .as_ref()
                .and_then(|h| h.list_unsubscribe.as_deref()),
            ProviderKind::Simulator | ProviderKind::InApp => None,
        };
        link.filter(|l| !l.trim().is_empty())
    }

    /// Whether its provider delivers for real (not the simulator or the inbox).
    fn reaches_a_provider(&self) -> bool {
        matches!(self.provider, ProviderKind::Smtp | ProviderKind::Http)
    }
}

/// How to reach an SMTP server and what every message carries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    pub host: String,
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// `none` (a local relay), `starttls` or `tls`.
    #[serde(default)]
    pub security: SmtpSecurity,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// From header, e.g. `Shop <news@shop.example>`.
    pub from: String,
    #[serde(default)]
    pub reply_to: Option<String>,
    /// List-Unsubscribe URL template; `{customer_id}` and `{send_id}` are replaced.
    #[serde(default)]
    pub list_unsubscribe: Option<String>,
    #[serde(default = "default_provider_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpSecurity {
    #[default]
    None,
    Starttls,
    Tls,
}

/// Why `url` is no gateway a worker can post to, if it is not.
fn check_gateway_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL ({e}): {url:?}"))?;
    match parsed.scheme() {
        "http" | "https" if parsed.host_str().is_some() => Ok(()),
        "http" | "https" => Err(format!("no host in {url:?}")),
        other => Err(format!("scheme {other:?}: http or https")),
    }
}

/// The certificates of a PEM file (at least one), or why not.
pub fn read_certificates(file: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{} is no PEM certificate file: {e}", file.display()))?;
    if certificates.is_empty() {
        return Err(format!("{} holds no certificate", file.display()));
    }
    Ok(certificates)
}

/// The shortest `delivery.in_app.inbox_secret` taken.
const MIN_INBOX_SECRET_CHARS: usize = 16;

/// Whether `host` names this machine (a local relay, where credentials stay put).
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn default_smtp_port() -> u16 {
    25
}

fn default_provider_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A JSON-over-HTTP provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProviderConfig {
    pub url: String,
    /// Header carrying credentials, e.g. `Authorization`, and its value.
    #[serde(default)]
    pub auth_header: Option<String>,
    #[serde(default)]
    pub auth_value: Option<String>,
    /// Header carrying the send id, so the provider drops a repeated request.
    #[serde(default = "default_idempotency_header")]
    pub idempotency_header: String,
    #[serde(default = "default_provider_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Opt-out URL template (`{customer_id}`, `{send_id}` replaced), sent in the
    /// request as `unsubscribe_url` and given to templates: an e-mail API puts it in
    /// the message's `List-Unsubscribe` header.
    #[serde(default)]
    pub list_unsubscribe: Option<String>,
    /// PEM file of certificates trusted for an `https` gateway besides the system's
    /// (a gateway behind a private certificate authority).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_idempotency_header() -> String {
    "Idempotency-Key".into()
}

/// Retries of transient provider errors: exponential backoff with full jitter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all (the first included); then the send goes to the dead-letter topic.
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// The wait after a recipient's server put a send off (a 4xx to `RCPT TO`:
    /// greylisting, a full mailbox), which asks for minutes, not the backoff's
    /// seconds: the send is set aside on a timer and tried again then, the wait
    /// doubling up to `deferral_max_backoff`, until its valid-until.
    #[serde(with = "humantime_serde")]
    pub deferral_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub deferral_max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            deferral_backoff: Duration::from_secs(5 * 60),
            deferral_max_backoff: Duration::from_secs(60 * 60),
        }
    }
}

/// Token bucket per provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    pub per_second: u32,
    pub burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            per_second: 1000,
            burst: 100,
        }
    }
}

/// After `failure_threshold` failed requests in a row the provider is left alone for
/// `open_for`, then one trial request decides whether it is back.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    pub failure_threshold: u32,
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
        }
    }
}

fn default_provider() -> ProviderKind {
    ProviderKind::Simulator
}

/// Rates of the simulated provider, as fractions. Defaults follow published e-mail
/// benchmarks: ~98% delivered, ~20% of delivered opened, ~15% of openers click.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatorConfig {
    pub delivery_rate: f64,
    pub hard_bounce_rate: f64,
    pub open_rate: f64,
    pub click_to_open_rate: f64,
    pub unsubscribe_rate: f64,
    pub complaint_rate: f64,
    /// Engagement happens between these delays after delivery.
    #[serde(with = "humantime_serde")]
    pub engagement_delay_min: Duration,
    #[serde(with = "humantime_serde")]
    pub engagement_delay_max: Duration,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            delivery_rate: 0.98,
            hard_bounce_rate: 0.01,
            open_rate: 0.20,
            click_to_open_rate: 0.15,
            unsubscribe_rate: 0.002,
            complaint_rate: 0.0005,
            engagement_delay_min: Duration::from_secs(60),
            engagement_delay_max: Duration::from_secs(6 * 3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// Events per second across all input topics.
    pub rate: f64,
    /// Size of the simulated customer base.
    pub customers: u64,
    /// Share of purchases made in physical stores.
    pub offline_share: f64,
    pub seed: u64,
    /// Share of sessions followed by a change to a product on the catalog topic (a
    /// sale, the list price back, sold out, restocked): 0 leaves the catalog alone.
    pub catalog_change_share: f64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            rate: 200.0,
            customers: 20_000,
            offline_share: 0.25,
            seed: 42,
            catalog_change_share: 0.0,
        }
    }
}

/// What makes a scenario fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScenarioKind {
    /// A cart left without a purchase for `delay`; cart changes restart the wait, a
    /// purchase (online or offline) cancels it.
    AbandonedCart,
    /// Products viewed, nothing carted or bought within `delay`.
    BrowseAbandonment,
    /// A registration; first step after `delay`, then `steps`.
    Welcome,
    /// `delay` after a purchase (review request, care tips); a return cancels it.
    PostPurchase,
    /// `delay` without any visit.
    Reactivation,
    /// The customer's birthday at `local_time` in their time zone.
    Birthday,
    /// The anniversary of the registration at `local_time` in their time zone.
    RegistrationAnniversary,
    /// `delay` before the customer's subscription ends.
    SubscriptionEnding,
    /// `delay` after an order was delivered (NPS survey).
    PostDelivery,
    /// An order status change (shipped, delivered, ...): transactional.
    OrderUpdate,
    /// The customer entered `segment` (RFM cell or lifecycle stage).
    SegmentEntered,
    /// A viewed or wishlisted product got cheaper by at least `min_drop_percent`.
    PriceDrop,
    /// A wishlisted product is back in stock.
    BackInStock,
}

/// What starts a welcome series (`on` of a `welcome` scenario).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WelcomeCause {
    /// The customer registered.
    Registration,
    /// The customer's first marketing opt-in (a consent granted on any channel).
    Subscription,
}

/// Every lifecycle stage the profile processor assigns.
pub const LIFECYCLE_STAGES: [&str; 5] = ["prospect", "new", "regular", "dormant", "churned"];

/// The RFM "segment" of a customer with no order that counts: a transition to it says
/// the customer left RFM (every order cancelled).
pub const NO_RFM_SEGMENT: &str = "none";

/// A later step of a chain, `delay` after the previous one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    pub template: String,
    /// Whether a purchase after the chain's cause ends the chain at this step (it
    /// and every later step go out no more). Default: the scenario's
    /// `exit_on_purchase`. A welcome series can so keep its how-to steps going for a
    /// buyer and end before its first-order discount.
    #[serde(default)]
    pub exit_on_purchase: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioConfig {
    pub name: String,
    pub kind: ScenarioKind,
    #[serde(default = "default_category")]
    pub category: MessageCategory,
    /// Channels in order of preference (free channels first).
    pub channels: Vec<Channel>,
    /// Template of the first step.
    pub template: String,
    #[serde(default, with = "humantime_serde")]
    pub delay: Duration,
    /// Further steps of a chain (a welcome series: now, +2 days, +5 days).
    #[serde(default)]
    pub steps: Vec<StepConfig>,
    /// How long after firing the message is still worth sending.
    #[serde(default = "default_valid_for", with = "humantime_serde")]
    pub valid_for: Duration,
    /// How late a trigger may still be emitted; later ones are skipped and counted.
    /// Default: 12 h for dated occasions, `valid_for` otherwise.
    #[serde(default, with = "humantime_serde")]
    pub tolerance: Option<Duration>,
    /// Local time of day ("HH:MM") for birthday and anniversary scenarios.
    #[serde(default)]
    pub local_time: Option<String>,
    /// Segment or lifecycle stage name, for `segment_entered`.
    #[serde(default)]
    pub segment: Option<String>,
    /// Minimum price drop for `price_drop`, in percent (see
    /// [`ScenarioConfig::min_drop`]).
    #[serde(default)]
    pub min_drop_percent: Option<f64>,
    /// Order statuses that fire `order_update` (default: all).
    #[serde(default)]
    pub statuses: Vec<OrderStatus>,
    /// Whether a purchase ends the chain. Default: yes for abandoned cart, browse
    /// abandonment, welcome and reactivation.
    #[serde(default)]
    pub exit_on_purchase: Option<bool>,
    /// Higher wins when scenarios compete for a customer.
    #[serde(default = "default_priority")]
    pub priority: i32,
    /// Share of the scenario's customers held out (0-100) on top of the global control
    /// group: their decisions are recorded, nothing is sent, so lift can be measured.
    #[serde(default)]
    pub holdout_percent: u8,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A cascade over `channels`: after the first message, wait this long for an open
    /// or click, then send on the next usable channel, and so on (one wait per further
    /// channel, e.g. `["1h", "4h"]` for e-mail, push, SMS). A reaction or a purchase
    /// ends it. Empty: one channel only.
    #[serde(default)]
    pub cascade: Vec<humantime_serde::Serde<Duration>>,
    /// Caps of this scenario's marketing messages per customer, on top of the overall,
    /// channel and category caps (`caps = { daily_cap = 1, weekly_cap = 2 }`).
    #[serde(default)]
    pub caps: Option<CapConfig>,
    /// What starts a `welcome` series: a registration, a subscription (the first
    /// marketing opt-in) or, by default (empty), whichever of both comes first: one
    /// series either way.
    #[serde(default)]
    pub on: Vec<WelcomeCause>,
    /// A mass send (a campaign to many customers, not a personal occasion): a
    /// customer whom a personal chain holds (the main scenario) gets none of it,
    /// whatever the priorities.
    #[serde(default)]
    pub mass: bool,
}

impl ScenarioKind {
    /// The name in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            ScenarioKind::AbandonedCart => "abandoned_cart",
            ScenarioKind::BrowseAbandonment => "browse_abandonment",
            ScenarioKind::Welcome => "welcome",
            ScenarioKind::PostPurchase => "post_purchase",
            ScenarioKind::Reactivation => "reactivation",
            ScenarioKind::Birthday => "birthday",
            ScenarioKind::RegistrationAnniversary => "registration_anniversary",
            ScenarioKind::SubscriptionEnding => "subscription_ending",
            ScenarioKind::PostDelivery => "post_delivery",
            ScenarioKind::OrderUpdate => "order_update",
            ScenarioKind::SegmentEntered => "segment_entered",
            ScenarioKind::PriceDrop => "price_drop",
            ScenarioKind::BackInStock => "back_in_stock",
        }
    }

    /// Occasions told the moment they happen (an order status, a catalog change): no
    /// `delay`, no `steps`.
    pub fn fires_at_once(self) -> bool {
        matches!(
            self,
            ScenarioKind::OrderUpdate | ScenarioKind::PriceDrop | ScenarioKind::BackInStock
        )
    }

    /// Waits that every new cause restarts (a cart change, a product view).
    pub fn is_restartable_wait(self) -> bool {
        matches!(
            self,
            ScenarioKind::AbandonedCart | ScenarioKind::BrowseAbandonment
        )
    }
}

impl ScenarioConfig {
    /// Whether `cause` starts this welcome series (see [`ScenarioConfig::on`]).
    pub fn welcomes_on(&self, cause: WelcomeCause) -> bool {
        self.on.is_empty() || self.on.contains(&cause)
    }

    /// How long the cascade waits for a reaction after its `sent`-th message.
    pub fn cascade_wait(&self, sent: usize) -> Option<Duration> {
        self.cascade.get(sent.checked_sub(1)?).map(|d| **d)
    }

    /// Time from sending step `step` (0 is the first message) to the chain's last one.
    pub fn remaining_after(&self, step: usize) -> Duration {
        self.steps.iter().skip(step).map(|s| s.delay).sum()
    }

    /// Whether this is a `segment_entered` scenario for `segment` (an RFM segment or a
    /// lifecycle stage).
    pub fn targets_segment(&self, segment: &str) -> bool {
        self.kind == ScenarioKind::SegmentEntered && self.segment.as_deref() == Some(segment)
    }

    pub fn ends_on_purchase(&self) -> bool {
        self.exit_on_purchase.unwrap_or(matches!(
            self.kind,
            ScenarioKind::AbandonedCart
                | ScenarioKind::BrowseAbandonment
                | ScenarioKind::Welcome
                | ScenarioKind::Reactivation
        ))
    }

    /// The smallest price drop, in percent, a `price_drop` scenario tells of:
    /// `min_drop_percent`, [`DEFAULT_MIN_DROP_PERCENT`] when not set (a repricer's
    /// cent a day would otherwise tell the whole audience every day).
    pub fn min_drop(&self) -> f64 {
        self.min_drop_percent.unwrap_or(DEFAULT_MIN_DROP_PERCENT)
    }

    /// From the cause to the last step's moment, with that step's tolerance: how long
    /// after its cause the chain may still send.
    pub fn chain_reach(&self) -> Duration {
        let steps: Duration = self.steps.iter().map(|step| step.delay).sum();
        self.delay + steps + self.tolerance()
    }

    pub fn tolerance(&self) -> Duration {
        self.tolerance.unwrap_or(match self.kind {
            ScenarioKind::Birthday | ScenarioKind::RegistrationAnniversary => {
                Duration::from_secs(12 * 3600)
            }
            _ => self.valid_for,
        })
    }

    /// Whether a purchase after the chain's cause ends the chain at step `step` (0 is
    /// the first): the step's own `exit_on_purchase`, else the scenario's.
    pub fn step_ends_on_purchase(&self, step: usize) -> bool {
        step.checked_sub(1)
            .and_then(|later| self.steps.get(later))
            .and_then(|s| s.exit_on_purchase)
            .unwrap_or_else(|| self.ends_on_purchase())
    }

    /// Template of step `step` (0 is the first).
    pub fn template_of(&self, step: usize) -> Option<&str> {
        if step == 0 {
            Some(&self.template)
        } else {
            self.steps.get(step - 1).map(|s| s.template.as_str())
        }
    }

    /// Parsed `local_time`, default 10:00.
    pub fn local_time_of_day(&self) -> Option<(u32, u32)> {
        match &self.local_time {
            None => Some((10, 0)),
            Some(t) => {
                let (h, m) = t.split_once(':')?;
                let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
                (h < 24 && m < 60).then_some((h, m))
            }
        }
    }
}

/// Segmentation rules.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentsConfig {
    pub rfm: RfmConfig,
    pub lifecycle: LifecycleConfig,
}

/// RFM scoring: each dimension scores 1-5 against four ascending boundaries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RfmConfig {
    /// Days since the last purchase: under [0] scores 5, under [1] 4, ... else 1.
    pub recency_days: [u32; 4],
    /// Orders: under [0] scores 1, under [1] 2, ... else 5.
    pub frequency_orders: [u32; 4],
    /// Revenue: under [0] scores 1, ... else 5.
    pub monetary: [f64; 4],
    /// Named cells, first match wins.
    pub cells: Vec<RfmCell>,
    /// Segment of buyers no cell matches.
    pub default_segment: String,
}

impl Default for RfmConfig {
    fn default() -> Self {
        let cell = |name: &str, r: [u8; 2], f: [u8; 2], m: [u8; 2]| RfmCell {
            name: name.into(),
            r,
            f,
            m,
        };
        RfmConfig {
            recency_days: [30, 90, 180, 365],
            frequency_orders: [2, 3, 5, 10],
            monetary: [100.0, 250.0, 500.0, 1000.0],
            cells: vec![
                cell("Champions", [4, 5], [4, 5], [4, 5]),
                cell("Loyal", [3, 5], [3, 5], [1, 5]),
                cell("Big Spenders", [2, 5], [1, 5], [5, 5]),
                cell("New", [5, 5], [1, 1], [1, 5]),
                cell("At Risk", [1, 2], [3, 5], [1, 5]),
                cell("Hibernating", [1, 2], [1, 2], [1, 5]),
            ],
            default_segment: "Others".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RfmCell {
    pub name: String,
    /// Inclusive score ranges.
    pub r: [u8; 2],
    pub f: [u8; 2],
    pub m: [u8; 2],
}

/// Lifecycle stages: prospect (never bought), new (one order, recent), regular,
/// dormant (no purchase for `active_days`), churned (none for `churn_days`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    pub new_days: u32,
    pub active_days: u32,
    pub churn_days: u32,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            new_days: 30,
            active_days: 90,
            churn_days: 365,
        }
    }
}

fn default_category() -> MessageCategory {
    MessageCategory::trigger
}
fn default_valid_for() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_priority() -> i32 {
    50
}
fn yes() -> bool {
    true
}

impl Config {
    /// Reads `path`, applies `KAIROS__*` environment overrides and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        let overrides = overrides_in(std::env::vars_os())?;
        Self::from_text(path, &text, &overrides)
    }

    /// Parses config text; `overrides` are `(KAIROS__A__B, value)` pairs.
    pub fn from_text(
        path: &Path,
        text: &str,
        overrides: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        // File errors first, so their line numbers are the file's own.
        let mut config: Config = toml::from_str(text).map_err(|e| located_error(path, text, &e))?;
        check_durations(text).map_err(|(line, column, message)| ConfigError::Invalid {
            file: path.to_path_buf(),
            line,
            column,
            message,
        })?;
        if !overrides.is_empty() {
            let mut doc: toml_edit::DocumentMut =
                text.parse().map_err(|e: toml_edit::TomlError| {
                    let (line, column) =
                        e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
                    ConfigError::Invalid {
                        file: path.to_path_buf(),
                        line,
                        column,
                        message: e.message().to_string(),
                    }
                })?;
            for (var, value) in overrides {
                apply_override(&mut doc, var, value)?;
            }
            let merged = doc.to_string();
            if let Err((_, _, message)) = check_durations(&merged) {
                let culprit = overrides
                    .iter()
                    .find(|(_, value)| too_long(value.trim_matches('"')));
                return Err(ConfigError::Env {
                    var: culprit_or_all(culprit, overrides),
                    message,
                });
            }
            let file_config = config;
            config = toml::from_str(&merged).map_err(|e| ConfigError::Env {
                var: culprit_or_all(breaks_alone(text, overrides), overrides),
                message: e.message().to_string(),
            })?;
            config.source_file = path.to_path_buf();
            if let Err(merged_error) = config.validate(&merged) {
                return Err(Self::blame(
                    path,
                    text,
                    file_config,
                    overrides,
                    merged_error,
                ));
            }
            return Ok(config);
        }
        config.source_file = path.to_path_buf();
        config.validate(text)?;
        Ok(config)
    }

    /// Who is to blame for a configuration the overrides made invalid: the file, with
    /// its line, if it is invalid on its own; else the override that makes it invalid
    /// on its own (a value set in the environment has no line in the file), or all of
    /// them.
    fn blame(
        path: &Path,
        text: &str,
        mut file_config: Config,
        overrides: &[(String, String)],
        merged_error: ConfigError,
    ) -> ConfigError {
        file_config.source_file = path.to_path_buf();
        if let Err(file_error) = file_config.validate(text) {
            return file_error;
        }
        let culprit = breaks_alone(text, overrides);
        let message = match merged_error {
            ConfigError::Invalid { message, .. } | ConfigError::Semantic { message, .. } => message,
            other => other.to_string(),
        };
        ConfigError::Env {
            var: culprit_or_all(culprit, overrides),
            message,
        }
    }

    /// `[profile] currency` and `exchange_rates`: ISO 4217 codes, and rates that are
    /// numbers above 0 (up to a million, so no converted amount overflows).
    fn validate_currencies(&self, text: &str) -> Result<(), ConfigError> {
        let is_code = |c: &str| c.len() == 3 && c.chars().all(|c| c.is_ascii_alphabetic());
        let p = &self.profile;
        let fail = |line, key: &str, message: String| Err(self.error_at(line, key, message));
        match &p.currency {
            Some(code) if !is_code(code) => {
                return fail(
                    table_key_line(text, "profile", "currency"),
                    "currency",
                    format!("profile.currency {code:?} is no ISO 4217 code such as \"EUR\""),
                )
            }
            None if !p.exchange_rates.is_empty() => {
                let first = p.exchange_rates.keys().next().map_or("", |c| c.as_str());
                return fail(
                    nested_key_line(text, "profile", "exchange_rates", first),
                    "exchange_rates",
                    "profile.exchange_rates convert into profile.currency, which is not set".into(),
                );
            }
            _ => {}
        }
        for (code, rate) in &p.exchange_rates {
            let line = nested_key_line(text, "profile", "exchange_rates", code);
            if !is_code(code)
                || p.currency
                    .as_ref()
                    .is_some_and(|c| c.eq_ignore_ascii_case(code))
            {
                return fail(
                    line,
                    code,
                    format!(
                        "profile.exchange_rates.{code}: not an ISO 4217 code other than \
                         profile.currency"
                    ),
                );
            }
            if !(*rate > 0.0 && *rate <= 1e6) {
                return fail(
                    line,
                    code,
                    format!(
                        "profile.exchange_rates.{code} = {rate}: a rate is above 0 and at \
                         most 1000000"
                    ),
                );
            }
        }
        Ok(())
    }

    /// `[kafka.client]`: none of the properties the runtime sets itself, no second
    /// broker address, and names and values librdkafka knows, checked here at their
    /// line rather than by every service's first client.
    fn validate_kafka_client(&self, text: &str) -> Result<(), ConfigError> {
        // A TOML key with dots is quoted.
        let line =
            |key: &str| find_key_line(text, &format!("\"{key}\"")).or(find_key_line(text, key));
        let client = &self.kafka.client;
        if let Some(key) =
            (client.keys()).find(|k| KAFKA_PROPERTIES_KAIROS_SETS.contains(&k.as_str()))
        {
            return Err(self.error_at(
                line(key),
                &format!("kafka.client.{key}"),
                "Kairos sets it itself, its exactly-once commit depends on it (offsets stored \
                 only with the state they produced, eager range assignment, idempotent \
                 producers, a key's partition found by librdkafka's default partitioner): \
                 remove it"
                    .into(),
            ));
        }
        if let Some(key) = ["bootstrap.servers", "metadata.broker.list"]
            .into_iter()
            .find(|k| client.contains_key(*k))
        {
            // `kairos up` checks kafka.bootstrap_servers before it clears state.dir.
            return Err(self.error_at(
                line(key),
                &format!("kafka.client.{key}"),
                "the brokers are kafka.bootstrap_servers (KAIROS__KAFKA__BOOTSTRAP_SERVERS): \
                 set them there"
                    .into(),
            ));
        }
        for (key, value) in client {
            let mut one = rdkafka::ClientConfig::new();
            one.set(key, value);
            if let Err(e) = one.create_native_config() {
                return Err(self.error_at(
                    line(key),
                    &format!("kafka.client.{key}"),
                    format!("librdkafka refuses it: {e}"),
                ));
            }
        }
        Ok(())
    }

    fn validate(&self, text: &str) -> Result<(), ConfigError> {
        let fail_at = |line, key: &str, message| self.error_at(line, key, message);
        let fail = |key: &str, message: String| fail_at(find_key_line(text, key), key, message);
        if self.kafka.partitions < 1 {
            return Err(fail("partitions", "must be at least 1".into()));
        }
        self.validate_kafka_client(text)?;
        self.validate_currencies(text)?;
        if let Some(url) = &self.schema_registry.url {
            // A URL reqwest cannot use fails every request, which reads as a registry
            // that is down: the first Avro record would stall its services for good.
            if let Err(message) = check_gateway_url(url) {
                return Err(fail_at(
                    table_key_line(text, "schema_registry", "url"),
                    "url",
                    format!("schema_registry.url: {message}"),
                ));
            }
        }
        // Two services of one file on one address: run on one host (`kairos up`
        // starts them all), the second cannot start. Other addresses, or other hosts
        // for services run apart, may share a port.
        let mut listens: Vec<(String, SocketAddr)> = vec![
            ("profile.admin_listen".into(), self.profile.admin_listen),
            ("identity.admin_listen".into(), self.identity.admin_listen),
            ("catalog.admin_listen".into(), self.catalog.admin_listen),
            ("arbiter.admin_listen".into(), self.arbiter.admin_listen),
            ("feedback.admin_listen".into(), self.feedback.admin_listen),
        ];
        for (channel, d) in &self.delivery {
            listens.push((format!("delivery.{channel}.admin_listen"), d.admin_listen));
        }
        for (i, (field, addr)) in listens.iter().enumerate() {
            let clash = |other: &SocketAddr| {
                other.port() == addr.port()
                    && (other.ip() == addr.ip()
                        || other.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            };
            let taken = (listens[..i].iter()).find(|(_, other)| addr.port() != 0 && clash(other));
            if let Some((first, _)) = taken {
                let (table, _) = field.rsplit_once('.').unwrap_or_default();
                return Err(fail_at(
                    table_key_line(text, table, "admin_listen"),
                    "admin_listen",
                    format!("{field} {addr} takes the port of {first}: each service needs its own"),
                ));
            }
        }
        if self.state.timers_in_memory < self.kafka.partitions as usize {
            return Err(fail(
                "timers_in_memory",
                format!(
                    "must be at least kafka.partitions ({}): each partition holds at least one",
                    self.kafka.partitions
                ),
            ));
        }
        if self.state.dedup_window < Duration::from_secs(24 * 3600) {
            return Err(fail("dedup_window", "must be at least 1 day".into()));
        }
        if let Some((i, s)) = (self.scenarios.iter().enumerate())
            .find(|(_, s)| s.valid_for >= self.state.dedup_window)
        {
            // At the window when the file sets it, else at the scenario's valid_for.
            let line = find_key_line(text, "dedup_window")
                .or_else(|| scenario_key_line(text, i, "valid_for"));
            return Err(fail_at(
                line,
                "dedup_window",
                format!(
                    "must be longer than every scenario's valid_for (scenario {:?} is valid for {})",
                    s.name,
                    humantime_serde::re::humantime::format_duration(s.valid_for)
                ),
            ));
        }
        if self.feedback.attribution_window.is_zero() {
            // No purchase is ever within a zero window of a message.
            return Err(fail(
                "attribution_window",
                "must be longer than 0 (no purchase would ever be attributed)".into(),
            ));
        }
        if self.feedback.attribution_delay > Duration::from_secs(24 * 3600) {
            // Every purchase waits that long in a timer, and metrics lag by as much.
            return Err(fail(
                "attribution_delay",
                "must be at most 1 day (it is how long every purchase waits)".into(),
            ));
        }
        if self.identity.forward_retention < Duration::from_secs(24 * 3600) {
            // A purchase waits up to `feedback.attribution_delay` (at most a day) before
            // it is attributed through the note: gone sooner, the conversion is lost.
            return Err(fail(
                "forward_retention",
                "identity.forward_retention: must be at least 1 day (merges in flight and \
                 purchases waiting feedback.attribution_delay are sent on through it)"
                    .into(),
            ));
        }
        if let Err(message) = check_log_level(&self.log.level) {
            return Err(fail_at(
                table_key_line(text, "log", "level"),
                "level",
                format!("log.level: {message}"),
            ));
        }
        // NaN passes every comparison but these: a generator on it panics or spins.
        let generator = |key: &str| table_key_line(text, "generator", key);
        if !(self.generator.rate.is_finite() && self.generator.rate > 0.0) {
            return Err(fail_at(
                generator("rate"),
                "rate",
                "must be a number of events per second above 0".into(),
            ));
        }
        if !(0.0..=0.95).contains(&self.generator.offline_share) {
            return Err(fail_at(
                generator("offline_share"),
                "offline_share",
                "must be a share from 0 to 0.95".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.generator.catalog_change_share) {
            return Err(fail_at(
                generator("catalog_change_share"),
                "catalog_change_share",
                "must be a share from 0 to 1".into(),
            ));
        }
        // Event-time bounds: 0 does not turn them off, it refuses every event later
        // than the partition's clock (or ahead of the machine's).
        let clock = |key: &str| table_key_line(text, "clock", key);
        for (key, bound) in [
            ("max_event_lead", self.clock.max_event_lead),
            ("max_event_gap", self.clock.max_event_gap),
        ] {
            if bound.is_zero() {
                return Err(fail_at(
                    clock(key),
                    &format!("clock.{key}"),
                    "must be longer than 0 (0 would dead-letter nearly every event)".into(),
                ));
            }
        }
        // Only event time reads the gap; the commands that run in event time whatever
        // the file says check it through `in_event_time`.
        if self.clock.mode == ClockMode::Event {
            self.check_event_gap(text)?;
        }
        // How often an idle service looks for due timers: 0 spins a core, and beyond
        // a minute timers fire that late.
        if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&self.state.timer_tick) {
            return Err(fail_at(
                table_key_line(text, "state", "timer_tick"),
                "state.timer_tick",
                format!(
                    "must be from 10ms to 1 minute, not {:?} (idle services look for due timers this often)",
                    self.state.timer_tick
                ),
            ));
        }
        if self.arbiter.control_group_percent > 100 {
            return Err(fail(
                "control_group_percent",
                "must be between 0 and 100".into(),
            ));
        }
        // The arbiter keeps a customer's sends for the rolling week's cap: a longer
        // window would be held as a week without a word.
        for (key, window) in [
            ("min_gap", self.arbiter.min_gap),
            ("conflict_window", self.arbiter.conflict_window),
        ] {
            if window > ARBITER_SENDS_KEPT {
                return Err(fail_at(
                    find_key_line(text, key),
                    &format!("arbiter.{key}"),
                    format!(
                        "must be at most 7 days (the arbiter keeps a week of each customer's sends), not {window:?}"
                    ),
                ));
            }
        }
        for (channel, d) in &self.delivery {
            let section = |field: &str| format!("delivery.{channel}.{field}");
            // The key's line in `[delivery.<channel>.<sub>]`, or where `<sub>` is
            // written inline in `[delivery.<channel>]`; `sub` empty for the latter.
            let own = format!("delivery.{channel}");
            let line = |sub: &str, key: &str| match sub {
                "" => table_key_line(text, &own, key),
                _ => nested_key_line(text, &own, sub, key),
            };
            let fail = |(sub, key): (&str, &str), message| fail_at(line(sub, key), key, message);
            match d.provider {
                ProviderKind::Smtp if d.smtp.is_none() => {
                    return Err(fail(
                        ("", "provider"),
                        format!(
                            "{}: provider \"smtp\" needs a [{}] section",
                            section("provider"),
                            section("smtp")
                        ),
                    ));
                }
                ProviderKind::Http if d.http.is_none() => {
                    return Err(fail(
                        ("", "provider"),
                        format!(
                            "{}: provider \"http\" needs a [{}] section",
                            section("provider"),
                            section("http")
                        ),
                    ));
                }
                _ => {}
            }
            // A provider's section the worker would not read: every send would go to
            // what `provider` names (the simulator by default) and count as delivered.
            // (Both real providers' sections may be kept, `provider` choosing one.)
            let unread = [("smtp", d.smtp.is_some()), ("http", d.http.is_some())];
            if let Some((sub, _)) = unread
                .into_iter()
                .find(|(_, written)| *written && !d.reaches_a_provider())
            {
                return Err(fail_at(
                    line(sub, ""),
                    &format!("[{}]", section(sub)),
                    format!(
                        "not read: provider is \"{}\"; set provider = \"{sub}\" or remove \
                         the section",
                        d.provider.as_str()
                    ),
                ));
            }
            if let Some(secret) = &d.inbox_secret {
                if d.provider != ProviderKind::InApp {
                    return Err(fail(
                        ("", "inbox_secret"),
                        format!(
                            "{}: not read: only the in_app provider keeps an inbox (provider is \"{}\")",
                            section("inbox_secret"),
                            d.provider.as_str()
                        ),
                    ));
                }
                if secret.chars().count() < MIN_INBOX_SECRET_CHARS {
                    return Err(fail(
                        ("", "inbox_secret"),
                        format!(
                            "{}: at least {MIN_INBOX_SECRET_CHARS} characters (a random string: \
                             it is all that keeps one customer from reading another's inbox)",
                            section("inbox_secret")
                        ),
                    ));
                }
            }
            let link_takes_token = d.list_unsubscribe().is_some_and(|l| l.contains("{token}"));
            let unsubscribe_problem = match (&d.unsubscribe_secret, link_takes_token) {
                (None, true) => Some(
                    "missing: list_unsubscribe uses {token}, which is made under this secret"
                        .to_string(),
                ),
                (Some(_), false) => Some(
                    "not used: the provider's list_unsubscribe has no {token} for the \
                     unsubscribe endpoint to check"
                        .to_string(),
                ),
                (Some(secret), true) if secret.chars().count() < MIN_INBOX_SECRET_CHARS => {
                    Some(format!(
                        "at least {MIN_INBOX_SECRET_CHARS} characters (a random string: it is \
                         all that keeps anyone from unsubscribing other customers)"
                    ))
                }
                _ => None,
            };
            if let Some(problem) = unsubscribe_problem {
                return Err(fail(
                    ("", "unsubscribe_secret"),
                    format!("{}: {problem}", section("unsubscribe_secret")),
                ));
            }
            if d.open_inbox && d.provider != ProviderKind::InApp {
                return Err(fail(
                    ("", "open_inbox"),
                    format!(
                        "{}: not read: only the in_app provider keeps an inbox (provider is \"{}\")",
                        section("open_inbox"),
                        d.provider.as_str()
                    ),
                ));
            }
            // What the admin port serves without its secret, to whoever reaches it: taken
            // on loopback, or when the operator says the network is trusted.
            let open_to_others = [
                (
                    d.provider == ProviderKind::InApp && d.inbox_secret.is_none() && !d.open_inbox,
                    "inbox_secret",
                    "read and mark seen any customer's in-app messages",
                    "polls then carry the customer's token",
                    "open_inbox = true for a backend on a trusted network",
                ),
                (
                    d.webhook_token.is_none() && !d.open_webhook,
                    "webhook_token",
                    "post forged outcomes (hard bounces, unsubscribes and complaints \
                     suppress a customer for good)",
                    "providers send it as a bearer token",
                    "open_webhook = true for providers on a trusted network",
                ),
            ];
            let reachable = !d.admin_listen.ip().is_loopback();
            for (open, secret, harm, with_it, trusted) in open_to_others {
                if open && reachable {
                    return Err(fail(
                        ("", "admin_listen"),
                        format!(
                            "{}: {} is reachable from other machines and no {secret} is \
                             set, so anyone reaching it could {harm}; set {secret} \
                             ({with_it}), or {trusted}",
                            section("admin_listen"),
                            d.admin_listen
                        ),
                    ));
                }
            }
            let simulator = &d.simulator;
            let rates = [
                ("delivery_rate", simulator.delivery_rate),
                ("hard_bounce_rate", simulator.hard_bounce_rate),
                ("open_rate", simulator.open_rate),
                ("click_to_open_rate", simulator.click_to_open_rate),
                ("unsubscribe_rate", simulator.unsubscribe_rate),
                ("complaint_rate", simulator.complaint_rate),
            ];
            if let Some((key, _)) = rates.iter().find(|(_, r)| !(0.0..=1.0).contains(r)) {
                return Err(fail(
                    ("simulator", key),
                    format!(
                        "{}: a fraction from 0 to 1 (0.2 for 20%)",
                        section(&format!("simulator.{key}"))
                    ),
                ));
            }
            if simulator.engagement_delay_min > simulator.engagement_delay_max {
                return Err(fail(
                    ("simulator", "engagement_delay_max"),
                    format!(
                        "{}: shorter than engagement_delay_min",
                        section("simulator.engagement_delay_max")
                    ),
                ));
            }
            // Every call would time out, be retried and end in the dead-letter topic.
            let timeouts = [
                ("smtp", d.smtp.as_ref().map(|s| s.timeout)),
                ("http", d.http.as_ref().map(|h| h.timeout)),
            ];
            for (sub, timeout) in timeouts {
                if timeout.is_some_and(|t| t.is_zero()) {
                    return Err(fail(
                        (sub, "timeout"),
                        format!(
                            "{}: must be longer than 0",
                            section(&format!("{sub}.timeout"))
                        ),
                    ));
                }
            }
            if let Some(http) = d.http.as_ref().filter(|_| d.provider == ProviderKind::Http) {
                if let Err(message) = check_gateway_url(&http.url) {
                    return Err(fail(
                        ("http", "url"),
                        format!("{}: {message}", section("http.url")),
                    ));
                }
                fn is_name(v: &str) -> bool {
                    reqwest::header::HeaderName::try_from(v).is_ok()
                }
                fn is_value(v: &str) -> bool {
                    reqwest::header::HeaderValue::try_from(v).is_ok()
                }
                let name = (is_name as fn(&str) -> bool, "name");
                let headers = [
                    ("auth_header", http.auth_header.as_deref(), name),
                    (
                        "auth_value",
                        http.auth_value.as_deref(),
                        (is_value, "value"),
                    ),
                    ("idempotency_header", Some(&*http.idempotency_header), name),
                ];
                for (key, value, (valid, what)) in headers {
                    if !value.is_none_or(valid) {
                        let field = section(&format!("http.{key}"));
                        return Err(fail(
                            ("http", key),
                            format!("{field}: not a valid HTTP header {what}"),
                        ));
                    }
                }
                if let Some(file) = &http.ca_file {
                    if let Err(message) = read_certificates(&self.beside_file(file)) {
                        return Err(fail(
                            ("http", "ca_file"),
                            format!("{}: {message}", section("http.ca_file")),
                        ));
                    }
                }
            }
            if let Some(smtp) = d.smtp.as_ref().filter(|_| d.provider == ProviderKind::Smtp) {
                let credentials = smtp.username.is_some() || smtp.password.is_some();
                if credentials && smtp.security == SmtpSecurity::None && !is_loopback(&smtp.host) {
                    return Err(fail(
                        ("smtp", "security"),
                        format!(
                            "{}: a username and password would cross the network in clear to {}: set security = \"starttls\" or \"tls\"",
                            section("smtp.security"),
                            smtp.host
                        ),
                    ));
                }
            }
            if d.retry.max_attempts == 0 {
                return Err(fail(
                    ("retry", "max_attempts"),
                    format!("{}: must be at least 1", section("retry.max_attempts")),
                ));
            }
            // Below a second, a greylisting server would be asked again at once.
            if d.retry.deferral_backoff < Duration::from_secs(1) {
                return Err(fail(
                    ("retry", "deferral_backoff"),
                    format!("{}: must be at least 1s", section("retry.deferral_backoff")),
                ));
            }
            if d.retry.deferral_max_backoff < d.retry.deferral_backoff {
                return Err(fail(
                    ("retry", "deferral_max_backoff"),
                    format!(
                        "{}: must be at least deferral_backoff ({:?})",
                        section("retry.deferral_max_backoff"),
                        d.retry.deferral_backoff
                    ),
                ));
            }
            if d.rate_limit.per_second == 0 || d.rate_limit.burst == 0 {
                let key = if d.rate_limit.burst == 0 {
                    "burst"
                } else {
                    "per_second"
                };
                return Err(fail(
                    ("rate_limit", key),
                    format!(
                        "{}: per_second and burst must be at least 1",
                        section("rate_limit")
                    ),
                ));
            }
            if d.circuit_breaker.failure_threshold == 0 {
                return Err(fail(
                    ("circuit_breaker", "failure_threshold"),
                    format!(
                        "{}: must be at least 1",
                        section("circuit_breaker.failure_threshold")
                    ),
                ));
            }
        }
        if let Err(message) = crate::identifiers::parse_country(&self.identity.default_country) {
            return Err(fail(
                "default_country",
                format!("identity.default_country: {message}"),
            ));
        }
        if self.profile.audience_per_commit == 0 {
            return Err(fail(
                "audience_per_commit",
                "profile.audience_per_commit: must be at least 1".into(),
            ));
        }
        if self.identity.max_customers_per_identifier == 0 {
            return Err(fail(
                "max_customers_per_identifier",
                "identity.max_customers_per_identifier: must be at least 1".into(),
            ));
        }
        if self.identity.max_identifiers_per_customer == 0 {
            return Err(fail(
                "max_identifiers_per_customer",
                "identity.max_identifiers_per_customer: must be at least 1".into(),
            ));
        }
        if self
            .identity
            .merge_on
            .contains(&crate::identifiers::IdentifierKind::customer_id)
        {
            return Err(fail(
                "merge_on",
                "identity.merge_on: customer_id names a customer, it cannot merge two".into(),
            ));
        }
        let a = &self.arbiter;
        // At the key written: the one alone, or the one that is no time of day.
        let hh_mm = |v: &Option<String>| {
            v.as_deref()
                .is_some_and(|v| chrono::NaiveTime::parse_from_str(v, "%H:%M").is_ok())
        };
        let quiet_fault = match (&a.quiet_hours_start, &a.quiet_hours_end) {
            (Some(_), None) => Some("quiet_hours_start"),
            (None, Some(_)) => Some("quiet_hours_end"),
            (start, _) if start.is_some() && !hh_mm(start) => Some("quiet_hours_start"),
            (_, end) if end.is_some() && !hh_mm(end) => Some("quiet_hours_end"),
            _ => None,
        };
        if let Some(key) = quiet_fault {
            return Err(fail_at(
                table_key_line(text, "arbiter", key),
                key,
                "arbiter.quiet_hours_start and quiet_hours_end: both or neither, as \"HH:MM\""
                    .into(),
            ));
        }
        for (field, cap) in [("daily_cap", a.daily_cap), ("weekly_cap", a.weekly_cap)] {
            if cap == 0 {
                // Every marketing message would wait until it expired: a silent way of
                // sending none, which disabling the scenarios says plainly. (The
                // arbiter's own key, not a channel's or category's cap of that name.)
                return Err(fail_at(
                    table_key_line(text, "arbiter", field),
                    field,
                    format!(
                        "arbiter.{field} = 0 would hold every marketing message until it \
                         expires; disable the scenarios (enabled = false) to send none"
                    ),
                ));
            }
        }
        let zero_caps = (a.channel_caps.iter())
            .map(|(channel, cap)| (format!("channel_caps.{channel}"), cap))
            .chain(
                (a.category_caps.iter())
                    .map(|(category, cap)| (format!("category_caps.{}", category.as_str()), cap)),
            );
        for (table, cap) in zero_caps {
            if let Some(field) = cap.zero_field() {
                let line = nested_key_line(text, "arbiter", &table, field);
                return Err(fail_at(
                    line,
                    field,
                    format!(
                        "arbiter.{table}.{field} = 0 would hold every such message until it \
                         expires; leave the channel out of the scenarios' channels, or \
                         disable them, to send none"
                    ),
                ));
            }
        }
        if a.quiet_hours().is_some_and(|(start, end)| start == end) {
            // An empty window would be read as no quiet hours at all; a whole day of
            // them would send no marketing message ever. Neither is what was meant.
            return Err(fail(
                "quiet_hours_end",
                "arbiter.quiet_hours_start and quiet_hours_end are the same time: the \
                 quiet window would be empty (leave both out for no quiet hours)"
                    .into(),
            ));
        }
        if a.default_time_zone.parse::<chrono_tz::Tz>().is_err() {
            return Err(fail(
                "default_time_zone",
                format!(
                    "arbiter.default_time_zone {:?} is not an IANA time zone",
                    a.default_time_zone
                ),
            ));
        }
        let rfm = &self.segments.rfm;
        for (i, cell) in rfm.cells.iter().enumerate() {
            for (dim, [low, high]) in [("r", cell.r), ("f", cell.f), ("m", cell.m)] {
                if !(1 <= low && low <= high && high <= 5) {
                    return Err(fail_at(
                        cell_key_line(text, &cell.name, dim),
                        dim,
                        format!(
                            "segments.rfm.cells[{i}] ({}).{dim} = {low}..{high}: scores run \
                             from 1 to 5, low first",
                            cell.name
                        ),
                    ));
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.scenarios.iter().enumerate() {
            // The scenario's own line of `key`, else its header (a key it leaves out
            // must not point at another scenario's), else the first in the file.
            let line_of = |key: &str| {
                scenario_key_line(text, i, key)
                    .or_else(|| scenario_header_line(text, i))
                    .or_else(|| find_key_line(text, key))
            };
            let fail_here = |key: &str, message| fail_at(line_of(key), key, message);
            if let Some(segment) = s
                .segment
                .as_deref()
                .filter(|_| s.kind == ScenarioKind::SegmentEntered)
            {
                let known = rfm
                    .cells
                    .iter()
                    .map(|c| c.name.as_str())
                    .chain([rfm.default_segment.as_str(), NO_RFM_SEGMENT])
                    .chain(LIFECYCLE_STAGES);
                if !known.clone().any(|k| k == segment) {
                    return Err(fail_at(
                        line_of("segment"),
                        "segment",
                        format!(
                            "scenarios[{i}] ({}): {segment:?} is no RFM cell, RFM default \
                             segment or lifecycle stage (known: {})",
                            s.name,
                            known.collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
            }
            // Every trigger would be too late or out of date the moment it fired: a
            // silent way of sending nothing.
            for (field, zero) in [
                ("valid_for", s.valid_for.is_zero()),
                ("tolerance", s.tolerance.is_some_and(|t| t.is_zero())),
            ] {
                if zero {
                    return Err(fail_here(
                        field,
                        format!(
                            "scenarios[{i}] ({}): {field} must be longer than 0 (no trigger \
                             would ever go out)",
                            s.name
                        ),
                    ));
                }
            }
            if s.kind.fires_at_once() {
                let told = |field: &str| {
                    format!(
                        "scenarios[{i}] ({}): {} is told when it happens and takes no {field}",
                        s.name,
                        s.kind.as_str()
                    )
                };
                if !s.delay.is_zero() {
                    return Err(fail_at(line_of("delay"), "delay", told("delay")));
                }
                if !s.steps.is_empty() {
                    return Err(fail_at(line_of("steps"), "steps", told("steps")));
                }
            }
            // A key the kind never reads would be silently ignored: a marketer who
            // writes `delay = "3d"` on a birthday expects a greeting three days early.
            let yearly = matches!(
                s.kind,
                ScenarioKind::Birthday | ScenarioKind::RegistrationAnniversary
            );
            let unread = [
                (
                    "delay",
                    yearly && !s.delay.is_zero(),
                    ": it greets on the day, at `local_time` (a later step takes its own `delay`)",
                ),
                (
                    "local_time",
                    !yearly && s.local_time.is_some(),
                    ", which is for birthday and registration_anniversary scenarios only",
                ),
                (
                    "segment",
                    s.kind != ScenarioKind::SegmentEntered && s.segment.is_some(),
                    ", which is for segment_entered scenarios only",
                ),
                (
                    "statuses",
                    s.kind != ScenarioKind::OrderUpdate && !s.statuses.is_empty(),
                    ", which is for order_update scenarios only",
                ),
                (
                    "min_drop_percent",
                    s.kind != ScenarioKind::PriceDrop && s.min_drop_percent.is_some(),
                    ", which is for price_drop scenarios only",
                ),
            ];
            if let Some((key, _, reads)) = unread.iter().find(|(_, set, _)| *set) {
                return Err(fail_at(
                    line_of(key),
                    key,
                    format!(
                        "scenarios[{i}] ({}): a {} scenario does not read `{key}`{reads}",
                        s.name,
                        s.kind.as_str()
                    ),
                ));
            }
            // A cart, browse or reactivation wait ends on a purchase by its own rules
            // (the cart checked out, the absence over): a step's setting would be
            // silently ignored.
            let own_rules = s.kind.is_restartable_wait() || s.kind == ScenarioKind::Reactivation;
            if own_rules && s.steps.iter().any(|step| step.exit_on_purchase.is_some()) {
                return Err(fail_at(
                    line_of("steps"),
                    "steps",
                    format!(
                        "scenarios[{i}] ({}): a step's exit_on_purchase is not read for a {} \
                         scenario, which a purchase ends by its own rules; set the \
                         scenario's exit_on_purchase instead",
                        s.name,
                        s.kind.as_str()
                    ),
                ));
            }
            if !s.on.is_empty() && s.kind != ScenarioKind::Welcome {
                return Err(fail_at(
                    line_of("on"),
                    "on",
                    format!(
                        "scenarios[{i}] ({}): `on` names what starts a welcome series; \
                         {} scenarios take none",
                        s.name,
                        s.kind.as_str()
                    ),
                ));
            }
            if !names.insert(s.name.as_str()) {
                return Err(fail_here(
                    "name",
                    format!("scenarios[{i}]: duplicate scenario name {:?}", s.name),
                ));
            }
            if s.channels.is_empty() {
                return Err(fail_here(
                    "channels",
                    format!(
                        "scenarios[{i}] ({}): at least one channel is needed",
                        s.name
                    ),
                ));
            }
            if matches!(
                s.kind,
                ScenarioKind::Birthday | ScenarioKind::RegistrationAnniversary
            ) && s.local_time_of_day().is_none()
            {
                return Err(fail_here(
                    "local_time",
                    format!("scenarios[{i}] ({}): expected \"HH:MM\"", s.name),
                ));
            }
            if s.kind == ScenarioKind::SegmentEntered && s.segment.is_none() {
                return Err(fail_here(
                    "kind",
                    format!(
                        "scenarios[{i}] ({}): segment_entered needs `segment`",
                        s.name
                    ),
                ));
            }
            if s.mass && s.category == MessageCategory::transactional {
                return Err(fail_here(
                    "mass",
                    format!(
                        "scenarios[{i}] ({}): a mass send is marketing, not transactional",
                        s.name
                    ),
                ));
            }
            // Promo timings the arbiter's promo rules would suppress every time: a
            // scenario that silently sends nothing.
            let (pause, sunset) = (
                self.arbiter.pause_after_purchase,
                self.arbiter.sunset_inactive_after,
            );
            // The last message of a follow-up (its last step): a chain goes on past a
            // suppressed step.
            let last_message = s.delay + s.steps.iter().map(|step| step.delay).sum::<Duration>();
            let always_suppressed = match s.kind {
                _ if s.category != MessageCategory::promo => None,
                ScenarioKind::PostPurchase if last_message < pause => Some(format!(
                    "messages, the last {last_message:?} after the purchase, fall within \
                     arbiter.pause_after_purchase ({pause:?})"
                )),
                // The sunset takes a customer inactive for longer than it.
                ScenarioKind::Reactivation if !sunset.is_zero() && s.delay > sunset => {
                    Some(format!(
                        "message, {:?} without a visit, comes past \
                         arbiter.sunset_inactive_after ({sunset:?})",
                        s.delay
                    ))
                }
                _ => None,
            };
            if let Some(why) = always_suppressed {
                return Err(fail_here(
                    "delay",
                    format!(
                        "scenarios[{i}] ({}): a promo whose {why}: the arbiter would \
                         suppress every one; change the delay or the category",
                        s.name
                    ),
                ));
            }
            // Shorter, the next channel goes out before anyone could have reacted:
            // the same message on two channels at once.
            if let Some((j, wait)) = s
                .cascade
                .iter()
                .enumerate()
                .find(|(_, w)| ***w < MIN_CASCADE_WAIT)
            {
                return Err(fail_at(
                    line_of("cascade"),
                    "cascade",
                    format!(
                        "scenarios[{i}] ({}): cascade[{j}] = {:?} is below the 1 minute a \
                         customer needs to react before the next channel",
                        s.name,
                        humantime_serde::re::humantime::format_duration(**wait).to_string()
                    ),
                ));
            }
            // The arbiter sends a step only up to the trigger's valid-until: one due
            // later than `valid_for` after the first message could never go out.
            let mut due = Duration::ZERO;
            for (j, wait) in s.cascade.iter().enumerate() {
                due += **wait;
                if due > s.valid_for {
                    return Err(fail_at(
                        line_of("cascade"),
                        "cascade",
                        format!(
                            "scenarios[{i}] ({}): cascade[{j}] would go out {} after the \
                             first message, not within valid_for ({}): it never could",
                            s.name,
                            humantime_serde::re::humantime::format_duration(due),
                            humantime_serde::re::humantime::format_duration(s.valid_for)
                        ),
                    ));
                }
            }
            if s.holdout_percent > 100 {
                return Err(fail_here(
                    "holdout_percent",
                    format!("scenarios[{i}] ({}): must be between 0 and 100", s.name),
                ));
            }
            // Transactional messages pass caps and holdouts: set, they would be ignored.
            if s.category == MessageCategory::transactional {
                let ignored = [
                    ("holdout_percent", s.holdout_percent > 0),
                    ("caps", s.caps.is_some()),
                ];
                if let Some((key, _)) = ignored.into_iter().find(|(_, set)| *set) {
                    return Err(fail_here(
                        key,
                        format!(
                            "scenarios[{i}] ({}): a transactional message is never capped \
                             or held out, so {key} would be ignored",
                            s.name
                        ),
                    ));
                }
            }
            if s.template.trim().is_empty() {
                return Err(fail_here(
                    "template",
                    format!("scenarios[{i}] ({}): template must not be empty", s.name),
                ));
            }
            if let Some(drop) = s.min_drop_percent.filter(|d| !(*d > 0.0 && *d <= 100.0)) {
                // Past 100 (or NaN) no drop ever qualifies; at 0 or below every
                // change of price would.
                return Err(fail_here(
                    "min_drop_percent",
                    format!(
                        "scenarios[{i}] ({}): {drop} must be above 0 and at most 100",
                        s.name
                    ),
                ));
            }
            if let Some(field) = s.caps.as_ref().and_then(CapConfig::zero_field) {
                return Err(fail_at(
                    scenario_key_line(text, i, field).or_else(|| line_of("caps")),
                    field,
                    format!(
                        "scenarios[{i}] ({}): caps.{field} = 0 would hold every message of \
                         the scenario until it expires; disable it (enabled = false) instead",
                        s.name
                    ),
                ));
            }
        }
        let r = &self.segments.rfm;
        let ascending = |v: &[f64]| v.windows(2).all(|w| w[0] < w[1]);
        let boundaries = [
            ("recency_days", r.recency_days.map(f64::from).to_vec()),
            (
                "frequency_orders",
                r.frequency_orders.map(f64::from).to_vec(),
            ),
            ("monetary", r.monetary.to_vec()),
        ];
        if let Some((key, _)) = boundaries.iter().find(|(_, v)| !ascending(v)) {
            return Err(fail(
                key,
                format!("segments.rfm.{key}: RFM boundaries must be strictly ascending"),
            ));
        }
        let l = &self.segments.lifecycle;
        if !(l.new_days <= l.active_days && l.active_days < l.churn_days) {
            // The first of the pair out of order that the file writes.
            let pair = if l.new_days > l.active_days {
                ["new_days", "active_days"]
            } else {
                ["active_days", "churn_days"]
            };
            let lifecycle = "segments.lifecycle";
            let key = pair
                .into_iter()
                .find(|k| assigned_in(text, lifecycle, k).is_some())
                .unwrap_or(pair[0]);
            return Err(fail_at(
                table_key_line(text, lifecycle, key),
                key,
                "lifecycle needs new_days <= active_days < churn_days".into(),
            ));
        }
        Ok(())
    }

    /// Every enabled scenario's channels have a `[delivery.<channel>]` section: a send
    /// command for a channel without one goes to a topic no worker reads, and the
    /// message would be lost without a trace. Checked where sends are published (the
    /// arbiter service, `kairos up`) and by `check-config`, not on every load: a
    /// replay that backtests scenarios needs no delivery workers.
    pub fn check_deliverable(&self) -> Result<(), ConfigError> {
        let Some((i, s, channel)) = self.scenarios.iter().enumerate().find_map(|(i, s)| {
            let missing = s.channels.iter().find(|c| !self.delivery.contains_key(c))?;
            s.enabled.then_some((i, s, *missing))
        }) else {
            return Ok(());
        };
        let message = format!(
            "scenarios[{i}] ({}) sends on {channel}, but there is no \
             [delivery.{channel}] section: its messages would go to a topic no delivery \
             worker reads (add the section, or take {channel} off the scenario)",
            s.name
        );
        let text = std::fs::read_to_string(&self.source_file).unwrap_or_default();
        Err(self.error_at(scenario_key_line(&text, i, "channels"), "channels", message))
    }

    /// The enabled marketing (non-transactional) scenarios that send e-mail through a
    /// real provider with no opt-out link configured (`smtp.list_unsubscribe` or
    /// `http.list_unsubscribe` of `[delivery.email]`): such mail breaks the bulk
    /// senders' rules (RFC 8058 one-click unsubscribe, CAN-SPAM).
    pub fn marketing_email_without_opt_out(&self) -> Vec<&str> {
        let email = self.delivery.get(&Channel::email);
        // Over https only: the one-click unsubscribe (RFC 8058) that Gmail and Yahoo ask
        // of bulk senders is a POST to an https URL; a mailto or http link gives none.
        let one_click = |e: &DeliveryChannelConfig| {
            e.list_unsubscribe()
                .is_some_and(|l| l.trim().starts_with("https://"))
        };
        if email.is_none_or(|e| !e.reaches_a_provider() || one_click(e)) {
            return Vec::new();
        }
        self.scenarios
            .iter()
            .filter(|s| s.enabled && s.category != MessageCategory::transactional)
            .filter(|s| s.channels.contains(&Channel::email))
            .map(|s| s.name.as_str())
            .collect()
    }

    /// [`Self::marketing_email_without_opt_out`] as an error (for `check-config`).
    pub fn check_opt_out(&self) -> Result<(), ConfigError> {
        let scenarios = self.marketing_email_without_opt_out();
        if scenarios.is_empty() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&self.source_file).unwrap_or_default();
        let message = format!(
            "marketing e-mail ({}) would go out without a one-click opt-out link: set \
             list_unsubscribe of the e-mail provider to an https:// URL",
            scenarios.join(", ")
        );
        let section = text
            .lines()
            .position(|l| is_header(l, "[delivery.email]"))
            .map(|i| i + 1);
        Err(self.error_at(section, "delivery.email", message))
    }

    /// This configuration with the clock in event time, as `kairos replay` and the
    /// benchmarks run it whatever `clock.mode` says: its gap must then hold as if the
    /// file had asked for event time.
    pub fn in_event_time(&self) -> Result<Config, ConfigError> {
        let mut config = self.clone();
        config.clock.mode = ClockMode::Event;
        // The line is looked up in the file as it is now; without it the error still
        // names the file and the field.
        let text = std::fs::read_to_string(&config.source_file).unwrap_or_default();
        config.check_event_gap(&text)?;
        Ok(config)
    }

    /// In event time a gap shorter than the lead would refuse input a device's clock
    /// may send, once replayed from a backlog.
    fn check_event_gap(&self, text: &str) -> Result<(), ConfigError> {
        if self.clock.max_event_gap >= self.clock.max_event_lead {
            return Ok(());
        }
        Err(self.error_at(
            table_key_line(text, "clock", "max_event_gap"),
            "clock.max_event_gap",
            format!(
                "must be at least clock.max_event_lead ({}) in event time (replays and benchmarks run in it): input replayed from a backlog runs ahead of the clock by more than a device does",
                humantime_serde::re::humantime::format_duration(self.clock.max_event_lead),
            ),
        ))
    }

    /// An error about `key` of this file, at `line` when it is known.
    fn error_at(&self, line: Option<usize>, key: &str, message: String) -> ConfigError {
        let message = format!("{key}: {message}");
        match line {
            Some(line) => ConfigError::Invalid {
                file: self.source_file.clone(),
                line,
                column: 1,
                message,
            },
            None => ConfigError::Semantic {
                file: self.source_file.clone(),
                message,
            },
        }
    }

    /// The templates directory, resolved against the configuration file's directory.
    pub fn templates_dir(&self) -> PathBuf {
        self.beside_file(&self.templates.dir)
    }

    /// A path the configuration gives: a relative one is read next to the
    /// configuration file, whatever directory the process runs in.
    pub fn beside_file(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            return path.to_path_buf();
        }
        self.source_file
            .parent()
            .unwrap_or(Path::new("."))
            .join(path)
    }

    /// The full name of a topic, e.g. `topic("events.site")`.
    pub fn topic(&self, suffix: &str) -> String {
        format!("{}{}", self.kafka.topic_prefix, suffix)
    }

    /// Timers each partition's store holds in memory: its share of
    /// `state.timers_in_memory`.
    pub fn timers_in_memory_per_store(&self) -> usize {
        self.state
            .timers_in_memory
            .div_ceil(self.kafka.partitions.max(1) as usize)
    }

    /// The changelog topic of a processor's state.
    pub fn changelog_topic(&self, service: &str) -> String {
        self.topic(&format!("{service}-changelog"))
    }

    /// Names of every stateful processor (their changelog topics exist up front).
    pub fn processor_names() -> Vec<String> {
        let mut names: Vec<String> = ["identity", "profile", "catalog", "arbiter", "feedback"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        names.extend(Channel::ALL.iter().map(|c| format!("deliver-{c}")));
        names
    }

    pub fn send_topic(&self, channel: Channel) -> String {
        self.topic(&format!("send.{}", channel.as_str()))
    }

    /// Every topic Kairos uses, with its partition count.
    pub fn all_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = [
            topics::SITE_EVENTS,
            topics::APP_EVENTS,
            topics::OFFLINE_EVENTS,
            topics::CATALOG,
            topics::SEGMENT_TRANSITIONS,
            topics::TRIGGERS,
            topics::DECISIONS,
            topics::OUTCOMES,
            topics::DEAD_LETTER,
            topics::PRODUCT_INTEREST,
            topics::PRODUCT_OCCASIONS,
            topics::CUSTOMER_ACTIONS,
            topics::IDENTIFIED_EVENTS,
            topics::IDENTITY_CHANGES,
        ]
        .iter()
        .map(|t| self.topic(t))
        .collect();
        topics.extend(Channel::ALL.iter().map(|c| self.send_topic(*c)));
        topics.extend(
            Self::processor_names()
                .iter()
                .map(|n| self.changelog_topic(n)),
        );
        topics
    }

    pub fn scenario(&self, name: &str) -> Option<&ScenarioConfig> {
        self.scenarios.iter().find(|s| s.name == name)
    }
}

/// Topic name suffixes (the prefix comes from `[kafka] topic_prefix`).
pub mod topics {
    pub const SITE_EVENTS: &str = "events.site";
    pub const APP_EVENTS: &str = "events.app";
    pub const OFFLINE_EVENTS: &str = "events.offline";
    pub const CATALOG: &str = "catalog";
    pub const SEGMENT_TRANSITIONS: &str = "segment-transitions";
    pub const TRIGGERS: &str = "triggers";
    pub const DECISIONS: &str = "decisions";
    pub const OUTCOMES: &str = "outcomes";
    pub const DEAD_LETTER: &str = "deadletter";
    /// Internal: customer interest in products, keyed by product id.
    pub const PRODUCT_INTEREST: &str = "product-interest";
    /// Internal: product occasions (price drop, back in stock) keyed by customer id.
    pub const PRODUCT_OCCASIONS: &str = "product-occasions";
    /// Internal: purchases and other key actions, keyed by customer id, for the arbiter.
    pub const CUSTOMER_ACTIONS: &str = "customer-actions";
    /// Internal: site, app and offline events resolved to one customer by the identity
    /// processor (keyed by that customer's id), and merges; read by the profile.
    pub const IDENTIFIED_EVENTS: &str = "identified-events";
    /// Merges and shared identifiers found by the identity processor.
    pub const IDENTITY_CHANGES: &str = "identity-changes";
}

/// The `KAIROS__` variables of an environment. Others are not read, so one that is
/// not UTF-8 (a locale's, a tool's) does not matter; one of ours that is not is named.
fn overrides_in(
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut overrides = Vec::new();
    for (key, value) in vars {
        let Some(key) = key.to_str().filter(|k| k.starts_with(ENV_PREFIX)) else {
            continue;
        };
        let value = value.into_string().map_err(|_| ConfigError::Env {
            var: key.to_string(),
            message: "the value is not UTF-8".into(),
        })?;
        overrides.push((key.to_string(), value));
    }
    Ok(overrides)
}

/// Settings whose values are text, wherever they are: an environment override of one
/// is taken as written, not read as TOML.
const TEXT_KEYS: &[&str] = &[
    "auth_header",
    "auth_value",
    "bootstrap_servers",
    "control_group_salt",
    "currency",
    "default_country",
    "default_segment",
    "default_time_zone",
    "from",
    "group_prefix",
    "host",
    "idempotency_header",
    "list_unsubscribe",
    "local_time",
    "password",
    "quiet_hours_end",
    "quiet_hours_start",
    "reply_to",
    "template",
    "topic_prefix",
    "url",
    "username",
    "webhook_token",
    "inbox_secret",
    "unsubscribe_secret",
];

fn apply_override(
    doc: &mut toml_edit::DocumentMut,
    var: &str,
    value: &str,
) -> Result<(), ConfigError> {
    let path: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(|s| s.to_ascii_lowercase())
        .collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::Env {
            var: var.into(),
            message: "empty key segment".into(),
        });
    }
    // A value that parses as TOML (number, bool, array) keeps its type; anything else
    // is a string. librdkafka properties and the settings that are text are always
    // taken as written: a salt `2024`, a password `12345678` or `true`, a secret
    // that comes with quotes of its own.
    let raw_string = (path.len() == 3 && path[0] == "kafka" && path[1] == "client")
        || path
            .last()
            .is_some_and(|key| TEXT_KEYS.contains(&key.as_str()));
    let parsed: toml_edit::Value = if raw_string {
        toml_edit::Value::from(value)
    } else {
        value
            .parse()
            .unwrap_or_else(|_| toml_edit::Value::from(value))
    };
    let fail = |message: String| ConfigError::Env {
        var: var.into(),
        message,
    };
    // Walks tables, inline tables (`caps = { sms = { ... } }`) and lists of tables
    // (`[[scenarios]]`, whose next part is the index: `SCENARIOS__0__ENABLED`).
    let mut table: &mut dyn toml_edit::TableLike = doc.as_table_mut();
    let (last, parents) = path.split_last().ok_or_else(|| fail("no key".into()))?;
    let mut segments = parents.iter();
    while let Some(segment) = segments.next() {
        if table.get(segment).is_none() {
            // In an inline table, the new table is written inline.
            table.insert(segment, toml_edit::Item::Table(toml_edit::Table::new()));
        }
        let item = table
            .get_mut(segment)
            .ok_or_else(|| fail(format!("{segment} could not be made a table")))?;
        let list_len = match &*item {
            toml_edit::Item::ArrayOfTables(list) => Some(list.len()),
            toml_edit::Item::Value(toml_edit::Value::Array(list)) => Some(list.len()),
            _ => None,
        };
        if let Some(len) = list_len {
            let index = segments.next().and_then(|i| i.parse::<usize>().ok());
            let Some(index) = index.filter(|i| *i < len) else {
                return Err(fail(format!(
                    "{segment} is a list of {len}: the next part must be an index from 0 to {}",
                    len.saturating_sub(1)
                )));
            };
            table = match item {
                toml_edit::Item::ArrayOfTables(list) => list
                    .get_mut(index)
                    .map(|t| t as &mut dyn toml_edit::TableLike),
                toml_edit::Item::Value(toml_edit::Value::Array(list)) => list
                    .get_mut(index)
                    .and_then(|v| v.as_inline_table_mut())
                    .map(|t| t as &mut dyn toml_edit::TableLike),
                _ => None,
            }
            .ok_or_else(|| fail(format!("{segment}[{index}] is not a table")))?;
            continue;
        }
        table = item
            .as_table_like_mut()
            .ok_or_else(|| fail(format!("{segment} is not a table")))?;
    }
    table.insert(last, toml_edit::Item::Value(parsed));
    Ok(())
}

fn located_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
    ConfigError::Invalid {
        file: path.to_path_buf(),
        line,
        column,
        message: e.message().to_string(),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, column)
}

/// The longest duration any setting may take. Longer ones are typos ("100000d"), and
/// beyond some 290 million years a time plus the duration no longer fits in
/// milliseconds (it would wrap into the past and fire at once).
const MAX_DURATION: Duration = Duration::from_secs(10 * 366 * 86_400);

/// How long the arbiter keeps a customer's sends: the rolling week of the weekly cap.
/// The minimum gap and the conflict window look back no further.
const ARBITER_SENDS_KEPT: Duration = Duration::from_secs(7 * 86_400);

/// The shortest wait of a cascade step.
const MIN_CASCADE_WAIT: Duration = Duration::from_secs(60);

/// Whether `value` is a duration longer than [`MAX_DURATION`].
fn too_long(value: &str) -> bool {
    humantime_serde::re::humantime::parse_duration(value).is_ok_and(|d| d > MAX_DURATION)
}

/// The line of `key` in the table `[<parent>.<sub>]`, else the line of `sub`'s first
/// part where it is written inline in `[<parent>]` (`[arbiter.channel_caps.sms]`, or
/// `channel_caps = { sms = { daily_cap = 0 } }`).
fn nested_key_line(text: &str, parent: &str, sub: &str, key: &str) -> Option<usize> {
    table_key_line(text, &format!("{parent}.{sub}"), key)
        .or_else(|| table_key_line(text, parent, sub.split('.').next().unwrap_or_default()))
}

/// The first override that makes the file `text` invalid on its own (it does not
/// apply, the result does not read, or it fails a check).
fn breaks_alone<'a>(text: &str, overrides: &'a [(String, String)]) -> Option<&'a (String, String)> {
    overrides.iter().find(|(var, value)| {
        let Ok(mut single) = text.parse::<toml_edit::DocumentMut>() else {
            return false;
        };
        if apply_override(&mut single, var, value).is_err() {
            return true;
        }
        let single = single.to_string();
        toml::from_str::<Config>(&single).map_or(true, |c| c.validate(&single).is_err())
    })
}

/// The variable to blame for an override error: the one found, or else all of them.
fn culprit_or_all(culprit: Option<&(String, String)>, overrides: &[(String, String)]) -> String {
    match culprit {
        Some((var, _)) => var.clone(),
        None => overrides
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Every duration in `text` (a string humantime reads, at any depth) is at most
/// [`MAX_DURATION`]; otherwise the line, column and message of the first that is not.
fn check_durations(text: &str) -> Result<(), (usize, usize, String)> {
    // A document that does not parse was reported by the typed parse already.
    let Ok(doc) = toml_edit::ImDocument::parse(text) else {
        return Ok(());
    };
    let error_of = |key: &str, value: &toml_edit::Value| {
        let toml_edit::Value::String(s) = value else {
            return None;
        };
        too_long(s.value()).then(|| {
            let (line, column) = value
                .span()
                .map(|span| line_col(text, span.start))
                .unwrap_or((1, 1));
            (
                line,
                column,
                format!(
                    "{key}: {:?} is longer than the 10 years any duration may take",
                    s.value()
                ),
            )
        })
    };
    let mut stack: Vec<(String, &toml_edit::Item)> = vec![(String::new(), doc.as_item())];
    let join = |prefix: &str, key: &str| match prefix {
        "" => key.to_string(),
        _ => format!("{prefix}.{key}"),
    };
    while let Some((key, item)) = stack.pop() {
        match item {
            toml_edit::Item::Table(t) => {
                stack.extend(t.iter().map(|(k, v)| (join(&key, k), v)));
            }
            toml_edit::Item::ArrayOfTables(tables) => {
                for (i, t) in tables.iter().enumerate() {
                    let at = format!("{key}[{i}]");
                    stack.extend(t.iter().map(|(k, v)| (join(&at, k), v)));
                }
            }
            toml_edit::Item::Value(v) => {
                let mut values = vec![(key, v)];
                while let Some((key, v)) = values.pop() {
                    match v {
                        toml_edit::Value::Array(a) => values.extend(
                            a.iter()
                                .enumerate()
                                .map(|(i, v)| (format!("{key}[{i}]"), v)),
                        ),
                        toml_edit::Value::InlineTable(t) => {
                            values.extend(t.iter().map(|(k, v)| (join(&key, k), v)))
                        }
                        v => {
                            if let Some(error) = error_of(&key, v) {
                                return Err(error);
                            }
                        }
                    }
                }
            }
            toml_edit::Item::None => {}
        }
    }
    Ok(())
}

/// The line where `key` is assigned in `[table]`, if it is (not the header's).
fn assigned_in(text: &str, table: &str, key: &str) -> Option<usize> {
    let header = format!("[{table}]");
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| is_header(l, &header))?;
    assigned_after(&lines, start, key)
}

/// The line where `key` is assigned in the table whose header is line `start`
/// (0-based) of `lines`, before the next header.
fn assigned_after(lines: &[&str], start: usize, key: &str) -> Option<usize> {
    lines
        .iter()
        .enumerate()
        .skip(start + 1)
        .take_while(|(_, l)| !l.trim_start().starts_with('['))
        .find(|(_, l)| assigns(l, key))
        .map(|(i, _)| i + 1)
}

/// Whether `line` assigns `key` (`key = ...`).
fn assigns(line: &str, key: &str) -> bool {
    line.trim_start()
        .strip_prefix(key)
        .is_some_and(|rest| rest.trim_start().starts_with('='))
}

/// Whether `line` is the table header `header` (as `[a.b]` or `[[a]]`), written with
/// spaces inside its brackets or a comment after it, as TOML allows.
fn is_header(line: &str, header: &str) -> bool {
    let written = line.split('#').next().unwrap_or_default().trim();
    written.starts_with('[')
        && written
            .chars()
            .filter(|c| !c.is_whitespace())
            .eq(header.chars())
}

/// The line where `key` is assigned in the `index`-th `[[scenarios]]` table (before
/// any sub-table of it).
fn scenario_key_line(text: &str, index: usize, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let (start, _) = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| is_header(l, "[[scenarios]]"))
        .nth(index)?;
    assigned_after(&lines, start, key)
}

/// The line (1-based) of the `index`-th `[[scenarios]]` header.
fn scenario_header_line(text: &str, index: usize) -> Option<usize> {
    (text.lines().enumerate())
        .filter(|(_, l)| is_header(l, "[[scenarios]]"))
        .nth(index)
        .map(|(start, _)| start + 1)
}

/// The line of `key` in the RFM cell named `name` (the line naming the cell when the
/// cell is written on one line).
fn cell_key_line(text: &str, name: &str, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let cells = lines.iter().position(|l| l.contains("cells"))?;
    let quoted = format!("\"{name}\"");
    let named = cells + lines[cells..].iter().position(|l| l.contains(&quoted))?;
    let own = lines[named + 1..]
        .iter()
        .take_while(|l| !l.trim_start().starts_with('[') && !assigns(l, "name"))
        .position(|l| assigns(l, key));
    Some(own.map_or(named, |i| named + 1 + i) + 1)
}

/// Whether `level` is a tracing filter that logs what it names. A bare word that is no
/// level (`warning`) reads as a target at TRACE, so every other line would be filtered
/// out, errors included: refused.
fn check_log_level(level: &str) -> Result<(), String> {
    use tracing_subscriber::filter::LevelFilter;
    let directives = || level.split(',').map(str::trim).filter(|d| !d.is_empty());
    let bare = |d: &&str| !d.contains(['=', '[', '{']);
    let is_level = |d: &&str| d.parse::<LevelFilter>().is_ok();
    // With a level for everything else (`info,kairos_profile`), a bare target is one
    // module at TRACE, as meant.
    if !directives().any(|d| bare(&d) && is_level(&d)) {
        if let Some(word) = directives().find(|d| bare(d) && !is_level(d)) {
            return Err(format!(
                "\"{word}\" is not a level (trace, debug, info, warn, error, off), and no \
                 directive sets one for the rest: write a level, or target=level for one \
                 module"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(drop)
        .map_err(|e| format!("not a filter: {e}"))
}

/// A `price_drop` scenario's `min_drop_percent` when not set.
pub const DEFAULT_MIN_DROP_PERCENT: f64 = 5.0;

/// librdkafka properties the runtime sets and relies on, which `[kafka.client]` may
/// not override.
const KAFKA_PROPERTIES_KAIROS_SETS: [&str; 8] = [
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "partition.assignment.strategy",
    "group.protocol",
    "enable.idempotence",
    // The engine finds a key's partition itself (in-app inboxes, `explain`, heartbeats)
    // with the default's CRC32.
    "partitioner",
];

/// The line of `key` in the table `[<table>]` (a dotted path, as written in its
/// header), else the header's line; none without such a header (the table written
/// inline in another).
fn table_key_line(text: &str, table: &str, key: &str) -> Option<usize> {
    let header = format!("[{table}]");
    let start = text.lines().position(|l| is_header(l, &header))?;
    assigned_in(text, table, key).or(Some(start + 1))
}

/// First line where `key` is assigned, for errors found after parsing.
fn find_key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .map(|rest| rest.trim_start().starts_with('='))
                .unwrap_or(false)
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(Path::new("test.toml"), text, &[])
    }

    /// The line and message of the error `text` is refused with.
    fn line_of(text: &str) -> (usize, String) {
        match parse(text).unwrap_err() {
            ConfigError::Invalid { line, message, .. } => (line, message),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_scenario_channel_needs_a_delivery_section_unless_the_scenario_is_off() {
        let scenario = |enabled: bool| {
            format!(
                "[delivery.email]\nadmin_listen = \"127.0.0.1:0\"\nprovider = \"simulator\"\n[[scenarios]]\nname = \"a\"\n\
                 kind = \"abandoned_cart\"\nchannels = [\"email\", \"sms\"]\n\
                 template = \"t\"\nenabled = {enabled}\n"
            )
        };
        let err = parse(&scenario(true))
            .expect("a replay needs no delivery section")
            .check_deliverable()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("scenarios[0] (a) sends on sms")
                && err.contains("no [delivery.sms] section"),
            "{err}"
        );
        parse(&scenario(false))
            .unwrap()
            .check_deliverable()
            .expect("a disabled scenario sends nothing");
    }

    /// Zero event-time bounds, a gap shorter than the lead, a timer tick of 0 or
    /// beyond a minute and a provider timeout of 0 are refused at their lines.
    #[test]
    fn zero_clock_bounds_timer_ticks_and_provider_timeouts_are_refused_at_their_lines() {
        for key in ["max_event_lead", "max_event_gap"] {
            let (line, message) = line_of(&format!("[clock]\nmode = \"event\"\n{key} = \"0s\"\n"));
            assert_eq!(line, 3, "{message}");
            assert!(message.contains(key), "{message}");
        }
        let (line, message) = line_of(
            "[clock]\nmode = \"event\"\nmax_event_lead = \"2days\"\nmax_event_gap = \"1day\"\n",
        );
        assert_eq!(line, 4, "{message}");
        assert!(message.contains("max_event_lead"), "{message}");
        // In wall-clock mode the gap is not read, until a replay or a benchmark runs
        // the file in event time.
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("kairos.toml");
        let text = "[clock]\nmax_event_lead = \"2days\"\nmax_event_gap = \"1day\"\n";
        std::fs::write(&file, text).expect("config file written");
        let config = Config::from_text(&file, text, &[]).expect("wall-clock mode reads no gap");
        match config
            .in_event_time()
            .expect_err("event time reads the gap")
        {
            ConfigError::Invalid {
                file: named,
                line,
                message,
                ..
            } => {
                assert_eq!((named, line), (file.clone(), 3), "{message}");
                assert!(message.contains("clock.max_event_gap"), "{message}");
            }
            other => panic!("{other}"),
        }
        let fine = "[clock]\nmax_event_lead = \"1day\"\nmax_event_gap = \"1day\"\n";
        let config = Config::from_text(&file, fine, &[]).expect("valid");
        assert_eq!(
            config
                .in_event_time()
                .expect("a gap as long as the lead")
                .clock
                .mode,
            ClockMode::Event
        );
        for tick in ["0s", "2m"] {
            let (line, message) = line_of(&format!(
                "[state]\ndir = \"var\"\ntimer_tick = \"{tick}\"\n"
            ));
            assert_eq!(line, 3, "{message}");
            assert!(message.contains("timer_tick"), "{message}");
        }
        parse("[state]\ntimer_tick = \"1s\"\n").expect("a second is fine");
        let (line, message) = line_of(
            "[delivery.sms]\nadmin_listen = \"127.0.0.1:0\"\nprovider = \"http\"\n\
             [delivery.sms.http]\nurl = \"https://gw.example/sms\"\ntimeout = \"0s\"\n",
        );
        assert_eq!(line, 6, "{message}");
        assert!(message.contains("delivery.sms.http.timeout"), "{message}");
    }

    /// Variables that are not UTF-8 are skipped unless they are Kairos', which are
    /// named in the error.
    #[test]
    fn environment_variables_that_are_not_utf8_do_not_stop_the_load() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let not_utf8 = || OsString::from_vec(vec![0xff, 0xfe]);
        let vars = vec![
            (OsString::from("LANG_X"), not_utf8()),
            (not_utf8(), OsString::from("x")),
            (
                OsString::from("KAIROS__KAFKA__PARTITIONS"),
                OsString::from("8"),
            ),
        ];
        let overrides = overrides_in(vars.into_iter()).expect("others are skipped");
        assert_eq!(
            overrides,
            [("KAIROS__KAFKA__PARTITIONS".to_string(), "8".to_string())]
        );
        let ours = vec![(
            OsString::from("KAIROS__ARBITER__CONTROL_GROUP_SALT"),
            not_utf8(),
        )];
        let err = overrides_in(ours.into_iter()).unwrap_err().to_string();
        assert!(
            err.contains("KAIROS__ARBITER__CONTROL_GROUP_SALT") && err.contains("UTF-8"),
            "{err}"
        );
    }

    /// Errors of keys checked together point at the key the file writes.
    #[test]
    fn lifecycle_quiet_hours_and_cap_errors_point_at_the_key_written() {
        let (line, message) = line_of("[segments.lifecycle]\nnew_days = 120\n");
        assert_eq!(line, 2, "{message}");
        assert!(message.starts_with("new_days"), "{message}");
        let (line, message) = line_of("[segments.lifecycle]\nchurn_days = 10\n");
        assert_eq!(line, 2, "{message}");
        assert!(message.starts_with("churn_days"), "{message}");
        let (line, message) = line_of("[arbiter]\nquiet_hours_end = \"07:00\"\n");
        assert_eq!(line, 2, "{message}");
        assert!(message.starts_with("quiet_hours_end"), "{message}");
        let (line, message) =
            line_of("[arbiter]\nquiet_hours_start = \"22:00\"\nquiet_hours_end = \"7am\"\n");
        assert_eq!(line, 3, "{message}");
        let (line, message) =
            line_of("[arbiter.channel_caps.sms]\ndaily_cap = 1\n\n[arbiter]\ndaily_cap = 0\n");
        assert_eq!(line, 5, "{message}");
    }

    /// An override of a text setting is taken as written: digits, a word TOML reads
    /// as a boolean and quotes stay text.
    #[test]
    fn an_override_of_a_text_setting_is_taken_as_written() {
        let with = |var: &str, value: &str| {
            Config::from_text(Path::new("t.toml"), "", &[(var.into(), value.into())])
                .unwrap_or_else(|e| panic!("{var}={value}: {e}"))
        };
        let c = with("KAIROS__ARBITER__CONTROL_GROUP_SALT", "2024");
        assert_eq!(c.arbiter.control_group_salt, "2024");
        let c = with("KAIROS__ARBITER__CONTROL_GROUP_SALT", "'s3cr3t'");
        assert_eq!(c.arbiter.control_group_salt, "'s3cr3t'");
        let c = with("KAIROS__KAFKA__BOOTSTRAP_SERVERS", "true");
        assert_eq!(c.kafka.bootstrap_servers, "true");
        // Other settings keep their types.
        let c = with("KAIROS__KAFKA__PARTITIONS", "8");
        assert_eq!(c.kafka.partitions, 8);
    }

    #[test]
    fn currencies_are_iso_codes_with_rates_above_zero() {
        let ok = parse("[profile]\ncurrency = \"EUR\"\n[profile.exchange_rates]\nUSD = 0.92\n")
            .expect("valid");
        assert_eq!(ok.profile.exchange_rates.get("USD"), Some(&0.92));
        for (text, line, says) in [
            ("[profile]\ncurrency = \"euro\"\n", 2, "no ISO 4217 code"),
            (
                "[profile.exchange_rates]\nUSD = 0.92\n",
                2,
                "profile.currency, which is not set",
            ),
            (
                "[profile]\ncurrency = \"EUR\"\n[profile.exchange_rates]\nUSD = 0.0\n",
                4,
                "a rate is above 0",
            ),
            (
                "[profile]\ncurrency = \"EUR\"\n[profile.exchange_rates]\nGBP = 1.2\neur = 1.0\n",
                5,
                "other than profile.currency",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("test.toml:{line}:")),
                "{text}: {err}"
            );
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn a_minimum_gap_or_conflict_window_beyond_the_week_of_sends_kept_is_refused() {
        for key in ["min_gap", "conflict_window"] {
            let err = parse(&format!("[arbiter]\ndaily_cap = 2\n{key} = \"8d\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("test.toml:3:"), "{err}");
            assert!(err.contains(&format!("arbiter.{key}")), "{err}");
            assert!(err.contains("at most 7 days"), "{err}");
            parse(&format!("[arbiter]\n{key} = \"7d\"\n")).expect("a week is allowed");
        }
    }

    #[test]
    fn a_duration_beyond_ten_years_is_rejected_with_its_line() {
        let err = parse("[arbiter]\nmin_gap = \"1h\"\nconflict_window = \"20years\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:3:"), "{err}");
        assert!(err.contains("arbiter.conflict_window"), "{err}");
        let text = "[[scenarios]]\nname = \"a\"\nkind = \"abandoned_cart\"\n\
                    channels = [\"email\", \"push\"]\ntemplate = \"t\"\n\
                    cascade = [\"1h\", \"9999999999d\"]\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.starts_with("test.toml:6:"), "{err}");
        assert!(err.contains("scenarios[0].cascade[1]"), "{err}");
        for wait in ["0s", "59s"] {
            let text = format!(
                "[[scenarios]]\nname = \"a\"\nkind = \"abandoned_cart\"\n\
                 channels = [\"email\", \"push\"]\ntemplate = \"t\"\n\
                 cascade = [\"1h\", \"{wait}\"]\n"
            );
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.starts_with("test.toml:6:"), "{err}");
            assert!(
                err.contains(&format!(
                    "scenarios[0] (a): cascade[1] = \"{wait}\" is below"
                )),
                "{err}"
            );
        }
        parse(&text.replace("9999999999d", "1m")).expect("a minute is allowed");
        parse("[arbiter]\noffer_repeat_window = \"3650days\"\n").expect("ten years is allowed");
        let err = Config::from_text(
            Path::new("t.toml"),
            "",
            &[("KAIROS__ARBITER__MIN_GAP".into(), "100years".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("KAIROS__ARBITER__MIN_GAP") && err.contains("10 years"),
            "{err}"
        );
    }

    #[test]
    fn unknown_field_names_line_and_key() {
        let err = parse("[kafka]\npartitions = 4\nbootstrap = \"x\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("test.toml:3:"), "{msg}");
        assert!(msg.contains("bootstrap"), "{msg}");
    }

    #[test]
    fn quiet_hours_that_start_when_they_end_are_rejected_with_line() {
        let text = "[arbiter]\nquiet_hours_start = \"22:00\"\nquiet_hours_end = \"22:00\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.starts_with("test.toml:3:"), "{err}");
        assert!(err.contains("the same time"), "{err}");
        assert!(
            parse("[arbiter]\nquiet_hours_start = \"22:00\"\nquiet_hours_end = \"08:00\"\n")
                .is_ok()
        );
    }

    #[test]
    fn an_overall_cap_of_zero_is_rejected_with_line() {
        let err = parse("[arbiter]\ndaily_cap = 0\n").unwrap_err().to_string();
        assert!(err.starts_with("test.toml:2:"), "{err}");
        assert!(err.contains("daily_cap = 0"), "{err}");
        let err = parse("[arbiter]\nweekly_cap = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("weekly_cap = 0"), "{err}");
    }

    #[test]
    fn wrong_type_names_line() {
        let err = parse("[kafka]\n\npartitions = \"four\"\n").unwrap_err();
        assert!(err.to_string().starts_with("test.toml:3:"), "{err}");
    }

    #[test]
    fn unknown_channel_in_scenario_is_rejected_with_line() {
        let text = "[[scenarios]]\nname = \"a\"\nkind = \"abandoned_cart\"\nchannels = [\"emial\"]\ntemplate = \"t\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.starts_with("test.toml:4:"), "{err}");
        assert!(err.contains("emial"), "{err}");
    }

    #[test]
    fn env_override_wins_and_keeps_type() {
        let cfg = Config::from_text(
            Path::new("t.toml"),
            "[kafka]\npartitions = 4\n",
            &[
                ("KAIROS__KAFKA__PARTITIONS".into(), "8".into()),
                (
                    "KAIROS__KAFKA__BOOTSTRAP_SERVERS".into(),
                    "127.0.0.1:9092".into(),
                ),
            ],
        )
        .unwrap();
        assert_eq!(cfg.kafka.partitions, 8);
        assert_eq!(cfg.kafka.bootstrap_servers, "127.0.0.1:9092");
    }

    /// Any key can be overridden: in a `[[scenarios]]` table by its index, and in a
    /// table written inline; an index past the list names the variable.
    #[test]
    fn env_overrides_reach_lists_of_tables_and_inline_tables() {
        let text = "[arbiter]\nchannel_caps = { sms = { daily_cap = 2 } }\n\n\
            [[scenarios]]\nname = \"a\"\nkind = \"welcome\"\nchannels = [\"email\"]\ntemplate = \"t\"\n\n\
            [[scenarios]]\nname = \"b\"\nkind = \"abandoned_cart\"\nchannels = [\"email\"]\ntemplate = \"u\"\n";
        let with = |pairs: &[(&str, &str)]| {
            let env: Vec<(String, String)> = (pairs.iter())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Config::from_text(Path::new("t.toml"), text, &env)
        };
        let cfg = with(&[
            ("KAIROS__SCENARIOS__1__ENABLED", "false"),
            ("KAIROS__SCENARIOS__1__DELAY", "2h"),
            ("KAIROS__ARBITER__CHANNEL_CAPS__SMS__DAILY_CAP", "1"),
            ("KAIROS__ARBITER__CHANNEL_CAPS__PUSH__WEEKLY_CAP", "3"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(cfg.scenarios[0].enabled);
        assert!(!cfg.scenarios[1].enabled);
        assert_eq!(cfg.scenarios[1].delay, Duration::from_secs(7200));
        let caps = &cfg.arbiter.channel_caps;
        assert_eq!(caps[&Channel::sms].daily_cap, Some(1));
        assert_eq!(caps[&Channel::push].weekly_cap, Some(3));
        for (var, part) in [
            ("KAIROS__SCENARIOS__2__ENABLED", "index from 0 to 1"),
            ("KAIROS__SCENARIOS__ENABLED", "index from 0 to 1"),
        ] {
            let err = with(&[(var, "false")]).unwrap_err().to_string();
            assert!(err.contains(var) && err.contains(part), "{err}");
        }
    }

    #[test]
    fn bad_env_override_names_variable() {
        let err = Config::from_text(
            Path::new("t.toml"),
            "",
            &[
                ("KAIROS__STATE__DIR".into(), "/tmp/x".into()),
                ("KAIROS__KAFKA__PARTITIONS".into(), "many".into()),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("KAIROS__KAFKA__PARTITIONS"), "{err}");
        assert!(
            !err.contains("KAIROS__STATE__DIR"),
            "only the culprit: {err}"
        );
    }

    /// A value the environment sets is no line of the file: its error names the
    /// variable. One the file sets wrongly is the file's, whatever else is set.
    #[test]
    fn an_invalid_value_from_the_environment_names_the_variable_not_a_line() {
        let text = "[arbiter]\ndaily_cap = 2\n";
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let err = Config::from_text(
            Path::new("t.toml"),
            text,
            &env(&[
                ("KAIROS__STATE__DIR", "/tmp/x"),
                ("KAIROS__ARBITER__DAILY_CAP", "0"),
            ]),
        )
        .unwrap_err();
        match &err {
            ConfigError::Env { var, message } => {
                assert_eq!(var, "KAIROS__ARBITER__DAILY_CAP");
                assert!(message.contains("daily_cap"), "{message}");
            }
            other => panic!("{other}"),
        }
        // The file's own mistake keeps its line, with an override beside it.
        let err = Config::from_text(
            Path::new("t.toml"),
            "[arbiter]\ndaily_cap = 0\n",
            &env(&[("KAIROS__STATE__DIR", "/tmp/x")]),
        )
        .unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { line: 2, .. }),
            "{err}"
        );
        // An override that mends the file's value is taken.
        let config = Config::from_text(
            Path::new("t.toml"),
            "[arbiter]\ndaily_cap = 0\n",
            &env(&[("KAIROS__ARBITER__DAILY_CAP", "3")]),
        )
        .expect("mended by the environment");
        assert_eq!(config.arbiter.daily_cap, 3);
    }

    /// A scenario's mistake is reported at that scenario's line, not at the first
    /// scenario that has the key; caps of 0 anywhere, a price drop threshold outside
    /// (0, 100], a zero attribution window and generator settings it cannot run on are
    /// refused at their lines.
    #[test]
    fn scenario_and_cap_errors_point_at_their_own_lines() {
        let two = |second: &str| {
            format!(
                "[[scenarios]]\nname = \"a\"\nkind = \"welcome\"\nchannels = [\"email\"]\ntemplate = \"a\"\n\n\
                 [[scenarios]]\nname = \"b\"\nkind = \"price_drop\"\ntemplate = \"b\"\n{second}"
            )
        };
        let (line, message) = line_of(&two("channels = []\n"));
        assert_eq!(line, 11, "{message}");
        let (line, message) =
            line_of(&two("channels = [\"email\"]\nname = \"a\"\n").replace("name = \"b\"\n", ""));
        assert_eq!(line, 11, "{message}");
        assert!(message.contains("duplicate"), "{message}");
        for drop in ["150.0", "0.0", "-5.0", "nan"] {
            let text = two(&format!(
                "channels = [\"email\"]\nmin_drop_percent = {drop}\n"
            ));
            let (line, message) = line_of(&text);
            assert_eq!(line, 12, "{drop}: {message}");
        }
        let text = two("channels = [\"email\"]\ncaps = { weekly_cap = 0 }\n");
        let (line, message) = line_of(&text);
        assert_eq!(line, 12, "{message}");
        assert!(message.contains("weekly_cap"), "{message}");
        let (line, message) =
            line_of("[arbiter]\ndaily_cap = 2\n\n[arbiter.channel_caps.sms]\ndaily_cap = 0\n");
        assert_eq!(line, 5, "{message}");
        assert!(message.contains("channel_caps.sms.daily_cap"), "{message}");
        let (line, message) =
            line_of("[arbiter]\ncategory_caps = { promo = { weekly_cap = 0 } }\n");
        assert_eq!(line, 2, "{message}");
        let (line, message) = line_of("[feedback]\nattribution_window = \"0s\"\n");
        assert_eq!(line, 2, "{message}");
        // At 100 a drop to nothing qualifies: allowed.
        parse(&two("channels = [\"email\"]\nmin_drop_percent = 100.0\n")).expect("valid");
        // The generator would spin on an endless rate and panic on a share of NaN.
        for (key, value) in [
            ("rate", "0.0"),
            ("rate", "inf"),
            ("rate", "nan"),
            ("offline_share", "nan"),
            ("offline_share", "0.96"),
            ("offline_share", "-0.1"),
            ("catalog_change_share", "nan"),
            ("catalog_change_share", "1.5"),
        ] {
            let (line, message) = line_of(&format!("[generator]\nseed = 1\n{key} = {value}\n"));
            assert_eq!(line, 3, "{key} = {value}: {message}");
            assert!(message.contains(key), "{message}");
        }
        parse("[generator]\nrate = 0.5\noffline_share = 0.0\n").expect("valid");
    }

    /// A delivery channel's mistake is reported at that channel's line, in its own
    /// table or where the table is written inline; an RFM boundary at its own key.
    #[test]
    fn delivery_and_rfm_errors_point_at_the_key_at_fault() {
        let email =
            "[delivery.email]\nprovider = \"simulator\"\nadmin_listen = \"127.0.0.1:0\"\n\n";
        let sms = "[delivery.sms]\nadmin_listen = \"127.0.0.1:0\"\n";
        let (line, message) = line_of(&format!("{email}{sms}provider = \"http\"\n"));
        assert_eq!(line, 7, "{message}");
        assert!(message.contains("delivery.sms.provider"), "{message}");
        let (line, message) = line_of(&format!(
            "{email}{sms}provider = \"simulator\"\n[delivery.sms.retry]\nmax_attempts = 0\n"
        ));
        assert_eq!(line, 9, "{message}");
        let (line, message) = line_of(&format!(
            "{email}{sms}provider = \"simulator\"\n[delivery.sms.retry]\ndeferral_backoff = \"10s\"\ndeferral_max_backoff = \"5s\"\n"
        ));
        assert_eq!(line, 10, "{message}");
        assert!(message.contains("deferral_max_backoff"), "{message}");
        let (line, message) = line_of(&format!(
            "{email}{sms}provider = \"simulator\"\n[delivery.sms.retry]\ndeferral_backoff = \"0s\"\n"
        ));
        assert_eq!(line, 9, "{message}");
        assert!(
            message.contains("deferral_backoff: must be at least 1s"),
            "{message}"
        );
        let (line, message) = line_of(&format!(
            "{email}{sms}provider = \"simulator\"\nrate_limit = {{ per_second = 5, burst = 0 }}\n"
        ));
        assert_eq!(line, 8, "{message}");
        assert!(message.starts_with("burst"), "{message}");
        let (line, message) = line_of(
            "[segments.rfm]\nrecency_days = [30, 60, 90, 180]\nmonetary = [100.0, 50.0, 500.0, 1000.0]\n",
        );
        assert_eq!(line, 3, "{message}");
    }

    /// A gateway's URL, its certificate file and an SMTP login's transport are checked
    /// when the file is read, at the key at fault.
    #[test]
    fn a_provider_a_worker_could_not_reach_safely_is_refused_at_its_key() {
        let sms = "[delivery.sms]\nprovider = \"http\"\nadmin_listen = \"127.0.0.1:0\"\n[delivery.sms.http]\n";
        for url in ["ftp://gw.example/sms", "gw.example/sms", "https://"] {
            let (line, message) = line_of(&format!("{sms}url = \"{url}\"\n"));
            assert_eq!(line, 5, "{url}: {message}");
            assert!(message.contains("delivery.sms.http.url"), "{message}");
        }
        // Headers a request could not carry: refused at their line, not found out by
        // every send.
        let url = "url = \"https://gw.example/sms\"\n";
        for (key, lines, at) in [
            ("auth_header", "auth_header = \"X Api-Key\"\n", 6),
            (
                "auth_value",
                "auth_header = \"A\"\nauth_value = \"a\\nb\"\n",
                7,
            ),
            (
                "idempotency_header",
                "idempotency_header = \"Idem:key\"\n",
                6,
            ),
        ] {
            let (line, message) = line_of(&format!("{sms}{url}{lines}"));
            assert_eq!(line, at, "{key}: {message}");
            assert!(message.contains(&format!("http.{key}")), "{message}");
        }
        let cert = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(cert.path(), "no certificate here").expect("write");
        let missing = cert.path().with_extension("gone");
        for file in [cert.path(), missing.as_path()] {
            let text = format!(
                "{sms}url = \"https://gw.example/sms\"\nca_file = \"{}\"\n",
                file.display()
            );
            let (line, message) = line_of(&text);
            assert_eq!(line, 6, "{message}");
            assert!(message.contains("delivery.sms.http.ca_file"), "{message}");
        }
        let good =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/support/gateway-cert.pem");
        let text = format!(
            "{sms}url = \"https://gw.example/sms\"\nca_file = \"{}\"\n",
            good.display()
        );
        parse(&text).expect("a PEM certificate");
        let smtp = |host: &str, security: &str| {
            format!(
                "[delivery.email]\nprovider = \"smtp\"\nadmin_listen = \"127.0.0.1:0\"\n[delivery.email.smtp]\nhost = \"{host}\"\nfrom = \"a@shop.example\"\nusername = \"u\"\npassword = \"p\"\n{security}"
            )
        };
        let (line, message) = line_of(&smtp("smtp.example", ""));
        assert_eq!(line, 4, "no security key: the table's line: {message}");
        assert!(message.contains("in clear"), "{message}");
        let (line, _) = line_of(&smtp("smtp.example", "security = \"none\"\n"));
        assert_eq!(line, 9);
        parse(&smtp("smtp.example", "security = \"starttls\"\n")).expect("encrypted");
        parse(&smtp("127.0.0.1", "")).expect("a local relay");
    }

    /// A provider section `provider` does not name would leave the simulator
    /// "delivering" every send; rates written as percentages would deliver and open
    /// them all.
    #[test]
    fn an_unread_provider_section_and_simulator_rates_out_of_range_are_refused_at_their_lines() {
        let email = "[delivery.email]\nadmin_listen = \"127.0.0.1:0\"\n";
        let smtp = "[delivery.email.smtp]\nhost = \"smtp.example\"\nfrom = \"a@shop.example\"\n";
        let (line, message) = line_of(&format!("{email}{smtp}"));
        assert_eq!(line, 3, "{message}");
        assert!(
            message.contains("[delivery.email.smtp]: not read")
                && message.contains("provider is \"simulator\""),
            "{message}"
        );
        let http = "[delivery.email.http]\nurl = \"https://gw.example/send\"\n";
        let (line, message) = line_of(&format!("{email}provider = \"in_app\"\n{http}"));
        assert_eq!(line, 4, "{message}");
        assert!(message.contains("provider is \"in_app\""), "{message}");
        parse(&format!("{email}provider = \"smtp\"\n{smtp}")).expect("the section read");
        // Both real providers kept, `provider` choosing one.
        parse(&format!("{email}provider = \"smtp\"\n{smtp}{http}")).expect("one of two");
        let (line, message) = line_of(&format!(
            "{email}[delivery.email.simulator]\nopen_rate = 22.0\n"
        ));
        assert_eq!(line, 4, "{message}");
        assert!(
            message.contains("delivery.email.simulator.open_rate"),
            "{message}"
        );
        let (line, message) = line_of(&format!(
            "{email}[delivery.email.simulator]\nengagement_delay_min = \"2h\"\nengagement_delay_max = \"1h\"\n"
        ));
        assert_eq!(line, 5, "{message}");
        assert!(message.contains("engagement_delay_max"), "{message}");
        parse(&format!(
            "{email}[delivery.email.simulator]\nopen_rate = 1.0\ncomplaint_rate = 0.0\n"
        ))
        .expect("fractions");
    }

    /// An inbox secret on a channel with no inbox would leave the operator believing
    /// polls are checked; a short one is guessable.
    #[test]
    fn an_inbox_secret_is_for_the_in_app_provider_and_long_enough() {
        let in_app = "[delivery.in_app]\nadmin_listen = \"127.0.0.1:0\"\nprovider = \"in_app\"\n";
        parse(&format!("{in_app}inbox_secret = \"0123456789abcdef\"\n")).expect("16 characters");
        let (line, message) = line_of(&format!("{in_app}inbox_secret = \"short\"\n"));
        assert_eq!(line, 4, "{message}");
        assert!(message.contains("at least 16 characters"), "{message}");
        let email = "[delivery.email]\nadmin_listen = \"127.0.0.1:0\"\n";
        let (line, message) = line_of(&format!("{email}inbox_secret = \"0123456789abcdef\"\n"));
        assert_eq!(line, 3, "{message}");
        assert!(
            message.contains("only the in_app provider keeps an inbox"),
            "{message}"
        );
    }

    /// An inbox without a secret serves any customer's messages to whoever asks: taken
    /// on loopback, or when the operator says the network is trusted, refused otherwise.
    #[test]
    fn an_inbox_without_a_secret_is_refused_where_other_machines_reach_it() {
        let in_app = |listen: &str| {
            format!("[delivery.in_app]\nadmin_listen = \"{listen}\"\nprovider = \"in_app\"\n")
        };
        parse(&in_app("127.0.0.1:0")).expect("loopback");
        parse(&in_app("[::1]:0")).expect("loopback");
        let (line, message) = line_of(&in_app("0.0.0.0:9115"));
        assert_eq!(line, 2, "{message}");
        assert!(
            message.contains("delivery.in_app.admin_listen"),
            "{message}"
        );
        assert!(message.contains("set inbox_secret"), "{message}");
        // (The webhook on the same port needs its token.)
        let webhook = "webhook_token = \"t\"\n";
        parse(&format!(
            "{}open_inbox = true\n{webhook}",
            in_app("0.0.0.0:9115")
        ))
        .expect("trusted");
        parse(&format!(
            "{}inbox_secret = \"0123456789abcdef\"\n{webhook}",
            in_app("0.0.0.0:9115")
        ))
        .expect("with a secret");
        let email = "[delivery.email]\nadmin_listen = \"0.0.0.0:0\"\nopen_inbox = true\n";
        let (line, message) = line_of(email);
        assert_eq!(line, 3, "{message}");
        assert!(message.contains("only the in_app provider"), "{message}");
    }

    /// A webhook without a token takes outcomes from whoever posts them: taken on
    /// loopback, or when the operator says the providers' network is trusted, refused
    /// otherwise.
    #[test]
    fn a_webhook_without_a_token_is_refused_where_other_machines_reach_it() {
        let email = |listen: &str| format!("[delivery.email]\nadmin_listen = \"{listen}\"\n");
        parse(&email("127.0.0.1:9111")).expect("loopback");
        let (line, message) = line_of(&email("0.0.0.0:9111"));
        assert_eq!(line, 2, "{message}");
        assert!(message.contains("delivery.email.admin_listen"), "{message}");
        assert!(message.contains("set webhook_token"), "{message}");
        parse(&format!("{}webhook_token = \"t\"\n", email("0.0.0.0:9111"))).expect("token");
        parse(&format!("{}open_webhook = true\n", email("10.0.0.5:9111"))).expect("trusted");
    }

    /// A registry URL without a scheme fails every request, which reads as a registry
    /// that is down: refused when the file is read.
    #[test]
    fn a_schema_registry_url_that_is_no_url_is_refused_at_its_line() {
        for url in [
            "schema-registry:8081",
            "localhost",
            "http://a:8081,http://b:8081",
        ] {
            let (line, message) = line_of(&format!("[schema_registry]\nurl = \"{url}\"\n"));
            assert_eq!(line, 2, "{url}: {message}");
            assert!(message.contains("schema_registry.url"), "{message}");
        }
        parse("[schema_registry]\nurl = \"http://schema-registry:8081\"\n").expect("a URL");
    }

    #[test]
    fn two_services_on_one_admin_port_are_refused() {
        let text = "[arbiter]\nadmin_listen = \"127.0.0.1:9200\"\n\
                    [delivery.email]\nadmin_listen = \"127.0.0.1:9200\"\n";
        let (line, message) = line_of(text);
        assert_eq!(line, 4, "{message}");
        assert!(
            message.contains("delivery.email.admin_listen") && message.contains("arbiter"),
            "{message}"
        );
        // Port 0: the kernel picks one each; other addresses may share a port.
        parse("[arbiter]\nadmin_listen = \"127.0.0.1:0\"\n[delivery.email]\nadmin_listen = \"127.0.0.1:0\"\n")
            .expect("port 0");
        parse("[arbiter]\nadmin_listen = \"127.0.0.1:9200\"\n[delivery.email]\nadmin_listen = \"127.0.0.2:9200\"\n")
            .expect("two addresses");
        let (line, _) = line_of(
            "[arbiter]\nadmin_listen = \"0.0.0.0:9200\"\n[delivery.email]\nadmin_listen = \"127.0.0.1:9200\"\nwebhook_token = \"t\"\n",
        );
        assert_eq!(line, 4, "every address holds the port");
    }

    /// A key the scenario leaves out is blamed on the scenario, not on the first
    /// scenario that sets it.
    #[test]
    fn an_error_about_a_key_a_scenario_leaves_out_points_at_that_scenario() {
        let text = "[[scenarios]]\nname = \"cart\"\nkind = \"abandoned_cart\"\n\
                    channels = [\"email\"]\ntemplate = \"t\"\ndelay = \"1h\"\n\n\
                    [[scenarios]]\nname = \"thanks\"\nkind = \"post_purchase\"\n\
                    category = \"promo\"\nchannels = [\"email\"]\ntemplate = \"t\"\n";
        let (line, message) = line_of(text);
        assert_eq!(line, 8, "{message}");
        assert!(message.contains("thanks"), "{message}");
    }

    #[test]
    fn a_cascade_step_past_valid_for_is_refused() {
        let scenario = |valid_for: &str| {
            format!(
                "[[scenarios]]\nname = \"cart\"\nkind = \"abandoned_cart\"\n\
                 channels = [\"email\", \"push\", \"sms\"]\ntemplate = \"t\"\n\
                 valid_for = \"{valid_for}\"\ncascade = [\"1h\", \"4h\"]\n"
            )
        };
        let (line, message) = line_of(&scenario("4h"));
        assert_eq!(line, 7, "{message}");
        assert!(message.contains("cascade[1]"), "{message}");
        parse(&scenario("6h")).expect("within valid_for");
        parse(&scenario("5h")).expect("due at valid_for, which it may go out at");
    }

    #[test]
    fn caps_or_holdouts_on_a_transactional_scenario_are_refused() {
        let scenario = |extra: &str| {
            format!(
                "[[scenarios]]\nname = \"shipped\"\nkind = \"order_update\"\n\
                 category = \"transactional\"\nchannels = [\"email\"]\ntemplate = \"t\"\n{extra}"
            )
        };
        for (extra, key) in [
            ("holdout_percent = 10\n", "holdout_percent"),
            ("caps = { daily_cap = 1 }\n", "caps"),
        ] {
            let (line, message) = line_of(&scenario(extra));
            assert_eq!(line, 7, "{message}");
            assert!(
                message.contains(key) && message.contains("transactional"),
                "{message}"
            );
        }
        parse(&scenario("")).expect("plain");
    }

    /// `warning` would be read as a target at TRACE and filter out every line.
    #[test]
    fn a_log_level_that_is_no_level_is_refused_at_its_line() {
        for level in [
            "warning",
            "verbose,kairos_profile=debug",
            "kairos_profile=loud",
        ] {
            let (line, message) =
                line_of(&format!("[log]\nformat = \"plain\"\nlevel = \"{level}\"\n"));
            assert_eq!(line, 3, "{level}: {message}");
            assert!(message.contains("log.level"), "{message}");
        }
        for level in [
            "warn",
            "INFO,kairos_profile=debug",
            "off",
            "info,kairos_arbiter",
        ] {
            parse(&format!("[log]\nlevel = \"{level}\"\n")).expect(level);
        }
    }

    /// A merged customer's forwarding note must outlive a purchase's attribution wait.
    #[test]
    fn a_forward_retention_shorter_than_a_day_is_refused_at_its_line() {
        let (line, message) = line_of("[identity]\nforward_retention = \"1h\"\n");
        assert_eq!(line, 2, "{message}");
        assert!(message.contains("identity.forward_retention"), "{message}");
        parse("[identity]\nforward_retention = \"1day\"\n").expect("a day");
    }

    /// A catalog join that may tell no one per commit would never tell anyone.
    #[test]
    fn an_audience_per_commit_of_zero_is_refused_at_its_line() {
        let (line, message) = line_of("[profile]\ncurrency = \"EUR\"\naudience_per_commit = 0\n");
        assert_eq!(line, 3, "{message}");
        assert!(message.contains("profile.audience_per_commit"), "{message}");
        parse("[profile]\naudience_per_commit = 1\n").expect("one");
    }

    /// Names and values librdkafka does not know are refused at their line, not by
    /// each service's first client; brokers are set in one place, the one `kairos up`
    /// checks before it clears state.
    #[test]
    fn unknown_librdkafka_properties_and_a_second_broker_address_are_refused_at_their_line() {
        for (lines, key) in [
            ("\"security.protcol\" = \"ssl\"\n", "security.protcol"),
            (
                "\"security.protocol\" = \"carrier-pigeon\"\n",
                "security.protocol",
            ),
            (
                "\"bootstrap.servers\" = \"prod:9092\"\n",
                "bootstrap.servers",
            ),
            (
                "\"metadata.broker.list\" = \"prod:9092\"\n",
                "metadata.broker.list",
            ),
        ] {
            let (line, message) =
                line_of(&format!("[kafka.client]\n\"client.id\" = \"k\"\n{lines}"));
            assert_eq!(line, 3, "{message}");
            assert!(
                message.contains(&format!("kafka.client.{key}")),
                "{message}"
            );
        }
        let (_, message) = line_of("[kafka.client]\n\"bootstrap.servers\" = \"prod:9092\"\n");
        assert!(message.contains("kafka.bootstrap_servers"), "{message}");
        parse("[kafka.client]\n\"security.protocol\" = \"sasl_ssl\"\n\"linger.ms\" = \"20\"\n")
            .expect("known properties");
    }

    #[test]
    fn librdkafka_properties_from_env_stay_strings() {
        let cfg = Config::from_text(
            Path::new("t.toml"),
            "",
            &[(
                "KAIROS__KAFKA__CLIENT__session.timeout.ms".into(),
                "6000".into(),
            )],
        )
        .unwrap();
        assert_eq!(cfg.kafka.client["session.timeout.ms"], "6000");
    }

    #[test]
    fn kafka_properties_the_commit_depends_on_cannot_be_overridden() {
        let text = "[kafka]\npartitions = 2\n\n[kafka.client]\n\"security.protocol\" = \"ssl\"\n\"enable.auto.offset.store\" = \"true\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(
            err.contains("test.toml")
                && err.contains(":6")
                && err.contains("kafka.client.enable.auto.offset.store"),
            "{err}"
        );
        let cfg = parse("[kafka.client]\n\"security.protocol\" = \"ssl\"\n").unwrap();
        assert_eq!(cfg.kafka.client["security.protocol"], "ssl");
    }

    /// Scenario errors land on that scenario's line, whatever follows its header; a
    /// scenario that could never send is refused; so is a partitioner the engine's own
    /// look-ups of a key's partition would not follow.
    #[test]
    fn scenario_and_client_mistakes_are_refused_at_their_line() {
        let first = "[[scenarios]] # the cart\nname = \"a\"\nkind = \"welcome\"\nchannels = [\"email\"]\ntemplate = \"t\"\n\n";
        let second = "[[ scenarios ]]\nname = \"b\"\nkind = \"welcome\"\ntemplate = \"u\"\n";
        let (line, message) = line_of(&format!("{first}{second}channels = []\n"));
        assert_eq!(line, 11, "{message}");
        for (key, value) in [("valid_for", "0s"), ("tolerance", "0s")] {
            let (line, message) = line_of(&format!(
                "{first}{second}channels = [\"email\"]\n{key} = \"{value}\"\n"
            ));
            assert_eq!(line, 12, "{message}");
            assert!(
                message.contains(key) && message.contains("longer than 0"),
                "{message}"
            );
        }
        let (line, message) = line_of(&format!(
            "{first}{second}channels = [\"email\"]\nvalid_for = \"90d\"\n"
        ));
        assert_eq!(
            line, 12,
            "dedup_window not set: at the valid_for: {message}"
        );
        let (line, message) = line_of("[kafka.client]\npartitioner = \"murmur2_random\"\n");
        assert_eq!(line, 2, "{message}");
    }

    /// A promo follow-up within the pause after a purchase, or a promo reactivation
    /// past the sunset, would be suppressed every time.
    #[test]
    fn promo_timings_the_arbiter_always_suppresses_are_refused_at_their_line() {
        let scenario = |kind: &str, delay: &str| {
            format!(
                "[arbiter]\npause_after_purchase = \"2d\"\nsunset_inactive_after = \"90d\"\n\
                 [[scenarios]]\nname = \"s\"\nkind = \"{kind}\"\ncategory = \"promo\"\n\
                 channels = [\"email\"]\ntemplate = \"t\"\ndelay = \"{delay}\"\n"
            )
        };
        for (kind, delay, said) in [
            ("post_purchase", "1d", "pause_after_purchase"),
            ("reactivation", "91d", "sunset_inactive_after"),
        ] {
            let (line, message) = line_of(&scenario(kind, delay));
            assert_eq!(line, 10, "{message}");
            assert!(message.contains(said), "{message}");
        }
        parse(&scenario("post_purchase", "3d")).expect("after the pause");
        parse(&scenario("reactivation", "90d")).expect("at the sunset, not past it");
        // A chain whose later step comes after the pause goes on past the first.
        parse(&scenario("post_purchase", "1d").replace(
            "delay = \"1d\"\n",
            "delay = \"1d\"\nsteps = [{ delay = \"2d\", template = \"t2\" }]\n",
        ))
        .expect("a later step after the pause");
        parse(
            &scenario("post_purchase", "1d")
                .replace("category = \"promo\"", "category = \"trigger\""),
        )
        .expect("not promo");
    }

    #[test]
    fn a_transactional_mass_send_is_rejected_with_line() {
        let text = "[[scenarios]]\nname = \"a\"\nkind = \"order_update\"\ncategory = \"transactional\"\nchannels = [\"email\"]\ntemplate = \"t\"\nmass = true\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.starts_with("test.toml:7:"), "{err}");
        assert!(err.contains("mass send"), "{err}");
    }

    #[test]
    fn a_dedup_window_not_longer_than_a_scenarios_validity_is_rejected_with_line() {
        let text = "[state]\ndedup_window = \"3days\"\n[[scenarios]]\nname = \"a\"\nkind = \"welcome\"\nchannels = [\"email\"]\ntemplate = \"t\"\nvalid_for = \"3days\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.starts_with("test.toml:2:"), "{err}");
        assert!(
            err.contains("dedup_window") && err.contains("\"a\""),
            "{err}"
        );
        let shorter = text.replace("valid_for = \"3days\"", "valid_for = \"2days\"");
        assert_eq!(
            parse(&shorter).expect("valid").state.dedup_window.as_secs(),
            3 * 86_400
        );
    }

    #[test]
    fn an_attribution_delay_over_a_day_is_rejected_with_line() {
        let text = "[feedback]\nattribution_delay = \"2days\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.starts_with("test.toml:2:"), "{err}");
        assert!(err.contains("attribution_delay"), "{err}");
        let day = text.replace("2days", "1day");
        assert_eq!(
            parse(&day)
                .expect("valid")
                .feedback
                .attribution_delay
                .as_secs(),
            86_400
        );
    }

    #[test]
    fn fewer_timers_in_memory_than_partitions_is_rejected_with_line() {
        let text = "[kafka]\npartitions = 8\n[state]\ntimers_in_memory = 7\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.starts_with("test.toml:4:"), "{err}");
        assert!(err.contains("timers_in_memory"), "{err}");
        let enough = text.replace("= 7", "= 8");
        assert_eq!(parse(&enough).expect("valid").state.timers_in_memory, 8);
    }

    #[test]
    fn duplicate_scenario_is_a_semantic_error() {
        let text = "[[scenarios]]\nname = \"a\"\nkind = \"welcome\"\nchannels = [\"email\"]\ntemplate = \"t\"\n[[scenarios]]\nname = \"a\"\nkind = \"welcome\"\nchannels = [\"email\"]\ntemplate = \"t\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("duplicate scenario name"), "{err}");
    }

    /// A scenario of `kind` with `more` lines, after a scenario that names a segment
    /// of its own (so an error must point at the second one's line).
    fn two_scenarios(kind: &str, more: &str) -> String {
        format!(
            "[[scenarios]]\nname = \"vip\"\nkind = \"segment_entered\"\nsegment = \"Champions\"\n\
             channels = [\"email\"]\ntemplate = \"t\"\n\n\
             [[scenarios]]\nname = \"b\"\nkind = \"{kind}\"\nchannels = [\"email\"]\n\
             template = \"t\"\n{more}"
        )
    }

    #[test]
    fn a_segment_trigger_for_a_segment_that_does_not_exist_is_rejected_at_its_line() {
        let err = parse(&two_scenarios("segment_entered", "segment = \"At Rsik\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:13:"), "{err}");
        assert!(err.contains("segment") && err.contains("At Rsik"), "{err}");
        for known in ["At Risk", "Others", "dormant", "prospect", "none"] {
            let text = two_scenarios("segment_entered", &format!("segment = \"{known}\"\n"));
            parse(&text).unwrap_or_else(|e| panic!("{known}: {e}"));
        }
    }

    #[test]
    fn rfm_cell_ranges_must_be_scores_from_low_to_high() {
        for (range, bad) in [("[5, 4]", "5..4"), ("[0, 9]", "0..9")] {
            let text = format!(
                "[segments.rfm]\ndefault_segment = \"Others\"\n\n\
                 [[segments.rfm.cells]]\nname = \"Fine\"\nr = [1, 5]\nf = [1, 5]\nm = [1, 5]\n\n\
                 [[segments.rfm.cells]]\nname = \"Odd\"\nr = {range}\nf = [1, 5]\nm = [1, 5]\n"
            );
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.starts_with("test.toml:12:"), "{err}");
            assert!(err.contains("Odd") && err.contains(".r"), "{err}");
            assert!(err.contains(bad), "{err}");
        }
    }

    /// A step's `exit_on_purchase` is read for chains; on a wait a purchase ends by
    /// its own rules it would be silently ignored.
    #[test]
    fn a_step_s_exit_on_purchase_is_refused_where_it_is_not_read() {
        let step = "delay = \"30d\"\n\
                    steps = [{ delay = \"1d\", template = \"t2\", exit_on_purchase = false }]\n";
        parse(&two_scenarios("welcome", step)).expect("a welcome series reads it");
        for kind in ["abandoned_cart", "browse_abandonment", "reactivation"] {
            let err = parse(&two_scenarios(kind, step)).unwrap_err().to_string();
            assert!(
                err.contains("exit_on_purchase is not read"),
                "{kind}: {err}"
            );
            assert!(err.contains("steps"), "{kind}: {err}");
        }
    }

    #[test]
    fn a_delay_or_steps_on_an_occasion_that_fires_at_once_are_rejected_at_their_line() {
        for kind in ["price_drop", "back_in_stock", "order_update"] {
            let err = parse(&two_scenarios(kind, "delay = \"1d\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("test.toml:13:"), "{kind}: {err}");
            assert!(err.contains("delay") && err.contains(kind), "{err}");
            let steps = "steps = [{ delay = \"1d\", template = \"t2\" }]\n";
            let err = parse(&two_scenarios(kind, steps)).unwrap_err().to_string();
            assert!(err.starts_with("test.toml:13:"), "{kind}: {err}");
            assert!(err.contains("steps"), "{err}");
        }
        // A segment trigger takes both.
        let more = "segment = \"At Risk\"\ndelay = \"3d\"\nsteps = [{ delay = \"1d\", template = \"t2\" }]\n";
        parse(&two_scenarios("segment_entered", more)).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn welcome_causes_are_registration_or_subscription_and_only_for_welcome() {
        let cfg = parse(&two_scenarios("welcome", "on = [\"subscription\"]\n")).unwrap();
        let s = cfg.scenario("b").unwrap();
        assert!(s.welcomes_on(WelcomeCause::Subscription));
        assert!(!s.welcomes_on(WelcomeCause::Registration));
        let cfg = parse(&two_scenarios("welcome", "")).unwrap();
        let s = cfg.scenario("b").unwrap();
        assert!(
            s.welcomes_on(WelcomeCause::Subscription) && s.welcomes_on(WelcomeCause::Registration)
        );
        let err = parse(&two_scenarios("welcome", "on = [\"login\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:13:"), "{err}");
        let err = parse(&two_scenarios("post_purchase", "on = [\"registration\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:13:"), "{err}");
        assert!(err.contains("on") && err.contains("welcome"), "{err}");
    }

    /// A key the scenario's kind never reads is refused at its line, not ignored.
    #[test]
    fn a_key_the_scenario_kind_does_not_read_is_refused_at_its_line() {
        for (kind, more, key) in [
            (
                "birthday",
                "local_time = \"10:00\"\ndelay = \"3d\"\n",
                "delay",
            ),
            (
                "registration_anniversary",
                "local_time = \"10:00\"\ndelay = \"1d\"\n",
                "delay",
            ),
            (
                "reactivation",
                "delay = \"30d\"\nlocal_time = \"10:00\"\n",
                "local_time",
            ),
            ("welcome", "segment = \"Champions\"\n", "segment"),
            (
                "post_purchase",
                "delay = \"7d\"\nstatuses = [\"delivered\"]\n",
                "statuses",
            ),
            (
                "back_in_stock",
                "min_drop_percent = 10.0\n",
                "min_drop_percent",
            ),
        ] {
            let err = parse(&two_scenarios(kind, more))
                .expect_err(kind)
                .to_string();
            // The key's line in the second scenario.
            let line = 13 + more.lines().position(|l| l.starts_with(key)).expect("key");
            assert!(
                err.starts_with(&format!("test.toml:{line}:")),
                "{kind}: {err}"
            );
            assert!(
                err.contains(&format!("does not read `{key}`")),
                "{kind}: {err}"
            );
        }
        // Where the kind reads it, each is taken.
        for (kind, more) in [
            ("birthday", "local_time = \"10:00\"\n"),
            ("order_update", "statuses = [\"delivered\"]\n"),
            ("price_drop", "min_drop_percent = 10.0\n"),
            ("reactivation", "delay = \"30d\"\n"),
        ] {
            parse(&two_scenarios(kind, more)).unwrap_or_else(|e| panic!("{kind}: {e}"));
        }
    }

    /// Marketing e-mail through a real provider needs an opt-out link; transactional
    /// mail and the simulator do not.
    #[test]
    fn marketing_email_through_a_real_provider_needs_an_opt_out_link() {
        let with = |provider: &str, link: &str, category: &str| {
            // Only the section the provider reads: another is refused.
            let section = match provider {
                "smtp" => format!(
                    "[delivery.email.smtp]\nhost = \"mx\"\nfrom = \"a@b.example\"\n{link}\n"
                ),
                "http" => format!("[delivery.email.http]\nurl = \"http://api\"\n{link}\n"),
                _ => String::new(),
            };
            let text = format!(
                "[delivery.email]\nadmin_listen = \"127.0.0.1:0\"\nprovider = \"{provider}\"\n\
                 {section}\
                 [[scenarios]]\nname = \"news\"\nkind = \"welcome\"\n\
                 category = \"{category}\"\nchannels = [\"email\"]\ntemplate = \"t\"\n"
            );
            parse(&text).unwrap_or_else(|e| panic!("{e}"))
        };
        let link = "list_unsubscribe = \"https://shop.example/u?c={customer_id}\"";
        for provider in ["smtp", "http"] {
            let config = with(provider, "", "promo");
            assert_eq!(
                config.marketing_email_without_opt_out(),
                ["news"],
                "{provider}"
            );
            let err = config.check_opt_out().expect_err(provider).to_string();
            assert!(
                err.contains("delivery.email") && err.contains("news"),
                "{err}"
            );
            assert!(
                with(provider, link, "promo").check_opt_out().is_ok(),
                "{provider}"
            );
            let blank = with(provider, "list_unsubscribe = \" \"", "promo");
            assert!(blank.check_opt_out().is_err(), "{provider}: a blank link");
            for no_one_click in ["mailto:unsub@shop.example", "http://shop.example/u"] {
                let link = format!("list_unsubscribe = \"{no_one_click}\"");
                let err = (with(provider, &link, "promo").check_opt_out())
                    .expect_err(no_one_click)
                    .to_string();
                assert!(err.contains("https://"), "{err}");
            }
            let receipts = with(provider, "", "transactional");
            assert!(
                receipts.marketing_email_without_opt_out().is_empty(),
                "{provider}"
            );
        }
        assert!(with("simulator", "", "promo").check_opt_out().is_ok());
    }

    /// `{token}` in the unsubscribe link needs the secret it is made under, and a
    /// secret needs a link that carries it; a short one is refused.
    #[test]
    fn an_unsubscribe_token_and_its_secret_come_together() {
        let config = |link: &str, secret: Option<&str>| {
            let secret =
                secret.map_or(String::new(), |s| format!("unsubscribe_secret = \"{s}\"\n"));
            Config::from_text(
                Path::new("u.toml"),
                &format!(
                    "[delivery.email]\nadmin_listen = \"127.0.0.1:0\"\nprovider = \"smtp\"\n\
                     {secret}[delivery.email.smtp]\nhost = \"mail\"\nfrom = \"shop@example.com\"\n\
                     list_unsubscribe = \"{link}\"\n"
                ),
                &[],
            )
        };
        let with_token = "https://shop.example/u?c={customer_id}&t={token}";
        let plain = "https://shop.example/u?c={customer_id}";
        let long = "0123456789abcdef-secret";
        config(with_token, Some(long)).unwrap_or_else(|e| panic!("{e}"));
        config(plain, None).unwrap_or_else(|e| panic!("{e}"));
        for (link, secret, says) in [
            (with_token, None, "missing"),
            (plain, Some(long), "not used"),
            (with_token, Some("short"), "at least 16"),
        ] {
            let err = config(link, secret).expect_err(says).to_string();
            assert!(
                err.contains("unsubscribe_secret") && err.contains(says),
                "{err}"
            );
            assert!(err.contains("u.toml"), "{err}");
        }
    }

    #[test]
    fn repository_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/kairos.toml");
        let cfg = Config::from_text(&path, &std::fs::read_to_string(&path).unwrap(), &[])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(cfg.scenario("abandoned_cart").is_some());
        assert_eq!(
            cfg.delivery.len(),
            5,
            "email, sms, push, messenger and in-app workers"
        );
    }
}
