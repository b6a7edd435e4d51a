//! Retry timing and the circuit breaker that leaves a failing provider alone.

use std::time::{Duration, Instant};

use kairos_core::config::{CircuitBreakerConfig, RetryConfig};
use rand::Rng;

/// Delay before retry number `retry` (1 = the first retry): exponential backoff with
/// full jitter, so many workers retrying at once spread out instead of hammering the
/// provider in step.
pub fn backoff(config: &RetryConfig, retry: u32, rng: &mut impl Rng) -> Duration {
    let cap = config.max_backoff.as_millis() as u64;
    let exp = config
        .initial_backoff
        .as_millis()
        .saturating_mul(1u128 << retry.saturating_sub(1).min(30)) as u64;
    Duration::from_millis(rng.gen_range(0..=exp.min(cap).max(1)))
}

/// How long a send waits after the recipient's server put it off for the
/// `deferrals`-th time (1 = the first): `deferral_backoff`, doubling each time up to
/// `deferral_max_backoff`. No jitter: the token bucket spreads the sends due together,
/// and event-time replays give the same times every run.
pub fn deferral_wait(config: &RetryConfig, deferrals: u32) -> Duration {
    let doubled = config
        .deferral_backoff
        .saturating_mul(1u32 << deferrals.saturating_sub(1).min(20));
    doubled.min(config.deferral_max_backoff)
}

/// The longest a provider's `Retry-After` holds the next attempt: the worker sends
/// one message at a time, so a longer wait would stall its whole backlog (which the
/// circuit breaker and the dead-letter re-drive handle better), and the worker must
/// stay within its health check's 60 s and the consumer's poll interval.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(30);

/// The delay before the next attempt: the backoff, or the wait the provider asked
/// for if longer (up to [`RETRY_AFTER_CAP`]).
pub fn after_asked(backoff: Duration, asked: Option<Duration>) -> Duration {
    backoff.max(asked.unwrap_or_default().min(RETRY_AFTER_CAP))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Requests wait until the instant; then one trial goes through.
    Open(Instant),
    HalfOpen,
}

/// Counts failed requests in a row; at the threshold it opens for `open_for`, then lets
/// one trial request through (half-open): success closes it, failure opens it again.
pub struct CircuitBreaker {
    config: CircuitBreakerConfig,
    failures_in_row: u32,
    state: BreakerState,
    /// Until when the provider asked to be left alone (its `Retry-After`): every
    /// request waits, the next send's too, whatever the state.
    held_until: Option<Instant>,
}

impl CircuitBreaker {
    pub fn new(config: CircuitBreakerConfig) -> Self {
        CircuitBreaker {
            config,
            failures_in_row: 0,
            state: BreakerState::Closed,
            held_until: None,
        }
    }

    /// The provider asked for `wait` before the next request (up to
    /// [`RETRY_AFTER_CAP`]): no request goes before then, this send's or the next's.
    pub fn hold_off(&mut self, now: Instant, wait: Duration) {
        let until = now + wait.min(RETRY_AFTER_CAP);
        self.held_until = Some(self.held_until.map_or(until, |held| held.max(until)));
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// True while the breaker keeps requests away: open, and `open_for` not over (after
    /// it, the next request is the trial).
    pub fn is_open(&self, now: Instant) -> bool {
        matches!(self.state, BreakerState::Open(until) if now < until)
    }

    /// How long to wait before a request may go (zero when it may go now).
    pub fn wait(&mut self, now: Instant) -> Duration {
        let held = match self.held_until {
            Some(until) if now < until => until - now,
            _ => {
                self.held_until = None;
                Duration::ZERO
            }
        };
        let open = match self.state {
            BreakerState::Open(until) if now < until => until - now,
            // The trial goes only once nothing else holds it.
            BreakerState::Open(_) if held.is_zero() => {
                self.state = BreakerState::HalfOpen;
                Duration::ZERO
            }
            _ => Duration::ZERO,
        };
        held.max(open)
    }

    pub fn success(&mut self) {
        self.failures_in_row = 0;
        self.state = BreakerState::Closed;
    }

    pub fn failure(&mut self, now: Instant) {
        self.failures_in_row += 1;
        if self.state == BreakerState::HalfOpen
            || self.failures_in_row >= self.config.failure_threshold
        {
            self.state = BreakerState::Open(now + self.config.open_for);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_deferred_send_waits_minutes_doubling_up_to_the_cap() {
        let config = RetryConfig::default();
        let minutes = |n| deferral_wait(&config, n).as_secs() / 60;
        let waits: Vec<u64> = (1..=6).map(minutes).collect();
        assert_eq!(waits, [5, 10, 20, 40, 60, 60]);
        assert_eq!(minutes(u32::MAX), 60, "no overflow");
    }

    #[test]
    fn a_provider_s_wait_holds_every_request_until_it_is_over() {
        let mut breaker = CircuitBreaker::new(CircuitBreakerConfig {
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
        });
        let now = Instant::now();
        breaker.hold_off(now, Duration::from_secs(2));
        breaker.hold_off(now, Duration::from_secs(1));
        assert_eq!(
            breaker.wait(now),
            Duration::from_secs(2),
            "the longer wait holds"
        );
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.wait(now + Duration::from_secs(3)), Duration::ZERO);
        breaker.hold_off(now, Duration::from_secs(600));
        assert_eq!(breaker.wait(now), RETRY_AFTER_CAP);
        // An open breaker holds its own time too, whichever is longer.
        let mut breaker = CircuitBreaker::new(CircuitBreakerConfig {
            failure_threshold: 1,
            open_for: Duration::from_secs(5),
        });
        breaker.failure(now);
        breaker.hold_off(now, Duration::from_secs(1));
        assert_eq!(breaker.wait(now), Duration::from_secs(5));
        assert_eq!(
            breaker.wait(now + Duration::from_secs(2)),
            Duration::from_secs(3)
        );
        assert_eq!(breaker.wait(now + Duration::from_secs(5)), Duration::ZERO);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn backoff_grows_exponentially_within_the_cap() {
        let config = RetryConfig {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            ..RetryConfig::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for retry in 1..10 {
            let bound = (100u64 << (retry - 1)).min(1000);
            for _ in 0..50 {
                let d = backoff(&config, retry, &mut rng);
                assert!(d <= Duration::from_millis(bound), "retry {retry}: {d:?}");
            }
        }
        // Jitter: the delays of one retry are not all equal.
        let delays: std::collections::BTreeSet<_> =
            (0..20).map(|_| backoff(&config, 3, &mut rng)).collect();
        assert!(delays.len() > 5);
    }

    #[test]
    fn breaker_opens_at_the_threshold_and_recovers_after_a_trial() {
        let mut b = CircuitBreaker::new(CircuitBreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(5),
        });
        let t0 = Instant::now();
        b.failure(t0);
        b.failure(t0);
        assert_eq!(
            b.wait(t0),
            Duration::ZERO,
            "still closed after two failures"
        );
        b.failure(t0);
        assert_eq!(b.wait(t0), Duration::from_secs(5));
        let later = t0 + Duration::from_secs(5);
        assert_eq!(b.wait(later), Duration::ZERO, "one trial after open_for");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.failure(later);
        assert_eq!(
            b.wait(later),
            Duration::from_secs(5),
            "a failed trial reopens"
        );
        b.wait(later + Duration::from_secs(5));
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
