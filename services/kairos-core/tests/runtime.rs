//! The processing loop (`runtime::run`) against librdkafka's mock cluster, with a small
//! test processor: what happens around (re)starts and assignments.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kairos_core::admin::AdminState;
use kairos_core::config::Config;
use kairos_core::encoding::{Rejection, SchemaRegistry};
use kairos_core::runtime::{Ctx, Processor, Record};
use kairos_core::store::DueTimer;
use kairos_core::time::Millis;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureRecord;
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

const INPUT: &str = "kairos.gate-input";
const OUTPUT: &str = "kairos.gate-output";
const DELAY_MS: Millis = 4_000;

/// "arm" schedules timer "t" `DELAY_MS` ahead; "cancel" cancels it and says so on the
/// output topic; anything else is filler. The timer's firing is emitted.
struct ArmCancel;

impl Processor for ArmCancel {
    type Input = Vec<u8>;
    fn name(&self) -> &str {
        "gate"
    }
    fn inputs(&self) -> Vec<String> {
        vec![INPUT.into()]
    }
    fn max_batch_records(&self) -> Option<usize> {
        Some(5)
    }
    fn decode(&self, record: &Record<'_>) -> Result<Vec<u8>, Rejection> {
        Ok(record.payload.to_vec())
    }
    fn event_time(&self, _: &Vec<u8>) -> Option<Millis> {
        None
    }
    fn process(&mut self, ctx: &mut Ctx<'_>, input: Vec<u8>) -> anyhow::Result<()> {
        match input.as_slice() {
            b"arm" => {
                ctx.schedule("t", ctx.now() + DELAY_MS, &"armed")?;
                ctx.emit(OUTPUT, "k", &"armed");
            }
            b"cancel" => {
                ctx.cancel("t")?;
                ctx.emit(OUTPUT, "k", &"cancelled");
            }
            _ => {}
        }
        Ok(())
    }
    fn on_timer(&mut self, ctx: &mut Ctx<'_>, _: &DueTimer) -> anyhow::Result<()> {
        ctx.emit(OUTPUT, "k", &"fired");
        Ok(())
    }
}

fn config(
    cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    dir: &Path,
) -> Config {
    let text = format!(
        "[kafka]\nbootstrap_servers = \"{}\"\npartitions = 1\n\
         [state]\ntimer_tick = \"50ms\"\nmax_batch_wait = \"200ms\"\n",
        cluster.bootstrap_servers()
    );
    Config::from_text(
        Path::new("test.toml"),
        &text,
        &[("KAIROS__STATE__DIR".into(), dir.display().to_string())],
    )
    .expect("config")
}

fn produce(config: &Config, payloads: &[&str]) {
    let producer = kairos_core::kafka::producer(config).expect("producer");
    block_on(async {
        for p in payloads {
            let record = FutureRecord::to(INPUT).partition(0).key("k").payload(*p);
            producer
                .send(record, Duration::from_secs(10))
                .await
                .expect("produce");
        }
    });
}

/// Every record of the output topic, as the JSON strings the processor emitted.
fn outputs(config: &Config) -> Vec<String> {
    let consumer: BaseConsumer = kairos_core::kafka::client_config(config)
        .expect("client config")
        .set("group.id", "outputs-reader")
        .create()
        .expect("consumer");
    // From offset 0 (the topic is never trimmed here) until the topic goes quiet,
    // rather than up to its watermark: asking for that is an offset listing, which a
    // test may have the broker fail for the service.
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(OUTPUT, 0, rdkafka::Offset::Offset(0))
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        // The first record may take a connection and a first fetch to come; after
        // it, half a second without one is the end of the topic.
        let quiet = if out.is_empty() { 5_000 } else { 500 };
        match consumer.poll(Duration::from_millis(quiet)) {
            Some(Ok(m)) => {
                out.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned())
            }
            Some(Err(e)) => panic!("reading {OUTPUT}: {e}"),
            None => break,
        }
    }
    out
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// Runs the processor until `done` holds (checked every 200 ms) or 30 s pass.
fn run_until(config: &Config, done: impl Fn() -> bool) {
    run_until_with(
        config,
        &prometheus::Registry::new(),
        Duration::from_secs(30),
        done,
    );
}

