//! A write-back cache of a processor's hot state values, per partition.
//!
//! Reading and decoding a value from RocksDB and writing it back on every record is
//! what bounds a stateful processor (Kafka Streams and Flink both keep hot state in
//! memory for this reason). Values here are read once, changed in memory, and written
//! only when the batch commits: [`StateCache::flush`] runs in
//! [`crate::runtime::Processor::flush`], so the values commit in the same atomic write
//! as the input offsets that produced them, and a crash loses nothing committed.

use compact_str::CompactString;
use foldhash::HashMap;
use foldhash::HashMapExt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::encoding::encode_state;
use crate::runtime::Ctx;

/// A cached value under its key, and whether it changed since the last flush. `value`
/// is `None` while a caller has it taken out: the slot stays, so putting it back costs
/// no new slot and no second entry in the dirty list. Values are boxed: profiles and
/// ledgers are hundreds of bytes, and a table of them inline made every growth of the
/// table move (and fault in) gigabytes at a million customers.
struct Slot<T> {
    /// False while the slot is on the free list.
    in_use: bool,
    key: CompactString,
    value: Option<Box<T>>,
    dirty: bool,
    /// Read or written since the last trim: a trim keeps it (see
    /// [`PartitionCache::trim`]).
    used: bool,
    /// The value as the flush will write it, encoded when it was put: see
    /// [`StateCache::put`].
    encoded: Option<Vec<u8>>,
}

impl<T> Slot<T> {
    /// A slot on the free list: no key, no value.
    fn free() -> Self {
        Slot {
            in_use: false,
            key: CompactString::default(),
            value: None,
            dirty: false,
            used: false,
            encoded: None,
        }
    }
}

/// A partition's values in slots that do not move, found through an index by key.
/// The dirty list holds slot numbers, so a flush goes straight to each changed value
/// instead of looking its key up again in a table of a million (a cache miss or three
/// per value, a twentieth of the arbiter benchmark).
struct PartitionCache<T> {
    index: HashMap<CompactString, u32>,
    slots: Vec<Slot<T>>,
    /// Slots emptied by trimming, reused before the slot list grows.
    free: Vec<u32>,
    /// Slots changed since the last flush, each once.
    dirty: Vec<u32>,
    /// Puts since the last flush of values already changed in the batch.
    repeat_puts: usize,
    /// Whether this batch encodes first changes when they are put: the cache's
    /// setting, turned off after a batch that threw most such encodings away (see
    /// [`StateCache::encoding_first_changes`]).
    encode_early: bool,
    /// Trims so far: which half of the slots a trim that must halve empties.
    trims: usize,
}

impl<T> PartitionCache<T> {
    /// Sized for `limit` values up front, so the index does not grow while it fills.
    fn with_capacity(limit: usize, encode_early: bool) -> Self {
        PartitionCache {
            index: HashMap::with_capacity(limit),
            slots: Vec::with_capacity(limit),
            free: Vec::new(),
            dirty: Vec::new(),
            repeat_puts: 0,
            encode_early,
            trims: 0,
        }
    }

    /// The number of the slot of `key`, a new empty one if it has none.
    fn slot_of(&mut self, key: &str) -> u32 {
        match self.index.get(key) {
            Some(&n) => n,
            None => {
                let key = CompactString::from(key);
                let n = self.free.pop().unwrap_or_else(|| {
                    self.slots.push(Slot::free());
                    (self.slots.len() - 1) as u32
                });
                let slot = &mut self.slots[n as usize];
                slot.in_use = true;
                slot.used = true;
                slot.key = key.clone();
                self.index.insert(key, n);
                n
            }
        }
    }

