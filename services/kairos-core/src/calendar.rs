//! Dated occasions in the customer's own time zone.

use chrono::{Datelike, NaiveDate, NaiveDateTime, NaiveTime, TimeZone};
use chrono_tz::Tz;

use crate::time::Millis;

/// The first `month`/`day` at `hour:minute` local time in `tz` strictly after `after`.
/// February 29 falls on February 28 in other years. A local time that does not exist
/// (the hour skipped when clocks go forward) is the instant the clocks jump over it;
/// one that exists twice (clocks going back) takes the first.
pub fn next_yearly(
    month: u32,
    day: u32,
    (hour, minute): (u32, u32),
    tz: Tz,
    after: Millis,
) -> Option<Millis> {
    let after_local = chrono::DateTime::from_timestamp_millis(after)?.with_timezone(&tz);
    for year in after_local.year()..after_local.year() + 3 {
        let date = NaiveDate::from_ymd_opt(year, month, day).or_else(|| {
            (month == 2 && day == 29).then(|| NaiveDate::from_ymd_opt(year, 2, 28))?
        })?;
        let local = date.and_hms_opt(hour, minute, 0)?;
        let at = to_utc(tz, local)?;
        if at > after {
            return Some(at);
        }
    }
    None
}

fn to_utc(tz: Tz, local: NaiveDateTime) -> Option<Millis> {
    match tz.from_local_datetime(&local) {
        chrono::LocalResult::Single(t) => Some(t.timestamp_millis()),
        chrono::LocalResult::Ambiguous(first, _) => Some(first.timestamp_millis()),
        chrono::LocalResult::None => end_of_gap(tz, local),
    }
}

/// The instant the clocks jump over `skipped` (a local time in a gap, as 02:30 on the
/// night summer time starts): the first whose local time is later. A quiet window
/// ending at 02:30 ends at 03:00 then, not at 03:30 as moving by the gap's length
/// would have it.
fn end_of_gap(tz: Tz, skipped: NaiveDateTime) -> Option<Millis> {
    let local = |at: Millis| {
        chrono::DateTime::from_timestamp_millis(at).map(|t| t.with_timezone(&tz).naive_local())
    };
    // A local time the gap's length later exists: usually an hour, up to a day where
    // a zone jumped over a date.
    let (hours, after) = (1..=24).find_map(|hours| {
        tz.from_local_datetime(&(skipped + chrono::Duration::hours(hours)))
            .earliest()
            .map(|t| (hours, t.timestamp_millis()))
    })?;
    // Local time is before `skipped` at `before` and after it at `after`: the jump is
    // between, found by halving.
    let (mut before, mut after) = (after - hours * crate::time::HOUR, after);
    while after - before > 1 {
        let mid = before + (after - before) / 2;
        if local(mid)? >= skipped {
            after = mid;
        } else {
            before = mid;
        }
    }
    Some(after)
}

/// `days` local calendar days after the day `at` falls on in `tz`, at `hour:minute`
/// local time there (a time the clocks skip: the instant they jump over it; one that
/// exists twice: the first). A week after a 10:00 greeting is 10:00 again across a
/// change to or from summer time, not 09:00 or 11:00.
pub fn local_days_later(
    at: Millis,
    tz: Tz,
    days: u64,
    (hour, minute): (u32, u32),
) -> Option<Millis> {
    let date = local_date(at, tz)?.checked_add_days(chrono::Days::new(days))?;
    to_utc(tz, date.and_hms_opt(hour, minute, 0)?)
}

/// Parses `YYYY-MM-DD` into (month, day).
pub fn month_day(date: &str) -> Option<(u32, u32)> {
    let d = NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
    Some((d.month(), d.day()))
}

/// Month and day of an instant in `tz`.
pub fn local_month_day(at: Millis, tz: Tz) -> Option<(u32, u32)> {
    let t = chrono::DateTime::from_timestamp_millis(at)?.with_timezone(&tz);
    Some((t.month(), t.day()))
}

/// The first instant of the local day after the one `at` falls on in `tz`.
pub fn start_of_next_local_day(at: Millis, tz: Tz) -> Option<Millis> {
    let local = chrono::DateTime::from_timestamp_millis(at)?.with_timezone(&tz);
    let next = local.date_naive().succ_opt()?;
    to_utc(tz, next.and_hms_opt(0, 0, 0)?)
}

/// The local year `year` begins in `tz`.
pub fn start_of_local_year(year: i32, tz: Tz) -> Option<Millis> {
    to_utc(
        tz,
        NaiveDate::from_ymd_opt(year, 1, 1)?.and_hms_opt(0, 0, 0)?,
    )
}

