//! Kafka clients: configuration shared by every service, topic creation, producing.

use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::config::Config;

/// The bootstrap servers: from config/env, or from the address file that
/// `kairos dev-broker` writes.
pub fn bootstrap_servers(config: &Config) -> anyhow::Result<String> {
    if !config.kafka.bootstrap_servers.trim().is_empty() {
        return Ok(config.kafka.bootstrap_servers.trim().to_string());
    }
    let file = &config.kafka.broker_address_file;
    let addr = std::fs::read_to_string(file).with_context(|| {
        format!(
            "[kafka] bootstrap_servers is empty and the broker address file {} cannot be read; \
             start `kairos dev-broker` or set KAIROS__KAFKA__BOOTSTRAP_SERVERS",
            file.display()
        )
    })?;
    let addr = addr.trim().to_string();
    if addr.is_empty() {
        bail!("broker address file {} is empty", file.display());
    }
    Ok(addr)
}

/// Base client config: bootstrap servers plus `[kafka.client]` extras.
pub fn client_config(config: &Config) -> anyhow::Result<ClientConfig> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", bootstrap_servers(config)?);
    for (k, v) in &config.kafka.client {
        cc.set(k, v);
    }
    Ok(cc)
}

/// An idempotent producer: retries never duplicate or reorder within a partition.
pub fn producer(config: &Config) -> anyhow::Result<FutureProducer> {
    let mut cc = client_config(config)?;
    cc.set("enable.idempotence", "true");
    // Defaults `[kafka.client]` may change, by either of librdkafka's names.
    let client = &config.kafka.client;
    for (key, alias, value) in [
        ("linger.ms", "queue.buffering.max.ms", "5"),
        ("compression.type", "compression.codec", "lz4"),
        ("message.timeout.ms", "delivery.timeout.ms", "60000"),
    ] {
        if !client.contains_key(key) && !client.contains_key(alias) {
            cc.set(key, value);
        }
    }
    cc.create().context("cannot create Kafka producer")
}

/// A producer for write-ahead records, each awaited alone before an external effect:
/// no lingering for a batch to fill.
pub fn write_ahead_producer(config: &Config) -> anyhow::Result<FutureProducer> {
    let mut cc = client_config(config)?;
    // Bounded well below the shutdown watchdog and a provider's timeout: the send
    // waits on it.
    cc.set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .set("message.timeout.ms", "10000");
    cc.create()
        .context("cannot create the Kafka producer for write-ahead records")
}

/// How long a changelog record stays uncompacted (`min.compaction.lag.ms` of the
/// changelog topics Kairos creates): the records of a commit torn by a crash must not
/// have replaced a key's last good value when the next owner restores and undoes them,
/// and a store closed cleanly less than this ago can catch up from where it closed
/// (no deletion written since can have been compacted away).
pub const CHANGELOG_MIN_COMPACTION_LAG: Duration = Duration::from_secs(86_400);

/// Creates every Kairos topic that does not exist yet, then checks that all of them
/// exist with the configured partition count (co-partitioning depends on it).
pub async fn ensure_topics(config: &Config) -> anyhow::Result<()> {
    let topics = config.all_topics();
    let missing = missing_topics(config, &topics)?;
    if config.kafka.create_topics && !missing.is_empty() {
        tracing::info!(topics = %missing.join(","), "creating missing topics");
        let admin: AdminClient<DefaultClientContext> = client_config(config)?
            .create()
            .context("cannot create Kafka admin client")?;
        let compaction_lag_ms = CHANGELOG_MIN_COMPACTION_LAG.as_millis().to_string();
        let new_topics: Vec<NewTopic> = missing
            .iter()
            .map(|t| {
                let topic = NewTopic::new(
                    t,
                    config.kafka.partitions,
                    TopicReplication::Fixed(config.kafka.replication_factor),
                );
                // With three copies or more, a write is acknowledged once two have it
                // (the producer asks for all in-sync copies): one broker's lost disk
                // then loses nothing acknowledged.
                let topic = if config.kafka.replication_factor >= 3 {
                    topic.set("min.insync.replicas", "2")
                } else {
                    topic
                };
                // Changelogs keep the latest value per key, not a retention window,
                // and not before `CHANGELOG_MIN_COMPACTION_LAG` has passed.
                if t.ends_with("-changelog") {
                    topic
                        .set("cleanup.policy", "compact")
                        .set("min.compaction.lag.ms", &compaction_lag_ms)
                } else {
                    topic
                }
            })
            .collect();
        let opts = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(10)))
            .request_timeout(Some(Duration::from_secs(10)));
        match admin.create_topics(new_topics.iter(), &opts).await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(_) => {}
                        Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((topic, code)) => {
                            tracing::warn!(%topic, error = %code, "topic creation failed")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "CreateTopics request failed"),
        }
    }
    check_partitions(config, &topics)?;
    check_changelog_settings(config, &topics).await
}

