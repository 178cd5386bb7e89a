//! The rolling one-minute window behind `requests_per_minute`.

use serde::{Deserialize, Serialize};

use crate::clock::MICROS_PER_MINUTE;

const W: u128 = MICROS_PER_MINUTE as u128;

/// A sliding-window counter: the count of the current calendar minute and of the one before. The
/// requests of the last sixty seconds are estimated as `previous * (unelapsed share of this
/// minute) + current`, which assumes the previous minute's requests were spread evenly.
///
/// Why this and not a log of timestamps: it is O(1) memory per subject whatever the limit (a log
/// for 10,000 requests a minute would be 10,000 entries), and it never lets a burst at the end of
/// one minute and the start of the next double the rate, which a fixed window does. The price is
/// an estimate rather than an exact count at minute edges; `retry_after` is computed from the
/// same estimate, so a client that waits as told is admitted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestWindow {
    minute: u64,
    current: u64,
    previous: u64,
}

impl RequestWindow {
    /// (current, previous, microseconds into the current minute) as seen at `now_us`.
    fn rolled(&self, now_us: u64) -> (u64, u64, u128) {
        let minute = now_us / MICROS_PER_MINUTE;
        let elapsed = u128::from(now_us % MICROS_PER_MINUTE);
        if minute <= self.minute {
            // Same minute, or the clock stepped back: keep counting in the stored minute.
            let elapsed = if minute == self.minute { elapsed } else { 0 };
            (self.current, self.previous, elapsed)
        } else if minute == self.minute + 1 {
            (0, self.current, elapsed)
        } else {
            (0, 0, elapsed)
        }
    }

    /// The estimated requests in the last minute, scaled by microseconds a minute.
    fn scaled_estimate(&self, now_us: u64) -> u128 {
        let (current, previous, elapsed) = self.rolled(now_us);
        u128::from(previous) * (W - elapsed) + u128::from(current) * W
    }

    /// Whether one more request fits under `limit`.
    pub fn admits(&self, limit: u64, now_us: u64) -> bool {
        self.scaled_estimate(now_us) + W <= u128::from(limit) * W
    }

    /// Requests that still fit under `limit` now.
    pub fn remaining(&self, limit: u64, now_us: u64) -> u64 {
        let used = self.scaled_estimate(now_us).div_ceil(W);
        limit.saturating_sub(u64::try_from(used).unwrap_or(u64::MAX))
    }

    /// Count one request.
    pub fn record(&mut self, now_us: u64) {
        let minute = now_us / MICROS_PER_MINUTE;
        let (current, previous, _) = self.rolled(now_us);
        *self = Self {
            minute: minute.max(self.minute),
            current: current + 1,
            previous,
        };
    }

    /// Microseconds until one more request fits under `limit`, or `None` if it never can.
    pub fn wait_for(&self, limit: u64, now_us: u64) -> Option<u64> {
        if limit == 0 {
            return None;
        }
        let (current, previous, elapsed) = self.rolled(now_us);
        let room = u128::from(limit - 1);
        let wait = if u128::from(current) <= room {
            // Fits in this minute once enough of the previous minute has slid out.
            if previous == 0
                || u128::from(previous) * (W - elapsed) <= (room - u128::from(current)) * W
            {
                0
            } else {
                let needed = W - (room - u128::from(current)) * W / u128::from(previous);
                needed.saturating_sub(elapsed)
            }
        } else {
            // Only in the next minute, once enough of this one has slid out.
            let next = W - room * W / u128::from(current);
            (W - elapsed) + next
        };
        u64::try_from(wait).ok()
    }

    /// Microseconds until the window holds no requests.
    pub fn until_empty(&self, now_us: u64) -> u64 {
        let (current, previous, elapsed) = self.rolled(now_us);
        let left_in_minute = (W - elapsed) as u64;
        if current > 0 {
            left_in_minute + MICROS_PER_MINUTE
        } else if previous > 0 {
            left_in_minute
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::MICROS_PER_SECOND;

    #[test]
    fn counts_within_a_minute() {
        let mut w = RequestWindow::default();
        for _ in 0..3 {
            assert!(w.admits(3, 0));
            w.record(0);
        }
        assert!(!w.admits(3, 59 * MICROS_PER_SECOND));
        assert_eq!(w.remaining(3, 0), 0);
    }

    #[test]
    fn previous_minute_slides_out_and_wait_for_is_exact() {
        let mut w = RequestWindow::default();
        for _ in 0..3 {
            w.record(0);
        }
        // At the next minute's start all three still count.
        assert!(!w.admits(3, MICROS_PER_MINUTE));
        let wait = w.wait_for(3, 30 * MICROS_PER_SECOND).unwrap();
        // 3 * (1 - e/60) <= 2  =>  e >= 20 s into the next minute: 30 s + 20 s from here.
        assert_eq!(wait, 50 * MICROS_PER_SECOND);
        let t = 30 * MICROS_PER_SECOND + wait;
        assert!(w.admits(3, t));
        assert!(!w.admits(3, t - 1));
        assert!(
            w.admits(3, 2 * MICROS_PER_MINUTE),
            "two minutes later the window is empty"
        );
    }

    #[test]
    fn zero_limit_never_admits() {
        let w = RequestWindow::default();
        assert!(!w.admits(0, 0));
        assert_eq!(w.wait_for(0, 0), None);
    }
}
