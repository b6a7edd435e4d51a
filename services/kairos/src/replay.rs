//! `kairos replay`: the identity processor (when enabled), the profile processor (with
//! the catalog join) and the arbiter over
//! JSON-lines files, in event time, without Kafka: triggers, decisions and send
//! commands come out as they would on the topics. Same code as the services, so history can be
//! backtested and scenarios tried before they go live.
//!
//! Input lines are either a bare event (the topic is inferred: receipts carry
//! `receipt_id`, catalog updates `product_id` without `event_type`, everything else is a
//! site/app event) or an envelope `{"topic": "events.app", "key": "c-1", "value": {...}}`
//! (topic without the prefix). Every output record is written as such an envelope.

use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;
use kairos_core::config::{topics, Config};
use kairos_core::store::OutboxEntry;
use kairos_core::time::ClockMode;
use kairos_profile::pipeline::Pipeline;

pub struct ReplayStats {
    pub input_records: u64,
    pub output_records: u64,
}

/// One input record: topic (full name), key, payload.
pub type Input = (String, Vec<u8>, Vec<u8>);

/// The fields that route a line; everything else is skipped without being built.
#[derive(serde::Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    topic: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    key: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    value: Option<sonic_rs::LazyValue<'a>>,
    #[serde(borrow, default)]
    customer_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    anonymous_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    product_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    receipt_id: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    event_type: Option<serde::de::IgnoredAny>,
}

/// Works out the topic and key of an input line.
pub fn parse_line(config: &Config, line: &str) -> anyhow::Result<Input> {
    // sonic-rs skips the fields it does not need with SIMD; serde_json spent a twentieth
    // of the 20M-event replay here.
    let p: Probe<'_> = sonic_rs::from_str(line).context("not JSON")?;
    if let (Some(topic), Some(value)) = (&p.topic, &p.value) {
        let key = p.key.as_deref().unwrap_or_default();
        return Ok((
            config.topic(topic),
            key.as_bytes().to_vec(),
            value.as_raw_str().as_bytes().to_vec(),
        ));
    }
    let (topic, key) = if p.receipt_id.is_some() {
        (topics::OFFLINE_EVENTS, p.customer_id)
    } else if p.event_type.is_none() && p.product_id.is_some() {
        (topics::CATALOG, p.product_id)
    } else {
        (topics::SITE_EVENTS, p.customer_id.or(p.anonymous_id))
    };
    Ok((
        config.topic(topic),
        key.unwrap_or_default().as_bytes().to_vec(),
        line.as_bytes().to_vec(),
    ))
}

pub fn run(
    config: &Config,
    inputs: &[PathBuf],
    output: Option<PathBuf>,
    until: Option<i64>,
    with_arbiter: bool,
) -> anyhow::Result<ReplayStats> {
    let mut config = config.clone();
    config.clock.mode = ClockMode::Event;
    let mut pipeline = Pipeline::new(&config)?;
    if config.identity.enabled {
        let registry = prometheus::Registry::new();
        let identity = kairos_identity::IdentityProcessor::new(
            std::sync::Arc::new(config.clone()),
            kairos_core::encoding::SchemaRegistry::new(None),
            &registry,
        )?;
        pipeline.set_upstream(Box::new(kairos_core::replay::Replayer::new(
            identity, &config, &registry,
        )?));
    }
    if with_arbiter {
        let registry = prometheus::Registry::new();
        let config = std::sync::Arc::new(config.clone());
        let arbiter = kairos_arbiter::ArbiterProcessor::new(config.clone(), &registry);
        pipeline.add_stage(Box::new(kairos_core::replay::Replayer::new(
            arbiter, &config, &registry,
        )?));
    }
    let out: Box<dyn Write> = match &output {
        Some(p) => Box::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let mut stats = ReplayStats {
        input_records: 0,
        output_records: 0,
    };
    let prefix = config.kafka.topic_prefix.clone();
    let mut outputs = 0u64;
    let mut sink = |e: &OutboxEntry| -> anyhow::Result<()> {
        outputs += 1;
        // The payload is already JSON: frame it without parsing it again.
        out.write_all(b"{\"topic\":")?;
        serde_json::to_writer(&mut out, e.topic.strip_prefix(&prefix).unwrap_or(&e.topic))?;
        out.write_all(b",\"key\":")?;
        serde_json::to_writer(&mut out, &String::from_utf8_lossy(&e.key))?;
        out.write_all(b",\"value\":")?;
        out.write_all(&e.payload)?;
        out.write_all(b"}\n")?;
        Ok(())
    };
    for path in inputs {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let reader = std::io::BufReader::with_capacity(1 << 20, file);
        for (n, line) in reader.lines().enumerate() {
            let line =
                line.with_context(|| format!("{}:{}: cannot read", path.display(), n + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            // An unparsable line still goes in (as a site event) so it is dead-lettered
            // like on Kafka, with its reason.
            let (topic, key, payload) = parse_line(&config, &line).unwrap_or_else(|_| {
                (
                    config.topic(topics::SITE_EVENTS),
                    Vec::new(),
                    line.as_bytes().to_vec(),
                )
            });
            pipeline.push(&topic, &key, &payload, &mut sink)?;
            stats.input_records += 1;
        }
    }
    pipeline.commit(&mut sink)?;
    if let Some(t) = until {
        pipeline.advance_to(t, &mut sink)?;
    }
    out.flush()?;
    stats.output_records = outputs;
    Ok(stats)
}
