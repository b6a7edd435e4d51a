//! The stream-processing runtime shared by the profile processor, the arbiter, the
//! delivery workers and feedback.
//!
//! A [`Processor`] sees one input record at a time with a [`Ctx`] onto the state of the
//! record's partition. The [`Engine`] keeps one RocksDB store per owned partition and
//! commits, in one atomic write per batch, the state changes, the output records (the
//! outbox) and the offset of the last applied input. Outputs are published after the
//! commit and dropped from the outbox once acknowledged. So after a crash at any point:
//! an input whose effect was committed is skipped by its offset, an input whose effect
//! was not is processed again from scratch, and committed outputs are re-sent with the
//! same deterministic ids (consumers deduplicate by id). No Kafka transactions needed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use futures::future::join_all;
use futures::FutureExt as _;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::admin::AdminState;
use crate::config::{topics, Config};
use crate::contracts::{DeadLetter, DeadLetterReason};
use crate::encoding::{
    decode_state, encode_internal, encode_state, encode_state_into, Rejection, SchemaRegistry,
};
use crate::ids::deterministic_id;
use crate::kafka;
use crate::metrics::RuntimeMetrics;
use crate::store::{
    append_outputs, claim_expected, claim_key, DueTimer, OutboxEntry, PartitionStore, Pending,
    StoreFactory, CLAIM_PREFIX, META_COMMIT_END, OUTBOX,
};

use crate::time::{wall_now, Clock, ClockMode, Millis};

/// One input record.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    /// The record's Kafka timestamp, where there is one (not in replays): when its
    /// producer wrote it (or the broker appended it), the same on every read, unlike
    /// the processing clock. A producer may set it to anything: check before trusting.
    pub written_at: Option<Millis>,
}

/// A stateful stream processor.
pub trait Processor: Send + 'static {
    type Input;

    /// Service name: state directory, consumer group, dead letters, logs.
    fn name(&self) -> &str;

    /// Full names of the input topics (co-partitioned).
    fn inputs(&self) -> Vec<String>;

    /// Largest batch this processor wants between commits, if smaller than configured.
    fn max_batch_records(&self) -> Option<usize> {
        None
    }

    /// Timers fired between two commits (a round of firing), if fewer than
    /// [`TIMERS_PER_ROUND`]: a processor whose timers are slow (a provider call each)
    /// fires one a round, so each one's outputs commit and go out as it finishes. Any
    /// `Some` also marks its timers as slow to the processing loop, which then fires
    /// one round a turn before it takes the records waiting (see
    /// [`FIRING_TIME_PER_TURN`]).
    fn max_timers_per_round(&self) -> Option<usize> {
        None
    }

    /// Whether records of input `topic` count towards [`Processor::max_batch_records`]:
    /// a processor whose records of one topic are slow (a provider call each) reads
    /// its other, quick ones in the same batch (up to `state.max_batch_records` in
    /// all) rather than committing after each.
    fn counts_towards_batch(&self, topic: &str) -> bool {
        let _ = topic;
        true
    }

    /// Full names of the topics it emits to (for metrics that start at zero).
    fn outputs(&self) -> Vec<String> {
        Vec::new()
    }

    /// Parses a record. A rejection sends it to the dead-letter topic.
    fn decode(&self, record: &Record<'_>) -> Result<Self::Input, Rejection>;

    /// The record's event time; in event-time mode it advances the partition's clock.
    fn event_time(&self, input: &Self::Input) -> Option<Millis>;

    /// True for a topic producers outside Kairos write (site, app and offline events),
    /// whose event times come from their clocks: one too far ahead of this machine's
    /// clock (wall-clock mode) or of its partition's event time (event-time mode) is
    /// dead-lettered (see [`check_event_lead`]). Kairos' own topics carry times it
    /// accepted already.
    fn is_raw_input(&self, _topic: &str) -> bool {
        false
    }

    /// Applies one input. An error is fatal for the batch: nothing of it is committed
    /// (the engine drops it and reopens the partition at its last commit), and the
    /// service stops so that a restart retries from there.
    fn process(&mut self, ctx: &mut Ctx<'_>, input: Self::Input) -> anyhow::Result<()>;

    /// A persistent timer fired.
    fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: &DueTimer) -> anyhow::Result<()>;

    /// Called before each commit of a partition: a processor with a write-back cache
    /// writes its dirty entries here, so they commit atomically with the offsets.
    fn flush(&mut self, _ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
        Ok(())
    }

    /// The partition moved away, its batch failed, or the process stops: drop
    /// anything cached for it.
    fn on_partition_closed(&mut self, _partition: i32) {}

    /// Every few seconds, also without input: gauges that change with time alone (a
    /// circuit breaker's open window ending) show it without waiting for a record.
    fn refresh_gauges(&self) {}

    /// True for a processor whose state is one whole (the identity graph: any two
    /// events may link, whatever partitions they came in on). Its state lives in state
    /// partition 0 and its applied offsets are kept per input partition, so one
    /// instance must own every input partition.
    fn single_state_partition(&self) -> bool {
        false
    }

    /// True for a processor that writes records ahead of its commits
    /// ([`Ctx::put_now`], a delivery worker before a provider call). Those go through a
    /// producer of their own, so the offsets of its changelog records interleave: once
    /// its store has written ahead, its publishes are not checked by counting them (see
    /// [`publish_fenced`]); instead each write-ahead record the broker acknowledges
    /// (see [`Ctx::put_now`]), and each commit before its outputs go out (see
    /// [`Engine::publish`]), is checked for another instance's claim before it, with
    /// the offsets of its own records noted so that the changelog is read only where
    /// something else lies.
    fn writes_ahead(&self) -> bool {
        false
    }

    /// Answers a request from a partition's state (see [`run_serving`]): what it
    /// writes and emits commits like a record's effects, before the answer goes out.
    fn serve(&mut self, _ctx: &mut Ctx<'_>, _request: &[u8]) -> anyhow::Result<Vec<u8>> {
        anyhow::bail!("{} serves no requests", self.name())
    }
}

/// A request to be served from the state of the partition `key` belongs to (the
/// partition its records are keyed to), on the processing loop: an HTTP handler has no
/// access to the partition stores, and what serving writes must commit and reach the
/// changelog like any other change.
pub struct ServeRequest {
    pub key: Vec<u8>,
    pub body: Vec<u8>,
    pub reply: tokio::sync::oneshot::Sender<Served>,
}

/// How a [`ServeRequest`] went.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// The processor's answer; its writes are committed and its outputs published.
    Done(Vec<u8>),
    /// This instance does not own the key's partition (another instance does, or a
    /// rebalance is under way).
    NotOwner(i32),
    /// Serving failed, or its changes did not commit: nothing of it holds.
    Failed(String),
}

/// Publishes a write-ahead record to the changelog, so that an instance the partition
/// moves to after a crash knows it too; with `wait`, returns once the broker holds it.
pub trait WriteAhead: Send + Sync {
    /// Sends the record, stamped with `writer` and `epoch` (see [`changelog_headers`]):
    /// with `wait`, returns where the broker placed it; without, at once.
    #[allow(clippy::too_many_arguments)]
    fn replicate(
        &self,
        changelog: &str,
        partition: i32,
        key: &[u8],
        value: &[u8],
        writer: &str,
        epoch: Option<i64>,
        wait: bool,
    ) -> anyhow::Result<Placement>;

    /// Whether a valid claim by another instance than `own`'s lies in
    /// `changelog[partition]` over `range` (see [`claim`]).
    fn claimed_in(
        &self,
        changelog: &str,
        partition: i32,
        range: std::ops::Range<i64>,
        own: &OwnSpan,
    ) -> anyhow::Result<bool>;
}

/// Where a write-ahead record went.
pub enum Placement {
    /// Acknowledged at this offset.
    At(i64),
    /// Queued; its delivery report tells where it landed.
    Queued(rdkafka::producer::DeliveryFuture),
}

/// [`WriteAhead`] through a producer of its own that does not linger, made when the
/// first record comes (most processors write none), and a changelog reader for the
/// claim checks, made when the first is needed.
pub struct ProducerWriteAhead {
    config: Option<Config>,
    producer: Mutex<Option<FutureProducer>>,
    reader: Mutex<Option<Arc<ChangelogReader>>>,
    claim_reads: std::sync::atomic::AtomicU64,
}

impl ProducerWriteAhead {
    pub fn new(config: &Config) -> Self {
        ProducerWriteAhead {
            config: Some(config.clone()),
            producer: Mutex::new(None),
            reader: Mutex::new(None),
            claim_reads: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Through `producer`, as it is, with claims checked through a reader made from
    /// `config`.
    pub fn with_producer(producer: FutureProducer, config: &Config) -> Self {
        ProducerWriteAhead {
            config: Some(config.clone()),
            producer: Mutex::new(Some(producer)),
            reader: Mutex::new(None),
            claim_reads: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many times a claim check had to read the changelog (see
    /// [`WriteAhead::claimed_in`]).
    pub fn claim_reads(&self) -> u64 {
        self.claim_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn producer(&self) -> anyhow::Result<FutureProducer> {
        made_once(&self.producer, "write-ahead producer", || {
            kafka::write_ahead_producer(self.config()?)
        })
    }

    fn config(&self) -> anyhow::Result<&Config> {
        self.config
            .as_ref()
            .context("no configuration to make a Kafka client from")
    }
}

/// What `slot` holds, made by `make` the first time it is asked for (a Kafka client
/// that most processes never need).
fn made_once<T: Clone>(
    slot: &Mutex<Option<T>>,
    what: &str,
    make: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut slot = slot
        .lock()
        .map_err(|_| anyhow::anyhow!("the {what}'s lock is poisoned"))?;
    if let Some(made) = slot.as_ref() {
        return Ok(made.clone());
    }
    let made = make()?;
    *slot = Some(made.clone());
    Ok(made)
}

impl WriteAhead for ProducerWriteAhead {
    fn replicate(
        &self,
        changelog: &str,
        partition: i32,
        key: &[u8],
        value: &[u8],
        writer: &str,
        epoch: Option<i64>,
        wait: bool,
    ) -> anyhow::Result<Placement> {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        let headers = changelog_headers(writer, epoch, Some(WRITE_AHEAD_HEADER));
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(changelog)
            .partition(partition)
            .key(key)
            .payload(value)
            .headers(headers);
        let producer = self.producer()?;
        let queued_by = Instant::now() + Duration::from_secs(5);
        let delivery = loop {
            match producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < queued_by =>
                {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    return Err(e).with_context(|| {
                        format!("cannot queue a write-ahead record to {changelog}[{partition}]")
                    })
                }
            }
        };
        if !wait {
            // Queued: the producer delivers it in order with the records after it.
            return Ok(Placement::Queued(delivery));
        }
        // The delivery future is completed by the producer's own thread: waiting on it
        // needs no runtime (the caller may be inside one, blocking already).
        match futures::executor::block_on(delivery) {
            Ok(Ok((_, offset))) => Ok(Placement::At(offset)),
            Ok(Err((e, _))) => Err(e).with_context(|| {
                format!("the broker refused a write-ahead record to {changelog}[{partition}]")
            }),
            Err(_) => anyhow::bail!(
                "the producer dropped a write-ahead record to {changelog}[{partition}]"
            ),
        }
    }

    fn claimed_in(
        &self,
        changelog: &str,
        partition: i32,
        range: std::ops::Range<i64>,
        own: &OwnSpan,
    ) -> anyhow::Result<bool> {
        let reader = made_once(&self.reader, "claim check reader", || {
            Ok(Arc::new(ChangelogReader::new(self.config()?)?))
        })?;
        self.claim_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let others = (range.end - range.start) as u64;
        Ok(inspect_gap(&reader, changelog, partition, own, range, others)?.claimed)
    }
}

/// A changelog record's headers: the instance that wrote it, its epoch when it has
/// claimed the partition (see [`crate::store::claim_key`]) and, when given, the flag
/// header (`COMMIT_HEADER` or `WRITE_AHEAD_HEADER`) that tells a restore how to apply it.
fn changelog_headers(
    writer: &str,
    epoch: Option<i64>,
    flag: Option<&str>,
) -> rdkafka::message::OwnedHeaders {
    let mut headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
        key: WRITER_HEADER,
        value: Some(writer.as_bytes()),
    });
    if let Some(epoch) = epoch {
        headers = headers.insert(rdkafka::message::Header {
            key: EPOCH_HEADER,
            value: Some(epoch.to_string().as_bytes()),
        });
    }
    match flag {
        Some(flag) => headers.insert(rdkafka::message::Header {
            key: flag,
            value: Some(&b"1"[..]),
        }),
        None => headers,
    }
}

/// Another instance claimed the partition after this one did: found before an
/// external effect (see [`Ctx::put_now`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "partition {partition} was claimed by another instance since this one claimed it (this \
     one was paused or cut off past its session): no further external effect is made for \
     it; stopping, so that a restart restores what the partition holds"
)]
pub struct PartitionClaimed {
    pub partition: i32,
}

/// [`Ctx::put_now`] of state `key` (encoded `value`) in `store`, replicated through
/// `target` (the write-ahead producer and the changelog topic) when there is one; with
/// `wait`, checked for another instance's claim before it (see [`check_not_claimed`]).
pub fn put_ahead(
    store: &PartitionStore,
    target: Option<(&dyn WriteAhead, &str)>,
    metrics: &RuntimeMetrics,
    key: &[u8],
    value: &[u8],
    wait: bool,
) -> anyhow::Result<()> {
    store.put_now(key, value)?;
    let Some((write_ahead, changelog)) = target else {
        return Ok(());
    };
    let placed = write_ahead.replicate(
        changelog,
        store.partition,
        &PartitionStore::state_key(key),
        value,
        &store.writer,
        store.epoch,
        wait,
    )?;
    match placed {
        Placement::Queued(delivery) => store.claim_watch().note_unplaced(delivery),
        Placement::At(offset) => check_not_claimed(store, write_ahead, changelog, metrics, offset)?,
    }
    Ok(())
}

/// Checks that no other instance claimed `store`'s partition before `offset`, where the
/// broker just placed a write-ahead record of it: an instance that was paused or cut
/// off past its session must not go on to the external effect (a provider call) its
/// new owner makes too. Only where records not known to be the store's own lie between
/// is the changelog read. A claim that lands after the check still leaves one effect
/// that may happen twice: the one this instance was about to make.
fn check_not_claimed(
    store: &PartitionStore,
    write_ahead: &dyn WriteAhead,
    changelog: &str,
    metrics: &RuntimeMetrics,
    offset: i64,
) -> anyhow::Result<()> {
    let claimed = claimed_before(store, &[], offset, |range, own| {
        write_ahead.claimed_in(changelog, store.partition, range, own)
    })?;
    if claimed {
        metrics.partitions_fenced.inc();
        return Err(PartitionClaimed {
            partition: store.partition,
        }
        .into());
    }
    Ok(())
}

/// Whether another instance claimed `store`'s partition before `last`, where the
/// broker placed one of the store's own records (`own`: others of its records just
/// acknowledged): the offsets between its claim and `last` not known to be its own
/// are handed to `read`, which says whether a valid claim by another lies there (see
/// [`crate::store::ClaimWatch`]). Nothing is read when every one is known.
fn claimed_before(
    store: &PartitionStore,
    own: &[i64],
    last: i64,
    read: impl FnOnce(std::ops::Range<i64>, &OwnSpan) -> anyhow::Result<bool>,
) -> anyhow::Result<bool> {
    let Some(epoch) = store.epoch else {
        return Ok(false);
    };
    let unknown = {
        let mut watch = store.claim_watch();
        own.iter().for_each(|offset| watch.note_own(*offset));
        watch.settle();
        watch.unknown_before(last)
    };
    let Some(range) = unknown else {
        return Ok(false);
    };
    let span = OwnSpan {
        next: range.start,
        writer: store.writer.clone(),
        epoch,
    };
    let claimed = read(range, &span)?;
    if !claimed {
        store.claim_watch().checked_to(last);
    }
    Ok(claimed)
}

/// Where a [`Ctx`] replicates its write-ahead records: both or neither. Takes the
/// engine's fields, not the engine, as its partitions are borrowed at the same time.
fn write_ahead_target<'a>(
    write_ahead: &'a Option<Arc<dyn WriteAhead>>,
    changelog: &'a Option<String>,
) -> Option<(&'a dyn WriteAhead, &'a str)> {
    write_ahead.as_deref().zip(changelog.as_deref())
}

/// The processor's view of one partition's state during a batch.
pub struct Ctx<'a> {
    pub partition: i32,
    now: Millis,
    store: &'a PartitionStore,
    pending: &'a mut Pending,
    metrics: &'a RuntimeMetrics,
    /// Where [`Ctx::put_now`] replicates its records, and the changelog topic (a
    /// service with a changelog; None in replay).
    write_ahead: Option<(&'a dyn WriteAhead, &'a str)>,
    /// The processor says it writes ahead ([`Processor::writes_ahead`]): only then
    /// are its commits' offsets noted for the claim checks of [`Ctx::put_now`].
    writes_ahead: bool,
    /// The batch's counts, added to the metrics when it commits.
    uncounted: &'a mut BatchCounts,
}

impl Ctx<'_> {
    /// The partition's current time (wall clock, or event time in event-time mode).
    pub fn now(&self) -> Millis {
        self.now
    }

    pub fn get<T: DeserializeOwned>(&self, key: &str) -> anyhow::Result<Option<T>> {
        match self.store.get(self.pending, key.as_bytes())? {
            None => Ok(None),
            Some(bytes) => decode_state(&bytes)
                .map(Some)
                .with_context(|| format!("state under {key:?} does not decode")),
        }
    }

    pub fn put<T: Serialize>(&mut self, key: &str, value: &T) -> anyhow::Result<()> {
        let bytes = encode_state(value).with_context(|| format!("encode state {key:?}"))?;
        self.store.put(self.pending, key.as_bytes(), bytes);
        Ok(())
    }

    /// Writes a state value back at the end of the batch, encoded straight into the
    /// batch's buffer: for a write-back cache's flush, which writes many values with no
    /// reads between them (reads after it look through them one by one). See
    /// [`PartitionStore::write_back`].
    pub fn write_back<T: Serialize>(&mut self, key: &str, value: &T) -> anyhow::Result<()> {
        self.store
            .write_back(self.pending, key.as_bytes(), |buf| {
                encode_state_into(buf, value)
            })
            .with_context(|| format!("encode state {key:?}"))
    }

    /// [`Self::write_back`] of a value already encoded by [`encode_state`].
    pub fn write_back_encoded(&mut self, key: &str, bytes: &[u8]) {
        let copied = self.store.write_back(self.pending, key.as_bytes(), |buf| {
            buf.extend_from_slice(bytes);
            Ok::<(), std::convert::Infallible>(())
        });
        let Ok(()) = copied;
    }

    /// Writes state at once, before the batch commits: for a record that must be
    /// durable before an external effect. See [`PartitionStore::put_now`]. With a
    /// changelog it is also in the changelog when this returns, so an instance the
    /// partition moves to after a crash knows it, as a restart on this one does.
    /// And nothing before it in the changelog is another instance's claim of the
    /// partition: if something is, it fails with [`PartitionClaimed`], and the effect
    /// must not be made (see [`put_ahead`]).
    /// Not for timers: a firing round's commit reaches the changelog only after
    /// later rounds, so a record written at once could land before an older value.
    pub fn put_now<T: Serialize>(&self, key: &str, value: &T) -> anyhow::Result<()> {
        self.put_now_with(key, value, true)
    }

    /// [`Self::put_now`] that only queues the changelog's copy and returns at once: for
    /// a record whose external effect follows within moments (the SMTP "." after the
    /// commit point), where waiting for the broker would leave a crash a wider moment
    /// in which the record is durable and the effect never happened. The producer
    /// keeps it in order with the records after it.
    pub fn put_now_unawaited<T: Serialize>(&self, key: &str, value: &T) -> anyhow::Result<()> {
        self.put_now_with(key, value, false)
    }

    fn put_now_with<T: Serialize>(&self, key: &str, value: &T, wait: bool) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.writes_ahead,
            "a processor that writes ahead of its commits must say so (`writes_ahead`), \
             so that its claim checks know its own changelog records"
        );
        let bytes = encode_state(value).with_context(|| format!("encode state {key:?}"))?;
        put_ahead(
            self.store,
            self.write_ahead,
            self.metrics,
            key.as_bytes(),
            &bytes,
            wait,
        )
    }

    pub fn delete(&mut self, key: &str) {
        self.store.delete(self.pending, key.as_bytes());
    }

    /// Entries whose key starts with `prefix` (pending writes included), decoded.
    pub fn scan<T: DeserializeOwned>(&self, prefix: &str) -> anyhow::Result<Vec<(String, T)>> {
        self.store
            .scan(self.pending, prefix.as_bytes())?
            .into_iter()
            .map(|(k, v)| {
                let key = String::from_utf8_lossy(&k).into_owned();
                let value = decode_state(&v)
                    .with_context(|| format!("state under {key:?} does not decode"))?;
                Ok((key, value))
            })
            .collect()
    }

    /// The first `limit` entries under `prefix` after the key `after`, in key order,
    /// values still encoded: see [`PartitionStore::scan_from`].
    pub fn scan_from(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        Ok(self
            .store
            .scan_from(
                self.pending,
                prefix.as_bytes(),
                after.map(str::as_bytes),
                limit,
            )?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .collect())
    }

    /// Queues an output record (JSON); it is published after the batch commits.
    pub fn emit<T: Serialize>(&mut self, topic: &str, key: &str, value: &T) {
        self.store
            .emit(self.pending, topic, key.as_bytes(), encode_internal(value));
    }

    /// Emits a dead letter the processor wrote itself (an input it took but could not
    /// carry out), counted by reason with the runtime's own once the batch commits.
    pub fn dead_letter(&mut self, topic: &str, key: &str, letter: &DeadLetter) {
        self.uncounted.dead_letters.push(letter.reason_code);
        self.emit(topic, key, letter);
    }

    /// Queues an output record already encoded (a record sent on as read).
    pub fn emit_encoded(&mut self, topic: &str, key: &str, payload: Vec<u8>) {
        self.store
            .emit(self.pending, topic, key.as_bytes(), payload);
    }

    /// Schedules (or moves) a persistent timer.
    pub fn schedule<T: Serialize>(
        &mut self,
        timer_id: &str,
        fire_at: Millis,
        payload: &T,
    ) -> anyhow::Result<()> {
        let payload =
            encode_state(payload).with_context(|| format!("encode timer {timer_id:?}"))?;
        self.store
            .schedule_timer(self.pending, timer_id, fire_at, payload)?;
        Ok(())
    }

    /// Cancels a timer; returns whether it existed.
    pub fn cancel(&mut self, timer_id: &str) -> anyhow::Result<bool> {
        Ok(self.store.cancel_timer(self.pending, timer_id)?)
    }

    pub fn timer_fire_at(&self, timer_id: &str) -> anyhow::Result<Option<Millis>> {
        Ok(self.store.timer_fire_at(self.pending, timer_id)?)
    }

    /// Fire time and payload of a timer still to fire, without firing it: for a
    /// handler that decides timers due together in an order of its own.
    pub fn timer_payload<T: DeserializeOwned>(
        &self,
        timer_id: &str,
    ) -> anyhow::Result<Option<(Millis, T)>> {
        match self.store.timer_payload(self.pending, timer_id)? {
            None => Ok(None),
            Some((at, bytes)) => {
                let payload = decode_state(&bytes)
                    .with_context(|| format!("timer {timer_id:?} payload does not decode"))?;
                Ok(Some((at, payload)))
            }
        }
    }
}

/// Rounds of firing (of up to 512 timers each) in one go, bounded so a handler that
/// keeps scheduling timers in the past cannot spin.
const MAX_FIRING_ROUNDS: usize = 10_000;

/// Rounds of firing the processing loop commits before it publishes their outputs, so
/// a flood of due timers does not pile up its outputs in memory.
const FIRING_ROUNDS_PER_PUBLISH: usize = 8;

/// Timers a round of firing takes at most (see [`Processor::max_timers_per_round`]).
pub const TIMERS_PER_ROUND: usize = 512;

/// How long the processing loop fires due timers before it polls its consumer again
/// (the rest fire on its next turn, which does not wait for a record): a flood of due
/// timers must not keep it from the group beyond `max.poll.interval.ms`, nor from the
/// records queued behind them. A processor with slow timers (see
/// [`Processor::max_timers_per_round`]) fires one round a turn.
const FIRING_TIME_PER_TURN: Duration = Duration::from_secs(10);

