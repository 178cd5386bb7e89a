//! Sampled logging for events that a flood repeats: the first few of each interval in full,
//! then one line that counts the rest.
//!
//! Why: a line per denial is what an operator wants when a handful of users hit their limits,
//! and a disaster when a bot sends a million denied Reserves (measured: 305 MB of logs in 70 s,
//! and the log pipeline behind it pays again). Counting is exact; only the detail is sampled.
//! The count per reason (`denied_by`) says what the flood was about.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one sampling window lasts.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Events logged in full per window; the rest are counted.
pub const FULL_PER_INTERVAL: u32 = 10;
/// Distinct reasons counted per window; beyond it they are counted under "other" (reasons come
/// from the policy's limit names, so this is never reached in practice; it is a bound anyway).
const MAX_REASONS: usize = 64;

/// One kind of sampled event (denials, shadow-mode allowances, relay fallbacks).
#[derive(Debug)]
pub struct LogSampler {
    /// What the summary line says was not logged one by one.
    what: &'static str,
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    started: Option<Instant>,
    logged: u32,
    suppressed: u64,
    by_reason: BTreeMap<String, u64>,
}

/// What a window held back, for its summary line.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    /// Events not logged in full.
    pub suppressed: u64,
    /// Their count per reason, as `reason=count, ...`.
    pub by_reason: String,
}

impl Window {
    /// Close the window if it is over, and open a new one; the closed one's summary if it
    /// held anything back.
    fn roll(&mut self, now: Instant, force: bool) -> Option<Summary> {
        if !force
            && self
                .started
                .is_some_and(|s| now.saturating_duration_since(s) < INTERVAL)
        {
            return None;
        }
        let old = std::mem::take(self);
        self.started = Some(now);
        (old.suppressed > 0).then(|| Summary {
            suppressed: old.suppressed,
            by_reason: old
                .by_reason
                .iter()
                .map(|(r, n)| format!("{r}={n}"))
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

impl LogSampler {
    /// A sampler whose summary line reads "`what`: N more not logged one by one".
    pub const fn new(what: &'static str) -> Self {
        Self {
            what,
            window: Mutex::new(Window {
                started: None,
                logged: 0,
                suppressed: 0,
                by_reason: BTreeMap::new(),
            }),
        }
    }

    /// Whether this event should be logged in full. If not, it is counted under `reason`. The
    /// summary of a window that has just ended is logged first.
    pub fn sample(&self, reason: &str) -> bool {
        self.sample_at(Instant::now(), reason)
    }

    fn sample_at(&self, now: Instant, reason: &str) -> bool {
        let (summary, full) = {
            let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
            let summary = w.roll(now, false);
            let full = w.logged < FULL_PER_INTERVAL;
            if full {
                w.logged += 1;
            } else {
                w.suppressed += 1;
                let key = if w.by_reason.len() < MAX_REASONS || w.by_reason.contains_key(reason) {
                    reason
                } else {
                    "other"
                };
                *w.by_reason.entry(key.to_string()).or_default() += 1;
            }
            (summary, full)
        };
        if let Some(s) = summary {
            self.log(&s);
        }
        full
    }

    /// Log the summary of a window that is over (called on a timer, so the count of a flood's
    /// last window is not held back until the next event), or with `force` of the window
    /// under way (at shutdown).
    pub fn flush(&self, force: bool) {
        self.flush_at(Instant::now(), force);
    }

    fn flush_at(&self, now: Instant, force: bool) -> Option<Summary> {
        let summary = self
            .window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .roll(now, force)?;
        self.log(&summary);
        Some(summary)
    }

    fn log(&self, s: &Summary) {
        tracing::info!(
            suppressed = s.suppressed,
            by_reason = %s.by_reason,
            window_s = INTERVAL.as_secs(),
            "{}: {} more not logged one by one",
            self.what,
            s.suppressed
        );
    }
}

/// Reserve denials.
pub static DENIALS: LogSampler = LogSampler::new("reserve denials");
/// Reserves allowed only by shadow mode.
pub static SHADOW_ALLOWED: LogSampler = LogSampler::new("shadow-mode allowances");
/// Relay mode: Reserves answered by fail mode because the upstream was unreachable.
pub static UPSTREAM_FALLBACKS: LogSampler = LogSampler::new("upstream-unreachable fallbacks");

/// Flush every sampler (see [`LogSampler::flush`]).
pub fn flush_all(force: bool) {
    for s in [&DENIALS, &SHADOW_ALLOWED, &UPSTREAM_FALLBACKS] {
        s.flush(force);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_few_are_logged_in_full_and_the_rest_counted_per_reason() {
        let s = LogSampler::new("test");
        let t0 = Instant::now();
        let full: Vec<bool> = (0..25)
            .map(|i| {
                s.sample_at(
                    t0,
                    if i % 2 == 0 {
                        "tokens_per_day"
                    } else {
                        "model"
                    },
                )
            })
            .collect();
        assert_eq!(
            full.iter().filter(|f| **f).count(),
            FULL_PER_INTERVAL as usize
        );
        assert!(full[..FULL_PER_INTERVAL as usize].iter().all(|f| *f));
        assert_eq!(
            s.flush_at(t0 + INTERVAL / 2, false),
            None,
            "the window is not over"
        );
        assert_eq!(
            s.flush_at(t0 + INTERVAL, false),
            Some(Summary {
                suppressed: 15,
                by_reason: "model=7, tokens_per_day=8".into()
            })
        );
        assert!(
            s.sample_at(t0 + INTERVAL, "model"),
            "a new window logs in full again"
        );
        assert_eq!(
            s.flush_at(t0 + INTERVAL * 3, false),
            None,
            "nothing held back"
        );
        for _ in 0..FULL_PER_INTERVAL + 1 {
            s.sample_at(t0 + INTERVAL * 3, "model");
        }
        assert_eq!(
            s.flush_at(t0 + INTERVAL * 3, true).map(|s| s.suppressed),
            Some(1),
            "at shutdown the window under way is told too"
        );
    }
}

/// How subjects appear in the log (`--log-subjects`). A subject is often an API key or an
/// e-mail address: an operator may not want it in log storage that more people can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SubjectLogging {
    /// As given.
    #[default]
    AsGiven,
    /// As `sha256:` and the first 16 hex digits of its SHA-256: the same subject always
    /// shows the same way, so its lines can still be followed, and grep finds them by hashing
    /// the subject (`printf %s SUBJECT | sha256sum`).
    Hashed,
}

static SUBJECT_LOGGING: std::sync::OnceLock<SubjectLogging> = std::sync::OnceLock::new();

/// Set how subjects are logged, once, at start.
pub fn log_subjects(mode: SubjectLogging) {
    let _ = SUBJECT_LOGGING.set(mode);
}

/// `subject` as the log shows it (see [`SubjectLogging`]).
pub fn subject(subject: &str) -> LoggedSubject<'_> {
    LoggedSubject(subject)
}

/// A subject, displayed as `--log-subjects` says.
pub struct LoggedSubject<'a>(&'a str);

impl std::fmt::Display for LoggedSubject<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match SUBJECT_LOGGING.get().copied().unwrap_or_default() {
            SubjectLogging::AsGiven => f.write_str(self.0),
            SubjectLogging::Hashed => {
                let digest = crate::policy::callers::hash_token(self.0);
                f.write_str("sha256:")?;
                for b in &digest[..8] {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}
