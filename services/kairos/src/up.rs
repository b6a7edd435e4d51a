//! `kairos up` (what `make run` starts): the embedded broker, every service and the
//! generator as child processes, a live summary every few seconds, and a clean stop on
//! Ctrl-C: generator first, services next, broker last.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kairos_core::config::Config;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

struct Proc {
    name: String,
    /// Its command line after `--config` and `--log-format`, to start it again.
    args: Vec<String>,
    child: Child,
    /// Its exit was reported (once, not at every summary).
    exit_told: bool,
    /// When it was last started.
    started: Instant,
    /// Times it was started again after it exited on its own.
    restarts: u32,
    /// Exits in a row, each soon after its start: the wait before the next start
    /// doubles with them.
    quick_exits: u32,
    /// When it exited on its own, when it is to be started again.
    restart_at: Option<Instant>,
}

/// The first wait before a service that exited on its own is started again; doubled
/// at each exit in a row, up to [`RESTART_DELAY_MAX`] (as a supervisor backs off a
/// crash loop).
const RESTART_DELAY_FIRST: Duration = Duration::from_secs(1);
const RESTART_DELAY_MAX: Duration = Duration::from_secs(30);
/// A service that ran this long before it exited starts again after the first wait.
const RESTART_DELAY_RESET: Duration = Duration::from_secs(60);

/// How `kairos up` starts its processes: this executable, on its configuration file,
/// with the log format it was given.
struct Launch {
    exe: PathBuf,
    config_path: PathBuf,
    /// `--log-format` as `kairos up` was given it (`json` or `plain`), passed on.
    log_format: Option<&'static str>,
}

fn spawn(launch: &Launch, name: &str, args: &[&str]) -> anyhow::Result<Proc> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let child = start(launch, name, &args, false)?;
    Ok(Proc {
        name: name.to_string(),
        args,
        child,
        exit_told: false,
        started: Instant::now(),
        restarts: 0,
        quick_exits: 0,
        restart_at: None,
    })
}

/// Starts the process `name`, its stderr to `var/log/<name>.log` (appended to when
/// `again`, so the log of the run that ended stays).
fn start(launch: &Launch, name: &str, args: &[String], again: bool) -> anyhow::Result<Child> {
    let mut cmd = Command::new(&launch.exe);
    cmd.arg("--config").arg(&launch.config_path);
    if let Some(format) = launch.log_format {
        cmd.args(["--log-format", format]);
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Own process group: Ctrl-C reaches only `kairos up`, which then stops the
        // children in order.
        .process_group(0);
    let log_dir = PathBuf::from("var/log");
    std::fs::create_dir_all(&log_dir)?;
    let log_path = log_dir.join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(again)
        .truncate(!again)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    cmd.stderr(log);
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGTERM the child
    // if `kairos up` dies without stopping it, so no process is left behind.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)
                .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
        });
    }
    cmd.spawn().with_context(|| format!("cannot start {name}"))
}

fn stop(p: &mut Proc, grace: Duration) {
    ask_to_stop(p);
    wait_or_kill(p, grace);
}

/// SIGTERM: the process finishes its in-flight work and exits. Sent once: a second
/// signal makes a service exit at once, without that.
fn ask_to_stop(p: &mut Proc) {
    if let Ok(None) = p.child.try_wait() {
        let _ = kill(Pid::from_raw(p.child.id() as i32), Signal::SIGTERM);
    }
}

/// Waits `grace` for the process to exit after [`ask_to_stop`], then kills it.
/// Returns whether it stopped on its own, with a success status.
fn wait_or_kill(p: &mut Proc, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = p.child.try_wait() {
            if !status.success() {
                eprintln!(
                    "{} stopped with {status}; see var/log/{}.log",
                    p.name, p.name
                );
            }
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{} did not stop within {grace:?}; killing it", p.name);
    let _ = p.child.kill();
    let _ = p.child.wait();
    false
}

/// Reports (once) the processes that exited while they should be running.
fn note_exits<'a>(procs: impl Iterator<Item = &'a mut Proc>, failed: &mut Vec<String>) {
    for p in procs.filter(|p| !p.exit_told) {
        if let Ok(Some(status)) = p.child.try_wait() {
            eprintln!("{} exited ({status}); see var/log/{}.log", p.name, p.name);
            p.exit_told = true;
            if !failed.contains(&p.name) {
                failed.push(p.name.clone());
            }
        }
    }
}

