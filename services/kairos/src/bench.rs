//! In-process benchmarks on RocksDB, minus Kafka:
//!
//! - `kairos bench-delivery`: one channel's delivery worker with the simulator, fed
//!   generated send commands (template rendering, the send-id record, outcomes and the
//!   engagement timers, as the worker does them);
//! - `kairos bench-arbiter`: the arbiter fed generated triggers for a customer base
//!   (dedup, ledger read-modify-write, holdouts, pacing, channel choice, decisions and
//!   send commands);
//! - `kairos bench-identity`: the identity processor fed a generated event file
//!   (decoding, normalization, graph lookups and links, merges, re-keyed output).

use std::time::Instant;

use anyhow::Context;
use kairos_arbiter::ArbiterProcessor;
use kairos_core::config::{Config, ProviderKind};
use kairos_core::contracts::{Channel, Contacts, MessageCategory, SendCommand, Trigger};
use kairos_core::replay::Replayer;
use kairos_delivery::DeliveryProcessor;

pub struct BenchStats {
    /// Input records: send commands or triggers.
    pub inputs: u64,
    pub outputs: u64,
    pub wall_seconds: f64,
    /// User and system time of the process (all threads) while the inputs were
    /// processed.
    pub cpu: crate::CpuTime,
}

impl BenchStats {
    /// One line: what went in, how long it took, the rates and the peak memory.
    pub fn report(&self, inputs: &str, unit: &str, peak_rss_kib: i64) -> String {
        let cpu_seconds = self.cpu.total();
        format!(
            "processed {} {inputs} into {} output records in {:.2} s wall, {:.2} s CPU ({:.2} user, {:.2} system): {:.0} {unit}/s wall, {:.0} {unit} per CPU-second, peak RSS {} MiB",
            self.inputs,
            self.outputs,
            self.wall_seconds,
            cpu_seconds,
            self.cpu.user,
            self.cpu.system,
            self.inputs as f64 / self.wall_seconds.max(1e-9),
            self.inputs as f64 / cpu_seconds.max(1e-9),
            peak_rss_kib / 1024,
        )
    }
}

fn command(i: u64, channel: Channel, now: i64) -> SendCommand {
    let items: Vec<serde_json::Value> = (0..(1 + i % 3))
        .map(|n| serde_json::json!({"product_id": format!("p{}", (i * 7 + n) % 5000), "name": "Running shoes", "quantity": 1, "unit_price": 59.9}))
        .collect();
    SendCommand {
        send_id: format!("bench-{i:012}"),
        trigger_id: format!("t-{i}"),
        customer_id: format!("c-{}", i % 1_000_000),
        scenario: "abandoned_cart".into(),
        channel,
        category: MessageCategory::trigger,
        template: "abandoned_cart".into(),
        address: Some(format!("customer{}@example.com", i % 1_000_000)),
        variables:
            serde_json::json!({"first_name": "Anna", "cart_items": items, "cart_value": 119.8})
                .to_string(),
        created_at: now + i as i64,
        valid_until: now + i as i64 + 3_600_000,
        cause_occurred_at: now,
        reasons: vec!["channel_choice: bench".into()],
    }
}

pub fn run(config: &Config, channel: Channel, count: u64) -> anyhow::Result<BenchStats> {
    let mut config = config.clone();
    let settings = config
        .delivery
        .get_mut(&channel)
        .with_context(|| format!("no [delivery.{channel}] section"))?;
    settings.provider = ProviderKind::Simulator;
    let settings = settings.clone();
    let registry = prometheus::Registry::new();
    let processor = DeliveryProcessor::new(&config, channel, settings, &registry)?;
    let mut replayer = Replayer::new(processor, &config, &registry)?;
    let topic = config.send_topic(channel);
    let now = kairos_core::time::wall_now();
    let records = (0..count).map(|i| {
        let cmd = command(i, channel, now);
        let payload = serde_json::to_vec(&cmd).unwrap_or_default();
        (cmd.customer_id, payload)
    });
    drive(&mut replayer, &topic, records)
}

/// Feeds `records` (key, payload) to `replayer` on `topic`, commits, and measures.
fn drive<P: kairos_core::runtime::Processor>(
    replayer: &mut Replayer<P>,
    topic: &str,
    records: impl Iterator<Item = (String, Vec<u8>)>,
) -> anyhow::Result<BenchStats> {
    drive_records(
        replayer,
        records.map(|(key, payload)| (topic.to_string(), key.into_bytes(), payload)),
    )
}

