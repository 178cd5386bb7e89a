//! Counters over calendar periods (the UTC day now; the month later).

use serde::{Deserialize, Serialize};

/// A count that belongs to one period and reads as zero in any later one.
///
/// Why the period is stored beside the count: reset is lazy. Nothing runs at midnight; the first
/// read of a new day sees an old period number and starts from zero, so a million idle subjects
/// cost no work at rollover.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodCounter {
    period: u32,
    value: u64,
}

impl PeriodCounter {
    /// The count in `period`.
    pub fn get(&self, period: u32) -> u64 {
        if self.period == period {
            self.value
        } else {
            0
        }
    }

    /// Add to the count of `period` (starting it at zero if it is a new one). A period older
    /// than the counter's (the clock stepped back) adds to the counter's period: a charge is
    /// never dropped.
    pub fn add(&mut self, period: u32, amount: u64) {
        if period > self.period {
            *self = Self { period, value: 0 };
        }
        self.value = self.value.saturating_add(amount);
    }

    /// Add to the count of `period`, unless the counter has already moved on to a later one:
    /// that period is over, and what it would have counted no longer counts anywhere. For usage
    /// that belongs to a past period by nature (a hold that expired at a deadline the counter
    /// has passed), where [`add`](Self::add)'s rule for a clock stepping back does not apply.
    pub fn add_unless_over(&mut self, period: u32, amount: u64) {
        if period >= self.period {
            self.add(period, amount);
        }
    }

    /// Take from the count of `period`, never below zero; nothing if `period` is not current.
    pub fn sub(&mut self, period: u32, amount: u64) {
        if period == self.period {
            self.value = self.value.saturating_sub(amount);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_period_starts_at_zero() {
        let mut c = PeriodCounter::default();
        c.add(5, 100);
        assert_eq!(c.get(5), 100);
        assert_eq!(c.get(6), 0);
        c.add(6, 7);
        assert_eq!(c.get(6), 7);
        c.sub(5, 7);
        assert_eq!(
            c.get(6),
            7,
            "a release into a closed period changes nothing"
        );
        c.add(5, 3);
        assert_eq!(
            c.get(6),
            10,
            "a clock stepping back still charges, to the current period"
        );
        c.sub(6, 3);
        c.sub(6, 100);
        assert_eq!(c.get(6), 0);
    }
}
