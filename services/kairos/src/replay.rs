//! `kairos replay`: the profile processor (with the catalog join) over JSON-lines files,
//! in event time, without Kafka. Same code as the services, so history can be
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

/// Works out the topic of a bare input line.
pub fn parse_line(config: &Config, line: &str) -> anyhow::Result<Input> {
    let v: serde_json::Value = serde_json::from_str(line).context("not JSON")?;
    if let (Some(topic), Some(value)) = (v.get("topic").and_then(|t| t.as_str()), v.get("value")) {
        let key = v.get("key").and_then(|k| k.as_str()).unwrap_or_default();
        return Ok((
            config.topic(topic),
            key.as_bytes().to_vec(),
            serde_json::to_vec(value)?,
        ));
    }
    let s = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let (topic, key) = if v.get("receipt_id").is_some() {
        (topics::OFFLINE_EVENTS, s("customer_id"))
    } else if v.get("event_type").is_none() && v.get("product_id").is_some() {
        (topics::CATALOG, s("product_id"))
    } else {
        let key = if v.get("customer_id").is_some_and(|c| !c.is_null()) {
            s("customer_id")
        } else {
            s("anonymous_id")
        };
        (topics::SITE_EVENTS, key)
    };
    Ok((
        config.topic(topic),
        key.into_bytes(),
        line.as_bytes().to_vec(),
    ))
}

pub fn run(
    config: &Config,
    inputs: &[PathBuf],
    output: Option<PathBuf>,
    until: Option<i64>,
) -> anyhow::Result<ReplayStats> {
    let mut config = config.clone();
    config.clock.mode = ClockMode::Event;
    let mut pipeline = Pipeline::new(&config)?;
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
        let value: serde_json::Value =
            serde_json::from_slice(&e.payload).unwrap_or(serde_json::Value::Null);
        let line = serde_json::json!({
            "topic": e.topic.strip_prefix(&prefix).unwrap_or(&e.topic),
            "key": String::from_utf8_lossy(&e.key),
            "value": value,
        });
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
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
    drop(sink);
    out.flush()?;
    stats.output_records = outputs;
    Ok(stats)
}
