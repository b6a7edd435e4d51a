//! Touches expire: a customer's touches (`t/<customer>`) are deleted once no purchase
//! can be attributed to the newest any more.
//!
//! A purchase is attributed when it happened at most the attribution window after the
//! touch, and it is applied only when its own time is within `state.dedup_window` of
//! the clock (an older one is counted apart, see [`kairos_core::dedup`]), then waits
//! `feedback.attribution_delay`. So once the clock passes the touch's time plus the
//! three, nothing can reach the touch, and customers who were touched once and never
//! again do not keep a key for ever.
//!
//! One sweep timer per partition walks the touches in key order, a bounded number per
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

use crate::attribution::StoredTouches;

/// Key prefix of the touches.
pub const TOUCH_PREFIX: &str = "t/";

/// The sweep timer's id.
pub const SWEEP_TIMER: &str = "sweep/touches";

/// Touches looked at per firing at most, so a batch stays small.
const SWEEP_LIMIT: usize = 5_000;

/// The sweep timer's payload: the last touch key the current pass looked at.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct SweepState {
    after: Option<String>,
}

/// When touches expire.
#[derive(Debug, Clone, Copy)]
pub struct TouchExpiry {
    /// Attribution window, deduplication window and attribution delay.
    lifetime: Millis,
}

impl TouchExpiry {
    pub fn new(attribution_window: Duration, dedup_window: Duration, delay: Duration) -> Self {
        // Converted as `SeenIds` converts the deduplication window, so the two agree.
        let millis = |d: Duration| Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX);
        TouchExpiry {
            lifetime: millis(attribution_window)
                .saturating_add(millis(dedup_window))
                .saturating_add(millis(delay)),
        }
    }

    /// From when no purchase can be attributed to a touch made at `at`.
    pub fn expires_at(&self, at: Millis) -> Millis {
        at.saturating_add(self.lifetime).saturating_add(1)
    }

    /// Arms the sweep when it is not armed: called whenever a touch is written, so a
    /// partition with touches always has its sweep.
    pub fn arm(&self, ctx: &mut Ctx<'_>, touch_at: Millis) -> anyhow::Result<()> {
        if ctx.timer_fire_at(SWEEP_TIMER)?.is_none() {
            let first = self.expires_at(touch_at).max(ctx.now());
            ctx.schedule(SWEEP_TIMER, first, &SweepState::default())?;
        }
        Ok(())
    }

    /// The sweep fired: deletes the expired touches among the next [`SWEEP_LIMIT`]
    /// and arms itself again: at once while the pass goes on, a day later when it
    /// ended with touches left, not at all when none are left (the next touch arms it).
    pub fn sweep(&self, ctx: &mut Ctx<'_>, timer: &DueTimer) -> anyhow::Result<()> {
        let state: SweepState = timer.decode()?;
        let now = ctx.now();
        let keys = ctx.scan_from(TOUCH_PREFIX, state.after.as_deref(), SWEEP_LIMIT)?;
        // A pass that went on from a cursor may have kept touches before it.
        let mut kept = state.after.is_some();
        for (key, value) in &keys {
            let touches = decode_state::<StoredTouches>(value)
                .map_err(|e| anyhow::anyhow!("touches {key:?} do not decode: {e}"))?
                .into_vec();
            let newest = touches.iter().map(|t| t.at).max().unwrap_or(Millis::MIN);
            if self.expires_at(newest) <= now {
                ctx.delete(key);
            } else {
                kept = true;
            }
        }
        if keys.len() == SWEEP_LIMIT {
            let after = keys.last().map(|(k, _)| k.clone());
            ctx.schedule(SWEEP_TIMER, now, &SweepState { after })?;
        } else if kept {
            ctx.schedule(SWEEP_TIMER, now.saturating_add(DAY), &SweepState::default())?;
        }
        Ok(())
    }
}
