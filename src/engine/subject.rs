//! What the engine remembers about one subject, and the limit checks made against it.

use serde::{Deserialize, Serialize};

use super::{PeriodCounter, RequestWindow, TokenBucket};
use crate::clock::{until_next_utc_day, until_next_utc_month, utc_day, utc_month};
use crate::policy::Limits;

/// All live quota state of one subject. Small and `Copy`: a decision copies it, changes the copy
/// and writes it back whole, so a denial (which must change nothing) simply drops the copy, and
/// persisting a subject is one fixed-size record under one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectState {
    /// `tokens_per_minute`; `None` until first charged (a fresh bucket is full).
    pub bucket: Option<TokenBucket>,
    /// `requests_per_minute`.
    pub window: RequestWindow,
    /// Tokens charged (committed or expired) in the UTC day.
    pub day_tokens: PeriodCounter,
    /// Reserves admitted in the UTC day.
    pub day_requests: PeriodCounter,
    /// Tokens charged (committed or expired) in the UTC calendar month.
    pub month_tokens: PeriodCounter,
    /// Reserves allowed in the UTC day only because of shadow mode.
    pub day_shadow_denials: PeriodCounter,
    /// Tokens in open holds.
    pub held_tokens: u64,
    /// Open holds.
    pub open_holds: u32,
}

/// The verdict of one limit on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The limit's name.
    pub limit: &'static str,
    /// Microseconds until a retry can succeed; `None` if it never can.
    pub retry_after_us: Option<u64>,
}

/// The state of one limit, as reported to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitStatus {
    /// The limit's name.
    pub name: &'static str,
    /// What the limit counts for.
    pub scope: &'static str,
    /// The configured limit.
    pub limit: u64,
    /// What may still be spent now.
    pub remaining: u64,
    /// Microseconds until the limit is fully available again.
    pub reset_after_us: u64,
}

/// Retry hint when what blocks is open holds (`max_concurrent`, or a period quota filled by
/// held tokens): they free when some call ends, which tollgate cannot predict, so callers are
/// told to try again in a second.
const HOLDS_RETRY_US: u64 = 1_000_000;

/// A token quota over a calendar period (the UTC day or month): its name, its limit, what is
/// spent in the period now (charged + held), and how long until the next period.
struct PeriodQuota {
    name: &'static str,
    limit: u64,
    spent: u64,
    until_next_us: u64,
}

impl PeriodQuota {
    /// The refusal of `tokens` more, if they do not fit; `held` are the open holds' tokens,
    /// which outlive the period.
    fn refusal(&self, held: u64, tokens: u64) -> Option<Refusal> {
        if self.spent.saturating_add(tokens) <= self.limit {
            return None;
        }
        let retry_after_us = if tokens > self.limit {
            // Larger than the whole period: never fits.
            None
        } else if held.saturating_add(tokens) > self.limit {
            // Open holds alone block it, and a new period does not release them.
            Some(HOLDS_RETRY_US)
        } else {
            // A new period starts from zero charged tokens.
            Some(self.until_next_us)
        };
        Some(Refusal {
            limit: self.name,
            retry_after_us,
        })
    }

    fn status(&self) -> LimitStatus {
        LimitStatus {
            name: self.name,
            scope: "subject",
            limit: self.limit,
            remaining: self.limit.saturating_sub(self.spent),
            reset_after_us: self.until_next_us,
        }
    }
}

impl SubjectState {
    /// The bucket as of now (a subject never charged has a full one).
    pub fn bucket_or_full(&self, limits: &Limits, now_us: u64) -> Option<TokenBucket> {
        let config = limits.bucket()?;
        Some(
            self.bucket
                .unwrap_or_else(|| TokenBucket::full(config, now_us)),
        )
    }

    /// Tokens counted against `tokens_per_day` today: charged plus held.
    pub fn day_spent(&self, now_us: u64) -> u64 {
        self.day_tokens
            .get(utc_day(now_us))
            .saturating_add(self.held_tokens)
    }

    /// Tokens counted against `tokens_per_month` this month: charged plus held.
    pub fn month_spent(&self, now_us: u64) -> u64 {
        self.month_tokens
            .get(utc_month(now_us))
            .saturating_add(self.held_tokens)
    }

    /// The period quotas the tier sets, as of `now_us`: the day's, then the month's.
    fn period_quotas(
        &self,
        limits: &Limits,
        now_us: u64,
    ) -> impl DoubleEndedIterator<Item = PeriodQuota> {
        let day = limits.tokens_per_day.map(|limit| PeriodQuota {
            name: "tokens_per_day",
            limit,
            spent: self.day_spent(now_us),
            until_next_us: until_next_utc_day(now_us),
        });
        let month = limits.tokens_per_month.map(|limit| PeriodQuota {
            name: "tokens_per_month",
            limit,
            spent: self.month_spent(now_us),
            until_next_us: until_next_utc_month(now_us),
        });
        day.into_iter().chain(month)
    }

