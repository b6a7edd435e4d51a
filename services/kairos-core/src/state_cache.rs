//! A write-back cache of a processor's hot state values, per partition.
//!
//! Reading and decoding a value from RocksDB and writing it back on every record is
//! what bounds a stateful processor (Kafka Streams and Flink both keep hot state in
//! memory for this reason). Values here are read once, changed in memory, and written
//! only when the batch commits: [`StateCache::flush`] runs in
//! [`crate::runtime::Processor::flush`], so the values commit in the same atomic write
//! as the input offsets that produced them, and a crash loses nothing committed.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::runtime::Ctx;

struct PartitionCache<T> {
    values: HashMap<String, T>,
    /// Keys changed since the last flush (may repeat).
    dirty: Vec<String>,
}

impl<T> Default for PartitionCache<T> {
    fn default() -> Self {
        PartitionCache {
            values: HashMap::new(),
            dirty: Vec::new(),
        }
    }
}

pub struct StateCache<T> {
    partitions: HashMap<i32, PartitionCache<T>>,
    /// Entries kept per partition after a flush.
    limit: usize,
}

impl<T: Serialize + DeserializeOwned> StateCache<T> {
    /// A cache of about `entries` values over `partitions` partitions.
    pub fn new(entries: usize, partitions: i32) -> Self {
        StateCache {
            partitions: HashMap::new(),
            limit: (entries / partitions.max(1) as usize).max(64),
        }
    }

    /// Takes the value under `key` out of the cache (or reads it from the store) to
    /// change it. The caller must [`put`](Self::put) it back on every path: a taken
    /// value that was changed and not put back is lost.
    pub fn take(&mut self, ctx: &Ctx<'_>, key: &str) -> anyhow::Result<Option<T>> {
        if let Some(v) = self
            .partitions
            .get_mut(&ctx.partition)
            .and_then(|c| c.values.remove(key))
        {
            return Ok(Some(v));
        }
        ctx.get(key)
    }

    /// A copy of the value under `key`, which stays cached: for callers with paths
    /// that do not write the value back.
    pub fn get(&mut self, ctx: &Ctx<'_>, key: &str) -> anyhow::Result<Option<T>>
    where
        T: Clone,
    {
        let cache = self.partitions.entry(ctx.partition).or_default();
        if let Some(v) = cache.values.get(key) {
            return Ok(Some(v.clone()));
        }
        let loaded: Option<T> = ctx.get(key)?;
        if let Some(v) = &loaded {
            cache.values.insert(key.to_string(), v.clone());
        }
        Ok(loaded)
    }

    /// Stores a changed value; it is written at the next flush.
    pub fn put(&mut self, partition: i32, key: String, value: T) {
        let cache = self.partitions.entry(partition).or_default();
        cache.dirty.push(key.clone());
        cache.values.insert(key, value);
    }

    /// Writes the partition's changed values into the batch about to commit, then
    /// trims the cache to its limit.
    pub fn flush(&mut self, ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
        let limit = self.limit;
        let Some(cache) = self.partitions.get_mut(&ctx.partition) else {
            return Ok(());
        };
        let mut dirty = std::mem::take(&mut cache.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for key in &dirty {
            if let Some(v) = cache.values.get(key) {
                ctx.put(key, v)?;
            }
        }
        // Everything is clean now, so dropping entries loses nothing. Dropping about
        // half keeps a warm cache without tracking recency.
        if cache.values.len() > limit {
            let mut keep = false;
            cache.values.retain(|_, _| {
                keep = !keep;
                keep
            });
        }
        Ok(())
    }

    /// The partition moved away (or the batch failed): forget its values.
    pub fn close(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// Values cached for `partition` (for tests and gauges).
    pub fn len(&self, partition: i32) -> usize {
        self.partitions
            .get(&partition)
            .map_or(0, |c| c.values.len())
    }
}
