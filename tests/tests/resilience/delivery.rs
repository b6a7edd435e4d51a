//! The e-mail worker killed with SIGKILL while it sends to a real SMTP server.

use std::time::{Duration, Instant};

use kairos_tests::delivery::{
    cart_variables, email_worker_env, final_outcomes, send_command, SmtpSink,
};
use kairos_tests::{short_session_timeout, Options, Pipeline};

#[test]
fn sigkilled_email_worker_sends_every_message_exactly_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let smtp = SmtpSink::start(dir.path());
    let mut env = email_worker_env(smtp.port);
    env.push(short_session_timeout());
    let mut p = Pipeline::start(Options {
        services: vec!["deliver-email"],
        env,
        ..Options::default()
    });
    let total = 3000;
    let records: Vec<(String, Vec<u8>)> = (0..total)
        .map(|i| {
            let id = format!("crash-{i:05}");
            (
                format!("c-{id}"),
                send_command(
                    &id,
                    "email",
                    &format!("{id}@example.com"),
                    "abandoned_cart",
                    cart_variables(),
                ),
            )
        })
        .collect();
    p.produce("send.email", &records);

    // Kill the worker whenever it has made progress since the last kill.
    let mut kills = 0;
    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    while kills < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        let arrived = smtp.messages().len();
        if arrived > last && arrived < total {
            p.kill9("deliver-email");
            kills += 1;
            last = arrived;
            p.spawn("deliver-email");
        }
    }
    assert!(
        kills >= 3,
        "only {kills} kills happened while messages flowed"
    );
    p.wait_ready("deliver-email", Duration::from_secs(90));
    let outcomes = final_outcomes(&p, total, Duration::from_secs(240));
    let not_sent: Vec<_> = outcomes.iter().filter(|(_, (k, _))| k != "sent").collect();
    assert!(not_sent.is_empty(), "{not_sent:?}");
    let counts = smtp.send_id_counts();
    let duplicates: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "sent twice after {kills} SIGKILLs: {duplicates:?}"
    );
    assert_eq!(counts.len(), total, "every send id reached the SMTP server");
    let metrics = p.metrics("deliver-email");
    eprintln!(
        "{kills} SIGKILLs; in the last incarnation: {} sends resumed after a cut-short attempt, {} in doubt",
        kairos_tests::sample(&metrics, "kairos_delivery_resumed_sends_total", &[]),
        kairos_tests::sample(&metrics, "kairos_delivery_in_doubt_total", &[])
    );
}