/// [`run_until`] with the service's metrics in `registry`, for at most `limit`.
fn run_until_with(
    config: &Config,
    registry: &prometheus::Registry,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cancel = CancellationToken::new();
    let admin: Arc<AdminState> = AdminState::new(registry.clone());
    let service = {
        let (config, cancel) = (config.clone(), cancel.clone());
        runtime.spawn(async move {
            kairos_core::runtime::run(&config, ArmCancel, admin, SchemaRegistry::new(None), cancel)
                .await
        })
    };
    let deadline = Instant::now() + limit;
    while !done() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    cancel.cancel();
    runtime
        .block_on(service)
        .expect("service task")
        .expect("service");
}

/// The sum of a counter's series in `registry`.
fn counter_total(registry: &prometheus::Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric())
        .map(|m| m.get_counter().get_value())
        .sum()
}

fn cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock cluster");
    for topic in [INPUT, OUTPUT, "kairos.gate-changelog", "kairos.deadletter"] {
        cluster.create_topic(topic, 1, 1).expect("topic");
    }
    cluster
}

/// A timer armed and committed, then, while the service is down, a cancel behind
/// more records than one batch holds and the timer falling due; `before_restart` runs
/// just before the service starts again. Returns the outputs once the backlog is read.
fn overdue_timer_with_its_cancel_in_the_backlog(
    config: &Config,
    before_restart: impl FnOnce(),
) -> Vec<String> {
    produce(config, &["arm"]);
    run_until(config, || {
        outputs(config).iter().any(|o| o.contains("armed"))
    });
    produce(
        config,
        &["f1", "f2", "f3", "f4", "f5", "f6", "f7", "cancel"],
    );
    std::thread::sleep(Duration::from_millis(DELAY_MS as u64 + 500));
    before_restart();
    run_until(config, || {
        outputs(config).iter().any(|o| o.contains("cancelled"))
    });
    let outs = outputs(config);
    assert!(
        outs.iter().any(|o| o.contains("cancelled")),
        "the backlog was not processed: {outs:?}"
    );
    outs
}

#[test]
fn timers_overdue_at_a_restart_wait_until_the_backlog_is_read() {
    let cluster = cluster();
    let dir = tempfile::tempdir().expect("dir");
    let config = config(&cluster, dir.path());
    let outs = overdue_timer_with_its_cancel_in_the_backlog(&config, || {});
    assert!(
        !outs.iter().any(|o| o.contains("fired")),
        "the timer fired before the backlog that cancels it was read: {outs:?}"
    );
}

#[test]
fn timers_wait_while_the_broker_cannot_tell_where_the_backlog_ends() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let cluster = cluster();
    let dir = tempfile::tempdir().expect("dir");
    // Without a changelog, the backlog gate is the only one to list offsets.
    let mut config = config(&cluster, dir.path());
    config.state.changelog = false;
    let outs = overdue_timer_with_its_cancel_in_the_backlog(&config, || {
        // The broker fails its next offset listings: the restarted service cannot
        // learn where the backlog ends at its assignment, nor at its first retry.
        cluster.request_errors(
            RDKafkaApiKey::ListOffsets,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN; 2],
        );
    });
    assert!(
        !outs.iter().any(|o| o.contains("fired")),
        "the timer fired while the backlog's end was unknown: {outs:?}"
    );
}

/// Writes a record ahead of its commit for every input, without saying it does.
struct WritesAheadSilently;

