//! A commit reaches another instance through the changelog whole or not at all, with
//! its outputs: the guarantees a partition that moves after a crash relies on.
//!
//! Each test runs against librdkafka's mock cluster (a Kafka-protocol broker in the
//! process, what `kairos dev-broker` serves) with real producers and consumers, and
//! plays the crash by publishing only part of a commit.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use kairos_core::config::Config;
use kairos_core::encoding::Rejection;
use kairos_core::metrics::RuntimeMetrics;
use kairos_core::runtime::{
    check_changelog_tail, publish, publish_fenced, put_ahead, restore_partition, write_again,
    ChangelogReader, Ctx, Engine, Gap, OutputDeadLetters, OwnSpan, PartitionClaimed, Processor,
    ProducerWriteAhead, Published, Publisher, Record, RestoreKind, RestoreStats, TornCommit,
    WriteAhead, REFUSED_PAYLOAD_SAMPLE, SPILL_AFTER,
};
use kairos_core::store::{DueTimer, OutboxEntry, PartitionStore, Pending, StoreFactory};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

const CHANGELOG: &str = "kairos-test-changelog";
const OUTPUT: &str = "kairos-test-output";
const INPUT: &str = "kairos-test-input";

struct Broker {
    // Kept alive for the test's length.
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    config: Config,
    producer: FutureProducer,
    metrics: RuntimeMetrics,
    dead_letters: OutputDeadLetters,
}

/// The dead-letter topic under the test config's default prefix.
const DEAD_LETTER: &str = "kairos.deadletter";

fn broker() -> Broker {
    let cluster = MockCluster::new(1).expect("mock cluster");
    for topic in [CHANGELOG, OUTPUT, DEAD_LETTER] {
        cluster.create_topic(topic, 1, 1).expect("topic");
    }
    let text = format!(
        "[kafka]\nbootstrap_servers = \"{}\"\n",
        cluster.bootstrap_servers()
    );
    let config = Config::from_text(Path::new("test.toml"), &text, &[]).expect("config");
    let producer = kairos_core::kafka::producer(&config).expect("producer");
    assert_eq!(
        config.topic(kairos_core::config::topics::DEAD_LETTER),
        DEAD_LETTER
    );
    Broker {
        cluster,
        dead_letters: OutputDeadLetters::new(&config, "test"),
        config,
        producer,
        metrics: RuntimeMetrics::new(&prometheus::Registry::new()),
    }
}

impl Broker {
    fn publish(&self, entries: Vec<OutboxEntry>, cancel: &CancellationToken) -> Vec<i64> {
        self.publish_through(&self.producer, entries, cancel)
            .into_iter()
            .map(|(_, offset)| offset)
            .collect()
    }

    fn publish_through(
        &self,
        producer: &FutureProducer,
        entries: Vec<OutboxEntry>,
        cancel: &CancellationToken,
    ) -> Vec<(OutboxEntry, i64)> {
        block_on(publish(
            producer,
            entries,
            &self.dead_letters,
            &self.metrics,
            cancel,
        ))
    }

    /// Sends changelog records the way a writer that died before its commit's end
    /// marker left them: stamped as part of a commit, in order.
    fn send_torn(&self, entries: &[OutboxEntry]) {
        for e in entries {
            let headers = rdkafka::message::OwnedHeaders::new()
                .insert(rdkafka::message::Header {
                    key: "kairos-writer",
                    value: Some(e.writer.as_bytes()),
                })
                .insert(rdkafka::message::Header {
                    key: "kairos-commit",
                    value: Some(&b"1"[..]),
                });
            let record = rdkafka::producer::FutureRecord::to(&e.topic)
                .partition(e.partition)
                .key(&e.key[..])
                .payload(&e.payload[..])
                .headers(headers);
            block_on(self.producer.send(record, Duration::from_secs(10))).expect("produce");
        }
    }

    /// Restores changelog partition 0 into `factory`'s store, as a new owner does.
    fn restore(&self, factory: &StoreFactory) -> RestoreStats {
        let reader = ChangelogReader::new(&self.config).expect("changelog reader");
        restore_partition(
            &reader,
            &self.config,
            factory,
            CHANGELOG,
            0,
            TornCommit::Undo,
            true,
        )
        .expect("restore")
    }

    /// A producer of this broker with `settings` of its own.
    fn producer_with(&self, settings: &[(&str, &str)]) -> FutureProducer {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.config.kafka.bootstrap_servers);
        for (key, value) in settings {
            config.set(*key, *value);
        }
        config.create().expect("producer")
    }

    /// Payloads of `topic` partition 0, in order.
    fn payloads(&self, topic: &str) -> Vec<Vec<u8>> {
        self.records(topic).into_iter().map(|(_, v)| v).collect()
    }

    /// The last payload of each key in `topic` partition 0: what compaction keeps
    /// (empty for a tombstone).
    fn compacted(&self, topic: &str) -> HashMap<Vec<u8>, Vec<u8>> {
        self.records(topic).into_iter().collect()
    }

    /// Keys and payloads of `topic` partition 0, in order.
    fn records(&self, topic: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.config.kafka.bootstrap_servers)
            .set("group.id", "read")
            .set("fetch.message.max.bytes", "10000000")
            .create()
            .expect("consumer");
        let (low, high) = consumer
            .fetch_watermarks(topic, 0, Duration::from_secs(10))
            .expect("watermarks");
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, rdkafka::Offset::Offset(low))
            .expect("tpl");
        consumer.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while (out.len() as i64) < high - low {
            assert!(
                std::time::Instant::now() < deadline,
                "reading {topic} timed out"
            );
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                out.push((
                    m.key().unwrap_or_default().to_vec(),
                    m.payload().unwrap_or_default().to_vec(),
                ));
            }
        }
        out
    }

    /// Records in `topic` partition 0.
    fn count(&self, topic: &str) -> i64 {
        self.payloads(topic).len() as i64
    }
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// One commit of `store`: `puts` as state, the input offset, one output.
fn commit(
    store: &mut PartitionStore,
    puts: &[(&str, &str)],
    input_offset: i64,
    output: &str,
) -> Vec<OutboxEntry> {
    let mut pending = Pending::default();
    for (k, v) in puts {
        store.put(&mut pending, k.as_bytes(), v.as_bytes().to_vec());
    }
    store.set_applied_offset(&mut pending, INPUT, input_offset);
    store.emit(
        &mut pending,
        OUTPUT,
        b"customer",
        output.as_bytes().to_vec(),
    );
    store
        .commit_with(&mut pending, Some(CHANGELOG), true)
        .expect("commit")
}