/// What a call of [`Engine::fire_partition`] did: its committed rounds' outputs, the
/// timers it fired and whether due timers are left.
struct Fired {
    out: Vec<OutboxEntry>,
    timers: usize,
    left: bool,
}

struct Part {
    store: PartitionStore,
    pending: Pending,
    clock: Clock,
    /// The batch's dead letters (by reason) and fired timers, counted once it commits:
    /// a batch abandoned and done again must not count them twice.
    uncounted: BatchCounts,
}

/// Counts of a batch not yet committed (see [`Part::uncounted`]).
#[derive(Default)]
struct BatchCounts {
    dead_letters: Vec<DeadLetterReason>,
    timers_fired: u64,
}

impl BatchCounts {
    /// Adds the committed batch's counts to the metrics.
    fn count(&mut self, metrics: &RuntimeMetrics) {
        for reason in self.dead_letters.drain(..) {
            metrics
                .dead_letters
                .with_label_values(&[reason.as_str()])
                .inc();
        }
        metrics
            .timers_fired
            .inc_by(std::mem::take(&mut self.timers_fired));
    }
}

/// Owns the partition stores of one process and drives a [`Processor`] over them.
pub struct Engine<P: Processor> {
    pub processor: P,
    factory: StoreFactory,
    parts: BTreeMap<i32, Part>,
    mode: ClockMode,
    /// How far ahead of the machine's clock (`clock.max_event_lead`) or, in event-time
    /// mode, of its partition's event time (`clock.max_event_gap`) a raw input may be.
    event_bounds: EventBounds,
    dead_letter_topic: String,
    metrics: RuntimeMetrics,
    /// Where committed state is replicated, so a partition can move (None in replay).
    changelog_topic: Option<String>,
    /// Persist outputs in the outbox until acknowledged (off in replay).
    durable_outputs: bool,
    /// Replicates write-ahead records to the changelog (a service with one).
    write_ahead: Option<Arc<dyn WriteAhead>>,
}

impl<P: Processor> Engine<P> {
    pub fn new(processor: P, config: &Config, metrics: RuntimeMetrics) -> anyhow::Result<Self> {
        let root = config.state.dir.join(processor.name());
        std::fs::create_dir_all(&root)
            .with_context(|| format!("cannot create state directory {}", root.display()))?;
        let factory = StoreFactory::new(&root, config.state.block_cache_bytes)?
            .with_timers_in_memory(config.timers_in_memory_per_store());
        Ok(Engine {
            event_bounds: EventBounds {
                lead: config.clock.max_event_lead.as_millis() as Millis,
                gap: config.clock.max_event_gap.as_millis() as Millis,
            },
            dead_letter_topic: config.topic(topics::DEAD_LETTER),
            processor,
            factory,
            parts: BTreeMap::new(),
            mode: config.clock.mode,
            metrics,
            changelog_topic: None,
            durable_outputs: true,
            write_ahead: None,
        })
    }

    /// Replay mode: outputs go straight to the caller, no outbox, and the stores skip
    /// RocksDB's write-ahead log (see [`StoreFactory::without_write_ahead_log`]).
    pub fn for_replay(mut self) -> Self {
        self.durable_outputs = false;
        self.factory = self.factory.without_write_ahead_log();
        self
    }

    /// Replicates every committed write to `topic` (one partition per state partition).
    pub fn with_changelog(mut self, topic: String) -> Self {
        self.changelog_topic = Some(topic);
        self
    }

    /// Replicates write-ahead records ([`Ctx::put_now`]) through `write_ahead` to the
    /// changelog, if the engine has one.
    pub fn with_write_ahead(mut self, write_ahead: Arc<dyn WriteAhead>) -> Self {
        self.write_ahead = Some(write_ahead);
        self
    }

    pub fn changelog_topic(&self) -> Option<&str> {
        self.changelog_topic.as_deref()
    }

    pub fn factory(&self) -> &StoreFactory {
        &self.factory
    }

    pub fn owns(&self, partition: i32) -> bool {
        self.parts.contains_key(&partition)
    }

    /// The state partition that applies records of input partition `partition`.
    pub fn state_partition(&self, partition: i32) -> i32 {
        if self.processor.single_state_partition() {
            0
        } else {
            partition
        }
    }

    /// Where the applied offset of an input topic-partition is kept in its store.
    fn offset_key<'t>(&self, topic: &'t str, partition: i32) -> std::borrow::Cow<'t, str> {
        if self.processor.single_state_partition() {
            format!("{topic}#{partition}").into()
        } else {
            topic.into()
        }
    }

    pub fn owned(&self) -> Vec<i32> {
        self.parts.keys().copied().collect()
    }

    /// Opens a partition's store; returns its unacknowledged outbox to publish again.
    pub fn open(&mut self, partition: i32) -> anyhow::Result<Vec<OutboxEntry>> {
        if self.parts.contains_key(&partition) {
            return Ok(Vec::new());
        }
        let store = self.factory.open(partition)?;
        // A restore took the clean-close mark already; without a changelog none ran,
        // and a mark left from a run with one would outlive the writes that follow.
        store.take_clean_close()?;
        let clock = Clock::new(self.mode, store.event_time()?);
        let backlog = store.outbox()?;
        // Outputs acknowledged before a crash whose deletion the changelog lacks: the
        // next commit sends it.
        let mut pending = Pending::default();
        pending.keep_acknowledged_outputs(store.acknowledged_not_replicated()?);
        self.parts.insert(
            partition,
            Part {
                store,
                pending,
                clock,
                uncounted: BatchCounts::default(),
            },
        );
        self.metrics.owned_partitions.set(self.parts.len() as i64);
        tracing::info!(
            service = self.processor.name(),
            partition,
            outbox = backlog.len(),
            "partition opened"
        );
        Ok(backlog)
    }

    /// Drops `partition`. Its store is marked clean if the changelog holds all of it
    /// (see [`PartitionStore::mark_closed_clean`]), so that when the partition comes
    /// back, only what others wrote meanwhile is read.
    pub fn close(&mut self, partition: i32) {
        self.processor.on_partition_closed(partition);
        if let Some(part) = self.parts.remove(&partition) {
            let clean_end = match &self.changelog_topic {
                Some(_) => part
                    .store
                    .mark_closed_clean(wall_now())
                    .unwrap_or_else(|e| {
                        tracing::warn!(partition, error = %e, "cannot mark the store clean");
                        None
                    }),
                None => None,
            };
            tracing::info!(
                service = self.processor.name(),
                partition,
                ?clean_end,
                "partition closed"
            );
        }
        self.metrics.owned_partitions.set(self.parts.len() as i64);
    }

    /// Closes every partition (the process stops).
    pub fn close_all(&mut self) {
        let owned: Vec<i32> = self.parts.keys().copied().collect();
        for p in owned {
            self.close(p);
        }
    }

    /// The offset of the last applied record of each topic, per owned partition.
    pub fn applied_offsets(&self) -> anyhow::Result<Vec<(String, i32, i64)>> {
        let mut out = Vec::new();
        for (p, part) in &self.parts {
            for (topic, offset) in part.store.applied_offsets()? {
                match topic.rsplit_once('#') {
                    Some((t, input)) if self.processor.single_state_partition() => {
                        let input = input.parse().with_context(|| {
                            format!("bad offset key {topic:?} in partition {p}")
                        })?;
                        out.push((t.to_string(), input, offset));
                    }
                    _ => out.push((topic, *p, offset)),
                }
            }
        }
        Ok(out)
    }

    /// Applies one record (and the event-time timers it makes due). With an outbox the
    /// outputs wait for the commit and nothing is returned; without one (replay) every
    /// output the record caused is returned at once: a stage that feeds itself (the
    /// arbiter's merged ledgers) or the next stage sees them in event order, not only
    /// when the batch commits, so a replay's results do not depend on its batch size.
    pub fn handle(&mut self, record: &Record<'_>) -> anyhow::Result<Vec<OutboxEntry>> {
        self.handle_decoded(record, None)
    }

    /// [`Engine::handle`] for a record whose payload the caller has decoded already
    /// (`decoded`, as the processor's `decode` gives it for this record), so it is not
    /// decoded twice. `None` decodes it here.
    pub fn handle_decoded(
        &mut self,
        record: &Record<'_>,
        decoded: Option<P::Input>,
    ) -> anyhow::Result<Vec<OutboxEntry>> {
        let state_partition = self.state_partition(record.partition);
        let applied = self.apply(record, decoded);
        self.or_abandon(state_partition, applied)?;
        if self.durable_outputs {
            return Ok(Vec::new());
        }
        Ok(self
            .parts
            .get_mut(&state_partition)
            .map(|part| part.store.take_outputs(&mut part.pending))
            .unwrap_or_default())
    }

    fn apply(&mut self, record: &Record<'_>, decoded: Option<P::Input>) -> anyhow::Result<()> {
        let state_partition = self.state_partition(record.partition);
        let offset_key = self.offset_key(record.topic, record.partition);
        let Some(part) = self.parts.get_mut(&state_partition) else {
            // Not ours (revoked in the middle of a batch): the owner will process it.
            return Ok(());
        };
        self.metrics.input_records.inc(&[record.topic]);
        if let Some(applied) = part.store.applied_offset(&part.pending, &offset_key)? {
            if record.offset <= applied {
                self.metrics
                    .duplicate_records
                    .with_label_values(&[record.topic])
                    .inc();
                return Ok(());
            }
        }
        let decoded = decoded
            .map_or_else(|| self.processor.decode(record), Ok)
            .and_then(|input| {
                if self.processor.is_raw_input(record.topic) {
                    let clocks = EventClocks {
                        partition: part.clock.event_time(),
                        // A live service must not stop for good; a replay stays the
                        // same whenever it runs.
                        live: self.durable_outputs,
                    };
                    check_event_lead(&self.processor, self.mode, self.event_bounds, clocks, input)
                } else {
                    Ok(input)
                }
            });
        let input = match decoded {
            Ok(input) => input,
            Err(rejection) => {
                let now = part.clock.now();
                dead_letter(
                    self.processor.name(),
                    &self.dead_letter_topic,
                    part,
                    record,
                    &rejection,
                    now,
                );
                part.store
                    .set_applied_offset(&mut part.pending, &offset_key, record.offset);
                return Ok(());
            }
        };
        if self.mode == ClockMode::Event {
            if let Some(t) = self.processor.event_time(&input) {
                if t > part.clock.event_time() {
                    // Timers due before this event fire first, as they would have
                    // in real time.
                    let due = part.store.next_timer(&part.pending)?;
                    if due.is_some_and(|d| d <= t) {
                        self.fire_partition(state_partition, t, false, MAX_FIRING_ROUNDS, None)?;
                    }
                    let Some(part) = self.parts.get_mut(&state_partition) else {
                        return Ok(());
                    };
                    part.clock.observe(t);
                    part.store.set_event_time(&mut part.pending, t);
                }
            }
        }
        let Some(part) = self.parts.get_mut(&state_partition) else {
            return Ok(());
        };
        let mut ctx = Ctx {
            partition: state_partition,
            now: part.clock.now(),
            store: &part.store,
            pending: &mut part.pending,
            metrics: &self.metrics,
            write_ahead: write_ahead_target(&self.write_ahead, &self.changelog_topic),
            writes_ahead: self.processor.writes_ahead(),
            uncounted: &mut part.uncounted,
        };
        self.processor.process(&mut ctx, input)?;
        part.store
            .set_applied_offset(&mut part.pending, &offset_key, record.offset);
        if self.mode == ClockMode::Event {
            // A timer set at or before the current event time (a late event, a zero
            // delay) fires right after the record that set it, not at a batch
            // boundary, so results do not depend on how input was batched.
            let clock = part.clock.event_time();
            let due = part.store.next_timer(&part.pending)?;
            if due.is_some_and(|d| d <= clock) {
                self.fire_partition(state_partition, clock, false, MAX_FIRING_ROUNDS, None)?;
            }
        }
        Ok(())
    }

    fn commit_partition(&mut self, partition: i32) -> anyhow::Result<Vec<OutboxEntry>> {
        let Some(part) = self.parts.get_mut(&partition) else {
            return Ok(Vec::new());
        };
        let mut ctx = Ctx {
            partition,
            now: part.clock.now(),
            store: &part.store,
            pending: &mut part.pending,
            metrics: &self.metrics,
            write_ahead: write_ahead_target(&self.write_ahead, &self.changelog_topic),
            writes_ahead: self.processor.writes_ahead(),
            uncounted: &mut part.uncounted,
        };
        self.processor.flush(&mut ctx)?;
        let committed = part.store.commit_with(
            &mut part.pending,
            self.changelog_topic.as_deref(),
            self.durable_outputs,
        )?;
        part.uncounted.count(&self.metrics);
        Ok(committed)
    }

    /// Serves `request` from `partition`'s state (see [`Processor::serve`]); its
    /// changes join the partition's batch. An error abandons the batch.
    pub fn serve(&mut self, partition: i32, request: &[u8]) -> anyhow::Result<Vec<u8>> {
        let Some(part) = self.parts.get_mut(&partition) else {
            anyhow::bail!("partition {partition} is not owned");
        };
        let mut ctx = Ctx {
            partition,
            now: part.clock.now(),
            store: &part.store,
            pending: &mut part.pending,
            metrics: &self.metrics,
            write_ahead: write_ahead_target(&self.write_ahead, &self.changelog_topic),
            writes_ahead: self.processor.writes_ahead(),
            uncounted: &mut part.uncounted,
        };
        let served = self.processor.serve(&mut ctx, request);
        self.or_abandon(partition, served)
    }

    /// Commits every partition's pending batch.
    pub fn commit(&mut self) -> anyhow::Result<Vec<OutboxEntry>> {
        let mut out = Vec::new();
        for p in self.owned() {
            let committed = self.commit_partition(p);
            append_outputs(&mut out, self.or_abandon(p, committed)?);
        }
        Ok(out)
    }

    /// `result` of work on `partition`'s batch, abandoning the batch if it failed.
    fn or_abandon<T>(&mut self, partition: i32, result: anyhow::Result<T>) -> anyhow::Result<T> {
        if result.is_err() {
            self.abandon_batch(partition);
        }
        result
    }

    /// A batch of `partition` failed part-way: none of it may commit, and none of it
    /// may linger in memory and leak into a later batch. The processor drops what it
    /// cached for the partition and the store is opened again (its pending writes and
    /// in-memory timer index go with the old one), so the engine holds exactly the last
    /// commit, as a restarted process would, whatever its caller does next. Outputs of
    /// earlier commits still in the outbox were handed out when they committed.
    fn abandon_batch(&mut self, partition: i32) {
        let owned = self.parts.contains_key(&partition);
        // Outputs acknowledged before the batch stay acknowledged: their deletion
        // still has to reach the changelog.
        let acknowledged = self
            .parts
            .get_mut(&partition)
            .map(|part| part.pending.take_acknowledged_outputs())
            .unwrap_or_default();
        self.close(partition);
        if !owned {
            return;
        }
        tracing::warn!(
            service = self.processor.name(),
            partition,
            "batch failed: its changes are dropped and the partition reopened at its last commit"
        );
        match self.open(partition) {
            Ok(_) => {
                if let Some(part) = self.parts.get_mut(&partition) {
                    part.pending.keep_acknowledged_outputs(acknowledged);
                }
            }
            Err(e) => tracing::error!(
                service = self.processor.name(),
                partition,
                error = format!("{e:#}"),
                "partition does not open again after a failed batch; it stays closed"
            ),
        }
    }

    /// Fires due timers of every partition (committing as it goes).
    pub fn fire_due(&mut self) -> anyhow::Result<Vec<OutboxEntry>> {
        Ok(self.fire_due_where(|_| true, MAX_FIRING_ROUNDS, None)?.0)
    }

    /// [`Engine::fire_due`] for the partitions `ready` accepts (the others' timers
    /// wait for the input backlog found at their assignment, see [`BacklogGates`]),
    /// at most `max_rounds` committed rounds of firing per partition, so the outputs
    /// to publish stay bounded. Past `deadline`, no further round starts once one
    /// fired a timer; the partitions whose timers are the most overdue go first, so
    /// a call cut short by it starves none. Returns the outputs, and whether due
    /// timers are left: the caller publishes, then calls again.
    pub fn fire_due_where(
        &mut self,
        ready: impl Fn(i32) -> bool,
        max_rounds: usize,
        deadline: Option<Instant>,
    ) -> anyhow::Result<(Vec<OutboxEntry>, bool)> {
        let mut out = Vec::new();
        let mut more = false;
        let mut timers = 0;
        let mut due = Vec::new();
        for p in self.owned().into_iter().filter(|p| ready(*p)) {
            let part = &self.parts[&p];
            let next = part
                .store
                .next_timer(&part.pending)
                .map_err(anyhow::Error::from);
            if let Some(at) = self.or_abandon(p, next)? {
                due.push((at, p));
            }
        }
        due.sort_unstable();
        for (_, p) in due {
            if timers > 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                more = true;
                break;
            }
            let now = match self.mode {
                ClockMode::Wall => wall_now(),
                ClockMode::Event => self.parts[&p].clock.event_time(),
            };
            let fired = self.fire_partition(p, now, true, max_rounds, deadline);
            let fired = self.or_abandon(p, fired)?;
            out.extend(fired.out);
            timers += fired.timers;
            more |= fired.left;
        }
        Ok((out, more))
    }

    /// Fires the timers of `partition` due by `now`. Timers are read from the store
    /// merged with the batch's pending writes, so no commit is needed first; with
    /// `commit`, each round of firing is committed and its records returned for
    /// publishing (without, nothing is returned: the batch commits later).
    /// At most `max_rounds` rounds of up to [`TIMERS_PER_ROUND`] timers (committed
    /// ones: the processor's fewer), none after the first once past `deadline`.
    fn fire_partition(
        &mut self,
        partition: i32,
        now: Millis,
        commit: bool,
        max_rounds: usize,
        deadline: Option<Instant>,
    ) -> anyhow::Result<Fired> {
        let mut out = Vec::new();
        let mut timers = 0;
        // Slow timers keep the loop from its consumer only between commits.
        let per_round = match self.processor.max_timers_per_round() {
            Some(n) if commit => n.clamp(1, TIMERS_PER_ROUND),
            _ => TIMERS_PER_ROUND,
        };
        for round in 0..=max_rounds {
            let Some(part) = self.parts.get_mut(&partition) else {
                break;
            };
            if part
                .store
                .next_timer(&part.pending)?
                .is_none_or(|d| d > now)
            {
                break;
            }
            let past_deadline = round > 0 && deadline.is_some_and(|d| Instant::now() >= d);
            if round == max_rounds || past_deadline {
                return Ok(Fired {
                    out,
                    timers,
                    left: true,
                });
            }
            // Always the earliest due timer next, read afresh each time: one a
            // handler just set, due before the others, fires first, so timers fire
            // in order of time then id whatever the round's size or the timers held
            // in memory.
            let mut fired = 0;
            while fired < per_round {
                let Some((fire_at, timer_id)) = part.store.next_due(&part.pending, now)? else {
                    break;
                };
                fired += 1;
                // In event time a timer fires at its own time, unless the clock had
                // already passed it (a timer set by a late event): then it is late.
                let timer_now = match self.mode {
                    ClockMode::Wall => wall_now(),
                    ClockMode::Event => fire_at.max(part.clock.event_time()),
                };
                // A timer fired just before may have moved, cancelled or re-set it.
                let Some(payload) =
                    part.store
                        .complete_timer(&mut part.pending, &timer_id, fire_at)?
                else {
                    continue;
                };
                let timer = DueTimer {
                    timer_id: timer_id.to_string(),
                    fire_at,
                    payload,
                };
                let mut ctx = Ctx {
                    partition,
                    now: timer_now,
                    store: &part.store,
                    pending: &mut part.pending,
                    metrics: &self.metrics,
                    write_ahead: write_ahead_target(&self.write_ahead, &self.changelog_topic),
                    writes_ahead: self.processor.writes_ahead(),
                    uncounted: &mut part.uncounted,
                };
                self.processor.on_timer(&mut ctx, &timer)?;
                part.uncounted.timers_fired += 1;
            }
            timers += fired;
            if commit {
                out.extend(self.commit_partition(partition)?);
            }
        }
        Ok(Fired {
            out,
            timers,
            left: false,
        })
    }

    /// Event-time mode: moves every partition's clock to `t` (a heartbeat), firing
    /// the timers due by then.
    pub fn advance_time(&mut self, t: Millis) -> anyhow::Result<Vec<OutboxEntry>> {
        let mut out = self.commit()?;
        for p in self.owned() {
            let fired = self.fire_partition(p, t, true, MAX_FIRING_ROUNDS, None);
            out.extend(self.or_abandon(p, fired)?.out);
            if let Some(part) = self.parts.get_mut(&p) {
                if t > part.clock.event_time() {
                    part.clock.observe(t);
                    part.store.set_event_time(&mut part.pending, t);
                }
            }
        }
        out.extend(self.commit()?);
        Ok(out)
    }

    pub fn mode(&self) -> ClockMode {
        self.mode
    }

    /// Per owned partition whose store can tell (see
    /// [`PartitionStore::next_own_changelog_offset`]), where its next changelog record
    /// must land if no other instance wrote there since: what [`publish_fenced`]
    /// checks.
    fn own_spans(&self) -> anyhow::Result<HashMap<i32, OwnSpan>> {
        let mut spans = HashMap::new();
        if self.changelog_topic.is_none() {
            return Ok(spans);
        }
        for (p, part) in &self.parts {
            if let Some(span) = OwnSpan::of(&part.store) {
                spans.insert(*p, span);
            }
        }
        Ok(spans)
    }

    /// Publishes `out` through [`publish_fenced`] and settles what came back: the
    /// acknowledged records leave the outbox, records between this instance's own that
    /// a restore leaves out are counted as the store's, and partitions another
    /// instance has claimed are let go without acknowledging anything of theirs (the
    /// store no longer equals the changelog: if the partition comes back, it is
    /// rebuilt).
    ///
    /// `leaving`: partitions being revoked. One of them found claimed is the usual
    /// race of a rebalance (this instance publishes its last commit after the consumer
    /// rejoined): noted, not counted as fenced.
    pub async fn publish(
        &mut self,
        out: Vec<OutboxEntry>,
        to: &Publisher<'_>,
        cancel: &CancellationToken,
        leaving: &[i32],
    ) -> anyhow::Result<Published> {
        // A write-ahead record sent without waiting (a provider's refusal after the
        // message body withdrawing its commit point) goes by another producer: were it
        // retried after this commit's changelog records, which may delete its key, a
        // rebuild from the changelog would end with it. So it lands first.
        // Awaited, not blocked on: a broker slow to answer holds no runtime thread.
        let unplaced: Vec<(i32, Vec<rdkafka::producer::DeliveryFuture>)> = (self.parts.iter())
            .map(|(p, part)| (*p, part.store.claim_watch().take_unplaced()))
            .filter(|(_, deliveries)| !deliveries.is_empty())
            .collect();
        for (p, deliveries) in unplaced {
            let delivered = futures::future::join_all(deliveries).await;
            if let Some(part) = self.parts.get(&p) {
                let mut watch = part.store.claim_watch();
                for offset in delivered.into_iter().filter_map(|d| d.ok()?.ok()) {
                    watch.note_own(offset.1);
                }
            }
        }
        let own = self.own_spans()?;
        let Publisher {
            producer,
            gap_reader,
            dead_letters,
            metrics,
        } = *to;
        // What waits on the broker while this publish retries (a broker refusing
        // records keeps it here; the loop's periodic look at the outbox waits too).
        let waiting = out.len();
        metrics.outbox_pending.set(waiting as i64);
        // The outputs of stores that wrote ahead wait until their changelog records
        // are checked through the claim watch (their offsets interleave with the
        // write-ahead producer's, so `publish_fenced` cannot count them).
        let watched: Vec<i32> = self
            .parts
            .iter()
            .filter(|(_, part)| part.store.watches_claims())
            .map(|(p, _)| *p)
            .collect();
        let (held, out): (Vec<_>, Vec<_>) = out
            .into_iter()
            .partition(|e| !e.changelog && watched.contains(&e.partition));
        let mut published = publish_fenced(
            producer,
            out,
            &own,
            gap_reader,
            dead_letters,
            metrics,
            cancel,
        )
        .await?;
        for p in watched {
            match self.gap_since_watched(p, &published.acked, gap_reader)? {
                Some(gap) if gap.claimed => published.fenced.push(p),
                // A former owner's records after the claim: written over below, as
                // for a store that does not write ahead.
                Some(gap) => published.gaps.push(gap),
                None => {}
            }
        }
        if published.complete && !held.is_empty() {
            let held = held
                .into_iter()
                .filter(|e| !published.fenced.contains(&e.partition))
                .collect();
            let sent = publish_any_order(producer, held, dead_letters, metrics, cancel).await;
            published
                .acked
                .extend(sent.into_iter().filter(|(_, offset)| *offset >= 0));
        }
        let fenced = std::mem::take(&mut published.fenced);
        let (lost, acked): (Vec<_>, Vec<_>) = std::mem::take(&mut published.acked)
            .into_iter()
            .partition(|(e, _)| fenced.contains(&e.partition));
        published.acked = acked;
        // Noted first, so that the acknowledgement finds the store filling the log.
        for gap in published.gaps.iter().filter(|g| !g.claimed && !g.applied) {
            if let Some(part) = self.parts.get_mut(&gap.partition) {
                part.store.note_skipped_changelog_records(gap.others);
            }
        }
        let repairs: Vec<&Gap> = published
            .gaps
            .iter()
            .filter(|g| !g.claimed && !g.left_out.is_empty())
            .collect();
        // Durable before the acknowledgement notes the end past the former owner's
        // records: killed before the repair, or with the publish cut short, the next
        // open of the store rebuilds instead of taking it as current.
        for gap in &repairs {
            if let Some(part) = self.parts.get(&gap.partition) {
                part.store.note_repair_pending()?;
            }
        }
        self.acknowledge(&published.acked)?;
        for gap in repairs {
            if let Some(part) = self.parts.get_mut(&gap.partition) {
                // Not after a publish cut short: a marker after its acknowledged part
                // would make that part look whole. The note stays, and the rebuild
                // writes them again.
                if !published.complete {
                    part.store.owe_repair();
                    continue;
                }
                if let Err(e) = write_again(producer, &mut part.store, gap).await {
                    // The acknowledgement noted the changelog's end past the former
                    // owner's records: forgotten, the restart after this error rebuilds
                    // the partition, leaves those records out and writes the values
                    // again (see `restore_once`) instead of taking the store as current.
                    part.store.forget_changelog_end()?;
                    return Err(e);
                }
                part.store.clear_repair_pending()?;
            }
        }
        for p in &fenced {
            let unacknowledged = lost.iter().filter(|(e, _)| e.partition == *p).count();
            self.let_go_claimed(*p, leaving.contains(p), unacknowledged);
        }
        published.fenced = fenced;
        // Left in the outbox: what the broker did not take (a partition let go takes
        // its outputs along).
        let left = waiting.saturating_sub(published.acked.len() + lost.len());
        metrics.outbox_pending.set(left as i64);
        Ok(published)
    }

    /// What lies between the claim of partition `p`, whose store wrote ahead, and the
    /// last of its changelog records in `acked` that is not the store's own, if
    /// anything: read only where records not known to be its own lie there (see
    /// [`crate::store::ClaimWatch`]). A claim by another instance among them, or a
    /// former owner's records, which a restore leaves out.
    fn gap_since_watched(
        &self,
        p: i32,
        acked: &[(OutboxEntry, i64)],
        reader: &ChangelogReader,
    ) -> anyhow::Result<Option<Gap>> {
        let (Some(part), Some(topic)) = (self.parts.get(&p), self.changelog_topic.as_deref())
        else {
            return Ok(None);
        };
        let offsets: Vec<i64> = acked
            .iter()
            .filter(|(e, offset)| e.changelog && e.partition == p && *offset >= 0)
            .map(|(_, offset)| *offset)
            .collect();
        let Some(&last) = offsets.iter().max() else {
            return Ok(None);
        };
        let mut found = None;
        claimed_before(&part.store, &offsets, last, |range, own| {
            let others = (range.end - range.start) as u64;
            let gap = inspect_gap(reader, topic, p, own, range, others)?;
            let claimed = gap.claimed;
            found = Some(gap);
            Ok(claimed)
        })?;
        Ok(found)
    }

    /// Lets go of partition `p`, which another instance has claimed since this one did:
    /// the usual race of a rebalance when it is `leaving` (this instance published its
    /// last commit after the consumer rejoined), otherwise counted as fenced.
    /// `unacknowledged`: its records this instance will not acknowledge.
    fn let_go_claimed(&mut self, p: i32, leaving: bool, unacknowledged: usize) {
        if leaving {
            tracing::info!(
                service = self.processor.name(),
                partition = p,
                "the partition's new owner claimed it before this instance's last \
                 commit reached the changelog: that commit is left to the new owner"
            );
        } else {
            tracing::error!(
                service = self.processor.name(),
                partition = p,
                unacknowledged,
                "another instance claimed this partition since this one did (this one was \
                 paused or cut off past its session, or still publishing when the partition \
                 moved): its outputs are not published and it is let go"
            );
            self.metrics.partitions_fenced.inc();
        }
        self.close(p);
    }

    /// Runs [`check_changelog_tail`] for every owned partition and lets go of those
    /// another instance has claimed (as [`Engine::publish`] does); returns them.
    pub async fn check_changelog_tails(
        &mut self,
        reader: &ChangelogReader,
        producer: &FutureProducer,
    ) -> anyhow::Result<Vec<i32>> {
        let Some(changelog) = self.changelog_topic.clone() else {
            return Ok(Vec::new());
        };
        let mut fenced = Vec::new();
        for (p, part) in self.parts.iter_mut() {
            let gap = check_changelog_tail(reader, producer, &mut part.store, &changelog).await?;
            if gap.is_some_and(|g| g.claimed) {
                fenced.push(*p);
            }
        }
        for p in &fenced {
            self.let_go_claimed(*p, false, 0);
        }
        Ok(fenced)
    }

    /// Drops acknowledged records from the outbox and records how far the changelog
    /// reflects this store. `acked` pairs each record with its broker offset.
    pub fn acknowledge(&mut self, acked: &[(OutboxEntry, i64)]) -> anyhow::Result<()> {
        let writes_ahead = self.processor.writes_ahead();
        let mut by_part: HashMap<i32, Acknowledged> = HashMap::new();
        for (e, offset) in acked {
            let entry = by_part.entry(e.partition).or_default();
            if e.changelog {
                if writes_ahead {
                    entry.offsets.push(*offset);
                }
                entry.changelog.push(e.outbox_key.clone());
                entry.changelog_max = Some(entry.changelog_max.map_or(*offset, |o| o.max(*offset)));
            } else {
                entry.outputs.push(e.outbox_key.clone());
            }
        }
        let replicated = self.changelog_topic.is_some();
        for (p, acked) in by_part {
            if let Some(part) = self.parts.get_mut(&p) {
                part.store.acknowledge(&acked.changelog)?;
                if replicated {
                    part.store
                        .acknowledge_outputs(&mut part.pending, acked.outputs)?;
                } else {
                    part.store.acknowledge(&acked.outputs)?;
                }
                if let Some(max) = acked.changelog_max {
                    part.store
                        .changelog_acknowledged(acked.changelog.len() as u64, max)?;
                }
                if writes_ahead {
                    part.store.note_own_changelog_offsets(&acked.offsets);
                }
            }
        }
        Ok(())
    }

    /// Acknowledges records that were not published anywhere (replay mode).
    pub fn acknowledge_local(&self, entries: &[OutboxEntry]) -> anyhow::Result<()> {
        if !self.durable_outputs {
            // Nothing was written to the outbox: deleting would only add tombstones.
            return Ok(());
        }
        self.drop_from_outbox(entries)
    }

    /// Deletes outbox records (a backlog found when opening a store for replay).
    pub fn drop_from_outbox(&self, entries: &[OutboxEntry]) -> anyhow::Result<()> {
        let mut by_part: HashMap<i32, Vec<Vec<u8>>> = HashMap::new();
        for e in entries {
            by_part
                .entry(e.partition)
                .or_default()
                .push(e.outbox_key.clone());
        }
        for (p, keys) in by_part {
            if let Some(part) = self.parts.get(&p) {
                part.store.acknowledge(&keys)?;
            }
        }
        Ok(())
    }

    /// Every partition's unacknowledged outbox.
    pub fn outbox(&self) -> anyhow::Result<Vec<OutboxEntry>> {
        let mut out = Vec::new();
        for part in self.parts.values() {
            out.extend(part.store.outbox()?);
        }
        Ok(out)
    }

    /// Refreshes the state gauges.
    pub fn update_gauges(&self) {
        let timers: i64 = self.parts.values().map(|p| p.store.timers_pending()).sum();
        let size: u64 = self.parts.values().map(|p| p.store.size_bytes()).sum();
        self.metrics.timers_pending.set(timers);
        self.metrics.state_size.set(size as i64);
        self.processor.refresh_gauges();
    }

    /// Direct access to a partition's committed state (for tools and tests).
    pub fn store(&self, partition: i32) -> Option<&PartitionStore> {
        self.parts.get(&partition).map(|p| &p.store)
    }
}

