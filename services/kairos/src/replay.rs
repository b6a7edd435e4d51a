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

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;
use kairos_core::config::{topics, Config};
use kairos_core::store::OutboxEntry;
use kairos_core::time::ClockMode;
use kairos_profile::pipeline::Pipeline;

use crate::input_lines::for_each_line;

pub struct ReplayStats {
    pub input_records: u64,
    pub output_records: u64,
}

/// Where an input line goes, borrowed from the line where it can be.
pub struct Route<'a> {
    /// The topic's name without the configured prefix.
    pub topic: Cow<'a, str>,
    pub key: Cow<'a, str>,
    pub payload: Cow<'a, str>,
}

/// The fields that route a line; everything else is skipped without being built.
#[derive(serde::Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    key: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    value: Option<sonic_rs::LazyValue<'a>>,
    #[serde(borrow, default)]
    customer_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    anonymous_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    product_id: Option<Cow<'a, str>>,
    #[serde(default)]
    receipt_id: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    event_type: Option<serde::de::IgnoredAny>,
}

/// Works out the topic and key of an input line.
pub fn route_line(line: &str) -> anyhow::Result<Route<'_>> {
    // sonic-rs skips the fields it does not need with SIMD; serde_json spent a twentieth
    // of the 20M-event replay here.
    let p: Probe<'_> = sonic_rs::from_str(line).context("not JSON")?;
    if let (Some(topic), Some(value)) = (p.topic, &p.value) {
        return Ok(Route {
            topic,
            key: p.key.unwrap_or_default(),
            payload: value.as_raw_cow(),
        });
    }
    let (topic, key) = if p.receipt_id.is_some() {
        (topics::OFFLINE_EVENTS, p.customer_id)
    } else if p.event_type.is_none() && p.product_id.is_some() {
        (topics::CATALOG, p.product_id)
    } else {
        (topics::SITE_EVENTS, p.customer_id.or(p.anonymous_id))
    };
    Ok(Route {
        topic: Cow::Borrowed(topic),
        key: key.unwrap_or_default(),
        payload: Cow::Borrowed(line),
    })
}

/// Full topic names by their unprefixed names, built once each.
#[derive(Default)]
pub struct TopicNames(HashMap<String, String>);

impl TopicNames {
    pub fn full(&mut self, config: &Config, name: &str) -> &str {
        if !self.0.contains_key(name) {
            self.0.insert(name.to_string(), config.topic(name));
        }
        &self.0[name]
    }
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
    let mut topic_names = TopicNames::default();
    let site_events = config.topic(topics::SITE_EVENTS);
    for path in inputs {
        for_each_line(path, |_, line| {
            if line.trim_ascii().is_empty() {
                return Ok(());
            }
            if pipeline.push_site_event_line(&site_events, line, &mut sink)? {
                stats.input_records += 1;
                return Ok(());
            }
            // An unparsable line (not UTF-8, not JSON) still goes in, as a site event,
            // so it is dead-lettered like on Kafka, with its reason.
            match std::str::from_utf8(line)
                .map_err(anyhow::Error::from)
                .and_then(route_line)
            {
                Ok(route) => {
                    let topic = topic_names.full(&config, &route.topic);
                    pipeline.push(
                        topic,
                        route.key.as_bytes(),
                        route.payload.as_bytes(),
                        &mut sink,
                    )?;
                }
                Err(_) => pipeline.push(&site_events, &[], line, &mut sink)?,
            }
            stats.input_records += 1;
            Ok(())
        })?;
    }
    pipeline.commit(&mut sink)?;
    if let Some(t) = until {
        pipeline.advance_to(t, &mut sink)?;
    }
    out.flush()?;
    stats.output_records = outputs;
    Ok(stats)
}