    /// Empties the slots (all are clean) not used since the last trim, a second
    /// chance as in the CLOCK algorithm: a value in use stays, whenever it came in, and
    /// one that went cold goes. If more than `limit` were used, every other one of
    /// those goes too, the other half at the next such trim. The passes over the
    /// slots go through memory in order, and the index's looks up a bit per slot (an
    /// eighth of a megabyte for a million), where taking each key out of the index by
    /// a lookup, or reading its slot, would jump about memory a million times.
    fn trim(&mut self, limit: usize) {
        let used = self.slots.iter().filter(|s| s.in_use && s.used).count();
        let parity = self.trims % 2;
        self.trims += 1;
        let mut emptied = vec![0_u64; self.slots.len().div_ceil(64)];
        for (n, slot) in self.slots.iter_mut().enumerate() {
            if !slot.in_use {
                continue;
            }
            let keep = slot.used && (used <= limit || n % 2 != parity);
            if keep {
                slot.used = false;
            } else {
                *slot = Slot::free();
                self.free.push(n as u32);
                emptied[n / 64] |= 1 << (n % 64);
            }
        }
        self.index
            .retain(|_, n| emptied[*n as usize / 64] & (1 << (*n % 64)) == 0);
    }
}

pub struct StateCache<T> {
    partitions: HashMap<i32, PartitionCache<T>>,
    /// Entries kept per partition after a flush.
    limit: usize,
    /// See [`StateCache::encoding_first_changes`].
    encode_first_changes: bool,
}

impl<T: Serialize + DeserializeOwned> StateCache<T> {
    /// A cache of about `entries` values over `partitions` partitions.
    pub fn new(entries: usize, partitions: i32) -> Self {
        StateCache {
            partitions: HashMap::new(),
            encode_first_changes: false,
            limit: (entries / partitions.max(1) as usize).max(64),
        }
    }

    /// Encodes a value's first change of a batch when it is put, while the value is
    /// still in the CPU's caches, rather than at the flush, a hundred thousand values
    /// later, when each of its allocations comes from memory again (a twentieth of the
    /// arbiter benchmark, whose ledgers change about once per batch). A value changed
    /// again in the batch is encoded once at the flush, not at every change, so the
    /// first encoding was thrown away: a partition whose last batch put values again
    /// more than half as often as it changed them (a cascade's next step within the
    /// batch) encodes at the flush only in its next batch. Not for profiles: one is
    /// put about six times per batch in the 20M-event replay (a session's page views
    /// and its timers).
    pub fn encoding_first_changes(mut self) -> Self {
        self.encode_first_changes = true;
        self
    }

    /// Takes the value under `key` out of the cache (or reads it from the store) to
    /// change it. The caller must [`put`](Self::put) it back on every path (or
    /// [`restore`](Self::restore) it if unchanged): a taken value that was changed and
    /// not put back is lost.
    pub fn take(&mut self, ctx: &Ctx<'_>, key: &str) -> anyhow::Result<Option<Box<T>>> {
        if let Some(v) = self.partitions.get_mut(&ctx.partition).and_then(|c| {
            let n = *c.index.get(key)?;
            let slot = &mut c.slots[n as usize];
            slot.used = true;
            slot.value.take()
        }) {
            return Ok(Some(v));
        }
        Ok(ctx.get(key)?.map(Box::new))
    }

    /// Puts back a value [`take`](Self::take)n out and left unchanged: it stays cached
    /// without being written again (unless a change before the take is still to be
    /// written).
    pub fn restore(&mut self, partition: i32, key: String, value: Box<T>) {
        let cache = self.cache(partition);
        let n = cache.slot_of(&key);
        cache.slots[n as usize].value = Some(value);
    }

    fn cache(&mut self, partition: i32) -> &mut PartitionCache<T> {
        let (limit, encode_first_changes) = (self.limit, self.encode_first_changes);
        self.partitions
            .entry(partition)
            .or_insert_with(|| PartitionCache::with_capacity(limit, encode_first_changes))
    }