fn value(store: &PartitionStore, key: &str) -> Option<String> {
    store
        .get(&Pending::default(), key.as_bytes())
        .expect("read")
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

fn outbox_outputs(store: &PartitionStore) -> Vec<String> {
    store
        .outbox()
        .expect("outbox")
        .into_iter()
        .filter(|e| !e.changelog)
        .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
        .collect()
}

/// An instance's store of partition 0, in a state directory of its own.
fn fresh_store() -> (tempfile::TempDir, PartitionStore) {
    let dir = tempfile::tempdir().expect("dir");
    let store = StoreFactory::new(dir.path(), 8 << 20)
        .expect("factory")
        .open(0)
        .expect("open");
    (dir, store)
}

/// The store of an instance that takes partition 0 over: restored from the changelog
/// into a new state directory.
fn restored(broker: &Broker) -> (tempfile::TempDir, PartitionStore) {
    let (dir, store, _) = restored_with_stats(broker);
    (dir, store)
}

/// The state a rebuild from the changelog gives, as `kairos inspect` restores it: the
/// changelog left alone (no claim), so the partition's owner goes on as before.
fn looked_at(broker: &Broker) -> (tempfile::TempDir, PartitionStore) {
    let dir = tempfile::tempdir().expect("dir");
    let factory = StoreFactory::new(dir.path(), 8 << 20).expect("factory");
    let reader = ChangelogReader::new(&broker.config).expect("changelog reader");
    restore_partition(
        &reader,
        &broker.config,
        &factory,
        CHANGELOG,
        0,
        TornCommit::Leave,
        false,
    )
    .expect("restore");
    let store = factory.open(0).expect("open");
    (dir, store)
}

/// [`restored`], with what the restore did.
fn restored_with_stats(broker: &Broker) -> (tempfile::TempDir, PartitionStore, RestoreStats) {
    let dir = tempfile::tempdir().expect("dir");
    let factory = StoreFactory::new(dir.path(), 8 << 20).expect("factory");
    let stats = broker.restore(&factory);
    let store = factory.open(0).expect("open");
    (dir, store, stats)
}

#[test]
fn a_commit_torn_by_a_crash_while_publishing_is_neither_applied_nor_revived_later() {
    let broker = broker();
    let never = CancellationToken::new();
    let (_a_dir, mut a_store) = fresh_store();
    let first = commit(&mut a_store, &[("c/1", "v1")], 0, "first");
    assert!(broker.publish(first, &never).iter().all(|o| *o >= 0));
    // The second commit changes c/1, adds c/2, replicates its output and moves the
    // input offset; instance A dies after every record but the end marker reached the
    // broker.
    let second = commit(&mut a_store, &[("c/1", "v2"), ("c/2", "new")], 1, "second");
    let mut torn: Vec<OutboxEntry> = second.into_iter().filter(|e| e.changelog).collect();
    assert_eq!(torn.pop().map(|e| e.key), Some(b"m/commit_end".to_vec()));
    assert_eq!(torn[0].key, b"s/c/1");
    assert_eq!(torn[1].key, b"s/c/2");
    assert!(
        torn.iter().any(|e| e.key.starts_with(b"o/")),
        "the offset is torn too"
    );
    assert!(
        torn.iter().any(|e| e.key.starts_with(b"x/")),
        "the output's replica too"
    );
    broker.send_torn(&torn);

    // Instance B takes the partition over: it holds the first commit only, so it
    // processes the second commit's input again.
    let (_b_dir, mut b_store) = restored(&broker);
    assert_eq!(value(&b_store, "c/1").as_deref(), Some("v1"));
    assert_eq!(value(&b_store, "c/2"), None);
    assert_eq!(
        b_store
            .applied_offset(&Pending::default(), INPUT)
            .expect("offset"),
        Some(0)
    );
    assert!(!outbox_outputs(&b_store).contains(&"second".to_string()));

    // B commits its own work; a third instance restoring later sees B's state, not the
    // torn records revived by B's commits coming after them.
    let third = commit(&mut b_store, &[("c/3", "b")], 1, "third");
    assert!(broker.publish(third, &never).iter().all(|o| *o >= 0));
    let (_c_dir, c_store) = restored(&broker);
    assert_eq!(value(&c_store, "c/1").as_deref(), Some("v1"));
    assert_eq!(value(&c_store, "c/2"), None);
    assert_eq!(value(&c_store, "c/3").as_deref(), Some("b"));
}

#[test]
fn outputs_of_a_commit_in_the_changelog_are_published_by_the_instance_that_restores_it() {
    let broker = broker();
    let never = CancellationToken::new();
    let (_a_dir, mut a_store) = fresh_store();
    // The whole commit reached the changelog, then A died before its output went out.
    let entries = commit(&mut a_store, &[("c/1", "v1")], 0, "the trigger");
    let changelog: Vec<OutboxEntry> = entries.into_iter().filter(|e| e.changelog).collect();
    assert!(broker.publish(changelog, &never).iter().all(|o| *o >= 0));
    assert_eq!(broker.count(OUTPUT), 0);

    let (_b_dir, b_store) = restored(&broker);
    // B counts the input as applied, so it must publish the output itself.
    assert_eq!(
        b_store
            .applied_offset(&Pending::default(), INPUT)
            .expect("offset"),
        Some(0)
    );
    assert_eq!(outbox_outputs(&b_store), ["the trigger"]);
}

#[test]
fn an_output_acknowledged_before_the_next_commit_is_not_published_again_after_a_move() {
    let broker = broker();
    let never = CancellationToken::new();
    let (_a_dir, mut a_store) = fresh_store();
    let first = commit(&mut a_store, &[("c/1", "v1")], 0, "first");
    let outputs: Vec<Vec<u8>> = first
        .iter()
        .filter(|e| !e.changelog)
        .map(|e| e.outbox_key.clone())
        .collect();
    assert!(broker.publish(first, &never).iter().all(|o| *o >= 0));
    assert_eq!(broker.count(OUTPUT), 1);
    // The engine acknowledges the output; its deletion rides on the next commit.
    let mut pending = Pending::default();
    a_store
        .acknowledge_outputs(&mut pending, outputs)
        .expect("acknowledge");
    a_store.put(&mut pending, b"c/2", b"v2".to_vec());
    a_store.set_applied_offset(&mut pending, INPUT, 1);
    let second = a_store
        .commit_with(&mut pending, Some(CHANGELOG), true)
        .expect("commit");
    assert!(broker.publish(second, &never).iter().all(|o| *o >= 0));

    let (_b_dir, b_store) = restored(&broker);
    assert_eq!(value(&b_store, "c/2").as_deref(), Some("v2"));
    assert!(outbox_outputs(&b_store).is_empty());
}

#[test]
fn outputs_wait_until_their_commit_is_in_the_changelog() {
    let broker = broker();
    let (_a_dir, mut a_store) = fresh_store();
    let mut entries = commit(&mut a_store, &[("c/1", "v1")], 0, "the trigger");
    // The changelog's partition cannot take writes (here: it does not exist), as when
    // its leader is down; the service is stopped a second later.
    for e in entries.iter_mut().filter(|e| e.changelog) {
        e.partition = 7;
    }
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        stop.cancel();
    });
    let acked = broker.publish(entries, &cancel);
    stopper.join().expect("stopper");
    assert!(acked.is_empty(), "acknowledged: {acked:?}");
    assert_eq!(broker.count(OUTPUT), 0);
}

#[test]
fn a_changelog_written_before_commit_markers_restores_every_record() {
    let broker = broker();
    // An earlier version's records: no commit header, no end markers.
    for (key, value) in [("s/c/1", "v1"), ("s/c/2", "v2"), ("s/c/1", "v3")] {
        let record = rdkafka::producer::FutureRecord::to(CHANGELOG)
            .partition(0)
            .key(key)
            .payload(value);
        block_on(broker.producer.send(record, Duration::from_secs(10))).expect("produce");
    }
    let (_dir, store) = restored(&broker);
    assert_eq!(value(&store, "c/1").as_deref(), Some("v3"));
    assert_eq!(value(&store, "c/2").as_deref(), Some("v2"));
}

#[test]
fn a_torn_commit_larger_than_the_first_look_back_is_found_too() {
    let broker = broker();
    let never = CancellationToken::new();
    let (_a_dir, mut a_store) = fresh_store();
    let first = commit(&mut a_store, &[("c/first", "kept")], 0, "first");
    assert!(broker.publish(first, &never).iter().all(|o| *o >= 0));
    // 1,500 records after the last end marker: more than the restore's first look at
    // the changelog's end.
    let keys: Vec<String> = (0..1_500).map(|i| format!("c/{i:05}")).collect();
    let puts: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "torn")).collect();
    let mut torn: Vec<OutboxEntry> = commit(&mut a_store, &puts, 1, "second")
        .into_iter()
        .filter(|e| e.changelog)
        .collect();
    torn.pop();
    broker.send_torn(&torn);

    let (_b_dir, b_store) = restored(&broker);
    assert_eq!(value(&b_store, "c/first").as_deref(), Some("kept"));
    assert_eq!(value(&b_store, "c/00000"), None);
    assert_eq!(value(&b_store, "c/01499"), None);
    assert_eq!(
        b_store
            .applied_offset(&Pending::default(), INPUT)
            .expect("offset"),
        Some(0)
    );
}

