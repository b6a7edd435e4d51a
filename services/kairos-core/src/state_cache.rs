//! A write-back cache of a processor's hot state values, per partition.
//!
//! Reading and decoding a value from RocksDB and writing it back on every record is
//! what bounds a stateful processor (Kafka Streams and Flink both keep hot state in
//! memory for this reason). Values here are read once, changed in memory, and written
//! only when the batch commits: [`StateCache::flush`] runs in
//! [`crate::runtime::Processor::flush`], so the values commit in the same atomic write
//! as the input offsets that produced them, and a crash loses nothing committed.

use foldhash::HashMap;
use foldhash::HashMapExt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::runtime::Ctx;

/// A cached value and whether it changed since the last flush. `value` is `None`
/// while a caller has it taken out: the slot stays, so putting it back costs no new
/// key and no second entry in the dirty list. Values are boxed: profiles and ledgers
/// are hundreds of bytes, and a table of them inline made every growth of the table
/// move (and fault in) gigabytes at a million customers.
struct Slot<T> {
    value: Option<Box<T>>,
    dirty: bool,
}

struct PartitionCache<T> {
    values: HashMap<String, Slot<T>>,
    /// Keys changed since the last flush, each once.
    dirty: Vec<String>,
}

impl<T> PartitionCache<T> {
    /// Sized for `limit` values up front, so the table does not grow while it fills.
    fn with_capacity(limit: usize) -> Self {
        PartitionCache {
            values: HashMap::with_capacity(limit),
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
    /// change it. The caller must [`put`](Self::put) it back on every path (or
    /// [`restore`](Self::restore) it if unchanged): a taken value that was changed and
    /// not put back is lost.
    pub fn take(&mut self, ctx: &Ctx<'_>, key: &str) -> anyhow::Result<Option<Box<T>>> {
        if let Some(v) = self
            .partitions
            .get_mut(&ctx.partition)
            .and_then(|c| c.values.get_mut(key))
            .and_then(|slot| slot.value.take())
        {
            return Ok(Some(v));
        }
        Ok(ctx.get(key)?.map(Box::new))
    }

    /// Puts back a value [`take`](Self::take)n out and left unchanged: it stays cached
    /// without being written again (unless a change before the take is still to be
    /// written).
    pub fn restore(&mut self, partition: i32, key: String, value: Box<T>) {
        self.cache(partition)
            .values
            .entry(key)
            .or_insert(Slot {
                value: None,
                dirty: false,
            })
            .value = Some(value);
    }

    fn cache(&mut self, partition: i32) -> &mut PartitionCache<T> {
        let limit = self.limit;
        self.partitions
            .entry(partition)
            .or_insert_with(|| PartitionCache::with_capacity(limit))
    }

    /// Stores a changed value (boxed or not); it is written at the next flush.
    pub fn put(&mut self, partition: i32, key: String, value: impl Into<Box<T>>) {
        let value = value.into();
        let cache = self.cache(partition);
        match cache.values.get_mut(&key) {
            Some(slot) => {
                slot.value = Some(value);
                if !slot.dirty {
                    slot.dirty = true;
                    cache.dirty.push(key);
                }
            }
            None => {
                cache.dirty.push(key.clone());
                cache.values.insert(
                    key,
                    Slot {
                        value: Some(value),
                        dirty: true,
                    },
                );
            }
        }
    }

    /// Writes the partition's changed values into the batch about to commit, then
    /// trims the cache to its limit.
    pub fn flush(&mut self, ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
        let limit = self.limit;
        let Some(cache) = self.partitions.get_mut(&ctx.partition) else {
            return Ok(());
        };
        for key in std::mem::take(&mut cache.dirty) {
            if let Some(slot) = cache.values.get_mut(&key) {
                slot.dirty = false;
                if let Some(v) = &slot.value {
                    ctx.put(&key, v)?;
                }
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
        self.partitions.get(&partition).map_or(0, |c| {
            c.values.values().filter(|s| s.value.is_some()).count()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::encoding::{decode_state, Rejection};
    use crate::replay::{partition_for, Replayer};
    use crate::runtime::{Processor, Record};
    use crate::store::{DueTimer, Pending};

    /// Counts records per key in a cached value; "look:<key>" reads without writing.
    struct Counter {
        counts: StateCache<u64>,
    }

    impl Processor for Counter {
        type Input = String;
        fn name(&self) -> &str {
            "counter"
        }
        fn inputs(&self) -> Vec<String> {
            vec!["in".into()]
        }
        fn decode(&self, record: &Record<'_>) -> Result<String, Rejection> {
            Ok(String::from_utf8_lossy(record.payload).into_owned())
        }
        fn event_time(&self, _: &String) -> Option<crate::time::Millis> {
            None
        }
        fn process(&mut self, ctx: &mut Ctx<'_>, key: String) -> anyhow::Result<()> {
            if let Some(key) = key.strip_prefix("look:") {
                // Taken out and put back unchanged: must not make the value dirty.
                if let Some(n) = self.counts.take(ctx, key)? {
                    self.counts.restore(ctx.partition, key.to_string(), n);
                }
                return Ok(());
            }
            let n = self.counts.take(ctx, &key)?.map_or(0, |n| *n);
            self.counts.put(ctx.partition, key, n + 1);
            Ok(())
        }
        fn on_timer(&mut self, _: &mut Ctx<'_>, _: &DueTimer) -> anyhow::Result<()> {
            Ok(())
        }
        fn flush(&mut self, ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
            self.counts.flush(ctx)
        }
        fn on_partition_closed(&mut self, partition: i32) {
            self.counts.close(partition);
        }
    }

    fn stored(r: &Replayer<Counter>, key: &str) -> Option<u64> {
        let p = partition_for(key.as_bytes(), 1);
        let bytes = r
            .engine
            .store(p)?
            .get(&Pending::default(), key.as_bytes())
            .ok()??;
        decode_state(&bytes).ok()
    }

    /// A replay of `Counter` with a cache of `entries` over the store in `dir`.
    fn counter(dir: &std::path::Path, entries: usize) -> Replayer<Counter> {
        let config = Config::from_text(
            std::path::Path::new("test.toml"),
            "[kafka]\npartitions = 1\n[state]\nmax_batch_records = 1000\n",
            &[("KAIROS__STATE__DIR".into(), dir.display().to_string())],
        )
        .unwrap();
        let counter = Counter {
            counts: StateCache::new(entries, 1),
        };
        Replayer::new(counter, &config, &prometheus::Registry::new()).unwrap()
    }

    #[test]
    fn a_value_put_back_unchanged_is_not_written_again_but_an_earlier_change_is() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = counter(dir.path(), 1000);
        let dirty = |r: &Replayer<Counter>| r.engine.processor.counts.partitions[&0].dirty.clone();
        // Changed, then taken and restored in the same batch: still written.
        r.push("in", b"k", b"key-a").unwrap();
        r.push("in", b"k", b"look:key-a").unwrap();
        assert_eq!(dirty(&r), vec!["key-a".to_string()]);
        r.commit().unwrap();
        assert_eq!(stored(&r, "key-a"), Some(1));
        // Only restored: cached, not dirty, and the next change counts on from it.
        r.push("in", b"k", b"look:key-a").unwrap();
        assert!(dirty(&r).is_empty());
        assert_eq!(r.engine.processor.counts.len(0), 1);
        r.push("in", b"k", b"key-a").unwrap();
        r.commit().unwrap();
        assert_eq!(stored(&r, "key-a"), Some(2));
        // Not in the cache (a new one over the same store): read, restored, cached.
        drop(r);
        let mut r = counter(dir.path(), 1000);
        r.push("in", b"k", b"look:key-a").unwrap();
        assert!(dirty(&r).is_empty());
        assert_eq!(r.engine.processor.counts.len(0), 1);
    }

    #[test]
    fn values_are_written_at_commit_and_read_back_after_eviction() {
        let dir = tempfile::tempdir().unwrap();
        // A limit of 64 entries per partition (the floor): 200 keys overflow it.
        let mut r = counter(dir.path(), 1);
        for round in 0..3 {
            for k in 0..200 {
                r.push("in", b"k", format!("key-{k}").as_bytes()).unwrap();
            }
            // Nothing reaches the store before the commit...
            if round == 0 {
                assert_eq!(stored(&r, "key-7"), None);
            }
            r.commit().unwrap();
            // ...and every count is there after it.
            assert_eq!(stored(&r, "key-7"), Some(round + 1));
            assert_eq!(stored(&r, "key-199"), Some(round + 1));
            // The cache was trimmed; evicted values come back from the store.
            assert!(r.engine.processor.counts.len(0) <= 200);
        }
        assert!(
            r.engine.processor.counts.len(0) < 200,
            "trimmed past its limit"
        );
        // A read-only look caches the value without writing it again.
        r.push("in", b"k", b"look:key-3").unwrap();
        r.commit().unwrap();
        assert_eq!(stored(&r, "key-3"), Some(3));
        // After a restart (a new cache, the same store) the counts carry on.
        drop(r);
        let mut r = counter(dir.path(), 1);
        r.push("in", b"k", b"key-3").unwrap();
        r.commit().unwrap();
        assert_eq!(stored(&r, "key-3"), Some(4));
    }
}