    /// Stores a changed value (boxed or not); it is written at the next flush (with
    /// [`encoding_first_changes`](Self::encoding_first_changes), the first change of a
    /// batch is encoded now, unless the partition's last batch threw most such
    /// encodings away).
    pub fn put(&mut self, partition: i32, key: String, value: impl Into<Box<T>>) {
        let cache = self.cache(partition);
        let n = cache.slot_of(&key);
        let slot = &mut cache.slots[n as usize];
        slot.used = true;
        let value = value.into();
        slot.encoded = match slot.dirty {
            false if cache.encode_early => encode_state(&*value).ok(),
            _ => None,
        };
        slot.value = Some(value);
        if slot.dirty {
            cache.repeat_puts += 1;
        } else {
            slot.dirty = true;
            cache.dirty.push(n);
        }
    }

    /// Forgets the value under `key`, taken or not, so that nothing of it is written
    /// back at the flush (not even a change encoded when it was put): the caller
    /// deletes the key from the store. A value put under the key later in the batch
    /// is written as usual.
    pub fn remove(&mut self, partition: i32, key: &str) {
        let Some(cache) = self.partitions.get_mut(&partition) else {
            return;
        };
        if let Some(&n) = cache.index.get(key) {
            let slot = &mut cache.slots[n as usize];
            slot.value = None;
            slot.encoded = None;
        }
    }

    /// Writes the partition's changed values into the batch about to commit, then
    /// trims the cache to its limit.
    pub fn flush(&mut self, ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
        let limit = self.limit;
        let Some(cache) = self.partitions.get_mut(&ctx.partition) else {
            return Ok(());
        };
        if self.encode_first_changes {
            cache.encode_early = cache.repeat_puts * 2 <= cache.dirty.len();
        }
        cache.repeat_puts = 0;
        let mut dirty = std::mem::take(&mut cache.dirty);
        for n in dirty.drain(..) {
            let slot = &mut cache.slots[n as usize];
            slot.dirty = false;
            match (slot.encoded.take(), &slot.value) {
                (Some(bytes), _) => ctx.write_back_encoded(&slot.key, &bytes),
                (None, Some(v)) => ctx.write_back(&slot.key, v)?,
                (None, None) => {}
            }
        }
        cache.dirty = dirty;
        // Everything is clean now, so emptying slots loses nothing.
        if cache.index.len() > limit {
            cache.trim(limit);
        }
        Ok(())
    }