/// How far ahead a raw input's event time may be (see [`check_event_lead`]).
#[derive(Debug, Clone, Copy)]
struct EventBounds {
    /// `clock.max_event_lead`: ahead of this machine's clock.
    lead: Millis,
    /// `clock.max_event_gap`: ahead of the partition's event time (event-time mode).
    gap: Millis,
}

/// The event times a raw input is measured against in event-time mode.
#[derive(Debug, Clone, Copy)]
struct EventClocks {
    /// The input's partition's (0 before its first event).
    partition: Millis,
    /// A service reading the broker (not a replay of files).
    live: bool,
}

/// Rejects a raw input whose event time is more than `clock.max_event_lead` ahead of
/// this machine's clock (wall-clock mode) or `clock.max_event_gap` ahead of the
/// partition's event time (event-time mode: there the input's times move the clock,
/// and one event dated years ahead would make every later timer late). A live service
/// in event time also takes an event no further ahead of this machine's clock than a
/// device may be, so a partition quiet for longer than the gap does not refuse all
/// its input for good (heartbeats too). A replay does not: its result must not depend
/// on the day it runs past a partition's first event, nor on how its partitions'
/// records interleave (a partition quiet in the history for longer than the gap needs
/// a longer gap). A partition's first event in event-time mode has no event time to
/// compare with: it is held to `clock.max_event_gap` ahead of this machine's clock
/// (history replayed is never ahead of it).
fn check_event_lead<P: Processor>(
    processor: &P,
    mode: ClockMode,
    bounds: EventBounds,
    clocks: EventClocks,
    input: P::Input,
) -> Result<P::Input, Rejection> {
    let Some(t) = processor.event_time(&input) else {
        return Ok(input);
    };
    // Read only where needed: a replay's events past each partition's first do not.
    let (now, clock_name, setting, bound) = match mode {
        ClockMode::Wall => (
            wall_now(),
            "this machine's clock",
            "clock.max_event_lead",
            bounds.lead,
        ),
        ClockMode::Event if clocks.partition <= 0 => (
            wall_now(),
            "this machine's clock",
            "clock.max_event_gap",
            bounds.gap,
        ),
        ClockMode::Event => (
            clocks.partition,
            "the partition's event time",
            "clock.max_event_gap",
            bounds.gap,
        ),
    };
    if t <= now.saturating_add(bound) {
        return Ok(input);
    }
    if mode == ClockMode::Event && clocks.live && t <= wall_now().saturating_add(bounds.lead) {
        return Ok(input);
    }
    let duration = |ms: Millis| {
        humantime_serde::re::humantime::format_duration(std::time::Duration::from_secs(
            (ms / 1000) as u64,
        ))
    };
    let mut reason = format!(
        "event time {} is {} ahead of {clock_name} ({}); at most {setting} = {} is accepted",
        crate::time::format_millis(t),
        duration(t - now),
        crate::time::format_millis(now),
        duration(bound),
    );
    if mode == ClockMode::Event && clocks.partition > 0 && clocks.live {
        reason.push_str(&format!(
            ", or up to clock.max_event_lead = {} ahead of this machine's clock",
            duration(bounds.lead)
        ));
    }
    Err(Rejection::new(DeadLetterReason::invalid_field, reason))
}

fn dead_letter(
    service: &str,
    topic: &str,
    part: &mut Part,
    record: &Record<'_>,
    rejection: &Rejection,
    now: Millis,
) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let id = deterministic_id(&[
        service,
        record.topic,
        &record.partition.to_string(),
        &record.offset.to_string(),
    ]);
    // In base64 a record near the broker's size limit would no longer fit it, and its
    // letter (and the letter's changelog copy) would be refused for ever: a sample of
    // it goes, the whole stays at its source offset.
    // The key counts three times: in the letter, as the letter's own key, and again
    // as the key of the letter's changelog copy.
    // The reason (at most `MAX_REASON_BYTES` and a note) counts as escaped JSON at
    // its worst, six bytes a character.
    let mut reason = rejection.message.clone();
    let whole = record.payload.len() + 3 * record.key.map_or(0, <[u8]>::len) + 6 * reason.len();
    let (payload, record_key) = if whole > DEAD_LETTER_WHOLE_PAYLOAD {
        let payload = sample_for_letter("payload", record.payload, &mut reason);
        (
            payload,
            record.key.map(|k| sample_for_letter("key", k, &mut reason)),
        )
    } else {
        (record.payload, record.key)
    };
    let letter = DeadLetter {
        dead_letter_id: id.clone(),
        service: service.to_string(),
        source_topic: record.topic.to_string(),
        source_partition: record.partition,
        source_offset: record.offset,
        reason_code: rejection.reason,
        reason,
        key_base64: record_key.map(|k| b64.encode(k)),
        payload_base64: b64.encode(payload),
        failed_at: now,
    };
    tracing::warn!(
        service,
        topic = record.topic,
        partition = record.partition,
        offset = record.offset,
        reason = rejection.reason.as_str(),
        message = %rejection.message,
        "record sent to the dead-letter topic"
    );
    part.uncounted.dead_letters.push(rejection.reason);
    let key = record_key.map(|k| k.to_vec()).unwrap_or(id.into_bytes());
    part.store
        .emit(&mut part.pending, topic, &key, encode_internal(&letter));
}

enum RebalanceEvent {
    Assign(Vec<i32>),
    Revoke(Vec<i32>),
}

/// Consumer context: records rebalances for the processing loop, lag from statistics.
struct KairosContext {
    rebalances: Arc<Mutex<Vec<RebalanceEvent>>>,
    /// Assignments so far: the processing loop tells by it which records of a batch
    /// were fetched before the latest one.
    assignments: Arc<AtomicU64>,
    metrics: RuntimeMetrics,
}

impl ClientContext for KairosContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        if let Some(topic) = input_lost_topic(level, facility, message) {
            self.metrics
                .input_offset_resets
                .with_label_values(&[topic])
                .inc();
            tracing::error!(
                topic,
                detail = message,
                "input lost: the broker deleted records of this partition before they were \
                 read (retention shorter than the time the service was down or behind); \
                 reading goes on from the earliest record it holds"
            );
            return;
        }
        rdkafka::client::DefaultClientContext.log(level, facility, message);
    }

    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (p, part) in &t.partitions {
                note_lag(&self.metrics, topic, *p, part.desired, part.consumer_lag);
            }
        }
    }
}

/// The topic of a librdkafka log line that tells of a consumer position reset because
/// the broker no longer holds the offset to read (`auto.offset.reset` applied after an
/// out-of-range fetch). librdkafka reports it only as a warning in its log, as
/// "<topic> [<partition>]: offset reset (at offset ...) to ...: ...": resets without an
/// error (a group's first read) are debug lines. The line may begin with the thread
/// that logged it.
fn input_lost_topic<'a>(
    level: RDKafkaLogLevel,
    facility: &str,
    message: &'a str,
) -> Option<&'a str> {
    let warned = (level as i32) <= (RDKafkaLogLevel::Warning as i32);
    // Not every reset is a loss: one after a failed offset lookup (no right to read
    // the topic) or a log truncation is not "offset not available".
    if !warned
        || facility != "OFFSET"
        || !message.contains("]: offset reset (at offset ")
        || !message.contains("requested offset not available")
    {
        return None;
    }
    // After the thread that logged it: "[thrd:main]: ".
    let message = match message.strip_prefix("[thrd:") {
        Some(rest) => rest.split_once("]: ")?.1,
        None => message,
    };
    let (topic, rest) = message.split_once(" [")?;
    // Reading on from an offset at or below the one asked for (a topic made again, an
    // offset past its end) reads records again: nothing skipped. A reset whose new
    // offset librdkafka has yet to ask for counts: so, on a cluster (whose answer to
    // the failed fetch does not tell where the log starts), does every out-of-range
    // reset, a topic made again included (an incident too).
    let (asked, to) = rest.split_once("(at offset ")?.1.split_once(") to ")?;
    let asked = leading_number(asked);
    let to = to.split(':').next().unwrap_or_default();
    let to = to
        .rsplit_once("offset ")
        .and_then(|(_, after)| leading_number(after));
    match (asked, to) {
        (Some(asked), Some(to)) if to <= asked => None,
        _ => Some(topic),
    }
}

/// The decimal number `text` begins with, if it does.
fn leading_number(text: &str) -> Option<i64> {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    text[..end].parse().ok()
}

/// Sets the lag of one partition from librdkafka's statistics, for partitions this
/// consumer is assigned (`desired`). librdkafka goes on reporting the last lag of a
/// partition given up in a rebalance, frozen: counted by its new owner too, it would
/// keep a lag alert firing. Its series goes.
fn note_lag(metrics: &RuntimeMetrics, topic: &str, partition: i32, desired: bool, lag: i64) {
    if partition < 0 {
        return;
    }
    let labels = [topic, &partition.to_string()];
    if !desired {
        let _ = metrics.consumer_lag.remove_label_values(&labels);
    } else if lag >= 0 {
        metrics.consumer_lag.with_label_values(&labels).set(lag);
    }
}

impl ConsumerContext for KairosContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let event = match rebalance {
            Rebalance::Assign(tpl) => {
                // Lag exists from the assignment on; statistics fill in the real value.
                for e in tpl.elements() {
                    // Creates the series at 0 if missing, keeps a known value otherwise.
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[e.topic(), &e.partition().to_string()]);
                }
                self.assignments.fetch_add(1, Ordering::AcqRel);
                RebalanceEvent::Assign(tpl.elements().iter().map(|e| e.partition()).collect())
            }
            Rebalance::Revoke(tpl) => {
                // A partition that moved away is another instance's lag now.
                for e in tpl.elements() {
                    let _ = self
                        .metrics
                        .consumer_lag
                        .remove_label_values(&[e.topic(), &e.partition().to_string()]);
                }
                RebalanceEvent::Revoke(tpl.elements().iter().map(|e| e.partition()).collect())
            }
            Rebalance::Error(e) => {
                tracing::error!(error = %e, "rebalance error");
                return;
            }
        };
        if let Ok(mut q) = self.rebalances.lock() {
            q.push(event);
        }
    }
}

/// What the broker acknowledged of one partition's outbox.
#[derive(Default)]
struct Acknowledged {
    changelog: Vec<Vec<u8>>,
    changelog_max: Option<i64>,
    /// The changelog records' offsets, for a processor that writes ahead (see
    /// [`crate::store::ClaimWatch`]).
    offsets: Vec<i64>,
    outputs: Vec<Vec<u8>>,
}

/// Publishes outbox entries and waits for the broker; retries failures until they go
/// through or `cancel` fires (they stay in the outbox either way). Returns the
/// acknowledged records with their offsets.
///
/// Changelog records go first, and outputs only once every changelog record is
/// acknowledged. An instance that restores the partition from the changelog counts the
/// commit's inputs as applied, so its outputs must be there for it to publish (the
/// outbox is in the changelog); an output published before its commit reached the
/// changelog could be decided again differently by that instance (another clock, so
/// another channel or send id).
pub async fn publish(
    producer: &FutureProducer,
    entries: Vec<OutboxEntry>,
    dead_letters: &OutputDeadLetters,
    metrics: &RuntimeMetrics,
    cancel: &CancellationToken,
) -> Vec<(OutboxEntry, i64)> {
    let (changelog, outputs): (Vec<_>, Vec<_>) = entries.into_iter().partition(|e| e.changelog);
    let mut acked = Vec::new();
    let mut complete = true;
    for wave in changelog_waves(changelog) {
        let sent = publish_in_order(producer, wave.entries, wave.in_commit, metrics, cancel).await;
        complete = sent.iter().all(|(_, offset)| *offset >= 0);
        acked.extend(sent);
        if !complete {
            // The rest stays in the outbox, unsent: a marker must not overtake.
            break;
        }
    }
    if complete {
        acked.extend(publish_any_order(producer, outputs, dead_letters, metrics, cancel).await);
    }
    acked.retain(|(_, offset)| *offset >= 0);
    acked
}

/// Where a service publishes, and what reads what lies between its own changelog
/// records (see [`Engine::publish`]).
#[derive(Clone, Copy)]
pub struct Publisher<'a> {
    pub producer: &'a FutureProducer,
    pub gap_reader: &'a ChangelogReader,
    pub dead_letters: &'a OutputDeadLetters,
    pub metrics: &'a RuntimeMetrics,
}

/// Where an instance's next changelog record of a partition must land if it is still
/// the partition's only writer, and what it writes under (see
/// [`PartitionStore::next_own_changelog_offset`]).
#[derive(Debug, Clone)]
pub struct OwnSpan {
    pub next: i64,
    pub writer: Arc<str>,
    pub epoch: i64,
}

impl OwnSpan {
    /// `store`'s span, if it can tell one (it claimed its partition and writes only
    /// through commits).
    fn of(store: &PartitionStore) -> Option<OwnSpan> {
        Some(OwnSpan {
            next: store.next_own_changelog_offset()?,
            writer: store.writer.clone(),
            epoch: store.epoch?,
        })
    }
}

/// What [`publish_fenced`] got acknowledged, and what it found between an instance's
/// own changelog records.
#[derive(Debug, Default)]
pub struct Published {
    pub acked: Vec<(OutboxEntry, i64)>,
    /// Partitions another instance claimed since this one did: their outputs were
    /// not published, and this instance must let them go.
    pub fenced: Vec<i32>,
    /// What lay between this instance's own changelog records, where anything did.
    pub gaps: Vec<Gap>,
    /// Every changelog record was acknowledged (the publish was not cut short).
    pub complete: bool,
}

/// [`publish`] that checks, for each changelog partition in `own`, that this
/// publish's changelog records filled the changelog from where the last ones ended.
/// When other records lie between, it reads them (`reader`): a valid claim by another
/// instance (see [`claim`]) means this one lost the partition (it ran on after its
/// session expired, was paused past it, or was still publishing when the partition
/// moved) and is fenced: the partition's outputs are not published, as its new owner
/// decides them from its own state, and a restore leaves out the records this
/// instance wrote under its older epoch.
pub async fn publish_fenced(
    producer: &FutureProducer,
    entries: Vec<OutboxEntry>,
    own: &HashMap<i32, OwnSpan>,
    reader: &ChangelogReader,
    dead_letters: &OutputDeadLetters,
    metrics: &RuntimeMetrics,
    cancel: &CancellationToken,
) -> anyhow::Result<Published> {
    let (changelog, outputs): (Vec<_>, Vec<_>) = entries.into_iter().partition(|e| e.changelog);
    let mut published = Published::default();
    let mut complete = true;
    for wave in changelog_waves(changelog) {
        let sent = publish_in_order(producer, wave.entries, wave.in_commit, metrics, cancel).await;
        complete = sent.iter().all(|(_, offset)| *offset >= 0);
        published.acked.extend(sent);
        if !complete {
            // The rest stays in the outbox, unsent: a marker must not overtake.
            break;
        }
    }
    // Checked whether the publish completed or not: what was acknowledged counts.
    for (partition, topic, between, others) in gaps(&published.acked, own) {
        let gap = inspect_gap(reader, &topic, partition, &own[&partition], between, others)?;
        if gap.claimed {
            published.fenced.push(partition);
        } else if gap.applied {
            tracing::warn!(
                changelog = %topic,
                partition,
                "records of another instance that claimed nothing lie between this \
                 instance's own (one of a version before claims, or a new owner's undo \
                 before its claim): the store is no longer taken to equal the changelog"
            );
        }
        published.gaps.push(gap);
    }
    if complete {
        let outputs = outputs
            .into_iter()
            .filter(|e| !published.fenced.contains(&e.partition))
            .collect();
        let sent = publish_any_order(producer, outputs, dead_letters, metrics, cancel).await;
        published.acked.extend(sent);
    }
    published.acked.retain(|(_, offset)| *offset >= 0);
    published.complete = complete;
    Ok(published)
}

