//! A log line that repeats under a flood (every failed `accept`, every refused connection) is
//! written at most once an interval, with the count of those left out, so the log says what
//! happens without becoming the next thing to run out (disk, or the CPU spent writing it).

use std::time::{Duration, Instant};

/// How often a rate-limited line may be written.
pub(super) const INTERVAL: Duration = Duration::from_secs(10);

/// When a repeated line may be written again.
#[derive(Debug)]
pub(super) struct LogLimit {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    pub(super) fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Some(number of occurrences not written since the last line) if this one is to be
    /// written; None if it is to be left out (and counted).
    pub(super) fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_first_then_counts_the_rest() {
        let mut limit = LogLimit::new(Duration::from_secs(3600));
        assert_eq!(limit.ready(), Some(0));
        assert_eq!(limit.ready(), None);
        assert_eq!(limit.ready(), None);
        limit.last = Some(Instant::now() - Duration::from_secs(3601));
        assert_eq!(limit.ready(), Some(2));
    }
}