/// A commit of more records than a restore holds in memory (as compaction leaves
/// every record before the last end marker waiting for it) is applied as it is read,
/// and all of it stands once its marker comes; one whose marker never came is taken
/// back, each key to its value from before, and stays taken back for later restores.
#[test]
fn a_commit_larger_than_a_restore_holds_is_applied_whole_or_not_at_all() {
    let broker = broker();
    let never = CancellationToken::new();
    let (_a_dir, mut a_store) = fresh_store();
    let first = commit(
        &mut a_store,
        &[("c/first", "kept"), ("c/00007", "before")],
        0,
        "first",
    );
    assert!(broker.publish(first, &never).iter().all(|o| *o >= 0));
    let n = SPILL_AFTER + 500;
    let keys: Vec<String> = (0..n).map(|i| format!("c/{i:05}")).collect();
    let puts: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "whole")).collect();
    let whole = commit(&mut a_store, &puts, 1, "second");
    assert!(broker.publish(whole, &never).iter().all(|o| *o >= 0));
    let (_b_dir, b_store, stats) = restored_with_stats(&broker);
    assert!(stats.spilled >= SPILL_AFTER as u64, "{stats:?}");
    let applied_whole = stats.applied;
    for key in ["c/first", "c/00000", "c/00007", &keys[n - 1]] {
        let expected = if key == "c/first" { "kept" } else { "whole" };
        assert_eq!(value(&b_store, key).as_deref(), Some(expected), "{key}");
    }
    drop(b_store);

    // The same keys and as many new ones again, torn before the end marker.
    let more: Vec<String> = (n..2 * n).map(|i| format!("c/{i:05}")).collect();
    let puts: Vec<(&str, &str)> = keys
        .iter()
        .chain(&more)
        .map(|k| (k.as_str(), "torn"))
        .collect();
    let mut torn: Vec<OutboxEntry> = commit(&mut a_store, &puts, 2, "third")
        .into_iter()
        .filter(|e| e.changelog)
        .collect();
    torn.pop();
    broker.send_torn(&torn);
    let (_c_dir, c_store, stats) = restored_with_stats(&broker);
    assert!(stats.spilled >= SPILL_AFTER as u64 * 3, "{stats:?}");
    // What was put back counts as not applied.
    assert_eq!(stats.applied, applied_whole, "{stats:?}");
    let state = |store: &PartitionStore| {
        ["c/first", "c/00007", &keys[n - 1], &more[0], &more[n - 1]].map(|k| value(store, k))
    };
    let expected = [
        Some("kept".to_string()),
        Some("whole".into()),
        Some("whole".into()),
        None,
        None,
    ];
    assert_eq!(state(&c_store), expected);
    assert_eq!(
        c_store
            .applied_offset(&Pending::default(), INPUT)
            .expect("offset"),
        Some(1)
    );
    drop(c_store);
    // The undo written after the torn records holds for the next restore too.
    let (_d_dir, d_store) = restored(&broker);
    assert_eq!(state(&d_store), expected);
}

#[test]
fn a_full_producer_queue_does_not_reorder_a_keys_changelog_records() {
    let broker = broker();
    let never = CancellationToken::new();
    // A producer whose queue holds 10 records: most sends of a wave find it full.
    let producer = broker.producer_with(&[
        ("enable.idempotence", "true"),
        ("queue.buffering.max.messages", "10"),
    ]);
    let (_a_dir, mut a_store) = fresh_store();
    let fillers: Vec<String> = (0..20).map(|i| format!("filler/{i:02}")).collect();
    let mut entries = Vec::new();
    for i in 0..30 {
        let value = format!("v{i}");
        let mut puts: Vec<(&str, &str)> = vec![("c/k", value.as_str())];
        puts.extend(fillers.iter().map(|k| (k.as_str(), value.as_str())));
        entries.extend(commit(&mut a_store, &puts, i, "out"));
    }
    let acked = broker.publish_through(&producer, entries, &never);
    assert!(acked.iter().all(|(_, o)| *o >= 0));
    let (_b_dir, b_store) = restored(&broker);
    assert_eq!(value(&b_store, "c/k").as_deref(), Some("v29"));
    assert_eq!(value(&b_store, "filler/19").as_deref(), Some("v29"));
}

#[test]
fn a_new_instance_reads_the_changelog_once_to_restore_it() {
    let broker = broker();
    let never = CancellationToken::new();
    let (_a_dir, mut a_store) = fresh_store();
    for i in 0..50 {
        let value = format!("v{i}");
        let entries = commit(&mut a_store, &[("c/k", value.as_str())], i, "out");
        assert!(broker.publish(entries, &never).iter().all(|o| *o >= 0));
    }
    let in_log = broker.count(CHANGELOG) as u64;
    let (_b_dir, b_store, stats) = restored_with_stats(&broker);
    assert_eq!(value(&b_store, "c/k").as_deref(), Some("v49"));
    assert_eq!(stats.records_read, in_log, "{stats:?}");
    assert_eq!(stats.applied, in_log, "{stats:?}");
}

#[test]
fn a_torn_commit_an_earlier_version_wrote_on_after_is_kept() {
    let broker = broker();
    let never = CancellationToken::new();
    let (_a_dir, mut a_store) = fresh_store();
    let first = commit(&mut a_store, &[("c/1", "v1")], 0, "first");
    assert!(broker.publish(first, &never).iter().all(|o| *o >= 0));
    // A commit torn before its end marker...
    let mut torn: Vec<OutboxEntry> = commit(&mut a_store, &[("c/2", "t")], 1, "second")
        .into_iter()
        .filter(|e| e.changelog)
        .collect();
    torn.pop();
    broker.send_torn(&torn);
    // ...then records of a version that writes no markers: it restored the torn
    // commit (as it knew no markers), counted its input as applied and wrote on.
    for (key, value) in [
        ("s/c/1", &b"legacy"[..]),
        ("o/kairos-test-input", &2_i64.to_be_bytes()[..]),
    ] {
        let record = rdkafka::producer::FutureRecord::to(CHANGELOG)
            .partition(0)
            .key(key)
            .payload(value);
        block_on(broker.producer.send(record, Duration::from_secs(10))).expect("produce");
    }
    let (_b_dir, b_store) = restored(&broker);
    assert_eq!(value(&b_store, "c/1").as_deref(), Some("legacy"));
    assert_eq!(value(&b_store, "c/2").as_deref(), Some("t"));
    assert_eq!(
        b_store
            .applied_offset(&Pending::default(), INPUT)
            .expect("offset"),
        Some(2)
    );
}

#[test]
fn a_store_killed_before_its_first_commit_was_acknowledged_keeps_its_write_ahead_records() {
    let broker = broker();
    let never = CancellationToken::new();
    let dir = tempfile::tempdir().expect("dir");
    let factory = StoreFactory::new(dir.path(), 8 << 20).expect("factory");
    {
        let mut store = factory.open(0).expect("open");
        let entries = commit(&mut store, &[("c/1", "v1")], 0, "first");
        // Published, but the process dies before the acknowledgement records the
        // changelog's end in the store; the next batch's provider call had begun.
        assert!(broker.publish(entries, &never).iter().all(|o| *o >= 0));
        store.put_now(b"a/send-1", b"accepted").expect("put_now");
        assert_eq!(store.changelog_end().expect("end"), None);
    }
    broker.restore(&factory);
    let store = factory.open(0).expect("open");
    assert_eq!(value(&store, "a/send-1").as_deref(), Some("accepted"));
    assert_eq!(value(&store, "c/1").as_deref(), Some("v1"));
}

#[test]
fn a_write_ahead_record_reaches_the_next_owner_whatever_torn_commit_surrounds_it() {
    let broker = broker();
    let never = CancellationToken::new();
    let (_a_dir, mut a_store) = fresh_store();
    let first = commit(&mut a_store, &[("c/1", "v1")], 0, "first");
    assert!(broker.publish(first, &never).iter().all(|o| *o >= 0));
    let write_ahead = ProducerWriteAhead::with_producer(broker.producer.clone(), &broker.config);
    let writer = a_store.writer.clone();
    let replicate = |key: &str, value: &str| {
        write_ahead
            .replicate(
                CHANGELOG,
                0,
                &PartitionStore::state_key(key.as_bytes()),
                value.as_bytes(),
                &writer,
                None,
                true,
            )
            .expect("replicate");
    };
    // A provider call's marker, then the commit that drops it once the send is
    // recorded, torn by a crash before its end marker.
    replicate("a/send-1", "accepted");
    let mut pending = Pending::default();
    a_store.delete(&mut pending, b"a/send-1");
    a_store.put(&mut pending, b"c/2", b"torn".to_vec());
    a_store.set_applied_offset(&mut pending, INPUT, 1);
    let mut torn: Vec<OutboxEntry> = a_store
        .commit_with(&mut pending, Some(CHANGELOG), true)
        .expect("commit")
        .into_iter()
        .filter(|e| e.changelog)
        .collect();
    torn.pop();
    broker.send_torn(&torn);
    // A marker written after the torn records (by the same store, restarted on its
    // own tail) does not make them count as adopted.
    replicate("a/send-2", "accepted");
    let (_b_dir, b_store) = restored(&broker);
    assert_eq!(value(&b_store, "a/send-1").as_deref(), Some("accepted"));
    assert_eq!(value(&b_store, "a/send-2").as_deref(), Some("accepted"));
    assert_eq!(
        value(&b_store, "c/2"),
        None,
        "the torn commit is not applied"
    );
    assert_eq!(value(&b_store, "c/1").as_deref(), Some("v1"));
}

