//! Replay: the same engine over records from a file or memory instead of Kafka.
//!
//! Used by `kairos replay` (backtesting scenarios on history), the event-time tests and
//! the benchmarks. Records are spread over partitions by key like a producer would,
//! offsets are counted per topic and partition, outputs are handed to the caller.

use std::collections::HashMap;

use crate::config::Config;
use crate::metrics::RuntimeMetrics;
use crate::runtime::{Engine, Processor, Record};
use crate::store::{append_outputs, OutboxEntry};
use crate::time::Millis;

/// Partition of a key: CRC32 modulo the partition count, as librdkafka's default
/// (`consistent_random`) partitioner does for keyed records.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    (crc32fast::hash(key) % partitions.max(1) as u32) as i32
}

/// A replayed processor as one stage of an in-process pipeline: the stage before it
/// hands it the records of the topics it consumes.
pub trait Stage {
    fn consumes(&self, topic: &str) -> bool;
    fn push(&mut self, topic: &str, key: &[u8], payload: &[u8])
        -> anyhow::Result<Vec<OutboxEntry>>;
    fn commit(&mut self) -> anyhow::Result<Vec<OutboxEntry>>;
    fn advance_to(&mut self, t: Millis) -> anyhow::Result<Vec<OutboxEntry>>;
}

impl<P: Processor> Stage for Replayer<P> {
    fn consumes(&self, topic: &str) -> bool {
        self.inputs.iter().any(|t| t == topic)
    }

    fn push(
        &mut self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
    ) -> anyhow::Result<Vec<OutboxEntry>> {
        Replayer::push(self, topic, key, payload)
    }

    fn commit(&mut self) -> anyhow::Result<Vec<OutboxEntry>> {
        Replayer::commit(self)
    }

    fn advance_to(&mut self, t: Millis) -> anyhow::Result<Vec<OutboxEntry>> {
        Replayer::advance_to(self, t)
    }
}

pub struct Replayer<P: Processor> {
    pub engine: Engine<P>,
    inputs: Vec<String>,
    partitions: i32,
    /// Next offset per topic, then per partition.
    offsets: HashMap<String, HashMap<i32, i64>>,
    commit_every: usize,
    since_commit: usize,
    /// The error a push, commit or advance stopped at. The engine abandoned that
    /// batch, while the records of it already pushed are counted as read and their
    /// outputs handed out: going on would leave them out of the state, so every later
    /// call fails with it.
    failed: Option<String>,
}

impl<P: Processor> Replayer<P> {
    /// Opens every partition of a fresh or existing state directory.
    pub fn new(
        processor: P,
        config: &Config,
        registry: &prometheus::Registry,
    ) -> anyhow::Result<Self> {
        let metrics = RuntimeMetrics::new(registry);
        let mut engine = Engine::new(processor, config, metrics)?.for_replay();
        let mut offsets = HashMap::new();
        let state_partitions: std::collections::BTreeSet<i32> = (0..config.kafka.partitions)
            .map(|p| engine.state_partition(p))
            .collect();
        for p in state_partitions {
            // A restarted replay continues after what its state already holds.
            let backlog = engine.open(p)?;
            engine.drop_from_outbox(&backlog)?;
        }
        for (topic, p, o) in engine.applied_offsets()? {
            offsets
                .entry(topic)
                .or_insert_with(HashMap::new)
                .insert(p, o + 1);
        }
        Ok(Replayer {
            inputs: engine.processor.inputs(),
            engine,
            partitions: config.kafka.partitions,
            offsets,
            commit_every: config.state.max_batch_records.max(1),
            since_commit: 0,
            failed: None,
        })
    }

    /// Feeds one record; returns outputs committed on the way.
    pub fn push(
        &mut self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
    ) -> anyhow::Result<Vec<OutboxEntry>> {
        self.push_decoded(topic, key, payload, None)
    }

    /// [`Replayer::push`] for a record the caller has decoded already, with the
    /// processor's own `decode` (see [`Engine::handle_decoded`]).
    pub fn push_decoded(
        &mut self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        decoded: Option<P::Input>,
    ) -> anyhow::Result<Vec<OutboxEntry>> {
        let partition = partition_for(key, self.partitions);
        self.push_at(topic, partition, key, payload, decoded)
    }

    /// [`Replayer::push`] to the partition a producer chose, whatever the key (a
    /// heartbeat produced to each partition in turn).
    pub fn push_to_partition(
        &mut self,
        topic: &str,
        partition: i32,
        key: &[u8],
        payload: &[u8],
    ) -> anyhow::Result<Vec<OutboxEntry>> {
        anyhow::ensure!(
            (0..self.partitions).contains(&partition),
            "partition {partition} of {topic} is not one of its {}",
            self.partitions
        );
        self.push_at(topic, partition, key, payload, None)
    }

    fn push_at(
        &mut self,
        topic: &str,
        partition: i32,
        key: &[u8],
        payload: &[u8],
        decoded: Option<P::Input>,
    ) -> anyhow::Result<Vec<OutboxEntry>> {
        self.unless_failed(|r| r.push_unchecked(topic, partition, key, payload, decoded))
    }

