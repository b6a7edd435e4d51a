//! `SeenIds`: ids are deduplicated within the window, swept after it (state and
//! changelog), and keys written before the index existed are indexed and swept too.

use std::path::Path;

use kairos_core::config::Config;
use kairos_core::dedup::SeenIds;
use kairos_core::encoding::Rejection;
use kairos_core::replay::Replayer;
use kairos_core::runtime::{Ctx, Processor, Record};
use kairos_core::store::{DueTimer, OutboxEntry};
use kairos_core::time::{Millis, DAY};

const INPUT: &str = "in";
const OUTPUT: &str = "seen";
const WINDOW_DAYS: i64 = 3;

/// `id,own time,event time` (event time advances the partition's clock), or
/// `legacy,id,first seen` (a key as written before ids expired).
struct SeenProcessor {
    seen: SeenIds,
}

impl Processor for SeenProcessor {
    type Input = Vec<String>;
    fn name(&self) -> &str {
        "seen"
    }
    fn inputs(&self) -> Vec<String> {
        vec![INPUT.into()]
    }
    fn decode(&self, record: &Record<'_>) -> Result<Vec<String>, Rejection> {
        Ok(String::from_utf8_lossy(record.payload)
            .split(',')
            .map(str::to_string)
            .collect())
    }
    fn event_time(&self, input: &Vec<String>) -> Option<Millis> {
        input[2].parse().ok()
    }
    fn process(&mut self, ctx: &mut Ctx<'_>, input: Vec<String>) -> anyhow::Result<()> {
        if input[0] == "legacy" {
            let first_seen: Millis = input[2].parse()?;
            ctx.put(&format!("o/{}", input[1]), &first_seen)?;
            return Ok(());
        }
        let seen = self.seen.check(ctx, &input[0], input[1].parse()?)?;
        ctx.emit(OUTPUT, "k", &format!("{}:{seen:?}", input[0]));
        Ok(())
    }
    fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: &DueTimer) -> anyhow::Result<()> {
        assert_eq!(timer.timer_id, self.seen.timer_id());
        self.seen.sweep(ctx, timer)
    }
}

fn replayer(dir: &Path) -> Replayer<SeenProcessor> {
    let config = Config::from_text(
        Path::new("test.toml"),
        "[kafka]\npartitions = 1\n[clock]\nmode = \"event\"\n[state]\nmax_batch_records = 100\n",
        &[("KAIROS__STATE__DIR".into(), dir.display().to_string())],
    )
    .expect("config");
    let window = std::time::Duration::from_secs(WINDOW_DAYS as u64 * 86_400);
    let processor = SeenProcessor {
        seen: SeenIds::new("o/", "ox", window),
    };
    Replayer::new(processor, &config, &prometheus::Registry::new()).expect("replayer")
}

/// Feeds `lines` and commits; returns what the processor said of each id.
fn feed(r: &mut Replayer<SeenProcessor>, lines: &[String]) -> Vec<String> {
    let mut out: Vec<OutboxEntry> = Vec::new();
    for line in lines {
        out.extend(r.push(INPUT, b"k", line.as_bytes()).expect("push"));
    }
    out.extend(r.commit().expect("commit"));
    out.iter()
        .filter(|o| o.topic == OUTPUT)
        .map(|o| serde_json::from_slice::<String>(&o.payload).expect("output"))
        .collect()
}

fn keys(r: &Replayer<SeenProcessor>, prefix: &str) -> Vec<String> {
    let store = r.engine.store(0).expect("partition 0");
    store
        .scan_state(prefix.as_bytes())
        .expect("scan")
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
        .collect()
}

fn line(id: &str, own: Millis, now: Millis) -> String {
    format!("{id},{own},{now}")
}