#[test]
fn an_output_the_broker_refuses_for_good_goes_to_the_dead_letter_topic_and_the_rest_go_out() {
    use base64::Engine as _;
    let broker = broker();
    let never = CancellationToken::new();
    // A producer that may send at most 150,000 bytes a record: the middle output is
    // refused whatever the retries.
    let producer = broker.producer_with(&[("message.max.bytes", "150000")]);
    let output = |n: u8, payload: Vec<u8>| OutboxEntry {
        partition: 0,
        outbox_key: vec![b'x', b'/', n],
        topic: OUTPUT.into(),
        key: vec![b'k', n],
        payload,
        changelog: false,
        writer: std::sync::Arc::from("w"),
        epoch: None,
    };
    let entries = vec![
        output(1, b"first".to_vec()),
        output(2, vec![b'a'; 200_000]),
        output(3, b"third".to_vec()),
    ];
    let acked = broker.publish_through(&producer, entries, &never);
    assert_eq!(acked.len(), 3, "every output leaves the outbox");
    assert!(acked.iter().all(|(_, offset)| *offset >= 0));
    assert_eq!(
        broker.payloads(OUTPUT),
        vec![b"first".to_vec(), b"third".to_vec()]
    );
    let letters = broker.payloads(DEAD_LETTER);
    assert_eq!(letters.len(), 1);
    let letter: serde_json::Value = serde_json::from_slice(&letters[0]).expect("json");
    assert_eq!(letter["reason_code"], "output_refused");
    assert_eq!(letter["source_topic"], OUTPUT);
    assert_eq!(letter["source_partition"], -1);
    assert_eq!(letter["service"], "test");
    let reason = letter["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("refused") && reason.contains("of 200000 bytes"),
        "{reason}"
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    let sample = b64
        .decode(letter["payload_base64"].as_str().unwrap_or_default())
        .expect("base64");
    assert_eq!(sample, vec![b'a'; REFUSED_PAYLOAD_SAMPLE]);
    assert_eq!(
        b64.decode(letter["key_base64"].as_str().unwrap_or_default())
            .expect("base64"),
        b"k\x02"
    );
    assert_eq!(
        broker
            .metrics
            .dead_letters
            .with_label_values(&["output_refused"])
            .get(),
        1
    );
}

/// Publishes `entries` and acknowledges them in `store` as the engine does: the
/// outbox is emptied and the store notes how far the changelog holds it.
fn publish_acknowledged(broker: &Broker, store: &mut PartitionStore, entries: Vec<OutboxEntry>) {
    let acked = broker.publish_through(&broker.producer, entries, &CancellationToken::new());
    let keys: Vec<Vec<u8>> = acked.iter().map(|(e, _)| e.outbox_key.clone()).collect();
    store.acknowledge(&keys).expect("acknowledge");
    let changelog: Vec<i64> = acked
        .iter()
        .filter(|(e, _)| e.changelog)
        .map(|(_, offset)| *offset)
        .collect();
    let last = changelog.iter().copied().max().expect("changelog records");
    store
        .changelog_acknowledged(changelog.len() as u64, last)
        .expect("changelog end");
}

/// Closes `store` as the engine does: marked clean now, if it is.
fn mark_clean_now(store: &PartitionStore) -> Option<i64> {
    store
        .mark_closed_clean(kairos_core::time::wall_now())
        .expect("mark")
}

/// Expected values of [`state_of`].
fn owned(values: &[Option<&str>]) -> Vec<Option<String>> {
    values.iter().map(|v| v.map(str::to_string)).collect()
}

/// The state keys `c/0`..`c/9` of `store`, for comparing two stores.
fn state_of(store: &PartitionStore) -> Vec<Option<String>> {
    (0..10).map(|i| value(store, &format!("c/{i}"))).collect()
}

/// Restores partition 0 into the state directory `dir` as it is (the instance that
/// owned the partition before takes it back).
fn restore_in_place(broker: &Broker, dir: &Path) -> (PartitionStore, RestoreStats) {
    let factory = StoreFactory::new(dir, 8 << 20).expect("factory");
    let stats = broker.restore(&factory);
    (factory.open(0).expect("open"), stats)
}

/// Another instance takes partition 0 over and publishes one commit of `puts`.
fn another_instance_commits(broker: &Broker, puts: &[(&str, &str)], input_offset: i64) {
    let (_dir, mut store) = restored(broker);
    let entries = commit(&mut store, puts, input_offset, "out");
    let never = CancellationToken::new();
    assert!(broker.publish(entries, &never).iter().all(|o| *o >= 0));
}

#[test]
fn a_partition_back_on_the_instance_that_closed_it_cleanly_reads_only_what_others_wrote() {
    let broker = broker();
    let never = CancellationToken::new();
    // A claimed the partition when it took it: its epoch is older than B's below.
    let (a_dir, mut a_store) = restored(&broker);
    for (i, puts) in [
        [("c/1", "a1"), ("c/2", "a2")],
        [("c/3", "a3"), ("c/1", "a1'")],
    ]
    .iter()
    .enumerate()
    {
        let entries = commit(&mut a_store, puts, i as i64, "a's output");
        publish_acknowledged(&broker, &mut a_store, entries);
    }
    let closed_at = broker.count(CHANGELOG);
    assert_eq!(mark_clean_now(&a_store), Some(closed_at));
    drop(a_store);

    // B takes the partition over: changes a key, deletes one, adds one, then dies
    // while publishing a second commit.
    let (_b_dir, mut b_store) = restored(&broker);
    let mut pending = Pending::default();
    b_store.put(&mut pending, b"c/1", b"b1".to_vec());
    b_store.delete(&mut pending, b"c/2");
    b_store.put(&mut pending, b"c/4", b"b4".to_vec());
    b_store.set_applied_offset(&mut pending, INPUT, 2);
    b_store.emit(&mut pending, OUTPUT, b"customer", b"b's output".to_vec());
    let b_commit = b_store
        .commit_with(&mut pending, Some(CHANGELOG), true)
        .expect("commit");
    assert!(broker.publish(b_commit, &never).iter().all(|o| *o >= 0));
    let mut torn: Vec<OutboxEntry> = commit(&mut b_store, &[("c/3", "torn")], 3, "torn")
        .into_iter()
        .filter(|e| e.changelog)
        .collect();
    torn.pop();
    broker.send_torn(&torn);
    let written_by_b = broker.count(CHANGELOG) - closed_at;

    // A gets the partition back: it reads B's records alone, applies the whole commit,
    // leaves the torn one out and undoes it as any new owner does.
    let (a_store, stats) = restore_in_place(&broker, a_dir.path());
    assert_eq!(stats.kind, RestoreKind::SinceCleanClose, "{stats:?}");
    assert_eq!(stats.records_read as i64, written_by_b, "{stats:?}");
    assert_eq!(
        state_of(&a_store)[..5],
        owned(&[None, Some("b1"), None, Some("a3"), Some("b4")])
    );
    assert_eq!(
        a_store
            .applied_offset(&Pending::default(), INPUT)
            .expect("offset"),
        Some(2)
    );
    assert!(outbox_outputs(&a_store).contains(&"b's output".to_string()));
    assert!(!outbox_outputs(&a_store).contains(&"a's output".to_string()));
    assert!(!outbox_outputs(&a_store).contains(&"torn".to_string()));

    // The same state as a rebuild from the whole changelog, undo included.
    let (_c_dir, c_store) = looked_at(&broker);
    assert_eq!(state_of(&c_store), state_of(&a_store));
    assert_eq!(
        c_store
            .applied_offset(&Pending::default(), INPUT)
            .expect("offset"),
        Some(2)
    );

    // The mark was taken. A writes again (marked once acknowledged), then commits
    // once more, and dies before that commit reaches the broker: the commit took the
    // mark away with it, so once others write A is rebuilt whole, without it.
    let mut a_store = a_store;
    let entries = commit(&mut a_store, &[("c/5", "a5")], 4, "a's next output");
    publish_acknowledged(&broker, &mut a_store, entries);
    let lost = commit(&mut a_store, &[("c/6", "never published")], 5, "lost");
    assert!(lost.iter().any(|e| e.changelog));
    drop(a_store);
    another_instance_commits(&broker, &[("c/7", "d7")], 5);
    let (a_store, stats) = restore_in_place(&broker, a_dir.path());
    assert_eq!(stats.kind, RestoreKind::Rebuilt, "{stats:?}");
    assert_eq!(
        state_of(&a_store)[5..8],
        owned(&[Some("a5"), None, Some("d7")])
    );
    // B's torn commit stays undone: A's undo, written before A claimed the partition
    // again, is not left out with A's older epoch.
    assert_eq!(value(&a_store, "c/3").as_deref(), Some("a3"));
}

#[test]
fn a_store_killed_with_every_changelog_record_acknowledged_reads_only_what_others_wrote() {
    let broker = broker();
    let (a_dir, mut a_store) = fresh_store();
    for (i, puts) in [[("c/1", "a1")], [("c/2", "a2")]].iter().enumerate() {
        let entries = commit(&mut a_store, puts, i as i64, "a's output");
        publish_acknowledged(&broker, &mut a_store, entries);
    }
    // Killed: no close, no clean mark written at a close.
    drop(a_store);
    let before_b = broker.count(CHANGELOG);
    another_instance_commits(&broker, &[("c/1", "b1"), ("c/3", "b3")], 2);
    let written_by_b = broker.count(CHANGELOG) - before_b;
    let (a_store, stats) = restore_in_place(&broker, a_dir.path());
    assert_eq!(stats.kind, RestoreKind::SinceCleanClose, "{stats:?}");
    assert_eq!(stats.records_read as i64, written_by_b, "{stats:?}");
    let expected = owned(&[None, Some("b1"), Some("a2"), Some("b3")]);
    assert_eq!(state_of(&a_store)[..4], expected);
    let (_c_dir, c_store) = looked_at(&broker);
    assert_eq!(state_of(&c_store), state_of(&a_store), "as a rebuild");
}

#[test]
fn a_store_that_ever_wrote_a_write_ahead_record_is_never_taken_for_the_changelog() {
    let broker = broker();
    let (a_dir, mut a_store) = fresh_store();
    let entries = commit(&mut a_store, &[("c/1", "a1")], 0, "out");
    publish_acknowledged(&broker, &mut a_store, entries);
    // A provider-call record that never reached the changelog (a crash while it was
    // replicated; here it is not replicated at all).
    a_store.put_now(b"c/9", b"attempt").expect("write ahead");
    drop(a_store);
    // Restarted on its own: a commit, acknowledged, in a run that wrote no record
    // ahead itself.
    let factory = StoreFactory::new(a_dir.path(), 8 << 20).expect("factory");
    let mut a_store = factory.open(0).expect("open");
    let entries = commit(&mut a_store, &[("c/2", "a2")], 1, "out");
    publish_acknowledged(&broker, &mut a_store, entries);
    assert_eq!(mark_clean_now(&a_store), None);
    drop(a_store);
    drop(factory);
    another_instance_commits(&broker, &[("c/3", "b3")], 2);
    let (a_store, stats) = restore_in_place(&broker, a_dir.path());
    assert_eq!(stats.kind, RestoreKind::Rebuilt, "{stats:?}");
    assert_eq!(
        state_of(&a_store),
        owned(&[
            None,
            Some("a1"),
            Some("a2"),
            Some("b3"),
            None,
            None,
            None,
            None,
            None,
            None
        ]),
        "the record the changelog never had is gone"
    );
}

#[test]
fn a_store_with_unacknowledged_commits_or_closed_long_ago_is_rebuilt_whole() {
    let broker = broker();
    let never = CancellationToken::new();
    let (a_dir, mut a_store) = fresh_store();
    let entries = commit(&mut a_store, &[("c/1", "a1")], 0, "out");
    publish_acknowledged(&broker, &mut a_store, entries);
    // A commit the broker never got: the store holds what the changelog does not.
    let lost = commit(&mut a_store, &[("c/2", "never published")], 1, "out");
    assert!(lost.iter().any(|e| e.changelog));
    assert_eq!(
        mark_clean_now(&a_store),
        None,
        "a store ahead of its changelog is not clean"
    );
    drop(a_store);
    another_instance_commits(&broker, &[("c/3", "b3")], 1);
    let (a_store, stats) = restore_in_place(&broker, a_dir.path());
    assert_eq!(stats.kind, RestoreKind::Rebuilt, "{stats:?}");
    assert_eq!(
        state_of(&a_store)[1..4],
        owned(&[Some("a1"), None, Some("b3")])
    );

    // Closed cleanly, but two days ago: deletions written since may have been
    // compacted away, so the whole changelog is read.
    let two_days_ago = kairos_core::time::wall_now() - 2 * 86_400_000;
    assert!(a_store
        .mark_closed_clean(two_days_ago)
        .expect("mark")
        .is_some());
    drop(a_store);
    let (_c_dir, mut c_store) = restored(&broker);
    let mut pending = Pending::default();
    c_store.delete(&mut pending, b"c/1");
    c_store.set_applied_offset(&mut pending, INPUT, 2);
    let entries = c_store
        .commit_with(&mut pending, Some(CHANGELOG), true)
        .expect("commit");
    assert!(broker.publish(entries, &never).iter().all(|o| *o >= 0));
    let in_log = broker.count(CHANGELOG);
    let (a_store, stats) = restore_in_place(&broker, a_dir.path());
    assert_eq!(stats.kind, RestoreKind::Rebuilt, "{stats:?}");
    assert_eq!(stats.records_read as i64, in_log + 1, "{stats:?}");
    assert_eq!(state_of(&a_store)[1..4], owned(&[None, None, Some("b3")]));
}

#[test]
fn a_store_whose_records_another_instance_wrote_between_is_not_marked_clean() {
    let broker = broker();
    let (a_dir, mut a_store) = fresh_store();
    let entries = commit(&mut a_store, &[("c/1", "a1")], 0, "out");
    publish_acknowledged(&broker, &mut a_store, entries);
    // Another instance took the partition over while A ran on (its session expired
    // while it was paused, say) and wrote; then A published one more commit.
    another_instance_commits(&broker, &[("c/2", "b2")], 1);
    let entries = commit(&mut a_store, &[("c/3", "a3")], 1, "out");
    publish_acknowledged(&broker, &mut a_store, entries);
    assert_eq!(
        mark_clean_now(&a_store),
        None,
        "A lacks a record that lies before its changelog end"
    );
    drop(a_store);
    another_instance_commits(&broker, &[("c/4", "c4")], 2);
    let (a_store, stats) = restore_in_place(&broker, a_dir.path());
    assert_eq!(stats.kind, RestoreKind::Rebuilt, "{stats:?}");
    assert_eq!(
        state_of(&a_store)[1..5],
        owned(&[Some("a1"), Some("b2"), Some("a3"), Some("c4")])
    );
}

#[test]
fn a_restore_asks_again_when_the_broker_fails_to_list_the_changelogs_offsets() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let broker = broker();
    let (_a_dir, mut a_store) = fresh_store();
    let entries = commit(&mut a_store, &[("c/1", "a1")], 0, "out");
    publish_acknowledged(&broker, &mut a_store, entries);
    // A leader moving: the next offset listings fail.
    broker.cluster.request_errors(
        RDKafkaApiKey::ListOffsets,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN; 2],
    );
    let (_b_dir, b_store, stats) = restored_with_stats(&broker);
    assert_eq!(stats.kind, RestoreKind::Rebuilt, "{stats:?}");
    assert_eq!(value(&b_store, "c/1").as_deref(), Some("a1"));
}

