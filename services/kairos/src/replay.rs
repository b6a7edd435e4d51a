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
use std::path::{Path, PathBuf};

use anyhow::Context;
use kairos_core::config::{topics, Config};
use kairos_core::contracts::profile_key;
use kairos_core::identifiers::is_placeholder_id;
use kairos_core::store::OutboxEntry;
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

/// The fields that route a line; everything else is skipped without being built. A
/// field of another type than a string (a numeric product id) routes as present and
/// keys nothing: the topic's own decoding dead-letters the line with the right reason.
#[derive(serde::Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    key: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    value: Option<sonic_rs::LazyValue<'a>>,
    #[serde(borrow, default, deserialize_with = "text")]
    customer_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    anonymous_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    device_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    loyalty_card: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    phone: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    product_id: Option<Cow<'a, str>>,
    #[serde(default)]
    receipt_id: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    event_type: Option<serde::de::IgnoredAny>,
}

/// A routing field's text; any other value is "" (present, keying nothing).
fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    struct Text;
    impl<'de> serde::de::Visitor<'de> for Text {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_string())))
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed("")))
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed("")))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed("")))
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed("")))
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(Some(Cow::Borrowed("")))
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            while a
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {}
            Ok(Some(Cow::Borrowed("")))
        }
    }
    d.deserialize_any(Text)
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
    // Events and receipts are keyed by the profile they go to, as the things that
    // come back to it (price drops, outcomes) are: keyed by the bare anonymous id, a
    // visitor's profile would sit on another partition than its price drops.
    // As decoding takes a placeholder id off the event or receipt (a guest's "0").
    let customer = (p.customer_id.as_deref()).filter(|v| !is_placeholder_id(v));
    let (topic, key) = if p.receipt_id.is_some() {
        let others = [
            ("card:", p.loyalty_card.as_deref()),
            ("phone:", p.phone.as_deref()),
        ];
        let key = profile_key(customer, others).map(Cow::Owned);
        (topics::OFFLINE_EVENTS, key)
    } else if p.event_type.is_none() && p.product_id.is_some() {
        (topics::CATALOG, p.product_id)
    } else {
        // As decoding takes a placeholder id off the event (the key the profile uses).
        let others = [
            (
                "anon:",
                (p.anonymous_id.as_deref()).filter(|v| !is_placeholder_id(v)),
            ),
            (
                "device:",
                (p.device_id.as_deref()).filter(|v| !is_placeholder_id(v)),
            ),
        ];
        let key = profile_key(customer, others).map(Cow::Owned);
        (topics::SITE_EVENTS, key)
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

/// Feeds the lines of several files to `each` in event-time order, as the topics
/// would deliver per-source exports of one period: each file is read in its own order,
/// and the line that goes next is the earliest of the files' next lines (ties to the
/// file named first). A line whose time cannot be read goes as soon as it is its
/// file's next (it is dead-lettered with its reason anyway).
fn merged_lines(
    paths: &[PathBuf],
    mut each: impl FnMut(&Path, usize, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    struct Next {
        reader: std::io::BufReader<std::fs::File>,
        line: Vec<u8>,
        number: usize,
        at: Option<i64>,
        done: bool,
    }
    impl Next {
        fn advance(&mut self, path: &Path) -> anyhow::Result<()> {
            use std::io::BufRead;
            self.line.clear();
            let read = (self.reader.read_until(b'\n', &mut self.line))
                .with_context(|| format!("cannot read {}", path.display()))?;
            self.done = read == 0;
            self.number += 1;
            while self.line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                self.line.pop();
            }
            if self.number == 1 {
                let mark =
                    self.line.len() - crate::input_lines::without_byte_order_mark(&self.line).len();
                self.line.drain(..mark);
            }
            self.at = line_time(&self.line);
            Ok(())
        }
    }
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut next = Next {
            reader: std::io::BufReader::with_capacity(1 << 20, file),
            line: Vec::new(),
            number: 0,
            at: None,
            done: false,
        };
        next.advance(path)?;
        files.push(next);
    }
    loop {
        let earliest = (files.iter().enumerate())
            .filter(|(_, f)| !f.done)
            .min_by_key(|(i, f)| (f.at.unwrap_or(i64::MIN), *i))
            .map(|(i, _)| i);
        let Some(i) = earliest else {
            return Ok(());
        };
        let file = &mut files[i];
        each(&paths[i], file.number, &file.line)?;
        file.advance(&paths[i])?;
    }
}

/// Refuses an `output` that is one of the `inputs` (the same file by any path):
/// created before the inputs are read, it would empty the input and replay nothing.
fn refuse_an_input_as_output(output: &Path, inputs: &[PathBuf]) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(out) = std::fs::metadata(output) else {
        return Ok(()); // a new file is no input
    };
    for input in inputs {
        let same =
            std::fs::metadata(input).is_ok_and(|i| i.dev() == out.dev() && i.ino() == out.ino());
        anyhow::ensure!(
            !same,
            "the output {} is the input {}: it would be emptied before it is read",
            output.display(),
            input.display()
        );
    }
    Ok(())
}