/// Per partition of `own` whose changelog records in `acked` do not lie one after
/// another from its `next` offset: the changelog topic, the offsets from `next` to the
/// last of them, and how many of those other records took (which ones is found by
/// reading them).
fn gaps(
    acked: &[(OutboxEntry, i64)],
    own: &HashMap<i32, OwnSpan>,
) -> Vec<(i32, String, std::ops::Range<i64>, u64)> {
    let mut spans: BTreeMap<i32, (&str, i64, i64)> = BTreeMap::new();
    for (e, offset) in acked.iter().filter(|(e, o)| e.changelog && *o >= 0) {
        let (_, count, last) = spans.entry(e.partition).or_insert((&e.topic, 0, -1));
        *count += 1;
        *last = (*last).max(*offset);
    }
    spans
        .into_iter()
        .filter_map(|(p, (topic, count, last))| {
            let next = own.get(&p)?.next;
            let others = last + 1 - next - count;
            (others > 0).then(|| (p, topic.to_string(), next..last + 1, others as u64))
        })
        .collect()
}

/// What lay between an instance's own changelog records of a partition.
#[derive(Debug, Default)]
pub struct Gap {
    pub partition: i32,
    pub topic: String,
    /// How many records of others (or its own, sent twice) lay between.
    pub others: u64,
    /// A valid claim by another instance among them: the partition is no longer this
    /// one's.
    pub claimed: bool,
    /// Keys of records of a former owner under an older epoch, which a restore leaves
    /// out.
    pub left_out: Vec<Vec<u8>>,
    /// Records of another instance that claimed nothing, which a restore applies (a
    /// version before claims, or a new owner's undo of a torn commit before its claim).
    pub applied: bool,
}

/// Writes again, after a former owner's records found between `store`'s own (`gap`),
/// the values `store` holds for their keys (a tombstone where it holds none) and an
/// end marker: a restore leaves the former owner's records out, but compaction keeps
/// a key's last record whatever its epoch, so without this one of them could become
/// all that is left of its key.
pub async fn write_again(
    producer: &FutureProducer,
    store: &mut PartitionStore,
    gap: &Gap,
) -> anyhow::Result<()> {
    let start = store.next_own_changelog_offset();
    let end_before = store.changelog_end()?;
    let waves = values_again(store, &gap.topic, gap.left_out.clone())?;
    let (count, last) = send_values_again(producer, waves).await?;
    store.note_own_records(count, last)?;
    if start != Some(last + 1 - count as i64) {
        // Others may have written between these records too (the rest of the former
        // owner's commit, still arriving; a store that writes ahead cannot tell, its
        // offsets interleaving with the write-ahead producer's): the next look reads
        // from where this one began, and so does a restore after a crash before that
        // look, as the end noted durably stays before those records (or the store
        // would be taken for current).
        store.skip_changelog_to(start);
        match start.or(end_before) {
            Some(end) => store.set_changelog_end(end)?,
            None => store.forget_changelog_end()?,
        }
    }
    tracing::warn!(
        changelog = %gap.topic,
        partition = gap.partition,
        keys = count - 1,
        "a former owner wrote to this partition after this instance claimed it: its \
         records are left out of the state, and this instance's values written again"
    );
    Ok(())
}

/// Looks at what others wrote to `store`'s changelog partition after its last own
/// record, when no publish of its own would (a partition with no traffic): a claim
/// means the partition moved (returned, `claimed`: the caller lets it go); a former
/// owner's records get this store's values written again after them (see
/// [`write_again`]). Returns what it found, if anything lay there.
pub async fn check_changelog_tail(
    reader: &ChangelogReader,
    producer: &FutureProducer,
    store: &mut PartitionStore,
    changelog: &str,
) -> anyhow::Result<Option<Gap>> {
    // A store that writes ahead cannot count its offsets: it looks from where its
    // claim watch has checked.
    let watched = store.watches_claims();
    let span = match (OwnSpan::of(store), store.epoch) {
        (Some(own), _) => Some(own),
        (None, Some(epoch)) if watched => {
            (store.claim_watch().checked_through()).map(|c| OwnSpan {
                next: c + 1,
                writer: store.writer.clone(),
                epoch,
            })
        }
        _ => None,
    };
    let Some(own) = span else {
        return Ok(None);
    };
    let (next, partition) = (own.next, store.partition);
    let (_, high) = changelog_watermarks(&reader.consumer, changelog, partition)?;
    if high <= next {
        return Ok(None);
    }
    let gap = inspect_gap(
        reader,
        changelog,
        partition,
        &own,
        next..high,
        (high - next) as u64,
    )?;
    if gap.claimed {
        return Ok(Some(gap));
    }
    store.skip_changelog_to(Some(high));
    if !gap.left_out.is_empty() {
        if let Err(e) = write_again(producer, store, &gap).await {
            // The next check looks at the gap again and writes the values again then:
            // left as the last records of their keys, the former owner's would be all
            // a rebuild finds of them once compaction drops the values before.
            store.skip_changelog_to(Some(next));
            return Err(e);
        }
    }
    // Counted once the gap is done with: a gap looked at again after a failed write
    // would count its records twice, and the store could never be marked clean.
    if !gap.applied {
        store.note_skipped_changelog_records(gap.others);
    }
    if watched {
        // Read, and no claim among them: the next check looks after them.
        store.claim_watch().checked_to(high - 1);
    }
    Ok(Some(gap))
}

/// Reads `changelog[partition]` over `range` (which holds this instance's own records
/// too, and `others` records of others) and says what the others are (see [`Gap`]).
fn inspect_gap(
    reader: &ChangelogReader,
    changelog: &str,
    partition: i32,
    own: &OwnSpan,
    range: std::ops::Range<i64>,
    others: u64,
) -> anyhow::Result<Gap> {
    let mut gap = Gap {
        partition,
        topic: changelog.to_string(),
        others,
        ..Gap::default()
    };
    reader.read(
        changelog,
        partition,
        range.start,
        range.end,
        &own.writer,
        &mut |r| {
            if r.own {
                return Ok(true);
            }
            if r.key.starts_with(CLAIM_PREFIX) {
                if claim_expected(&r.key, r.value.as_deref()) == Some(r.offset) {
                    gap.claimed = true;
                    return Ok(false);
                }
            } else if r.epoch.is_some_and(|epoch| epoch < own.epoch) {
                gap.left_out.push(r.key);
            } else {
                gap.applied = true;
            }
            Ok(true)
        },
    )?;
    Ok(gap)
}

/// Changelog records to send together (see [`changelog_waves`]).
struct Wave {
    entries: Vec<OutboxEntry>,
    /// Stamped with [`COMMIT_HEADER`]: the records of a commit that has an end marker.
    in_commit: bool,
}

/// Changelog records in the order they may go: every partition's records first, then
/// its end markers, sent only once all the records are acknowledged (a marker that
/// overtook one of its commit's records would make a torn commit look whole; a marker
/// after records of later commits vouches for them too, as they are all in). Records
/// after a partition's last marker were left in the outbox by a version that wrote no
/// markers: they go unstamped, as that version sent them.
fn changelog_waves(entries: Vec<OutboxEntry>) -> Vec<Wave> {
    let mut by_partition: BTreeMap<i32, Vec<OutboxEntry>> = BTreeMap::new();
    for e in entries {
        by_partition.entry(e.partition).or_default().push(e);
    }
    let mut records = Vec::new();
    let mut markers = Vec::new();
    let mut unmarked = Vec::new();
    for (_, entries) in by_partition {
        let marked = entries
            .iter()
            .rposition(|e| e.key == META_COMMIT_END)
            .map_or(0, |last| last + 1);
        for (i, e) in entries.into_iter().enumerate() {
            match (i < marked, e.key == META_COMMIT_END) {
                (true, true) => markers.push(e),
                (true, false) => records.push(e),
                (false, _) => unmarked.push(e),
            }
        }
    }
    [(records, true), (markers, true), (unmarked, false)]
        .into_iter()
        .filter(|(entries, _)| !entries.is_empty())
        .map(|(entries, in_commit)| Wave { entries, in_commit })
        .collect()
}

/// Sends `entries` as one wave and pairs each with its broker offset, or the error
/// that stopped it. Records are handed to the producer strictly in order, each only
/// once the one before it is queued (a full queue is waited out on the same record),
/// so two records of one key reach the log in the order given; the deliveries are
/// awaited together. A record that cannot be queued fails with its error, and every
/// record after it with `Canceled`, untried.
async fn send_all(
    producer: &FutureProducer,
    entries: &[OutboxEntry],
    in_commit: bool,
) -> Vec<Result<i64, rdkafka::error::KafkaError>> {
    use rdkafka::error::KafkaError;
    let mut deliveries = Vec::with_capacity(entries.len());
    let mut refused = None;
    for e in entries {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&e.topic).key(&e.key[..]);
        if e.changelog {
            // Changelog partition = state partition; an empty value is a tombstone.
            let headers = changelog_headers(&e.writer, e.epoch, in_commit.then_some(COMMIT_HEADER));
            record = record.partition(e.partition).headers(headers);
            if !e.payload.is_empty() {
                record = record.payload(&e.payload[..]);
            }
        } else {
            record = record.payload(&e.payload[..]);
        }
        match crate::kafka::queue_waiting(producer, record).await {
            Ok(delivery) => deliveries.push(delivery),
            Err(error) => {
                refused = Some(error);
                break;
            }
        }
    }
    let mut results: Vec<Result<i64, KafkaError>> = join_all(deliveries)
        .await
        .into_iter()
        .map(|delivery| match delivery {
            Ok(Ok((_, offset))) => Ok(offset),
            Ok(Err((error, _))) => Err(error),
            Err(_) => Err(KafkaError::Canceled),
        })
        .collect();
    if let Some(error) = refused {
        // The refused record carries the refusal; those after it were never tried.
        results.push(Err(error));
        results.resize(entries.len(), Err(KafkaError::Canceled));
    }
    results
}

/// Changelog records, keeping their order in each partition: after a failure, the
/// failed record and every record sent after it go again (a record written twice in a
/// row changes nothing), so a commit's end marker never lands before one of its
/// records. Entries not acknowledged when `cancel` fires are returned with offset -1.
async fn publish_in_order(
    producer: &FutureProducer,
    entries: Vec<OutboxEntry>,
    in_commit: bool,
    metrics: &RuntimeMetrics,
    cancel: &CancellationToken,
) -> Vec<(OutboxEntry, i64)> {
    let mut offsets = vec![-1_i64; entries.len()];
    let mut backoff = Duration::from_millis(200);
    let mut from = 0;
    while from < entries.len() {
        let results = send_all(producer, &entries[from..], in_commit).await;
        let mut first_failed = None;
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(offset) => {
                    offsets[from + i] = offset;
                    metrics.changelog_records.inc();
                }
                // Never tried: one before it could not be queued (counted).
                Err(rdkafka::error::KafkaError::Canceled) => {
                    first_failed.get_or_insert(from + i);
                }
                Err(e) => {
                    metrics.produce_errors.inc();
                    if refused_for_good(&e) {
                        // Retried in vain until the broker's limits change: every later
                        // publish of the service waits behind it.
                        tracing::error!(topic = %entries[from + i].topic, bytes = entries[from + i].payload.len(), error = %e, "the broker refuses a changelog record for good (raise its topic's max.message.bytes and the client's message.max.bytes); retrying");
                    } else {
                        tracing::warn!(topic = %entries[from + i].topic, error = %e, "changelog publish failed; will retry");
                    }
                    first_failed.get_or_insert(from + i);
                }
            }
        }
        let Some(failed) = first_failed else { break };
        if cancel.is_cancelled() || producer_failed_for_good(producer).is_some() {
            // What was sent after the failure may be out of order: not acknowledged.
            offsets[failed..].fill(-1);
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        from = failed;
    }
    entries.into_iter().zip(offsets).collect()
}

/// Where a service's output records go when the broker refuses them for good.
pub struct OutputDeadLetters {
    service: String,
    topic: String,
}

impl OutputDeadLetters {
    pub fn new(config: &Config, service: &str) -> Self {
        OutputDeadLetters {
            service: service.to_string(),
            topic: config.topic(topics::DEAD_LETTER),
        }
    }

    /// The dead letter of `entry`, refused with `error`. A record refused for its size
    /// keeps the first [`REFUSED_PAYLOAD_SAMPLE`] bytes, so that the letter fits.
    fn letter(&self, entry: &OutboxEntry, error: &rdkafka::error::KafkaError) -> OutboxEntry {
        use rdkafka::error::RDKafkaErrorCode;
        let b64 = base64::engine::general_purpose::STANDARD;
        let too_large = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge)
        );
        let mut reason = format!(
            "the broker refused this output to {} for good: {error}",
            entry.topic
        );
        let payload = if too_large {
            sample_for_letter("payload", &entry.payload, &mut reason)
        } else {
            &entry.payload[..]
        };
        let id = deterministic_id(&[
            &self.service,
            "output",
            &entry.topic,
            &String::from_utf8_lossy(&entry.outbox_key),
            &String::from_utf8_lossy(&entry.key),
        ]);
        let letter = DeadLetter {
            dead_letter_id: id,
            service: self.service.clone(),
            source_topic: entry.topic.clone(),
            source_partition: -1,
            source_offset: -1,
            reason_code: DeadLetterReason::output_refused,
            reason,
            key_base64: Some(b64.encode(&entry.key)),
            payload_base64: b64.encode(payload),
            failed_at: wall_now(),
        };
        OutboxEntry {
            partition: entry.partition,
            outbox_key: entry.outbox_key.clone(),
            topic: self.topic.clone(),
            key: entry.key.clone(),
            payload: encode_internal(&letter),
            changelog: false,
            writer: entry.writer.clone(),
            epoch: entry.epoch,
        }
    }
}

/// Bytes of a refused output's payload its dead letter keeps when the payload was too
/// large for the broker.
pub const REFUSED_PAYLOAD_SAMPLE: usize = 64 * 1024;

/// The first [`REFUSED_PAYLOAD_SAMPLE`] bytes of `bytes` (the `what` of a record a
/// dead letter carries), noting in `reason` when it is cut, so that the letter fits
/// the broker.
pub fn sample_for_letter<'a>(what: &str, bytes: &'a [u8], reason: &mut String) -> &'a [u8] {
    if bytes.len() <= REFUSED_PAYLOAD_SAMPLE {
        return bytes;
    }
    reason.push_str(&format!(
        "; the {what}'s first {REFUSED_PAYLOAD_SAMPLE} of {} bytes are kept",
        bytes.len()
    ));
    &bytes[..REFUSED_PAYLOAD_SAMPLE]
}

/// The largest rejected input a dead letter carries whole: in base64, with the
/// letter's fields, it stays below the broker's default limit of 1,000,000 bytes.
pub const DEAD_LETTER_WHOLE_PAYLOAD: usize = 700_000;

/// The fatal error of an idempotent producer (the broker lost records it had
/// acknowledged, or a sequence gap it cannot close), if it has one: from then on it
/// refuses every record, so retrying is in vain. What it did not publish stays in the
/// outbox, for a new producer (the service stops; started again, it has one).
pub fn producer_failed_for_good(producer: &FutureProducer) -> Option<String> {
    use rdkafka::producer::Producer;
    producer
        .client()
        .fatal_error()
        .map(|(code, reason)| format!("{code}: {reason}"))
}

/// Whether the broker will refuse the record whatever the retries: too large, invalid,
/// or a topic this service may not write. Anything else (a broker away, a leader
/// moving, a full queue) passes.
fn refused_for_good(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::RDKafkaErrorCode as Code;
    matches!(
        error.rdkafka_error_code(),
        Some(
            Code::MessageSizeTooLarge
                | Code::MessageBatchTooLarge
                | Code::InvalidMessage
                | Code::InvalidMessageSize
                | Code::InvalidRecord
                | Code::InvalidTopic
                | Code::TopicAuthorizationFailed
        )
    )
}

/// Output records, in any order (each carries its own id downstream). One the broker
/// refuses for good goes to the dead-letter topic instead, with the refusal as its
/// reason, and leaves the outbox once that letter is acknowledged: it would otherwise
/// be retried forever and hold back every later publish of the service.
async fn publish_any_order(
    producer: &FutureProducer,
    entries: Vec<OutboxEntry>,
    dead_letters: &OutputDeadLetters,
    metrics: &RuntimeMetrics,
    cancel: &CancellationToken,
) -> Vec<(OutboxEntry, i64)> {
    let mut acked = Vec::with_capacity(entries.len());
    // What goes out, and beside it the refused output a dead letter stands for.
    let mut todo = entries;
    let mut refused: Vec<Option<OutboxEntry>> = Vec::new();
    let mut backoff = Duration::from_millis(200);
    while !todo.is_empty() {
        refused.resize_with(todo.len(), || None);
        let results = send_all(producer, &todo, false).await;
        let mut failed = Vec::new();
        let mut failed_refused = Vec::new();
        for ((entry, original), result) in todo.into_iter().zip(refused).zip(results) {
            match result {
                Ok(offset) => {
                    // Counted once the broker has it: a batch redone after a failed
                    // commit queues its records again.
                    metrics.output_records.inc(&[&entry.topic]);
                    acked.push((original.unwrap_or(entry), offset))
                }
                Err(e) if original.is_none() && refused_for_good(&e) => {
                    metrics.produce_errors.inc();
                    metrics
                        .dead_letters
                        .with_label_values(&[DeadLetterReason::output_refused.as_str()])
                        .inc();
                    tracing::error!(topic = %entry.topic, error = %e, "the broker refused an output for good; it goes to the dead-letter topic");
                    failed.push(dead_letters.letter(&entry, &e));
                    failed_refused.push(Some(entry));
                }
                Err(e) => {
                    if !matches!(e, rdkafka::error::KafkaError::Canceled) {
                        metrics.produce_errors.inc();
                        tracing::warn!(topic = %entry.topic, error = %e, "publish failed; will retry");
                    }
                    failed.push(entry);
                    failed_refused.push(original);
                }
            }
        }
        refused = failed_refused;
        todo = failed;
        if !todo.is_empty() {
            if cancel.is_cancelled() || producer_failed_for_good(producer).is_some() {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
    acked
}

/// What a restore does about a commit torn by a crash at the changelog's end (it never
/// applies one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TornCommit {
    /// Write what undoes it, as the partition's new owner must before it writes.
    Undo,
    /// Leave the changelog alone (a read-only look, such as `kairos inspect`).
    Leave,
}

/// A changelog record read back.
struct ChangelogRecord {
    /// Raw store key.
    key: Vec<u8>,
    /// `None`: deleted.
    value: Option<Vec<u8>>,
    /// Written by this store's incarnation.
    own: bool,
    /// Written by a version that ends each commit with an end marker.
    in_commit: bool,
    /// A write-ahead record, outside any commit.
    write_ahead: bool,
    /// Where it lies in the changelog partition.
    offset: i64,
    /// The epoch it was written under, if its writer had claimed the partition.
    epoch: Option<i64>,
}

/// Header naming the store incarnation that wrote a changelog record.
const WRITER_HEADER: &str = "kairos-writer";

/// Header of the epoch a changelog record was written under (see
/// [`crate::store::claim_key`]), in decimal. Versions before claims write none, and
/// their records apply as they come.
const EPOCH_HEADER: &str = "kairos-epoch";

/// Header of changelog records written by versions that end every commit with a
/// [`META_COMMIT_END`] record: such records after the last end marker are a commit
/// torn by a crash while it was being published.
const COMMIT_HEADER: &str = "kairos-commit";

/// Header of a write-ahead record ([`Ctx::put_now`]): written at once, outside any
/// commit, so it neither waits for an end marker nor ends a torn commit's wait.
const WRITE_AHEAD_HEADER: &str = "kairos-write-ahead";

/// What a restore did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RestoreStats {
    /// Changelog records read from the broker, over every pass.
    pub records_read: u64,
    /// Records applied to the store.
    pub applied: u64,
    /// Records left out as written by an owner after another had claimed the
    /// partition (see [`crate::store::claim_key`]).
    pub fenced_out: u64,
    /// Records of a commit applied before its end marker was read, because the commit
    /// was more than a restore holds in memory (see [`SPILL_AFTER`]).
    pub spilled: u64,
    pub kind: RestoreKind,
}

/// How a restore brought a store in line with its changelog.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum RestoreKind {
    /// The store was current: nothing to read.
    #[default]
    Current,
    /// Only its own records followed (a restart after a crash): those were applied.
    OwnTail,
    /// It had been closed cleanly: what other instances wrote since was applied.
    SinceCleanClose,
    /// Deleted and rebuilt from the whole changelog.
    Rebuilt,
}

impl RestoreKind {
    pub const ALL: [RestoreKind; 4] = [
        RestoreKind::Current,
        RestoreKind::OwnTail,
        RestoreKind::SinceCleanClose,
        RestoreKind::Rebuilt,
    ];

    /// The label of `kairos_partition_restores_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreKind::Current => "current",
            RestoreKind::OwnTail => "own_tail",
            RestoreKind::SinceCleanClose => "since_clean_close",
            RestoreKind::Rebuilt => "rebuilt",
        }
    }
}

/// A consumer that reads changelog partitions for restores, one partition at a time,
/// kept for every partition of an assignment: made anew for each, it connected and
/// fetched metadata again (about a tenth of a second per partition).
pub struct ChangelogReader {
    consumer: BaseConsumer,
    /// Writes the claims and repairs of the partitions restored (see [`claim`]),
    /// made with the first.
    producer: Mutex<Option<FutureProducer>>,
}

impl ChangelogReader {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let consumer = kafka::client_config(config)?
            .set("group.id", format!("{}restore", config.kafka.group_prefix))
            .set("enable.auto.commit", "false")
            // The next partition's watermark request queues behind a fetch the broker
            // holds on this connection: keep that wait short.
            .set("fetch.wait.max.ms", "10")
            .create()
            .context("cannot create changelog reader")?;
        Ok(ChangelogReader {
            consumer,
            producer: Mutex::new(None),
        })
    }

    /// Hands every record of `changelog[partition]` from `from` to `high` (exclusive)
    /// to `each`, as it arrives (a partition's changelog may not fit in memory), until
    /// `each` answers false; `writer` tells which records are the reader's own.
    /// Returns how many records it read.
    fn read(
        &self,
        changelog: &str,
        partition: i32,
        from: i64,
        high: i64,
        writer: &str,
        each: &mut dyn FnMut(ChangelogRecord) -> anyhow::Result<bool>,
    ) -> anyhow::Result<u64> {
        let consumer = &self.consumer;
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(changelog, partition, rdkafka::Offset::Offset(from))?;
        consumer.assign(&tpl)?;
        let mut next = from;
        let mut read = 0_u64;
        let mut last_progress = Instant::now();
        while next < high {
            if last_progress.elapsed() > Duration::from_secs(120) {
                anyhow::bail!("reading {changelog}[{partition}] stalled at {next} of {high}");
            }
            match consumer.poll(Duration::from_millis(500)) {
                // The reader read another partition before: a record of it still
                // queued is not this partition's.
                Some(Ok(m)) if m.partition() != partition || m.topic() != changelog => {}
                Some(Ok(m)) => {
                    next = m.offset() + 1;
                    read += 1;
                    last_progress = Instant::now();
                    let header = |name: &str| {
                        m.headers().and_then(|h| {
                            h.iter()
                                .find(|x| x.key == name)
                                .map(|x| x.value.map(<[u8]>::to_vec))
                        })
                    };
                    let go_on = each(ChangelogRecord {
                        key: m.key().unwrap_or_default().to_vec(),
                        value: m.payload().filter(|p| !p.is_empty()).map(|p| p.to_vec()),
                        own: header(WRITER_HEADER).flatten().as_deref() == Some(writer.as_bytes()),
                        in_commit: header(COMMIT_HEADER).is_some(),
                        write_ahead: header(WRITE_AHEAD_HEADER).is_some(),
                        offset: m.offset(),
                        epoch: header(EPOCH_HEADER)
                            .flatten()
                            .and_then(|e| std::str::from_utf8(&e).ok()?.parse().ok()),
                    })?;
                    if !go_on {
                        break;
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "changelog read error"),
                None => {}
            }
        }
        // Fetch nothing more for this partition while the next one is looked at.
        consumer.unassign()?;
        Ok(read)
    }

    fn producer(&self, config: &Config) -> anyhow::Result<FutureProducer> {
        made_once(&self.producer, "restore producer", || {
            kafka::producer(config)
        })
    }
}