#[test]
fn ids_count_once_within_the_window_and_are_deleted_after_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut r = replayer(dir.path());
    let t0 = 100 * DAY + 3_600_000;
    assert_eq!(
        feed(
            &mut r,
            &[line("a", t0, t0), line("b", t0, t0), line("a", t0, t0 + 1)]
        ),
        ["a:First", "b:First", "a:Again"]
    );
    // A day later, within the window: still known.
    assert_eq!(
        feed(&mut r, &[line("a", t0, t0 + DAY)]),
        ["a:Again"],
        "a copy a day later is a duplicate"
    );
    assert_eq!(keys(&r, "o/"), ["o/a", "o/b"]);
    // The window has passed for day 100 once day 104 begins (day 100 ends at 101 days).
    let after = (101 + WINDOW_DAYS) * DAY;
    feed(&mut r, &[line("c", after - 1, after - 1)]);
    assert_eq!(
        keys(&r, "o/"),
        ["o/a", "o/b", "o/c"],
        "not yet out of the window"
    );
    feed(&mut r, &[line("d", after, after)]);
    r.commit().expect("commit");
    assert_eq!(
        keys(&r, "o/"),
        ["o/c", "o/d"],
        "day 100's ids are deleted, the later ones kept"
    );
    let index = keys(&r, "ox/");
    assert_eq!(index.len(), 2, "{index:?}");
    assert!(index.iter().all(|k| k.ends_with("/c") || k.ends_with("/d")));
    // A copy of "a" now, with its own old time, is not taken for a new record.
    assert_eq!(
        feed(&mut r, &[line("a", t0, after + 1)]),
        ["a:BeforeWindow"]
    );
    assert_eq!(keys(&r, "o/"), ["o/c", "o/d"], "and it is not recorded");
    // A record of its own recent time is new, though.
    assert_eq!(feed(&mut r, &[line("e", after, after + 2)]), ["e:First"]);
}

/// A record whose own time is ahead of the clock (an event up to a day ahead) is
/// kept until a copy of it is before the window: one arriving after its first-seen
/// day's sweep is no new record.
#[test]
fn an_id_whose_own_time_is_ahead_is_kept_until_a_copy_is_before_the_window() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut r = replayer(dir.path());
    let t0 = 200 * DAY + 3_600_000;
    let ahead = t0 + DAY;
    assert_eq!(feed(&mut r, &[line("f", ahead, t0)]), ["f:First"]);
    // Day 200's ids are out of the window; the copy's own time is not.
    let after = (201 + WINDOW_DAYS) * DAY;
    feed(&mut r, &[line("g", after, after)]);
    assert_eq!(feed(&mut r, &[line("f", ahead, after + 1)]), ["f:Again"]);
}

#[test]
fn a_sweep_with_more_than_a_batch_to_delete_goes_on_in_the_next_batches() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut r = replayer(dir.path());
    let t0 = 200 * DAY;
    let count = 12_000;
    let lines: Vec<String> = (0..count)
        .map(|i| line(&format!("id{i:05}"), t0, t0 + i))
        .collect();
    assert!(feed(&mut r, &lines).iter().all(|s| s.ends_with(":First")));
    assert_eq!(keys(&r, "o/").len(), count as usize);
    let later = (201 + WINDOW_DAYS) * DAY;
    feed(&mut r, &[line("late", later, later)]);
    // Each commit fires the sweep again while it has more to delete.
    for _ in 0..3 {
        r.commit().expect("commit");
    }
    assert_eq!(keys(&r, "o/"), ["o/late"]);
    assert_eq!(keys(&r, "ox/").len(), 1);
}

#[test]
fn keys_written_before_the_index_are_indexed_and_swept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut r = replayer(dir.path());
    let t0 = 300 * DAY;
    // Two keys as an earlier version wrote them: one already out of the window, one
    // not yet.
    feed(
        &mut r,
        &[
            format!("legacy,old,{}", t0 - 10 * DAY),
            format!("legacy,recent,{t0}"),
        ],
    );
    // The first id recorded since starts the pass over them.
    assert_eq!(feed(&mut r, &[line("x", t0, t0)]), ["x:First"]);
    // A copy of a record counted before the upgrade is still known.
    assert_eq!(
        feed(&mut r, &[line("recent", t0, t0 + 1)]),
        ["recent:Again"]
    );
    r.commit().expect("commit");
    assert_eq!(
        keys(&r, "o/"),
        ["o/recent", "o/x"],
        "the legacy key out of the window is gone"
    );
    assert_eq!(keys(&r, "ox/").len(), 2, "the recent legacy key is indexed");
    assert_eq!(keys(&r, "ox-indexed").len(), 1, "the pass is marked done");
    let later = (301 + WINDOW_DAYS) * DAY;
    feed(&mut r, &[line("y", later, later)]);
    r.commit().expect("commit");
    assert_eq!(keys(&r, "o/"), ["o/y"]);
}