/// The event time of an input line: its `occurred_at` (a trigger's `fired_at`), or its
/// envelope value's.
fn line_time(line: &[u8]) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct At {
        #[serde(default, deserialize_with = "optional_millis")]
        occurred_at: Option<i64>,
        #[serde(default, deserialize_with = "optional_millis")]
        fired_at: Option<i64>,
    }
    impl At {
        fn time(&self) -> Option<i64> {
            self.occurred_at.or(self.fired_at)
        }
    }
    fn optional_millis<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        kairos_core::time::deserialize_millis(d).map(Some)
    }
    #[derive(serde::Deserialize)]
    struct Envelope {
        value: At,
    }
    sonic_rs::from_slice::<At>(line)
        .ok()
        .and_then(|a| a.time())
        .or_else(|| {
            sonic_rs::from_slice::<Envelope>(line)
                .ok()
                .and_then(|e| e.value.time())
        })
}

pub fn run(
    config: &Config,
    inputs: &[PathBuf],
    output: Option<PathBuf>,
    until: Option<i64>,
    with_arbiter: bool,
) -> anyhow::Result<ReplayStats> {
    let config = config.in_event_time()?;
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
    for input in inputs {
        crate::input_lines::refuse_compressed(input)?;
    }
    // Written beside the output and renamed when whole: a failed or interrupted run
    // leaves no truncated result that looks like a finished one.
    let partial = output.as_ref().map(|p| {
        let mut partial = p.as_os_str().to_owned();
        partial.push(".partial");
        PathBuf::from(partial)
    });
    for p in output.iter().chain(&partial) {
        refuse_an_input_as_output(p, inputs)?;
    }
    let result = replay_into(&config, pipeline, inputs, partial.as_deref(), until);
    match (&result, &partial, &output) {
        (Ok(_), Some(partial), Some(output)) => {
            std::fs::rename(partial, output).with_context(|| {
                format!(
                    "cannot rename {} to {}",
                    partial.display(),
                    output.display()
                )
            })?
        }
        (Err(_), Some(partial), _) => {
            let _ = std::fs::remove_file(partial);
        }
        _ => {}
    }
    result
}