#[test]
fn a_store_reopened_with_changelog_records_unacknowledged_is_clean_only_once_they_are() {
    let broker = broker();
    let (a_dir, mut a_store) = fresh_store();
    let entries = commit(&mut a_store, &[("c/1", "a1")], 0, "out");
    publish_acknowledged(&broker, &mut a_store, entries);
    let unpublished = commit(&mut a_store, &[("c/2", "a2")], 1, "out");
    assert!(unpublished.iter().any(|e| e.changelog));
    // Killed before publishing; restarted, its outbox holds the commit's records.
    drop(a_store);
    let factory = StoreFactory::new(a_dir.path(), 8 << 20).expect("factory");
    let mut a_store = factory.open(0).expect("open");
    assert_eq!(
        mark_clean_now(&a_store),
        None,
        "the changelog lacks a commit the store holds"
    );
    let backlog = a_store.outbox().expect("outbox");
    publish_acknowledged(&broker, &mut a_store, backlog);
    assert!(
        mark_clean_now(&a_store).is_some(),
        "the changelog holds it all"
    );
}

/// Publishes `entries` of `store` as the engine does, checking what lies between its
/// own changelog records (see `publish_fenced`), and acknowledges to `store` what the
/// engine would. Returns what the publish found.
fn publish_checked(
    broker: &Broker,
    store: &mut PartitionStore,
    entries: Vec<OutboxEntry>,
) -> Published {
    let own: HashMap<i32, OwnSpan> = store
        .next_own_changelog_offset()
        .zip(store.epoch)
        .map(|(next, epoch)| {
            let writer = store.writer.clone();
            (
                0,
                OwnSpan {
                    next,
                    writer,
                    epoch,
                },
            )
        })
        .into_iter()
        .collect();
    assert!(
        !own.is_empty(),
        "a store that claimed its partition can tell"
    );
    let reader = ChangelogReader::new(&broker.config).expect("reader");
    let published = block_on(publish_fenced(
        &broker.producer,
        entries,
        &own,
        &reader,
        &broker.dead_letters,
        &broker.metrics,
        &CancellationToken::new(),
    ))
    .expect("publish");
    if published.fenced.is_empty() {
        for gap in published.gaps.iter().filter(|g| !g.applied) {
            store.note_skipped_changelog_records(gap.others);
        }
        let keys: Vec<Vec<u8>> = published
            .acked
            .iter()
            .map(|(e, _)| e.outbox_key.clone())
            .collect();
        store.acknowledge(&keys).expect("acknowledge");
        let changelog: Vec<i64> = published
            .acked
            .iter()
            .filter(|(e, _)| e.changelog)
            .map(|(_, offset)| *offset)
            .collect();
        if let Some(last) = changelog.iter().copied().max() {
            store
                .changelog_acknowledged(changelog.len() as u64, last)
                .expect("changelog end");
        }
        for gap in published
            .gaps
            .iter()
            .filter(|g| published.complete && !g.left_out.is_empty())
        {
            block_on(write_again(&broker.producer, store, gap)).expect("write again");
        }
    }
    published
}