    /// Runs `call`, unless an earlier call failed (then fails with that error: see
    /// `Replayer::failed`); remembers its error, if any, for the calls after it.
    fn unless_failed<T>(
        &mut self,
        call: impl FnOnce(&mut Self) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        if let Some(e) = &self.failed {
            anyhow::bail!("the replay stopped at an earlier error: {e}");
        }
        let result = call(self);
        if let Err(e) = &result {
            self.failed = Some(format!("{e:#}"));
        }
        result
    }

    /// Lets a test go on after a failed call, to see what the engine itself does then.
    #[cfg(test)]
    pub(crate) fn carry_on_after_failure(&mut self) {
        self.failed = None;
    }

    fn push_unchecked(
        &mut self,
        topic: &str,
        partition: i32,
        key: &[u8],
        payload: &[u8],
        decoded: Option<P::Input>,
    ) -> anyhow::Result<Vec<OutboxEntry>> {
        // Looked up by `&str` first: no allocation per record.
        if !self.offsets.contains_key(topic) {
            self.offsets.insert(topic.to_string(), HashMap::new());
        }
        let offset = self
            .offsets
            .get_mut(topic)
            .map(|by_partition| by_partition.entry(partition).or_insert(0))
            .ok_or_else(|| anyhow::anyhow!("no offsets for topic {topic}"))?;
        let record = Record {
            topic,
            partition,
            offset: *offset,
            key: Some(key),
            payload,
            written_at: None,
        };
        *offset += 1;
        let mut out = self.engine.handle_decoded(&record, decoded)?;
        self.since_commit += 1;
        if self.since_commit >= self.commit_every {
            append_outputs(&mut out, self.commit_unchecked()?);
        }
        Ok(out)
    }

    /// Commits pending work and fires due timers.
    pub fn commit(&mut self) -> anyhow::Result<Vec<OutboxEntry>> {
        self.unless_failed(Self::commit_unchecked)
    }

    fn commit_unchecked(&mut self) -> anyhow::Result<Vec<OutboxEntry>> {
        self.since_commit = 0;
        let mut out = self.engine.commit()?;
        append_outputs(&mut out, self.engine.fire_due()?);
        self.engine.acknowledge_local(&out)?;
        Ok(out)
    }

    /// Serves a request from the state of `key`'s partition (see
    /// [`Processor::serve`]) and commits what it changed: the answer and the outputs.
    pub fn serve(
        &mut self,
        key: &[u8],
        request: &[u8],
    ) -> anyhow::Result<(Vec<u8>, Vec<OutboxEntry>)> {
        let partition = self
            .engine
            .state_partition(partition_for(key, self.partitions));
        let answer = self.unless_failed(|r| r.engine.serve(partition, request))?;
        Ok((answer, self.commit()?))
    }

