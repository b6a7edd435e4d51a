//! Ids of records seen, kept for a window and then deleted, so that deduplication by
//! id does not grow a processor's state (and its changelog) for ever.
//!
//! An id is kept under `<prefix><id>` (its value the time it is kept from: when it was
//! first seen, or its record's own time if that is later), the same key as before ids
//! expired, so stores written then still deduplicate. An index key
//! `<index>/<day>/<id>` (that time's day) lets one timer per partition sweep
//! whole days at once, oldest first: it deletes both keys once their day lies wholly
//! before `now - window`, a bounded number per firing, and arms itself for the day after
//! the oldest left. The deletions are ordinary state deletions, so the changelog
//! forgets them too. Keys written before the index existed are indexed (or deleted, if
//! already out of the window) by one pass over the key prefix, after which a marker
//! key says the pass is done.
//!
//! Copies of a record arrive after a crash or a producer retry, minutes after the
//! first: a window of weeks is far wider. Past it, a record is no longer known as a
//! duplicate, so [`SeenIds::check`] also reports a record whose own time is older than
//! the window ([`Seen::BeforeWindow`]): its first copy may have been forgotten already,
//! and the caller decides what to do with it instead of counting it again.

use serde::{Deserialize, Serialize};

use crate::encoding::decode_state;
use crate::runtime::Ctx;
use crate::store::DueTimer;
use crate::time::{Millis, DAY};

/// Keys a sweep deletes (or indexes) per firing at most, so a batch stays small; a
/// sweep with more to do fires again at once, in the next batch.
const SWEEP_LIMIT: usize = 5_000;

/// What [`SeenIds::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First seen: recorded now.
    First,
    /// Seen before, within the window.
    Again,
    /// Not known, but the record's own time is older than the window: a copy of it may
    /// have come and been forgotten. Not recorded.
    BeforeWindow,
}

/// The ids one kind of record is deduplicated by (see the module's documentation).
#[derive(Debug, Clone)]
pub struct SeenIds {
    /// Key prefix of the ids, e.g. `o/`.
    prefix: &'static str,
    /// Key prefix of the index by day, e.g. `ox`.
    index: &'static str,
    window: Millis,
}

/// The sweep timer's payload: how far the pass over keys written before the index
/// got (the last key it looked at).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct SweepState {
    legacy_after: Option<String>,
}

impl SeenIds {
    /// Ids under `prefix` (ending in `/`), indexed under `index` (a different prefix,
    /// not starting with `prefix`), kept for `window` after they were first seen.
    pub fn new(prefix: &'static str, index: &'static str, window: std::time::Duration) -> Self {
        debug_assert!(prefix.ends_with('/') && !index.starts_with(prefix));
        SeenIds {
            prefix,
            index,
            window: Millis::try_from(window.as_millis()).unwrap_or(Millis::MAX),
        }
    }

    /// The id of the partition's sweep timer: route a due timer with this id to
    /// [`SeenIds::sweep`].
    pub fn timer_id(&self) -> String {
        format!("sweep/{}", self.index)
    }

    /// Whether the record `id`, whose own time is `at`, is seen for the first time;
    /// records it when so.
    pub fn check(&self, ctx: &mut Ctx<'_>, id: &str, at: Millis) -> anyhow::Result<Seen> {
        let key = [self.prefix, id].concat();
        if ctx.get::<Millis>(&key)?.is_some() {
            return Ok(Seen::Again);
        }
        let now = ctx.now();
        if at < now.saturating_sub(self.window) {
            return Ok(Seen::BeforeWindow);
        }
        // Kept from its own time when that is ahead of the clock (an event up to
        // `clock.max_event_lead` ahead), so it is swept only once a copy of it would
        // be before the window.
        let kept_from = now.max(at);
        ctx.put(&key, &kept_from)?;
        ctx.put(&self.index_key(day_of(kept_from), id), &())?;
        let timer = self.timer_id();
        if ctx.timer_fire_at(&timer)?.is_none() {
            let (fire_at, state) = if self.legacy_indexed(ctx)? {
                (self.deletable_at(day_of(now)), SweepState::default())
            } else {
                // Keys written before the index: the first firing starts indexing them.
                let legacy_after = Some(String::new());
                (now, SweepState { legacy_after })
            };
            ctx.schedule(&timer, fire_at, &state)?;
        }
        Ok(Seen::First)
    }

    /// Whether `id` is kept (seen within the window).
    pub fn contains(&self, ctx: &Ctx<'_>, id: &str) -> anyhow::Result<bool> {
        Ok(ctx.get::<Millis>(&[self.prefix, id].concat())?.is_some())
    }

    /// The ids kept that start with `id_prefix`, with the time each is kept from.
    pub fn kept_with_prefix(
        &self,
        ctx: &Ctx<'_>,
        id_prefix: &str,
    ) -> anyhow::Result<Vec<(String, Millis)>> {
        let prefix = [self.prefix, id_prefix].concat();
        Ok(ctx
            .scan::<Millis>(&prefix)?
            .into_iter()
            .filter_map(|(key, at)| Some((key.strip_prefix(self.prefix)?.to_string(), at)))
            .collect())
    }