#[test]
fn an_owner_that_runs_on_after_its_partition_was_claimed_is_fenced_and_left_out() {
    let broker = broker();
    // A owns the partition and publishes a commit; the check passes commit after commit.
    let (_a_dir, mut a_store) = restored(&broker);
    for (i, value) in ["a1", "a1'"].iter().enumerate() {
        let entries = commit(&mut a_store, &[("c/1", value)], i as i64, "a's output");
        assert_eq!(
            publish_checked(&broker, &mut a_store, entries).fenced,
            Vec::<i32>::new()
        );
    }
    // A's session expires while it is paused; B restores the partition and claims it.
    let (_b_dir, mut b_store) = restored(&broker);
    assert_eq!(value(&b_store, "c/1").as_deref(), Some("a1'"));
    // A wakes up and publishes what it had processed meanwhile: its records land
    // after B's claim, so it finds itself fenced and its output does not go out.
    former_owner_publishes_late(&broker, &mut a_store, 2);
    let outputs: Vec<String> = broker
        .payloads(OUTPUT)
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert!(!outputs.contains(&LATE.to_string()), "{outputs:?}");
    assert_eq!(outputs.iter().filter(|o| *o == "a's output").count(), 2);
    // B goes on: A's records lie between its claim and its own, and it finds they are
    // an earlier owner's, left out by a restore: not fenced, and still taken to equal
    // the changelog.
    let entries = commit(&mut b_store, &[("c/3", "b3")], 2, "b's output");
    let published = publish_checked(&broker, &mut b_store, entries);
    assert_eq!(published.fenced, Vec::<i32>::new());
    assert_eq!(published.gaps.len(), 1, "{:?}", published.gaps);
    assert!(!published.gaps[0].applied, "{:?}", published.gaps);
    assert!(mark_clean_now(&b_store).is_some());
    assert!(broker.payloads(OUTPUT).contains(&b"b's output".to_vec()));
    // B wrote its values of A's keys again after them, so compaction, which keeps a
    // key's last record whatever its epoch, keeps B's: c/1 as B has it, c/2 deleted.
    assert_rewritten_after_the_former_owner(&broker, "a1'");
    // And B's next publish finds nothing between its records.
    let entries = commit(&mut b_store, &[("c/4", "b4")], 3, "b's next output");
    assert!(publish_checked(&broker, &mut b_store, entries)
        .gaps
        .is_empty());
    // Whoever restores the partition next leaves A's late records out: the state is
    // B's, as B saw it.
    let (_c_dir, c_store) = looked_at(&broker);
    assert_eq!(
        state_of(&c_store)[..4],
        owned(&[None, Some("a1'"), None, Some("b3")])
    );
    let (_d_dir, _d_store, stats) = restored_with_stats(&broker);
    assert!(
        stats.fenced_out >= 3,
        "A's two values and its output's replica: {stats:?}"
    );
}

#[test]
fn a_claim_that_did_not_land_at_the_end_it_restored_fences_no_one() {
    let broker = broker();
    let (_a_dir, mut a_store) = owner_of_c1(&broker);
    // Another instance claims as if the changelog had ended at 0: someone (A) wrote
    // between its restore and its claim, so the claim is not valid, and it would
    // restore again before writing anything.
    let ghost = OutboxEntry {
        partition: 0,
        outbox_key: Vec::new(),
        topic: CHANGELOG.into(),
        key: kairos_core::store::claim_key(0, "ghost"),
        payload: 0_u64.to_be_bytes().to_vec(),
        changelog: true,
        writer: std::sync::Arc::from("ghost"),
        epoch: None,
    };
    assert!(broker.publish(vec![ghost], &CancellationToken::new())[0] > 0);
    // A goes on: it reads the claim between its records, finds it not valid, and is
    // not fenced; a restore still applies what A writes.
    let entries = commit(&mut a_store, &[("c/1", "a2")], 1, "a's next output");
    let published = publish_checked(&broker, &mut a_store, entries);
    assert!(published.fenced.is_empty(), "{published:?}");
    assert_eq!(published.gaps.len(), 1, "{:?}", published.gaps);
    assert_eq!(published.gaps[0].others, 1);
    assert!(published.gaps[0].left_out.is_empty() && !published.gaps[0].applied);
    assert!(broker
        .payloads(OUTPUT)
        .contains(&b"a's next output".to_vec()));
    let (_c_dir, c_store) = looked_at(&broker);
    assert_eq!(value(&c_store, "c/1").as_deref(), Some("a2"));
}

#[test]
fn a_restore_that_leaves_a_former_owners_records_out_writes_its_values_again_after_them() {
    let broker = broker();
    let (_a_dir, mut a_store) = owner_of_c1(&broker);
    // B claims the partition and writes nothing; A, paused meanwhile, publishes late.
    let (_b_dir, _b_store) = restored(&broker);
    former_owner_publishes_late(&broker, &mut a_store, 1);
    // C restores the partition (B died before it published again): it leaves A's
    // records out, and writes its values of their keys again before it claims, so
    // compaction keeps those and not A's.
    let (_c_dir, c_store, stats) = restored_with_stats(&broker);
    assert!(stats.fenced_out >= 3, "{stats:?}");
    assert_eq!(value(&c_store, "c/1").as_deref(), Some("a1"));
    assert_rewritten_after_the_former_owner(&broker, "a1");
    // A rebuild reads the same.
    let (_d_dir, d_store) = looked_at(&broker);
    assert_eq!(state_of(&d_store), state_of(&c_store));
}

/// A former owner's record that lands among the values an owner writes again (the
/// rest of its commit, still arriving) is read again after a restart: the owner's
/// changelog end stays before it, so the restore does not take the store for current
/// and leaves the record as its key's last. Also for a store that wrote ahead, which
/// cannot tell whether others wrote among its records.
#[test]
fn a_former_owner_s_record_among_the_values_written_again_is_read_again_after_a_restart() {
    for writes_ahead in [false, true] {
        let broker = broker();
        let never = CancellationToken::new();
        let (_a_dir, mut a_store) = owner_of_c1(&broker);
        let (b_dir, mut b_store) = restored(&broker);
        if writes_ahead {
            let through = ProducerWriteAhead::new(&broker.config);
            write_ahead(&broker, &through, &b_store, ("w/send-1", "at"), true)
                .expect("B's partition");
        }
        former_owner_publishes_late(&broker, &mut a_store, 1);
        // B's look at its changelog read A's records up to here (as
        // `check_changelog_tail` does) ...
        b_store.skip_changelog_to(Some(broker.count(CHANGELOG)));
        let gap = Gap {
            partition: 0,
            topic: CHANGELOG.into(),
            others: 3,
            left_out: vec![b"s/c/1".to_vec(), b"s/c/2".to_vec()],
            ..Gap::default()
        };
        // ... and the rest of A's late commit lands before B's values written again.
        let rest = commit(&mut a_store, &[("c/3", "zombie")], 2, LATE);
        assert!(broker.publish(rest, &never).iter().all(|o| *o >= 0));
        block_on(write_again(&broker.producer, &mut b_store, &gap)).expect("write again");
        assert_rewritten_after_the_former_owner(&broker, "a1");
        // B is killed before it looks again. Restored in place, it reads past its own
        // end and writes its value of c/3 (none) after A's record.
        drop(b_store);
        let (b_store, stats) = restore_in_place(&broker, b_dir.path());
        let case = format!("writes ahead {writes_ahead}: {stats:?}");
        assert_ne!(stats.kind, RestoreKind::Current, "{case}");
        assert_eq!(value(&b_store, "c/3"), None, "{case}");
        let compacted = broker.compacted(CHANGELOG);
        assert_eq!(
            compacted.get(b"s/c/3".as_slice()),
            Some(&Vec::new()),
            "c/3's last record is not A's: {case}"
        );
    }
}