/// Starts again the services that exited while they should be running, after a wait
/// that doubles while they keep exiting: their state is in their stores and their
/// place in the topics in their committed offsets, so one killed or crashed carries on
/// where it stopped, with the ids it would have given (each exit is reported, and the
/// run fails at its end). A service that cannot be started again is left stopped.
fn restart_exited(launch: &Launch, procs: &mut [Proc], failed: &mut Vec<String>) {
    let now = Instant::now();
    for p in procs.iter_mut().filter(|p| !p.exit_told) {
        match p.restart_at {
            None => {
                let Ok(Some(status)) = p.child.try_wait() else {
                    continue;
                };
                if now.duration_since(p.started) >= RESTART_DELAY_RESET {
                    p.quick_exits = 0;
                }
                let delay = RESTART_DELAY_FIRST
                    .saturating_mul(1 << p.quick_exits.min(5))
                    .min(RESTART_DELAY_MAX);
                p.quick_exits += 1;
                eprintln!(
                    "{} exited ({status}); see var/log/{}.log; starting it again in {}s",
                    p.name,
                    p.name,
                    delay.as_secs()
                );
                if !failed.contains(&p.name) {
                    failed.push(p.name.clone());
                }
                p.restart_at = Some(now + delay);
            }
            Some(at) if at <= now => match start(launch, &p.name, &p.args, true) {
                Ok(child) => {
                    p.child = child;
                    p.started = now;
                    p.restarts += 1;
                    p.restart_at = None;
                    eprintln!("{} started again (restart {})", p.name, p.restarts);
                }
                Err(e) => {
                    eprintln!(
                        "{} could not be started again ({e:#}): left stopped",
                        p.name
                    );
                    p.exit_told = true;
                    p.restart_at = None;
                }
            },
            Some(_) => {}
        }
    }
}

/// What `kairos up` refuses to run with: it starts its own broker and clears its
/// state directory, so a configuration naming a cluster (a production one, or
/// `KAIROS__KAFKA__BOOTSTRAP_SERVERS` left in the shell) would send generated traffic
/// there and wipe that deployment's state.
pub fn preflight(config: &Config) -> anyhow::Result<()> {
    if !config.kafka.bootstrap_servers.trim().is_empty() {
        bail!(
            "kafka.bootstrap_servers is set ({}): `kairos up` runs the pipeline on its own \
             embedded broker, with generated traffic, and clears state.dir ({}) first; \
             unset it (and KAIROS__KAFKA__BOOTSTRAP_SERVERS) to run the demo, or start \
             the services one by one against that cluster",
            config.kafka.bootstrap_servers,
            config.state.dir.display()
        );
    }
    Ok(())
}

/// The run's result from the processes that did not end well: those that exited
/// before the stop, and those that had to be killed at it.
fn outcome(failed: &[String]) -> anyhow::Result<()> {
    if failed.is_empty() {
        return Ok(());
    }
    bail!(
        "{} did not run to a clean stop; see var/log/",
        failed.join(", ")
    )
}

