//! The token bucket behind `tokens_per_minute`.

use serde::{Deserialize, Serialize};

use crate::clock::MICROS_PER_MINUTE;

/// How many internal units make one token. With 60,000,000 units a token, a bucket that refills
/// `tokens_per_minute` tokens a minute gains exactly `tokens_per_minute` units a microsecond, so
/// refill is integer arithmetic with no rounding drift, however often it is computed.
pub const UNITS_PER_TOKEN: i128 = MICROS_PER_MINUTE as i128;

/// The configuration of a bucket: what a tier says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketLimit {
    /// The most tokens the bucket holds (`burst_tokens`, by default `tokens_per_minute`).
    pub capacity: u64,
    /// Tokens added per minute, continuously.
    pub per_minute: u64,
}

impl BucketLimit {
    fn capacity_units(&self) -> i128 {
        i128::from(self.capacity) * UNITS_PER_TOKEN
    }
}

/// The state of one token bucket: its level at `updated_us`. The level may be negative: a Commit
/// above its hold puts the bucket into debt, and it refills out of debt at the normal rate.
///
/// Why a level and a timestamp rather than a timer: refill is computed when the bucket is read,
/// so an idle bucket costs nothing and a restart refills for the wall-clock time that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    level: i128,
    updated_us: u64,
}

impl TokenBucket {
    /// The level (in units) and the time it was last brought up to date, for a packed copy.
    pub(super) fn parts(&self) -> (i128, u64) {
        (self.level, self.updated_us)
    }

    /// A bucket from [`parts`](Self::parts).
    pub(super) fn from_parts(level: i128, updated_us: u64) -> Self {
        Self { level, updated_us }
    }

    /// A full bucket.
    pub fn full(limit: BucketLimit, now_us: u64) -> Self {
        Self {
            level: limit.capacity_units(),
            updated_us: now_us,
        }
    }

    /// The level in units at `now_us`, refilled and capped at capacity. A clock that stepped back
    /// counts as no time passing.
    fn level_at(&self, limit: BucketLimit, now_us: u64) -> i128 {
        let elapsed = i128::from(now_us.saturating_sub(self.updated_us));
        let refilled = self
            .level
            .saturating_add(elapsed.saturating_mul(i128::from(limit.per_minute)));
        refilled.min(limit.capacity_units())
    }

    fn settle(&mut self, limit: BucketLimit, now_us: u64) {
        self.level = self.level_at(limit, now_us);
        self.updated_us = self.updated_us.max(now_us);
    }

    /// Whole tokens available now (negative in debt).
    pub fn available(&self, limit: BucketLimit, now_us: u64) -> i128 {
        self.level_at(limit, now_us).div_euclid(UNITS_PER_TOKEN)
    }

    /// Whether `tokens` can be taken now.
    pub fn admits(&self, limit: BucketLimit, now_us: u64, tokens: u64) -> bool {
        self.level_at(limit, now_us) >= i128::from(tokens) * UNITS_PER_TOKEN
    }

    /// Take `tokens`, going into debt if there are not enough (the caller decides whether that
    /// is allowed: Reserve checks [`Self::admits`] first, Commit charges actual usage regardless).
    pub fn take(&mut self, limit: BucketLimit, now_us: u64, tokens: u64) {
        self.settle(limit, now_us);
        self.level -= i128::from(tokens) * UNITS_PER_TOKEN;
    }

    /// Give `tokens` back, never above capacity.
    pub fn give(&mut self, limit: BucketLimit, now_us: u64, tokens: u64) {
        self.settle(limit, now_us);
        self.level =
            (self.level + i128::from(tokens) * UNITS_PER_TOKEN).min(limit.capacity_units());
    }

    /// Microseconds until `tokens` can be taken, or `None` if they never can (more than the
    /// capacity, or no refill).
    pub fn wait_for(&self, limit: BucketLimit, now_us: u64, tokens: u64) -> Option<u64> {
        if tokens > limit.capacity {
            return None;
        }
        let deficit = i128::from(tokens) * UNITS_PER_TOKEN - self.level_at(limit, now_us);
        if deficit <= 0 {
            return Some(0);
        }
        if limit.per_minute == 0 {
            return None;
        }
        let rate = i128::from(limit.per_minute);
        u64::try_from((deficit + rate - 1) / rate).ok()
    }

    /// Microseconds until the bucket is full again.
    pub fn until_full(&self, limit: BucketLimit, now_us: u64) -> Option<u64> {
        self.wait_for(limit, now_us, limit.capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::MICROS_PER_SECOND;

    const LIMIT: BucketLimit = BucketLimit {
        capacity: 120,
        per_minute: 60,
    };

    #[test]
    fn refills_one_token_a_second_at_sixty_a_minute() {
        let mut b = TokenBucket::full(LIMIT, 0);
        b.take(LIMIT, 0, 120);
        assert_eq!(b.available(LIMIT, 0), 0);
        assert_eq!(b.available(LIMIT, MICROS_PER_SECOND - 1), 0);
        assert_eq!(b.available(LIMIT, MICROS_PER_SECOND), 1);
        assert_eq!(b.available(LIMIT, 90 * MICROS_PER_SECOND), 90);
        assert_eq!(b.available(LIMIT, 1_000 * MICROS_PER_SECOND), 120, "capped");
    }

    #[test]
    fn debt_refills_back_through_zero() {
        let mut b = TokenBucket::full(LIMIT, 0);
        b.take(LIMIT, 0, 150);
        assert_eq!(b.available(LIMIT, 0), -30);
        assert!(!b.admits(LIMIT, 0, 1));
        assert_eq!(b.wait_for(LIMIT, 0, 1), Some(31 * MICROS_PER_SECOND));
        assert!(b.admits(LIMIT, 31 * MICROS_PER_SECOND, 1));
    }

    #[test]
    fn clock_stepping_back_mints_nothing() {
        let mut b = TokenBucket::full(LIMIT, 100 * MICROS_PER_SECOND);
        b.take(LIMIT, 100 * MICROS_PER_SECOND, 120);
        assert_eq!(b.available(LIMIT, 50 * MICROS_PER_SECOND), 0);
        b.give(LIMIT, 50 * MICROS_PER_SECOND, 10);
        assert_eq!(b.available(LIMIT, 100 * MICROS_PER_SECOND), 10);
    }

    #[test]
    fn more_than_capacity_never_fits() {
        let b = TokenBucket::full(LIMIT, 0);
        assert_eq!(b.wait_for(LIMIT, 0, 121), None);
        assert_eq!(b.wait_for(LIMIT, 0, 120), Some(0));
    }
}
