//! `kairos`: one binary, one subcommand per service.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use kairos_core::admin::{self, AdminState};
use kairos_core::config::{Config, LogFormat};
use kairos_core::contracts::Channel;
use tokio_util::sync::CancellationToken;

// The stream processors allocate many small short-lived buffers per record; glibc's
// allocator spent a quarter of the replay benchmark's CPU time on them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (not among the crate's constants; the same
/// number in mimalloc v2, which the workspace builds, and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory in mimalloc instead of handing it back to the kernel after 1 s:
/// each commit frees and re-allocates batch-sized buffers, and re-faulting them (the
/// kernel zeroes every page again) cost a fifth of the replay benchmark's CPU time.
/// Peak memory is what configuration bounds; the resident size stays at that peak.
/// (Transparent huge pages for mimalloc's arenas were tried: a few per cent on the
/// arbiter benchmark and the 1M-event replay, nothing measurable at the 20M-event
/// replay's 4 GB heap, where the kernel also compacts memory to find 2 MiB pages.)
fn keep_freed_memory() {
    // SAFETY: sets a plain integer option; mimalloc reads options atomically.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

mod bench;
mod explain;
mod input_lines;
mod inspect;
mod replay;
mod schemas_cli;
mod up;

#[derive(Parser)]
#[command(
    name = "kairos",
    version,
    about = "Kairos: a real-time CRM marketing engine on Kafka"
)]
struct Cli {
    /// Config file (environment overrides: KAIROS__SECTION__KEY=value).
    #[arg(
        long,
        short,
        global = true,
        env = "KAIROS_CONFIG",
        default_value = "config/kairos.toml"
    )]
    config: PathBuf,
    /// Log format (overrides [log] format).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Plain,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Host a Kafka-protocol broker in this process (librdkafka mock cluster).
    DevBroker,
    /// The identity processor: resolves every raw event to one customer.
    Identity,
    /// The profile processor: customer state, segments, triggers.
    Profile,
    /// The catalog join: price drops and back-in-stock for interested customers.
    Catalog,
    /// Run the pipeline (identity when enabled, profile, catalog join and arbiter)
    /// over JSON-lines files in event time, without Kafka; outputs as JSON lines.
    Replay {
        /// Input files (JSON lines).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output file (default: stdout).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Advance event time to this instant (RFC 3339) at the end, firing due timers.
        #[arg(long)]
        until: Option<String>,
        /// State directory, empty or missing (default: a fresh temporary one).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Replay the profile (and catalog join) only, without the arbiter's decisions
        /// and send commands (the profile benchmark).
        #[arg(long)]
        no_arbiter: bool,
    },
    /// Benchmark one delivery worker with the simulator, in process on RocksDB.
    BenchDelivery {
        #[arg(long, default_value = "email")]
        channel: String,
        #[arg(long, default_value_t = 200_000)]
        count: u64,
        /// State directory, empty or missing (default: a fresh temporary one).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Benchmark the identity processor on a JSON-lines event file, in process on
    /// RocksDB (run it under `taskset -c 0` for one core).
    BenchIdentity {
        /// Input file (JSON lines, as `kairos generate --to-file` writes).
        input: PathBuf,
        /// State directory, empty or missing (default: a fresh temporary one).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Benchmark the arbiter on generated triggers, in process on RocksDB.
    BenchArbiter {
        #[arg(long, default_value_t = 2_000_000)]
        count: u64,
        #[arg(long, default_value_t = 1_000_000)]
        customers: u64,
        /// Scenario of the generated triggers (its cascade, chain and priority apply).
        #[arg(long, default_value = "abandoned_cart")]
        scenario: String,
        /// State directory, empty or missing (default: a fresh temporary one).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// The arbiter: frequency, conflict and channel policy.
    Arbiter,
    /// A delivery worker for one channel.
    Deliver {
        #[arg(long)]
        channel: String,
    },
    /// Feedback: outcomes and decisions into metrics.
    Feedback,
    /// Publish realistic shop traffic.
    Generate {
        /// Events per second (default: [generator] rate); live runs only.
        #[arg(long, value_parser = positive_number, conflicts_with = "to_file")]
        rate: Option<f64>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Write JSON lines to this file (synthetic event time) instead of Kafka.
        #[arg(long)]
        to_file: Option<PathBuf>,
        /// Customer base size (default: [generator] customers).
        #[arg(long)]
        customers: Option<u64>,
        /// With --to-file: days of event time the traffic spans.
        #[arg(long, default_value_t = 90.0, value_parser = positive_number, requires = "to_file")]
        span_days: f64,
    },
    /// Run the whole pipeline: broker, every service and the generator, with a live
    /// summary, until Ctrl-C.
    Up {
        /// Generated events per second.
        #[arg(long, value_parser = positive_number)]
        rate: Option<f64>,
    },
    /// Validate the config file and exit.
    CheckConfig,
    /// The Avro contract of the input topics, for producers.
    Schemas {
        #[command(subcommand)]
        action: SchemasAction,
    },
    /// Digest of a processor's state (per partition and in total), from its local
    /// state directory or rebuilt from its changelog topic.
    InspectState {
        /// Processor name: profile, catalog, arbiter, feedback, deliver-<channel>.
        #[arg(long)]
        service: String,
        /// Rebuild from the changelog topic instead of reading [state] dir.
        #[arg(long)]
        from_changelog: bool,
    },
    /// A customer's recent triggers and the arbiter's decisions on them (rule and
    /// reason), and the arbiter's current view of the customer, read from Kafka.
    Explain {
        customer_id: String,
        /// How many of the latest triggers to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// The token a poll of a customer's in-app inbox carries (`Authorization: Bearer
    /// <token>`) under `delivery.in_app.inbox_secret`: what the shop's backend computes.
    InboxToken { customer_id: String },
}

#[derive(Subcommand)]
enum SchemasAction {
    /// Print the Kairos schema of an input topic: what producers write.
    Show {
        /// Input topic, with or without the topic prefix (events.site, events.app,
        /// events.offline, catalog).
        topic: String,
    },
    /// Check that Kairos can read records written with a producer's Avro schema on an
    /// input topic (Avro's schema resolution rules); exit status 1 if it cannot.
    Check {
        /// Input topic, with or without the topic prefix.
        topic: String,
        /// The producer's schema file (.avsc).
        schema: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kairos: invalid configuration: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let format = match cli.log_format {
        Some(LogFormatArg::Json) => LogFormat::Json,
        Some(LogFormatArg::Plain) => LogFormat::Plain,
        None => config.log.format,
    };
    kairos_core::logging::init(format, &config.log.level);
    if let Command::Schemas { action } = &cli.command {
        return schemas(&config, action);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kairos: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // A service's log is its record (a file, under `kairos up`); a one-shot command
    // answers on the terminal, once.
    let service = matches!(
        cli.command,
        Command::DevBroker
            | Command::Identity
            | Command::Profile
            | Command::Catalog
            | Command::Arbiter
            | Command::Deliver { .. }
            | Command::Feedback
    );
    match runtime.block_on(run(cli, Arc::new(config))) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if service {
                tracing::error!("{e:#}");
            }
            eprintln!("kairos: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `kairos schemas`: exit status 0 when shown or readable, 1 when Kairos cannot read
/// the producer's schema, 2 when the input is wrong (unknown topic, unreadable file).
fn schemas(config: &Config, action: &SchemasAction) -> std::process::ExitCode {
    let outcome = match action {
        SchemasAction::Show { topic } => schemas_cli::contract(config, topic).map(|c| {
            println!("{}", c.text.trim_end());
            true
        }),
        SchemasAction::Check { topic, schema } => {
            schemas_cli::check(config, topic, schema).map(|(readable, verdict)| {
                match readable {
                    true => println!("{verdict}"),
                    false => eprintln!("{verdict}"),
                }
                readable
            })
        }
    };
    match outcome {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kairos: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli, config: Arc<Config>) -> anyhow::Result<()> {
    match cli.command {
        Command::Schemas { .. } => {
            anyhow::bail!("`kairos schemas` is answered before the async runtime starts")
        }
        Command::CheckConfig => {
            // Templates are part of the configuration: every scenario's template must
            // exist for each channel it sends on, within the channel's limits.
            config.check_deliverable()?;
            config.check_opt_out()?;
            for channel in config.delivery.keys() {
                kairos_delivery::load_templates(&config, *channel)?;
            }
            println!(
                "{}: ok ({} scenarios, {} delivery channels, {} topics)",
                config.source_file.display(),
                config.scenarios.len(),
                config.delivery.len(),
                config.all_topics().len()
            );
            Ok(())
        }
        Command::InspectState {
            service,
            from_changelog,
        } => {
            let digests = if from_changelog {
                let c = config.clone();
                tokio::task::spawn_blocking(move || inspect::digest_changelog(&c, &service))
                    .await
                    .context("inspect task failed")??
            } else {
                inspect::digest_dir(&config.state.dir.join(&service))?
            };
            inspect::print(&digests);
            Ok(())
        }
        Command::Explain { customer_id, limit } => {
            let c = config.clone();
            let report =
                tokio::task::spawn_blocking(move || explain::explain(&c, &customer_id, limit))
                    .await
                    .context("explain task failed")??;
            print!("{report}");
            Ok(())
        }
        Command::InboxToken { customer_id } => {
            let secret = config
                .delivery
                .get(&Channel::in_app)
                .and_then(|d| d.inbox_secret.as_deref())
                .with_context(|| {
                    format!(
                        "{}: no delivery.in_app.inbox_secret: the inbox takes polls without a token",
                        config.source_file.display()
                    )
                })?;
            println!("{}", kairos_core::ids::inbox_token(secret, &customer_id));
            Ok(())
        }
        Command::DevBroker => {
            let cancel = kairos_core::shutdown_token();
            kairos_broker::run(config, cancel).await
        }
        Command::Identity => {
            let listen = config.identity.admin_listen;
            service(config, listen, |c, a, t| async move {
                kairos_identity::run(c, a, t).await
            })
            .await
        }
        Command::BenchIdentity { input, state_dir } => {
            let (cfg, _state) = with_state_dir(&config.in_event_time()?, state_dir)?;
            let stats = bench::run_identity(&cfg, &input)?;
            eprintln!("{}", stats.report("events", "events", peak_rss_kib()));
            Ok(())
        }
        Command::Profile => {
            let listen = config.profile.admin_listen;
            service(config, listen, |c, a, t| async move {
                kairos_profile::run(c, a, t).await
            })
            .await
        }
        Command::Catalog => {
            let listen = config.catalog.admin_listen;
            service(config, listen, |c, a, t| async move {
                kairos_profile::catalog::run(c, a, t).await
            })
            .await
        }
        Command::Replay {
            inputs,
            output,
            until,
            state_dir,
            no_arbiter,
        } => {
            let until = until
                .map(|u| {
                    chrono::DateTime::parse_from_rfc3339(&u)
                        .map(|t| t.timestamp_millis())
                        .with_context(|| format!("--until {u:?} is not RFC 3339"))
                })
                .transpose()?;
            let (cfg, _state) = with_state_dir(&config, state_dir)?;
            let started = std::time::Instant::now();
            let stats = tokio::task::spawn_blocking(move || {
                replay::run(&cfg, &inputs, output, until, !no_arbiter)
            })
            .await
            .context("replay task failed")??;
            let time = cpu_time();
            let usage = time.total();
            eprintln!(
                "replayed {} events into {} records in {:.2} s wall, {:.2} s CPU ({:.2} user, {:.2} system): {:.0} events/s wall, {:.0} events per CPU-second, peak RSS {} MiB",
                stats.input_records,
                stats.output_records,
                started.elapsed().as_secs_f64(),
                usage,
                time.user,
                time.system,
                stats.input_records as f64 / started.elapsed().as_secs_f64(),
                stats.input_records as f64 / usage.max(1e-9),
                peak_rss_kib() / 1024,
            );
            Ok(())
        }
        Command::BenchDelivery {
            channel,
            count,
            state_dir,
        } => {
            let channel =
                Channel::parse(&channel).with_context(|| format!("unknown channel {channel:?}"))?;
            let (cfg, _state) = with_state_dir(&config, state_dir)?;
            let stats = bench::run(&cfg, channel, count)?;
            eprintln!(
                "{}",
                stats.report(
                    &format!("{channel} sends (simulator)"),
                    "sends",
                    peak_rss_kib()
                )
            );
            Ok(())
        }
        Command::BenchArbiter {
            count,
            customers,
            scenario,
            state_dir,
        } => {
            anyhow::ensure!(
                config.scenario(&scenario).is_some(),
                "--scenario {scenario:?} is not a [[scenarios]] name in the config"
            );
            // Decisions in event time, from the triggers' own timestamps.
            let (cfg, _state) = with_state_dir(&config.in_event_time()?, state_dir)?;
            let stats = bench::run_arbiter(&cfg, count, customers, &scenario)?;
            eprintln!(
                "{}",
                stats.report(
                    &format!("triggers for {customers} customers"),
                    "decisions",
                    peak_rss_kib()
                )
            );
            Ok(())
        }
        Command::Arbiter => {
            config.check_deliverable()?;
            let listen = config.arbiter.admin_listen;
            service(config, listen, |c, a, t| async move {
                kairos_arbiter::run(c, a, t).await
            })
            .await
        }
        Command::Feedback => {
            let listen = config.feedback.admin_listen;
            service(config, listen, |c, a, t| async move {
                kairos_feedback::run(c, a, t).await
            })
            .await
        }
        Command::Deliver { channel } => {
            let channel = Channel::parse(&channel).with_context(|| {
                format!(
                    "unknown channel {channel:?}; one of {}",
                    Channel::ALL.map(|c| c.as_str()).join(", ")
                )
            })?;
            let settings = config.delivery.get(&channel).with_context(|| {
                format!(
                    "{}: no [delivery.{channel}] section",
                    config.source_file.display()
                )
            })?;
            let listen = settings.admin_listen;
            let (inbox, polls) = kairos_delivery::inbox_channel(&config, channel).unzip();
            let routes_config = config.clone();
            service_with_routes(
                config,
                listen,
                move |admin| kairos_delivery::routes(&routes_config, channel, admin, inbox),
                move |c, a, t| async move { kairos_delivery::run(c, channel, a, t, polls).await },
            )
            .await
        }
        Command::Generate {
            to_file: Some(path),
            count,
            customers,
            span_days,
            ..
        } => {
            let mut g = config.generator.clone();
            if let Some(c) = customers {
                g.customers = c;
            }
            let count = count.unwrap_or(1_000_000);
            let start = 1_767_225_600_000; // 2026-01-01T00:00:00Z
            let written = tokio::task::spawn_blocking(move || {
                kairos_generator::write_file(&g, &path, count, start, span_days)
            })
            .await
            .context("generator task failed")??;
            println!("wrote {written} events");
            Ok(())
        }
        Command::Generate {
            rate,
            count,
            customers,
            ..
        } => {
            let cancel = kairos_core::shutdown_token();
            let mut config = (*config).clone();
            if let Some(c) = customers {
                config.generator.customers = c;
            }
            let config = Arc::new(config);
            let rate = rate.unwrap_or(config.generator.rate);
            let sent = kairos_generator::run(config, rate, count, cancel).await?;
            println!("published {sent} events");
            Ok(())
        }
        Command::Up { rate } => {
            config.check_deliverable()?;
            let log_format = cli.log_format.map(|f| match f {
                LogFormatArg::Json => "json",
                LogFormatArg::Plain => "plain",
            });
            up::run(cli.config, config, rate, log_format).await
        }
    }
}

/// Common service start-up: admin server, topics, then the processing loop, with a
/// bound on how long a graceful shutdown may take.
async fn service<F, Fut>(
    config: Arc<Config>,
    listen: std::net::SocketAddr,
    body: F,
) -> anyhow::Result<()>
where
    F: FnOnce(Arc<Config>, Arc<AdminState>, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    service_with_routes(config, listen, |_| Ok(axum::Router::new()), body).await
}

/// [`service`] with extra routes on the admin port (a delivery worker's webhooks).
async fn service_with_routes<R, F, Fut>(
    config: Arc<Config>,
    listen: std::net::SocketAddr,
    routes: R,
    body: F,
) -> anyhow::Result<()>
where
    R: FnOnce(&AdminState) -> anyhow::Result<axum::Router>,
    F: FnOnce(Arc<Config>, Arc<AdminState>, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let cancel = kairos_core::shutdown_token();
    let state = AdminState::new(prometheus::Registry::new());
    let extra = routes(&state)?;
    let bound = admin::serve(listen, state.clone(), extra, cancel.clone()).await?;
    if let Some(file) = &config.admin.address_file {
        admin::write_address_file(file, bound)?;
    }
    let watchdog = cancel.clone();
    tokio::spawn(async move {
        watchdog.cancelled().await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        eprintln!("kairos: graceful shutdown took longer than 30 s; exiting");
        std::process::exit(1);
    });
    let c = config.clone();
    tokio::task::spawn_blocking(move || futures_lite_block(kairos_core::kafka::ensure_topics(&c)))
        .await
        .context("topic check task failed")??;
    body(config, state, cancel).await
}

/// A finite number above 0: a rate or span of 0, NaN or infinity would spin or panic.
fn positive_number(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok(n),
        _ => Err(format!("{text:?} is not a number above 0")),
    }
}

/// `config` for a replay or benchmark with its state in `chosen` (empty or missing,
/// see [`empty_state_dir`]) or in a fresh temporary directory, which lives as long as
/// the directory returned with it.
fn with_state_dir(
    config: &Config,
    chosen: Option<PathBuf>,
) -> anyhow::Result<(Config, tempfile::TempDir)> {
    let tmp = tempfile::tempdir().context("cannot create a state directory")?;
    let mut cfg = config.clone();
    cfg.state.dir = empty_state_dir(chosen, &tmp)?;
    Ok((cfg, tmp))
}

/// The state directory of a replay or benchmark: `chosen` if it is empty or missing,
/// else `fallback`. A replay numbers its input from the start of its files, so over
/// the state of an earlier run (one stopped half-way, or the same file again) it would
/// apply every record that state already holds a second time.
fn empty_state_dir(
    chosen: Option<PathBuf>,
    fallback: &tempfile::TempDir,
) -> anyhow::Result<PathBuf> {
    let Some(dir) = chosen else {
        return Ok(fallback.path().to_path_buf());
    };
    let holds_something = match std::fs::read_dir(&dir) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    anyhow::ensure!(
        !holds_something,
        "--state-dir {} is not empty: a replay starts from empty state and would apply \
         again what an earlier run left there; remove it or name another directory",
        dir.display()
    );
    Ok(dir)
}

/// User and system CPU time of this process (all threads), seconds.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuTime {
    pub user: f64,
    pub system: f64,
}

impl CpuTime {
    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Sub for CpuTime {
    type Output = CpuTime;
    fn sub(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }
}

/// Reported apart because on a VM the system part is mostly the kernel zeroing fresh
/// pages, which varies several-fold between runs of the same build.
pub(crate) fn cpu_time() -> CpuTime {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            CpuTime {
                user: t(u.user_time()),
                system: t(u.system_time()),
            }
        })
        .unwrap_or_default()
}

/// Peak resident memory of this process, KiB.
fn peak_rss_kib() -> i64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| u.max_rss())
        .unwrap_or(0)
}

/// Runs a future to completion on the current (blocking) thread.
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}
