//! `kairos up` (what `make run` starts) as a process: the embedded broker, every
//! service and the generator, then Ctrl-C.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kairos_tests::{free_port_outside_ephemeral_range, kairos_bin, repo_root};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Copies the directory `from` into `to`, recursively.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// The number after `label` in a summary line ("decisions: sent 12, ...").
fn number_after(line: &str, label: &str) -> Option<u64> {
    let rest = &line[line.find(label)? + label.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// One `kairos up` at a time: each is a whole pipeline of a dozen processes, and the
/// machines running the tests have two cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `kairos up` at 100 events per second in `dir`, on its `config/kairos.toml`.
fn up_command(dir: &Path) -> Command {
    let mut up = Command::new(kairos_bin());
    up.current_dir(dir)
        .args(["--config", "config/kairos.toml", "up", "--rate", "100"])
        .stdin(Stdio::null());
    up
}

/// Starts `kairos up` in `dir` on a copy of the shipped configuration (each service on
/// a free admin port), with `more_args`, and the lines it writes (stdout and stderr).
fn start_up(dir: &Path, more_args: &[&str]) -> (std::process::Child, mpsc::Receiver<String>) {
    copy_dir(&repo_root().join("config"), &dir.join("config"));
    // The shipped configuration's admin ports are those of a `make run` that may be
    // going on this machine: each service gets a free one instead.
    let config_file = dir.join("config/kairos.toml");
    let shipped = std::fs::read_to_string(&config_file).expect("config");
    let own_ports: Vec<String> = shipped
        .lines()
        .map(
            |line| match line.trim_start().strip_prefix("admin_listen = ") {
                Some(_) => format!(
                    "admin_listen = \"127.0.0.1:{}\"",
                    free_port_outside_ephemeral_range()
                ),
                None => line.to_string(),
            },
        )
        .collect();
    std::fs::write(&config_file, own_ports.join("\n") + "\n").expect("config");
    let mut up = up_command(dir)
        .args(more_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kairos up");
    let (lines_tx, lines) = mpsc::channel();
    let stdout = up.stdout.take().expect("stdout");
    let stderr = up.stderr.take().expect("stderr");
    let errors_tx = lines_tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    // What `up` reports on stderr (a process that exited, or was killed at the stop)
    // goes with the rest.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = errors_tx.send(line);
        }
    });
    (up, lines)
}

#[test]
fn kairos_up_sends_messages_and_stops_every_service_gracefully() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut up, lines) = start_up(dir.path(), &[]);
    let mut seen = Vec::new();
    wait_for_a_send(
        &lines,
        &mut seen,
        Duration::from_secs(180),
        "a message sent",
    );
    // A second `up` on the same files is turned away before it clears anything.
    let second = up_command(dir.path())
        .output()
        .expect("run a second kairos up");
    let told = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && told.contains("another `kairos up` runs"),
        "{}: {told}",
        second.status
    );
    kill(Pid::from_raw(up.id() as i32), Signal::SIGINT).expect("Ctrl-C");
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = up.try_wait().expect("poll kairos up") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = up.kill();
            panic!("kairos up did not stop:\n{}", seen.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    read_to_the_end(&lines, &mut seen);
    let output = seen.join("\n");
    assert!(status.success(), "{status}:\n{output}");
    assert!(
        output.contains("all processes stopped")
            && !output.contains("did not stop")
            && !output.contains("exited ("),
        "{output}"
    );
    // Each service was asked once and finished its in-flight work: a second signal
    // makes it exit at once, without that.
    let config = std::fs::read_to_string(dir.path().join("config/kairos.toml")).expect("config");
    let workers = ["email", "sms", "push", "in_app", "messenger"]
        .into_iter()
        .filter(|c| config.contains(&format!("[delivery.{c}]")))
        .map(|c| format!("deliver-{c}"));
    let services = ["identity", "profile", "catalog", "arbiter", "feedback"]
        .into_iter()
        .map(String::from)
        .chain(workers)
        .collect::<Vec<_>>();
    assert!(services.len() > 6, "{services:?}");
    for service in &services {
        let log = std::fs::read_to_string(dir.path().join(format!("var/log/{service}.log")))
            .unwrap_or_else(|e| panic!("{service}'s log: {e}"));
        assert!(log.contains("shutdown requested"), "{service}:\n{log}");
        assert!(log.contains("stopped cleanly"), "{service}:\n{log}");
        assert!(!log.contains("second signal"), "{service}:\n{log}");
        assert!(!log.contains("ERROR"), "{service}:\n{log}");
    }
}

