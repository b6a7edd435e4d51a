//! Test harness: starts the embedded broker (or uses `KAIROS_TEST_BOOTSTRAP`) and every
//! Kairos service as real processes of the `kairos` binary, and talks to them with a
//! real Kafka client and over HTTP.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

pub mod delivery;

/// The services of a full pipeline, by process name.
pub const SERVICES: [&str; 9] = [
    "profile",
    "catalog",
    "arbiter",
    "deliver-email",
    "deliver-sms",
    "deliver-push",
    "deliver-messenger",
    "deliver-in_app",
    "feedback",
];

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Path of the `kairos` binary built next to the test executable.
pub fn kairos_bin() -> PathBuf {
    if let Ok(p) = std::env::var("KAIROS_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/kairos
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("kairos"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} not found: build it first (`make test` runs `cargo build`)",
        bin.display()
    );
    bin
}

/// The repository checkout the tests run from.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

/// The ports `free_port` and `free_port_outside_ephemeral_range` handed out.
static HANDED_OUT: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());

/// A port free now, below the kernel's ephemeral range, never handed out before in
/// this process: for a configuration that must name its processes' ports before they
/// bind them (`kairos up`'s). A port from the ephemeral range (what binding port 0
/// gives) can meanwhile be taken by any outgoing connection those processes open; one
/// below it only by a deliberate bind.
pub fn free_port_outside_ephemeral_range() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    // A machine whose ephemeral range starts low has no room below it: any free port
    // then, as `free_port` gives.
    if ephemeral_low < 16_384 {
        return free_port();
    }
    let first = ephemeral_low - 8_192;
    // Started from a point of this process's own, so test processes running side by
    // side rarely try the same ports.
    let offset = (std::process::id() % 4_096) as u16;
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    (0..8_192u16)
        .map(|i| first + (offset + i) % 8_192)
        .find(|port| !handed_out.contains(port) && TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .inspect(|port| {
            handed_out.insert(*port);
        })
        .expect("a free port below the ephemeral range")
}