/// Claims `partition` for `store`, restored up to the changelog's end: writes a claim
/// record (see [`crate::store::claim_key`]) and, if it landed at that very end (nobody
/// wrote in between), takes its offset as the store's epoch. From then on a restore
/// leaves out what an earlier owner writes under its older epoch, and that owner's
/// next publish finds the claim between its records and stops (see [`publish_fenced`]).
/// Returns false if another instance wrote first: the partition is restored again.
///
/// `expected` is the changelog's end as restored. With `note_end` the store notes the
/// end after the claim as the one it has seen, which makes it current; a restore that
/// still has records to write after the claim (the undo of a torn commit) notes the
/// end only once they are in, so that a crash between the two restores again and
/// finds the torn commit again instead of taking the store for current.
fn claim(
    reader: &ChangelogReader,
    config: &Config,
    store: &mut PartitionStore,
    (changelog, partition): (&str, i32),
    expected: i64,
    note_end: bool,
) -> anyhow::Result<bool> {
    let record = store.changelog_entry(
        changelog,
        claim_key(expected, &store.writer),
        (expected as u64).to_be_bytes().to_vec(),
    );
    let producer = reader.producer(config)?;
    let offset = futures::executor::block_on(send_all(&producer, &[record], false))
        .pop()
        .context("the producer reported nothing for the claim")?
        .with_context(|| format!("cannot claim {changelog}[{partition}]"))?;
    if offset != expected {
        tracing::warn!(
            changelog,
            partition,
            expected,
            offset,
            "another instance wrote to the changelog while this one restored it: restoring again"
        );
        return Ok(false);
    }
    store.set_epoch(offset, note_end)?;
    tracing::debug!(changelog, partition, epoch = offset, "partition claimed");
    Ok(true)
}

/// How a restore ends once the store is in line with the changelog: a new owner
/// (`TornCommit::Undo`) claims the partition when asked to; a read-only look does not.
#[allow(clippy::too_many_arguments)]
fn finish_restore(
    reader: &ChangelogReader,
    config: &Config,
    store: &mut PartitionStore,
    changelog: &str,
    partition: i32,
    torn: TornCommit,
    claims: bool,
    stats: RestoreStats,
) -> anyhow::Result<Restore> {
    if torn == TornCommit::Undo && !claims {
        store.clear_epoch()?;
    }
    if torn == TornCommit::Leave
        || !claims
        || claim(
            reader,
            config,
            store,
            (changelog, partition),
            store.changelog_end()?.unwrap_or(0),
            true,
        )?
    {
        Ok(Restore::Done(stats))
    } else {
        Ok(Restore::ChangelogMoved(stats))
    }
}

/// Brings a partition's local store in line with its changelog before it is opened.
///
/// - The changelog ends where the store last saw it end: the store is current.
/// - Only this store's own records follow (acknowledged before a crash, not yet noted):
///   they are applied, then the store's unacknowledged outbox writes again on top, so
///   the store keeps its newest values. Restarts after a crash read only that tail.
/// - The store was closed cleanly (every record of it acknowledged, see
///   [`PartitionStore::mark_closed_clean`]) less than half the changelog's compaction
///   lag ago, and others wrote after it: only what they wrote is read and applied on
///   top, as a rebuild applies it (a rolling restart, a partition that comes back
///   after a rebalance).
/// - Anything else (a new store, another instance wrote after a crash of this one,
///   retention trimmed the tail): the store is deleted and rebuilt from the whole
///   changelog, its outbox
///   with it, so stale local writes never go out. Inputs whose effects are missing
///   are processed again from the restored offsets, with the same output ids. The
///   outbox restored from the changelog (outputs of commits whose writer may have died
///   before publishing them) goes out when the store opens.
/// - A commit that lacks its end marker at the changelog's end (its writer died while
///   publishing it) is not applied: its inputs are processed again. With
///   [`TornCommit::Undo`], values undoing its records follow them in the changelog.
///   Records of a version that writes no markers after it mean that version adopted
///   it: then it is applied.
///
/// - Records of an older epoch that follow a valid claim are left out: a former owner
///   wrote them after the partition moved (see [`crate::store::claim_key`]).
/// - With `claim`, a new owner (`TornCommit::Undo`) then claims the partition at the
///   changelog's end (see [`claim`]); if another instance wrote first, it restores
///   again.
///
/// A new store reads the changelog once; a store with a local end and no clean close
/// reads its tail and stops at the first record it did not write itself.
/// `reader` may serve the restores of other partitions before and after this one.
pub fn restore_partition(
    reader: &ChangelogReader,
    config: &Config,
    factory: &StoreFactory,
    changelog: &str,
    partition: i32,
    torn: TornCommit,
    claim: bool,
) -> anyhow::Result<RestoreStats> {
    let mut read_before = 0;
    for _ in 0..3 {
        match restore_once(
            reader,
            config,
            factory,
            changelog,
            partition,
            torn,
            claim,
            &|| (),
            &|| Ok(()),
        )? {
            Restore::Done(mut stats) => {
                stats.records_read += read_before;
                return Ok(stats);
            }
            Restore::ChangelogMoved(stats) => read_before += stats.records_read,
        }
    }
    anyhow::bail!(
        "{changelog}[{partition}] kept growing while this instance restored it: another \
         instance is writing it, so this one neither undoes its torn commit, nor claims \
         it, nor opens it"
    )
}

/// How one attempt at a restore ended.
enum Restore {
    Done(RestoreStats),
    /// Someone wrote to the changelog after it was read, before a torn commit's undo
    /// or the claim went out: the partition is not this instance's alone (the undo was
    /// not written; a claim that came after their records is not valid).
    ChangelogMoved(RestoreStats),
}

/// One attempt of [`restore_partition`]; `before_undo` runs just before the check that
/// precedes a torn commit's undo (a test writes there as another instance would), and
/// `after_claim` between the claim that precedes an undo and the undo (a test fails
/// there as a crash would).
#[allow(clippy::too_many_arguments)]
fn restore_once(
    reader: &ChangelogReader,
    config: &Config,
    factory: &StoreFactory,
    changelog: &str,
    partition: i32,
    torn: TornCommit,
    claims: bool,
    before_undo: &dyn Fn(),
    after_claim: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<Restore> {
    let consumer = &reader.consumer;
    let (low, high) = changelog_watermarks(consumer, changelog, partition)?;
    let mut first = factory.open(partition)?;
    let (local_end, writer, epoch, holds_records, clean_close) = (
        first.changelog_end()?,
        first.writer.clone(),
        first.epoch,
        first.holds_records()?,
        first.take_clean_close()?,
    );
    let mut stats = RestoreStats::default();
    if local_end == Some(high) || (local_end.is_none() && high == 0) {
        return finish_restore(
            reader, config, &mut first, changelog, partition, torn, claims, stats,
        );
    }
    drop(first);
    // A store closed cleanly equals the changelog up to where it closed: it reads only
    // what was written after, as a rebuild would read it there. Not once compaction may
    // have dropped a deletion written since (it would leave the store a stale key); the
    // margin covers clocks that differ between instances.
    let clean_end = clean_close
        .filter(|(end, closed_at)| {
            local_end == Some(*end)
                && (low..=high).contains(end)
                && wall_now().saturating_sub(*closed_at)
                    < (kafka::CHANGELOG_MIN_COMPACTION_LAG / 2).as_millis() as Millis
        })
        .map(|(end, _)| end);
    let read = |from: i64, each: &mut dyn FnMut(ChangelogRecord) -> anyhow::Result<bool>| {
        reader.read(changelog, partition, from, high, &writer, each)
    };
    // A store that has seen the changelog before: if only its own records follow, it
    // applies them (as they come) and is current. So does a store none of whose
    // commits was acknowledged yet (killed between publishing its first commit and
    // the acknowledgement) but which holds records: its tail starts at the log's
    // start, and it keeps its write-ahead records (a delivery worker's provider-call
    // markers; the one being written when it died may not have reached the changelog).
    // Only a blank store is rebuilt at once, reading the log a single time.
    let tail_start = local_end.or(holds_records.then_some(low));
    if let Some(start) = tail_start.filter(|end| clean_end.is_none() && (low..=high).contains(end))
    {
        let mut store = factory.open(partition)?;
        let mut all_own = true;
        let mut chunk: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let mut n = 0_u64;
        // The tail's last value of each key a write-ahead record wrote.
        let mut written_ahead: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        stats.records_read += read(start, &mut |r| {
            if !r.own {
                // Applied so far or not, the store is rebuilt below.
                all_own = false;
                return Ok(false);
            }
            if r.write_ahead || written_ahead.contains_key(&r.key) {
                written_ahead.insert(r.key.clone(), r.value.clone());
            }
            // The store's own outbox is the truth about what it still has to
            // publish: an output's replica in the tail may have been published since.
            // A claim is the changelog's alone. A write-ahead record was written here
            // before its copy was sent, so the local value is as new or newer (a
            // withdrawn commit point whose copy died with the process). This holds as
            // long as a commit only ever deletes write-ahead keys (the delivery
            // worker's `w/`, `k/`, `a/`), never writes one that a later write-ahead
            // record of the tail would then have to win over. A local value newer
            // than the tail's is written to the changelog again below.
            if !r.key.starts_with(OUTBOX) && !r.key.starts_with(CLAIM_PREFIX) && !r.write_ahead {
                // Counted as restored: the state records applied.
                n += 1;
                chunk.push((r.key, r.value));
            }
            if chunk.len() >= RESTORE_CHUNK {
                store.apply_changelog(&chunk)?;
                chunk.clear();
            }
            Ok(true)
        })?;
        if all_own {
            // The unacknowledged outbox writes again on top: the newest values.
            chunk.extend(
                store
                    .outbox()?
                    .into_iter()
                    .filter(|e| e.changelog && !e.key.starts_with(OUTBOX))
                    .map(|e| (e.key, (!e.payload.is_empty()).then_some(e.payload))),
            );
            store.apply_changelog(&chunk)?;
            store.finish_restore()?;
            let mut behind = Vec::new();
            for (key, in_tail) in written_ahead {
                if store.raw_get(&key)? != in_tail {
                    behind.push(key);
                }
            }
            if !behind.is_empty() {
                // Published with the outbox when the partition opens, after the claim.
                store.republish(&behind, changelog)?;
            }
            // Only then: killed before it, the next start restores the tail again and
            // finds the same keys behind.
            store.set_changelog_end(high)?;
            stats.applied = n;
            stats.kind = RestoreKind::OwnTail;
            tracing::info!(
                changelog,
                partition,
                records = n,
                "caught up with own changelog tail"
            );
            return finish_restore(
                reader, config, &mut store, changelog, partition, torn, claims, stats,
            );
        }
    }
    let from = match clean_end {
        Some(end) => {
            stats.kind = RestoreKind::SinceCleanClose;
            tracing::info!(
                changelog,
                partition,
                from = end,
                high,
                "catching up with what the changelog gained since the store was closed"
            );
            end
        }
        None => {
            stats.kind = RestoreKind::Rebuilt;
            tracing::info!(
                changelog,
                partition,
                ?local_end,
                low,
                high,
                "restoring state from the changelog"
            );
            factory.destroy(partition)?;
            low
        }
    };
    let mut store = factory.open(partition)?;
    // Records stamped as part of a commit wait for its end marker. Those still waiting
    // at the end are a commit whose writer died while publishing it: not applied, so
    // its inputs count as not applied and are processed again. A record of an earlier
    // version, which wrote no markers, applies as it comes, and with it every record
    // waiting before it: that version restored them (it knew no markers) and wrote on.
    let mut waiting: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    let mut ready: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    // A write-ahead record applies at once, whatever commit is waiting: it is not
    // part of one. Those that came after a waiting commit's records apply again after
    // them if the commit completes, so the later value stays.
    let mut write_ahead_after_waiting: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    // The epoch of the partition's owner as far as read: from a valid claim on, what
    // an earlier owner wrote under an older epoch is left out (it ran on after the
    // partition moved; its new owner never saw it). A rebuild starts with none; a
    // store closed cleanly was the owner where it closed.
    let mut owner_epoch = match clean_end {
        Some(_) => epoch,
        None => None,
    };
    // Keys of the records left out: compaction keeps a key's last record whatever its
    // epoch, so a left-out record that is a key's last would one day be all that is
    // left of it. A new owner writes the key's value again after it (see below).
    let mut fenced_keys: Vec<Vec<u8>> = Vec::new();
    // Records waiting for their end marker are applied once there are more than
    // `SPILL_AFTER`, with each key's value from before kept here, to be put back if the
    // marker never comes. Compaction keeps a key's last record only, so of the
    // markers under one key only the newest is left: everything compacted waits for
    // it, and holding those values would hold the partition's whole state in memory.
    // Here only keys (their earlier values are mostly none in a rebuild) are held.
    let mut spilled: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
    // Records of the commit under way applied ahead of its marker: counted as applied
    // only once it comes.
    let mut spilled_unconfirmed = 0_u64;
    // Write-ahead records applied a second time after a commit that waited (so their
    // value wins over it): counted once.
    let mut applied_again = 0_u64;
    // A clean close ended on a whole commit, so nothing waits at its end either.
    stats.records_read += read(from, &mut |r| {
        if r.key.starts_with(CLAIM_PREFIX) {
            if claim_expected(&r.key, r.value.as_deref()) == Some(r.offset) {
                owner_epoch = Some(r.offset);
            }
            return Ok(true);
        }
        if r.epoch
            .zip(owner_epoch)
            .is_some_and(|(written, owner)| written < owner)
        {
            stats.fenced_out += 1;
            fenced_keys.push(r.key);
            return Ok(true);
        }
        let is_marker = r.in_commit && r.key == META_COMMIT_END;
        if r.write_ahead {
            if !waiting.is_empty() || !spilled.is_empty() {
                write_ahead_after_waiting.push((r.key.clone(), r.value.clone()));
            }
            // Whatever becomes of the commit, this value stands after it.
            if let Some(before) = spilled.get_mut(&r.key) {
                before.clone_from(&r.value);
            }
            ready.push((r.key, r.value));
        } else if r.in_commit {
            waiting.push((r.key, r.value));
        } else {
            spilled.clear();
            spilled_unconfirmed = 0;
            ready.append(&mut waiting);
            applied_again += write_ahead_after_waiting.len() as u64;
            ready.append(&mut write_ahead_after_waiting);
            ready.push((r.key, r.value));
        }
        if is_marker {
            spilled.clear();
            spilled_unconfirmed = 0;
            ready.append(&mut waiting);
            applied_again += write_ahead_after_waiting.len() as u64;
            ready.append(&mut write_ahead_after_waiting);
        } else if waiting.len() >= SPILL_AFTER {
            // In order: what is ready, then the waiting records over their keys'
            // values from before, then the write-ahead records that came after them.
            store.apply_changelog(&ready)?;
            stats.applied += ready.len() as u64;
            ready.clear();
            for (key, _) in &waiting {
                if !spilled.contains_key(key) {
                    spilled.insert(key.clone(), store.raw_get(key)?);
                }
            }
            stats.spilled += waiting.len() as u64;
            spilled_unconfirmed += waiting.len() as u64;
            // Only the write-ahead records of keys this chunk wrote over.
            let chunk_keys: std::collections::HashSet<&[u8]> =
                waiting.iter().map(|(key, _)| key.as_slice()).collect();
            let again: Vec<(Vec<u8>, Option<Vec<u8>>)> = write_ahead_after_waiting
                .iter()
                .filter(|(key, _)| chunk_keys.contains(key.as_slice()))
                .cloned()
                .collect();
            ready.append(&mut waiting);
            applied_again += again.len() as u64;
            ready.extend(again);
        }
        if ready.len() >= RESTORE_CHUNK {
            store.apply_changelog(&ready)?;
            stats.applied += ready.len() as u64;
            ready.clear();
        }
        Ok(true)
    })?;
    store.apply_changelog(&ready)?;
    stats.applied += ready.len() as u64;
    // A commit applied in part whose end never came: its keys' earlier values back.
    stats.applied = stats
        .applied
        .saturating_sub(spilled_unconfirmed)
        .saturating_sub(applied_again);
    let put_back: Vec<(Vec<u8>, Option<Vec<u8>>)> = spilled.into_iter().collect();
    store.apply_changelog(&put_back)?;
    store.finish_restore()?;
    let mut torn_keys: Vec<Vec<u8>> = put_back.into_iter().map(|(key, _)| key).collect();
    let spilled_keys: std::collections::HashSet<Vec<u8>> = torn_keys.iter().cloned().collect();
    torn_keys.extend(
        waiting
            .into_iter()
            .map(|(key, _)| key)
            .filter(|key| !spilled_keys.contains(key)),
    );
    let repair = torn == TornCommit::Undo && !(torn_keys.is_empty() && fenced_keys.is_empty());
    let end = if repair {
        before_undo();
        if claims {
            // Claimed first, so that the undo carries the new epoch: if another
            // instance claims after this one, a restore leaves this undo out with the
            // rest of this instance's records; if another wrote first, the claim is not
            // valid and nothing is written.
            if !claim(
                reader,
                config,
                &mut store,
                (changelog, partition),
                high,
                false,
            )? {
                return Ok(Restore::ChangelogMoved(stats));
            }
            after_claim()?;
        } else {
            // Only while nobody else writes: an instance that lost the partition
            // meanwhile must not write after the new owner's records.
            let (_, now_high) = changelog_watermarks(consumer, changelog, partition)?;
            if now_high != high {
                tracing::warn!(
                    changelog,
                    partition,
                    high,
                    now_high,
                    "the changelog grew during the restore: its torn commit is not undone, the partition is restored again"
                );
                return Ok(Restore::ChangelogMoved(stats));
            }
        }
        let mut keys = torn_keys;
        keys.extend(fenced_keys);
        let producer = reader.producer(config)?;
        let (count, last) = repair_torn_commit(&producer, &store, changelog, partition, keys)?;
        // Right after the claim (or the restored end, without one), unless others wrote
        // in between (the rest of a former owner's commit, still arriving): then the
        // end stays there, so that the first publish or tail check reads those records
        // and writes this store's values again after them, as `write_again` does.
        let start = if claims { high + 1 } else { high };
        if last + 1 - count as i64 == start {
            last + 1
        } else {
            start
        }
    } else {
        high
    };
    store.set_changelog_end(end)?;
    tracing::info!(
        changelog,
        partition,
        restored = stats.applied,
        fenced_out = stats.fenced_out,
        "state restored"
    );
    if repair && claims {
        // Claimed above.
        return Ok(Restore::Done(stats));
    }
    finish_restore(
        reader, config, &mut store, changelog, partition, torn, claims, stats,
    )
}

/// The first and next offsets of a changelog partition. A broker that fails to say
/// is asked again, three times in all over about 3 s, before the restore (and with it
/// the service) gives up: a leader moving should not stop the service.
fn changelog_watermarks(
    consumer: &BaseConsumer,
    changelog: &str,
    partition: i32,
) -> anyhow::Result<(i64, i64)> {
    let mut wait = Duration::from_secs(1);
    let mut attempts = 1;
    loop {
        match consumer.fetch_watermarks(changelog, partition, Duration::from_secs(10)) {
            Ok(watermarks) => return Ok(watermarks),
            Err(e) if attempts < 3 => {
                tracing::warn!(changelog, partition, error = %e, "cannot read the changelog's watermarks; asking again");
                std::thread::sleep(wait);
                wait *= 2;
                attempts += 1;
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read watermarks of {changelog}[{partition}]"))
            }
        }
    }
}

/// Records a restore applies in one write.
const RESTORE_CHUNK: usize = 10_000;

/// Records of one commit a restore holds in memory before it applies them ahead of
/// the commit's end marker (keeping their keys' earlier values to put back).
pub const SPILL_AFTER: usize = 2_000;

/// Writes, after a torn commit's records (and records a restore left out as a former
/// owner's), the values the restored store holds for their keys (a tombstone where it
/// holds none) and an end marker, before this store writes anything else: a later
/// restore that reads the torn records then reads what undoes them, and compaction
/// keeps these values rather than the left-out ones. Returns how many records it wrote
/// and the offset of the last.
fn repair_torn_commit(
    producer: &FutureProducer,
    store: &PartitionStore,
    changelog: &str,
    partition: i32,
    keys: Vec<Vec<u8>>,
) -> anyhow::Result<(u64, i64)> {
    tracing::warn!(
        changelog,
        partition,
        keys = keys.len(),
        "records not applied (a commit torn by a crash at the changelog's end, or a former owner's after the partition moved) are undone"
    );
    let waves = values_again(store, changelog, keys)?;
    futures::executor::block_on(send_values_again(producer, waves))
}

/// `store`'s values of `keys` as changelog records (a tombstone where it holds none),
/// and the end marker to follow them, under the store's epoch (that of a claim just
/// made; none for a store that does not claim: an epoch it had before, older than a
/// claim they follow, would have them left out).
fn values_again(
    store: &PartitionStore,
    changelog: &str,
    mut keys: Vec<Vec<u8>>,
) -> anyhow::Result<[Vec<OutboxEntry>; 2]> {
    // A former owner's left-out commit brings its end marker's key: written among the
    // records, it would end the commit of whatever waits before them for a restore
    // that finds this write cut short after its first wave. Only the last wave ends it.
    keys.retain(|key| key.as_slice() != META_COMMIT_END);
    keys.sort();
    keys.dedup();
    let mut records = Vec::with_capacity(keys.len());
    for key in keys {
        let value = store.raw_get(&key)?.unwrap_or_default();
        records.push(store.changelog_entry(changelog, key, value));
    }
    let floor = store.outbox_seq_floor()?.to_be_bytes().to_vec();
    let marker = store.changelog_entry(changelog, META_COMMIT_END.to_vec(), floor);
    Ok([records, vec![marker]])
}

/// Sends `waves` ([`values_again`]'s records, then its marker once they are all in,
/// as for any commit). Returns how many records it wrote and the offset of the last.
async fn send_values_again(
    producer: &FutureProducer,
    waves: [Vec<OutboxEntry>; 2],
) -> anyhow::Result<(u64, i64)> {
    let (mut count, mut last) = (0, -1);
    for wave in waves {
        let Some(first) = wave.first() else { continue };
        let (topic, partition) = (first.topic.clone(), first.partition);
        for result in send_all(producer, &wave, true).await {
            let offset = result
                .with_context(|| format!("cannot write values again in {topic}[{partition}]"))?;
            count += 1;
            last = last.max(offset);
        }
    }
    Ok((count, last))
}

/// The next request of `requests`; never, without a queue (or once it is closed).
async fn next_request(
    requests: &mut Option<tokio::sync::mpsc::Receiver<ServeRequest>>,
) -> Option<ServeRequest> {
    match requests {
        Some(queue) => queue.recv().await,
        None => std::future::pending().await,
    }
}

/// Serves `requests` from the partitions this instance owns and holds, commits what
/// they changed and publishes it, then answers them: an answer is only given for
/// changes that hold.
async fn serve_requests<P: Processor>(
    engine: &mut Engine<P>,
    requests: Vec<ServeRequest>,
    partitions: i32,
    held_state: &(dyn Fn(i32) -> bool + Sync),
    publisher: &Publisher<'_>,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let mut answered: Vec<(i32, tokio::sync::oneshot::Sender<Served>, Vec<u8>)> = Vec::new();
    for request in requests {
        // Its caller gave up waiting (a timeout): serving it now would change state
        // (an in-app poll marks messages seen) for an answer nobody reads.
        if request.reply.is_closed() {
            continue;
        }
        let p = engine.state_partition(crate::replay::partition_for(&request.key, partitions));
        if !engine.owns(p) || !held_state(p) {
            let _ = request.reply.send(Served::NotOwner(p));
            continue;
        }
        match engine.serve(p, &request.body) {
            Ok(body) => answered.push((p, request.reply, body)),
            Err(e) => {
                let error = format!("{e:#}");
                tracing::warn!(partition = p, %error, "request not served");
                // The failure dropped the partition's batch: the requests served from
                // it before hold nothing either.
                let (dropped, kept): (Vec<_>, Vec<_>) =
                    answered.into_iter().partition(|(q, _, _)| *q == p);
                answered = kept;
                for reply in dropped
                    .into_iter()
                    .map(|(_, reply, _)| reply)
                    .chain([request.reply])
                {
                    let _ = reply.send(Served::Failed(error.clone()));
                }
            }
        }
    }
    if answered.is_empty() {
        return Ok(());
    }
    let out = engine.commit()?;
    let produced = out.len();
    let published = engine.publish(out, publisher, cancel, &[]).await?;
    stop_if_fenced_and_held(&published, held_state)?;
    let whole = published.acked.len() >= produced;
    for (_, reply, body) in answered {
        let _ = reply.send(match whole {
            true => Served::Done(body),
            false => Served::Failed("stopping before the broker took the changes".into()),
        });
    }
    Ok(())
}

/// Runs `processor` against Kafka until `cancel` fires, then shuts down cleanly:
/// the current batch is finished and committed, outputs are flushed, offsets are
/// committed to the group, and the stores are closed.
pub async fn run<P: Processor>(
    config: &Config,
    processor: P,
    admin: Arc<AdminState>,
    registry: SchemaRegistry,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    run_serving(config, processor, admin, registry, cancel, None).await
}

/// [`run`], also serving the `requests` between batches (see [`Processor::serve`]).
pub async fn run_serving<P: Processor>(
    config: &Config,
    processor: P,
    admin: Arc<AdminState>,
    registry: SchemaRegistry,
    cancel: CancellationToken,
    mut requests: Option<tokio::sync::mpsc::Receiver<ServeRequest>>,
) -> anyhow::Result<()> {
    let metrics = RuntimeMetrics::with_dead_letters(&admin.registry, admin.dead_letters.clone());
    let name = processor.name().to_string();
    let inputs = processor.inputs();
    let producer = kafka::producer(config)?;
    // Reads what lies between this instance's own changelog records, if anything does.
    let gap_reader = ChangelogReader::new(config)?;
    let rebalances = Arc::new(Mutex::new(Vec::new()));
    let assignments = Arc::new(AtomicU64::new(0));
    let context = KairosContext {
        rebalances: rebalances.clone(),
        assignments: assignments.clone(),
        metrics: metrics.clone(),
    };
    let mut cc = kafka::client_config(config)?;
    cc.set("group.id", format!("{}{}", config.kafka.group_prefix, name))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        // Range assignment gives one member the same partition number of every
        // co-partitioned input topic.
        .set("partition.assignment.strategy", "range")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("statistics.interval.ms", "5000");
    for (k, v) in &config.kafka.client {
        cc.set(k, v);
    }
    // librdkafka tells of input deleted before it was read only in a warning (see
    // `input_lost_topic`): counted whatever level the service logs at (rdkafka takes
    // librdkafka's level from it); a more verbose one (debugging) stays.
    if (cc.log_level as i32) < (RDKafkaLogLevel::Warning as i32) {
        cc.set_log_level(RDKafkaLogLevel::Warning);
    }
    let consumer: StreamConsumer<KairosContext> = cc
        .create_with_context(context)
        .context("cannot create Kafka consumer")?;
    // Whether the consumer holds an input partition that state partition `p` applies.
    let single_state = processor.single_state_partition();
    let held_state = |p: i32| match single_state {
        true => consumer.assignment().is_ok_and(|a| a.count() > 0),
        false => holds_input_partition(&consumer, &inputs, p),
    };
    let topic_refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topic_refs)
        .with_context(|| format!("cannot subscribe to {}", inputs.join(", ")))?;
    // Every series exists from the start, so dashboards and alerts see zeros, not gaps.
    for t in &inputs {
        metrics.input_records.touch(&[t]);
        metrics.duplicate_records.with_label_values(&[t]);
        metrics.input_offset_resets.with_label_values(&[t]);
    }
    for r in crate::contracts::DeadLetterReason::ALL {
        metrics.dead_letters.with_label_values(&[r.as_str()]);
    }
    if config.state.changelog {
        for kind in RestoreKind::ALL {
            metrics
                .partition_restores
                .with_label_values(&[kind.as_str()]);
        }
    }
    for t in processor
        .outputs()
        .iter()
        .chain([&config.topic(crate::config::topics::DEAD_LETTER)])
    {
        metrics.output_records.touch(&[t]);
    }
    // A processor with slow external effects (a delivery worker calling a provider)
    // asks for small batches, so the consumer polls in time and a crash redoes little.
    let max_batch = processor
        .max_batch_records()
        .map_or(config.state.max_batch_records, |hint| {
            hint.min(config.state.max_batch_records)
        })
        .max(1);
    let counted_topics: Vec<String> = inputs
        .iter()
        .filter(|t| processor.counts_towards_batch(t))
        .cloned()
        .collect();
    let counts = |m: &rdkafka::message::OwnedMessage| {
        counted_topics.iter().any(|t| t.as_str() == m.topic()) as usize
    };
    let max_records = config.state.max_batch_records.max(1);
    let mut engine = Engine::new(processor, config, metrics.clone())?;
    if config.state.changelog {
        engine = engine
            .with_changelog(config.changelog_topic(&name))
            .with_write_ahead(Arc::new(ProducerWriteAhead::new(config)));
    }
    let dead_letters = OutputDeadLetters::new(config, &name);
    let publisher = Publisher {
        producer: &producer,
        gap_reader: &gap_reader,
        dead_letters: &dead_letters,
        metrics: &metrics,
    };
    tracing::info!(service = %name, inputs = %inputs.join(","), "processing started");

    let max_wait = config.state.max_batch_wait;
    let tick = config.state.timer_tick;
    let mut last_gauges = Instant::now();
    let mut last_tail_check = Instant::now();
    let mut assigned_once = false;
    let mut last_incomplete_warning = Instant::now() - Duration::from_secs(60);
    let mut gates = BacklogGates::default();
    let mut waiting_requests: Vec<ServeRequest> = Vec::new();
    let mut failed_producer = None;
    let member = GroupMember {
        consumer: &consumer,
        inputs: &inputs,
        assignments: &assignments,
    };
    let rebalancing = Rebalancing {
        member: &member,
        config,
        name: &name,
        publisher: &publisher,
        cancel: &cancel,
        admin: &admin,
    };
    // Records handed out while partitions restored at the top of the loop: the head
    // of the next batch.
    let mut carried = Vec::new();
    // Due timers the last turn left to fire: the next does not wait for a record.
    let mut timers_left = false;

    loop {
        admin.heartbeat();
        if let Some(error) = producer_failed_for_good(&producer) {
            // Committed state and its unpublished outbox are safe in the store; a
            // restart publishes them with a new producer. Stopped as for a signal (the
            // partitions closed, the group left), with the error.
            tracing::error!(%error, "the Kafka producer failed for good; stopping");
            failed_producer = Some(error);
            break;
        }
        // Apply rebalances recorded by the consumer context.
        let applied = apply_rebalances(&mut engine, &rebalances, &rebalancing).await?;
        assigned_once |= applied.assigned;
        gates.follow(&engine, &consumer, &inputs, &applied);
        admin.set_owned(engine.owned());
        carried.extend(applied.kept);
        if cancel.is_cancelled() {
            break;
        }
        if let Some(queue) = requests.as_mut() {
            let mut waiting = std::mem::take(&mut waiting_requests);
            while let Ok(request) = queue.try_recv() {
                waiting.push(request);
            }
            if !waiting.is_empty() {
                serve_requests(
                    &mut engine,
                    waiting,
                    config.kafka.partitions,
                    &held_state,
                    &publisher,
                    &cancel,
                )
                .await?;
            }
        }

        // Gather a batch; a request wakes the loop to be served at its top.
        let mut batch = std::mem::take(&mut carried);
        let mut fetched_before = FetchedBeforeAssignment::new(&assignments);
        let mut counted: usize = batch.iter().map(counts).sum();
        // Records carried from a restore start the batch; else it waits for a first.
        if batch.is_empty() {
            let first = tokio::select! {
                _ = cancel.cancelled() => None,
                Some(request) = next_request(&mut requests) => {
                    waiting_requests.push(request);
                    None
                }
                r = tokio::time::timeout(
                    if timers_left { Duration::ZERO } else { tick },
                    consumer.recv(),
                ) => Some(r),
            };
            match first {
                None | Some(Err(_)) => {}
                Some(Ok(Err(e))) => tracing::warn!(error = %e, "consumer error"),
                Some(Ok(Ok(m))) => {
                    fetched_before.look(batch.len());
                    let m = m.detach();
                    counted += counts(&m);
                    batch.push(m);
                }
            }
        }
        if !batch.is_empty() {
            let deadline = Instant::now() + max_wait;
            while counted < max_batch && batch.len() < max_records {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match tokio::time::timeout(left, consumer.recv()).await {
                    Ok(Ok(m)) => {
                        // The assignment callback runs inside recv, before the
                        // record it returns: that record is the new assignment's.
                        fetched_before.look(batch.len());
                        let m = m.detach();
                        counted += counts(&m);
                        batch.push(m);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "consumer error");
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        // Rebalances seen while gathering (the callback runs inside recv) take effect
        // before any record is handled: revoked partitions are not touched after their
        // revocation, newly assigned ones are opened (and restored) first.
        let applied = apply_rebalances(&mut engine, &rebalances, &rebalancing).await?;
        assigned_once |= applied.assigned;
        gates.follow(&engine, &consumer, &inputs, &applied);
        admin.set_owned(engine.owned());
        // Records fetched before an assignment (while gathering, or while a restore
        // polled) come again from the committed offset (eager rebalances reset every
        // position): applied now, they would run ahead of the records before them,
        // which then read as duplicates. A single-state processor reads and drops
        // records while it lacks some partitions, so its committed offset can lie
        // well before them. Records a restore was handed come after the gathered ones.
        fetched_before.look(batch.len());
        if fetched_before.count > 0 {
            tracing::info!(
                service = %name,
                records = fetched_before.count,
                "records fetched before a new assignment set aside: they come again"
            );
            batch.drain(..fetched_before.count);
        }
        batch.extend(applied.kept);
        if cancel.is_cancelled() {
            // A backlog may have gone out only in part: no new commit may follow it
            // into the changelog (its end marker would vouch for the backlog's gaps).
            break;
        }
        // A single-state processor applies records, and is ready, only with every input
        // partition.
        let complete =
            !single_state || owns_every_partition(&consumer, &inputs, config.kafka.partitions);
        admin.set_ready(assigned_once && complete);
        if !complete {
            // Another instance holds some input partitions: a graph built from part of
            // the input would be wrong, so nothing is applied and no offset is stored.
            // The records come again from the committed offsets once one instance
            // owns them all (eager rebalances reset positions).
            if !batch.is_empty() && last_incomplete_warning.elapsed() > Duration::from_secs(10) {
                tracing::error!(
                    service = %name,
                    "this instance does not own every input partition, so it waits: run one {name} instance"
                );
                last_incomplete_warning = Instant::now();
            }
            continue;
        }
        let started = Instant::now();
        let mut out = Vec::new();
        let mut positions: HashMap<(String, i32), i64> = HashMap::new();
        // Set when a shutdown left the rest of the batch unapplied.
        let mut cut_short = false;
        'records: for m in &batch {
            let payload = m.payload().unwrap_or_default();
            // Fetch unknown writer schemas before the (sync) decode; registry outages
            // stall the pipeline instead of dead-lettering good events.
            let mut delay = Duration::from_millis(500);
            loop {
                match registry.prefetch(payload).await {
                    Ok(()) => break,
                    Err(crate::encoding::RegistryError::Http { id, message }) => {
                        tracing::warn!(id, %message, "schema registry unavailable; retrying");
                        if cancel.is_cancelled() {
                            // Shutting down: this record and the rest of the batch wait
                            // for the next start (their offsets are not stored), rather
                            // than being dead-lettered for want of their schema.
                            cut_short = true;
                            break 'records;
                        }
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                    // Unknown ids and bad schemas are the message's fault: dead letter.
                    Err(_) => break,
                }
            }
            let record = Record {
                topic: m.topic(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key(),
                payload,
                written_at: m.timestamp().to_millis(),
            };
            out.extend(engine.handle(&record)?);
            if engine.owns(engine.state_partition(m.partition())) {
                positions.insert((m.topic().to_string(), m.partition()), m.offset());
            }
        }
        out.extend(engine.commit()?);
        if !batch.is_empty() {
            let elapsed = started.elapsed().as_secs_f64();
            metrics.batch_duration.observe(elapsed);
            // Once per record: the quantiles are of records, not of batches.
            let per_record = elapsed / batch.len() as f64;
            for _ in 0..batch.len() {
                metrics.record_processing.observe(per_record);
            }
        }
        let produced = out.len();
        let published = engine.publish(out, &publisher, &cancel, &[]).await?;
        stop_if_fenced_and_held(&published, &held_state)?;
        if published.acked.len() < produced {
            // Stopped before the broker took the whole commit: the consumer's position
            // stays before it, so that whoever owns the partition next reads its inputs
            // again (the store's own offsets skip what its state already holds).
            continue;
        }
        for ((topic, partition), offset) in &positions {
            if let Err(e) = consumer.store_offset(topic, *partition, *offset) {
                tracing::debug!(%topic, partition, error = %e, "offset store skipped");
            }
        }

        for ((topic, partition), offset) in &positions {
            gates.consumed(topic, *partition, offset + 1);
        }
        if cut_short {
            // The consumer's position counts records handed out but not applied: a
            // gate released on it would fire overdue timers ahead of a purchase or an
            // unsubscribe among them. Nothing fires; the loop stops.
            continue;
        }
        gates.check_positions(&consumer);
        gates.retry_unknown(&engine, &consumer, &inputs);
        // Published in bounded chunks, for at most a turn's time (slow timers, a
        // provider call each: one, then the records waiting, in turn).
        let turn = match engine.processor.max_timers_per_round() {
            Some(_) => Duration::ZERO,
            None => FIRING_TIME_PER_TURN,
        };
        let deadline = Instant::now() + turn;
        timers_left = false;
        for _ in 0..MAX_FIRING_ROUNDS / FIRING_ROUNDS_PER_PUBLISH {
            let (fired, more) = engine.fire_due_where(
                |p| !gates.holds(p),
                FIRING_ROUNDS_PER_PUBLISH,
                Some(deadline),
            )?;
            timers_left = more;
            let produced = fired.len();
            if produced > 0 {
                let published = engine.publish(fired, &publisher, &cancel, &[]).await?;
                stop_if_fenced_and_held(&published, &held_state)?;
                if published.acked.len() < produced {
                    break;
                }
            }
            if !more || cancel.is_cancelled() || Instant::now() >= deadline {
                break;
            }
            admin.heartbeat();
        }
        if last_tail_check.elapsed() > CHANGELOG_TAIL_CHECK {
            // A broker that does not answer now is asked again at the next look.
            match engine.check_changelog_tails(&gap_reader, &producer).await {
                Ok(fenced) => stop_if_fenced_and_held(
                    &Published {
                        fenced,
                        ..Published::default()
                    },
                    &held_state,
                )?,
                Err(e) => tracing::warn!(error = %e, "cannot look at the changelog's end"),
            }
            last_tail_check = Instant::now();
        }
        if last_gauges.elapsed() > Duration::from_secs(2) {
            engine.update_gauges();
            let pending = engine.outbox().map(|o| o.len()).unwrap_or(0);
            metrics.outbox_pending.set(pending as i64);
            last_gauges = Instant::now();
        }
    }

    // Shutdown: everything processed is committed; flush outputs with a bound.
    admin.set_ready(false);
    // Twice: the second commit carries the deletions of the outputs the first one's
    // publish got acknowledged, to the changelog.
    let flush_cancel = CancellationToken::new();
    for _ in 0..2 {
        engine.commit()?;
        // The whole outbox: whatever an earlier publish left goes first.
        let out = engine.outbox()?;
        let flush = engine.publish(out, &publisher, &flush_cancel, &[]);
        match tokio::time::timeout(Duration::from_secs(10), flush).await {
            Ok(published) => {
                published?;
            }
            Err(_) => {
                tracing::warn!("outputs not flushed in time; they stay in the outbox");
                break;
            }
        }
    }
    if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        tracing::debug!(error = %e, "final offset commit skipped");
    }
    consumer.unsubscribe();
    engine.close_all();
    if let Some(error) = failed_producer {
        anyhow::bail!(
            "the Kafka producer failed for good ({error}): stopped so that a restart gives \
             this service a new one"
        );
    }
    tracing::info!(service = %name, "stopped cleanly");
    Ok(())
}

/// How often each owned partition's changelog is checked for what others wrote after
/// this instance's last record (see [`check_changelog_tail`]): well within the
/// changelog's compaction lag, and one watermark request per partition.
const CHANGELOG_TAIL_CHECK: Duration = Duration::from_secs(30);

/// Stops the service when a publish let go of a partition (see [`Engine::publish`])
/// that the consumer still holds: nobody would process it until the next rebalance.
/// A restart restores it and claims it anew (or finds it has moved on).
fn stop_if_fenced_and_held(
    published: &Published,
    held: &(dyn Fn(i32) -> bool + Sync),
) -> anyhow::Result<()> {
    let held: Vec<i32> = published
        .fenced
        .iter()
        .copied()
        .filter(|p| held(*p))
        .collect();
    anyhow::ensure!(
        held.is_empty(),
        "partitions {held:?} were claimed by another instance while this one still holds \
         them (it was paused or cut off past its session, or the partition moved and \
         came back during a restore): stopping, so that a restart restores them"
    );
    Ok(())
}

/// Whether the consumer is assigned partition `partition` of an input topic now.
fn holds_input_partition<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    inputs: &[String],
    partition: i32,
) -> bool {
    consumer.assignment().is_ok_and(|assignment| {
        inputs
            .iter()
            .any(|topic| assignment.find_partition(topic, partition).is_some())
    })
}

/// Whether the consumer is assigned every partition of every input topic (what a
/// processor with a single state partition needs before it applies anything).
fn owns_every_partition<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    inputs: &[String],
    partitions: i32,
) -> bool {
    let Ok(assignment) = consumer.assignment() else {
        return false;
    };
    inputs
        .iter()
        .all(|topic| (0..partitions).all(|p| assignment.find_partition(topic, p).is_some()))
}

/// How many records at the head of a batch being gathered were fetched before the
/// consumer's latest assignment.
struct FetchedBeforeAssignment<'a> {
    assignments: &'a AtomicU64,
    seen: u64,
    count: usize,
}

