//! The profile processor and the catalog join wired together in one process, as they
//! are over Kafka, optionally with further stages behind them (the arbiter): for
//! `kairos replay`, the event-time tests and the benchmarks.

use std::collections::VecDeque;
use std::sync::Arc;

use kairos_core::config::{topics, Config};
use kairos_core::encoding::SchemaRegistry;
use kairos_core::replay::{Replayer, Stage};
use kairos_core::store::OutboxEntry;

use crate::catalog::CatalogJoin;
use crate::{ProfileInput, ProfileProcessor};

/// Profile processor and catalog join wired together as on Kafka.
pub struct Pipeline {
    profile: Replayer<ProfileProcessor>,
    catalog: Replayer<CatalogJoin>,
    catalog_topic: String,
    interest_topic: String,
    /// The profile's schema registry, for events decoded before they are pushed.
    schema_registry: SchemaRegistry,
    /// The profile's currency conversion, for the same.
    currencies: kairos_core::input::Currencies,
    /// A stage in front of the profile (identity resolution): raw events go to it.
    upstream: Option<Box<dyn Stage>>,
    /// Stages fed with the outputs of the profile (and of each other).
    downstream: Vec<Box<dyn Stage>>,
    /// The profile processor's metrics (triggers, skips, duplicates...).
    registry: prometheus::Registry,
}