/// The year of the yearly occasion on `(month, day)` that a greeting sent at `at`
/// was for, judged in `tz`: the occasion within two days of `at`'s local date (a
/// zone changed since the greeting moves its local date by up to two days, and a
/// greeting late on 31 December would read as the next year), else `at`'s local
/// year. A 29 February is the 28th in other years.
pub fn occasion_year(at: Millis, tz: Tz, month_day: Option<(u32, u32)>) -> Option<i32> {
    let local = local_date(at, tz)?;
    let Some((month, day)) = month_day else {
        return Some(local.year());
    };
    let occasion = |year: i32| {
        NaiveDate::from_ymd_opt(year, month, day)
            .or_else(|| NaiveDate::from_ymd_opt(year, month, day.saturating_sub(1)))
    };
    Some(
        [local.year() - 1, local.year(), local.year() + 1]
            .into_iter()
            .find(|y| occasion(*y).is_some_and(|d| (local - d).num_days().abs() <= 2))
            .unwrap_or(local.year()),
    )
}

/// The customer's zone, UTC when unknown or invalid.
pub fn zone(name: Option<&str>) -> Tz {
    zone_or(name, chrono_tz::UTC)
}

/// The customer's zone, `fallback` when unknown or invalid.
pub fn zone_or(name: Option<&str>, fallback: Tz) -> Tz {
    name.and_then(|n| n.parse().ok()).unwrap_or(fallback)
}

/// The local calendar day `at` falls on in `tz`.
pub fn local_date(at: Millis, tz: Tz) -> Option<NaiveDate> {
    Some(
        chrono::DateTime::from_timestamp_millis(at)?
            .with_timezone(&tz)
            .date_naive(),
    )
}

/// The local time of day of `at` in `tz`.
pub fn local_time(at: Millis, tz: Tz) -> Option<NaiveTime> {
    Some(
        chrono::DateTime::from_timestamp_millis(at)?
            .with_timezone(&tz)
            .time(),
    )
}

/// The first instant at or after `at` whose local time in `tz` is `time` (of a time
/// the clocks skip, the instant they jump over it; of a time that exists twice, the
/// first pass not yet over).
pub fn next_local_time(at: Millis, tz: Tz, time: NaiveTime) -> Option<Millis> {
    let day = local_date(at, tz)?;
    let today = to_utc_not_before(tz, day.and_time(time), at)?;
    if today >= at {
        return Some(today);
    }
    to_utc_not_before(tz, day.succ_opt()?.and_time(time), at)
}

/// [`to_utc`], except that a local time that exists twice maps to its later instant
/// when the earlier one is before `not_before`: at the second 02:10 of a night the
/// clocks go back, the next 02:30 is the second one, not the one an hour ago.
fn to_utc_not_before(tz: Tz, local: NaiveDateTime, not_before: Millis) -> Option<Millis> {
    match tz.from_local_datetime(&local) {
        chrono::LocalResult::Ambiguous(first, second) => {
            let first = first.timestamp_millis();
            Some(if first >= not_before {
                first
            } else {
                second.timestamp_millis()
            })
        }
        _ => to_utc(tz, local),
    }
}

