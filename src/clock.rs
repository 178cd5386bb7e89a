//! Time as an input.
//!
//! The engine never reads the system time itself: every decision is given `now` in microseconds
//! since the Unix epoch. The server passes [`SystemClock`]; tests pass a [`ManualClock`] and move
//! time forward (refill, minute windows, day rollover, hold expiry) instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds in one second.
pub const MICROS_PER_SECOND: u64 = 1_000_000;
/// Microseconds in one minute.
pub const MICROS_PER_MINUTE: u64 = 60 * MICROS_PER_SECOND;
/// Microseconds in one UTC day (UTC has no leap seconds in Unix time).
pub const MICROS_PER_DAY: u64 = 24 * 60 * MICROS_PER_MINUTE;

/// A source of wall-clock time, in microseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now_micros(&self) -> u64;
}

/// The real wall clock. A clock that steps backwards is tolerated by the engine (elapsed time is
/// clamped at zero), so NTP corrections never mint tokens.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to: for tests and benchmarks.
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    /// A clock standing at `now_micros`.
    pub fn new(now_micros: u64) -> Self {
        Self {
            now: AtomicU64::new(now_micros),
        }
    }

    /// Move the clock forward by `micros`.
    pub fn advance(&self, micros: u64) {
        self.now.fetch_add(micros, Ordering::SeqCst);
    }

    /// Move the clock forward by whole seconds.
    pub fn advance_secs(&self, secs: u64) {
        self.advance(secs * MICROS_PER_SECOND);
    }

    /// Put the clock at `now_micros` (it may go backwards: tests use this for clock steps).
    pub fn set(&self, now_micros: u64) {
        self.now.store(now_micros, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_micros(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

/// The UTC day number of a time (days since the epoch).
pub fn utc_day(now_micros: u64) -> u32 {
    u32::try_from(now_micros / MICROS_PER_DAY).unwrap_or(u32::MAX)
}

/// Microseconds from `now_micros` until UTC day `day` ends (day numbers as [`utc_day`] gives
/// them; `day` may be later than now's, after the clock stepped back; an earlier one has
/// ended: 0).
pub fn until_end_of_utc_day(day: u32, now_micros: u64) -> u64 {
    (u64::from(day) + 1)
        .saturating_mul(MICROS_PER_DAY)
        .saturating_sub(now_micros)
}

/// (year, month 1-12) of a day number since the epoch, by the proleptic Gregorian calendar
/// (Howard Hinnant's civil-from-days algorithm, exact for every day a u32 can name).
fn civil_month(day: u32) -> (i64, u32) {
    let z = i64::from(day) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, u32::try_from(month).unwrap_or(1))
}

/// Days since the epoch of the first day of (year, month), the inverse of `civil_month`.
fn days_from_civil(year: i64, month: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The UTC calendar month of a time, as months since January 1970.
pub fn utc_month(now_micros: u64) -> u32 {
    let (year, month) = civil_month(utc_day(now_micros));
    u32::try_from((year - 1970) * 12 + i64::from(month) - 1).unwrap_or(0)
}

/// Microseconds from `now_micros` until UTC month `month` ends (months as [`utc_month`] gives
/// them; `month` may be later than now's, after the clock stepped back; an earlier one has
/// ended: 0).
pub fn until_end_of_utc_month(month: u32, now_micros: u64) -> u64 {
    let next = i64::from(month) + 1;
    let first = days_from_civil(1970 + next / 12, u32::try_from(next % 12).unwrap_or(0) + 1);
    let next_us = u64::try_from(first)
        .unwrap_or(0)
        .saturating_mul(MICROS_PER_DAY);
    next_us.saturating_sub(now_micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = MICROS_PER_DAY;

    #[test]
    fn months_follow_the_calendar() {
        assert_eq!(utc_month(0), 0, "1970-01");
        assert_eq!(utc_month(31 * DAY - 1), 0, "1970-01-31T23:59:59.999999");
        assert_eq!(utc_month(31 * DAY), 1, "1970-02-01");
        // 2024 is a leap year: Feb has 29 days. 2024-02-01 is day 19754, 2024-03-01 day 19783.
        assert_eq!(utc_month(19_754 * DAY), 649);
        assert_eq!(utc_month(19_783 * DAY - 1), 649);
        assert_eq!(utc_month(19_783 * DAY), 650);
        assert_eq!(until_end_of_utc_month(649, 19_782 * DAY), DAY);
        // 2026-12-31T12:00 to 2027-01-01: half a day.
        let dec31 = 20_818 * DAY;
        assert_eq!(utc_month(dec31), (2026 - 1970) * 12 + 11);
        assert_eq!(
            until_end_of_utc_month(utc_month(dec31), dec31 + DAY / 2),
            DAY / 2
        );
        // The end of a later month and day than now's (after the clock stepped back).
        let nov = utc_month(dec31) - 1;
        assert_eq!(until_end_of_utc_month(nov + 1, dec31), DAY);
        assert_eq!(until_end_of_utc_month(nov, dec31), 0);
        assert_eq!(until_end_of_utc_day(utc_day(dec31) + 1, dec31), 2 * DAY);
    }

    #[test]
    fn a_month_ends_at_the_first_instant_of_the_next() {
        for day in (0..146_097u64 * 2).step_by(5) {
            let t = day * DAY + day % 7 * 3_600_000_000;
            let m = utc_month(t);
            let end = t + until_end_of_utc_month(m, t);
            assert_eq!((utc_month(end - 1), utc_month(end)), (m, m + 1), "{t}");
        }
    }

    #[test]
    fn civil_round_trips_for_every_day_of_four_centuries() {
        for day in (0..146_097u32 * 2).step_by(7) {
            let (y, m) = civil_month(day);
            let first = days_from_civil(y, m);
            assert!(
                first <= i64::from(day) && i64::from(day) - first < 31,
                "{day}"
            );
        }
    }
}
