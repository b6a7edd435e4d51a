//! Time: epoch milliseconds everywhere, one clock abstraction.
//!
//! In wall-clock mode "now" is the system time. In event-time mode "now" is the highest
//! event timestamp (or heartbeat) seen on a partition, so a 30-day scenario can be
//! replayed in seconds through the very same code.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer};

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

pub const SECOND: Millis = 1_000;
pub const MINUTE: Millis = 60 * SECOND;
pub const HOUR: Millis = 60 * MINUTE;
pub const DAY: Millis = 24 * HOUR;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockMode {
    /// Production: time is the machine's clock.
    Wall,
    /// Time advances with input timestamps and heartbeats.
    Event,
}

/// The current time of one partition.
#[derive(Debug, Clone)]
pub struct Clock {
    mode: ClockMode,
    event_time: Millis,
}

impl Clock {
    pub fn new(mode: ClockMode, restored_event_time: Millis) -> Self {
        Clock {
            mode,
            event_time: restored_event_time,
        }
    }

    pub fn mode(&self) -> ClockMode {
        self.mode
    }

    /// Called for every input record: in event-time mode time only moves forward.
    pub fn observe(&mut self, event_time: Millis) {
        if event_time > self.event_time {
            self.event_time = event_time;
        }
    }

    pub fn event_time(&self) -> Millis {
        self.event_time
    }

    pub fn now(&self) -> Millis {
        match self.mode {
            ClockMode::Wall => wall_now(),
            ClockMode::Event => self.event_time,
        }
    }
}

pub fn wall_now() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// The times an input may carry: from 2000-01-01 to the end of 9999. Anything outside
/// is a broken clock or a bad field, and the durations added to an event's time (a
/// 30-day wait, a year to the next birthday) stay far from `i64`'s limits. The lower
/// bound catches the commonest producer mistake, epoch seconds where milliseconds are
/// due: today in seconds reads as January 1970 and would be applied as history.
pub const INPUT_TIMES: std::ops::RangeInclusive<Millis> = 946_684_800_000..=253_402_300_799_999;

/// `at` if it lies in [`INPUT_TIMES`], else why not (for the dead-letter reason).
pub fn check_input_time(at: Millis) -> Result<Millis, String> {
    if INPUT_TIMES.contains(&at) {
        Ok(at)
    } else if at
        .checked_mul(1000)
        .is_some_and(|ms| INPUT_TIMES.contains(&ms))
    {
        Err(format!(
            "timestamp {at} is before 2000-01-01T00:00:00Z; it looks like epoch seconds \
             ({}), but Kairos reads epoch milliseconds or an RFC 3339 string",
            format_millis(at * 1000)
        ))
    } else {
        Err(format!(
            "timestamp {at} is outside 2000-01-01T00:00:00Z..9999-12-31T23:59:59.999Z"
        ))
    }
}

/// Accepts epoch milliseconds (integer) or an RFC 3339 string such as
/// `2026-11-22T10:00:00Z`, so hand-written `kcat` events stay readable; either must lie
/// in [`INPUT_TIMES`].
pub fn deserialize_millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Millis, D::Error> {
    struct MillisVisitor;
    impl serde::de::Visitor<'_> for MillisVisitor {
        type Value = Millis;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("epoch milliseconds or an RFC 3339 timestamp")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Millis, E> {
            check_input_time(v).map_err(E::custom)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Millis, E> {
            let v = i64::try_from(v).unwrap_or(i64::MAX);
            check_input_time(v).map_err(E::custom)
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Millis, E> {
            // Saturates (NaN to 0), and a saturated value is out of range.
            if !v.is_finite() {
                return Err(E::custom(format!(
                    "timestamp {v} is not a number of milliseconds"
                )));
            }
            check_input_time(v as Millis).map_err(E::custom)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Millis, E> {
            let at = chrono::DateTime::parse_from_rfc3339(v)
                .map(|t| t.timestamp_millis())
                .map_err(|e| E::custom(format!("invalid RFC 3339 timestamp {v:?}: {e}")))?;
            check_input_time(at).map_err(E::custom)
        }
    }
    deserializer.deserialize_any(MillisVisitor)
}

/// Formats epoch milliseconds as RFC 3339 for logs and `kairos explain`.
pub fn format_millis(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct T {
        #[serde(deserialize_with = "deserialize_millis")]
        at: Millis,
    }

    #[test]
    fn accepts_millis_and_rfc3339() {
        let a: T = serde_json::from_str(r#"{"at": 1700000000123}"#).unwrap();
        assert_eq!(a.at, 1_700_000_000_123);
        let b: T = serde_json::from_str(r#"{"at": "2023-11-14T22:13:20.123Z"}"#).unwrap();
        assert_eq!(b.at, 1_700_000_000_123);
        assert!(serde_json::from_str::<T>(r#"{"at": "yesterday"}"#).is_err());
    }

    #[test]
    fn epoch_seconds_and_times_before_2000_are_refused_with_a_hint() {
        let seconds = serde_json::from_str::<T>(r#"{"at": 1764950000}"#)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            seconds.contains("looks like epoch seconds (2025-12-05T15:53:20.000Z)"),
            "{seconds}"
        );
        let before = serde_json::from_str::<T>(r#"{"at": "1999-12-31T23:59:59.999Z"}"#)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(before.contains("outside 2000-01-01T00:00:00Z"), "{before}");
        let first: T = serde_json::from_str(r#"{"at": "2000-01-01T00:00:00Z"}"#).unwrap();
        assert_eq!(first.at, 946_684_800_000);
    }

    #[test]
    fn event_clock_only_moves_forward() {
        let mut c = Clock::new(ClockMode::Event, 100);
        c.observe(50);
        assert_eq!(c.now(), 100);
        c.observe(200);
        assert_eq!(c.now(), 200);
    }
}