/// A port free now, never handed out before in this process (the kernel may give the
/// same ephemeral port to two binds in a row): unique names, and the port of a test's
/// own server. Not for the services' admin ports: a port chosen here can be taken by
/// another socket before the service binds it, so services bind port 0 instead.
pub fn free_port() -> u16 {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// Knobs of a test pipeline.
#[derive(Clone, Debug)]
pub struct Options {
    /// Extra `KAIROS__…` environment for every service.
    pub env: Vec<(String, String)>,
    /// Abandoned-cart delay.
    pub cart_delay: &'static str,
    /// Services to start (default: all).
    pub services: Vec<&'static str>,
    /// TOML appended to the test config (more scenarios...).
    pub extra_config: String,
}

/// Environment of the crash and rebalance tests: event time (results depend on the
/// input alone), partitions enough for the embedded broker's 5 MB per partition, and a
/// [`short_session_timeout`].
pub fn resilience_env() -> Vec<(String, String)> {
    vec![
        ("KAIROS__CLOCK__MODE".into(), "event".into()),
        ("KAIROS__KAFKA__PARTITIONS".into(), "32".into()),
        short_session_timeout(),
    ]
}

/// A killed member holds its partitions until its session expires: 6 s instead of 45 s.
pub fn short_session_timeout() -> (String, String) {
    (
        "KAIROS__KAFKA__CLIENT__session.timeout.ms".into(),
        "6000".into(),
    )
}

impl Default for Options {
    fn default() -> Self {
        Options {
            env: Vec::new(),
            cart_delay: "2s",
            services: SERVICES.to_vec(),
            extra_config: String::new(),
        }
    }
}

pub struct Pipeline {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub bootstrap: String,
    pub prefix: String,
    env: Vec<(String, String)>,
    procs: BTreeMap<String, Child>,
    broker: Option<Child>,
}

fn test_config(cart_delay: &str) -> String {
    format!(
        r#"
[kafka]
partitions = 4

[state]
max_batch_wait = "5ms"
timer_tick = "100ms"

[arbiter]
control_group_percent = 0

[delivery.email]
admin_listen = "127.0.0.1:0"
[delivery.email.simulator]
delivery_rate = 1.0
open_rate = 0.0
complaint_rate = 0.0
unsubscribe_rate = 0.0
[delivery.sms]
admin_listen = "127.0.0.1:0"
[delivery.push]
admin_listen = "127.0.0.1:0"
[delivery.messenger]
admin_listen = "127.0.0.1:0"
[delivery.in_app]
admin_listen = "127.0.0.1:0"
provider = "in_app"

[[scenarios]]
name = "abandoned_cart"
kind = "abandoned_cart"
channels = ["email", "push", "sms"]
template = "abandoned_cart"
delay = "{cart_delay}"
valid_for = "1h"
priority = 60
"#
    )
}

impl Pipeline {
    /// Starts the broker (unless `KAIROS_TEST_BOOTSTRAP` names one) and every service,
    /// and waits until each reports ready.
    pub fn start(opts: Options) -> Pipeline {
        // KAIROS_TEST_KEEP=1 keeps the directory (config, logs, state) for a post-mortem.
        let dir = tempfile::Builder::new()
            .prefix("kairos-test-")
            .disable_cleanup(std::env::var("KAIROS_TEST_KEEP").is_ok())
            .tempdir()
            .expect("temp dir");
        let config_path = dir.path().join("kairos.toml");
        std::fs::write(
            &config_path,
            format!("{}\n{}", test_config(opts.cart_delay), opts.extra_config),
        )
        .expect("write config");
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let external = std::env::var("KAIROS_TEST_BOOTSTRAP")
            .ok()
            .filter(|s| !s.is_empty());
        let prefix = match &external {
            Some(_) => format!("kt{}-{}-{}.", std::process::id(), n, free_port()),
            None => "kairos.".to_string(),
        };
        let addr_file = dir.path().join("broker.addr");
        let mut env = vec![
            (
                "KAIROS__STATE__DIR".to_string(),
                dir.path().join("state").display().to_string(),
            ),
            (
                "KAIROS__KAFKA__BROKER_ADDRESS_FILE".into(),
                addr_file.display().to_string(),
            ),
            ("KAIROS__KAFKA__TOPIC_PREFIX".into(), prefix.clone()),
            (
                "KAIROS__TEMPLATES__DIR".into(),
                repo_root().join("config/templates").display().to_string(),
            ),
            ("KAIROS__KAFKA__GROUP_PREFIX".into(), prefix.clone()),
        ];
        if let Some(b) = &external {
            env.push(("KAIROS__KAFKA__BOOTSTRAP_SERVERS".into(), b.clone()));
        }
        env.extend(opts.env.iter().cloned());
        // Every service binds a port the kernel picks and writes it to its address file
        // (see `Pipeline::admin`): a port chosen here and bound later can be taken in
        // between by any socket of a test running beside this one. The identity
        // processor runs only where a test enables and starts it.
        for s in SERVICES.iter().chain(&["identity"]) {
            env.push((admin_listen_key(s), "127.0.0.1:0".into()));
        }
        let mut p = Pipeline {
            dir,
            config_path,
            bootstrap: external.clone().unwrap_or_default(),
            prefix,
            env,
            procs: BTreeMap::new(),
            broker: None,
        };
        if external.is_none() {
            let broker = p
                .command(&["dev-broker"], "dev-broker")
                .spawn()
                .expect("start dev-broker");
            p.broker = Some(broker);
            let deadline = Instant::now() + Duration::from_secs(30);
            while !addr_file.exists() {
                assert!(
                    Instant::now() < deadline,
                    "dev-broker did not write its address"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            p.bootstrap = std::fs::read_to_string(&addr_file)
                .expect("address")
                .trim()
                .to_string();
        }
        for s in &opts.services {
            p.spawn(s);
        }
        for s in &opts.services {
            p.wait_ready(s, Duration::from_secs(90));
        }
        p
    }

    /// Starts a second instance of `service` under `instance` (its own admin port and
    /// state directory, the same consumer group).
    pub fn spawn_instance(&mut self, instance: &str, service: &str) {
        let state = self.dir.path().join(format!("state-{instance}"));
        let args = service_args(service);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = self.command(&args, instance);
        cmd.env("KAIROS__STATE__DIR", state.display().to_string());
        let child = cmd.spawn().expect("start instance");
        self.procs.insert(instance.to_string(), child);
    }

    /// The state directory of a service (or of an instance started by `spawn_instance`).
    pub fn state_dir(&self, instance: &str) -> PathBuf {
        if self.procs.contains_key(instance) && !SERVICES.contains(&instance) {
            self.dir.path().join(format!("state-{instance}"))
        } else {
            self.dir.path().join("state")
        }
    }

    /// Runs a `kairos` command against this pipeline (its config, broker and topic
    /// prefix) with `extra_env`, and returns its output.
    pub fn run_kairos(&self, args: &[&str], extra_env: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = Command::new(kairos_bin());
        cmd.arg("--config").arg(&self.config_path).args(args);
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if !self.bootstrap.is_empty() {
            cmd.env("KAIROS__KAFKA__BOOTSTRAP_SERVERS", &self.bootstrap);
        }
        cmd.envs(extra_env.iter().copied());
        cmd.output()
            .unwrap_or_else(|e| panic!("run kairos {args:?}: {e}"))
    }

    /// Runs `kairos inspect-state` and returns its "total" line (record count and digest).
    pub fn state_digest(
        &self,
        service: &str,
        from_changelog: bool,
        state_dir: Option<&std::path::Path>,
    ) -> String {
        let mut args = vec!["inspect-state", "--service", service];
        if from_changelog {
            args.push("--from-changelog");
        }
        let state_dir = state_dir.map(|d| d.display().to_string());
        let env: Vec<(&str, &str)> = state_dir
            .iter()
            .map(|d| ("KAIROS__STATE__DIR", d.as_str()))
            .collect();
        let out = self.run_kairos(&args, &env);
        assert!(
            out.status.success(),
            "inspect-state failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if std::env::var("KAIROS_TEST_VERBOSE").is_ok() {
            eprintln!(
                "inspect-state {service} from_changelog={from_changelog}:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let total = text
            .lines()
            .find(|l| l.starts_with("total "))
            .unwrap_or_else(|| panic!("inspect-state {service} printed no total:\n{text}"))
            .to_string();
        // "total <records> <hash>": a store with nothing in it digests the same
        // whatever went wrong, so it proves nothing.
        let records: u64 = total
            .split(' ')
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_default();
        assert!(
            records > 0,
            "inspect-state {service} found no state: {total}"
        );
        total
    }

    /// Waits until the consumer group of `service` has committed every record of
    /// `topics` (its processing is done), up to `timeout`.
    pub fn wait_caught_up(&self, service: &str, topics: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let (behind, detail) = self.behind(service, topics);
            if behind == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{service} still {behind} records behind after {timeout:?}: {detail:?}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn command(&self, args: &[&str], log_name: &str) -> Command {
        let mut cmd = Command::new(kairos_bin());
        cmd.arg("--config").arg(&self.config_path).args(args);
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if !self.bootstrap.is_empty() {
            cmd.env("KAIROS__KAFKA__BOOTSTRAP_SERVERS", &self.bootstrap);
        }
        cmd.env("RUST_LOG", "info");
        // A restarted process writes its new address; the old one must not be read.
        let address_file = self.admin_address_file(log_name);
        match std::fs::remove_file(&address_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove {}: {e}", address_file.display()),
        }
        cmd.env("KAIROS__ADMIN__ADDRESS_FILE", &address_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{log_name}.log")))
            .expect("log file");
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        cmd
    }

    /// [`Pipeline::start`] with `service` spawned on top and ready: how a crash test
    /// begins each of its runs.
    pub fn start_with(opts: Options, service: &str) -> Pipeline {
        let mut p = Pipeline::start(opts);
        p.spawn(service);
        p.wait_ready(service, Duration::from_secs(60));
        p
    }

    /// Starts (or restarts) one service process.
    pub fn spawn(&mut self, service: &str) {
        let args = service_args(service);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = self.command(&args, service).spawn().expect("start service");
        self.procs.insert(service.to_string(), child);
    }

    /// SIGKILLs a service: no shutdown code runs.
    pub fn kill9(&mut self, service: &str) {
        if let Some(mut c) = self.procs.remove(service) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits `after`, SIGKILLs `service`, starts it again and waits until it is ready;
    /// returns whether the kill came while input of `topics` lay beyond `service`'s
    /// committed offsets (which trail its processing by up to a second: the kill came
    /// while input flowed, not on a service idle for long).
    pub fn crash_mid_work(&mut self, service: &str, after: Duration, topics: &[&str]) -> bool {
        std::thread::sleep(after);
        self.kill9(service);
        // Measured once it is dead, so it can commit nothing more: input beyond its
        // commits was there at the kill.
        let (behind, _) = self.behind(service, topics);
        self.spawn(service);
        self.wait_ready(service, Duration::from_secs(120));
        behind > 0
    }

    /// How many records of `topics` lie beyond what `service`'s consumer group has
    /// committed, with the partitions behind.
    pub fn behind(&self, service: &str, topics: &[&str]) -> (i64, Vec<String>) {
        let group = format!("{}{}", self.prefix, service);
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut behind = 0i64;
        let mut detail = Vec::new();
        for t in topics {
            let topic = self.topic(t);
            let md = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .expect("metadata");
            let n = md.topics()[0].partitions().len() as i32;
            let mut tpl = TopicPartitionList::new();
            for p in 0..n {
                tpl.add_partition(&topic, p);
            }
            let committed = consumer
                .committed_offsets(tpl, Duration::from_secs(10))
                .expect("committed offsets");
            for p in 0..n {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(10))
                    .expect("watermarks");
                let done = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => 0,
                };
                behind += (high - done).max(0);
                if high > done {
                    detail.push(format!("{topic}[{p}] committed {done} of {high}"));
                }
            }
        }
        (behind, detail)
    }

    /// Sends `signal` to a running service (SIGSTOP pauses it as a frozen VM or a long
    /// stall would; SIGCONT wakes it).
    pub fn signal(&self, service: &str, signal: nix::sys::signal::Signal) {
        let child = self.procs.get(service).expect("running service");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)
            .expect("signal");
    }

    /// Whether a service has stopped on its own (it stays listed until [`Self::exited`]).
    pub fn has_exited(&self, service: &str) -> bool {
        self.procs.get(service).is_some_and(|c| {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            // A child that exited is a zombie until reaped: signal 0 still reaches it,
            // so look at its state instead.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| stat.split(' ').nth(2) == Some("Z"))
                .unwrap_or(true)
        })
    }

    /// The exit status of a service that has stopped on its own, if it has.
    pub fn exited(&mut self, service: &str) -> Option<std::process::ExitStatus> {
        let status = self.procs.get_mut(service)?.try_wait().expect("try_wait")?;
        self.procs.remove(service);
        Some(status)
    }

    /// SIGTERMs a service and returns its exit status and how long it took.
    pub fn terminate(&mut self, service: &str) -> (std::process::ExitStatus, Duration) {
        let mut c = self.procs.remove(service).expect("running service");
        let started = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("signal");
        let status = c.wait().expect("wait");
        (status, started.elapsed())
    }

    pub fn log(&self, service: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{service}.log"))).unwrap_or_default()
    }

    /// Where `instance` writes the admin address it bound.
    fn admin_address_file(&self, instance: &str) -> PathBuf {
        self.dir.path().join(format!("{instance}.admin-addr"))
    }

    /// The admin address `instance` bound, once it has written it.
    fn try_admin(&self, instance: &str) -> Option<SocketAddr> {
        let text = std::fs::read_to_string(self.admin_address_file(instance)).ok()?;
        Some(
            text.trim()
                .parse()
                .unwrap_or_else(|e| panic!("{instance} wrote a bad admin address {text:?}: {e}")),
        )
    }

    /// The admin address of a running service (or instance), waiting up to 90 s for it
    /// to bind one.
    pub fn admin(&self, instance: &str) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(addr) = self.try_admin(instance) {
                return addr;
            }
            assert!(
                Instant::now() < deadline,
                "{instance} wrote no admin address; log:\n{}",
                self.log(instance)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_ready(&self, service: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ready = self
                .try_admin(service)
                .and_then(|addr| http_get(addr, "/readyz"));
            if let Some((200, _)) = ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{service} not ready after {timeout:?}; log:\n{}",
                self.log(service)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn metrics(&self, service: &str) -> String {
        match http_get(self.admin(service), "/metrics") {
            Some((200, body)) => body,
            other => panic!("{service} /metrics failed: {other:?}"),
        }
    }

    pub fn topic(&self, suffix: &str) -> String {
        format!("{}{}", self.prefix, suffix)
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &self.bootstrap);
        cc
    }

    /// Produces records with a real Kafka producer and waits for the broker's acks.
    pub fn produce<K: AsRef<str>>(&self, topic_suffix: &str, records: &[(K, Vec<u8>)]) {
        let producer: BaseProducer = self.client_config().create().expect("producer");
        let topic = self.topic(topic_suffix);
        for (key, payload) in records {
            producer
                .send(BaseRecord::to(&topic).key(key.as_ref()).payload(payload))
                .map_err(|(e, _)| e)
                .expect("enqueue");
        }
        // A broker slowed down by a test's SIGKILLs and restarts, with another such test
        // beside it on two cores, may take longer than one wait (a fresh-clone run once
        // timed out here after 30 s): flushing again goes on waiting for the same acks.
        let mut last = None;
        for _ in 0..4 {
            match producer.flush(Duration::from_secs(30)) {
                Ok(()) => return,
                Err(e) => last = Some(e),
            }
        }
        panic!("flush: {last:?}");
    }

    /// Reads a topic from the beginning until `done(records)` or `timeout`; returns what
    /// it read as `(key, payload)`.
    pub fn consume_until(
        &self,
        topic_suffix: &str,
        timeout: Duration,
        done: impl Fn(&[(String, Vec<u8>)]) -> bool,
    ) -> Vec<(String, Vec<u8>)> {
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", format!("test-reader-{}", free_port()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let topic = self.topic(topic_suffix);
        let mut tpl = TopicPartitionList::new();
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata");
        let partitions = md.topics()[0].partitions().len() as i32;
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, p, Offset::Beginning)
                .expect("tpl");
        }
        consumer.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                out.push((key, m.payload().unwrap_or_default().to_vec()));
            }
            if done(&out) {
                break;
            }
        }
        out
    }

    /// Every record currently in a topic (read up to the high watermarks).
    pub fn read_all_json(&self, topic_suffix: &str) -> Vec<serde_json::Value> {
        self.read_all_records(topic_suffix)
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    /// Every JSON record of a topic with its key, partition by partition.
    pub fn read_all_records(&self, topic_suffix: &str) -> Vec<(String, serde_json::Value)> {
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", format!("test-reader-{}", free_port()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let topic = self.topic(topic_suffix);
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata");
        let partitions = md.topics()[0].partitions().len() as i32;
        // Every partition at once: assigned one by one, each waited out a fetch of
        // its own (about a second each, half a minute for a topic of 32 partitions).
        let mut tpl = TopicPartitionList::new();
        let mut next = BTreeMap::new();
        for p in 0..partitions {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p, Duration::from_secs(10))
                .expect("watermarks");
            if high > low {
                tpl.add_partition_offset(&topic, p, Offset::Offset(low))
                    .expect("tpl");
                next.insert(p, (low, high));
            }
        }
        let mut by_partition: BTreeMap<i32, Vec<(String, serde_json::Value)>> = BTreeMap::new();
        if next.is_empty() {
            return Vec::new();
        }
        consumer.assign(&tpl).expect("assign");
        let deadline = Instant::now() + Duration::from_secs(60);
        while next.values().any(|(at, high)| at < high) {
            assert!(
                Instant::now() < deadline,
                "reading {topic} timed out: {next:?} (partition: next offset, end)"
            );
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                if let Some((at, _)) = next.get_mut(&m.partition()) {
                    *at = m.offset() + 1;
                }
                if let Some(v) = m.payload().and_then(|b| serde_json::from_slice(b).ok()) {
                    let key = String::from_utf8_lossy(m.key().unwrap_or_default());
                    by_partition
                        .entry(m.partition())
                        .or_default()
                        .push((key.into_owned(), v));
                }
            }
        }
        by_partition.into_values().flatten().collect()
    }

    /// JSON values of a topic's records, read until `done` or `timeout`.
    pub fn read_json_until(
        &self,
        topic_suffix: &str,
        timeout: Duration,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let parse = |recs: &[(String, Vec<u8>)]| -> Vec<serde_json::Value> {
            recs.iter()
                .filter_map(|(_, p)| serde_json::from_slice(p).ok())
                .collect()
        };
        let recs = self.consume_until(topic_suffix, timeout, |r| done(&parse(r)));
        parse(&recs)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for (_, c) in self.procs.iter_mut() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for (_, c) in self.procs.iter_mut() {
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut b) = self.broker.take() {
            let _ = b.kill();
            let _ = b.wait();
        }
    }
}

/// A minimal HTTP/1.1 GET (no client library needed for loopback admin ports).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, None, None)
}

