//! The e-mail worker killed with SIGKILL while it sends to a real SMTP server, restarted
//! on its own state or replaced by an instance that restores it from the changelog.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use kairos_tests::delivery::{
    cart_variables, email_worker_env, final_outcomes, send_command, SmtpSink,
};
use kairos_tests::{short_session_timeout, Options, Pipeline};

#[test]
fn sigkilled_email_worker_sends_every_message_exactly_once() {
    sends_every_message_once_through_kills(|p, _| {
        p.spawn("deliver-email");
        "deliver-email".to_string()
    });
}

/// Each kill moves the partitions to an instance with a state directory of its own,
/// which restores them from the changelog: the provider-call markers of the sends cut
/// short must reach it there.
#[test]
fn an_email_worker_killed_mid_send_and_replaced_by_a_new_instance_sends_every_message_once() {
    sends_every_message_once_through_kills(|p, kills| {
        let instance = format!("deliver-email-{kills}");
        p.spawn_instance(&instance, "deliver-email");
        instance
    });
}

/// Sends 3,000 e-mails through the worker, SIGKILLing it whenever it made progress
/// since the last kill; `restart` starts the next worker after a kill and names it.
/// Every send id must reach the SMTP server exactly once.
fn sends_every_message_once_through_kills(restart: fn(&mut Pipeline, u32) -> String) {
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
    let mut worker = "deliver-email".to_string();
    let mut kills = 0;
    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    while kills < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        let arrived = smtp.messages().len();
        if arrived > last && arrived < total {
            p.kill9(&worker);
            kills += 1;
            last = arrived;
            worker = restart(&mut p, kills);
        }
    }
    assert!(
        kills >= 3,
        "only {kills} kills happened while messages flowed"
    );
    p.wait_ready(&worker, Duration::from_secs(90));
    let outcomes = final_outcomes(&p, total, Duration::from_secs(240));
    assert_eq!(outcomes.len(), total, "every send has a final outcome");
    // Every terminal outcome published, copies re-published after a kill included:
    // one kind per send, `sent` (a copy carries the same outcome id, which consumers
    // drop), never a `failed` beside it.
    p.wait_caught_up("deliver-email", &["send.email"], Duration::from_secs(120));
    let mut kinds: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for o in p.read_all_json("outcomes") {
        let kind = o["kind"].as_str().unwrap_or_default();
        if ["sent", "failed", "bounced_hard"].contains(&kind) {
            let send_id = o["send_id"].as_str().unwrap_or_default().to_string();
            kinds.entry(send_id).or_default().insert(kind.to_string());
        }
    }
    assert_eq!(kinds.len(), total);
    let not_sent: Vec<_> = kinds
        .iter()
        .filter(|(_, k)| k.len() != 1 || !k.contains("sent"))
        .collect();
    assert!(not_sent.is_empty(), "{not_sent:?}");
    let counts = smtp.send_id_counts();
    let duplicates: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "sent twice after {kills} SIGKILLs: {duplicates:?}"
    );
    assert_eq!(counts.len(), total, "every send id reached the SMTP server");
    let metrics = p.metrics(&worker);
    eprintln!(
        "{kills} SIGKILLs; in the last incarnation ({worker}): {} sends resumed after a cut-short attempt, {} in doubt",
        kairos_tests::sample(&metrics, "kairos_delivery_resumed_sends_total", &[]),
        kairos_tests::sample(&metrics, "kairos_delivery_in_doubt_total", &[])
    );
}