#[test]
fn an_owner_with_nothing_to_publish_finds_a_former_owners_records_in_its_changelog() {
    let broker = broker();
    let reader = ChangelogReader::new(&broker.config).expect("reader");
    let (_a_dir, mut a_store) = owner_of_c1(&broker);
    let (_b_dir, mut b_store) = restored(&broker);
    // Nothing lies after B's claim yet.
    let found = block_on(check_changelog_tail(
        &reader,
        &broker.producer,
        &mut b_store,
        CHANGELOG,
    ));
    assert!(found.expect("check").is_none());
    former_owner_publishes_late(&broker, &mut a_store, 1);
    // B has no traffic, so no publish of its own finds A's records; its periodic look
    // at the changelog does, and writes its values again after them.
    let gap = block_on(check_changelog_tail(
        &reader,
        &broker.producer,
        &mut b_store,
        CHANGELOG,
    ))
    .expect("check")
    .expect("A's records");
    assert!(
        !gap.claimed && !gap.applied && !gap.left_out.is_empty(),
        "{gap:?}"
    );
    assert_rewritten_after_the_former_owner(&broker, "a1");
    // B's next publish finds nothing between its records; A's look finds B's claim.
    let entries = commit(&mut b_store, &[("c/3", "b3")], 2, "b's output");
    assert!(publish_checked(&broker, &mut b_store, entries)
        .gaps
        .is_empty());
    let gap = block_on(check_changelog_tail(
        &reader,
        &broker.producer,
        &mut a_store,
        CHANGELOG,
    ))
    .expect("check")
    .expect("B's claim");
    assert!(gap.claimed, "{gap:?}");
}

/// A processor that writes ahead as a delivery worker does: an input `key=value`
/// puts the value, first through [`Ctx::put_now`] for keys starting `w/` (the record
/// before a provider call).
struct WritesAhead;

