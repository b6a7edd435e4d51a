//! `kairos explain <customer-id>`: a customer's recent triggers and every decision the
//! arbiter took on them, with rule and reason, what became of each send (the delivery
//! worker's and the provider's outcomes), and the arbiter's current view of the
//! customer (suppressions, queue, recent sends).
//!
//! Everything comes from Kafka, so it works from any machine that reaches the broker:
//! the triggers, decisions and outcomes topics (the customer's partition only, as
//! every per-customer topic is keyed by customer id) and the arbiter's changelog (the
//! latest value of the customer's ledger).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;
use kairos_arbiter::CustomerLedger;
use kairos_core::config::{topics, Config};
use kairos_core::contracts::{Decision, Outcome, Trigger};
use kairos_core::replay::partition_for;
use kairos_core::time::{Millis, DAY};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

/// How many of a partition's latest records are read: on a long retention the whole
/// partition would take too long, and the story of one customer is recent.
const RECORDS_PER_PARTITION: i64 = 200_000;

/// The latest records of one partition, as (key, payload).
#[derive(Default)]
struct Latest {
    records: Vec<(Vec<u8>, Vec<u8>)>,
    /// Older records lie before them (more than `RECORDS_PER_PARTITION`).
    cut: bool,
    /// When the first record read was produced (its Kafka timestamp): what was
    /// produced before lies before the records read.
    first_at: Option<Millis>,
}

/// The latest records of one partition (at most `RECORDS_PER_PARTITION`, up to the
/// high watermark) whose key is `key`, and the first one read whatever its key (it
/// tells where the records read begin). Only those are kept: a window of a busy
/// partition, send commands in its outbox copies, would take hundreds of megabytes.
fn read_partition(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    key: &[u8],
) -> anyhow::Result<Latest> {
    let (oldest, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .with_context(|| format!("cannot read the watermarks of {topic}[{partition}]"))?;
    let low = first_offset(oldest, high, RECORDS_PER_PARTITION);
    let mut out = Latest {
        cut: low > oldest,
        ..Latest::default()
    };
    if high <= low {
        return Ok(out);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(low))?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next = low;
    // librdkafka recovers from most errors by itself (a connection dropped, a leader
    // moved): the last one is told only if the read times out.
    let mut last_error = None;
    while next < high {
        if Instant::now() >= deadline {
            let _ = consumer.unassign();
            let why = last_error.map_or(String::new(), |e| format!(" (last error: {e})"));
            anyhow::bail!("reading {topic}[{partition}] timed out at offset {next} of {high}{why}");
        }
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            };
            // A record of the partition read before (fetched before the assignment
            // changed) is not this one's.
            if m.topic() != topic || m.partition() != partition {
                continue;
            }
            next = m.offset() + 1;
            let record_key = m.key().unwrap_or_default();
            if out.records.is_empty() {
                out.first_at = m.timestamp().to_millis();
            }
            if record_key == key || out.records.is_empty() {
                out.records.push((
                    record_key.to_vec(),
                    m.payload().unwrap_or_default().to_vec(),
                ));
            }
        }
    }
    consumer.unassign()?;
    Ok(out)
}

/// Where to start reading a partition from `low` to `high` for its latest `n` records.
fn first_offset(low: i64, high: i64, n: i64) -> i64 {
    low.max(high - n)
}

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

