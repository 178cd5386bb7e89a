//! What the engine remembers about one scope (a subject, a group, a client IP or the whole
//! fleet), and the limit checks made against it.
//!
//! Every scope has the same state and the same limits; what differs is only which limits the
//! policy sets for it, and that the subject scope alone knows about models and the downgrade
//! budget. One type for all four keeps "checked and charged atomically" a loop, not four
//! copies of the same arithmetic.

use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{PeriodCounter, RequestWindow, TokenBucket};
use crate::clock::{until_end_of_utc_day, until_end_of_utc_month, utc_day, utc_month};
use crate::policy::Limits;

/// What a limit counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScopeKind {
    /// One user or API key.
    Subject,
    /// An organisation or team.
    Group,
    /// One client IP address (IPv6: one /64).
    Ip,
    /// All traffic.
    Global,
}

impl ScopeKind {
    /// The scope's name, as in `LimitStatus.scope`.
    pub fn name(self) -> &'static str {
        match self {
            ScopeKind::Subject => "subject",
            ScopeKind::Group => "group",
            ScopeKind::Ip => "ip",
            ScopeKind::Global => "global",
        }
    }

    /// A limit's name as `denied_by` reports it: bare for the subject (the scope every
    /// Reserve has, and the name clients already match on), `scope.limit` for the others.
    pub fn qualify(self, limit: &str) -> String {
        match self {
            ScopeKind::Subject => limit.to_string(),
            other => format!("{}.{limit}", other.name()),
        }
    }
}

/// Which scope: its kind and its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScopeKey {
    /// A subject.
    Subject(Arc<str>),
    /// A group.
    Group(Arc<str>),
    /// A client IP, as `policy::ip_scope_key` gives it.
    Ip(IpAddr),
    /// The fleet.
    Global,
}

impl ScopeKey {
    /// The kind.
    pub fn kind(&self) -> ScopeKind {
        match self {
            ScopeKey::Subject(_) => ScopeKind::Subject,
            ScopeKey::Group(_) => ScopeKind::Group,
            ScopeKey::Ip(_) => ScopeKind::Ip,
            ScopeKey::Global => ScopeKind::Global,
        }
    }

    /// The name within the kind: the subject, the group, the IP (IPv6 as `net/64`); empty for
    /// the fleet.
    /// A subject's or group's is its own name, shared, not copied.
    pub fn id(&self) -> Arc<str> {
        match self {
            ScopeKey::Subject(s) | ScopeKey::Group(s) => s.clone(),
            ScopeKey::Ip(ip @ IpAddr::V4(_)) => Arc::from(ip.to_string()),
            ScopeKey::Ip(ip @ IpAddr::V6(_)) => {
                Arc::from(format!("{ip}/{}", crate::policy::IPV6_SCOPE_PREFIX))
            }
            ScopeKey::Global => Arc::from(""),
        }
    }
}

/// All live quota state of one scope. Small and `Copy`: a decision copies it, changes the copy
/// and writes it back whole, so a refused decision simply drops the copy, and persisting a
/// scope is one fixed-size record under one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeState {
    /// `tokens_per_minute`; `None` until first charged (a fresh bucket is full).
    pub bucket: Option<TokenBucket>,
    /// `requests_per_minute`.
    pub window: RequestWindow,
    /// Tokens charged (committed or expired) in the UTC day, against the quota (the subject's
    /// downgraded use is counted in `downgrade_day_tokens` instead).
    pub day_tokens: PeriodCounter,
    /// The same in the UTC calendar month.
    pub month_tokens: PeriodCounter,
    /// Reserves admitted in the UTC day.
    pub day_requests: PeriodCounter,
    /// Reserves allowed in the UTC day only because of shadow mode.
    pub day_shadow_denials: PeriodCounter,
    /// Reserves denied in the UTC day.
    pub day_denials: PeriodCounter,
    /// Reserves downgraded in the UTC day.
    pub day_downgrades: PeriodCounter,
    /// µUSD charged in the UTC day (all use, downgraded or not: this is the bill).
    pub day_usd: PeriodCounter,
    /// µUSD charged in the UTC calendar month.
    pub month_usd: PeriodCounter,
    /// µUSD saved in the UTC day by denials and downgrades.
    pub day_saved_usd: PeriodCounter,
    /// µUSD saved in the UTC calendar month.
    pub month_saved_usd: PeriodCounter,
    /// Subject only: tokens charged to the downgrade budget in the UTC day.
    pub downgrade_day_tokens: PeriodCounter,
    /// Tokens in open holds (all of them).
    pub held_tokens: u64,
    /// Subject only: the part of `held_tokens` on the downgrade budget.
    pub downgrade_held_tokens: u64,
    /// µUSD in open holds (their worst-case cost).
    pub held_usd: u64,
    /// Open holds.
    pub open_holds: u32,
}

