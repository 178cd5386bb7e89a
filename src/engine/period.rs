//! Counters over calendar periods (the UTC day and the UTC calendar month).

use serde::{Deserialize, Serialize};

/// A count that belongs to one period and reads as zero in any later one.
///
/// Why the period is stored beside the count: reset is lazy. Nothing runs at midnight; the first
/// read of a new day sees an old period number and starts from zero, so a million idle subjects
/// cost no work at rollover.
///
/// A clock that steps back (an NTP correction after a forward step) can ask about a period
/// earlier than the stored one. The stored period is then the current one for every operation
/// alike: [`get`](Self::get) reads its count, [`add`](Self::add) charges it, and
/// [`period_at`](Self::period_at) names it, so a quota spent in the later period stays spent
/// (read as zero, it would grant a second period's budget until the clock caught up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodCounter {
    period: u32,
    value: u64,
}

impl PeriodCounter {
    /// The period and the count, for a packed copy.
    pub(super) fn parts(&self) -> (u32, u64) {
        (self.period, self.value)
    }

    /// A counter from [`parts`](Self::parts).
    pub(super) fn from_parts(period: u32, value: u64) -> Self {
        Self { period, value }
    }

    /// The count in `period`: the stored count if the counter is in that period or a later one
    /// (the clock stepped back), zero if its period is over.
    pub fn get(&self, period: u32) -> u64 {
        if self.period >= period {
            self.value
        } else {
            0
        }
    }

    /// The period that a read at `period` counts in: `period` itself, or the counter's own if
    /// that is later (the clock stepped back). Its end is when the count starts again from zero.
    pub fn period_at(&self, period: u32) -> u32 {
        self.period.max(period)
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

    /// Add to the count of `period`, unless that period is over at `now_period`: earlier than
    /// the period the counter counts in now (its own, or `now_period` if the counter's is
    /// later: the clock stepped back, and the counter is read as the current one). For usage
    /// that belongs to a past period by nature (a hold that expired at a deadline the counter
    /// has passed), where [`add`](Self::add)'s rule for a clock stepping back does not apply.
    pub fn add_unless_over(&mut self, period: u32, now_period: u32, amount: u64) {
        if period >= self.period.min(now_period) {
            self.add(period, amount);
        }
    }

    /// Take from the count of `period`, never below zero; nothing unless the counter is in
    /// exactly that period. Under a clock that stepped back, the counter may be in a later
    /// period than the one the amount was charged to, and what it holds then is that later
    /// period's: a give-back is dropped rather than risk taking from charges it never made.
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

    /// After a forward step that is corrected, the later period's count is still the count: it
    /// reads as it charges, and ends with the later period.
    #[test]
    fn a_later_period_reads_as_current_after_the_clock_steps_back() {
        let mut c = PeriodCounter::default();
        c.add(5, 100);
        c.add(6, 40);
        assert_eq!(c.get(5), 40, "read at the earlier period after a step back");
        assert_eq!(c.period_at(5), 6, "it lasts until the later period ends");
        assert_eq!(c.period_at(7), 7);
        assert_eq!(c.get(7), 0);
        c.add(5, 2);
        assert_eq!(c.get(5), 42);
        assert_eq!(c.get(6), 42);
    }

    #[test]
    fn an_expiry_is_charged_unless_its_period_is_over_by_the_counter_or_the_clock() {
        // A late pass: the counter moved on to day 6 and the clock is in day 6; day 5 is over.
        let mut c = PeriodCounter::default();
        c.add(6, 10);
        c.add_unless_over(5, 6, 100);
        assert_eq!(c.get(6), 10);
        // The clock stepped back to day 5 after a charge in day 6: day 5 is now's day, the
        // counter (day 6) is read as the current one, and the expiry lands on it.
        c.add_unless_over(5, 5, 100);
        assert_eq!(c.get(5), 110);
        // A deadline before now's day is over, whatever the counter says.
        c.add_unless_over(4, 5, 1_000);
        assert_eq!(c.get(5), 110);
        // A counter in an earlier period than the deadline's starts the deadline's period.
        let mut old = PeriodCounter::default();
        old.add(3, 7);
        old.add_unless_over(5, 6, 100);
        assert_eq!((old.get(5), old.get(6)), (100, 0));
    }
}
