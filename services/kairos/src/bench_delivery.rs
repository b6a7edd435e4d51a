//! `kairos bench-delivery`: one channel's delivery worker with the simulator, in
//! process on RocksDB, fed generated send commands: template rendering, the send-id
//! record, outcomes and the engagement timers, as the worker does them, minus Kafka.

use std::time::Instant;

use anyhow::Context;
use kairos_core::config::{Config, ProviderKind};
use kairos_core::contracts::{Channel, MessageCategory, SendCommand};
use kairos_core::replay::Replayer;
use kairos_delivery::DeliveryProcessor;

pub struct BenchStats {
    pub sends: u64,
    pub outputs: u64,
    pub wall_seconds: f64,
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
    let processor = DeliveryProcessor::new(&config, channel, settings, &registry, None)?;
    let mut replayer = Replayer::new(processor, &config, &registry)?;
    let topic = config.send_topic(channel);
    let now = kairos_core::time::wall_now();
    let started = Instant::now();
    let mut outputs = 0u64;
    for i in 0..count {
        let cmd = command(i, channel, now);
        let payload = serde_json::to_vec(&cmd)?;
        outputs += replayer
            .push(&topic, cmd.customer_id.as_bytes(), &payload)?
            .len() as u64;
    }
    outputs += replayer.commit()?.len() as u64;
    Ok(BenchStats {
        sends: count,
        outputs,
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}
