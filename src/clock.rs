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

/// Microseconds from `now_micros` until the next UTC midnight.
pub fn until_next_utc_day(now_micros: u64) -> u64 {
    MICROS_PER_DAY - now_micros % MICROS_PER_DAY
}
