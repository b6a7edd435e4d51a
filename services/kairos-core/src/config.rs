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

use crate::contracts::{Channel, MessageCategory};
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
    pub profile: ProfileConfig,
    #[serde(default)]
    pub arbiter: ArbiterConfig,
    #[serde(default)]
    pub feedback: FeedbackConfig,
    #[serde(default)]
    pub delivery: BTreeMap<Channel, DeliveryChannelConfig>,
    #[serde(default)]
    pub generator: GeneratorConfig,
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
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: PathBuf::from("var/state"),
            block_cache_bytes: 64 << 20,
            max_batch_records: 1000,
            max_batch_wait: Duration::from_millis(20),
            timer_tick: Duration::from_millis(250),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockConfig {
    pub mode: ClockMode,
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig {
            mode: ClockMode::Wall,
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
}

impl Default for ProfileConfig {
    fn default() -> Self {
        ProfileConfig {
            admin_listen: ([127, 0, 0, 1], 9101).into(),
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
}

impl Default for ArbiterConfig {
    fn default() -> Self {
        ArbiterConfig {
            admin_listen: ([127, 0, 0, 1], 9102).into(),
            control_group_percent: 10,
            control_group_salt: "kairos".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedbackConfig {
    pub admin_listen: SocketAddr,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        FeedbackConfig {
            admin_listen: ([127, 0, 0, 1], 9103).into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Realistic simulated delivery and engagement, for demos and load tests.
    Simulator,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryChannelConfig {
    pub admin_listen: SocketAddr,
    #[serde(default = "default_provider")]
    pub provider: ProviderKind,
    #[serde(default)]
    pub simulator: SimulatorConfig,
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
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            rate: 200.0,
            customers: 20_000,
            offline_share: 0.25,
            seed: 42,
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
    /// A registration; sent after `delay`.
    Welcome,
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
    pub template: String,
    #[serde(default, with = "humantime_serde")]
    pub delay: Duration,
    /// How long after firing the message is still worth sending.
    #[serde(default = "default_valid_for", with = "humantime_serde")]
    pub valid_for: Duration,
    /// Higher wins when scenarios compete for a customer.
    #[serde(default = "default_priority")]
    pub priority: i32,
    #[serde(default = "yes")]
    pub enabled: bool,
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
        let overrides: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
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
            config = toml::from_str(&merged).map_err(|e| ConfigError::Env {
                var: overrides
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                message: e.message().to_string(),
            })?;
        }
        config.source_file = path.to_path_buf();
        config.validate(text)?;
        Ok(config)
    }

    fn validate(&self, text: &str) -> Result<(), ConfigError> {
        let fail = |key: &str, message: String| {
            let line = find_key_line(text, key);
            match line {
                Some(line) => ConfigError::Invalid {
                    file: self.source_file.clone(),
                    line,
                    column: 1,
                    message: format!("{key}: {message}"),
                },
                None => ConfigError::Semantic {
                    file: self.source_file.clone(),
                    message: format!("{key}: {message}"),
                },
            }
        };
        if self.kafka.partitions < 1 {
            return Err(fail("partitions", "must be at least 1".into()));
        }
        if self.arbiter.control_group_percent > 100 {
            return Err(fail(
                "control_group_percent",
                "must be between 0 and 100".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.scenarios.iter().enumerate() {
            if !names.insert(s.name.as_str()) {
                return Err(fail(
                    "name",
                    format!("scenarios[{i}]: duplicate scenario name {:?}", s.name),
                ));
            }
            if s.channels.is_empty() {
                return Err(fail(
                    "channels",
                    format!(
                        "scenarios[{i}] ({}): at least one channel is needed",
                        s.name
                    ),
                ));
            }
            if s.template.trim().is_empty() {
                return Err(fail(
                    "template",
                    format!("scenarios[{i}] ({}): template must not be empty", s.name),
                ));
            }
        }
        Ok(())
    }

    /// The full name of a topic, e.g. `topic("events.site")`.
    pub fn topic(&self, suffix: &str) -> String {
        format!("{}{}", self.kafka.topic_prefix, suffix)
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
        ]
        .iter()
        .map(|t| self.topic(t))
        .collect();
        topics.extend(Channel::ALL.iter().map(|c| self.send_topic(*c)));
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
}

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
    // is a string.
    let parsed: toml_edit::Value = value
        .parse()
        .unwrap_or_else(|_| toml_edit::Value::from(value));
    let mut table = doc.as_table_mut();
    for segment in &path[..path.len() - 1] {
        let entry = table
            .entry(segment)
            .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()));
        table = match entry.as_table_mut() {
            Some(t) => t,
            None => {
                return Err(ConfigError::Env {
                    var: var.into(),
                    message: format!("{segment} is not a table"),
                })
            }
        };
    }
    let last = &path[path.len() - 1];
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

    #[test]
    fn unknown_field_names_line_and_key() {
        let err = parse("[kafka]\npartitions = 4\nbootstrap = \"x\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("test.toml:3:"), "{msg}");
        assert!(msg.contains("bootstrap"), "{msg}");
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

    #[test]
    fn bad_env_override_names_variable() {
        let err = Config::from_text(
            Path::new("t.toml"),
            "",
            &[("KAIROS__KAFKA__PARTITIONS".into(), "many".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("KAIROS__KAFKA__PARTITIONS"), "{err}");
    }

    #[test]
    fn duplicate_scenario_is_a_semantic_error() {
        let text = "[[scenarios]]\nname = \"a\"\nkind = \"welcome\"\nchannels = [\"email\"]\ntemplate = \"t\"\n[[scenarios]]\nname = \"a\"\nkind = \"welcome\"\nchannels = [\"email\"]\ntemplate = \"t\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("duplicate scenario name"), "{err}");
    }

    #[test]
    fn repository_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/kairos.toml");
        let cfg = Config::from_text(&path, &std::fs::read_to_string(&path).unwrap(), &[])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(cfg.scenario("abandoned_cart").is_some());
        assert_eq!(
            cfg.delivery.len(),
            4,
            "email, sms, push and messenger workers"
        );
    }
}