impl<'a> FetchedBeforeAssignment<'a> {
    fn new(assignments: &'a AtomicU64) -> Self {
        FetchedBeforeAssignment {
            assignments,
            seen: assignments.load(Ordering::Acquire),
            count: 0,
        }
    }

    /// Notes an assignment since the last look: the `gathered` records so far came
    /// before it.
    fn look(&mut self, gathered: usize) {
        let now = self.assignments.load(Ordering::Acquire);
        if now != self.seen {
            self.seen = now;
            self.count = gathered;
        }
    }
}

/// What [`apply_rebalances`] did.
#[derive(Default)]
struct AppliedRebalances {
    /// An assignment arrived.
    assigned: bool,
    /// Input partitions revoked (handled first).
    revoked: Vec<i32>,
    /// Input partitions assigned and still held once their state was open.
    opened: Vec<i32>,
    /// Records the consumer handed out while partitions restored, next in line for
    /// the batch (see [`KeepInGroup`]).
    kept: Vec<rdkafka::message::OwnedMessage>,
}

/// The net effect of rebalance events drained together.
#[derive(Debug, Default, PartialEq, Eq)]
struct NetRebalance {
    /// Every input partition revoked on the way, closed first: even one assigned again
    /// since, as another instance may have written its changelog in between.
    revoked: Vec<i32>,
    /// Input partitions assigned and not revoked after: opened after the closing. One
    /// revoked later is never restored (nor its torn commit undone), as it is no
    /// longer this instance's to write.
    assigned: Vec<i32>,
    /// An assignment arrived, whatever followed it.
    any_assignment: bool,
}

fn net_rebalance(events: Vec<RebalanceEvent>) -> NetRebalance {
    let mut assigned = std::collections::BTreeSet::new();
    let mut revoked = std::collections::BTreeSet::new();
    let mut any_assignment = false;
    for event in events {
        match event {
            RebalanceEvent::Assign(parts) => {
                any_assignment = true;
                assigned.extend(parts);
            }
            RebalanceEvent::Revoke(parts) => {
                for p in parts {
                    assigned.remove(&p);
                    revoked.insert(p);
                }
            }
        }
    }
    NetRebalance {
        revoked: revoked.into_iter().collect(),
        assigned: assigned.into_iter().collect(),
        any_assignment,
    }
}

/// Opens (restoring from the changelog when needed) newly assigned partitions and
/// closes revoked ones, by the net effect of the events recorded since the last call,
/// and again for those recorded meanwhile (a restore polls the consumer, whose
/// rebalances then take effect before any record is handled). `member` tells whether
/// the consumer holds an input partition now: one lost before its restore is not
/// restored, one lost during it is closed again without publishing its backlog.
async fn apply_rebalances<P: Processor>(
    engine: &mut Engine<P>,
    rebalances: &Mutex<Vec<RebalanceEvent>>,
    with: &Rebalancing<'_>,
) -> anyhow::Result<AppliedRebalances> {
    let mut keep_in_group = KeepInGroup::new(with.member);
    let mut applied = AppliedRebalances::default();
    loop {
        let events: Vec<RebalanceEvent> = rebalances
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default();
        if events.is_empty() {
            break;
        }
        let round =
            apply_net_rebalance(engine, net_rebalance(events), with, &mut keep_in_group).await?;
        applied.assigned |= round.assigned;
        for p in &round.revoked {
            applied.opened.retain(|o| o != p);
        }
        applied.revoked.extend(round.revoked);
        applied.opened.extend(round.opened);
    }
    applied.kept = keep_in_group.finish();
    Ok(applied)
}

/// What [`apply_rebalances`] works with, besides the engine.
#[derive(Clone, Copy)]
struct Rebalancing<'a> {
    member: &'a GroupMember<'a>,
    config: &'a Config,
    name: &'a str,
    publisher: &'a Publisher<'a>,
    cancel: &'a CancellationToken,
    admin: &'a AdminState,
}