/// The pid of the child of `up` started with the argument `service`.
fn child_running(up: &std::process::Child, service: &str) -> Option<i32> {
    let up_pid = up.id();
    std::fs::read_to_string(format!("/proc/{up_pid}/task/{up_pid}/children"))
        .ok()?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|pid: &i32| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.split('\0').any(|arg| arg == service))
        })
}

/// The lines `kairos up` writes after it exited, into `seen` (both readers end with
/// the pipes).
fn read_to_the_end(lines: &mpsc::Receiver<String>, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        seen.push(line);
    }
}

/// Waits for a summary that counts a message sent (`what`, in the failure).
fn wait_for_a_send(
    lines: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    within: Duration,
    what: &str,
) {
    wait_for_line(lines, seen, within, what, |l| {
        number_after(l, "decisions: sent ").is_some_and(|n| n > 0)
    });
}

/// Waits for a line that `is_it`, keeping every line read in `seen`.
fn wait_for_line(
    lines: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    within: Duration,
    what: &str,
    is_it: impl Fn(&str) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("{what} did not come in time:\n{}", seen.join("\n")));
        let found = is_it(&line);
        seen.push(line);
        if found {
            return;
        }
    }
}

/// A service that dies (here the arbiter, killed with SIGKILL) is started again by
/// `kairos up` and carries on from its store; the run reports it and fails at the end.
#[test]
fn kairos_up_starts_a_killed_service_again() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut up, lines) = start_up(dir.path(), &[]);
    let mut seen = Vec::new();
    wait_for_a_send(
        &lines,
        &mut seen,
        Duration::from_secs(180),
        "a message sent",
    );
    let arbiter = child_running(&up, "arbiter").expect("the arbiter of kairos up");
    kill(Pid::from_raw(arbiter), Signal::SIGKILL).expect("kill the arbiter");
    wait_for_line(
        &lines,
        &mut seen,
        Duration::from_secs(30),
        "the restart",
        |l| l.contains("arbiter started again (restart 1)"),
    );
    let restarted = child_running(&up, "arbiter").expect("the arbiter started again");
    assert_ne!(restarted, arbiter);
    // The summary reads the new arbiter's counters, which begin at zero: a message
    // sent is one it decided.
    wait_for_a_send(
        &lines,
        &mut seen,
        Duration::from_secs(150),
        "a message sent by the arbiter started again",
    );
    kill(Pid::from_raw(up.id() as i32), Signal::SIGINT).expect("Ctrl-C");
    let status = up.wait().expect("kairos up's exit");
    read_to_the_end(&lines, &mut seen);
    let output = seen.join("\n");
    assert!(!status.success(), "a run with a crash passed:\n{output}");
    assert!(
        output.contains("arbiter exited (signal: 9")
            && output.contains("arbiter did not run to a clean stop")
            && !output.contains("did not stop within"),
        "{output}"
    );
    // Its log keeps both runs: the killed one's start, and the new one's clean stop.
    let log = std::fs::read_to_string(dir.path().join("var/log/arbiter.log")).expect("log");
    assert_eq!(log.matches("processing started").count(), 2, "{log}");
    assert!(log.contains("stopped cleanly"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

/// Killed outright, `kairos up` leaves its services stopping on their stores: the lock
/// on its state lasts until the last of them exits, so a second one does not clear the
/// stores under them. (One service is held stopped meanwhile, so the check does not
/// race its exit.)
#[test]
fn a_killed_up_s_services_keep_its_lock_until_they_exit() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // The killed `kairos up`'s services become this process's children, not init's:
    // their process groups then keep a parent in this session, so they are not orphaned
    // and the held one is not hung up on (SIGHUP, then SIGCONT) as `kairos up` dies.
    nix::sys::prctl::set_child_subreaper(true).expect("become a child subreaper");
    let dir = tempfile::tempdir().expect("temp dir");
    // Its services log in the format it was given.
    let (mut up, lines) = start_up(dir.path(), &["--log-format", "json"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("services started")) {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("the services did not start:\n{}", seen.join("\n")));
        seen.push(line);
    }
    // Some services have logged (in JSON, checked at the end) before `kairos up` dies:
    // one killed before it installed its logging would have left nothing to check.
    const LOGGED: [&str; 3] = ["profile", "arbiter", "deliver-email"];
    let logged = |service: &str| {
        std::fs::read_to_string(dir.path().join(format!("var/log/{service}.log")))
            .is_ok_and(|log| log.lines().count() > 1)
    };
    while !LOGGED.iter().all(|s| logged(s)) {
        assert!(
            Instant::now() < deadline,
            "the services did not log in time"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let up_pid = up.id();
    let children: Vec<i32> =
        std::fs::read_to_string(format!("/proc/{up_pid}/task/{up_pid}/children"))
            .expect("the children of kairos up")
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
    let state = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("State:").map(|s| s.trim().to_string()))
            .unwrap_or_default()
    };
    // One service is held stopped before `kairos up` dies: the SIGTERM its death sends
    // waits until the service is let go.
    let held = children
        .iter()
        .find_map(|&pid| {
            kill(Pid::from_raw(pid), Signal::SIGSTOP).ok()?;
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                match state(pid) {
                    s if s.starts_with('T') => return Some(Pid::from_raw(pid)),
                    s if s.is_empty() || s.starts_with('Z') => return None,
                    _ => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            None
        })
        .expect("a running service of kairos up to hold");
    up.kill().expect("kill kairos up");
    let _ = up.wait();
    assert!(
        state(held.as_raw()).starts_with('T'),
        "the held service ran on as kairos up died: {}",
        state(held.as_raw())
    );
    let mut second = up_command(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run a second kairos up");
    // Refused at once; one that got the lock would run on: stopped, and failed.
    let deadline = Instant::now() + Duration::from_secs(20);
    while second
        .try_wait()
        .expect("poll the second kairos up")
        .is_none()
    {
        if Instant::now() > deadline {
            let _ = kill(Pid::from_raw(second.id() as i32), Signal::SIGINT);
            let _ = kill(held, Signal::SIGCONT);
            let output = second
                .wait_with_output()
                .expect("the second kairos up's output");
            panic!(
                "a second kairos up started beside the killed one's services: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let second = second
        .wait_with_output()
        .expect("the second kairos up's output");
    let _ = kill(held, Signal::SIGCONT);
    let told = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && told.contains("another `kairos up` runs"),
        "{}: {told}",
        second.status
    );
    // Let go, the service stops (its parent is gone), and with the last one the lock.
    let lock = std::fs::File::open(dir.path().join("var/state.up-lock")).expect("the lock file");
    let deadline = Instant::now() + Duration::from_secs(60);
    while lock.try_lock().is_err() {
        if Instant::now() > deadline {
            let running: Vec<String> = children
                .iter()
                .map(|pid| {
                    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                        .unwrap_or_default()
                        .replace('\0', " ");
                    format!("{pid} {} {cmdline}", state(*pid))
                })
                .collect();
            for child in &children {
                let _ = kill(Pid::from_raw(*child), Signal::SIGKILL);
            }
            let broker = std::fs::read_to_string(dir.path().join("var/log/dev-broker.log"));
            panic!("the services of the killed kairos up still hold its lock: {running:#?}\nbroker: {broker:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The services exit as this process's children: reaped, so none is left a zombie
    // (and none left running).
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let deadline = Instant::now() + Duration::from_secs(30);
    for child in children.iter().map(|&pid| Pid::from_raw(pid)) {
        while let Ok(WaitStatus::StillAlive) = waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            if Instant::now() > deadline {
                let _ = kill(child, Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    nix::sys::prctl::set_child_subreaper(false).expect("stop being a child subreaper");
    for service in LOGGED {
        let log = std::fs::read_to_string(dir.path().join(format!("var/log/{service}.log")))
            .unwrap_or_else(|e| panic!("{service}'s log: {e}"));
        for line in log.lines() {
            let record: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("{service} logged a line that is no JSON ({e}): {line}")
            });
            assert!(record["level"].is_string(), "{service}: {line}");
        }
    }
}
