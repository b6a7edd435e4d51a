//! Touches expire: a customer's last touch (`t/<customer>`) is deleted once no purchase
//! can be attributed to it any more, and pending purchases (`q/<customer>`) once no
//! touch that could take them is read any more (one made before them is older than
//! `state.dedup_window`).
//!
//! A purchase is attributed when it happened at most the attribution window after the
//! touch, and it is applied only when its own time is within `state.dedup_window` of
//! the clock (an older one is counted apart, see [`kairos_core::dedup`]). So once the
//! clock passes the touch's time plus both windows, nothing can reach the touch, and
//! customers who were touched once and never again do not keep a key for ever.
//!
//! One sweep timer per partition and kind walks the keys in key order, a bounded number per
//! firing, with its cursor in the timer's payload; a finished pass waits a day before
//! the next. A daily pass reads every touch once (a RocksDB iteration, about a
//! microsecond a key), which is cheaper than a timer per customer held in memory, and
//! it also reaches touches written before touches expired.

use std::time::Duration;

use kairos_core::encoding::decode_state;
use kairos_core::runtime::Ctx;
use kairos_core::store::DueTimer;
use kairos_core::time::{Millis, DAY};
use serde::{Deserialize, Serialize};

use crate::attribution::{PendingPurchases, Touch};

/// Key prefix of the touches.
pub const TOUCH_PREFIX: &str = "t/";

/// Key prefix of the purchases waiting for a touch.
pub const PENDING_PREFIX: &str = "q/";

/// Touches looked at per firing at most, so a batch stays small.
const SWEEP_LIMIT: usize = 5_000;

/// The sweep timer's payload: the last touch key the current pass looked at.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct SweepState {
    after: Option<String>,
}

/// When the keys of one prefix expire, and their sweep.
#[derive(Debug, Clone, Copy)]
pub struct Expiry {
    prefix: &'static str,
    timer_id: &'static str,
    /// How long after the time its value names a key lives.
    lifetime: Millis,
    /// The time a value names (`None`: nothing left to keep).
    time_of: fn(&[u8]) -> anyhow::Result<Option<Millis>>,
}

// Converted as `SeenIds` converts the deduplication window, so the two agree.
fn millis(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

impl Expiry {
    /// Touches: kept the attribution window plus the deduplication window.
    pub fn touches(attribution_window: Duration, dedup_window: Duration) -> Self {
        Expiry {
            prefix: TOUCH_PREFIX,
            timer_id: "sweep/touches",
            lifetime: millis(attribution_window).saturating_add(millis(dedup_window)),
            time_of: |value| {
                let touch: Touch = decode_state(value)
                    .map_err(|e| anyhow::anyhow!("a touch does not decode: {e}"))?;
                Ok(Some(touch.at))
            },
        }
    }

    /// Pending purchases: kept the deduplication window after the newest (a touch
    /// before it is refused as too old after that).
    pub fn pending_purchases(dedup_window: Duration) -> Self {
        Expiry {
            prefix: PENDING_PREFIX,
            timer_id: "sweep/pending-purchases",
            lifetime: millis(dedup_window),
            time_of: |value| {
                let pending: PendingPurchases = decode_state(value)
                    .map_err(|e| anyhow::anyhow!("pending purchases do not decode: {e}"))?;
                Ok(pending.newest_at())
            },
        }
    }

    pub fn timer_id(&self) -> &'static str {
        self.timer_id
    }

    /// From when a key whose value names `at` is no use any more.
    pub fn expires_at(&self, at: Millis) -> Millis {
        at.saturating_add(self.lifetime).saturating_add(1)
    }

    /// The first time still in use when the clock reads `now`.
    pub fn oldest_kept(&self, now: Millis) -> Millis {
        now.saturating_sub(self.lifetime)
    }

    /// Arms the sweep when it is not armed: called whenever a key is written, so a
    /// partition with keys always has its sweep.
    pub fn arm(&self, ctx: &mut Ctx<'_>, at: Millis) -> anyhow::Result<()> {
        if ctx.timer_fire_at(self.timer_id)?.is_none() {
            let first = self.expires_at(at).max(ctx.now());
            ctx.schedule(self.timer_id, first, &SweepState::default())?;
        }
        Ok(())
    }

    /// The sweep fired: deletes the expired keys among the next [`SWEEP_LIMIT`] and
    /// arms itself again: at once while the pass goes on, a day later when it ended
    /// with keys left, not at all when none are left (the next write arms it).
    pub fn sweep(&self, ctx: &mut Ctx<'_>, timer: &DueTimer) -> anyhow::Result<()> {
        let state: SweepState = timer.decode()?;
        let now = ctx.now();
        let keys = ctx.scan_from(self.prefix, state.after.as_deref(), SWEEP_LIMIT)?;
        // A pass that went on from a cursor may have kept keys before it.
        let mut kept = state.after.is_some();
        for (key, value) in &keys {
            let at = (self.time_of)(value).map_err(|e| anyhow::anyhow!("{key:?}: {e}"))?;
            if at.is_none_or(|at| self.expires_at(at) <= now) {
                ctx.delete(key);
            } else {
                kept = true;
            }
        }
        if keys.len() == SWEEP_LIMIT {
            let after = keys.last().map(|(k, _)| k.clone());
            ctx.schedule(self.timer_id, now, &SweepState { after })?;
        } else if kept {
            ctx.schedule(
                self.timer_id,
                now.saturating_add(DAY),
                &SweepState::default(),
            )?;
        }
        Ok(())
    }
}