impl Processor for WritesAhead {
    type Input = String;
    fn name(&self) -> &str {
        "writes-ahead"
    }
    fn inputs(&self) -> Vec<String> {
        vec![INPUT.into()]
    }
    fn decode(&self, r: &Record<'_>) -> Result<String, Rejection> {
        Ok(String::from_utf8_lossy(r.payload).into_owned())
    }
    fn event_time(&self, _: &String) -> Option<kairos_core::time::Millis> {
        None
    }
    fn writes_ahead(&self) -> bool {
        true
    }
    fn process(&mut self, ctx: &mut Ctx<'_>, input: String) -> anyhow::Result<()> {
        let (key, value) = input.split_once('=').unwrap_or((&input, ""));
        if key.starts_with("w/") {
            ctx.put_now(key, &value)?;
        }
        ctx.put(key, &value)
    }
    fn on_timer(&mut self, _: &mut Ctx<'_>, _: &DueTimer) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A store that wrote ahead finds a former owner's records after its claim when it
/// next publishes, and writes its values of their keys again after them, as a store
/// that does not write ahead does: compaction keeps its values, not the former
/// owner's.
#[test]
fn a_store_that_wrote_ahead_writes_its_values_again_after_a_former_owner_s_records() {
    let broker = broker();
    let never = CancellationToken::new();
    let (_a_dir, mut a_store) = owner_of_c1(&broker);
    // B restores the partition and claims it, and runs a worker over the store.
    let b_dir = tempfile::tempdir().expect("dir");
    let processor = WritesAhead;
    let factory =
        StoreFactory::new(&b_dir.path().join(processor.name()), 8 << 20).expect("factory");
    broker.restore(&factory);
    drop(factory);
    let mut config = broker.config.clone();
    config.state.dir = b_dir.path().to_path_buf();
    let registry = prometheus::Registry::new();
    let mut engine = Engine::new(processor, &config, RuntimeMetrics::new(&registry))
        .expect("engine")
        .with_changelog(CHANGELOG.into())
        .with_write_ahead(std::sync::Arc::new(ProducerWriteAhead::new(&config)));
    // What the restored outbox holds (A's output, whose acknowledgement A never
    // replicated) goes out with B's first commit.
    let mut backlog = engine.open(0).expect("open");
    let reader = ChangelogReader::new(&config).expect("reader");
    let publisher = Publisher {
        producer: &broker.producer,
        gap_reader: &reader,
        dead_letters: &broker.dead_letters,
        metrics: &broker.metrics,
    };
    let mut step = |engine: &mut Engine<WritesAhead>, offset: i64, input: &str| {
        let record = Record {
            topic: INPUT,
            partition: 0,
            offset,
            key: Some(b"k"),
            payload: input.as_bytes(),
            written_at: None,
        };
        let mut out = std::mem::take(&mut backlog);
        out.extend(engine.handle(&record).expect("handle"));
        out.extend(engine.commit().expect("commit"));
        block_on(engine.publish(out, &publisher, &never, &[])).expect("publish")
    };
    // B's first send writes ahead: from now on its changelog offsets interleave with
    // the write-ahead producer's, and its publishes check the claim watch instead.
    assert!(step(&mut engine, 10, "w/send-1=at").fenced.is_empty());
    // A, paused meanwhile, publishes late after B's claim.
    former_owner_publishes_late(&broker, &mut a_store, 1);
    // B's next commit makes no provider call; its publish finds A's records.
    let published = step(&mut engine, 11, "c/9=b9");
    assert!(published.fenced.is_empty(), "{published:?}");
    assert_rewritten_after_the_former_owner(&broker, "a1");
    let (_elsewhere, rebuilt) = looked_at(&broker);
    assert_eq!(value(&rebuilt, "c/1").as_deref(), Some("a1"));
}

/// A store that wrote ahead and has no traffic finds a former owner's records in its
/// periodic look at the changelog, as other stores do, and writes its values again
/// after them; the look after that reads nothing.
#[test]
fn a_store_that_wrote_ahead_with_nothing_to_publish_finds_a_former_owner_s_records() {
    let broker = broker();
    let reader = ChangelogReader::new(&broker.config).expect("reader");
    let (_a_dir, mut a_store) = owner_of_c1(&broker);
    let (_b_dir, mut b_store) = restored(&broker);
    let through = ProducerWriteAhead::new(&broker.config);
    write_ahead(&broker, &through, &b_store, ("w/send-1", "at"), true).expect("B's partition");
    former_owner_publishes_late(&broker, &mut a_store, 1);
    let look = |store: &mut PartitionStore| {
        block_on(check_changelog_tail(
            &reader,
            &broker.producer,
            store,
            CHANGELOG,
        ))
        .expect("check")
    };
    let gap = look(&mut b_store).expect("A's records");
    assert!(!gap.claimed && !gap.left_out.is_empty(), "{gap:?}");
    assert_rewritten_after_the_former_owner(&broker, "a1");
    // Its own values written again are all that follows: nothing claims, nothing is
    // left out.
    let next = look(&mut b_store);
    assert!(
        next.as_ref()
            .is_none_or(|g| !g.claimed && g.left_out.is_empty()),
        "{next:?}"
    );
}

/// An owner A of the partition that has published one commit, `c/1 = a1`.
fn owner_of_c1(broker: &Broker) -> (tempfile::TempDir, PartitionStore) {
    let (dir, mut store) = restored(broker);
    let entries = commit(&mut store, &[("c/1", "a1")], 0, "a's output");
    assert!(publish_checked(broker, &mut store, entries)
        .fenced
        .is_empty());
    (dir, store)
}

/// The output of [`former_owner_publishes_late`].
const LATE: &str = "the former owner's late output";

/// A former owner (`store`, whose partition another instance has claimed since) wakes
/// up and publishes a commit of `c/1` and `c/2` at `input_offset`: it finds the claim
/// and is fenced.
fn former_owner_publishes_late(broker: &Broker, store: &mut PartitionStore, input_offset: i64) {
    let late = commit(
        store,
        &[("c/1", "zombie"), ("c/2", "zombie")],
        input_offset,
        LATE,
    );
    assert_eq!(publish_checked(broker, store, late).fenced, vec![0]);
}

/// After [`former_owner_publishes_late`], the last record of each key it wrote is the
/// owner's (what compaction keeps): `c/1` as `c1`, `c/2` deleted.
fn assert_rewritten_after_the_former_owner(broker: &Broker, c1: &str) {
    let compacted = broker.compacted(CHANGELOG);
    assert_eq!(compacted[&b"s/c/1".to_vec()], c1.as_bytes().to_vec());
    assert_eq!(compacted[&b"s/c/2".to_vec()], Vec::<u8>::new());
}

/// A write-ahead record of `store`, as a delivery worker writes them around a provider
/// call (`Ctx::put_now`): with `wait`, checked for another instance's claim before it.
fn write_ahead(
    broker: &Broker,
    through: &ProducerWriteAhead,
    store: &PartitionStore,
    (key, value): (&str, &str),
    wait: bool,
) -> anyhow::Result<()> {
    put_ahead(
        store,
        Some((through, CHANGELOG)),
        &broker.metrics,
        key.as_bytes(),
        value.as_bytes(),
        wait,
    )
}

/// One send the way a delivery worker makes it: its record before the provider call,
/// the commit point queued without waiting, the acceptance, then the commit that
/// records the send and drops the three, published through the main producer with its
/// offsets noted as the store's own (as the engine does for a processor that writes
/// ahead).
fn one_send(broker: &Broker, through: &ProducerWriteAhead, store: &mut PartitionStore, n: i64) {
    let id = format!("send-{n}");
    let at = |prefix: &str| (format!("{prefix}/{id}"), "at");
    let (w, k, a) = (at("w"), at("k"), at("a"));
    write_ahead(broker, through, store, (&w.0, w.1), true).expect("before the call");
    write_ahead(broker, through, store, (&k.0, k.1), false).expect("commit point");
    write_ahead(broker, through, store, (&a.0, a.1), true).expect("accepted");
    let mut pending = Pending::default();
    for prefix in ["w", "k", "a"] {
        store.delete(&mut pending, format!("{prefix}/{id}").as_bytes());
    }
    store.put(&mut pending, format!("s/{id}").as_bytes(), b"sent".to_vec());
    store.set_applied_offset(&mut pending, INPUT, n);
    let entries = store
        .commit_with(&mut pending, Some(CHANGELOG), true)
        .expect("commit");
    let published = broker.publish_through(&broker.producer, entries, &CancellationToken::new());
    let offsets: Vec<i64> = published
        .iter()
        .filter(|(e, _)| e.changelog)
        .map(|(_, offset)| *offset)
        .collect();
    assert!(offsets.iter().all(|o| *o >= 0), "{offsets:?}");
    store.note_own_changelog_offsets(&offsets);
}

/// A delivery worker killed after withdrawing a commit point locally, before the
/// withdrawal's copy reached the changelog: back on its own tail, the store keeps the
/// withdrawal (the send is tried again) instead of the older copy (which would report
/// it handed over, and lose it).
#[test]
fn a_store_back_on_its_own_tail_keeps_a_write_ahead_value_newer_than_its_copy() {
    let broker = broker();
    let through = ProducerWriteAhead::new(&broker.config);
    let (dir, mut store) = restored(&broker);
    one_send(&broker, &through, &mut store, 0);
    write_ahead(&broker, &through, &store, ("w/send-1", "at"), true).expect("before the call");
    write_ahead(&broker, &through, &store, ("k/send-1", "at"), true).expect("commit point");
    store
        .put_now(b"k/send-1", b"withdrawn")
        .expect("written locally only");
    drop(store);
    let (store, stats) = restore_in_place(&broker, dir.path());
    assert_eq!(stats.kind, RestoreKind::OwnTail, "{stats:?}");
    // Restored: send-0's commit (three deletions, the send, the input's offset, the
    // end marker); not counted: the five write-ahead records (three of send-0, two of
    // send-1), which the store holds already.
    assert_eq!((stats.records_read, stats.applied), (11, 6), "{stats:?}");
    assert_eq!(value(&store, "k/send-1").as_deref(), Some("withdrawn"));
    assert_eq!(value(&store, "w/send-1").as_deref(), Some("at"));
    assert_eq!(value(&store, "s/send-0").as_deref(), Some("sent"));
    // The withdrawal reaches the changelog: a rebuild elsewhere finds it too.
    let mut store = store;
    let backlog = store.outbox().expect("outbox");
    publish_acknowledged(&broker, &mut store, backlog);
    let (_elsewhere, rebuilt) = looked_at(&broker);
    assert_eq!(value(&rebuilt, "k/send-1").as_deref(), Some("withdrawn"));
    assert_eq!(value(&rebuilt, "w/send-1").as_deref(), Some("at"));
}

#[test]
fn a_worker_whose_partition_was_claimed_finds_it_before_its_next_provider_call() {
    let broker = broker();
    let a_through = ProducerWriteAhead::new(&broker.config);
    let (_a_dir, mut a_store) = restored(&broker);
    // A's sends: its write-ahead records and commits go through two producers, and
    // every offset between them is known to be A's, so no check reads the changelog.
    for n in 0..3 {
        one_send(&broker, &a_through, &mut a_store, n);
    }
    assert_eq!(a_through.claim_reads(), 0);
    // A is paused past its session; B restores the partition and claims it.
    let (_b_dir, b_store) = restored(&broker);
    assert_eq!(value(&b_store, "s/send-2").as_deref(), Some("sent"));
    // A wakes with its next send: the record before the provider call finds B's claim,
    // so the call is never made.
    let fenced = broker.metrics.partitions_fenced.get();
    let error = write_ahead(&broker, &a_through, &a_store, ("w/send-3", "A's"), true)
        .expect_err("A's partition was claimed");
    assert!(
        error.downcast_ref::<PartitionClaimed>().is_some(),
        "{error:#}"
    );
    assert_eq!(broker.metrics.partitions_fenced.get(), fenced + 1);
    // B makes the send itself: A's late record lies between B's claim and B's own, but
    // it is a former owner's, not a claim.
    let b_through = ProducerWriteAhead::new(&broker.config);
    write_ahead(&broker, &b_through, &b_store, ("w/send-3", "B's"), true).expect("B's partition");
    assert_eq!(b_through.claim_reads(), 1);
    // Whoever restores next leaves A's late record out: the record is B's.
    let late = broker
        .records(CHANGELOG)
        .iter()
        .filter(|(k, _)| k == b"s/w/send-3")
        .count();
    assert_eq!(late, 2, "A's and B's records of send 3");
    let (_c_dir, c_store, stats) = restored_with_stats(&broker);
    assert!(stats.fenced_out >= 1, "{stats:?}");
    assert_eq!(value(&c_store, "w/send-3").as_deref(), Some("B's"));
    assert_eq!(value(&c_store, "s/send-2").as_deref(), Some("sent"));
}

#[test]
fn a_worker_reads_what_it_cannot_place_and_goes_on_when_no_one_claimed() {
    let broker = broker();
    let through = ProducerWriteAhead::new(&broker.config);
    let (_dir, mut store) = restored(&broker);
    let fenced = broker.metrics.partitions_fenced.get();
    one_send(&broker, &through, &mut store, 0);
    // Records of an instance that claimed nothing (`kairos inspect` writes none; a
    // version before claims does) lie after the worker's: the next check reads them,
    // finds no claim, and the worker goes on; the check after that reads nothing.
    let other = commit(
        &mut fresh_store().1,
        &[("c/x", "other")],
        0,
        "other's output",
    );
    assert!(broker
        .publish(other, &CancellationToken::new())
        .iter()
        .all(|o| *o >= 0));
    write_ahead(&broker, &through, &store, ("w/send-1", "at"), true)
        .expect("no claim lies between");
    assert_eq!(through.claim_reads(), 1);
    one_send(&broker, &through, &mut store, 2);
    assert_eq!(through.claim_reads(), 1);
    assert_eq!(broker.metrics.partitions_fenced.get(), fenced);
}