pub async fn run(
    config_path: PathBuf,
    config: Arc<Config>,
    rate: Option<f64>,
    log_format: Option<&'static str>,
) -> anyhow::Result<()> {
    preflight(&config)?;
    // A second `kairos up` on the same files would clear the first one's state under
    // its running stores and truncate its logs: one at a time. The lock goes with
    // the process, however it ends.
    let mut lock_path = config.state.dir.clone().into_os_string();
    lock_path.push(".up-lock");
    let lock_path = PathBuf::from(lock_path);
    if let Some(parent) = lock_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("cannot create {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "another `kairos up` runs on {} (it, or a service it started, holds {}): stop it first",
            config.state.dir.display(),
            lock_path.display()
        );
    }
    // Inherited by every process started from here, so the lock lasts until the last
    // of them exits: killed outright, `kairos up` leaves its services stopping for
    // a while on their stores, which a second one must not clear under them.
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&lock),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .with_context(|| format!("cannot hand {} on to the services", lock_path.display()))?;
    let launch = Launch {
        exe: std::env::current_exe().context("cannot find the kairos executable")?,
        config_path,
        log_format,
    };
    // The embedded broker keeps topics in memory, so state from an earlier run would
    // point at offsets that no longer exist: start clean.
    if config.state.dir.exists() {
        std::fs::remove_dir_all(&config.state.dir)
            .with_context(|| format!("cannot clear {}", config.state.dir.display()))?;
    }
    let _ = std::fs::remove_file(&config.kafka.broker_address_file);
    let cancel = kairos_core::shutdown_token();

    let mut broker = spawn(&launch, "dev-broker", &["dev-broker"])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if cancel.is_cancelled() {
            stop(&mut broker, Duration::from_secs(2));
            println!("stopped before the services started");
            return Ok(());
        }
        if config.kafka.broker_address_file.exists() {
            break;
        }
        if Instant::now() > deadline || matches!(broker.child.try_wait(), Ok(Some(_))) {
            stop(&mut broker, Duration::from_secs(2));
            bail!("the embedded broker did not start; see var/log/dev-broker.log");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bootstrap = std::fs::read_to_string(&config.kafka.broker_address_file)?;
    println!("embedded broker at {}", bootstrap.trim());

    let mut endpoints: BTreeMap<String, String> = BTreeMap::new();
    let mut services = Vec::new();
    if config.identity.enabled {
        services.push(spawn(&launch, "identity", &["identity"])?);
        endpoints.insert("identity".into(), config.identity.admin_listen.to_string());
    }
    services.push(spawn(&launch, "profile", &["profile"])?);
    endpoints.insert("profile".into(), config.profile.admin_listen.to_string());
    services.push(spawn(&launch, "catalog", &["catalog"])?);
    endpoints.insert("catalog".into(), config.catalog.admin_listen.to_string());
    services.push(spawn(&launch, "arbiter", &["arbiter"])?);
    endpoints.insert("arbiter".into(), config.arbiter.admin_listen.to_string());
    for (channel, settings) in &config.delivery {
        let name = format!("deliver-{channel}");
        services.push(spawn(
            &launch,
            &name,
            &["deliver", "--channel", channel.as_str()],
        )?);
        endpoints.insert(name, settings.admin_listen.to_string());
    }
    services.push(spawn(&launch, "feedback", &["feedback"])?);
    endpoints.insert("feedback".into(), config.feedback.admin_listen.to_string());
    let rate_arg = rate.unwrap_or(config.generator.rate).to_string();
    let mut generator = spawn(&launch, "generator", &["generate", "--rate", &rate_arg])?;

    println!("services started; logs in var/log/, metrics at:");
    for (name, addr) in &endpoints {
        println!("  {name:<18} http://{addr}/metrics");
    }
    println!("generating {rate_arg} events/s; Ctrl-C stops everything\n");

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let started = Instant::now();
    // Processes that exited before the stop, or had to be killed at it.
    let mut failed: Vec<String> = Vec::new();
    // Exits are looked at every second, the summary printed every fifth.
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            // A stop asked for wins over a tick ready at the same time: nothing is
            // started again as everything stops.
            biased;
            _ = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        ticks += 1;
        // The broker keeps its topics in memory: one started again would have none of
        // what the services committed, so its exit ends the run.
        note_exits(std::iter::once(&mut broker), &mut failed);
        if broker.exit_told {
            eprintln!("the embedded broker is gone: stopping everything");
            break;
        }
        restart_exited(&launch, &mut services, &mut failed);
        restart_exited(&launch, std::slice::from_mut(&mut generator), &mut failed);
        if !ticks.is_multiple_of(5) {
            continue;
        }
        let mut scraped: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
        for (name, addr) in &endpoints {
            if let Ok(resp) = http.get(format!("http://{addr}/metrics")).send().await {
                if let Ok(text) = resp.text().await {
                    scraped.insert(name.clone(), parse_samples(&text));
                }
            }
        }
        print_summary(started.elapsed(), &scraped);
    }

    // One that died since the last look did not stop when asked either; one waiting
    // to be started again stays stopped.
    for p in services.iter_mut().chain([&mut broker, &mut generator]) {
        if p.restart_at.take().is_some() {
            p.exit_told = true;
        }
    }
    note_exits(
        services.iter_mut().chain([&mut broker, &mut generator]),
        &mut failed,
    );
    println!("\nstopping: generator, services, broker");
    let mut stopped = |p: &mut Proc, grace: Duration| {
        // Gone before the stop: told already.
        if p.exit_told {
            return;
        }
        if !wait_or_kill(p, grace) && !failed.contains(&p.name) {
            failed.push(p.name.clone());
        }
    };
    ask_to_stop(&mut generator);
    stopped(&mut generator, Duration::from_secs(10));
    // All at once, so they wind down side by side.
    for p in services.iter_mut() {
        ask_to_stop(p);
    }
    for p in services.iter_mut() {
        stopped(p, Duration::from_secs(35));
    }
    ask_to_stop(&mut broker);
    stopped(&mut broker, Duration::from_secs(10));
    println!("all processes stopped");
    outcome(&failed)
}