/// GETs `path` with `Authorization: Bearer <token>`; returns the status and the body.
pub fn http_get_with_token(addr: SocketAddr, path: &str, token: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, None, Some(token))
}

/// POSTs a JSON body, with a bearer token if given; returns the status and the body of
/// the answer.
pub fn http_post_json(
    addr: SocketAddr,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> Option<(u16, String)> {
    http_request(addr, "POST", path, Some(body), token)
}

fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(35))).ok()?;
    let mut content = body
        .map(|b| {
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )
        })
        .unwrap_or_default();
    if let Some(t) = token {
        content.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{content}\r\n{}",
        body.unwrap_or("")
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    // axum answers with a Content-Length body, so no chunked decoding is needed.
    Some((status, body.to_string()))
}

/// The value of one Prometheus sample: `metric` with every `label="value"` in `labels`.
pub fn sample(metrics: &str, metric: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(metric))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// A registration with an e-mail address and e-mail consent, as a site event.
pub fn registration(customer: &str, at: i64) -> Vec<u8> {
    json(serde_json::json!({
        "event_id": format!("reg-{customer}"),
        "event_type": "registration",
        "occurred_at": at,
        "customer_id": customer,
        "email": format!("{customer}@example.com"),
        "consent": {"channel": "email", "granted": true},
        "profile": {"first_name": "Anna", "time_zone": "Europe/Berlin"}
    }))
}

/// A JSON event as bytes.
pub fn json(v: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&v).expect("json")
}

pub fn now_millis() -> i64 {
    kairos_core::time::wall_now()
}

/// The `kairos` arguments that run `service` (`deliver-<channel>` for a worker).
fn service_args(service: &str) -> Vec<String> {
    match service.strip_prefix("deliver-") {
        Some(channel) => vec!["deliver".into(), "--channel".into(), channel.into()],
        None => vec![service.to_string()],
    }
}

/// The environment variable that sets `service`'s admin address.
fn admin_listen_key(service: &str) -> String {
    match service.strip_prefix("deliver-") {
        Some(channel) => format!("KAIROS__DELIVERY__{}__ADMIN_LISTEN", channel.to_uppercase()),
        None => format!("KAIROS__{}__ADMIN_LISTEN", service.to_uppercase()),
    }
}