    /// Charge `tokens` of usage that became known at `at_us` (a Commit now, or an expiry at its
    /// deadline) to the day and month counters.
    pub fn charge(&mut self, at_us: u64, tokens: u64) {
        self.day_tokens.add(utc_day(at_us), tokens);
        self.month_tokens.add(utc_month(at_us), tokens);
    }

    /// Give back `tokens` charged at `charged_us` to the day and month counters, if those
    /// periods are still the current ones at `now_us` (a period that is over stays as it was).
    pub fn uncharge(&mut self, charged_us: u64, now_us: u64, tokens: u64) {
        if utc_day(charged_us) == utc_day(now_us) {
            self.day_tokens.sub(utc_day(now_us), tokens);
        }
        if utc_month(charged_us) == utc_month(now_us) {
            self.month_tokens.sub(utc_month(now_us), tokens);
        }
    }

    /// Every limit that refuses a Reserve of `tokens` for `model` now. Empty means admitted.
    pub fn refusals(&self, limits: &Limits, now_us: u64, tokens: u64, model: &str) -> Vec<Refusal> {
        let mut out = Vec::new();
        if !limits.allows_model(model) {
            // No wait helps: the tier does not include the model.
            out.push(Refusal {
                limit: "model",
                retry_after_us: None,
            });
        }
        if let Some(max) = limits.max_concurrent {
            if self.open_holds >= max {
                out.push(Refusal {
                    limit: "max_concurrent",
                    retry_after_us: (max > 0).then_some(HOLDS_RETRY_US),
                });
            }
        }
        if let Some(rpm) = limits.requests_per_minute {
            if !self.window.admits(rpm, now_us) {
                out.push(Refusal {
                    limit: "requests_per_minute",
                    retry_after_us: self.window.wait_for(rpm, now_us),
                });
            }
        }
        if let (Some(config), Some(bucket)) = (limits.bucket(), self.bucket_or_full(limits, now_us))
        {
            if !bucket.admits(config, now_us, tokens) {
                out.push(Refusal {
                    limit: "tokens_per_minute",
                    retry_after_us: bucket.wait_for(config, now_us, tokens),
                });
            }
        }
        out.extend(
            // Month first, day last: when both refuse and no wait can lift either, the binding
            // refusal (the last of equals) is the day's, the narrower of the two.
            self.period_quotas(limits, now_us)
                .rev()
                .filter_map(|q| q.refusal(self.held_tokens, tokens)),
        );
        out
    }

    /// The status of every limit the tier sets.
    pub fn statuses(&self, limits: &Limits, now_us: u64) -> Vec<LimitStatus> {
        let mut out = Vec::new();
        let scope = "subject";
        if let (Some(config), Some(bucket)) = (limits.bucket(), self.bucket_or_full(limits, now_us))
        {
            out.push(LimitStatus {
                name: "tokens_per_minute",
                scope,
                limit: config.capacity,
                remaining: u64::try_from(bucket.available(config, now_us).max(0)).unwrap_or(0),
                reset_after_us: bucket.until_full(config, now_us).unwrap_or(0),
            });
        }
        if let Some(rpm) = limits.requests_per_minute {
            out.push(LimitStatus {
                name: "requests_per_minute",
                scope,
                limit: rpm,
                remaining: self.window.remaining(rpm, now_us),
                reset_after_us: self.window.until_empty(now_us),
            });
        }
        out.extend(self.period_quotas(limits, now_us).map(|q| q.status()));
        if let Some(max) = limits.max_concurrent {
            out.push(LimitStatus {
                name: "max_concurrent",
                scope,
                limit: u64::from(max),
                remaining: u64::from(max.saturating_sub(self.open_holds)),
                reset_after_us: 0,
            });
        }
        out
    }

    /// Whether this state is indistinguishable from a fresh subject's at `now_us`, so that it
    /// can be forgotten (bounding memory by active subjects, not by every subject ever seen).
    pub fn is_at_rest(&self, limits: &Limits, now_us: u64) -> bool {
        let bucket_full = match (limits.bucket(), self.bucket) {
            (Some(config), Some(b)) => b.wait_for(config, now_us, config.capacity) == Some(0),
            _ => true,
        };
        let today = utc_day(now_us);
        self.open_holds == 0
            && self.held_tokens == 0
            && bucket_full
            && self.window.until_empty(now_us) == 0
            && self.day_tokens.get(today) == 0
            && self.day_requests.get(today) == 0
            && self.day_shadow_denials.get(today) == 0
            // Month usage matters only where a month limit counts it.
            && (limits.tokens_per_month.is_none()
                || self.month_tokens.get(utc_month(now_us)) == 0)
    }
}