/// Whether local `time` lies in the window [start, end), which may span midnight.
pub fn within_window(time: NaiveTime, start: NaiveTime, end: NaiveTime) -> bool {
    if start <= end {
        time >= start && time < end
    } else {
        time >= start || time < end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> Millis {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn ten_am_local_on_both_sides_of_dst() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // March 20: CET (UTC+1); April 20: CEST (UTC+2).
        assert_eq!(
            next_yearly(3, 20, (10, 0), berlin, utc("2026-01-01T00:00:00Z")),
            Some(utc("2026-03-20T09:00:00Z"))
        );
        assert_eq!(
            next_yearly(4, 20, (10, 0), berlin, utc("2026-01-01T00:00:00Z")),
            Some(utc("2026-04-20T08:00:00Z"))
        );
    }

    #[test]
    fn skipped_and_repeated_local_times() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // 2026-03-29 02:30 does not exist in Berlin: the clocks jump over it at 02:00
        // CET (01:00 UTC) to 03:00 CEST.
        assert_eq!(
            next_yearly(3, 29, (2, 30), berlin, utc("2026-01-01T00:00:00Z")),
            Some(utc("2026-03-29T01:00:00Z"))
        );
        let half_past_two = NaiveTime::from_hms_opt(2, 30, 0).unwrap();
        assert_eq!(
            next_local_time(utc("2026-03-28T23:00:00Z"), berlin, half_past_two),
            Some(utc("2026-03-29T01:00:00Z"))
        );
        // Lord Howe moves by half an hour: 02:15 on 2026-10-04 is skipped (02:00
        // +10:30 is 15:30 UTC the day before, then 02:30 +11:00).
        let lord_howe: Tz = "Australia/Lord_Howe".parse().unwrap();
        let quarter_past_two = NaiveTime::from_hms_opt(2, 15, 0).unwrap();
        assert_eq!(
            next_local_time(utc("2026-10-03T13:00:00Z"), lord_howe, quarter_past_two),
            Some(utc("2026-10-03T15:30:00Z"))
        );
        // 2026-10-25 02:30 exists twice: the first (CEST) is 00:30 UTC.
        assert_eq!(
            next_yearly(10, 25, (2, 30), berlin, utc("2026-01-01T00:00:00Z")),
            Some(utc("2026-10-25T00:30:00Z"))
        );
    }

    #[test]
    fn a_repeated_local_time_is_the_first_pass_not_yet_over() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let half_past_two = NaiveTime::from_hms_opt(2, 30, 0).unwrap();
        // 2026-10-25 02:30 exists twice in Berlin: 00:30 UTC (CEST), 01:30 UTC (CET).
        // From the first 02:10 the first 02:30 is next; from the second 02:10 (or
        // between the two 02:30s) the second is.
        for (at, next) in [
            ("2026-10-25T00:10:00Z", "2026-10-25T00:30:00Z"),
            ("2026-10-25T00:30:00Z", "2026-10-25T00:30:00Z"),
            ("2026-10-25T00:45:00Z", "2026-10-25T01:30:00Z"),
            ("2026-10-25T01:10:00Z", "2026-10-25T01:30:00Z"),
            ("2026-10-25T01:30:00Z", "2026-10-25T01:30:00Z"),
            ("2026-10-25T01:31:00Z", "2026-10-26T01:30:00Z"),
        ] {
            assert_eq!(
                next_local_time(utc(at), berlin, half_past_two),
                Some(utc(next)),
                "from {at}"
            );
        }
        // The day before, 02:30 on the 25th is the first pass.
        assert_eq!(
            next_local_time(utc("2026-10-24T12:00:00Z"), berlin, half_past_two),
            Some(utc("2026-10-25T00:30:00Z"))
        );
    }

    #[test]
    fn next_local_day_starts_at_local_midnight() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        assert_eq!(
            start_of_next_local_day(utc("2026-02-10T09:00:00Z"), berlin),
            Some(utc("2026-02-10T23:00:00Z"))
        );
        // 23:30 UTC is already the next day in Berlin.
        assert_eq!(
            start_of_next_local_day(utc("2026-02-10T23:30:00Z"), berlin),
            Some(utc("2026-02-11T23:00:00Z"))
        );
    }

    #[test]
    fn rolls_to_next_year_and_handles_leap_day() {
        let utc_tz = chrono_tz::UTC;
        assert_eq!(
            next_yearly(1, 5, (10, 0), utc_tz, utc("2026-01-05T10:00:00Z")),
            Some(utc("2027-01-05T10:00:00Z"))
        );
        assert_eq!(
            next_yearly(2, 29, (10, 0), utc_tz, utc("2026-01-01T00:00:00Z")),
            Some(utc("2026-02-28T10:00:00Z"))
        );
        assert_eq!(month_day("1990-02-29"), None, "not a date");
        assert_eq!(month_day("1992-02-29"), Some((2, 29)));
    }

    /// A greeting counts for the occasion it was for, however the zone moved its
    /// local date since.
    #[test]
    fn a_greeting_s_year_is_its_occasion_s() {
        let ms = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .expect("time")
                .timestamp_millis()
        };
        let zone = |n: &str| zone(Some(n));
        // 31 December, 10:00 in New York, read in Sydney (1 January there).
        let eve = ms("2026-12-31T15:00:00Z");
        assert_eq!(
            occasion_year(eve, zone("Australia/Sydney"), Some((12, 31))),
            Some(2026)
        );
        // 1 January, 10:00 in Sydney, read in Honolulu (31 December there).
        let new_year = ms("2026-12-31T23:00:00Z");
        assert_eq!(
            occasion_year(new_year, zone("Pacific/Honolulu"), Some((1, 1))),
            Some(2027)
        );
        // 29 February greeted on the 28th of a common year.
        let leap = ms("2027-02-28T09:00:00Z");
        assert_eq!(occasion_year(leap, zone("UTC"), Some((2, 29))), Some(2027));
        // No date known: the local year.
        assert_eq!(
            occasion_year(eve, zone("Australia/Sydney"), None),
            Some(2027)
        );
        assert_eq!(
            start_of_local_year(2027, zone("Europe/Berlin")),
            Some(ms("2026-12-31T23:00:00Z"))
        );
    }
}
