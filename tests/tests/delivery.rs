//! Delivery workers against real providers: a real SMTP server process (aiosmtpd) and
//! a real HTTP server, both misbehaving on request (5xx, 4xx, timeouts, slow answers).
//! The workers run as real processes on the real broker. The SIGKILL test of the e-mail
//! worker is in the resilience test binary, beside the other crash tests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kairos_tests::delivery::{
    cart_variables, email_worker_env, final_outcomes, send_command, SmtpSink,
};
use kairos_tests::{json, now_millis, Options, Pipeline};
use serde_json::{json as j, Value};

#[test]
fn smtp_sends_once_retries_transient_errors_and_never_retries_permanent_ones() {
    let dir = tempfile::tempdir().expect("temp dir");
    let smtp = SmtpSink::start(dir.path());
    let p = Pipeline::start(Options {
        services: vec!["deliver-email"],
        env: email_worker_env(smtp.port),
        ..Options::default()
    });
    let cart = cart_variables();
    let mut commands = vec![
        ("ok-1", "anna@example.com", "abandoned_cart", cart.clone()),
        ("ok-2", "ben@example.com", "abandoned_cart", cart.clone()),
        // 450 to RCPT TO twice (a greylisting server), then accepted: set aside twice,
        // for 1 s and then 2 s, not retried at once.
        (
            "temp-1",
            "tempfail1@example.com",
            "abandoned_cart",
            cart.clone(),
        ),
        // 550 at RCPT: a hard bounce, not retried.
        (
            "bounce-1",
            "bounce1@example.com",
            "abandoned_cart",
            cart.clone(),
        ),
        // 554 at DATA: permanent, not retried.
        (
            "reject-1",
            "reject1@example.com",
            "abandoned_cart",
            cart.clone(),
        ),
        // 550 after the ".": the message is refused, the address is not dead.
        (
            "spam-1",
            "spam1@example.com",
            "abandoned_cart",
            cart.clone(),
        ),
        // 451 after the ".", then no answer at all, then accepted: the refusal
        // withdrew the first attempt's commit point, so the lost answer of the
        // second is not taken for a message handed over.
        (
            "drop-1",
            "datadrop1@example.com",
            "abandoned_cart",
            cart.clone(),
        ),
        // A domain in Unicode: sent to its ASCII form, which every server takes.
        (
            "idn-1",
            "anna@bücher.example",
            "abandoned_cart",
            cart.clone(),
        ),
        // An address that does not parse: dead as a bounced one, though no server
        // was asked.
        (
            "dead-1",
            "anna@@example.com",
            "abandoned_cart",
            cart.clone(),
        ),
        // A local part in Unicode needs SMTPUTF8, which this server does not offer:
        // the message fails, and the address is not marked dead.
        ("utf-1", "иван@example.com", "abandoned_cart", cart.clone()),
        // The template needs cart_items: no send, a failed outcome.
        (
            "tpl-1",
            "carl@example.com",
            "abandoned_cart",
            j!({"first_name": "Carl"}),
        ),
    ];
    // The same command twice reaches the provider once.
    commands.push(commands[0].clone());
    let records: Vec<(String, Vec<u8>)> = commands
        .iter()
        .map(|(id, to, template, vars)| {
            (
                format!("c-{id}"),
                send_command(id, "email", to, template, vars.clone()),
            )
        })
        .collect();
    p.produce("send.email", &records);

    // A bounce at the door is reported sent, then bounced: both, before reading the
    // final ones.
    let bounced = |v: &[Value]| {
        v.iter()
            .any(|o| o["send_id"] == "bounce-1" && o["kind"] == "bounced_hard")
    };
    p.read_json_until("outcomes", Duration::from_secs(60), bounced);
    let outcomes = final_outcomes(&p, 11, Duration::from_secs(60));
    let kind = |id: &str| outcomes.get(id).map(|(k, r)| (k.as_str(), r.as_str()));
    assert_eq!(kind("ok-1").map(|k| k.0), Some("sent"), "{outcomes:?}");
    assert_eq!(kind("ok-2").map(|k| k.0), Some("sent"));
    assert_eq!(kind("temp-1").map(|k| k.0), Some("sent"));
    assert_eq!(kind("idn-1").map(|k| k.0), Some("sent"), "{outcomes:?}");
    let (k, reason) = kind("utf-1").expect("utf-1 outcome");
    assert_eq!(k, "failed", "{reason}");
    assert!(reason.contains("SMTPUTF8"), "{reason}");
    assert_eq!(kind("bounce-1").map(|k| k.0), Some("bounced_hard"));
    // Counted among the sends too, which the bounce rate is over.
    let all = p.read_all_json("outcomes");
    let of_bounce: Vec<String> = (all.iter())
        .filter(|o| o["send_id"] == "bounce-1")
        .map(|o| o["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(of_bounce, ["sent", "bounced_hard"]);
    // Each time the greylisting server put it off is told (what a cascade waits on).
    let of_greylisted: Vec<&str> = (all.iter())
        .filter(|o| o["send_id"] == "temp-1")
        .map(|o| o["kind"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(of_greylisted, ["deferred", "deferred", "sent"]);
    // The address that does not parse is dead, but no message was sent to it.
    let (k, reason) = kind("dead-1").expect("dead-1 outcome");
    assert_eq!(k, "bounced_hard", "{reason}");
    assert!(reason.starts_with("invalid_address"), "{reason}");
    assert!(!all
        .iter()
        .any(|o| o["send_id"] == "dead-1" && o["kind"] == "sent"));
    let (k, reason) = kind("reject-1").expect("reject outcome");
    assert_eq!(k, "failed");
    assert!(reason.starts_with("permanent:"), "{reason}");
    let (k, reason) = kind("spam-1").expect("spam outcome");
    assert_eq!(k, "failed", "{reason}");
    assert!(reason.contains("550"), "{reason}");
    let (k, reason) = kind("drop-1").expect("drop outcome");
    assert_eq!(k, "sent");
    assert!(!reason.contains("in_doubt"), "{reason}");
    let (k, reason) = kind("tpl-1").expect("template outcome");
    assert_eq!(k, "failed");
    assert!(
        reason.starts_with("template:") && reason.contains("cart_items"),
        "{reason}"
    );
    // And the command is on the dead-letter topic, to be produced again once fixed.
    let letters = p.read_json_until("deadletter", Duration::from_secs(20), |v| {
        v.iter().any(|l| dead_lettered_send_id(l) == "tpl-1")
    });
    let letter = letters
        .iter()
        .find(|l| dead_lettered_send_id(l) == "tpl-1")
        .expect("tpl-1 is dead-lettered");
    assert!(
        letter["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("template:"),
        "{letter}"
    );

    // The repeated ok-1 is the last record of its partition and has no outcome of its
    // own: counted only once the worker has read past it, so a second hand-over shows.
    p.wait_caught_up("deliver-email", &["send.email"], Duration::from_secs(60));
    let counts = smtp.send_id_counts();
    assert_eq!(
        counts,
        [
            ("drop-1", 1),
            ("idn-1", 1),
            ("ok-1", 1),
            ("ok-2", 1),
            ("temp-1", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect::<BTreeMap<_, _>>(),
        "exactly the deliverable sends, once each"
    );
    let (headers, body) = smtp
        .messages()
        .into_iter()
        .find(|(h, _)| h.get("x-kairos-send-id").map(String::as_str) == Some("ok-1"))
        .expect("ok-1 arrived");
    assert_eq!(headers["from"], "Shop <news@shop.example>");
    assert_eq!(headers["reply-to"], "care@shop.example");
    assert_eq!(headers["to"], "anna@example.com");
    assert_eq!(headers["subject"], "Anna, your cart is waiting");
    assert_eq!(
        headers["list-unsubscribe"],
        "<https://shop.example/unsubscribe?c=c-ok-1&s=ok-1>"
    );
    assert_eq!(headers["message-id"], "<ok-1@kairos>");
    assert!(body.contains("Red shoes x 1"), "{body}");
    let (idn, _) = smtp
        .messages()
        .into_iter()
        .find(|(h, _)| h.get("x-kairos-send-id").map(String::as_str) == Some("idn-1"))
        .expect("idn-1 arrived");
    assert_eq!(idn["x-envelope-to"], "anna@xn--bcher-kva.example");
    assert_eq!(idn["to"], "anna@xn--bcher-kva.example");

    // temp-1 went out once its server took it, the two waits it was set aside for
    // after it was first tried (its command was created just before).
    let temp_sent = all
        .iter()
        .find(|o| o["send_id"] == "temp-1" && o["kind"] == "sent")
        .expect("temp-1 sent");
    let temp_created = records
        .iter()
        .find(|(key, _)| key == "c-temp-1")
        .and_then(|(_, payload)| serde_json::from_slice::<Value>(payload).ok())
        .and_then(|command| command["created_at"].as_i64())
        .expect("temp-1's command");
    let waited = temp_sent["occurred_at"].as_i64().unwrap_or_default() - temp_created;
    assert!(waited >= 3_000, "sent {waited} ms after its command");

    // Retries at once: exactly drop-1's 451 and lost answer; temp-1's two 450s to RCPT
    // TO set it aside instead; the 550s and the 554 were not retried.
    let metrics = p.metrics("deliver-email");
    let m = |name: &str, labels: &[&str]| kairos_tests::sample(&metrics, name, labels);
    assert_eq!(m("kairos_provider_retries_total", &[]), 2.0);
    assert_eq!(m("kairos_delivery_deferred_total", &[]), 2.0);
    assert_eq!(
        m(
            "kairos_provider_requests_total",
            &["result=\"transient_error\""]
        ),
        4.0
    );
    // The 554, the 550 after the "." and the SMTPUTF8 refusal; the 550 at RCPT is
    // the address's fault, counted apart (the provider error share leaves it out).
    assert_eq!(
        m(
            "kairos_provider_requests_total",
            &["result=\"permanent_error\""]
        ),
        3.0
    );
    assert_eq!(
        m("kairos_provider_requests_total", &["result=\"bounced\""]),
        1.0
    );
    assert_eq!(
        m("kairos_provider_requests_total", &["result=\"accepted\""]),
        5.0
    );
    assert_eq!(
        m(
            "kairos_delivery_duplicate_sends_total",
            &["channel=\"email\""]
        ),
        1.0,
        "the copy of ok-1 is counted, not sent"
    );
}

/// What the HTTP provider saw.
#[derive(Default)]
struct ProviderLog {
    /// Requests per idempotency key.
    requests: BTreeMap<String, usize>,
    /// Messages handed on (a repeated key is acknowledged, not handed on again: the
    /// gateway's own idempotency, so what the worker repeats shows in `requests`).
    delivered: BTreeSet<String>,
    missing_auth: usize,
    /// Requests whose body named another send than the idempotency key.
    body_mismatches: usize,
    /// Set by a test to let the first request of a `hold-` key be answered.
    released: bool,
}

/// A real HTTP server acting as an SMS gateway. By send id prefix: `gw504-` hands the
/// message on and answers 504 (a proxy's timeout) every time, `s5xx-` answers 503
/// twice, `down-` always 503, `perm-` 400, `gone-` 410 (the number is dead) and
/// `unknown-` 404 until the test sets `released` (as a gateway without the route
/// answers, until its route is deployed), `slow-` takes 6 s the first time (longer
/// than the worker's timeout), `hold-` answers its first request (200) only once the
/// test sets `released`, `holdperm-` likewise but 400 (to every request); anything
/// else 200. Keys it already handed on are
/// acknowledged without handing them on again, as real gateways do with idempotency
/// keys.
fn start_http_provider() -> (SocketAddr, Arc<Mutex<ProviderLog>>) {
    serve_http_provider(None)
}

/// [`start_http_provider`] over TLS, with the certificate of `tests/support` (for
/// 127.0.0.1 and localhost, signed by itself).
fn start_https_provider() -> (SocketAddr, Arc<Mutex<ProviderLog>>) {
    let support = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("support");
    let read = |name: &str| std::fs::read(support.join(name)).expect("test certificate");
    let identity =
        native_tls::Identity::from_pkcs8(&read("gateway-cert.pem"), &read("gateway-key.pem"))
            .expect("certificate and key");
    let acceptor = native_tls::TlsAcceptor::new(identity).expect("TLS acceptor");
    serve_http_provider(Some(acceptor.into()))
}

/// A TCP listener whose connections are TLS sessions (handshakes that fail are dropped:
/// a client that does not trust the certificate).
struct TlsListener {
    tcp: tokio::net::TcpListener,
    tls: tokio_native_tls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_native_tls::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(session) = self.tls.accept(stream).await {
                return (session, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

fn serve_http_provider(
    tls: Option<tokio_native_tls::TlsAcceptor>,
) -> (SocketAddr, Arc<Mutex<ProviderLog>>) {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    let log = Arc::new(Mutex::new(ProviderLog::default()));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    listener.set_nonblocking(true).expect("non-blocking");
    let state = log.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            async fn handle(
                State(log): State<Arc<Mutex<ProviderLog>>>,
                headers: HeaderMap,
                axum::Json(body): axum::Json<Value>,
            ) -> StatusCode {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let attempt = {
                    let mut l = log.lock().expect("log");
                    if headers.get("authorization").and_then(|v| v.to_str().ok())
                        != Some("Bearer test-token")
                    {
                        l.missing_auth += 1;
                    }
                    let n = l.requests.entry(key.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                if body["send_id"].as_str() != Some(key.as_str()) {
                    log.lock().expect("log").body_mismatches += 1;
                }
                let status = if key.starts_with("s5xx-") && attempt <= 2 || key.starts_with("down-")
                {
                    StatusCode::SERVICE_UNAVAILABLE
                } else if key.starts_with("holdretry-") && attempt == 1 {
                    while !log.lock().expect("log").released {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    StatusCode::SERVICE_UNAVAILABLE
                } else if key.starts_with("holdperm-") {
                    if attempt == 1 {
                        while !log.lock().expect("log").released {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    StatusCode::BAD_REQUEST
                } else if key.starts_with("gw504-") {
                    // A proxy in front of a slow gateway: the gateway hands the
                    // message on, the proxy gives up waiting.
                    log.lock().expect("log").delivered.insert(key.clone());
                    StatusCode::GATEWAY_TIMEOUT
                } else if key.starts_with("perm-") {
                    StatusCode::BAD_REQUEST
                } else if key.starts_with("gone-") {
                    StatusCode::GONE
                } else if key.starts_with("unknown-") && !log.lock().expect("log").released {
                    StatusCode::NOT_FOUND
                } else {
                    if key.starts_with("slow-") && attempt == 1 {
                        tokio::time::sleep(Duration::from_secs(6)).await;
                    }
                    if key.starts_with("hold-") && attempt == 1 {
                        while !log.lock().expect("log").released {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    StatusCode::OK
                };
                if status == StatusCode::OK {
                    log.lock().expect("log").delivered.insert(key);
                }
                status
            }
            let app = axum::Router::new()
                .route("/sms", axum::routing::post(handle))
                .with_state(state);
            let tcp = tokio::net::TcpListener::from_std(listener).expect("listener");
            match tls {
                Some(tls) => axum::serve(TlsListener { tcp, tls }, app).await,
                None => axum::serve(tcp, app).await,
            }
            .expect("serve");
        });
    });
    (addr, log)
}

/// The SMS worker against the HTTP gateway at `addr`, with `timeout` per request.
fn sms_worker_env(addr: SocketAddr, timeout: &str) -> Vec<(String, String)> {
    [
        ("KAIROS__DELIVERY__SMS__PROVIDER", "http".to_string()),
        (
            "KAIROS__DELIVERY__SMS__HTTP__URL",
            format!("http://{addr}/sms"),
        ),
        (
            "KAIROS__DELIVERY__SMS__HTTP__AUTH_HEADER",
            "Authorization".into(),
        ),
        (
            "KAIROS__DELIVERY__SMS__HTTP__AUTH_VALUE",
            "Bearer test-token".into(),
        ),
        ("KAIROS__DELIVERY__SMS__HTTP__TIMEOUT", timeout.into()),
        ("KAIROS__DELIVERY__SMS__RETRY__MAX_ATTEMPTS", "3".into()),
        (
            "KAIROS__DELIVERY__SMS__RETRY__INITIAL_BACKOFF",
            "50ms".into(),
        ),
        ("KAIROS__DELIVERY__SMS__RETRY__MAX_BACKOFF", "200ms".into()),
        (
            "KAIROS__DELIVERY__SMS__CIRCUIT_BREAKER__FAILURE_THRESHOLD",
            "50".into(),
        ),
        ("KAIROS__DELIVERY__SMS__WEBHOOK_TOKEN", "hook-secret".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[test]
fn an_https_gateway_gets_its_sends_only_from_a_worker_that_trusts_its_certificate() {
    let (addr, log) = start_https_provider();
    let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("support/gateway-cert.pem");
    let url = format!("https://{addr}/sms");
    // The SMS worker trusts the gateway's certificate; the e-mail worker, on the same
    // gateway, knows only the system's authorities.
    let mut env = sms_worker_env(addr, "5s");
    env.retain(|(k, _)| k != "KAIROS__DELIVERY__SMS__HTTP__URL");
    let email = [
        ("KAIROS__DELIVERY__SMS__HTTP__URL", url.clone()),
        (
            "KAIROS__DELIVERY__SMS__HTTP__CA_FILE",
            ca.display().to_string(),
        ),
        ("KAIROS__DELIVERY__EMAIL__PROVIDER", "http".into()),
        ("KAIROS__DELIVERY__EMAIL__HTTP__URL", url),
        (
            "KAIROS__DELIVERY__EMAIL__HTTP__LIST_UNSUBSCRIBE",
            "https://shop.example/u/{customer_id}".into(),
        ),
        ("KAIROS__DELIVERY__EMAIL__RETRY__MAX_ATTEMPTS", "1".into()),
    ];
    env.extend(email.map(|(k, v)| (k.to_string(), v)));
    let p = Pipeline::start(Options {
        services: vec!["deliver-sms", "deliver-email"],
        env,
        ..Options::default()
    });
    let command = |id: &str, channel: &str, address: &str| {
        send_command(id, channel, address, "abandoned_cart", cart_variables())
    };
    p.produce(
        "send.sms",
        &[("c-tls-1", command("ok-tls-1", "sms", "+491701234567"))],
    );
    p.produce(
        "send.email",
        &[("c-tls-2", command("ok-tls-2", "email", "ann@example.com"))],
    );
    let outcomes = final_outcomes(&p, 2, Duration::from_secs(60));
    assert_eq!(outcomes["ok-tls-1"].0, "sent", "{outcomes:?}");
    let (kind, reason) = &outcomes["ok-tls-2"];
    assert_eq!(kind, "failed", "{outcomes:?}");
    assert!(
        reason.contains("certificate"),
        "the cause is named: {reason}"
    );
    let l = log.lock().expect("log");
    assert_eq!(
        l.delivered.iter().collect::<Vec<_>>(),
        ["ok-tls-1"],
        "only the trusting worker's send went through"
    );
    assert_eq!(l.missing_auth, 0);
}

#[test]
fn http_provider_retries_5xx_and_timeouts_drops_nothing_and_sends_nothing_twice() {
    let (addr, log) = start_http_provider();
    // Long enough that only slow-1's first answer (6 s) is late on a loaded machine:
    // the request counts below are exact.
    let env = sms_worker_env(addr, "2s");
    let p = Pipeline::start(Options {
        services: vec!["deliver-sms"],
        env,
        ..Options::default()
    });
    let ids = [
        "ok-1",
        "ok-2",
        "s5xx-1",
        "slow-1",
        "perm-1",
        "down-1",
        "gone-1",
        "unknown-1",
        "gw504-1",
    ];
    let records: Vec<(String, Vec<u8>)> = ids
        .iter()
        .map(|id| {
            (
                format!("c-{id}"),
                send_command(
                    id,
                    "sms",
                    "+491701234567",
                    "abandoned_cart",
                    cart_variables(),
                ),
            )
        })
        .collect();
    p.produce("send.sms", &records);

    // The dead number is reported sent, then bounced: both, before reading the final
    // outcomes.
    p.read_json_until("outcomes", Duration::from_secs(60), |v| {
        v.iter()
            .any(|o| o["send_id"] == "gone-1" && o["kind"] == "bounced_hard")
    });
    let outcomes = final_outcomes(&p, ids.len(), Duration::from_secs(60));
    for id in ["ok-1", "ok-2", "s5xx-1", "slow-1"] {
        assert_eq!(outcomes[id].0, "sent", "{id}: {outcomes:?}");
    }
    // Every answer a proxy's 504: the gateway may hold it, so it is in doubt, taken
    // as sent, and not given up to the dead letters (to be sent again from there).
    let (kind, reason) = &outcomes["gw504-1"];
    assert_eq!(kind, "sent", "{outcomes:?}");
    assert!(reason.starts_with("in_doubt"), "{reason}");
    assert_eq!(outcomes["perm-1"].0, "failed");
    assert!(
        outcomes["perm-1"].1.contains("400"),
        "{:?}",
        outcomes["perm-1"]
    );
    // A dead number (410) is a hard bounce (the arbiter suppresses it); a 404 more
    // likely means the gateway's route is missing: the provider refuses the worker,
    // so the send is retried, then given up to the dead-letter topic.
    assert_eq!(outcomes["gone-1"].0, "bounced_hard", "{outcomes:?}");
    assert!(
        outcomes["gone-1"].1.contains("410"),
        "{:?}",
        outcomes["gone-1"]
    );
    assert_eq!(outcomes["unknown-1"].0, "failed", "{outcomes:?}");
    assert!(
        outcomes["unknown-1"].1.starts_with("retries_exhausted")
            && outcomes["unknown-1"]
                .1
                .contains("provider refused: HTTP 404"),
        "{:?}",
        outcomes["unknown-1"]
    );
    assert_eq!(outcomes["down-1"].0, "failed");
    assert!(
        outcomes["down-1"].1.starts_with("retries_exhausted"),
        "{:?}",
        outcomes["down-1"]
    );

    let l = log.lock().expect("log");
    let requests = |id: &str| l.requests.get(id).copied().unwrap_or(0);
    assert_eq!(requests("ok-1"), 1);
    assert_eq!(requests("ok-2"), 1);
    assert_eq!(l.body_mismatches, 0, "every body carries its send id");
    assert_eq!(requests("s5xx-1"), 3, "two 503s, then accepted");
    assert_eq!(
        requests("slow-1"),
        2,
        "timed out once, then repeated with the same key"
    );
    assert_eq!(requests("perm-1"), 1, "a 400 is not retried");
    assert_eq!(requests("gone-1"), 1, "a 410 is not retried");
    assert_eq!(requests("unknown-1"), 3, "a 404 is retried like an outage");
    assert_eq!(requests("down-1"), 3, "max_attempts, then given up");
    assert_eq!(
        requests("gw504-1"),
        3,
        "asked again with its key, then in doubt"
    );
    assert_eq!(l.missing_auth, 0, "every request carries the auth header");
    let handed_on: BTreeSet<&str> = l.delivered.iter().map(String::as_str).collect();
    assert_eq!(
        handed_on,
        ["ok-1", "ok-2", "s5xx-1", "slow-1", "gw504-1"]
            .into_iter()
            .collect(),
        "each deliverable send handed on once"
    );
    drop(l);

    // Engagement arrives through the worker's webhook: a repeated event maps to the
    // same outcome id, a worker-only kind is refused.
    let opened = j!({"send_id": "ok-1", "customer_id": "c-ok-1", "scenario": "abandoned_cart",
        "channel": "sms", "category": "trigger", "event": "clicked", "occurred_at": now_millis()});
    let admin = p.admin("deliver-sms");
    let post = |body: &str, token| {
        kairos_tests::http_post_json(admin, "/webhooks/events", body, token)
            .expect("webhook answers")
    };
    let (status, _) = post(&opened.to_string(), None);
    assert_eq!(status, 401, "the webhook wants its token");
    let (status, _) = post(&opened.to_string(), Some("guess"));
    assert_eq!(status, 401);
    for _ in 0..2 {
        let (status, body) = post(&opened.to_string(), Some("hook-secret"));
        assert_eq!(status, 202, "{body}");
    }
    let mut sent = opened.clone();
    sent["event"] = j!("sent");
    // Rejected events are kept as dead letters and the answer is a 2xx all the same: a
    // provider retries any other, which would only dead-letter them again.
    let (status, body) = post(&sent.to_string(), Some("hook-secret"));
    assert_eq!(status, 202, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("json answer");
    assert_eq!(answer["accepted"], 0, "{body}");
    assert_eq!(answer["rejected"][0]["event"], 0, "{body}");
    let (status, body) = post("{\"send_id\": 1}", Some("hook-secret"));
    assert_eq!(
        status, 202,
        "an event that does not parse is taken by none: {body}"
    );
    let answer: Value = serde_json::from_str(&body).expect("json answer");
    assert_eq!(
        answer["rejected"].as_array().map(Vec::len),
        Some(1),
        "{body}"
    );
    let (status, _) = post("not json", Some("hook-secret"));
    assert_eq!(status, 400);
    let (status, body) = post("[]", Some("hook-secret"));
    assert_eq!(status, 202, "an empty batch is no bad one: {body}");
    // A batch of more events than a request may carry is refused whole and kept; a
    // body that is no JSON and too large for one dead letter is kept in parts.
    let too_many = format!(
        "[{}]",
        // One more than `MAX_EVENTS_PER_REQUEST` in the webhook.
        vec!["{}"; 10_001].join(",")
    );
    let (status, body) = post(&too_many, Some("hook-secret"));
    assert_eq!(status, 413, "{body}");
    let large_garbage = "not json ".repeat(1_000_000 / 9);
    let (status, _) = post(&large_garbage, Some("hook-secret"));
    assert_eq!(status, 400);
    // A batch with a bad event: the good one counts, the bad one is dead-lettered.
    let mut delivered = opened.clone();
    delivered["event"] = j!("delivered");
    let batch = j!([sent.clone(), delivered]);
    let (status, body) = post(&batch.to_string(), Some("hook-secret"));
    assert_eq!(status, 202, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("json answer");
    assert_eq!(answer["accepted"], 1, "{body}");
    assert_eq!(answer["rejected"][0]["event"], 0, "{body}");
    // Until the clicks and the bounce are all read: the read stops as soon as what
    // it waits for is in, and the outcomes' partitions are read side by side.
    let clicks = p.read_json_until("outcomes", Duration::from_secs(20), |v| {
        v.iter().filter(|o| o["kind"] == "clicked").count() >= 2
            && v.iter()
                .any(|o| o["send_id"] == "ok-1" && o["kind"] == "delivered")
            && v.iter()
                .any(|o| o["send_id"] == "gone-1" && o["kind"] == "bounced_hard")
    });
    let click_ids: BTreeSet<&str> = clicks
        .iter()
        .filter(|o| o["kind"] == "clicked")
        .map(|o| o["outcome_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        click_ids.len(),
        1,
        "a repeated webhook keeps its outcome id: {clicks:?}"
    );
    // The bounce names the address the send went to.
    let bounce = clicks
        .iter()
        .find(|o| o["send_id"] == "gone-1" && o["kind"] == "bounced_hard")
        .expect("the bounce of gone-1");
    assert_eq!(bounce["address"], "+491701234567", "{bounce}");
    assert!(
        clicks
            .iter()
            .any(|o| o["kind"] == "clicked" && o["customer_id"] == "c-ok-1"),
        "the click is keyed to the customer"
    );

    // The sends given up are on the dead-letter topic with the command and the reason;
    // so are the webhook's rejected events (the lone "sent" twice: once alone, once in
    // the batch; the event that did not parse; the body that was no JSON; the batch of
    // too many; the large body that was no JSON, in two parts).
    let webhook = "webhook:/webhooks/events";
    let letters = p.read_json_until("deadletter", Duration::from_secs(20), |v| v.len() >= 9);
    let (from_webhook, letters): (Vec<&Value>, Vec<&Value>) =
        letters.iter().partition(|l| l["source_topic"] == webhook);
    let reasons: BTreeSet<&str> = from_webhook
        .iter()
        .map(|l| l["reason_code"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(from_webhook.len(), 7, "{from_webhook:?}");
    let kept = |letter: &&Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(letter["payload_base64"].as_str().unwrap_or(""))
            .expect("base64")
    };
    let refused_batch = from_webhook
        .iter()
        .find(|l| {
            l["reason"]
                .as_str()
                .unwrap_or("")
                .contains("smaller batches")
        })
        .expect("the batch of too many events is dead-lettered");
    assert_eq!(kept(refused_batch), too_many.as_bytes());
    let mut parts: Vec<&&Value> = from_webhook
        .iter()
        .filter(|l| l["reason"].as_str().unwrap_or("").contains(" of 2: bytes"))
        .collect();
    parts.sort_by_key(|l| l["reason"].as_str().unwrap_or("").contains("part 2"));
    let joined: Vec<u8> = parts.iter().flat_map(|l| kept(l)).collect();
    assert_eq!(
        joined,
        large_garbage.as_bytes(),
        "the large body is kept whole"
    );
    assert_eq!(
        reasons,
        ["invalid_field", "not_json"].into(),
        "{from_webhook:?}"
    );
    // The webhook's dead letters count with the worker's own, by reason.
    let metrics = p.metrics("deliver-sms");
    let dead = |reason: &str| {
        kairos_tests::sample(
            &metrics,
            "kairos_dead_letters_total",
            &[&format!("reason=\"{reason}\"")],
        )
    };
    assert_eq!(
        dead("not_json"),
        2.0,
        "the bodies that were no JSON (one in two letters, counted once)"
    );
    assert_eq!(
        dead("invalid_field"),
        4.0,
        "the lone sent twice, the unparsed event, the batch of too many"
    );
    assert_eq!(
        dead("processing_error"),
        2.0,
        "the two sends given up, counted by reason with the rest"
    );
    let given_up: BTreeSet<String> = letters
        .iter()
        .map(|l| {
            assert_eq!(l["service"], "deliver-sms");
            assert!(
                l["reason"].as_str().unwrap_or("").contains("3 attempts"),
                "{l}"
            );
            dead_lettered_send_id(l)
        })
        .collect();
    assert_eq!(
        given_up,
        ["down-1", "unknown-1"].map(String::from).into(),
        "{letters:?}"
    );

    // The gateway's route is deployed, and the operator re-produces the send given up
    // from its dead letter: it goes out once. A copy of a send that went out is
    // skipped, and counted.
    log.lock().expect("log").released = true;
    let letter = letters
        .iter()
        .find(|l| dead_lettered_send_id(l) == "unknown-1")
        .expect("the dead letter of unknown-1");
    p.produce(
        "send.sms",
        &[
            ("c-unknown-1", dead_lettered_payload(letter)),
            (
                "c-ok-1",
                send_command(
                    "ok-1",
                    "sms",
                    "+491701234567",
                    "abandoned_cart",
                    cart_variables(),
                ),
            ),
        ],
    );
    let sent_again = p.read_json_until("outcomes", Duration::from_secs(30), |v| {
        v.iter()
            .any(|o| o["send_id"] == "unknown-1" && o["kind"] == "sent")
    });
    let kinds = |id: &str| {
        sent_again
            .iter()
            .filter(|o| o["send_id"] == id)
            .map(|o| o["kind"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(kinds("unknown-1"), ["failed", "sent"], "{sent_again:?}");
    assert_eq!(
        sms_counter_once_at_least_1(&p, "kairos_delivery_duplicate_sends_total"),
        1.0,
        "the copy of ok-1 is counted"
    );
    let l = log.lock().expect("log");
    assert_eq!(
        l.requests.get("ok-1"),
        Some(&1),
        "the copy of ok-1 is not sent"
    );
    assert_eq!(
        l.requests.get("unknown-1"),
        Some(&4),
        "3 refused, then 1 accepted"
    );
    assert!(l.delivered.contains("unknown-1"), "{:?}", l.delivered);
    drop(l);

    // A command decided before the customer unsubscribed, read after the worker read
    // the unsubscribe (it waited behind a backlog): not sent.
    let waiting = send_command(
        "late-1",
        "sms",
        "+491701234567",
        "abandoned_cart",
        cart_variables(),
    );
    std::thread::sleep(Duration::from_millis(5));
    let unsubscribe = j!({"outcome_id": "u-late-1", "send_id": "earlier-1",
        "customer_id": "c-late-1", "scenario": "abandoned_cart", "channel": "sms",
        "category": "trigger", "kind": "unsubscribed", "reason": null,
        "occurred_at": now_millis()});
    p.produce("outcomes", &[("c-late-1", json(unsubscribe))]);
    assert_eq!(
        sms_counter_once_at_least_1(&p, "kairos_delivery_consent_changes_total"),
        1.0,
        "the worker noted the unsubscribe"
    );
    p.produce("send.sms", &[("c-late-1", waiting)]);
    let late = p.read_json_until("outcomes", Duration::from_secs(30), |v| {
        v.iter().any(|o| o["send_id"] == "late-1")
    });
    let late = late
        .iter()
        .find(|o| o["send_id"] == "late-1")
        .expect("an outcome of late-1");
    assert_eq!(late["kind"], "failed", "{late}");
    assert!(
        late["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("consent_withdrawn"),
        "{late}"
    );
    assert_eq!(log.lock().expect("log").requests.get("late-1"), None);

    // The copy of ok-1 was read before late-1 was produced, so a report of it would
    // be on the topic now: every outcome, not only those read up to a match.
    let everything = p.read_all_json("outcomes");
    let ok_1_sent = everything
        .iter()
        .filter(|o| o["send_id"] == "ok-1" && o["kind"] == "sent")
        .count();
    assert_eq!(
        ok_1_sent, 1,
        "the copy of ok-1 is not reported: {everything:?}"
    );
}

/// The SMS worker's `metric` for its channel, once it reached 1 (or after 20 s).
fn sms_counter_once_at_least_1(p: &Pipeline, metric: &str) -> f64 {
    let value = || kairos_tests::sample(&p.metrics("deliver-sms"), metric, &["channel=\"sms\""]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while value() < 1.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    value()
}

/// The command a dead letter carries, as it was on the send topic.
fn dead_lettered_payload(letter: &Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(letter["payload_base64"].as_str().unwrap_or(""))
        .expect("payload is base64")
}

/// The send id of the command a dead letter carries.
fn dead_lettered_send_id(letter: &Value) -> String {
    let payload = dead_lettered_payload(letter);
    let command: Value = serde_json::from_slice(&payload).expect("payload is the command");
    command["send_id"].as_str().unwrap_or("").to_string()
}

#[test]
fn a_sender_the_relay_refuses_marks_no_address_dead_and_gives_the_sends_up_to_the_dead_letters() {
    let dir = tempfile::tempdir().expect("temp dir");
    let smtp = SmtpSink::start(dir.path());
    let mut env = email_worker_env(smtp.port);
    for (key, value) in &mut env {
        if key == "KAIROS__DELIVERY__EMAIL__SMTP__FROM" {
            *value = "Shop <blocked@shop.example>".into();
        }
    }
    let p = Pipeline::start(Options {
        services: vec!["deliver-email"],
        env,
        ..Options::default()
    });
    // Each would be sent (ok-1) or bounce (bounce-1) with a sender the relay takes.
    let records: Vec<(String, Vec<u8>)> = [
        ("ok-1", "anna@example.com"),
        ("bounce-1", "bounce1@example.com"),
    ]
    .iter()
    .map(|(id, to)| {
        (
            format!("c-{id}"),
            send_command(id, "email", to, "abandoned_cart", cart_variables()),
        )
    })
    .collect();
    p.produce("send.email", &records);

    let outcomes = final_outcomes(&p, 2, Duration::from_secs(60));
    for id in ["ok-1", "bounce-1"] {
        let (kind, reason) = &outcomes[id];
        // Not bounced_hard: the arbiter would suppress the address for good.
        assert_eq!(kind, "failed", "{id}: {outcomes:?}");
        assert!(
            reason.starts_with("retries_exhausted: 4 attempts") && reason.contains("553"),
            "{id}: {reason}"
        );
    }
    let letters = p.read_json_until("deadletter", Duration::from_secs(20), |v| v.len() >= 2);
    let given_up: BTreeSet<String> = letters.iter().map(dead_lettered_send_id).collect();
    assert_eq!(given_up, ["bounce-1", "ok-1"].map(String::from).into());
    assert!(smtp.send_id_counts().is_empty(), "nothing was delivered");
    let metrics = p.metrics("deliver-email");
    assert_eq!(
        kairos_tests::sample(
            &metrics,
            "kairos_provider_requests_total",
            &["result=\"refused\""]
        ),
        8.0,
        "four attempts per send"
    );
}

/// A welcome message for the in-app inbox of customer `c-<send_id>` (no address).
fn in_app_command(send_id: &str) -> Value {
    let mut cmd: Value = serde_json::from_slice(&send_command(
        send_id,
        "in_app",
        "",
        "welcome",
        j!({"first_name": "Dana"}),
    ))
    .expect("json");
    cmd["address"] = Value::Null;
    cmd
}

/// With `inbox_secret` set, only a poll with the customer's token reads the inbox.
#[test]
fn in_app_messages_wait_in_the_inbox_until_the_app_polls_them() {
    let secret = "inbox-secret-for-the-test";
    let p = Pipeline::start(Options {
        services: vec!["deliver-in_app"],
        env: vec![(
            "KAIROS__DELIVERY__IN_APP__INBOX_SECRET".into(),
            secret.into(),
        )],
        ..Options::default()
    });
    let cmd = in_app_command("inapp-1");
    let mut expired = cmd.clone();
    expired["send_id"] = j!("inapp-old");
    expired["valid_until"] = j!(now_millis() + 1500);
    p.produce(
        "send.in_app",
        &[("c-inapp-1", json(cmd)), ("c-inapp-1", json(expired))],
    );
    final_outcomes(&p, 2, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1600));

    let admin = p.admin("deliver-in_app");
    let token = |customer: &str| kairos_core::ids::inbox_token(secret, customer);
    let poll = |customer: &str| {
        let path = format!("/in-app/{customer}");
        kairos_tests::http_get_with_token(admin, &path, &token(customer)).expect("inbox answers")
    };
    // Without a token, or with another customer's, the inbox is not read (nor marked
    // seen: the first poll with the token below still finds the message unseen).
    let (status, body) = kairos_tests::http_get(admin, "/in-app/c-inapp-1").expect("answers");
    assert_eq!(status, 401, "{body}");
    let path = "/in-app/c-inapp-1";
    let (status, body) =
        kairos_tests::http_get_with_token(admin, path, &token("c-someone-else")).expect("answers");
    assert_eq!(status, 401, "{body}");
    let refused_until = now_millis();
    let (status, body) = poll("c-inapp-1");
    assert_eq!(status, 200, "{body}");
    let messages: Vec<Value> = serde_json::from_str(&body).expect("JSON list");
    assert_eq!(
        messages.len(),
        1,
        "the expired message is gone: {messages:?}"
    );
    assert_eq!(messages[0]["send_id"], "inapp-1");
    assert_eq!(messages[0]["title"], "Welcome, Dana!");
    assert!(
        messages[0]["seen_at"]
            .as_i64()
            .is_some_and(|at| at >= refused_until),
        "marked seen when fetched with the token, not before: {messages:?}"
    );
    let (_, again) = poll("c-inapp-1");
    let again: Vec<Value> = serde_json::from_str(&again).expect("JSON list");
    assert_eq!(again[0]["seen_at"], messages[0]["seen_at"], "seen once");
    let (_, other) = poll("c-someone-else");
    assert_eq!(other, "[]");

    // The first fetch reports the message delivered, once.
    p.read_json_until("outcomes", Duration::from_secs(20), |v| {
        v.iter()
            .any(|o| o["send_id"] == "inapp-1" && o["kind"] == "delivered")
    });
    // Both fetches committed their reports before they were answered: every outcome
    // on the topic now, not only those read up to the first match.
    let outcomes = p.read_all_json("outcomes");
    let delivered = outcomes
        .iter()
        .filter(|o| o["send_id"] == "inapp-1" && o["kind"] == "delivered")
        .count();
    assert_eq!(delivered, 1, "{outcomes:?}");
}

/// The inbox is partition state: messages a worker stored (and the "seen" marks of
/// its polls) follow their partitions to a second instance through the changelog,
/// while both run and after the first is killed. A poll at an instance that does not
/// own the customer's partition is answered 421; each message is reported delivered
/// once, by whichever instance served its first poll.
#[test]
fn in_app_messages_follow_their_partition_to_another_instance() {
    let mut p = Pipeline::start(Options {
        services: vec!["deliver-in_app"],
        env: vec![kairos_tests::short_session_timeout()],
        ..Options::default()
    });
    // Customers on every partition (send_command names the customer c-<send id>).
    let ids: Vec<String> = (0..12).map(|i| format!("move-{i}")).collect();
    let customer = |id: &str| format!("c-{id}");
    let partition_of = |id: &str| kairos_core::replay::partition_for(customer(id).as_bytes(), 4);
    let partitions: BTreeSet<i32> = ids.iter().map(|id| partition_of(id)).collect();
    assert_eq!(partitions.len(), 4, "{partitions:?}");
    let records: Vec<(String, Vec<u8>)> = ids
        .iter()
        .map(|id| (customer(id), json(in_app_command(id))))
        .collect();
    p.produce("send.in_app", &records);
    final_outcomes(&p, ids.len(), Duration::from_secs(30));

    let poll = |p: &Pipeline, instance: &str, id: &str| -> (u16, String) {
        kairos_tests::http_get(p.admin(instance), &format!("/in-app/{}", customer(id)))
            .expect("the inbox answers")
    };
    let message = |body: &str, id: &str| -> Value {
        let messages: Vec<Value> = serde_json::from_str(body).expect("a JSON list");
        assert_eq!(messages.len(), 1, "{messages:?}");
        assert_eq!(messages[0]["send_id"], id);
        assert!(messages[0]["seen_at"].is_i64(), "{messages:?}");
        messages[0].clone()
    };
    // The first half is seen on the first instance.
    let mut seen_at = BTreeMap::new();
    for id in &ids[..6] {
        let (status, body) = poll(&p, "deliver-in_app", id);
        assert_eq!(status, 200, "{body}");
        seen_at.insert(id.clone(), message(&body, id)["seen_at"].clone());
    }

    p.spawn_instance("deliver-in_app-b", "deliver-in_app");
    p.wait_ready("deliver-in_app-b", Duration::from_secs(90));
    // Once the second instance owns a partition, it serves that partition's inbox
    // (restored from the changelog), and the first instance sends polls for it away.
    let owned = |p: &Pipeline, instance: &str| {
        kairos_tests::sample(&p.metrics(instance), "kairos_owned_partitions", &[])
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while owned(&p, "deliver-in_app-b") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second instance owns nothing"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let moved = ids[..6]
        .iter()
        .find(|id| poll(&p, "deliver-in_app-b", id).0 == 200)
        .expect("a customer seen on the first instance whose partition moved")
        .clone();
    let (_, body) = poll(&p, "deliver-in_app-b", &moved);
    assert_eq!(
        message(&body, &moved)["seen_at"],
        seen_at[&moved],
        "seen before the move"
    );
    let (status, body) = poll(&p, "deliver-in_app", &moved);
    assert_eq!(status, 421, "{body}");
    assert!(
        body.contains(&format!("partition {}", partition_of(&moved))),
        "{body}"
    );
    // Each instance lists what it owns: the moved partition is the second one's only.
    let owned_by = |p: &Pipeline, instance: &str| -> Vec<i64> {
        let (status, body) =
            kairos_tests::http_get(p.admin(instance), "/partitions").expect("answers");
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("JSON");
        v["owned"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|p| p.as_i64().expect("a partition"))
            .collect()
    };
    let moved_partition = i64::from(partition_of(&moved));
    assert!(owned_by(&p, "deliver-in_app-b").contains(&moved_partition));
    assert!(!owned_by(&p, "deliver-in_app").contains(&moved_partition));

    // The first instance dies; the second takes every partition and serves everything.
    p.kill9("deliver-in_app");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while owned_by(&p, "deliver-in_app-b") != [0, 1, 2, 3] {
        assert!(
            std::time::Instant::now() < deadline,
            "the second instance did not take every partition"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for id in &ids {
        let (status, body) = poll(&p, "deliver-in_app-b", id);
        assert_eq!(status, 200, "{id}: {body}");
        let m = message(&body, id);
        if let Some(at) = seen_at.get(id) {
            assert_eq!(&m["seen_at"], at, "{id} was seen on the first instance");
        }
    }
    p.read_json_until("outcomes", Duration::from_secs(20), |v| {
        v.iter().filter(|o| o["kind"] == "delivered").count() >= ids.len()
    });
    // Counted over the whole topic: a second report of a message seen on the first
    // instance would come after the first ones, past where the wait above stopped.
    let outcomes = p.read_all_json("outcomes");
    for id in &ids {
        let delivered = outcomes
            .iter()
            .filter(|o| o["send_id"] == id.as_str() && o["kind"] == "delivered")
            .count();
        assert_eq!(delivered, 1, "{id}: {outcomes:?}");
    }
}

/// An SMS worker paused (SIGSTOP) past its session while the gateway holds its call:
/// a second instance takes the partitions over, claims them, finds that send cut short
/// and makes it again (the one call per pause no check can stop; the gateway hands it
/// on once, by its idempotency key), then sends the rest. Woken, the first worker gets
/// the gateway's answer, and its record of the acceptance finds the second one's claim
/// before it: it stops with an error instead of going on as the partitions' owner.
#[test]
fn a_worker_paused_past_its_session_finds_its_partitions_claimed_when_it_wakes() {
    let p = paused_worker_wakes_after_a_takeover("hold-1");
    assert!(
        p.log("deliver-sms")
            .contains("was claimed by another instance since this one claimed it"),
        "{}",
        p.log("deliver-sms")
    );
}

/// As above, but the gateway refuses the held send (400): the woken worker writes no
/// record after the call, and it is its commit (the send's outcome) that finds the
/// claim before it: the outcome is not published (the new owner's is), and the worker
/// stops, as its consumer still holds the partition.
#[test]
fn a_paused_worker_whose_held_call_failed_publishes_nothing_after_the_takeover() {
    let p = paused_worker_wakes_after_a_takeover("holdperm-1");
    assert!(
        p.log("deliver-sms")
            .contains("another instance claimed this partition since this one did"),
        "{}",
        p.log("deliver-sms")
    );
}

/// As above, but the gateway answers the held call with 503 (try again): the woken
/// worker's retry would be a second call of its own. Its record of the retry finds the
/// claim first, and it stops without calling.
#[test]
fn a_paused_worker_makes_no_retry_after_the_takeover() {
    let p = paused_worker_wakes_after_a_takeover("holdretry-1");
    assert!(
        p.log("deliver-sms")
            .contains("was claimed by another instance since this one claimed it"),
        "{}",
        p.log("deliver-sms")
    );
}

/// The run the three tests share: twenty sends and `held`, the first worker paused while
/// the gateway holds `held`, a second instance that takes over and sends everything,
/// then the first woken: it must stop with an error. Every send's single final outcome
/// is the gateway's answer, each send is handed on at most once, and only `held` was
/// requested twice.
fn paused_worker_wakes_after_a_takeover(held: &str) -> Pipeline {
    use nix::sys::signal::Signal;
    let (addr, log) = start_http_provider();
    let mut env = sms_worker_env(addr, "60s");
    env.push(kairos_tests::short_session_timeout());
    let mut p = Pipeline::start(Options {
        services: vec!["deliver-sms"],
        env,
        ..Options::default()
    });
    let ids: Vec<String> = (0..10)
        .map(|i| format!("ok-{i}"))
        .chain([held.to_string()])
        .chain((10..20).map(|i| format!("ok-{i}")))
        .collect();
    let records: Vec<(String, Vec<u8>)> = ids
        .iter()
        .map(|id| {
            let command = send_command(
                id,
                "sms",
                "+491701234567",
                "abandoned_cart",
                cart_variables(),
            );
            (format!("c-{id}"), command)
        })
        .collect();
    p.produce("send.sms", &records);
    let wait_for = |what: &str, timeout: Duration, done: &dyn Fn(&ProviderLog) -> bool| {
        let deadline = std::time::Instant::now() + timeout;
        while !done(&log.lock().expect("log")) {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for("the held call", Duration::from_secs(60), &|l| {
        l.requests.get(held) == Some(&1)
    });
    p.signal("deliver-sms", Signal::SIGSTOP);
    p.spawn_instance("deliver-sms-b", "deliver-sms");
    // Every send handed on (the held one too, unless the gateway refuses it), the held
    // one asked for again by the new owner.
    let handed_on = ids.len() - usize::from(held.starts_with("holdperm-"));
    wait_for("the new owner's sends", Duration::from_secs(120), &|l| {
        l.delivered.len() == handed_on && l.requests.get(held) == Some(&2)
    });
    let outcomes = final_outcomes(&p, ids.len(), Duration::from_secs(60));
    log.lock().expect("log").released = true;
    p.signal("deliver-sms", Signal::SIGCONT);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !p.has_exited("deliver-sms") {
        assert!(
            std::time::Instant::now() < deadline,
            "the woken worker went on; log:\n{}",
            p.log("deliver-sms")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = p.exited("deliver-sms").expect("exit status");
    assert!(!status.success(), "{status:?}");
    let want = if held.starts_with("holdperm-") {
        "failed"
    } else {
        "sent"
    };
    assert_eq!(outcomes[held].0, want, "{outcomes:?}");
    let others: Vec<_> = outcomes
        .iter()
        .filter(|(id, (kind, _))| *id != held && kind != "sent")
        .collect();
    assert!(others.is_empty(), "{others:?}");
    // Give a late outcome of the woken worker time to arrive, then count them all.
    std::thread::sleep(Duration::from_secs(2));
    let terminal = ["sent", "failed", "bounced_hard"];
    let of_held = p
        .read_all_json("outcomes")
        .iter()
        .filter(|o| o["send_id"] == held && terminal.contains(&o["kind"].as_str().unwrap_or("")))
        .count();
    assert_eq!(of_held, 1, "one final outcome of {held}: the new owner's");
    let l = log.lock().expect("log");
    let repeated: Vec<_> = l.requests.iter().filter(|(_, n)| **n > 1).collect();
    assert_eq!(repeated, vec![(&held.to_string(), &2)]);
    drop(l);
    let metrics = p.metrics("deliver-sms-b");
    assert_eq!(
        kairos_tests::sample(&metrics, "kairos_partitions_fenced_total", &[]),
        0.0,
        "the new owner is not fenced"
    );
    p
}