/// Checks that the changelog topics on a cluster are compacted, never deleted by age,
/// and compacted no sooner than [`CHANGELOG_MIN_COMPACTION_LAG`]: the settings Kairos
/// creates them with, which topics made by hand or by a broker's auto-creation may
/// lack. A changelog holds each key's state for as long as it is not written again, so
/// a retention would delete the state of every customer quiet for that long from the
/// next rebuild (a rebalance, a lost disk), silently. Settings the cluster does not
/// tell (no right to read them) are left unchecked, with a warning; the embedded
/// broker (found through its address file, or named as the address it wrote) is not
/// asked.
async fn check_changelog_settings(config: &Config, topics: &[String]) -> anyhow::Result<()> {
    let changelogs: Vec<&String> = topics
        .iter()
        .filter(|t| t.ends_with("-changelog"))
        .collect();
    let bootstrap = config.kafka.bootstrap_servers.trim();
    // The embedded broker answers no settings (the request would time out).
    let embedded = bootstrap.is_empty()
        || std::fs::read_to_string(&config.kafka.broker_address_file)
            .is_ok_and(|address| address.trim() == bootstrap);
    if embedded || changelogs.is_empty() || !config.state.changelog {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client_config(config)?
        .create()
        .context("cannot create Kafka admin client")?;
    let resources: Vec<ResourceSpecifier> = changelogs
        .iter()
        .map(|t| ResourceSpecifier::Topic(t.as_str()))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = match admin.describe_configs(resources.iter(), &opts).await {
        Ok(results) => results,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the changelog topics' settings; not checked");
            return Ok(());
        }
    };
    let mut problems = Vec::new();
    for (topic, result) in changelogs.iter().zip(results) {
        match result {
            Ok(resource) => {
                let setting = |name: &str| resource.get(name).and_then(|e| e.value.clone());
                match changelog_settings_problem(topic, setting) {
                    Some(SettingsProblem::Wrong(problem)) => problems.push(problem),
                    Some(SettingsProblem::Untold(name)) => {
                        tracing::warn!(%topic, setting = name, "the broker does not tell the changelog topic's setting; not checked")
                    }
                    None => {}
                }
            }
            Err(code) => {
                tracing::warn!(%topic, error = %code, "cannot read the changelog topic's settings; not checked")
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "{} (set them with kafka-configs --alter --entity-type topics)",
            problems.join("; ")
        );
    }
    Ok(())
}

/// What [`changelog_settings_problem`] found.
#[derive(Debug, PartialEq)]
enum SettingsProblem {
    /// A setting that loses state, described.
    Wrong(String),
    /// A setting the broker did not tell.
    Untold(&'static str),
}

/// What is wrong with a changelog topic's settings (`setting` reads one), if anything:
/// see [`check_changelog_settings`]. Deletion alongside compaction is fine when the
/// retention is infinite (`retention.ms` and `retention.bytes` both -1).
fn changelog_settings_problem(
    topic: &str,
    setting: impl Fn(&str) -> Option<String>,
) -> Option<SettingsProblem> {
    let Some(policy) = setting("cleanup.policy") else {
        return Some(SettingsProblem::Untold("cleanup.policy"));
    };
    let policies: Vec<&str> = policy.split(',').map(str::trim).collect();
    let kept_for_ever = setting("retention.ms").is_some_and(|ms| ms.trim() == "-1")
        && setting("retention.bytes").is_some_and(|bytes| bytes.trim() == "-1");
    if !policies.contains(&"compact") || (policies.contains(&"delete") && !kept_for_ever) {
        return Some(SettingsProblem::Wrong(format!(
            "changelog topic {topic} has cleanup.policy={policy}: it must be compact \
             (deletion too only with retention.ms=-1 and retention.bytes=-1), or state \
             not written for the retention is lost from the next rebuild"
        )));
    }
    let Some(lag) = setting("min.compaction.lag.ms") else {
        return Some(SettingsProblem::Untold("min.compaction.lag.ms"));
    };
    let needed = CHANGELOG_MIN_COMPACTION_LAG.as_millis();
    if lag.trim().parse::<u128>().map_or(true, |ms| ms < needed) {
        return Some(SettingsProblem::Wrong(format!(
            "changelog topic {topic} has min.compaction.lag.ms={lag}: at least {needed} is \
             needed, so that a commit torn by a crash can be undone and a store closed \
             cleanly can catch up from where it closed"
        )));
    }
    None
}

fn missing_topics(config: &Config, topics: &[String]) -> anyhow::Result<Vec<String>> {
    let consumer: BaseConsumer = client_config(config)?
        .create()
        .context("cannot create metadata client")?;
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .context("cannot fetch cluster metadata")?;
    Ok(topics
        .iter()
        .filter(|t| partition_count(&metadata, t).is_none())
        .cloned()
        .collect())
}

/// The partitions of `topic` in `metadata`; `None` if the broker does not have it
/// (or has it without partitions, as while it is being created).
pub fn partition_count(metadata: &rdkafka::metadata::Metadata, topic: &str) -> Option<i32> {
    metadata
        .topics()
        .iter()
        .find(|m| m.name() == topic && m.error().is_none())
        .map(|m| m.partitions().len() as i32)
        .filter(|n| *n > 0)
}

fn check_partitions(config: &Config, topics: &[String]) -> anyhow::Result<()> {
    let consumer: BaseConsumer = client_config(config)?
        .create()
        .context("cannot create metadata client")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .context("cannot fetch cluster metadata")?;
        let mut missing = Vec::new();
        for t in topics {
            match partition_count(&metadata, t) {
                Some(n) => {
                    if n != config.kafka.partitions {
                        bail!(
                            "topic {t} has {n} partitions but [kafka] partitions = {}; \
                             co-partitioned topics must agree",
                            config.kafka.partitions
                        );
                    }
                }
                None => missing.push(t.clone()),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("topics missing on the broker: {}", missing.join(", "));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Hands `record` to the producer and returns its delivery, waiting out a full queue
/// on the same record for up to 30 s: records handed one after another, each once the
/// one before it is queued, reach the log in that order. Also usable outside a Tokio
/// runtime (a torn commit's undo).
pub async fn queue_waiting(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, [u8], [u8]>,
) -> Result<DeliveryFuture, KafkaError> {
    let queue_full = KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull);
    let queued_by = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((error, back)) if error == queue_full && std::time::Instant::now() < queued_by => {
                record = back;
                let wait = Duration::from_millis(5);
                if tokio::runtime::Handle::try_current().is_ok() {
                    tokio::time::sleep(wait).await;
                } else {
                    std::thread::sleep(wait);
                }
            }
            Err((error, _)) => return Err(error),
        }
    }
}

/// Publishes `(topic, key, payload)` records and waits for every acknowledgement. They
/// are queued strictly in order ([`queue_waiting`]), so two records of one key reach
/// the log in the order given; the acknowledgements are awaited together, so a batch
/// does not wait out the producer's linger once per record.
pub async fn send_in_order(
    producer: &FutureProducer,
    records: &[(&str, &[u8], &[u8])],
) -> anyhow::Result<()> {
    let mut deliveries = Vec::with_capacity(records.len());
    for (topic, key, payload) in records {
        let record = FutureRecord::to(topic).key(*key).payload(*payload);
        let delivery = queue_waiting(producer, record)
            .await
            .map_err(|error| anyhow::anyhow!("publish to {topic} failed: {error}"))?;
        deliveries.push((topic, delivery));
    }
    for (topic, delivery) in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((error, _))) => bail!("publish to {topic} failed: {error}"),
            Err(_) => bail!("publish to {topic} failed: the producer was dropped"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A changelog kept by age, not compacted, or compacted sooner than a day is named
    /// with what is wrong; the settings Kairos creates pass.
    #[test]
    fn changelog_settings_that_lose_state_are_named() {
        let day = CHANGELOG_MIN_COMPACTION_LAG.as_millis().to_string();
        let judge = |policy: Option<&str>, lag: Option<&str>, retention: Option<&str>| {
            changelog_settings_problem("p-changelog", |name| match name {
                "cleanup.policy" => policy.map(String::from),
                "min.compaction.lag.ms" => lag.map(String::from),
                "retention.ms" => retention.map(String::from),
                "retention.bytes" => Some("-1".to_string()),
                _ => None,
            })
        };
        let wrong = |verdict: Option<SettingsProblem>| match verdict {
            Some(SettingsProblem::Wrong(told)) => told,
            other => panic!("not refused: {other:?}"),
        };
        assert_eq!(judge(Some("compact"), Some(&day), None), None);
        assert_eq!(judge(Some(" compact "), Some("172800000"), None), None);
        assert_eq!(judge(Some("compact,delete"), Some(&day), Some("-1")), None);
        for (policy, retention) in [
            ("delete", Some("-1")),
            ("compact,delete", Some("604800000")),
            ("compact,delete", None),
        ] {
            let told = wrong(judge(Some(policy), Some(&day), retention));
            assert!(
                told.contains("p-changelog") && told.contains("cleanup.policy"),
                "{told}"
            );
        }
        for lag in ["0", "3600000", "soon"] {
            let told = wrong(judge(Some("compact"), Some(lag), None));
            assert!(told.contains("min.compaction.lag.ms"), "{told}");
        }
        // Kept for ever by age but not by size: segments still go.
        let by_size = changelog_settings_problem("p-changelog", |name| match name {
            "cleanup.policy" => Some("compact,delete".to_string()),
            "min.compaction.lag.ms" => Some(day.clone()),
            "retention.ms" => Some("-1".to_string()),
            "retention.bytes" => Some("1073741824".to_string()),
            _ => None,
        });
        assert!(
            matches!(by_size, Some(SettingsProblem::Wrong(_))),
            "{by_size:?}"
        );
        // Not told: warned about, not refused.
        assert_eq!(
            judge(None, Some(&day), None),
            Some(SettingsProblem::Untold("cleanup.policy"))
        );
        assert_eq!(
            judge(Some("compact"), None, None),
            Some(SettingsProblem::Untold("min.compaction.lag.ms"))
        );
    }
}