/// Replays `inputs` through `pipeline`, writing its outputs to `partial` (standard
/// output if `None`).
fn replay_into(
    config: &Config,
    mut pipeline: Pipeline,
    inputs: &[PathBuf],
    partial: Option<&Path>,
    until: Option<i64>,
) -> anyhow::Result<ReplayStats> {
    let out: Box<dyn Write> = match partial {
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
    let writing = partial.map_or_else(
        || "standard output".to_string(),
        |p| p.display().to_string(),
    );
    let mut sink = |e: &OutboxEntry| -> anyhow::Result<()> {
        outputs += 1;
        // The payload is already JSON: frame it without parsing it again.
        let mut write = || -> std::io::Result<()> {
            out.write_all(b"{\"topic\":")?;
            serde_json::to_writer(&mut out, e.topic.strip_prefix(&prefix).unwrap_or(&e.topic))?;
            out.write_all(b",\"key\":")?;
            serde_json::to_writer(&mut out, &String::from_utf8_lossy(&e.key))?;
            out.write_all(b",\"value\":")?;
            out.write_all(&e.payload)?;
            out.write_all(b"}\n")
        };
        write().with_context(|| format!("cannot write {writing}"))
    };
    let mut topic_names = TopicNames::default();
    let site_events = config.topic(topics::SITE_EVENTS);
    let mut each_line = |line: &[u8]| -> anyhow::Result<()> {
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
                let topic = topic_names.full(config, &route.topic);
                if !pipeline.consumes(topic) {
                    anyhow::bail!(
                        "no stage of the replay reads topic {:?} (an envelope's topic is \
                         named without the prefix {:?}: events.site, events.app, \
                         events.offline, catalog, outcomes...)",
                        route.topic,
                        config.kafka.topic_prefix
                    );
                }
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
    };
    // Whatever stops the replay (a line no stage reads, a processor's error, a full
    // disk) names the input line it stopped at.
    let mut each = |path: &Path, n: usize, line: &[u8]| {
        each_line(line).with_context(|| format!("{}:{n}", path.display()))
    };
    match inputs {
        [one] => for_each_line(one, |n, line| each(one, n, line))?,
        several => merged_lines(several, each)?,
    }
    pipeline.commit(&mut sink)?;
    if let Some(t) = until {
        pipeline.advance_to(t, &mut sink)?;
        // What a stage was handed after its own move (an arbiter's action to itself)
        // is committed too, and the timers it set that fall due by `t` fire.
        pipeline.commit(&mut sink)?;
    }
    out.flush()
        .with_context(|| format!("cannot write {writing}"))?;
    drop(out);
    stats.output_records = outputs;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files are merged by their lines' times, a trigger's `fired_at` among them
    /// (without it, every trigger went ahead of every event); a line with no time
    /// goes as soon as it is its file's next.
    #[test]
    fn several_files_are_merged_by_every_line_s_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let triggers = dir.path().join("triggers.jsonl");
        let events = dir.path().join("events.jsonl");
        std::fs::write(
            &triggers,
            "{\"topic\":\"triggers\",\"key\":\"c\",\"value\":{\"fired_at\":\"2026-01-05T09:00:02Z\"}}\n\
             not json\n\
             {\"topic\":\"triggers\",\"key\":\"c\",\"value\":{\"fired_at\":\"2026-01-05T09:00:04Z\"}}\n",
        )
        .expect("write");
        std::fs::write(
            &events,
            "{\"occurred_at\":\"2026-01-05T09:00:01Z\"}\n{\"occurred_at\":\"2026-01-05T09:00:03Z\"}\n{\"occurred_at\":\"2026-01-05T09:00:05Z\"}\n",
        )
        .expect("write");
        let mut order = Vec::new();
        merged_lines(&[triggers.clone(), events.clone()], |path, n, _| {
            order.push((path == triggers.as_path(), n));
            Ok(())
        })
        .expect("merge");
        let (t, e) = (true, false);
        assert_eq!(
            order,
            [(e, 1), (t, 1), (t, 2), (e, 2), (t, 3), (e, 3)],
            "(from the triggers file, line)"
        );
    }

    /// Bare events and receipts are keyed by the profile they go to, as the price
    /// drops and outcomes that come back to it are.
    #[test]
    fn bare_lines_are_keyed_by_the_profile_they_go_to() {
        let key = |line: &str| route_line(line).expect("routes").key.into_owned();
        let site = r#"{"event_id":"e","event_type":"page_view","occurred_at":1"#;
        assert_eq!(
            key(&format!(
                r#"{site},"customer_id":"c-1","anonymous_id":"a"}}"#
            )),
            "c-1"
        );
        assert_eq!(
            key(&format!(r#"{site},"customer_id":"","anonymous_id":"a"}}"#)),
            "anon:a"
        );
        assert_eq!(key(&format!(r#"{site},"device_id":"d"}}"#)), "device:d");
        assert_eq!(
            key(&format!(
                r#"{site},"anonymous_id":"undefined","device_id":"d"}}"#
            )),
            "device:d",
            "a placeholder id is no key"
        );
        assert_eq!(
            key(&format!(r#"{site},"customer_id":"0","anonymous_id":"a"}}"#)),
            "anon:a",
            "a guest's placeholder customer id is no key"
        );
        let receipt = r#"{"receipt_id":"r","event_id":"e","occurred_at":1"#;
        assert_eq!(
            key(&format!(r#"{receipt},"loyalty_card":"LC1","phone":"1"}}"#)),
            "card:LC1"
        );
        assert_eq!(
            key(&format!(
                r#"{receipt},"customer_id":" ","loyalty_card":" LC1 "}}"#
            )),
            "card:LC1",
            "trimmed, a blank id absent"
        );
        assert_eq!(
            key(&format!(r#"{receipt},"phone":"0151 1"}}"#)),
            "phone:0151 1"
        );
        assert_eq!(
            key(&format!(
                r#"{receipt},"customer_id":"unknown","phone":"0151 1"}}"#
            )),
            "phone:0151 1",
            "a walk-in's placeholder customer id is no key"
        );
        assert_eq!(
            key(&format!(
                r#"{receipt},"customer_id":"c-2","loyalty_card":"LC1"}}"#
            )),
            "c-2"
        );
        let envelope = r#"{"topic":"events.site","key":"k","value":{"anonymous_id":"a"}}"#;
        assert_eq!(key(envelope), "k", "an envelope's key is taken as written");
    }

    /// A routing field of another type still routes the line to its topic, whose
    /// decoding names the field in the dead letter.
    #[test]
    fn a_routing_field_of_another_type_still_routes_to_its_topic() {
        let route = |line: &str| {
            let r = route_line(line).expect("routed");
            (r.topic.into_owned(), r.key.into_owned())
        };
        let catalog = r#"{"event_id":"u1","occurred_at":1,"product_id":10042,"price":9.9}"#;
        assert_eq!(route(catalog), (topics::CATALOG.to_string(), String::new()));
        let site = r#"{"event_id":"e1","event_type":"page_view","occurred_at":1,"customer_id":7,"anonymous_id":"a1"}"#;
        assert_eq!(
            route(site),
            (topics::SITE_EVENTS.to_string(), "anon:a1".to_string())
        );
        let nested =
            r#"{"event_id":"e1","event_type":"page_view","customer_id":{"id":"c"},"phone":null}"#;
        assert_eq!(route(nested).0, topics::SITE_EVENTS);
    }
}
