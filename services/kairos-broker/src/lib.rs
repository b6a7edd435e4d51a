//! `kairos dev-broker`: a Kafka-protocol broker hosted in this process (librdkafka's
//! mock cluster), for running the whole pipeline on one machine with no Kafka install.
//!
//! It creates every Kairos topic with the configured partition count, prints the
//! bootstrap address and writes it to `[kafka] broker_address_file`, where the other
//! services and `kairos` commands find it. The mock cluster keeps data in memory: it is
//! for development and tests, not production.

use std::sync::Arc;

use anyhow::Context;
use kairos_core::config::Config;
use rdkafka::mocking::MockCluster;

/// Runs the broker until `cancel` fires; removes the address file on the way out.
pub async fn run(
    config: Arc<Config>,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("cannot start the embedded Kafka broker")?;
    for topic in config.all_topics() {
        cluster
            .create_topic(&topic, config.kafka.partitions, 1)
            .with_context(|| format!("cannot create topic {topic}"))?;
    }
    let addr = cluster.bootstrap_servers();
    let file = &config.kafka.broker_address_file;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Write then rename, so readers never see a half-written address.
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, format!("{addr}\n"))
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("cannot write {}", file.display()))?;
    println!("kairos dev-broker: bootstrap.servers={addr}");
    println!(
        "kairos dev-broker: {} topics with {} partitions; address written to {}",
        config.all_topics().len(),
        config.kafka.partitions,
        file.display()
    );
    tracing::info!(%addr, file = %file.display(), "embedded broker ready");
    cancel.cancelled().await;
    let _ = std::fs::remove_file(file);
    // Not destroyed: librdkafka's destroy of the mock cluster (its client handle) can
    // wait for good after its clients were killed mid-request (a killed `kairos up`),
    // and would keep the process, and the `kairos up` lock it holds, alive. Its topics
    // live in memory only and go with the process.
    std::mem::forget(cluster);
    tracing::info!("embedded broker stopped");
    Ok(())
}