/// One round of [`apply_rebalances`]: the events drained together.
async fn apply_net_rebalance<P: Processor>(
    engine: &mut Engine<P>,
    net: NetRebalance,
    with: &Rebalancing<'_>,
    keep_in_group: &mut KeepInGroup<'_>,
) -> anyhow::Result<AppliedRebalances> {
    let Rebalancing {
        member,
        config,
        name,
        publisher,
        cancel,
        admin,
    } = *with;
    let still_assigned = |p: i32| member.holds(p);
    let mut applied = AppliedRebalances {
        assigned: net.any_assignment,
        revoked: net.revoked.clone(),
        ..AppliedRebalances::default()
    };
    let revoked_state = dedup(
        net.revoked
            .iter()
            .map(|p| engine.state_partition(*p))
            .collect(),
    );
    if !net.revoked.is_empty() {
        // Twice: the second commit carries the deletions of the outputs the first
        // one's publish got acknowledged, to the changelog.
        for _ in 0..2 {
            engine.commit()?;
            // The whole outbox: whatever an earlier publish left goes first.
            let out = engine.outbox()?;
            let published = engine
                .publish(out, publisher, cancel, &revoked_state)
                .await?;
            // A partition revoked (and let go) or assigned again (restored below) is
            // not left unprocessed.
            stop_if_fenced_and_held(&published, &|p| {
                still_assigned(p) && !revoked_state.contains(&p) && !net.assigned.contains(&p)
            })?;
        }
        let parts = net
            .revoked
            .iter()
            .map(|p| engine.state_partition(*p))
            .collect();
        for p in dedup(parts) {
            engine.close(p);
        }
    }
    let mut backlog = Vec::new();
    // Each state partition with the input partitions it applies.
    let mut by_state: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for &input in &net.assigned {
        by_state
            .entry(engine.state_partition(input))
            .or_default()
            .push(input);
    }
    // One changelog reader for every partition this rebalance restores.
    let mut reader: Option<Arc<ChangelogReader>> = None;
    // State partitions opened (or already open) here, with their input partitions.
    let mut opened_here = Vec::new();
    for (p, inputs) in by_state {
        if cancel.is_cancelled() {
            // Shutting down: nothing more is restored (revocations still take effect
            // above, so the shutdown's publish leaves the partitions let go alone).
            break;
        }
        let held = || inputs.iter().copied().any(&still_assigned);
        if !held() {
            tracing::info!(
                service = name,
                partition = p,
                "partition lost before it was opened"
            );
            continue;
        }
        if !engine.owns(p) {
            if let Some(changelog) = engine.changelog_topic().map(str::to_string) {
                let reader = match &reader {
                    Some(reader) => reader.clone(),
                    None => reader
                        .insert(Arc::new(ChangelogReader::new(config)?))
                        .clone(),
                };
                let c = config.clone();
                let factory_root = config.state.dir.join(name);
                // A service whose state is one whole does not claim: every instance
                // opens its single partition, but only one that holds every input
                // applies anything, and it restores (and would claim) again each time
                // its share of the input changes. One that writes ahead of its commits
                // claims like the rest (see `Ctx::put_now` for how it is checked).
                let claim = !engine.processor.single_state_partition();
                let restoring = tokio::task::spawn_blocking(move || {
                    // Bounded like the engine's own stores: a restore opens the
                    // store, which reads its timers.
                    let factory = StoreFactory::new(&factory_root, 8 << 20)?
                        .with_timers_in_memory(c.timers_in_memory_per_store());
                    restore_partition(
                        &reader,
                        &c,
                        &factory,
                        &changelog,
                        p,
                        TornCommit::Undo,
                        claim,
                    )
                });
                // Alive and in the group while it restores, however long (the
                // restore fails by itself when the changelog stops coming); not while
                // a publish is stuck.
                let restored = admin
                    .beating_while(restoring, || keep_in_group.poll())
                    .await
                    .context("restore task failed")??;
                publisher.metrics.restored_records.inc_by(restored.applied);
                publisher
                    .metrics
                    .partition_restores
                    .with_label_values(&[restored.kind.as_str()])
                    .inc();
            }
            backlog.extend(engine.open(p)?);
        }
        applied.opened.extend(inputs.iter().copied());
        opened_here.push((p, inputs));
    }
    // A restore polls the consumer: a partition may have been lost during its own
    // restore or another's, and its backlog is the new owner's to publish.
    for (p, inputs) in opened_here {
        if !inputs.iter().copied().any(&still_assigned) {
            tracing::info!(
                service = name,
                partition = p,
                "partition lost while restoring"
            );
            engine.close(p);
            backlog.retain(|e| e.partition != p);
            applied.opened.retain(|i| !inputs.contains(i));
        }
    }
    let published = engine.publish(backlog, publisher, cancel, &[]).await?;
    stop_if_fenced_and_held(&published, &still_assigned)?;
    Ok(applied)
}

/// The group consumer of a service, and what it was subscribed for.
struct GroupMember<'a> {
    consumer: &'a StreamConsumer<KairosContext>,
    inputs: &'a [String],
    /// Assignments so far (see [`KairosContext`]).
    assignments: &'a AtomicU64,
}

impl GroupMember<'_> {
    /// Whether the consumer holds input partition `p` of any input topic.
    fn holds(&self, p: i32) -> bool {
        holds_input_partition(self.consumer, self.inputs, p)
    }
}

/// Keeps the consumer in its group while partitions restore. librdkafka leaves the
/// group when the application has not polled for `max.poll.interval.ms` (5 minutes by
/// default), and a restore of a large partition takes longer: the group would
/// rebalance without this instance, hand its partitions to others to restore, and
/// rebalance again when it polls. So a restore polls every beat, with every assigned
/// partition paused first: a pause drops what was fetched, and fetching resumes after
/// the last record handed to the application, so no record is skipped. A record
/// handed out anyway (only if pausing failed) is kept for the batch, in order, unless
/// an assignment followed it (eager rebalances reset positions: it comes again).
struct KeepInGroup<'a> {
    member: &'a GroupMember<'a>,
    /// Every partition paused, resumed at the end (a pause outlives a revocation).
    paused: rdkafka::TopicPartitionList,
    kept: Vec<rdkafka::message::OwnedMessage>,
    fetched_before: FetchedBeforeAssignment<'a>,
}

/// Consumer events served per beat of a restore, at most.
const POLLS_PER_BEAT: usize = 64;

/// Records kept while restoring, at most: past it (pausing keeps failing while records
/// keep coming) a restore stops polling rather than hold the input in memory.
const MAX_KEPT: usize = 10_000;

impl<'a> KeepInGroup<'a> {
    fn new(member: &'a GroupMember<'a>) -> Self {
        KeepInGroup {
            member,
            paused: rdkafka::TopicPartitionList::new(),
            kept: Vec::new(),
            fetched_before: FetchedBeforeAssignment::new(member.assignments),
        }
    }

    /// Pauses what the consumer holds now and polls it without waiting.
    fn poll(&mut self) {
        if self.kept.len() >= MAX_KEPT {
            return;
        }
        let consumer = self.member.consumer;
        if let Ok(assignment) = consumer.assignment() {
            // A partition paused before stays paused, revoked and assigned again too.
            let mut new = rdkafka::TopicPartitionList::new();
            for e in assignment.elements() {
                if self
                    .paused
                    .find_partition(e.topic(), e.partition())
                    .is_none()
                {
                    new.add_partition(e.topic(), e.partition());
                }
            }
            if new.count() > 0 {
                match consumer.pause(&new) {
                    Ok(()) => {
                        for e in new.elements() {
                            self.paused.add_partition(e.topic(), e.partition());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot pause the input while restoring")
                    }
                }
            }
        }
        for _ in 0..POLLS_PER_BEAT {
            // Nothing waiting, or an event handled (a rebalance: recorded for
            // `apply_rebalances`, and its partitions paused before the next poll).
            let Some(polled) = consumer.recv().now_or_never() else {
                break;
            };
            match polled {
                Ok(m) => {
                    self.fetched_before.look(self.kept.len());
                    self.kept.push(m.detach());
                }
                Err(e) => tracing::warn!(error = %e, "consumer error"),
            }
        }
    }

    /// Resumes every partition paused (see `Drop`); returns the records kept.
    fn finish(mut self) -> Vec<rdkafka::message::OwnedMessage> {
        self.fetched_before.look(self.kept.len());
        let mut kept = std::mem::take(&mut self.kept);
        kept.drain(..self.fetched_before.count);
        kept
    }
}

impl Drop for KeepInGroup<'_> {
    /// Also on an error's way out: a partition left paused would never be read again.
    fn drop(&mut self) {
        if self.paused.count() > 0 {
            if let Err(e) = self.member.consumer.resume(&self.paused) {
                tracing::warn!(error = %e, "cannot resume the input after restoring");
            }
        }
    }
}

/// Holds back the timers of a newly assigned partition until the consumer has read
/// the input backlog that was there at the assignment (as Kafka Streams punctuates on
/// stream time): a timer overdue after a restart or a move must not fire against
/// state that has not yet seen the purchase, the unsubscribe or the cancel waiting
/// in the backlog. The ends are fixed at the assignment, so a busy input does not
/// hold the timers back for longer than the backlog takes.
#[derive(Default)]
struct BacklogGates {
    /// Per state partition, the input topic-partitions not yet read to their end.
    waiting: HashMap<i32, Vec<InputEnd>>,
    /// Per state partition, the input partitions assigned whose backlog's end the
    /// broker could not tell yet: their timers wait too (a timer fired before the
    /// purchase in the backlog cannot be taken back), and the ends are asked for again.
    unknown: HashMap<i32, Vec<i32>>,
    /// When the unknown ends are asked for again, and the wait after that.
    next_try: Option<Instant>,
    retry_wait: Duration,
}

/// An input topic-partition's end at the assignment and the next offset to read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InputEnd {
    topic: String,
    partition: i32,
    end: i64,
    next: i64,
}

impl BacklogGates {
    /// Whether `state_partition`'s timers wait for backlog.
    fn holds(&self, state_partition: i32) -> bool {
        self.waiting.contains_key(&state_partition) || self.unknown.contains_key(&state_partition)
    }

    /// `state_partition` waits for `ends` too (those not read to their end already).
    fn wait_for(&mut self, state_partition: i32, ends: Vec<InputEnd>) {
        let ends: Vec<InputEnd> = ends.into_iter().filter(|e| e.next < e.end).collect();
        if !ends.is_empty() {
            self.waiting
                .entry(state_partition)
                .or_default()
                .extend(ends);
        }
    }

    fn release(&mut self, state_partition: i32) {
        self.waiting.remove(&state_partition);
        self.unknown.remove(&state_partition);
    }

    /// The consumer is at `next` in `topic`/`partition`.
    fn consumed(&mut self, topic: &str, partition: i32, next: i64) {
        self.waiting.retain(|_, ends| {
            for e in ends.iter_mut() {
                if e.topic == topic && e.partition == partition {
                    e.next = e.next.max(next);
                }
            }
            ends.retain(|e| e.next < e.end);
            !ends.is_empty()
        });
    }

    /// Moves on by the consumer's positions (which also pass records never handed
    /// out, such as transaction markers).
    fn check_positions<C: ConsumerContext>(&mut self, consumer: &StreamConsumer<C>) {
        if self.waiting.is_empty() {
            return;
        }
        let Ok(positions) = consumer.position() else {
            return;
        };
        for e in positions.elements() {
            if let rdkafka::Offset::Offset(next) = e.offset() {
                self.consumed(e.topic(), e.partition(), next);
            }
        }
    }

    /// Follows the rebalances just applied: revoked partitions wait no more, newly
    /// assigned ones wait for their inputs' ends as of now.
    fn follow<P: Processor, C: ConsumerContext>(
        &mut self,
        engine: &Engine<P>,
        consumer: &StreamConsumer<C>,
        inputs: &[String],
        applied: &AppliedRebalances,
    ) {
        for &p in &applied.revoked {
            self.release(engine.state_partition(p));
        }
        if applied.opened.is_empty() {
            return;
        }
        self.retry_wait = Duration::ZERO;
        self.learn_ends(engine, consumer, inputs, &applied.opened);
    }

    /// Asks where reading starts and where the backlog ends for the input `partitions`
    /// (three requests whatever their number); those the broker cannot tell go on
    /// waiting, and are asked for again later.
    fn learn_ends<P: Processor, C: ConsumerContext>(
        &mut self,
        engine: &Engine<P>,
        consumer: &StreamConsumer<C>,
        inputs: &[String],
        partitions: &[i32],
    ) {
        let answers = committed_offsets(consumer, inputs, partitions).and_then(|committed| {
            let lows = input_offsets_at(consumer, inputs, partitions, rdkafka::Offset::Beginning)?;
            let highs = input_offsets_at(consumer, inputs, partitions, rdkafka::Offset::End)?;
            Some((committed, lows, highs))
        });
        for &p in partitions {
            let state_partition = engine.state_partition(p);
            match answers
                .as_ref()
                .and_then(|(committed, lows, highs)| input_ends(inputs, p, committed, lows, highs))
            {
                Some(ends) => self.wait_for(state_partition, ends),
                None => {
                    let unknown = self.unknown.entry(state_partition).or_default();
                    if !unknown.contains(&p) {
                        unknown.push(p);
                    }
                }
            }
        }
        if !self.unknown.is_empty() {
            self.retry_wait =
                (self.retry_wait * 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
            self.next_try = Some(Instant::now() + self.retry_wait);
            tracing::warn!(
                retry_in = ?self.retry_wait,
                "the broker cannot tell where some inputs' backlog ends; their partitions' timers wait until it can"
            );
        }
    }

    /// Asks again for the backlog ends the broker could not tell, when due.
    fn retry_unknown<P: Processor, C: ConsumerContext>(
        &mut self,
        engine: &Engine<P>,
        consumer: &StreamConsumer<C>,
        inputs: &[String],
    ) {
        if self.unknown.is_empty() || self.next_try.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let partitions: Vec<i32> = std::mem::take(&mut self.unknown)
            .into_values()
            .flatten()
            .collect();
        self.learn_ends(engine, consumer, inputs, &partitions);
    }
}

/// The group's committed offsets of every input topic in `partitions` (one request).
fn committed_offsets<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    inputs: &[String],
    partitions: &[i32],
) -> Option<rdkafka::TopicPartitionList> {
    match consumer.committed_offsets(
        input_partitions(inputs, partitions),
        Duration::from_secs(10),
    ) {
        Ok(committed) => Some(committed),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read committed offsets");
            None
        }
    }
}

fn input_partitions(inputs: &[String], partitions: &[i32]) -> rdkafka::TopicPartitionList {
    let mut tpl = rdkafka::TopicPartitionList::new();
    for topic in inputs {
        for &p in partitions {
            tpl.add_partition(topic, p);
        }
    }
    tpl
}

/// The first (`Offset::Beginning`) or next-to-be-written (`Offset::End`) offset of
/// every input topic in `partitions`, in one request. Asked one topic-partition at a
/// time, each request waited behind the fetch the broker was holding on the same
/// connection (up to `fetch.wait.max.ms`): a rebalance of 32 partitions of five inputs
/// took some 40 s before its first record.
fn input_offsets_at<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    inputs: &[String],
    partitions: &[i32],
    at: rdkafka::Offset,
) -> Option<rdkafka::TopicPartitionList> {
    let mut tpl = input_partitions(inputs, partitions);
    // A list-offsets request reads the offset as a timestamp, where Beginning (-2)
    // means the earliest and End (-1) the latest.
    if let Err(e) = tpl.set_all_offsets(at) {
        tracing::warn!(error = %e, "cannot ask for the inputs' offsets");
        return None;
    }
    match consumer.offsets_for_times(tpl, Duration::from_secs(10)) {
        Ok(offsets) => Some(offsets),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the inputs' ends");
            None
        }
    }
}

/// Each input topic's end in `partition` and the offset the consumer starts at (its
/// group's committed offset in `committed`, or the earliest one), from the watermarks
/// `lows` and `highs`; `None` if the broker did not tell one of them.
fn input_ends(
    inputs: &[String],
    partition: i32,
    committed: &rdkafka::TopicPartitionList,
    lows: &rdkafka::TopicPartitionList,
    highs: &rdkafka::TopicPartitionList,
) -> Option<Vec<InputEnd>> {
    let offset = |tpl: &rdkafka::TopicPartitionList, topic: &str| {
        let e = tpl.find_partition(topic, partition)?;
        if let Err(error) = e.error() {
            tracing::warn!(%topic, partition, %error, "cannot read the input's end");
            return None;
        }
        match e.offset() {
            rdkafka::Offset::Offset(o) => Some(o),
            _ => None,
        }
    };
    let mut ends = Vec::new();
    for topic in inputs {
        let (low, high) = (offset(lows, topic)?, offset(highs, topic)?);
        let committed = committed
            .find_partition(topic, partition)
            .map(|e| e.offset());
        let next = match committed {
            Some(rdkafka::Offset::Offset(o)) => o.max(low),
            _ => low,
        };
        ends.push(InputEnd {
            topic: topic.clone(),
            partition,
            end: high,
            next,
        });
    }
    Some(ends)
}

