//! Provider-side helpers of the delivery tests: a real SMTP server (aiosmtpd) that
//! keeps every accepted message, send commands as the arbiter writes them, and the
//! e-mail worker's settings against that server.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{json as j, Value};

use crate::{free_port, json, now_millis, repo_root, Pipeline};

/// The aiosmtpd server of `tests/support/smtp_sink.py`, one file per accepted message.
pub struct SmtpSink {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl SmtpSink {
    pub fn start(dir: &Path) -> SmtpSink {
        let out = dir.join("mail");
        // The port is chosen before the server binds it, and another socket can take
        // it in between: a server that exits instead of listening gets another port.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new("/usr/bin/python3")
                .args(["-m", "aiosmtpd", "-n", "-l"])
                .arg(format!("127.0.0.1:{port}"))
                .args(["-c", "smtp_sink.Sink"])
                .arg(&out)
                .args(["2", "3"])
                .env("PYTHONPATH", repo_root().join("tests/support"))
                .spawn()
                .expect("start aiosmtpd (make test installs python3-aiosmtpd)");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                // Its greeting, not a bare connection: another process's listener may
                // hold the port while this server exits.
                if smtp_greets(port) {
                    return SmtpSink {
                        child,
                        port,
                        dir: out,
                    };
                }
                if child.try_wait().expect("aiosmtpd status").is_some() {
                    break;
                }
                assert!(Instant::now() < deadline, "SMTP server did not listen");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("SMTP server exited five times without listening");
    }

    /// Every accepted message as (headers, body).
    pub fn messages(&self) -> Vec<(BTreeMap<String, String>, String)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .map(|p| {
                let text = std::fs::read_to_string(&p).expect("message file");
                let text = text.replace("\r\n", "\n");
                let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
                let mut headers = BTreeMap::new();
                let mut last = String::new();
                for line in head.lines() {
                    if line.starts_with([' ', '\t']) {
                        if let Some(v) = headers.get_mut(&last) {
                            *v = format!("{v} {}", line.trim());
                        }
                    } else if let Some((k, v)) = line.split_once(':') {
                        last = k.trim().to_ascii_lowercase();
                        headers.insert(last.clone(), v.trim().to_string());
                    }
                }
                (headers, body.to_string())
            })
            .collect()
    }

    /// How many messages arrived per send id.
    pub fn send_id_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for (headers, _) in self.messages() {
            let id = headers
                .get("x-kairos-send-id")
                .cloned()
                .expect("every message carries its send id");
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }
}

/// Whether an SMTP server answers on `port` with its `220` greeting.
fn smtp_greets(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut greeting = [0u8; 3];
    stream.read_exact(&mut greeting).is_ok() && &greeting == b"220"
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A send command for `channel` as the arbiter writes it, valid for an hour.
pub fn send_command(
    send_id: &str,
    channel: &str,
    address: &str,
    template: &str,
    variables: Value,
) -> Vec<u8> {
    let now = now_millis();
    json(j!({
        "send_id": send_id,
        "trigger_id": format!("t-{send_id}"),
        "customer_id": format!("c-{send_id}"),
        "scenario": "abandoned_cart",
        "channel": channel,
        "category": "trigger",
        "template": template,
        "address": address,
        "variables": variables.to_string(),
        "created_at": now,
        "valid_until": now + 3_600_000,
        "cause_occurred_at": now,
        "reasons": ["test"],
    }))
}

/// Template variables of a one-item cart.
pub fn cart_variables() -> Value {
    j!({"first_name": "Anna", "cart_items": [{"product_id": "p1", "name": "Red shoes", "quantity": 1, "unit_price": 59.9}], "cart_value": 59.9})
}

/// The latest outcome kind (and reason) per send id, once `want` send ids have a final
/// one (sent, failed or bounced hard).
/// (A hard bounce at the provider's door is reported `sent`, then `bounced_hard`: a
/// caller expecting one waits for the bounce first.)
pub fn final_outcomes(
    p: &Pipeline,
    want: usize,
    timeout: Duration,
) -> BTreeMap<String, (String, String)> {
    let terminal = ["sent", "failed", "bounced_hard"];
    let records = p.read_json_until("outcomes", timeout, |v| {
        v.iter()
            .filter(|o| terminal.contains(&o["kind"].as_str().unwrap_or("")))
            .map(|o| o["send_id"].as_str().unwrap_or(""))
            .collect::<BTreeSet<_>>()
            .len()
            >= want
    });
    records
        .iter()
        .filter(|o| terminal.contains(&o["kind"].as_str().unwrap_or("")))
        .map(|o| {
            (
                o["send_id"].as_str().unwrap_or("").to_string(),
                (
                    o["kind"].as_str().unwrap_or("").to_string(),
                    o["reason"].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect()
}

/// The e-mail worker against the SMTP server on `smtp_port`: headers, a 5 s timeout,
/// four attempts with short backoffs, a deferred recipient tried again after 1 s and
/// then 2 s, and a breaker that opens only after 50 failures.
pub fn email_worker_env(smtp_port: u16) -> Vec<(String, String)> {
    [
        ("KAIROS__DELIVERY__EMAIL__PROVIDER", "smtp".to_string()),
        ("KAIROS__DELIVERY__EMAIL__SMTP__HOST", "127.0.0.1".into()),
        ("KAIROS__DELIVERY__EMAIL__SMTP__PORT", smtp_port.to_string()),
        (
            "KAIROS__DELIVERY__EMAIL__SMTP__FROM",
            "Shop <news@shop.example>".into(),
        ),
        (
            "KAIROS__DELIVERY__EMAIL__SMTP__REPLY_TO",
            "care@shop.example".into(),
        ),
        (
            "KAIROS__DELIVERY__EMAIL__SMTP__LIST_UNSUBSCRIBE",
            "https://shop.example/unsubscribe?c={customer_id}&s={send_id}".into(),
        ),
        // No test's server is slow on purpose: the timeout only has to be well above
        // a loaded machine's answer (the counts of attempts are asserted exactly).
        ("KAIROS__DELIVERY__EMAIL__SMTP__TIMEOUT", "5s".into()),
        ("KAIROS__DELIVERY__EMAIL__RETRY__MAX_ATTEMPTS", "4".into()),
        (
            "KAIROS__DELIVERY__EMAIL__RETRY__INITIAL_BACKOFF",
            "50ms".into(),
        ),
        (
            "KAIROS__DELIVERY__EMAIL__RETRY__MAX_BACKOFF",
            "200ms".into(),
        ),
        (
            "KAIROS__DELIVERY__EMAIL__CIRCUIT_BREAKER__FAILURE_THRESHOLD",
            "50".into(),
        ),
        // A recipient's server that puts a send off is asked again in seconds, not
        // the minutes greylisting wants.
        (
            "KAIROS__DELIVERY__EMAIL__RETRY__DEFERRAL_BACKOFF",
            "1s".into(),
        ),
        (
            "KAIROS__DELIVERY__EMAIL__RETRY__DEFERRAL_MAX_BACKOFF",
            "2s".into(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}