/// What one hold puts on one scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    /// Tokens held.
    pub tokens: u64,
    /// Worst-case cost held, µUSD.
    pub usd: u64,
    /// Charged to the subject's downgrade budget instead of its tier's token and money
    /// quotas (true only for the subject scope of a downgraded hold).
    pub on_downgrade_budget: bool,
}

/// What a Reserve asks of one scope, for its limit checks.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The hold.
    pub hold: Hold,
    /// The model (checked against a tier's `models` list, subject scope only).
    pub model: &'a str,
    /// Whether the model has a price (an unpriced model cannot be held against a money budget).
    pub priced: bool,
}

/// The verdict of one limit on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The scope whose limit refused.
    pub scope: ScopeKind,
    /// The limit's name.
    pub limit: &'static str,
    /// Microseconds until a retry can succeed; `None` if it never can.
    pub retry_after_us: Option<u64>,
    /// False in shadow mode: reported and counted, not enforced.
    pub enforced: bool,
}

impl Refusal {
    /// The name `denied_by` reports.
    pub fn name(&self) -> String {
        self.scope.qualify(self.limit)
    }

    /// Whether the tier's downgrade can lift this refusal: the subject's token and money
    /// quotas, and its model list.
    pub fn downgradable(&self) -> bool {
        self.scope == ScopeKind::Subject
            && matches!(
                self.limit,
                "model"
                    | "unpriced_model"
                    | "tokens_per_day"
                    | "tokens_per_month"
                    | "usd_per_day"
                    | "usd_per_month"
            )
    }
}

/// The state of one limit, as reported to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitStatus {
    /// The limit's name.
    pub name: &'static str,
    /// What the limit counts for.
    pub scope: ScopeKind,
    /// Which one of its kind (see [`ScopeKey::id`]); shared by the statuses of one scope.
    pub scope_id: Arc<str>,
    /// The configured limit.
    pub limit: u64,
    /// What may still be spent now.
    pub remaining: u64,
    /// Microseconds until the limit is fully available again.
    pub reset_after_us: u64,
}

/// Retry hint when what blocks is open holds (`max_concurrent`, or a period quota filled by
/// held amounts): they free when some call ends, which tollgate cannot predict, so callers are
/// told to try again in a second.
const HOLDS_RETRY_US: u64 = 1_000_000;

/// A quota over a calendar period (the UTC day or month), in tokens or µUSD: its name, its
/// limit, what is spent in the period now (charged + held), what of that is held, and how long
/// until the next period.
struct PeriodQuota {
    name: &'static str,
    /// Counts µUSD rather than tokens.
    money: bool,
    limit: u64,
    spent: u64,
    held: u64,
    until_next_us: u64,
}

impl PeriodQuota {
    /// The refusal of `amount` more, if it does not fit.
    fn refusal(&self, amount: u64) -> Option<(&'static str, Option<u64>)> {
        if self.spent.saturating_add(amount) <= self.limit {
            return None;
        }
        let retry_after_us = if amount > self.limit {
            // Larger than the whole period: never fits.
            None
        } else if self.held.saturating_add(amount) > self.limit {
            // Open holds alone block it, and a new period does not release them.
            Some(HOLDS_RETRY_US)
        } else {
            // A new period starts from zero charged.
            Some(self.until_next_us)
        };
        Some((self.name, retry_after_us))
    }