    /// Forgets `id` (both its keys), so the record counts as first seen when it comes
    /// again: for a record whose effect did not happen after all and that may be sent
    /// again on purpose (a send given up and dead-lettered, re-produced from there).
    pub fn forget(&self, ctx: &mut Ctx<'_>, id: &str) -> anyhow::Result<()> {
        let key = [self.prefix, id].concat();
        if let Some(first_seen) = ctx.get::<Millis>(&key)? {
            ctx.delete(&self.index_key(day_of(first_seen), id));
            ctx.delete(&key);
        }
        Ok(())
    }

    /// The sweep timer fired: deletes the ids whose whole day is out of the window
    /// (oldest first, at most [`SWEEP_LIMIT`]), goes on with indexing keys written
    /// before the index, and arms the timer again if anything is left.
    pub fn sweep(&self, ctx: &mut Ctx<'_>, timer: &DueTimer) -> anyhow::Result<()> {
        let mut state: SweepState = timer.decode()?;
        let now = ctx.now();
        // Days before this one are wholly out of the window.
        let horizon_day = day_of(now.saturating_sub(self.window));
        let index_prefix = format!("{}/", self.index);
        let mut budget = SWEEP_LIMIT;
        let mut oldest_left = None;
        for (key, _) in ctx.scan_from(&index_prefix, None, budget)? {
            let Some((day, id)) = parse_index_key(&key[index_prefix.len()..]) else {
                anyhow::bail!("malformed deduplication index key {key:?}");
            };
            if day >= horizon_day {
                oldest_left = Some(day);
                break;
            }
            ctx.delete(&[self.prefix, id].concat());
            ctx.delete(&key);
            budget -= 1;
        }
        let mut again_at = None;
        if budget == 0 {
            // More to delete than one batch should hold: on in the next one.
            again_at = Some(now);
        } else if let Some(after) = state.legacy_after.take() {
            let after = (!after.is_empty()).then_some(after);
            let keys = ctx.scan_from(self.prefix, after.as_deref(), budget)?;
            let done = keys.len() < budget;
            for (key, value) in &keys {
                let first_seen: Millis = decode_state(value).map_err(|e| {
                    anyhow::anyhow!("deduplication key {key:?} does not decode: {e}")
                })?;
                let day = day_of(first_seen);
                if day < horizon_day {
                    ctx.delete(key);
                } else {
                    ctx.put(&self.index_key(day, &key[self.prefix.len()..]), &())?;
                    oldest_left = Some(oldest_left.map_or(day, |d: i64| d.min(day)));
                }
            }
            if done {
                ctx.put(&self.legacy_marker(), &true)?;
            } else {
                state.legacy_after = keys.last().map(|(k, _)| k.clone());
                again_at = Some(now);
            }
        }
        let again_at = again_at.or(oldest_left.map(|day| self.deletable_at(day)));
        if let Some(at) = again_at {
            ctx.schedule(&self.timer_id(), at, &state)?;
        }
        Ok(())
    }

    fn index_key(&self, day: i64, id: &str) -> String {
        format!("{}/{day:08}/{id}", self.index)
    }

    /// Marker key: every key under the prefix has its index entry.
    fn legacy_marker(&self) -> String {
        format!("{}-indexed", self.index)
    }

    fn legacy_indexed(&self, ctx: &Ctx<'_>) -> anyhow::Result<bool> {
        Ok(ctx.get::<bool>(&self.legacy_marker())?.is_some())
    }

    /// When the ids first seen on `day` are all out of the window.
    fn deletable_at(&self, day: i64) -> Millis {
        (day + 1).saturating_mul(DAY).saturating_add(self.window)
    }
}

fn day_of(at: Millis) -> i64 {
    at.div_euclid(DAY).max(0)
}

/// `<day>/<id>` of an index key, without the index prefix.
fn parse_index_key(rest: &str) -> Option<(i64, &str)> {
    let (day, id) = rest.split_once('/')?;
    Some((day.parse().ok()?, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_keys_sort_by_day_and_parse_back() {
        let seen = SeenIds::new("o/", "ox", std::time::Duration::from_secs(86_400));
        let early = seen.index_key(9, "z/1");
        let late = seen.index_key(10, "a");
        assert!(early < late, "{early} sorts before {late}");
        assert_eq!(parse_index_key(&early["ox/".len()..]), Some((9, "z/1")));
        assert_eq!(parse_index_key("x/1"), None);
    }

    #[test]
    fn a_day_is_deletable_once_all_of_it_is_out_of_the_window() {
        let seen = SeenIds::new("o/", "ox", std::time::Duration::from_secs(2 * 86_400));
        // Day 10 ends at 11 days; out of a two-day window at 13 days.
        assert_eq!(seen.deletable_at(10), 13 * DAY);
        assert_eq!(day_of(13 * DAY - 1 - 2 * DAY), 10);
        assert_eq!(day_of(13 * DAY - 2 * DAY), 11);
    }
}