    /// The partition moved away (or the batch failed): forget its values.
    pub fn close(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// Whether `key` of `partition` is cached (for tests).
    #[cfg(test)]
    fn holds(&self, partition: i32, key: &str) -> bool {
        self.partitions
            .get(&partition)
            .is_some_and(|c| c.index.contains_key(key))
    }

    /// Values cached for `partition` (for tests and gauges).
    pub fn len(&self, partition: i32) -> usize {
        self.partitions
            .get(&partition)
            .map_or(0, |c| c.slots.iter().filter(|s| s.value.is_some()).count())
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

    /// Counts records per key in a cached value; "look:<key>" reads without writing;
    /// "fail" fails the batch.
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
            if key == "fail" {
                anyhow::bail!("a poisoned record");
            }
            if let Some(key) = key.strip_prefix("drop:") {
                self.counts.take(ctx, key)?;
                self.counts.remove(ctx.partition, key);
                ctx.delete(key);
                return Ok(());
            }
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

    /// A replay of `Counter` with a cache of `entries` over the store in `dir`, which
    /// encodes first changes when they are put if `encoding_first_changes`.
    fn counter(
        dir: &std::path::Path,
        entries: usize,
        encoding_first_changes: bool,
    ) -> Replayer<Counter> {
        let config = Config::from_text(
            std::path::Path::new("test.toml"),
            "[kafka]\npartitions = 1\n[state]\nmax_batch_records = 1000\n",
            &[("KAIROS__STATE__DIR".into(), dir.display().to_string())],
        )
        .unwrap();
        let counts = StateCache::new(entries, 1);
        let counter = Counter {
            counts: match encoding_first_changes {
                true => counts.encoding_first_changes(),
                false => counts,
            },
        };
        Replayer::new(counter, &config, &prometheus::Registry::new()).unwrap()
    }

    /// Runs `test` with a cache that encodes first changes when put and one that
    /// does not.
    fn both_ways(test: fn(bool)) {
        for encoding_first_changes in [false, true] {
            test(encoding_first_changes);
        }
    }

    #[test]
    fn a_value_put_back_unchanged_is_not_written_again_but_an_earlier_change_is() {
        both_ways(put_back_unchanged);
    }

    fn put_back_unchanged(encoding_first_changes: bool) {
        let dir = tempfile::tempdir().unwrap();
        let mut r = counter(dir.path(), 1000, encoding_first_changes);
        let dirty = |r: &Replayer<Counter>| {
            let cache = &r.engine.processor.counts.partitions[&0];
            let keys = cache
                .dirty
                .iter()
                .map(|&n| cache.slots[n as usize].key.to_string());
            keys.collect::<Vec<_>>()
        };
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
        let mut r = counter(dir.path(), 1000, encoding_first_changes);
        r.push("in", b"k", b"look:key-a").unwrap();
        assert!(dirty(&r).is_empty());
        assert_eq!(r.engine.processor.counts.len(0), 1);
    }

    #[test]
    fn a_value_removed_after_a_change_in_the_batch_is_not_written_back() {
        both_ways(removed_after_a_change);
    }

    fn removed_after_a_change(encoding_first_changes: bool) {
        let dir = tempfile::tempdir().unwrap();
        let mut r = counter(dir.path(), 1000, encoding_first_changes);
        r.push("in", b"k", b"key-a").unwrap();
        r.push("in", b"k", b"key-b").unwrap();
        r.commit().unwrap();
        // Changed (and, if so set up, encoded when put), then removed and deleted.
        r.push("in", b"k", b"key-a").unwrap();
        r.push("in", b"k", b"drop:key-a").unwrap();
        // Removed, then counted again from nothing in the same batch.
        r.push("in", b"k", b"key-b").unwrap();
        r.push("in", b"k", b"drop:key-b").unwrap();
        r.push("in", b"k", b"key-b").unwrap();
        r.commit().unwrap();
        assert_eq!(stored(&r, "key-a"), None);
        assert_eq!(stored(&r, "key-b"), Some(1));
    }

    #[test]
    fn a_failed_batch_leaves_nothing_cached_for_the_next() {
        both_ways(failed_batch);
    }

    fn failed_batch(encoding_first_changes: bool) {
        let dir = tempfile::tempdir().unwrap();
        let mut r = counter(dir.path(), 1000, encoding_first_changes);
        r.push("in", b"k", b"key-a").unwrap();
        r.commit().unwrap();
        // Changed in a batch that then fails: the change must not survive in the
        // cache, or the next batch would count on from it and commit it.
        r.push("in", b"k", b"key-a").unwrap();
        r.push("in", b"k", b"key-b").unwrap();
        assert!(r.push("in", b"k", b"fail").is_err());
        assert_eq!(r.engine.processor.counts.len(0), 0);
        r.carry_on_after_failure();
        r.push("in", b"k", b"key-a").unwrap();
        r.commit().unwrap();
        assert_eq!(stored(&r, "key-a"), Some(2));
        assert_eq!(stored(&r, "key-b"), None);
    }

    #[test]
    fn a_value_is_written_as_last_changed_in_the_batch() {
        both_ways(written_as_last_changed);
    }

    fn written_as_last_changed(encoding_first_changes: bool) {
        let dir = tempfile::tempdir().unwrap();
        let mut r = counter(dir.path(), 1000, encoding_first_changes);
        // Changed once (encoded when put, if so set up), changed three times (the
        // later changes are encoded at the flush), and changed, looked at and changed
        // again.
        r.push("in", b"k", b"once").unwrap();
        for _ in 0..3 {
            r.push("in", b"k", b"thrice").unwrap();
        }
        for payload in ["again", "look:again", "again"] {
            r.push("in", b"k", payload.as_bytes()).unwrap();
        }
        r.commit().unwrap();
        assert_eq!(stored(&r, "once"), Some(1));
        assert_eq!(stored(&r, "thrice"), Some(3));
        assert_eq!(stored(&r, "again"), Some(2));
        // The next batch starts afresh.
        r.push("in", b"k", b"thrice").unwrap();
        r.commit().unwrap();
        assert_eq!(stored(&r, "thrice"), Some(4));
    }

    /// A batch that put its values again more than half as often as it changed them
    /// turns early encoding off for the next batch; a batch of mostly single changes
    /// turns it on again. The values are written right either way.
    #[test]
    fn first_changes_are_encoded_early_only_after_a_batch_of_mostly_single_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = counter(dir.path(), 1000, true);
        let cache = |r: &Replayer<Counter>| -> (bool, Vec<bool>) {
            let c = &r.engine.processor.counts.partitions[&0];
            let encoded = c
                .dirty
                .iter()
                .map(|&n| c.slots[n as usize].encoded.is_some());
            (c.encode_early, encoded.collect())
        };
        for key in ["a", "b", "c", "d"] {
            r.push("in", b"k", key.as_bytes()).unwrap();
        }
        assert_eq!(cache(&r), (true, vec![true; 4]));
        r.commit().unwrap();
        // Two values, each changed three times: four repeats for two changes.
        for key in ["a", "a", "a", "b", "b", "b"] {
            r.push("in", b"k", key.as_bytes()).unwrap();
        }
        assert_eq!(cache(&r), (true, vec![false, false]));
        r.commit().unwrap();
        r.push("in", b"k", b"c").unwrap();
        assert_eq!(cache(&r), (false, vec![false]));
        r.commit().unwrap();
        r.push("in", b"k", b"d").unwrap();
        assert_eq!(cache(&r), (true, vec![true]));
        r.commit().unwrap();
        let stored_now: Vec<_> = ["a", "b", "c", "d"].iter().map(|k| stored(&r, k)).collect();
        assert_eq!(stored_now, vec![Some(4), Some(4), Some(2), Some(2)]);
    }

    #[test]
    fn values_are_written_at_commit_and_read_back_after_eviction() {
        both_ways(read_back_after_eviction);
    }

    /// A trim keeps what was used since the last one, whenever it came in, and drops
    /// what went cold: a cache whose oldest entries stayed for good would serve fewer
    /// hits the longer it runs.
    #[test]
    fn a_trim_keeps_the_values_used_since_the_last_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = counter(dir.path(), 1, false);
        let key = |k: usize| format!("key-{k}");
        for k in 0..100 {
            r.push("in", b"k", key(k).as_bytes()).unwrap();
        }
        r.commit().unwrap();
        // All 100 were used, more than the limit of 64: half of them stay.
        let counts = &r.engine.processor.counts;
        let kept: Vec<usize> = (0..100).filter(|k| counts.holds(0, &key(*k))).collect();
        assert_eq!(kept.len(), 50);
        // Ten of those are read again, twenty new ones come: 70 over the limit.
        for k in &kept[..10] {
            r.push("in", b"k", format!("look:{}", key(*k)).as_bytes())
                .unwrap();
        }
        for k in 100..120 {
            r.push("in", b"k", key(k).as_bytes()).unwrap();
        }
        r.commit().unwrap();
        let counts = &r.engine.processor.counts;
        let cached: Vec<usize> = (0..120).filter(|k| counts.holds(0, &key(*k))).collect();
        let expected: Vec<usize> = kept[..10].iter().copied().chain(100..120).collect();
        assert_eq!(cached, expected);
    }

    fn read_back_after_eviction(encoding_first_changes: bool) {
        let dir = tempfile::tempdir().unwrap();
        // A limit of 64 entries per partition (the floor): 200 keys overflow it.
        let mut r = counter(dir.path(), 1, encoding_first_changes);
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
        let mut r = counter(dir.path(), 1, encoding_first_changes);
        r.push("in", b"k", b"key-3").unwrap();
        r.commit().unwrap();
        assert_eq!(stored(&r, "key-3"), Some(4));
    }
}