    fn status(&self, scope: ScopeKind, scope_id: &Arc<str>) -> LimitStatus {
        LimitStatus {
            name: self.name,
            scope,
            scope_id: scope_id.clone(),
            limit: self.limit,
            remaining: self.limit.saturating_sub(self.spent),
            reset_after_us: self.until_next_us,
        }
    }
}

/// Which calendar a period counter counts in.
#[derive(Debug, Clone, Copy)]
enum Calendar {
    /// The UTC day.
    Day,
    /// The UTC calendar month.
    Month,
}

/// Which of a scope's quotas a check or status covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QuotaSet {
    /// The quotas of ordinary use: tokens and money, day and month.
    Ordinary,
    /// The subject's downgrade budget.
    Downgrade,
}

impl ScopeState {
    /// The bucket as of now (a scope never charged has a full one).
    pub fn bucket_or_full(&self, limits: &Limits, now_us: u64) -> Option<TokenBucket> {
        let config = limits.bucket()?;
        Some(
            self.bucket
                .unwrap_or_else(|| TokenBucket::full(config, now_us)),
        )
    }

    /// Held tokens that count against the token quotas (not on the downgrade budget).
    fn quota_held(&self) -> u64 {
        self.held_tokens - self.downgrade_held_tokens
    }

    /// The period quotas the limits set, as of `now_us`, in the order reported: tokens by day
    /// and month, money by day and month; or the downgrade budget alone.
    /// A fixed array, not a `Vec`: this runs several times per decision, and must not allocate.
    fn period_quotas(
        &self,
        limits: &Limits,
        now_us: u64,
        set: QuotaSet,
    ) -> impl DoubleEndedIterator<Item = PeriodQuota> {
        let (day, month) = (utc_day(now_us), utc_month(now_us));
        // A counter left in a later period by a clock that stepped back counts until that
        // period ends, not now's.
        let to_day = |c: &PeriodCounter| until_end_of_utc_day(c.period_at(day), now_us);
        let to_month = |c: &PeriodCounter| until_end_of_utc_month(c.period_at(month), now_us);
        let quota = |(name, money): (&'static str, bool),
                     limit: Option<u64>,
                     charged: u64,
                     held: u64,
                     until_next_us| {
            limit.map(|limit| PeriodQuota {
                name,
                money,
                limit,
                spent: charged.saturating_add(held),
                held,
                until_next_us,
            })
        };
        match set {
            QuotaSet::Ordinary => [
                quota(
                    ("tokens_per_day", false),
                    limits.tokens_per_day,
                    self.day_tokens.get(day),
                    self.quota_held(),
                    to_day(&self.day_tokens),
                ),
                quota(
                    ("tokens_per_month", false),
                    limits.tokens_per_month,
                    self.month_tokens.get(month),
                    self.quota_held(),
                    to_month(&self.month_tokens),
                ),
                quota(
                    ("usd_per_day", true),
                    limits.usd_per_day,
                    self.day_usd.get(day),
                    self.held_usd,
                    to_day(&self.day_usd),
                ),
                quota(
                    ("usd_per_month", true),
                    limits.usd_per_month,
                    self.month_usd.get(month),
                    self.held_usd,
                    to_month(&self.month_usd),
                ),
            ],
            QuotaSet::Downgrade => [
                quota(
                    ("downgrade.tokens_per_day", false),
                    limits.downgrade.as_ref().and_then(|d| d.tokens_per_day),
                    self.downgrade_day_tokens.get(day),
                    self.downgrade_held_tokens,
                    to_day(&self.downgrade_day_tokens),
                ),
                None,
                None,
                None,
            ],
        }
        .into_iter()
        .flatten()
    }

    /// Every limit of this scope that refuses `ask` now, pushed to `out`.
    pub fn refusals(
        &self,
        limits: &Limits,
        now_us: u64,
        scope: ScopeKind,
        ask: &Ask<'_>,
        enforced: bool,
        out: &mut Vec<Refusal>,
    ) {
        let mut refuse = |limit, retry_after_us| {
            out.push(Refusal {
                scope,
                limit,
                retry_after_us,
                enforced,
            })
        };
        let tokens = ask.hold.tokens;
        let downgraded = ask.hold.on_downgrade_budget;
        if scope == ScopeKind::Subject && !downgraded && !limits.allows_model(ask.model) {
            // No wait helps: the tier does not include the model.
            refuse("model", None);
        }
        let money = limits.usd_per_day.is_some() || limits.usd_per_month.is_some();
        if money && !ask.priced && !downgraded {
            // A money budget that a caller could bypass by naming an unpriced model would be
            // no budget at all.
            refuse("unpriced_model", None);
        }
        if let Some(max) = limits.max_concurrent {
            if self.open_holds >= max {
                refuse("max_concurrent", (max > 0).then_some(HOLDS_RETRY_US));
            }
        }
        if let Some(rpm) = limits.requests_per_minute {
            if !self.window.admits(rpm, now_us) {
                refuse("requests_per_minute", self.window.wait_for(rpm, now_us));
            }
        }
        if let (Some(config), Some(bucket)) = (limits.bucket(), self.bucket_or_full(limits, now_us))
        {
            if !bucket.admits(config, now_us, tokens) {
                refuse("tokens_per_minute", bucket.wait_for(config, now_us, tokens));
            }
        }
        let set = if downgraded {
            QuotaSet::Downgrade
        } else {
            QuotaSet::Ordinary
        };
        // Longer periods first: when two refuse and no wait can lift either, the binding
        // refusal (the last of equals) is the narrower one.
        for q in self.period_quotas(limits, now_us, set).rev() {
            let amount = if q.money { ask.hold.usd } else { tokens };
            if let Some((limit, retry)) = q.refusal(amount) {
                refuse(limit, retry);
            }
        }
    }

    /// The status of every limit the scope's limits set.
    pub fn statuses(
        &self,
        limits: &Limits,
        now_us: u64,
        scope: ScopeKind,
        id: &Arc<str>,
        out: &mut Vec<LimitStatus>,
    ) {
        let status = |name, limit, remaining, reset_after_us| LimitStatus {
            name,
            scope,
            scope_id: id.clone(),
            limit,
            remaining,
            reset_after_us,
        };
        if let (Some(config), Some(bucket)) = (limits.bucket(), self.bucket_or_full(limits, now_us))
        {
            out.push(status(
                "tokens_per_minute",
                config.capacity,
                u64::try_from(bucket.available(config, now_us).max(0)).unwrap_or(0),
                bucket.until_full(config, now_us).unwrap_or(0),
            ));
        }
        if let Some(rpm) = limits.requests_per_minute {
            out.push(status(
                "requests_per_minute",
                rpm,
                self.window.remaining(rpm, now_us),
                self.window.until_empty(now_us),
            ));
        }
        for set in [QuotaSet::Ordinary, QuotaSet::Downgrade] {
            if set == QuotaSet::Downgrade && scope != ScopeKind::Subject {
                continue;
            }
            out.extend(
                self.period_quotas(limits, now_us, set)
                    .map(|q| q.status(scope, id)),
            );
        }
        if let Some(max) = limits.max_concurrent {
            out.push(status(
                "max_concurrent",
                u64::from(max),
                u64::from(max.saturating_sub(self.open_holds)),
                0,
            ));
        }
    }

    /// Set `hold` aside: admitted, so every limit is charged together.
    pub fn hold(&mut self, limits: &Limits, now_us: u64, hold: Hold) {
        if let Some(config) = limits.bucket() {
            let mut bucket = self
                .bucket_or_full(limits, now_us)
                .expect("limits with a bucket config yield a bucket");
            bucket.take(config, now_us, hold.tokens);
            self.bucket = Some(bucket);
        }
        self.window.record(now_us);
        self.day_requests.add(utc_day(now_us), 1);
        self.held_tokens += hold.tokens;
        self.held_usd += hold.usd;
        if hold.on_downgrade_budget {
            self.downgrade_held_tokens += hold.tokens;
        }
        self.open_holds += 1;
    }

    /// Take `hold` out of the open holds (it is settled: charged, refunded or expired).
    pub fn release(&mut self, hold: Hold) {
        debug_assert!(self.open_holds > 0 && self.held_tokens >= hold.tokens);
        self.held_tokens -= hold.tokens;
        self.held_usd -= hold.usd;
        if hold.on_downgrade_budget {
            self.downgrade_held_tokens -= hold.tokens;
        }
        self.open_holds -= 1;
    }

    /// Move the token bucket by the difference between what was held and what is charged:
    /// the unused rest flows back, debt is taken.
    pub fn settle_bucket(&mut self, limits: &Limits, now_us: u64, held: u64, charged: u64) {
        if let Some(config) = limits.bucket() {
            let mut bucket = self
                .bucket_or_full(limits, now_us)
                .expect("limits with a bucket config yield a bucket");
            if charged < held {
                bucket.give(config, now_us, held - charged);
            } else {
                bucket.take(config, now_us, charged - held);
            }
            self.bucket = Some(bucket);
        }
    }

    /// Charge usage that became known at `at_us` (a Commit now): `tokens` to the day and month
    /// token counters (or the downgrade budget), `usd` to the money counters.
    pub fn charge(&mut self, at_us: u64, tokens: u64, usd: u64, on_downgrade_budget: bool) {
        let add = |c: &mut PeriodCounter, period, _: Calendar, amount| c.add(period, amount);
        self.charge_with(add, at_us, tokens, usd, on_downgrade_budget);
    }

    /// Charge a hold that expired at `deadline_us`, found at `now_us`, to the deadline's
    /// periods only: a period this scope has already left behind is over, and is not charged
    /// (a late Commit's [`uncharge`](Self::uncharge) skips it by the same rule, so the two
    /// agree). See [`PeriodCounter::add_unless_over`] for a clock that stepped back.
    pub fn charge_expired(
        &mut self,
        deadline_us: u64,
        now_us: u64,
        tokens: u64,
        usd: u64,
        on_downgrade_budget: bool,
    ) {
        let (today, this_month) = (utc_day(now_us), utc_month(now_us));
        let add = |c: &mut PeriodCounter, period, calendar, amount| {
            let now_period = match calendar {
                Calendar::Day => today,
                Calendar::Month => this_month,
            };
            c.add_unless_over(period, now_period, amount);
        };
        self.charge_with(add, deadline_us, tokens, usd, on_downgrade_budget);
    }

    /// Apply `add` to every counter `tokens` and `usd` are charged to at `at_us`.
    fn charge_with(
        &mut self,
        add: impl Fn(&mut PeriodCounter, u32, Calendar, u64),
        at_us: u64,
        tokens: u64,
        usd: u64,
        on_downgrade_budget: bool,
    ) {
        let (day, month) = (utc_day(at_us), utc_month(at_us));
        if on_downgrade_budget {
            add(&mut self.downgrade_day_tokens, day, Calendar::Day, tokens);
        } else {
            add(&mut self.day_tokens, day, Calendar::Day, tokens);
            add(&mut self.month_tokens, month, Calendar::Month, tokens);
        }
        add(&mut self.day_usd, day, Calendar::Day, usd);
        add(&mut self.month_usd, month, Calendar::Month, usd);
    }

    /// Give back usage charged at `charged_us`, to the periods that are still current at
    /// `now_us` (a period that is over stays as it was).
    pub fn uncharge(
        &mut self,
        charged_us: u64,
        now_us: u64,
        tokens: u64,
        usd: u64,
        on_downgrade_budget: bool,
    ) {
        let (day, month) = (utc_day(now_us), utc_month(now_us));
        if utc_day(charged_us) == day {
            if on_downgrade_budget {
                self.downgrade_day_tokens.sub(day, tokens);
            } else {
                self.day_tokens.sub(day, tokens);
            }
            self.day_usd.sub(day, usd);
        }
        if utc_month(charged_us) == month {
            if !on_downgrade_budget {
                self.month_tokens.sub(month, tokens);
            }
            self.month_usd.sub(month, usd);
        }
    }

    /// Count a denied or downgraded Reserve, and what it saved.
    pub fn record_saving(&mut self, now_us: u64, saved_usd: u64, downgraded: bool) {
        let day = utc_day(now_us);
        if downgraded {
            self.day_downgrades.add(day, 1);
        } else {
            self.day_denials.add(day, 1);
        }
        self.day_saved_usd.add(day, saved_usd);
        self.month_saved_usd.add(utc_month(now_us), saved_usd);
    }

    /// Whether this state is indistinguishable from a fresh scope's at `now_us` under `limits`,
    /// so that it can be forgotten (bounding memory by active scopes, not every one ever seen).
    /// The limits are asked for (`limits`) only when the counters are all at rest and a bucket
    /// is kept: finding them costs a CIDR scan or an override merge, and the sweeper asks
    /// thousands of scopes a pass.
    pub fn is_at_rest(&self, now_us: u64, limits: impl FnOnce() -> Arc<Limits>) -> bool {
        let (day, month) = (utc_day(now_us), utc_month(now_us));
        let today = [
            &self.day_tokens,
            &self.day_requests,
            &self.day_shadow_denials,
            &self.day_denials,
            &self.day_downgrades,
            &self.day_usd,
            &self.day_saved_usd,
            &self.downgrade_day_tokens,
        ];
        let this_month = [&self.month_tokens, &self.month_usd, &self.month_saved_usd];
        let counters_at_rest = self.open_holds == 0
            && self.held_tokens == 0
            && self.held_usd == 0
            && self.window.until_empty(now_us) == 0
            && today.iter().all(|c| c.get(day) == 0)
            && this_month.iter().all(|c| c.get(month) == 0);
        counters_at_rest && self.bucket_at_rest(now_us, limits)
    }

    /// Whether the bucket is full, or unlimited by `limits` (asked for only if a bucket is
    /// kept).
    fn bucket_at_rest(&self, now_us: u64, limits: impl FnOnce() -> Arc<Limits>) -> bool {
        self.bucket.is_none_or(|b| {
            limits()
                .bucket()
                .is_none_or(|config| b.wait_for(config, now_us, config.capacity) == Some(0))
        })
    }

    /// Whether forgetting this state would change no decision under `limits` at `now_us`:
    /// nothing is held, the minute window is empty, the bucket is full, and no period quota
    /// that `limits` sets has anything charged in its current period. What forgetting it loses
    /// are figures only GetUsage reports (requests, denials, downgrades, savings, and use or
    /// spending in a period no quota of this scope counts). Looser than
    /// [`is_at_rest`](Self::is_at_rest), which loses nothing: for evicting under pressure. The
    /// window is asked to be empty whatever the limits, since it costs a minute at most.
    pub fn is_evictable(&self, now_us: u64, limits: impl FnOnce() -> Arc<Limits>) -> bool {
        if self.open_holds != 0
            || self.held_tokens != 0
            || self.held_usd != 0
            || self.window.until_empty(now_us) != 0
        {
            return false;
        }
        let limits = limits();
        let (day, month) = (utc_day(now_us), utc_month(now_us));
        let unread =
            |limit: Option<u64>, c: &PeriodCounter, period| limit.is_none() || c.get(period) == 0;
        let downgrade_per_day = limits.downgrade.as_ref().and_then(|d| d.tokens_per_day);
        unread(limits.tokens_per_day, &self.day_tokens, day)
            && unread(limits.tokens_per_month, &self.month_tokens, month)
            && unread(limits.usd_per_day, &self.day_usd, day)
            && unread(limits.usd_per_month, &self.month_usd, month)
            && unread(downgrade_per_day, &self.downgrade_day_tokens, day)
            && self.bucket_at_rest(now_us, || limits)
    }
}