fn dedup(mut v: Vec<i32>) -> Vec<i32> {
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(partition: i32, key: &[u8]) -> OutboxEntry {
        OutboxEntry {
            partition,
            outbox_key: Vec::new(),
            topic: "changelog".into(),
            key: key.to_vec(),
            payload: b"v".to_vec(),
            changelog: true,
            writer: Arc::from("w"),
            epoch: None,
        }
    }

    /// librdkafka's warning of a reset after an out-of-range fetch names the input
    /// lost; a group's first read (a debug line) and other warnings do not.
    #[test]
    fn an_offset_reset_after_an_out_of_range_fetch_names_the_topic_lost() {
        let reset = "[thrd:main]: kairos.events.site [0]: offset reset (at offset 5 (leader \
                     epoch 0), broker 1) to cached BEGINNING offset offset 2610 (leader epoch \
                     -1): fetch failed due to requested offset not available on the broker: \
                     Broker: Offset out of range";
        assert_eq!(
            input_lost_topic(RDKafkaLogLevel::Warning, "OFFSET", reset),
            Some("kairos.events.site")
        );
        let unthreaded = reset.trim_start_matches("[thrd:main]: ");
        assert_eq!(
            input_lost_topic(RDKafkaLogLevel::Warning, "OFFSET", unthreaded),
            Some("kairos.events.site")
        );
        // The new offset still to be asked for: counted.
        let to_be_asked = "[thrd:main]: kairos.events.site [1]: offset reset (at offset 7 \
                           (leader epoch -1), broker 1) to offset BEGINNING (leader epoch \
                           -1): fetch failed due to requested offset not available on the \
                           broker: Broker: Offset out of range";
        assert_eq!(
            input_lost_topic(RDKafkaLogLevel::Warning, "OFFSET", to_be_asked),
            Some("kairos.events.site")
        );
        // Back to an earlier offset (past the end of a topic made again): read again,
        // nothing lost.
        let replayed = "[thrd:main]: kairos.events.site [1]: offset reset (at offset 900 \
                        (leader epoch -1), broker 1) to cached BEGINNING offset offset 0 \
                        (leader epoch -1): fetch failed due to requested offset not \
                        available on the broker: Broker: Offset out of range";
        assert_eq!(
            input_lost_topic(RDKafkaLogLevel::Warning, "OFFSET", replayed),
            None
        );
        // A failed lookup (no right to read the topic) is no loss.
        let refused = "[thrd:main]: kairos.events.site [1]: offset reset (at offset \
                       INVALID, broker 1) to offset BEGINNING: failed to query logical \
                       offset: Broker: Topic authorization failed";
        assert_eq!(
            input_lost_topic(RDKafkaLogLevel::Warning, "OFFSET", refused),
            None
        );
        assert_eq!(
            input_lost_topic(RDKafkaLogLevel::Debug, "OFFSET", reset),
            None
        );
        assert_eq!(
            input_lost_topic(
                RDKafkaLogLevel::Warning,
                "FAIL",
                "localhost:9092/1: Disconnected (after 1ms in state UP)"
            ),
            None
        );
    }

    fn keys(wave: &Wave) -> Vec<(i32, String)> {
        wave.entries
            .iter()
            .map(|e| (e.partition, String::from_utf8_lossy(&e.key).into_owned()))
            .collect()
    }

    /// A partition given up keeps its frozen lag in librdkafka's statistics: it is not
    /// exported any more (its new owner exports it).
    #[test]
    fn lag_is_exported_for_assigned_partitions_only() {
        let registry = prometheus::Registry::new();
        let metrics = RuntimeMetrics::new(&registry);
        let lag_of = |p: &str| {
            metrics
                .consumer_lag
                .get_metric_with_label_values(&["in", p])
                .ok()
                .map(|g| g.get())
        };
        let exported = || {
            let families = registry.gather();
            families
                .iter()
                .filter(|f| f.name() == "kairos_consumer_lag_records")
                .map(|f| f.get_metric().len())
                .sum::<usize>()
        };
        note_lag(&metrics, "in", 0, true, 500);
        note_lag(&metrics, "in", 1, true, 7);
        assert_eq!(lag_of("0"), Some(500));
        assert_eq!(exported(), 2);
        // Partition 0 revoked: librdkafka still reports its last lag.
        note_lag(&metrics, "in", 0, false, 500);
        assert_eq!(exported(), 1);
        assert_eq!(lag_of("1"), Some(7));
        // Unknown lag (-1) leaves the value; a partition id of -1 is no partition.
        note_lag(&metrics, "in", 1, true, -1);
        note_lag(&metrics, "in", -1, true, 3);
        assert_eq!(lag_of("1"), Some(7));
        assert_eq!(exported(), 1);
    }

    /// Any input schedules 3,000 timers, due at once; each firing emits a record (at
    /// most `.0` a round).
    struct ManyTimers(Option<usize>);

    impl Processor for ManyTimers {
        type Input = ();
        fn name(&self) -> &str {
            "many-timers"
        }
        fn inputs(&self) -> Vec<String> {
            vec!["in".into()]
        }
        fn max_timers_per_round(&self) -> Option<usize> {
            self.0
        }
        fn decode(&self, _: &Record<'_>) -> Result<(), Rejection> {
            Ok(())
        }
        fn event_time(&self, _: &()) -> Option<Millis> {
            None
        }
        fn process(&mut self, ctx: &mut Ctx<'_>, _: ()) -> anyhow::Result<()> {
            for i in 0..3_000 {
                ctx.schedule(&format!("t{i:04}"), ctx.now() - 1, &i)?;
            }
            Ok(())
        }
        fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: &DueTimer) -> anyhow::Result<()> {
            ctx.emit("fired", "k", &timer.timer_id);
            Ok(())
        }
    }

    /// An engine of `processor` over a fresh state directory, its partition 0 open.
    fn engine_on_partition_0<P: Processor>(processor: P) -> (tempfile::TempDir, Config, Engine<P>) {
        engine_on_partition_0_with(processor, "")
    }

    /// Values written again (an undo, a former owner's left-out records) carry the
    /// end marker in their last wave only, even when the keys given hold its key: a
    /// marker among the first wave's records would end, for a later restore, the torn
    /// commit waiting before them if the write were cut short after that wave.
    #[test]
    fn values_written_again_end_their_commit_in_the_last_wave_only() {
        let dir = tempfile::tempdir().unwrap();
        let factory = crate::store::StoreFactory::new(dir.path(), 1 << 20).unwrap();
        let store = factory.open(0).unwrap();
        let keys = vec![
            b"s/b".to_vec(),
            META_COMMIT_END.to_vec(),
            b"i/timer".to_vec(),
            b"s/b".to_vec(),
        ];
        let [records, last] = values_again(&store, "changelog", keys).unwrap();
        let written: Vec<&[u8]> = records.iter().map(|r| r.key.as_slice()).collect();
        assert_eq!(written, [b"i/timer".as_slice(), b"s/b".as_slice()]);
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].key, META_COMMIT_END);
    }

    /// [`engine_on_partition_0`] with `kafka` settings added to `[kafka]`.
    fn engine_on_partition_0_with<P: Processor>(
        processor: P,
        kafka: &str,
    ) -> (tempfile::TempDir, Config, Engine<P>) {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::from_text(
            std::path::Path::new("test.toml"),
            &format!("[kafka]\npartitions = 1\n{kafka}"),
            &[(
                "KAIROS__STATE__DIR".into(),
                dir.path().display().to_string(),
            )],
        )
        .unwrap();
        let metrics = RuntimeMetrics::new(&prometheus::Registry::new());
        let mut engine = Engine::new(processor, &config, metrics).unwrap();
        engine.open(0).unwrap();
        (dir, config, engine)
    }

    /// Counts the runtime's calls to refresh its gauges.
    #[derive(Default)]
    struct GaugesWithTime {
        refreshed: std::sync::atomic::AtomicU32,
    }

    impl Processor for GaugesWithTime {
        type Input = ();
        fn name(&self) -> &str {
            "gauges-with-time"
        }
        fn inputs(&self) -> Vec<String> {
            vec!["in".into()]
        }
        fn decode(&self, _: &Record<'_>) -> Result<(), Rejection> {
            Ok(())
        }
        fn event_time(&self, _: &()) -> Option<Millis> {
            None
        }
        fn process(&mut self, _: &mut Ctx<'_>, _: ()) -> anyhow::Result<()> {
            Ok(())
        }
        fn on_timer(&mut self, _: &mut Ctx<'_>, _: &DueTimer) -> anyhow::Result<()> {
            Ok(())
        }
        fn refresh_gauges(&self) {
            self.refreshed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The runtime's periodic gauge refresh (also without input) reaches the
    /// processor's gauges that change with time alone.
    #[test]
    fn the_state_gauges_refresh_refreshes_the_processor_s_gauges_too() {
        let (_dir, _config, engine) = engine_on_partition_0(GaugesWithTime::default());
        engine.update_gauges();
        engine.update_gauges();
        let refreshed = engine
            .processor
            .refreshed
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(refreshed, 2);
    }

    /// Rejects every input.
    struct RejectsAll;

    impl Processor for RejectsAll {
        type Input = ();
        fn name(&self) -> &str {
            "rejects-all"
        }
        fn inputs(&self) -> Vec<String> {
            vec!["in".into()]
        }
        fn decode(&self, _: &Record<'_>) -> Result<(), Rejection> {
            Err(Rejection::new(DeadLetterReason::not_json, "not JSON"))
        }
        fn event_time(&self, _: &()) -> Option<Millis> {
            None
        }
        fn process(&mut self, _: &mut Ctx<'_>, _: ()) -> anyhow::Result<()> {
            Ok(())
        }
        fn on_timer(&mut self, _: &mut Ctx<'_>, _: &DueTimer) -> anyhow::Result<()> {
            Ok(())
        }
    }

    /// Rejects "bad", fails on "boom", and arms a timer due at once on anything else.
    struct RejectsOrFails;

    impl Processor for RejectsOrFails {
        type Input = Vec<u8>;
        fn name(&self) -> &str {
            "rejects-or-fails"
        }
        fn inputs(&self) -> Vec<String> {
            vec!["in".into()]
        }
        fn decode(&self, record: &Record<'_>) -> Result<Vec<u8>, Rejection> {
            match record.payload {
                b"bad" => Err(Rejection::new(DeadLetterReason::not_json, "not JSON")),
                other => Ok(other.to_vec()),
            }
        }
        fn event_time(&self, _: &Vec<u8>) -> Option<Millis> {
            None
        }
        fn process(&mut self, ctx: &mut Ctx<'_>, input: Vec<u8>) -> anyhow::Result<()> {
            anyhow::ensure!(input != b"boom", "boom");
            ctx.schedule("t", 0, &"due")
        }
        fn on_timer(&mut self, _: &mut Ctx<'_>, _: &DueTimer) -> anyhow::Result<()> {
            Ok(())
        }
    }

    /// Inputs are their own event times (decimal milliseconds), from a raw topic.
    struct Dated;

    impl Processor for Dated {
        type Input = Millis;
        fn name(&self) -> &str {
            "dated"
        }
        fn inputs(&self) -> Vec<String> {
            vec!["in".into()]
        }
        fn is_raw_input(&self, _: &str) -> bool {
            true
        }
        fn decode(&self, record: &Record<'_>) -> Result<Millis, Rejection> {
            std::str::from_utf8(record.payload)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or_else(|| Rejection::new(DeadLetterReason::invalid_field, "no time"))
        }
        fn event_time(&self, t: &Millis) -> Option<Millis> {
            Some(*t)
        }
        fn process(&mut self, _: &mut Ctx<'_>, _: Millis) -> anyhow::Result<()> {
            Ok(())
        }
        fn on_timer(&mut self, _: &mut Ctx<'_>, _: &DueTimer) -> anyhow::Result<()> {
            Ok(())
        }
    }

    /// In event time, a live service's partition quiet for longer than the gap takes
    /// events no further ahead of this machine's clock than a device may be
    /// (else it would refuse all its input for good); a replay does not, so its result
    /// does not depend on the day it runs. Years ahead is refused by both.
    #[test]
    fn a_live_service_s_feed_quiet_for_longer_than_the_gap_goes_on_a_replay_s_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::from_text(
            std::path::Path::new("test.toml"),
            "[kafka]\npartitions = 1\n[clock]\nmode = \"event\"\nmax_event_gap = \"1day\"\n",
            &[(
                "KAIROS__STATE__DIR".into(),
                dir.path().display().to_string(),
            )],
        )
        .unwrap();
        let dead_letters = |engine: &mut Engine<Dated>, live: bool| {
            let t0 = wall_now() - 30 * crate::time::DAY;
            let times = [t0, t0 + 3 * crate::time::DAY, 32_503_680_000_000];
            let mut letters = Vec::new();
            for (offset, t) in times.iter().enumerate() {
                let payload = t.to_string();
                let record = Record {
                    topic: "in",
                    partition: 0,
                    offset: offset as i64,
                    key: None,
                    payload: payload.as_bytes(),
                    written_at: None,
                };
                letters.extend(engine.handle(&record).unwrap());
            }
            letters.extend(engine.commit().unwrap());
            let letters: Vec<DeadLetter> = letters
                .into_iter()
                .filter(|e| e.topic == config.topic(topics::DEAD_LETTER))
                .map(|e| serde_json::from_slice(&e.payload).unwrap())
                .collect();
            assert_eq!(live, engine.durable_outputs);
            letters.iter().map(|l| l.source_offset).collect::<Vec<_>>()
        };
        let metrics = || RuntimeMetrics::new(&prometheus::Registry::new());
        let mut live = Engine::new(Dated, &config, metrics()).unwrap();
        live.open(0).unwrap();
        assert_eq!(dead_letters(&mut live, true), [2], "only the year 3000");
        drop(live);
        let replay_dir = tempfile::tempdir().unwrap();
        let mut config_replay = config.clone();
        config_replay.state.dir = replay_dir.path().to_path_buf();
        let mut replay = Engine::new(Dated, &config_replay, metrics())
            .unwrap()
            .for_replay();
        replay.open(0).unwrap();
        assert_eq!(dead_letters(&mut replay, false), [1, 2]);
    }

    /// A batch abandoned after a dead letter and a fired timer, then done again,
    /// counts each once: counts wait for the commit.
    #[test]
    fn a_batch_done_again_counts_its_dead_letters_and_timers_once() {
        let (_dir, _config, mut engine) = engine_on_partition_0(RejectsOrFails);
        let record = |offset, payload: &'static [u8]| Record {
            topic: "in",
            partition: 0,
            offset,
            key: None,
            payload,
            written_at: None,
        };
        let counts = |engine: &Engine<RejectsOrFails>| {
            (
                engine
                    .metrics
                    .dead_letters
                    .with_label_values(&["not_json"])
                    .get(),
                engine.metrics.timers_fired.get(),
            )
        };
        engine.handle(&record(0, b"arm")).unwrap();
        engine.commit().unwrap();
        engine.fire_due().unwrap();
        assert_eq!(counts(&engine), (0, 1));
        engine.handle(&record(1, b"bad")).unwrap();
        engine.handle(&record(2, b"arm")).unwrap();
        engine
            .fire_partition(0, wall_now(), false, 1, None)
            .unwrap();
        assert!(engine.handle(&record(3, b"boom")).is_err());
        assert_eq!(counts(&engine), (0, 1), "nothing of the abandoned batch");
        engine.handle(&record(1, b"bad")).unwrap();
        engine.handle(&record(2, b"arm")).unwrap();
        engine.commit().unwrap();
        engine.fire_due().unwrap();
        assert_eq!(counts(&engine), (1, 2));
    }

    #[test]
    fn the_dead_letter_of_a_huge_input_keeps_a_sample_that_fits_the_broker() {
        let (_dir, config, mut engine) = engine_on_partition_0(RejectsAll);
        let huge = vec![b'x'; 900_000];
        let small = b"{not json".to_vec();
        for (offset, payload) in [(0, &huge), (1, &small)] {
            let record = Record {
                topic: "in",
                partition: 0,
                offset,
                key: None,
                payload,
                written_at: None,
            };
            engine.handle(&record).unwrap();
        }
        let letters: Vec<(usize, DeadLetter)> = engine
            .commit()
            .unwrap()
            .into_iter()
            .filter(|e| e.topic == config.topic(topics::DEAD_LETTER))
            .map(|e| (e.payload.len(), serde_json::from_slice(&e.payload).unwrap()))
            .collect();
        assert_eq!(letters.len(), 2);
        let b64 = base64::engine::general_purpose::STANDARD;
        let (size, letter) = &letters[0];
        assert!(*size < 1_000_000, "{size}");
        assert_eq!(
            b64.decode(&letter.payload_base64).unwrap(),
            huge[..REFUSED_PAYLOAD_SAMPLE]
        );
        assert!(
            letter.reason.contains("of 900000 bytes are kept"),
            "{}",
            letter.reason
        );
        let (_, letter) = &letters[1];
        assert_eq!(b64.decode(&letter.payload_base64).unwrap(), small);
        assert_eq!(letter.reason, "not JSON");
    }

    /// An engine of [`ManyTimers`] (`per_round`) whose 3,000 timers are due, and the
    /// record that set them.
    fn many_due_timers(
        per_round: Option<usize>,
    ) -> (tempfile::TempDir, Engine<ManyTimers>, Record<'static>) {
        let (dir, _config, mut engine) = engine_on_partition_0(ManyTimers(per_round));
        let record = Record {
            topic: "in",
            partition: 0,
            offset: 0,
            key: None,
            payload: b"",
            written_at: None,
        };
        engine.handle(&record).unwrap();
        engine.commit().unwrap();
        (dir, engine, record)
    }

    fn fired(out: &[OutboxEntry]) -> usize {
        out.iter().filter(|e| e.topic == "fired").count()
    }

    #[test]
    fn due_timers_fire_in_bounded_chunks_and_all_of_them_in_the_end() {
        let (_dir, mut engine, record) = many_due_timers(None);
        let (out, more) = engine.fire_due_where(|_| true, 2, None).unwrap();
        assert_eq!((fired(&out), more), (1_024, true));
        let (out, more) = engine.fire_due_where(|_| true, 2, None).unwrap();
        assert_eq!((fired(&out), more), (1_024, true));
        let (out, more) = engine.fire_due_where(|_| true, 2, None).unwrap();
        assert_eq!((fired(&out), more), (952, false));
        // A partition held back fires nothing.
        engine
            .handle(&Record {
                offset: 1,
                ..record
            })
            .unwrap();
        engine.commit().unwrap();
        let (out, more) = engine.fire_due_where(|p| p != 0, 2, None).unwrap();
        assert_eq!((fired(&out), more), (0, false));
    }

    /// A processor whose timers are slow fires as few a round as it asks, each
    /// round committed (its outputs returned) before the next.
    #[test]
    fn a_processor_fires_as_few_timers_a_round_as_it_asks() {
        let (_dir, mut engine, _) = many_due_timers(Some(1));
        let (out, more) = engine.fire_due_where(|_| true, 3, None).unwrap();
        assert_eq!((fired(&out), more), (3, true));
        // Past the deadline, one round and no more.
        let past = Some(Instant::now());
        let (out, more) = engine.fire_due_where(|_| true, 5_000, past).unwrap();
        assert_eq!((fired(&out), more), (1, true));
        let (out, more) = engine.fire_due_where(|_| true, 5_000, None).unwrap();
        assert_eq!((fired(&out), more), (2_996, false));
    }

    #[test]
    fn rebalances_drained_together_act_by_their_net_effect() {
        use RebalanceEvent::{Assign, Revoke};
        // Assigned, then taken away before this instance got to it: never opened.
        assert_eq!(
            net_rebalance(vec![
                Assign(vec![1, 2]),
                Revoke(vec![1, 2]),
                Assign(vec![3])
            ]),
            NetRebalance {
                revoked: vec![1, 2],
                assigned: vec![3],
                any_assignment: true,
            }
        );
        // Revoked and assigned again: closed and restored anew (another instance may
        // have written in between).
        assert_eq!(
            net_rebalance(vec![Revoke(vec![0, 1]), Assign(vec![1])]),
            NetRebalance {
                revoked: vec![0, 1],
                assigned: vec![1],
                any_assignment: true,
            }
        );
        assert_eq!(
            net_rebalance(vec![Revoke(vec![4])]),
            NetRebalance {
                revoked: vec![4],
                assigned: vec![],
                any_assignment: false,
            }
        );
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(future)
    }

    /// A one-broker mock cluster with a one-partition topic "changelog", a directory
    /// for stores, and a config that points at the cluster.
    fn changelog_on_a_mock_cluster() -> (
        rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        tempfile::TempDir,
        Config,
    ) {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("changelog", 1, 1).unwrap();
        let config = Config::from_text(
            std::path::Path::new("test.toml"),
            &format!(
                "[kafka]\nbootstrap_servers = \"{}\"\n",
                cluster.bootstrap_servers()
            ),
            &[],
        )
        .unwrap();
        (cluster, tempfile::tempdir().unwrap(), config)
    }

    #[test]
    fn a_torn_commit_is_not_undone_when_the_changelog_grew_during_the_restore() {
        let (_cluster, dir, config) = changelog_on_a_mock_cluster();
        let producer = kafka::producer(&config).unwrap();
        let high = || {
            let consumer: BaseConsumer = kafka::client_config(&config).unwrap().create().unwrap();
            consumer
                .fetch_watermarks("changelog", 0, Duration::from_secs(10))
                .unwrap()
                .1
        };
        // A commit torn before its end marker ends the changelog.
        let mut writer = StoreFactory::new(&dir.path().join("a"), 8 << 20)
            .unwrap()
            .open(0)
            .unwrap();
        let mut pending = Pending::default();
        writer.put(&mut pending, b"c/1", b"torn".to_vec());
        let mut torn: Vec<OutboxEntry> = writer
            .commit_with(&mut pending, Some("changelog"), true)
            .unwrap()
            .into_iter()
            .filter(|e| e.changelog)
            .collect();
        torn.pop();
        for sent in block_on(send_all(&producer, &torn, true)) {
            sent.unwrap();
        }
        let torn_end = high();
        // Another instance writes while this one restores: no undo from this one.
        let factory = StoreFactory::new(&dir.path().join("b"), 8 << 20).unwrap();
        let other_writes = || {
            // The first record of the other instance's commit (this version's).
            let mut record = entry(0, b"s/c/2");
            record.writer = Arc::from("other");
            for sent in block_on(send_all(&producer, &[record], true)) {
                sent.unwrap();
            }
        };
        let attempt = restore_once(
            &ChangelogReader::new(&config).unwrap(),
            &config,
            &factory,
            "changelog",
            0,
            TornCommit::Undo,
            true,
            &other_writes,
            &|| Ok(()),
        )
        .unwrap();
        assert!(matches!(attempt, Restore::ChangelogMoved(_)));
        assert_eq!(
            high(),
            torn_end + 2,
            "the other instance's record and this one's claim, not valid: no undo"
        );
        // Once nobody else writes, the restore undoes it.
        let reader = ChangelogReader::new(&config).unwrap();
        restore_partition(
            &reader,
            &config,
            &factory,
            "changelog",
            0,
            TornCommit::Undo,
            true,
        )
        .unwrap();
        assert!(high() > torn_end + 1, "the undo follows");
    }

    /// A producer that failed for good (as an idempotent one does when the broker
    /// lost records it acknowledged) refuses every record: publishing gives up at once
    /// instead of retrying for ever, and the records stay unacknowledged (in the
    /// outbox, for the service started again).
    #[test]
    fn a_producer_failed_for_good_is_not_retried_for_ever() {
        use rdkafka::producer::Producer;
        let (_cluster, _dir, config) = changelog_on_a_mock_cluster();
        let producer = kafka::producer(&config).unwrap();
        assert_eq!(producer_failed_for_good(&producer), None);
        let reason = std::ffi::CString::new("sequence gap").unwrap();
        // SAFETY: the producer's own handle, alive for the call; librdkafka copies the
        // reason.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                producer.client().native_ptr(),
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            )
        };
        assert_eq!(
            err,
            rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        );
        let told = producer_failed_for_good(&producer).expect("a fatal error");
        assert!(told.contains("sequence gap"), "{told}");
        let metrics = RuntimeMetrics::new(&prometheus::Registry::new());
        let dead_letters = OutputDeadLetters::new(&config, "test");
        let cancel = CancellationToken::new();
        let mut output = entry(0, b"k");
        output.changelog = false;
        // A commit's changelog records and output, and an output alone.
        for entries in [vec![entry(0, b"c/1"), output.clone()], vec![output]] {
            let published = block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(30),
                    publish(&producer, entries, &dead_letters, &metrics, &cancel),
                )
                .await
            })
            .expect("publishing gave up");
            assert!(published.is_empty(), "{published:?}");
        }
    }

    /// Records acknowledged count as changelog records; one never tried (after a
    /// refused one) is no failed attempt.
    #[test]
    fn a_publish_counts_changelog_records_and_only_attempts() {
        let (_cluster, _dir, config) = changelog_on_a_mock_cluster();
        let producer = kafka::producer(&config).unwrap();
        let metrics = RuntimeMetrics::new(&prometheus::Registry::new());
        let dead_letters = OutputDeadLetters::new(&config, "test");
        let cancel = CancellationToken::new();
        let sent = block_on(publish(
            &producer,
            vec![entry(0, b"a"), entry(0, b"b")],
            &dead_letters,
            &metrics,
            &cancel,
        ));
        assert_eq!(sent.len(), 2);
        assert_eq!(metrics.changelog_records.get(), 2);
        cancel.cancel();
        // Partition 5 does not exist: the broker never takes the first record, and
        // the one after it is never tried. One round (cancelled already): one failed
        // attempt, not two.
        let stuck = vec![entry(5, b"c"), entry(5, b"d")];
        assert!(block_on(publish(&producer, stuck, &dead_letters, &metrics, &cancel)).is_empty());
        assert_eq!(metrics.produce_errors.get(), 1);
        assert_eq!(metrics.changelog_records.get(), 2);
    }

    /// Emits one output per input, to topic "out".
    struct EmitsOne;

    impl Processor for EmitsOne {
        type Input = ();
        fn name(&self) -> &str {
            "emits-one"
        }
        fn inputs(&self) -> Vec<String> {
            vec!["in".into()]
        }
        fn decode(&self, _: &Record<'_>) -> Result<(), Rejection> {
            Ok(())
        }
        fn event_time(&self, _: &()) -> Option<Millis> {
            None
        }
        fn process(&mut self, ctx: &mut Ctx<'_>, _: ()) -> anyhow::Result<()> {
            ctx.emit("out", "k", &"v");
            Ok(())
        }
        fn on_timer(&mut self, _: &mut Ctx<'_>, _: &DueTimer) -> anyhow::Result<()> {
            Ok(())
        }
    }

    /// While the broker takes nothing, the outbox gauge shows the commit's outputs
    /// waiting (the publish retries, and the loop's look at the outbox waits with it);
    /// once it takes them, nothing.
    #[test]
    fn the_outbox_gauge_shows_what_a_stuck_publish_waits_on() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("out", 1, 1).unwrap();
        let kafka = format!(
            "bootstrap_servers = \"{}\"\n[kafka.client]\n\"message.timeout.ms\" = \"1000\"\n",
            cluster.bootstrap_servers()
        );
        let (_dir, config, mut engine) = engine_on_partition_0_with(EmitsOne, &kafka);
        let metrics = engine.metrics.clone();
        let producer = kafka::producer(&config).unwrap();
        let gap_reader = ChangelogReader::new(&config).unwrap();
        let dead_letters = OutputDeadLetters::new(&config, "test");
        let publisher = Publisher {
            producer: &producer,
            gap_reader: &gap_reader,
            dead_letters: &dead_letters,
            metrics: &metrics,
        };
        let commit = |engine: &mut Engine<EmitsOne>, offset: i64| {
            let record = Record {
                topic: "in",
                partition: 0,
                offset,
                key: Some(b"k"),
                payload: b"{}",
                written_at: None,
            };
            let mut out = engine.handle(&record).unwrap();
            out.extend(engine.commit().unwrap());
            out
        };
        let out = commit(&mut engine, 0);
        let cancel = CancellationToken::new();
        let published = block_on(engine.publish(out, &publisher, &cancel, &[])).unwrap();
        assert_eq!(published.acked.len(), 1);
        assert_eq!(metrics.outbox_pending.get(), 0);
        cluster.broker_down(1).unwrap();
        let out = commit(&mut engine, 1);
        let stopping = CancellationToken::new();
        std::thread::scope(|s| {
            let publishing = s.spawn(|| {
                let published = block_on(engine.publish(out, &publisher, &stopping, &[])).unwrap();
                published.acked.len()
            });
            std::thread::sleep(Duration::from_millis(1500));
            let waiting = metrics.outbox_pending.get();
            stopping.cancel();
            assert_eq!(waiting, 1, "waiting while it retries");
            assert_eq!(publishing.join().unwrap(), 0);
        });
        assert_eq!(metrics.outbox_pending.get(), 1, "still in the outbox");
    }

    /// A new owner killed between its claim and the undo of a torn commit restores
    /// again on restart and undoes it then: the commit it writes next must not be
    /// the end marker a later rebuild applies the torn records with.
    #[test]
    fn a_restore_cut_short_between_its_claim_and_the_undo_undoes_the_torn_commit_on_restart() {
        let (_cluster, dir, config) = changelog_on_a_mock_cluster();
        let producer = kafka::producer(&config).unwrap();
        let publish = |store: &mut PartitionStore, key: &[u8], value: &[u8], whole: bool| {
            let mut pending = Pending::default();
            store.put(&mut pending, key, value.to_vec());
            let mut records: Vec<OutboxEntry> = store
                .commit_with(&mut pending, Some("changelog"), true)
                .unwrap()
                .into_iter()
                .filter(|e| e.changelog)
                .collect();
            if !whole {
                records.pop(); // the end marker
            }
            for sent in block_on(send_all(&producer, &records, true)) {
                sent.unwrap();
            }
        };
        // The former owner's commit, torn before its end marker.
        let mut former = StoreFactory::new(&dir.path().join("former"), 8 << 20)
            .unwrap()
            .open(0)
            .unwrap();
        publish(&mut former, b"c/1", b"torn", false);
        // The new owner claims, then dies before the undo goes out.
        let factory = StoreFactory::new(&dir.path().join("new"), 8 << 20).unwrap();
        let reader = ChangelogReader::new(&config).unwrap();
        let killed = restore_once(
            &reader,
            &config,
            &factory,
            "changelog",
            0,
            TornCommit::Undo,
            true,
            &|| (),
            &|| anyhow::bail!("killed"),
        );
        assert!(killed.is_err());
        // It restarts, restores, and commits on.
        restore_partition(
            &reader,
            &config,
            &factory,
            "changelog",
            0,
            TornCommit::Undo,
            true,
        )
        .unwrap();
        let mut owner = factory.open(0).unwrap();
        publish(&mut owner, b"c/2", b"next", true);
        drop(owner);
        // A rebuild elsewhere (the partition moves on) has the new owner's commit and
        // not the torn one.
        let elsewhere = StoreFactory::new(&dir.path().join("elsewhere"), 8 << 20).unwrap();
        restore_partition(
            &reader,
            &config,
            &elsewhere,
            "changelog",
            0,
            TornCommit::Leave,
            false,
        )
        .unwrap();
        let rebuilt = elsewhere.open(0).unwrap();
        let pending = Pending::default();
        assert_eq!(
            rebuilt.get(&pending, b"c/2").unwrap().as_deref(),
            Some(&b"next"[..])
        );
        assert_eq!(
            rebuilt.get(&pending, b"c/1").unwrap(),
            None,
            "the torn commit stays undone"
        );
    }

    fn input_end(topic: &str, partition: i32, next: i64, end: i64) -> InputEnd {
        InputEnd {
            topic: topic.into(),
            partition,
            end,
            next,
        }
    }

    #[test]
    fn timers_wait_until_every_input_is_read_to_its_end_at_the_assignment() {
        let mut gates = BacklogGates::default();
        gates.wait_for(3, vec![input_end("a", 3, 5, 10), input_end("b", 3, 7, 7)]);
        // Nothing to read: no wait at all.
        gates.wait_for(4, vec![input_end("a", 4, 2, 2)]);
        assert!(gates.holds(3));
        assert!(!gates.holds(4));
        gates.consumed("a", 4, 9);
        gates.consumed("a", 3, 9);
        assert!(gates.holds(3), "offset 9 of a[3] is not read yet");
        // Records arriving after the assignment do not move the end.
        gates.consumed("a", 3, 10);
        assert!(!gates.holds(3));
        // A revocation drops the wait.
        gates.wait_for(5, vec![input_end("a", 5, 0, 1)]);
        gates.release(5);
        assert!(!gates.holds(5));
    }

    #[test]
    fn end_markers_go_only_after_every_record_and_unmarked_backlog_goes_unstamped() {
        let waves = changelog_waves(vec![
            entry(0, b"s/a"),
            entry(0, b"s/b"),
            entry(0, META_COMMIT_END),
            entry(1, b"s/c"),
            entry(1, META_COMMIT_END),
            entry(0, b"s/d"),
            entry(0, META_COMMIT_END),
            // Left by a version that wrote no markers.
            entry(2, b"s/old"),
        ]);
        let end = String::from_utf8_lossy(META_COMMIT_END).into_owned();
        let got: Vec<(Vec<(i32, String)>, bool)> =
            waves.iter().map(|w| (keys(w), w.in_commit)).collect();
        assert_eq!(
            got,
            vec![
                (
                    vec![
                        (0, "s/a".into()),
                        (0, "s/b".into()),
                        (0, "s/d".into()),
                        (1, "s/c".into())
                    ],
                    true
                ),
                (vec![(0, end.clone()), (0, end.clone()), (1, end)], true),
                (vec![(2, "s/old".into())], false),
            ]
        );
    }
}