/// `(series, value)` pairs from Prometheus text.
fn parse_samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Sum of the samples of `metric` whose labels contain every `filter` (`key="value"`).
fn sum(samples: Option<&Vec<(String, f64)>>, metric: &str, filters: &[&str]) -> f64 {
    samples
        .map(|s| {
            s.iter()
                .filter(|(series, _)| {
                    let name = series.split('{').next().unwrap_or("");
                    name == metric && filters.iter().all(|f| series.contains(f))
                })
                .map(|(_, v)| v)
                .sum::<f64>()
                + 0.0 // no "-0" for empty sums
        })
        .unwrap_or(0.0)
}

/// Customer events the profile read (site, app and till): not every record it reads,
/// which counts outcomes and occasions too.
fn customer_events(profile: Option<&Vec<(String, f64)>>) -> f64 {
    sum(profile, "kairos_profile_events_total", &[])
}

fn print_summary(elapsed: Duration, m: &BTreeMap<String, Vec<(String, f64)>>) {
    let profile = m.get("profile");
    let arbiter = m.get("arbiter");
    let feedback = m.get("feedback");
    let events_in = customer_events(profile);
    let triggers = sum(profile, "kairos_output_records_total", &["triggers\""]);
    let d = |o: &str| {
        sum(
            arbiter,
            "kairos_arbiter_decisions_total",
            &[&format!("outcome=\"{o}\"")],
        )
    };
    let sends: Vec<String> = m
        .keys()
        .filter_map(|name| name.strip_prefix("deliver-"))
        .map(|c| {
            format!(
                "{c} {}",
                // Its send topic only: a worker also reads outcomes and customer
                // actions, for consent withdrawn after a decision.
                sum(
                    m.get(&format!("deliver-{c}")),
                    "kairos_input_records_total",
                    &[&format!("send.{c}\"")]
                )
            )
        })
        .collect();
    let o = |k: &str| {
        sum(
            feedback,
            "kairos_message_outcomes_total",
            &[&format!("kind=\"{k}\"")],
        )
    };
    let dead: f64 = m
        .values()
        .map(|s| sum(Some(s), "kairos_dead_letters_total", &[]))
        .sum();
    let delivered = o("delivered");
    let rate = |x: f64, of: f64| if of > 0.0 { 100.0 * x / of } else { 0.0 };
    println!(
        "[{:>4}s] events in {:.0} | triggers {:.0} | decisions: sent {:.0}, held out {:.0}, suppressed {:.0}, expired {:.0} | sends: {} | outcomes: sent {:.0}, delivered {:.0}, opened {:.0} ({:.1}%), clicked {:.0}, bounced {:.0}, unsubscribed {:.0} | dead letters {:.0}",
        elapsed.as_secs(),
        events_in,
        triggers,
        d("sent"),
        d("held_out"),
        d("suppressed"),
        d("expired"),
        sends.join(", "),
        o("sent"),
        delivered,
        o("opened"),
        rate(o("opened"), delivered),
        o("clicked"),
        o("bounced_hard") + o("bounced_soft"),
        o("unsubscribed"),
        dead
    );
    let group = |metric: &str, g: &str| sum(feedback, metric, &[&format!("group=\"{g}\"")]);
    let conversion_rate = |g: &str| {
        rate(
            group("kairos_scenario_conversions_total", g),
            group("kairos_attribution_touches_total", g),
        )
    };
    if let Some(identity) = m.get("identity") {
        let resolved = |r: &str| {
            sum(
                Some(identity),
                "kairos_identity_events_total",
                &[&format!("resolution=\"{r}\"")],
            )
        };
        let merges = |k: &str| {
            sum(
                Some(identity),
                "kairos_identity_merges_total",
                &[&format!("kind=\"{k}\"")],
            )
        };
        println!(
            "        identity: by customer id {:.0}, by a linked identifier {:.0}, new profiles {:.0} | anonymous profiles joined a customer {:.0}, customers merged {:.0}",
            resolved("customer_id"),
            resolved("linked"),
            resolved("new"),
            merges("stitch"),
            merges("merge"),
        );
    }
    let (treated, control) = (conversion_rate("treatment"), conversion_rate("control"));
    let lift = if control > 0.0 {
        format!("{:+.1}%", 100.0 * (treated / control - 1.0))
    } else {
        "n/a (no control conversions yet)".to_string()
    };
    println!(
        "        conversions: treatment {:.0} of {:.0} touches ({treated:.1}%), control {:.0} of {:.0} ({control:.1}%), lift {lift} | revenue via CRM (last touch) {:.0} of {:.0}",
        group("kairos_scenario_conversions_total", "treatment"),
        group("kairos_attribution_touches_total", "treatment"),
        group("kairos_scenario_conversions_total", "control"),
        group("kairos_attribution_touches_total", "control"),
        // Messages sent only: a treated customer's trigger that sent nothing (channel
        // "none") counts for lift, not as revenue via CRM.
        group("kairos_conversion_revenue_total", "treatment")
            - sum(
                feedback,
                "kairos_conversion_revenue_total",
                &["group=\"treatment\"", "channel=\"none\""]
            ),
        sum(feedback, "kairos_purchase_revenue_total", &[]),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration naming a cluster is refused before anything is started or
    /// cleared; the run fails when a process did not stop cleanly, naming it.
    #[test]
    fn up_refuses_a_cluster_and_fails_when_a_process_did_not_stop_cleanly() {
        let parse = |text: &str| {
            Config::from_text(std::path::Path::new("t.toml"), text, &[]).expect("config")
        };
        let err =
            preflight(&parse("[kafka]\nbootstrap_servers = \"prod:9092\"\n")).expect_err("refused");
        assert!(err.to_string().contains("bootstrap_servers"), "{err}");
        assert!(err.to_string().contains("prod:9092"), "{err}");
        preflight(&parse("")).expect("the embedded broker's configuration");

        outcome(&[]).expect("every process stopped cleanly");
        let err = outcome(&["deliver-sms".into(), "arbiter".into()]).expect_err("failed");
        assert!(err.to_string().contains("deliver-sms, arbiter"), "{err}");
    }

    #[test]
    fn events_in_counts_customer_events_not_outcomes() {
        let profile: Vec<(String, f64)> = [
            (
                r#"kairos_profile_events_total{source="site",type="page_view"}"#,
                40.0,
            ),
            (
                r#"kairos_profile_events_total{source="offline",type="sale"}"#,
                2.0,
            ),
            (
                r#"kairos_input_records_total{topic="kairos.identified-events"}"#,
                42.0,
            ),
            (
                r#"kairos_input_records_total{topic="kairos.outcomes"}"#,
                30.0,
            ),
            (
                r#"kairos_input_records_total{topic="kairos.occasions"}"#,
                5.0,
            ),
        ]
        .into_iter()
        .map(|(series, v)| (series.to_string(), v))
        .collect();
        assert_eq!(customer_events(Some(&profile)), 42.0);
    }
}