    /// Moves event time to `t` everywhere (a heartbeat on every partition).
    pub fn advance_to(&mut self, t: Millis) -> anyhow::Result<Vec<OutboxEntry>> {
        self.unless_failed(|r| {
            let out = r.engine.advance_time(t)?;
            r.engine.acknowledge_local(&out)?;
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_match_librdkafkas_crc32_partitioner() {
        // CRC32 of "123456789" is the standard check value 0xCBF43926.
        assert_eq!(
            partition_for(b"123456789", 1000),
            (0xCBF4_3926u32 % 1000) as i32
        );
    }

    /// On "arm", schedules "first" and "second" at the same time; "first" cancels,
    /// moves or re-sets "second" when it fires; every firing is emitted with its
    /// payload.
    struct TwoTimers {
        second_on_first: &'static str,
    }

    impl Processor for TwoTimers {
        type Input = ();
        fn name(&self) -> &str {
            "two-timers"
        }
        fn inputs(&self) -> Vec<String> {
            vec!["in".into()]
        }
        fn decode(&self, _: &Record<'_>) -> Result<(), crate::encoding::Rejection> {
            Ok(())
        }
        fn event_time(&self, _: &()) -> Option<Millis> {
            None
        }
        fn process(&mut self, ctx: &mut crate::runtime::Ctx<'_>, _: ()) -> anyhow::Result<()> {
            ctx.schedule("first", 10, &"first")?;
            ctx.schedule("second", 10, &"second")?;
            Ok(())
        }
        fn on_timer(
            &mut self,
            ctx: &mut crate::runtime::Ctx<'_>,
            timer: &crate::store::DueTimer,
        ) -> anyhow::Result<()> {
            let payload: String = timer.decode()?;
            ctx.emit(
                "fired",
                "k",
                &(timer.timer_id.as_str(), timer.fire_at, payload),
            );
            if timer.timer_id == "first" {
                match self.second_on_first {
                    "cancel" => {
                        ctx.cancel("second")?;
                    }
                    "reset" => ctx.schedule("second", 10, &"second, set again")?,
                    _ => ctx.schedule("second", 100, &"second")?,
                }
            }
            Ok(())
        }
    }

    /// One partition in event time, with its state in `dir`.
    fn event_time_config(dir: &std::path::Path) -> Config {
        Config::from_text(
            std::path::Path::new("test.toml"),
            "[kafka]\npartitions = 1\n[clock]\nmode = \"event\"\n",
            &[("KAIROS__STATE__DIR".into(), dir.display().to_string())],
        )
        .unwrap()
    }

    fn firings(second_on_first: &'static str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let config = event_time_config(dir.path());
        let registry = prometheus::Registry::new();
        let mut r = Replayer::new(TwoTimers { second_on_first }, &config, &registry).unwrap();
        let mut out = r.push("in", b"k", b"arm").unwrap();
        out.extend(r.commit().unwrap());
        out.extend(r.advance_to(50).unwrap());
        out.extend(r.advance_to(200).unwrap());
        out.iter()
            .filter(|e| e.topic == "fired")
            .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
            .collect()
    }

    #[test]
    fn a_timer_cancelled_by_one_due_with_it_does_not_fire() {
        assert_eq!(firings("cancel"), [r#"["first",10,"first"]"#]);
    }

    #[test]
    fn a_timer_moved_by_one_due_with_it_fires_once_at_its_new_time() {
        assert_eq!(
            firings("move"),
            [r#"["first",10,"first"]"#, r#"["second",100,"second"]"#]
        );
    }

    #[test]
    fn a_timer_set_again_by_one_due_with_it_fires_once_with_its_new_payload() {
        assert_eq!(
            firings("reset"),
            [
                r#"["first",10,"first"]"#,
                r#"["second",10,"second, set again"]"#
            ]
        );
    }

    /// "arm" schedules a timer; "fail" fails the batch; firings are emitted.
    struct ArmThenFail;

    impl Processor for ArmThenFail {
        type Input = Vec<u8>;
        fn name(&self) -> &str {
            "arm-then-fail"
        }
        fn inputs(&self) -> Vec<String> {
            vec!["in".into()]
        }
        fn decode(&self, r: &Record<'_>) -> Result<Vec<u8>, crate::encoding::Rejection> {
            Ok(r.payload.to_vec())
        }
        fn event_time(&self, _: &Vec<u8>) -> Option<Millis> {
            None
        }
        fn process(
            &mut self,
            ctx: &mut crate::runtime::Ctx<'_>,
            input: Vec<u8>,
        ) -> anyhow::Result<()> {
            match input.as_slice() {
                b"fail" => anyhow::bail!("a poisoned record"),
                _ => ctx.schedule("armed", 10, &"armed"),
            }
        }
        fn on_timer(
            &mut self,
            ctx: &mut crate::runtime::Ctx<'_>,
            timer: &crate::store::DueTimer,
        ) -> anyhow::Result<()> {
            ctx.emit("fired", "k", &timer.timer_id);
            Ok(())
        }
    }

    #[test]
    fn a_timer_scheduled_in_a_failed_batch_never_fires() {
        let dir = tempfile::tempdir().unwrap();
        let config = event_time_config(dir.path());
        let mut r = Replayer::new(ArmThenFail, &config, &prometheus::Registry::new()).unwrap();
        r.push("in", b"k", b"arm").unwrap();
        assert!(r.push("in", b"k", b"fail").is_err());
        r.carry_on_after_failure();
        let fired = |out: &[OutboxEntry]| out.iter().filter(|e| e.topic == "fired").count();
        let mut out = r.commit().unwrap();
        out.extend(r.advance_to(50).unwrap());
        assert_eq!(fired(&out), 0, "the failed batch's timer fired");
        // The partition works on after the failed batch: a new timer fires once (at
        // once, as its time has passed).
        let mut out = r.push("in", b"k", b"arm").unwrap();
        out.extend(r.commit().unwrap());
        out.extend(r.advance_to(100).unwrap());
        assert_eq!(fired(&out), 1);
    }

    /// The failed batch's records before the failure were counted as read and their
    /// outputs handed out, but their state is gone with the batch: a replay going on
    /// would leave them out, so it refuses to.
    #[test]
    fn a_replay_goes_no_further_after_a_failed_batch() {
        let dir = tempfile::tempdir().unwrap();
        let config = event_time_config(dir.path());
        let mut r = Replayer::new(ArmThenFail, &config, &prometheus::Registry::new()).unwrap();
        r.push("in", b"k", b"arm").unwrap();
        let failure = r.push("in", b"k", b"fail").unwrap_err();
        assert!(format!("{failure:#}").contains("a poisoned record"));
        for refused in [
            r.push("in", b"k", b"arm").map(|_| ()),
            r.commit().map(|_| ()),
            r.advance_to(50).map(|_| ()),
        ] {
            let e = format!("{:#}", refused.unwrap_err());
            assert!(
                e.contains("earlier error") && e.contains("a poisoned record"),
                "{e}"
            );
        }
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        for k in ["a", "b", "customer-42"] {
            let p = partition_for(k.as_bytes(), 4);
            assert!((0..4).contains(&p));
            assert_eq!(p, partition_for(k.as_bytes(), 4));
        }
    }
}