/// Feeds `records` (topic, key, payload) to `replayer`, commits, and measures.
fn drive_records<P: kairos_core::runtime::Processor>(
    replayer: &mut Replayer<P>,
    records: impl Iterator<Item = (String, Vec<u8>, Vec<u8>)>,
) -> anyhow::Result<BenchStats> {
    let started = Instant::now();
    let cpu_before = crate::cpu_time();
    let (mut inputs, mut outputs) = (0u64, 0u64);
    for (topic, key, payload) in records {
        outputs += replayer.push(&topic, &key, &payload)?.len() as u64;
        inputs += 1;
    }
    outputs += replayer.commit()?.len() as u64;
    Ok(BenchStats {
        inputs,
        outputs,
        wall_seconds: started.elapsed().as_secs_f64(),
        cpu: crate::cpu_time() - cpu_before,
    })
}

/// Trigger `i` of `count`, spread evenly over 30 days so caps, gaps and local day
/// boundaries all come into play.
fn trigger(i: u64, count: u64, customers: u64, start: i64, scenario: &str) -> Trigger {
    let customer = (i.wrapping_mul(2_654_435_761)) % customers;
    let step = 30 * 86_400_000 / count.max(1) as i64;
    let at = start + i as i64 * step;
    Trigger {
        merged_from: Vec::new(),
        trigger_id: format!("bench-t{i:012}"),
        scenario: scenario.into(),
        customer_id: format!("c-{customer:08}"),
        category: MessageCategory::trigger,
        step: 0,
        template: "abandoned_cart".into(),
        channels: vec![Channel::email, Channel::push, Channel::sms],
        priority: 60,
        fired_at: at,
        valid_until: at + 12 * 3_600_000,
        cause_event_id: Some(format!("e{i}")),
        cause_occurred_at: at,
        contacts: Contacts {
            email: Some(format!("c{customer}@example.com")),
            phone: None,
            push_token: Some(format!("tok-{customer}")),
            messenger_id: None,
            time_zone: Some(
                ["Europe/Berlin", "America/New_York", "Asia/Tokyo"][(customer % 3) as usize].into(),
            ),
            consented_channels: vec![Channel::email, Channel::push],
        },
        variables: r#"{"first_name":"Anna","cart_value":119.8}"#.into(),
    }
}

pub fn run_arbiter(
    config: &Config,
    count: u64,
    customers: u64,
    scenario: &str,
) -> anyhow::Result<BenchStats> {
    let config = std::sync::Arc::new(config.clone());
    let registry = prometheus::Registry::new();
    let processor = ArbiterProcessor::new(config.clone(), &registry);
    let mut replayer = Replayer::new(processor, &config, &registry)?;
    let topic = config.topic(kairos_core::config::topics::TRIGGERS);
    let start = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    let payloads: Vec<(String, Vec<u8>)> = (0..count)
        .map(|i| {
            let t = trigger(i, count, customers.max(1), start, scenario);
            let payload = serde_json::to_vec(&t).unwrap_or_default();
            (t.customer_id, payload)
        })
        .collect();
    // Encoded beforehand, so the measurement is the arbiter's work alone.
    drive(&mut replayer, &topic, payloads.into_iter())
}

/// The identity processor over the site, app and offline events of `input`.
pub fn run_identity(config: &Config, input: &std::path::Path) -> anyhow::Result<BenchStats> {
    let registry = prometheus::Registry::new();
    let processor = kairos_identity::IdentityProcessor::new(
        std::sync::Arc::new(config.clone()),
        kairos_core::encoding::SchemaRegistry::new(None),
        &registry,
    )?;
    let mut replayer = Replayer::new(processor, config, &registry)?;
    // Read and routed before the clock starts: the benchmark is the processor.
    let mut records = Vec::new();
    let mut topic_names = crate::replay::TopicNames::default();
    crate::input_lines::refuse_compressed(input)?;
    crate::input_lines::for_each_line(input, |n, line| {
        let route = std::str::from_utf8(line)
            .map_err(anyhow::Error::from)
            .and_then(crate::replay::route_line)
            .with_context(|| format!("{}:{n}", input.display()))?;
        records.push((
            topic_names.full(config, &route.topic).to_string(),
            route.key.as_bytes().to_vec(),
            route.payload.as_bytes().to_vec(),
        ));
        Ok(())
    })?;
    drive_records(&mut replayer, records.into_iter())
}