/// The report for `customer`: at most `limit` of the latest triggers.
pub fn explain(config: &Config, customer: &str, limit: usize) -> anyhow::Result<String> {
    let partition = partition_for(customer.as_bytes(), config.kafka.partitions);
    let consumer: BaseConsumer = kairos_core::kafka::client_config(config)?
        .set("group.id", format!("kairos-explain-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        // Records trimmed by retention between the watermarks and the fetch: read on
        // from the oldest left, not from the end.
        .set("auto.offset.reset", "earliest")
        .create()
        .context("cannot create Kafka consumer")?;
    // The customer's partition is the topic's, not this file's: run from another
    // checkout, a different count would read another customer's partition and find
    // nothing.
    let triggers_topic = config.topic(topics::TRIGGERS);
    let metadata = consumer
        .fetch_metadata(Some(&triggers_topic), Duration::from_secs(10))
        .context("cannot fetch the triggers topic's metadata")?;
    let found = kairos_core::kafka::partition_count(&metadata, &triggers_topic);
    if let Some(n) = found.filter(|n| *n != config.kafka.partitions) {
        anyhow::bail!(
            "topic {triggers_topic} has {n} partitions but [kafka] partitions = {}: the \
             customer's records are on another partition than this configuration says; \
             run with the services' configuration (or KAIROS__KAFKA__PARTITIONS={n})",
            config.kafka.partitions
        );
    }
    let read = |topic: &str| {
        read_partition(
            &consumer,
            &config.topic(topic),
            partition,
            customer.as_bytes(),
        )
    };
    let triggers = read(topics::TRIGGERS)?;
    let decisions = read(topics::DECISIONS)?;
    // The report stands without them: a failed read is told, not fatal.
    let outcomes = read(topics::OUTCOMES).map_err(|e| format!("{e:#}"));
    // The ledger's latest value in the changelog (an empty payload deletes it).
    let changelog = if config.state.changelog {
        Some(read_partition(
            &consumer,
            &config.changelog_topic("arbiter"),
            partition,
            format!("s/c/{customer}").as_bytes(),
        )?)
    } else {
        None
    };
    // The triggers of customers merged into this one stay on their own partitions,
    // while the arbiter decides what it took over of them as this customer's: read
    // there too, for the latest few the ledger lists as absorbed.
    let absorbed_ids: Vec<String> = (changelog.as_ref())
        .and_then(|c| stored_ledger(c, customer))
        .filter(|v| !v.is_empty())
        .and_then(|v| kairos_core::encoding::decode_state::<CustomerLedger>(v).ok())
        .map(|l| l.absorbed.into_iter().rev().take(ABSORBED_READ).collect())
        .unwrap_or_default();
    let mut absorbed = Vec::new();
    let mut unread_absorbed = Vec::new();
    for id in absorbed_ids {
        // The report stands without them: a failed read is told, not fatal.
        match read_partition(
            &consumer,
            &config.topic(topics::TRIGGERS),
            partition_for(id.as_bytes(), config.kafka.partitions),
            id.as_bytes(),
        ) {
            Ok(latest) => absorbed.push((id, latest)),
            Err(e) => unread_absorbed.push(format!("{id} ({e:#})")),
        }
    }
    let read = Read {
        triggers,
        decisions,
        outcomes,
        changelog,
        absorbed,
    };
    let mut out = report(customer, partition, &read, limit)?;
    if !unread_absorbed.is_empty() {
        writeln!(
            out,
            "triggers of merged customers not read: {}",
            unread_absorbed.join("; ")
        )?;
    }
    Ok(out)
}

/// Customers merged into the one explained whose triggers are read, at most.
const ABSORBED_READ: usize = 4;

/// What `explain` read of the customer's partition of each topic.
struct Read {
    triggers: Latest,
    decisions: Latest,
    /// What became of the sends: the delivery workers' and providers' outcomes, or
    /// why they were not read.
    outcomes: Result<Latest, String>,
    /// `None`: no changelog is written.
    changelog: Option<Latest>,
    /// The triggers of customers merged into this one, by their ids.
    absorbed: Vec<(String, Latest)>,
}

/// The report of `customer` from the records `read`: at most `limit` triggers.
fn report(customer: &str, partition: i32, read: &Read, limit: usize) -> anyhow::Result<String> {
    // The customer's records (the first one read may be another's).
    fn of<'a>(customer: &'a str, latest: &'a Latest) -> impl Iterator<Item = &'a [u8]> {
        (latest.records.iter())
            .filter(move |(k, _)| k == customer.as_bytes())
            .map(|(_, v)| v.as_slice())
    }
    let mine = |latest| of(customer, latest);
    // Records of the customer this version cannot read (a newer one wrote them): told,
    // so that a decision missing from the report is not taken for none made.
    let mut unreadable: Vec<(&'static str, serde_json::Error)> = Vec::new();
    let mut triggers: BTreeMap<String, Trigger> = BTreeMap::new();
    for payload in mine(&read.triggers) {
        match serde_json::from_slice::<Trigger>(payload) {
            Ok(t) => {
                triggers.insert(t.trigger_id.clone(), t);
            }
            Err(e) => unreadable.push(("trigger", e)),
        }
    }
    let decisions: BTreeMap<String, Vec<Decision>> = grouped(
        mine(&read.decisions),
        "decision",
        |d: &Decision| (d.trigger_id.clone(), d.decision_id.clone()),
        &mut unreadable,
    );
    // The outcomes of each send, in the order they happened.
    let no_outcomes = Latest::default();
    let outcomes_read = read.outcomes.as_ref().unwrap_or(&no_outcomes);
    let mut outcomes: BTreeMap<String, Vec<Outcome>> = grouped(
        mine(outcomes_read),
        "outcome",
        |o: &Outcome| (o.send_id.clone(), o.outcome_id.clone()),
        &mut unreadable,
    );
    for list in outcomes.values_mut() {
        list.sort_by_key(|o| o.occurred_at);
    }
    // When the outcomes read begin, if older ones lie before them: by when they were
    // produced (a provider's report of an open may come late, dated when it was).
    let outcomes_from = outcomes_read
        .cut
        .then(|| outcomes_read.first_at.unwrap_or(Millis::MAX));
    // A merged customer's trigger this one's decisions are about, by where it came from.
    let mut taken_over: BTreeMap<String, &str> = BTreeMap::new();
    for (from, latest) in &read.absorbed {
        for payload in of(from, latest) {
            if let Ok(t) = serde_json::from_slice::<Trigger>(payload) {
                if decisions.contains_key(&t.trigger_id) && !triggers.contains_key(&t.trigger_id) {
                    taken_over.insert(t.trigger_id.clone(), from);
                    triggers.insert(t.trigger_id.clone(), t);
                }
            }
        }
    }
    // Where the decisions read begin, when older ones lie before them: a trigger fired
    // before that may have been decided there. (Unknown: every trigger may have.)
    let decisions_from = read.decisions.cut.then(|| {
        (read.decisions.records.first())
            .and_then(|(_, v)| serde_json::from_slice::<Decision>(v).ok())
            .map_or(Millis::MAX, |d| d.decided_at)
    });
    let mut out = String::new();
    writeln!(out, "customer {customer} (partition {partition})")?;
    if let Some((what, first)) = unreadable.first() {
        writeln!(
            out,
            "{} of the customer's records do not decode and are not shown (the first, a {what}: {first}): a newer version wrote them?",
            unreadable.len()
        )?;
    }
    describe_stored_ledger(&mut out, read.changelog.as_ref(), customer)?;
    if let Err(e) = &read.outcomes {
        writeln!(
            out,
            "what became of the sends is not shown: the outcomes topic was not read ({e})"
        )?;
    }
    // Triggers newest first; decisions whose trigger is no longer on the topic too.
    let mut ids: Vec<(i64, String)> = triggers
        .values()
        .map(|t| (t.fired_at, t.trigger_id.clone()))
        .collect();
    for (id, list) in &decisions {
        if !triggers.contains_key(id) {
            ids.push((list.first().map_or(0, |d| d.decided_at), id.clone()));
        }
    }
    ids.sort_unstable_by(|a, b| b.cmp(a));
    let shown = ids.len().min(limit);
    writeln!(
        out,
        "{} triggers ({shown} latest shown), newest first:",
        ids.len()
    )?;
    if read.triggers.cut || read.decisions.cut {
        writeln!(
            out,
            "(read from the latest {RECORDS_PER_PARTITION} records of each partition: older triggers and decisions lie before them)"
        )?;
    }
    for (_, id) in ids.into_iter().take(limit) {
        match triggers.get(&id) {
            Some(t) => writeln!(
                out,
                "{} trigger {id}: {} step {} ({:?}), channels {:?}, valid until {}{}",
                time(t.fired_at),
                t.scenario,
                t.step,
                t.category,
                t.channels.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
                time(t.valid_until),
                taken_over
                    .get(&id)
                    .map(|from| format!(", taken over from merged customer {from}"))
                    .unwrap_or_default()
            )?,
            None if read.triggers.cut => writeln!(
                out,
                "trigger {id} (before the latest records of the triggers topic read)"
            )?,
            None => writeln!(out, "trigger {id} (no longer on the triggers topic)")?,
        }
        let list = decisions.get(&id).map(Vec::as_slice).unwrap_or_default();
        if list.is_empty() {
            let fired_at = triggers.get(&id).map_or(Millis::MIN, |t| t.fired_at);
            match decisions_from {
                Some(Millis::MAX) => writeln!(
                    out,
                    "    none among the latest records of the decisions topic read: any lie before them"
                )?,
                Some(from) if fired_at <= from => writeln!(
                    out,
                    "    none among the latest records of the decisions topic read (from {}): any lie before them",
                    time(from)
                )?,
                _ => writeln!(out, "    no decision yet")?,
            }
        }
        for d in list {
            let channel = d
                .channel
                .map(|c| format!(" on {}", c.as_str()))
                .unwrap_or_default();
            let send = d
                .send_id
                .as_ref()
                .map(|s| format!(" send {s}"))
                .unwrap_or_default();
            writeln!(
                out,
                "    {} {}{channel}{send} by {}: {}",
                time(d.decided_at),
                d.outcome.as_str(),
                d.rule,
                d.reason
            )?;
            if let (Some(send_id), Ok(_)) = (&d.send_id, &read.outcomes) {
                let of_send = outcomes.get(send_id).map(Vec::as_slice);
                describe_send(&mut out, of_send, outcomes_from, d.decided_at)?;
            }
        }
    }
    Ok(out)
}

/// Records decoded as `T`, grouped by the first of `ids` (the trigger of a decision, the
/// send of an outcome) in the order read, each once by the second (a record re-sent
/// after a crash repeats its id); one that does not decode is noted in `unreadable`
/// as `what`.
fn grouped<'a, T: serde::de::DeserializeOwned>(
    payloads: impl Iterator<Item = &'a [u8]>,
    what: &'static str,
    ids: impl Fn(&T) -> (String, String),
    unreadable: &mut Vec<(&'static str, serde_json::Error)>,
) -> BTreeMap<String, Vec<T>> {
    let mut groups: BTreeMap<String, Vec<(String, T)>> = BTreeMap::new();
    for payload in payloads {
        match serde_json::from_slice::<T>(payload) {
            Ok(record) => {
                let (group, id) = ids(&record);
                let list = groups.entry(group).or_default();
                if !list.iter().any(|(seen, _)| *seen == id) {
                    list.push((id, record));
                }
            }
            Err(e) => unreadable.push((what, e)),
        }
    }
    (groups.into_iter())
        .map(|(group, list)| (group, list.into_iter().map(|(_, r)| r).collect()))
        .collect()
}

/// What became of a send decided at `decided_at`: its `outcomes` in order, or why none
/// is shown (`outcomes_from`: where the outcomes read begin, when older ones lie before
/// them).
fn describe_send(
    out: &mut String,
    outcomes: Option<&[Outcome]>,
    outcomes_from: Option<Millis>,
    decided_at: Millis,
) -> anyhow::Result<()> {
    let before_read = outcomes_from.is_some_and(|from| decided_at <= from);
    match outcomes {
        Some(list) => {
            if before_read {
                writeln!(
                    out,
                    "        (earlier ones may lie before the latest records of the outcomes topic read)"
                )?;
            }
            for o in list {
                let reason = o.reason.as_ref().map(|r| format!(": {r}"));
                let address = o.address.as_ref().map(|a| format!(" to {a}"));
                writeln!(
                    out,
                    "        {} {}{}{}",
                    time(o.occurred_at),
                    o.kind.as_str(),
                    address.unwrap_or_default(),
                    reason.unwrap_or_default()
                )?;
            }
        }
        None if before_read => writeln!(
            out,
            "        no outcome among the latest records of the outcomes topic read: any lie before them"
        )?,
        None => writeln!(
            out,
            "        no outcome yet (on its way to the delivery worker, or set aside there: a recipient's server put it off)"
        )?,
    }
    Ok(())
}

/// The latest value of `customer`'s ledger among the changelog records read (empty:
/// deleted).
fn stored_ledger<'a>(changelog: &'a Latest, customer: &str) -> Option<&'a [u8]> {
    let ledger_key = format!("s/c/{customer}");
    (changelog.records.iter().rev())
        .find(|(k, _)| k == ledger_key.as_bytes())
        .map(|(_, v)| v.as_slice())
}

/// The customer's arbiter state as the latest records of the arbiter's changelog
/// partition hold it (`None`: no changelog is written), or why it is not shown.
fn describe_stored_ledger(
    out: &mut String,
    changelog: Option<&Latest>,
    customer: &str,
) -> anyhow::Result<()> {
    let stored = changelog.and_then(|c| stored_ledger(c, customer));
    match (changelog, stored) {
        (None, _) => writeln!(
            out,
            "arbiter state: not readable here (state.changelog is off: it is only in the arbiter's RocksDB)"
        )?,
        // An empty value is the ledger's deletion.
        (Some(_), Some([])) => writeln!(out, "arbiter state: none (deleted)")?,
        (Some(_), Some(v)) => match kairos_core::encoding::decode_state::<CustomerLedger>(v) {
            Ok(l) => out.push_str(&describe_ledger(&l, kairos_core::time::wall_now())?),
            Err(e) => writeln!(out, "arbiter state: stored, but does not decode: {e:#}")?,
        },
        (Some(c), None) if c.cut => writeln!(
            out,
            "arbiter state: not within the latest {RECORDS_PER_PARTITION} records of its changelog partition (a customer quiet for long is further back)"
        )?,
        (Some(_), None) => writeln!(out, "arbiter state: none")?,
    }
    Ok(())
}

/// The arbiter's view of the customer at `now`: sends in the 7 days before it, every
/// suppression, the queue with each entry's rule and wake-up, the chain and cascades.
fn describe_ledger(l: &CustomerLedger, now: Millis) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut sends: BTreeMap<&str, usize> = BTreeMap::new();
    // The ledger drops older sends only when it next decides: count the last 7 days.
    for (_, channel, _) in l.sends.iter().filter(|(at, _, _)| now - at < 7 * DAY) {
        *sends.entry(channel.as_str()).or_default() += 1;
    }
    writeln!(
        out,
        "arbiter state: sends in the last 7 days {sends:?}; ignored in a row {}",
        l.ignored_in_row
    )?;
    for (channel, at) in &l.unsubscribed {
        writeln!(
            out,
            "  unsubscribed from {} at {}",
            channel.as_str(),
            time(*at)
        )?;
    }
    // Every address that bounced: the latest is in `hard_bounced`, all in `bounced`.
    let mut bounced: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (channel, addresses) in &l.bounced {
        bounced
            .entry(channel.as_str())
            .or_default()
            .extend(addresses.iter().map(String::as_str));
    }
    for (channel, address) in &l.hard_bounced {
        let list = bounced.entry(channel.as_str()).or_default();
        if !list.contains(&address.as_str()) {
            list.push(address);
        }
    }
    for (channel, addresses) in &bounced {
        writeln!(
            out,
            "  hard bounce on {channel}: {} not used",
            addresses.join(", ")
        )?;
    }
    if let Some(at) = l.complained_at {
        writeln!(out, "  complained at {}: no promo", time(at))?;
    }
    if let Some(at) = l.last_purchase_at {
        writeln!(out, "  last purchase at {}", time(at))?;
    }
    if let Some(at) = l.last_active_at {
        writeln!(out, "  last visit at {}", time(at))?;
    }
    for (channel, at) in &l.opted_in {
        writeln!(out, "  opted in on {} at {}", channel.as_str(), time(*at))?;
    }
    if let Some(m) = &l.main {
        writeln!(
            out,
            "  main scenario: {} (priority {}) until {}",
            m.scenario,
            m.priority,
            time(m.until)
        )?;
    }
    for (id, q) in &l.queued {
        let wake = q.wake_at.map_or("an unknown time".to_string(), time);
        writeln!(
            out,
            "  queued: {id} ({}) waits for {} until {wake}",
            q.scenario,
            q.rule.as_deref().unwrap_or("an unrecorded rule")
        )?;
    }
    if let Some(into) = &l.merged_into {
        writeln!(
            out,
            "  merged into {into} (identity resolution): its messages go there"
        )?;
    }
    if !l.absorbed.is_empty() {
        writeln!(
            out,
            "  merged into this customer: {}",
            l.absorbed.join(", ")
        )?;
    }
    for (id, c) in &l.cascades {
        let sent: Vec<&str> = c.channels.iter().map(|c| c.as_str()).collect();
        writeln!(
            out,
            "  cascade in flight: {id} ({}), sent on {}",
            c.scenario,
            sent.join(", ")
        )?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_arbiter::Queued;
    use kairos_core::contracts::{Channel, MessageCategory};
    use kairos_core::time::HOUR;

    const T0: Millis = 1_767_603_600_000; // 2026-01-05T09:00:00Z

    /// A welcome trigger `id` of c-1, fired at `fired_at`.
    fn trigger(id: &str, fired_at: Millis) -> Trigger {
        Trigger {
            merged_from: Vec::new(),
            trigger_id: id.into(),
            scenario: "welcome".into(),
            customer_id: "c-1".into(),
            category: MessageCategory::trigger,
            step: 0,
            template: "welcome".into(),
            channels: vec![Channel::email],
            priority: 50,
            fired_at,
            valid_until: fired_at + DAY,
            cause_event_id: None,
            cause_occurred_at: fired_at,
            contacts: kairos_core::contracts::Contacts::default(),
            variables: "{}".into(),
        }
    }

    /// A decision to send `trigger` of `customer` by e-mail, at `decided_at`.
    fn decision(customer: &str, trigger: &str, decided_at: Millis) -> Decision {
        Decision {
            decision_id: format!("{trigger}-d"),
            trigger_id: trigger.into(),
            customer_id: customer.into(),
            scenario: "welcome".into(),
            category: MessageCategory::trigger,
            outcome: kairos_core::contracts::DecisionOutcome::sent,
            channel: Some(Channel::email),
            send_id: None,
            rule: "channel_choice".into(),
            reason: "e-mail".into(),
            decided_at,
            group: None,
        }
    }

    fn record(key: &str, json: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
        (key.as_bytes().to_vec(), json)
    }

    /// Records of (key, value), older ones before them if `cut`, the first produced
    /// at `first_at`.
    fn latest<T: serde::Serialize>(
        records: &[(&str, T)],
        cut: bool,
        first_at: Option<Millis>,
    ) -> Latest {
        Latest {
            records: (records.iter())
                .map(|(key, v)| record(key, serde_json::to_vec(v).expect("encode")))
                .collect(),
            cut,
            first_at,
        }
    }

    /// Under each decision to send, what became of the send: its outcomes in the
    /// order they happened (a repeat shown once, another customer's left out, a
    /// reason shown), or why none is shown.
    #[test]
    fn what_became_of_each_send_is_shown_under_its_decision() {
        use kairos_core::contracts::OutcomeKind;
        let outcome = |send: &str, customer: &str, kind, at, reason: Option<&str>| Outcome {
            outcome_id: format!("{send}-{}", OutcomeKind::as_str(kind)),
            send_id: send.into(),
            customer_id: customer.into(),
            scenario: "welcome".into(),
            channel: Channel::email,
            category: MessageCategory::trigger,
            kind,
            reason: reason.map(str::to_string),
            occurred_at: at,
            address: Some(format!("{customer}@example.com")),
        };
        let sent = |trigger: &str, at: Millis| Decision {
            send_id: Some(format!("s-{trigger}")),
            ..decision("c-1", trigger, at)
        };
        let minute = 60_000;
        let read = || Read {
            triggers: latest(
                &[
                    ("c-1", trigger("t1", T0)),
                    ("c-1", trigger("t2", T0 + HOUR)),
                    ("c-1", trigger("t3", T0 + 2 * HOUR)),
                ],
                false,
                None,
            ),
            decisions: latest(
                &[
                    ("c-1", sent("t1", T0)),
                    ("c-1", sent("t2", T0 + HOUR)),
                    ("c-1", sent("t3", T0 + 2 * HOUR)),
                ],
                false,
                None,
            ),
            outcomes: Ok(latest(
                &[
                    (
                        "c-1",
                        outcome("s-t1", "c-1", OutcomeKind::opened, T0 + 9 * minute, None),
                    ),
                    (
                        "c-1",
                        outcome("s-t1", "c-1", OutcomeKind::sent, T0 + minute, None),
                    ),
                    (
                        "c-1",
                        outcome("s-t1", "c-1", OutcomeKind::sent, T0 + minute, None),
                    ),
                    (
                        "c-2",
                        outcome("s-t1", "c-2", OutcomeKind::clicked, T0 + minute, None),
                    ),
                    (
                        "c-1",
                        outcome(
                            "s-t2",
                            "c-1",
                            OutcomeKind::failed,
                            T0 + HOUR + minute,
                            Some("consent_withdrawn: unsubscribed"),
                        ),
                    ),
                ],
                false,
                None,
            )),
            changelog: None,
            absorbed: Vec::new(),
        };
        let out = report("c-1", 0, &read(), 10).unwrap();
        let under = |id: &str| {
            let at = out.find(&format!("trigger {id}")).expect(id);
            out[at..]
                .lines()
                .skip(2)
                .take_while(|l| l.starts_with("        "))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            under("t1"),
            [
                "        2026-01-05T09:01:00Z sent to c-1@example.com",
                "        2026-01-05T09:09:00Z opened to c-1@example.com",
            ],
            "{out}"
        );
        assert_eq!(
            under("t2"),
            ["        2026-01-05T10:01:00Z failed to c-1@example.com: consent_withdrawn: unsubscribed"],
            "{out}"
        );
        assert_eq!(under("t3"), ["        no outcome yet (on its way to the delivery worker, or set aside there: a recipient's server put it off)"], "{out}");
        // The outcomes read begin with one produced half an hour after t1's decision
        // (another customer's, dated earlier): t1's may lie before them, whole or in
        // part; t3's is not there yet.
        let mut cut = read();
        cut.outcomes = Ok(latest(
            &[
                (
                    "c-2",
                    outcome("s-x", "c-2", OutcomeKind::opened, T0 + minute, None),
                ),
                (
                    "c-1",
                    outcome(
                        "s-t2",
                        "c-1",
                        OutcomeKind::opened,
                        T0 + HOUR + 5 * minute,
                        None,
                    ),
                ),
            ],
            true,
            Some(T0 + 30 * minute),
        ));
        let second_line = |out: &str, id: &str| {
            let at = out.find(&format!("trigger {id}")).expect(id);
            out[at..].lines().nth(2).unwrap_or_default().to_string()
        };
        let out = report("c-1", 0, &cut, 10).unwrap();
        assert!(
            second_line(&out, "t1").contains("any lie before them"),
            "{out}"
        );
        assert!(second_line(&out, "t2").contains("opened"), "{out}");
        assert!(second_line(&out, "t3").contains("no outcome yet"), "{out}");
        cut.outcomes = Ok(latest(
            &[(
                "c-1",
                outcome("s-t1", "c-1", OutcomeKind::opened, T0 + 9 * minute, None),
            )],
            true,
            Some(T0 + 10 * minute),
        ));
        let out = report("c-1", 0, &cut, 10).unwrap();
        assert!(
            second_line(&out, "t1").contains("earlier ones may lie before"),
            "{out}"
        );
        // Not read at all: said once, and nothing claimed of any send.
        cut.outcomes = Err("timed out".into());
        let out = report("c-1", 0, &cut, 10).unwrap();
        assert!(
            out.contains("what became of the sends is not shown: the outcomes topic was not read (timed out)"),
            "{out}"
        );
        assert!(!out.contains("no outcome yet"), "{out}");
    }

    /// Decisions are read as the latest records of their own partition, which begin
    /// later than the triggers read: a trigger fired before the decisions read begin
    /// is not said to wait for a decision, nor a decision's trigger to be gone from a
    /// topic read only in part.
    #[test]
    fn a_trigger_decided_before_the_decisions_read_is_not_said_to_wait() {
        let read = Read {
            triggers: latest(
                &[
                    ("c-1", trigger("t-old", T0)),
                    ("c-1", trigger("t-new", T0 + 2 * HOUR)),
                ],
                false,
                None,
            ),
            decisions: latest(
                &[
                    ("c-2", decision("c-2", "t-x", T0 + HOUR)),
                    ("c-1", decision("c-1", "t-gone", T0 + HOUR)),
                ],
                true,
                None,
            ),
            outcomes: Ok(Latest::default()),
            changelog: None,
            absorbed: Vec::new(),
        };
        let out = report("c-1", 0, &read, 10).unwrap();
        assert!(!out.contains("do not decode"), "{out}");
        let after = |id: &str| {
            let at = out.find(&format!("trigger {id}")).expect(id);
            out[at..].lines().nth(1).unwrap_or_default().to_string()
        };
        assert_eq!(after("t-new"), "    no decision yet", "{out}");
        assert!(after("t-old").contains("any lie before them"), "{out}");
        assert!(
            out.contains("trigger t-gone (no longer on the triggers topic)"),
            "{out}"
        );
        let read = Read {
            triggers: Latest {
                cut: true,
                ..read.triggers
            },
            ..read
        };
        let out = report("c-1", 0, &read, 10).unwrap();
        assert!(
            out.contains("trigger t-gone (before the latest records of the triggers topic read)"),
            "{out}"
        );
        // Customer c-9 merged into c-1: its trigger t-gone, decided as c-1's, is on
        // c-9's partition.
        let read = Read {
            absorbed: vec![(
                "c-9".into(),
                latest(
                    &[(
                        "c-9",
                        Trigger {
                            customer_id: "c-9".into(),
                            ..trigger("t-gone", T0 + HOUR / 2)
                        },
                    )],
                    false,
                    None,
                ),
            )],
            ..read
        };
        let out = report("c-1", 0, &read, 10).unwrap();
        assert!(
            out.contains("trigger t-gone: welcome step 0")
                && out.contains("taken over from merged customer c-9"),
            "{out}"
        );
        // A decision of a newer version's making is told of, not left out in silence.
        let mut decisions = read.decisions;
        decisions.records.push(record(
            "c-1",
            br#"{"decision_id":"d-new","outcome":"teleported"}"#.to_vec(),
        ));
        let read = Read { decisions, ..read };
        let out = report("c-1", 0, &read, 10).unwrap();
        assert!(
            out.contains("1 of the customer's records do not decode and are not shown (the first, a decision:"),
            "{out}"
        );
    }

    /// Where no ledger is shown, the report says why: no changelog, a window that
    /// stops short of it, a deletion, or none at all.
    #[test]
    fn a_ledger_not_shown_says_why() {
        let line = |changelog: Option<&Latest>| {
            let mut out = String::new();
            describe_stored_ledger(&mut out, changelog, "c-1").expect("report");
            out
        };
        let latest = |records: Vec<(&str, Vec<u8>)>, cut| Latest {
            records: (records.into_iter())
                .map(|(k, v)| (k.as_bytes().to_vec(), v))
                .collect(),
            cut,
            first_at: None,
        };
        assert!(line(None).contains("state.changelog is off"));
        let other = || vec![("s/c/c-2", b"x".to_vec())];
        assert!(line(Some(&latest(other(), true))).contains("not within the latest"));
        assert_eq!(line(Some(&latest(other(), false))), "arbiter state: none\n");
        let deleted = latest(
            vec![("s/c/c-1", b"x".to_vec()), ("s/c/c-1", Vec::new())],
            true,
        );
        assert_eq!(line(Some(&deleted)), "arbiter state: none (deleted)\n");
        let bad = latest(vec![("s/c/c-1", vec![0xc1])], false);
        assert!(line(Some(&bad)).contains("does not decode"));
        let stored =
            kairos_core::encoding::encode_state(&CustomerLedger::default()).expect("encode");
        let shown = line(Some(&latest(vec![("s/c/c-1", stored)], true)));
        assert!(
            !shown.contains("none") && !shown.contains("not "),
            "{shown}"
        );
    }

    #[test]
    fn the_ledger_shows_recent_sends_every_bounce_and_the_queue() {
        let mut l = CustomerLedger {
            sends: vec![
                (T0 - 8 * DAY, Channel::email, MessageCategory::trigger),
                (T0 - DAY, Channel::email, MessageCategory::trigger),
                (T0 - HOUR, Channel::push, MessageCategory::promo),
            ],
            ..CustomerLedger::default()
        };
        l.bounced
            .insert(Channel::email, vec!["old@x".into(), "older@x".into()]);
        l.hard_bounced.insert(Channel::email, "older@x".into());
        l.hard_bounced.insert(Channel::push, "token-1".into());
        l.queued.insert(
            "t1".into(),
            Queued {
                scenario: "welcome".into(),
                rule: Some("quiet_hours".into()),
                wake_at: Some(T0 + HOUR),
                ..Queued::default()
            },
        );
        let out = describe_ledger(&l, T0).expect("format");
        assert!(
            out.contains(r#"sends in the last 7 days {"email": 1, "push": 1}"#),
            "{out}"
        );
        assert!(
            out.contains("hard bounce on email: old@x, older@x not used"),
            "{out}"
        );
        assert!(
            out.contains("hard bounce on push: token-1 not used"),
            "{out}"
        );
        assert!(
            out.contains("queued: t1 (welcome) waits for quiet_hours until 2026-01-05T10:00:00Z"),
            "{out}"
        );
    }

    #[test]
    fn only_the_latest_records_of_a_partition_are_read() {
        assert_eq!(first_offset(0, 10, 100), 0);
        assert_eq!(first_offset(5, 1_000, 100), 900);
        assert_eq!(first_offset(950, 1_000, 100), 950);
    }
}