impl Processor for WritesAheadSilently {
    type Input = Vec<u8>;
    fn name(&self) -> &str {
        "silent"
    }
    fn inputs(&self) -> Vec<String> {
        vec![INPUT.into()]
    }
    fn decode(&self, record: &Record<'_>) -> Result<Vec<u8>, Rejection> {
        Ok(record.payload.to_vec())
    }
    fn event_time(&self, _: &Vec<u8>) -> Option<Millis> {
        None
    }
    fn process(&mut self, ctx: &mut Ctx<'_>, _: Vec<u8>) -> anyhow::Result<()> {
        ctx.put_now("w/1", &"before the effect")
    }
    fn on_timer(&mut self, _: &mut Ctx<'_>, _: &DueTimer) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The claim checks of records written ahead rely on the engine knowing which
/// processors write them: one that does so without saying it fails at once.
#[test]
fn a_processor_that_writes_ahead_without_saying_so_fails_loudly() {
    let dir = tempfile::tempdir().expect("dir");
    let config = Config::from_text(
        Path::new("test.toml"),
        "[kafka]\npartitions = 1\n",
        &[(
            "KAIROS__STATE__DIR".into(),
            dir.path().display().to_string(),
        )],
    )
    .expect("config");
    let registry = prometheus::Registry::new();
    let mut replayer =
        kairos_core::replay::Replayer::new(WritesAheadSilently, &config, &registry).expect("open");
    let error = replayer
        .push(INPUT, b"k", b"x")
        .expect_err("put_now without writes_ahead");
    assert!(
        format!("{error:#}").contains("must say so (`writes_ahead`)"),
        "{error:#}"
    );
}

/// librdkafka puts a consumer out of its group when the application has not polled
/// for `max.poll.interval.ms`: a restore longer than that (a large partition, a slow
/// broker) would hand the partition to the group again, and restore it once more when
/// the instance came back. The restore polls with the input paused: one restore, and
/// the record waiting behind it is processed once it is done.
#[test]
fn a_restore_longer_than_the_poll_interval_keeps_the_instance_in_its_group() {
    let cluster = cluster();
    let dir = tempfile::tempdir().expect("dir");
    let mut config = config(&cluster, dir.path());
    for (key, value) in [
        ("session.timeout.ms", "6000"),
        ("max.poll.interval.ms", "6000"),
    ] {
        config.kafka.client.insert(key.into(), value.into());
    }
    produce(&config, &["arm"]);
    run_until(&config, || {
        outputs(&config).iter().any(|o| o.contains("armed"))
    });
    // The state is lost: the next start restores it from the changelog, and every
    // answer of the broker takes 0.6 s, which makes the restore (some twenty round
    // trips) outlast the poll interval.
    std::fs::remove_dir_all(dir.path().join("gate")).expect("remove the state");
    produce(&config, &["cancel"]);
    cluster
        .broker_round_trip_time(1, Duration::from_millis(600))
        .expect("slow broker");
    let registry = prometheus::Registry::new();
    let restores = || counter_total(&registry, "kairos_partition_restores_total");
    // The assignment makes the partition's lag series.
    let assigned = || {
        registry
            .gather()
            .iter()
            .any(|f| f.name() == "kairos_consumer_lag_records" && !f.get_metric().is_empty())
    };
    let (mut assigned_at, mut restore_took) = (None, None);
    let cancelled = std::cell::Cell::new(false);
    run_until_with(&config, &registry, Duration::from_secs(90), || {
        if assigned_at.is_none() && assigned() {
            assigned_at = Some(Instant::now());
        }
        if restore_took.is_none() && restores() >= 1.0 {
            restore_took = assigned_at.map(|at| at.elapsed());
            cluster
                .broker_round_trip_time(1, Duration::ZERO)
                .expect("fast broker");
        }
        // Read only once the broker is quick again; the record behind the restore is
        // done after it, and a second restore would come before it.
        restore_took.is_some() && {
            cancelled.set(outputs(&config).iter().any(|o| o.contains("cancelled")));
            cancelled.get()
        }
    });
    let restore_took = restore_took.expect("the partition was never assigned and restored");
    assert!(
        cancelled.get(),
        "the record behind the restore was not processed"
    );
    assert!(
        restore_took > Duration::from_secs(7),
        "the restore took {restore_took:?}, within the poll interval: the test proves nothing"
    );
    assert_eq!(
        restores(),
        1.0,
        "the partition was restored again: the instance left its group while restoring"
    );
}