impl Pipeline {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        let schema_registry = SchemaRegistry::new(None);
        let config_arc = Arc::new(config.clone());
        let profile = Replayer::new(
            ProfileProcessor::new(config_arc.clone(), schema_registry.clone(), &registry),
            config,
            &registry,
        )?;
        let catalog_registry = prometheus::Registry::new();
        let catalog = Replayer::new(
            CatalogJoin::new(config, schema_registry.clone(), &catalog_registry),
            config,
            &catalog_registry,
        )?;
        Ok(Pipeline {
            profile,
            catalog,
            catalog_topic: config.topic(topics::CATALOG),
            interest_topic: config.topic(topics::PRODUCT_INTEREST),
            schema_registry,
            currencies: kairos_core::input::Currencies::new(&config.profile),
            upstream: None,
            downstream: Vec::new(),
            registry,
        })
    }

    /// Puts a stage in front of the profile: the records it consumes go to it first,
    /// and the profile reads what it emits (the identity processor).
    pub fn set_upstream(&mut self, stage: Box<dyn Stage>) {
        self.upstream = Some(stage);
    }

    /// Adds a stage that consumes what the profile (or an earlier stage) emits.
    pub fn add_stage(&mut self, stage: Box<dyn Stage>) {
        self.downstream.push(stage);
    }

    /// Whether some stage reads `topic` (a full topic name).
    pub fn consumes(&self, topic: &str) -> bool {
        topic == self.catalog_topic
            || topic == self.interest_topic
            || self.upstream.as_ref().is_some_and(|u| u.consumes(topic))
            || self.profile.consumes(topic)
            || self.downstream.iter().any(|s| s.consumes(topic))
    }

    /// Feeds one record and everything it causes; `sink` sees every output.
    pub fn push(
        &mut self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        sink: &mut dyn FnMut(&OutboxEntry) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let first = if topic == self.catalog_topic || topic == self.interest_topic {
            self.catalog.push(topic, key, payload)?
        } else if let Some(upstream) = self.upstream.as_mut().filter(|u| u.consumes(topic)) {
            let mut out = upstream.push(topic, key, payload)?;
            // Every consumer of a topic reads it (customer-actions: the identity
            // processor and the arbiter).
            self.push_downstream(topic, key, payload, &mut out)?;
            out
        } else if Stage::consumes(&self.profile, topic) {
            self.push_to_profile(topic, key, payload, None)?
        } else {
            // A later stage's own input (triggers for the arbiter): the profile
            // never reads it on Kafka, so it must not here (it would dead-letter it).
            let mut out = Vec::new();
            self.push_downstream(topic, key, payload, &mut out)?;
            out
        };
        self.route(first, sink)
    }

    /// A record for the profile (already `decoded` by the profile's decoding, or not)
    /// and every later stage that reads its topic; returns what they emitted.
    fn push_to_profile(
        &mut self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        decoded: Option<ProfileInput>,
    ) -> anyhow::Result<Vec<OutboxEntry>> {
        let mut out = self.profile.push_decoded(topic, key, payload, decoded)?;
        // Every consumer of a topic reads it (outcomes: the profile and the arbiter).
        self.push_downstream(topic, key, payload, &mut out)?;
        Ok(out)
    }

    /// Feeds a record to every later stage that reads its topic, adding what they
    /// emitted to `out`.
    fn push_downstream(
        &mut self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        out: &mut Vec<OutboxEntry>,
    ) -> anyhow::Result<()> {
        for stage in &mut self.downstream {
            if stage.consumes(topic) {
                out.extend(stage.push(topic, key, payload)?);
            }
        }
        Ok(())
    }

    /// Feeds a bare JSON line that `kairos replay` would route to `site_topic` (keyed
    /// by its `customer_id`, else its `anonymous_id`), decoding it once: the replay
    /// otherwise parses every line to find its topic and key, then the profile parses
    /// it again. Returns false, having done nothing, for a line this cannot take: one
    /// that might be an envelope or a receipt (it names `topic` or `receipt_id`
    /// anywhere), one that does not name `event_type`, one that is not a valid site
    /// event (it goes the usual way, to be dead-lettered with its reason), or any line
    /// when a stage (identity) comes before the profile.
    pub fn push_site_event_line(
        &mut self,
        site_topic: &str,
        line: &[u8],
        sink: &mut dyn FnMut(&OutboxEntry) -> anyhow::Result<()>,
    ) -> anyhow::Result<bool> {
        let names = |name: &[u8]| memchr::memmem::find(line, name).is_some();
        // Without `event_type` it is not a site event (a catalog update, say): not
        // worth a decode that fails, with its error built for the dead-letter reason.
        if self.upstream.is_some()
            || names(b"\"topic\"")
            || names(b"\"receipt_id\"")
            || !names(b"\"event_type\"")
        {
            return Ok(false);
        }
        // The profile's decoding, currencies converted; a line it refuses goes the
        // usual way, to be dead-lettered.
        let decoded = kairos_core::input::decode_customer_event(
            line,
            &self.schema_registry,
            &self.currencies,
        );
        let Ok(event) = decoded else {
            return Ok(false);
        };
        // The profile's own key, as `route_line`'s: what comes back to it (price
        // drops, outcomes) is keyed by it.
        let key = event.customer_key().unwrap_or_default();
        let decoded = Some(ProfileInput::Event(
            Box::new(event),
            kairos_core::input::Source::Site,
        ));
        let out = self.push_to_profile(site_topic, key.as_bytes(), line, decoded)?;
        self.route(out, sink)?;
        Ok(true)
    }

    /// The profile processor's metrics (for tests and tools).
    pub fn profile_metrics(&self) -> &prometheus::Registry {
        &self.registry
    }

    /// A customer's committed profile (for tests and tools): commit first.
    pub fn profile(
        &self,
        customer_id: &str,
    ) -> anyhow::Result<Option<crate::profile::CustomerProfile>> {
        let partition = kairos_core::replay::partition_for(
            customer_id.as_bytes(),
            self.profile.engine.owned().len() as i32,
        );
        let Some(store) = self.profile.engine.store(partition) else {
            return Ok(None);
        };
        let key = format!("c/{customer_id}");
        match store.get(&kairos_core::store::Pending::default(), key.as_bytes())? {
            Some(bytes) => Ok(Some(kairos_core::encoding::decode_state(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Keys of the profile's committed state under `prefix`, every partition (for tests
    /// and tools): commit first.
    pub fn profile_state_keys(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut keys = Vec::new();
        for partition in self.profile.engine.owned() {
            if let Some(store) = self.profile.engine.store(partition) {
                for (key, _) in store.scan_state(prefix.as_bytes())? {
                    keys.push(String::from_utf8_lossy(&key).into_owned());
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    fn route(
        &mut self,
        first: Vec<OutboxEntry>,
        sink: &mut dyn FnMut(&OutboxEntry) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        // Breadth first: all of `first` in order, then what they caused, in order.
        // `first` is read in place; only what it causes is queued.
        let mut first = first.into_iter();
        let mut queue: VecDeque<OutboxEntry> = VecDeque::new();
        while let Some(e) = first.next().or_else(|| queue.pop_front()) {
            sink(&e)?;
            if e.changelog {
                continue;
            }
            // The join's interest, and catalog updates it sent on to their product's
            // partition (read under another key), go back to it.
            if e.topic == self.interest_topic || e.topic == self.catalog_topic {
                queue.extend(self.catalog.push(&e.topic, &e.key, &e.payload)?);
            } else if Stage::consumes(&self.profile, &e.topic) {
                queue.extend(self.profile.push(&e.topic, &e.key, &e.payload)?);
            }
            // The identity processor reads what the profile forgot.
            if let Some(upstream) = self.upstream.as_mut().filter(|u| u.consumes(&e.topic)) {
                queue.extend(upstream.push(&e.topic, &e.key, &e.payload)?);
            }
            for stage in &mut self.downstream {
                if stage.consumes(&e.topic) {
                    queue.extend(stage.push(&e.topic, &e.key, &e.payload)?);
                }
            }
        }
        Ok(())
    }

    /// Commits and fires due timers.
    pub fn commit(
        &mut self,
        sink: &mut dyn FnMut(&OutboxEntry) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        // Outputs routed in one round may leave work pending in the next stage.
        for _ in 0..3 + self.downstream.len() {
            let mut out = match self.upstream.as_mut() {
                Some(u) => u.commit()?,
                None => Vec::new(),
            };
            out.extend(self.catalog.commit()?);
            out.extend(self.profile.commit()?);
            for stage in &mut self.downstream {
                out.extend(stage.commit()?);
            }
            self.route(out, sink)?;
        }
        Ok(())
    }

    /// Moves event time to `t` on every partition (a heartbeat).
    pub fn advance_to(
        &mut self,
        t: i64,
        sink: &mut dyn FnMut(&OutboxEntry) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut out = match self.upstream.as_mut() {
            Some(u) => u.advance_to(t)?,
            None => Vec::new(),
        };
        out.extend(self.catalog.advance_to(t)?);
        out.extend(self.profile.advance_to(t)?);
        self.route(out, sink)?;
        // Later stages see the time move after what the earlier ones emitted on the way.
        for i in 0..self.downstream.len() {
            let out = self.downstream[i].advance_to(t)?;
            self.route(out, sink)?;
        }
        Ok(())
    }
}
