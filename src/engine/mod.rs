//! The decision engine: limits, buckets, windows and the reservation state machine, in memory,
//! with no I/O and no clock of its own (every call is given `now`).
//!
//! Each call that changes state pushes the [`Mutation`]s it makes, in order and as it makes
//! them, to an `out` vector the caller passes, so that no error path can lose one; the ledger
//! persists them before it answers. Denials and dry runs change nothing and push none.

mod bucket;
mod error;
mod housekeeping;
mod period;
mod reservation;
mod reserve;
mod settle;
mod subject;
mod window;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

pub use bucket::{BucketLimit, TokenBucket, UNITS_PER_TOKEN};
pub use error::EngineError;
pub use period::PeriodCounter;
pub use reservation::{HoldState, MalformedId, Reservation, ReservationId, Settlement, Usage};
pub use reserve::{Decision, ReserveInput, ReserveOutcome};
pub use settle::{CommitOutcome, RefundOutcome};
pub use subject::{LimitStatus, Refusal, SubjectState};
pub use window::RequestWindow;

use crate::clock::{utc_day, MICROS_PER_DAY};
use crate::policy::{Limits, Overrides, Policy, SubjectConfig, Tier, LIMIT_CEILING};

/// One change to durable state. `None` deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// A subject's quota state.
    Subject {
        /// The subject.
        subject: String,
        /// Its new state.
        state: Option<SubjectState>,
    },
    /// A reservation record.
    Reservation {
        /// The id.
        id: ReservationId,
        /// The new record.
        record: Option<Box<Reservation>>,
    },
    /// A subject's tier and overrides.
    Assignment {
        /// The subject.
        subject: String,
        /// What was set.
        config: Option<SubjectConfig>,
    },
}

/// Bounds on everything the engine keeps in memory. A bound that is reached refuses new work
/// (RESOURCE_EXHAUSTED) instead of letting memory grow without limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Open holds across all subjects.
    pub max_open_holds: usize,
    /// Open holds of one subject, whatever its tier says (a tier without `max_concurrent` must
    /// still not let one subject fill the table).
    pub max_holds_per_subject: u32,
    /// Subjects with live state. Subjects at rest are forgotten by the sweeper; while the table
    /// is full, Reserves for new subjects are refused.
    pub max_subjects: usize,
    /// Settled reservations kept for retries and late Commits. Past this, the oldest go first,
    /// even if younger than the retention (with their idempotency keys).
    pub max_settled: usize,
    /// How long a settled (committed, refunded, expired) reservation and its idempotency key are
    /// kept: 24 hours, the late-commit window.
    pub retention_us: u64,
    /// Holds expired, records purged or subjects visited in one housekeeping pass, so one pass
    /// never holds the engine lock for long.
    pub max_per_pass: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            max_open_holds: 1_000_000,
            max_holds_per_subject: 10_000,
            max_subjects: 2_000_000,
            max_settled: 2_000_000,
            retention_us: MICROS_PER_DAY,
            max_per_pass: 4_096,
        }
    }
}

/// A subject's usage, for GetUsage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReport {
    /// The subject.
    pub subject: String,
    /// Its tier.
    pub tier: String,
    /// Tokens charged this UTC day.
    pub used_tokens: u64,
    /// Tokens in open holds.
    pub held_tokens: u64,
    /// Reserves admitted this UTC day.
    pub requests: u64,
    /// Open holds.
    pub open_holds: u32,
    /// Every limit of its tier.
    pub limits: Vec<LimitStatus>,
    /// Tokens charged this UTC calendar month.
    pub used_tokens_month: u64,
    /// Reserves allowed today only because of shadow mode.
    pub shadow_denials: u64,
}

/// The whole in-memory state of the quota ledger.
///
/// Decisions do not expire due holds themselves: the caller runs [`Engine::expire_due`] first
/// and persists what it returns whether or not the decision then succeeds (the ledger does).
///
/// Why one struct behind one lock (held by the ledger) rather than finer locks: a decision reads
/// and writes several limits and a reservation atomically, the work under the lock is about a
/// microsecond of arithmetic and map operations, and on a 2-core machine a single uncontended
/// lock is cheaper than any ordering scheme for several. See `benches/decision.rs`.
#[derive(Debug)]
pub struct Engine {
    policy: Arc<Policy>,
    bounds: Bounds,
    subjects: HashMap<Arc<str>, SubjectState>,
    /// Every subject in `subjects`, once, in the order the sweeper visits them to forget those
    /// at rest: a round-robin that costs O(1) per subject visited, never a scan of all.
    rest_queue: VecDeque<Arc<str>>,
    assignments: HashMap<String, SubjectConfig>,
    reservations: HashMap<ReservationId, Reservation>,
    /// Open holds by deadline: the sweeper pops from the front.
    deadlines: BTreeSet<(u64, ReservationId)>,
    /// Settled reservations by settle time: purged from the front after the retention.
    settled: BTreeSet<(u64, ReservationId)>,
    /// (subject, key) -> the reservation the key first made.
    idempotency: HashMap<(String, String), ReservationId>,
    open_holds: usize,
}

impl Engine {
    /// An empty engine.
    pub fn new(policy: Arc<Policy>, bounds: Bounds) -> Self {
        Self {
            policy,
            bounds,
            subjects: HashMap::new(),
            rest_queue: VecDeque::new(),
            assignments: HashMap::new(),
            reservations: HashMap::new(),
            deadlines: BTreeSet::new(),
            settled: BTreeSet::new(),
            idempotency: HashMap::new(),
            open_holds: 0,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Put a new policy in force. Usage, holds and assignments are kept; a subject assigned to
    /// a tier the new policy lacks gets the default tier; limits apply from the next decision.
    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        self.policy = policy;
    }

    /// The bounds in force.
    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    /// The tier of a subject.
    pub fn tier_of(&self, subject: &str) -> &Tier {
        self.policy
            .resolve(self.assignments.get(subject).map(|c| c.tier.as_str()))
    }

    /// The limits of a subject: its tier's, with its overrides applied.
    pub fn limits_of(&self, subject: &str) -> Arc<Limits> {
        let tier = &self.tier_of(subject).limits;
        match self.assignments.get(subject) {
            Some(c) if !c.overrides.is_empty() => Arc::new(c.overrides.apply(tier)),
            _ => Arc::clone(tier),
        }
    }

    fn subject_state(&self, subject: &str) -> SubjectState {
        self.subjects.get(subject).copied().unwrap_or_default()
    }

    fn put_subject(&mut self, subject: &str, state: SubjectState, out: &mut Vec<Mutation>) {
        match self.subjects.get_mut(subject) {
            Some(slot) => *slot = state,
            None => {
                let key: Arc<str> = Arc::from(subject);
                self.subjects.insert(key.clone(), state);
                self.rest_queue.push_back(key);
            }
        }
        out.push(Mutation::Subject {
            subject: subject.to_string(),
            state: Some(state),
        });
    }

    fn put_reservation(&mut self, r: Reservation, out: &mut Vec<Mutation>) {
        out.push(Mutation::Reservation {
            id: r.id,
            record: Some(Box::new(r.clone())),
        });
        self.reservations.insert(r.id, r);
    }

    /// Whether a settled reservation is older than the retention (and so no longer answers).
    fn past_retention(&self, r: &Reservation, now_us: u64) -> bool {
        r.state
            .finished_at()
            .is_some_and(|at| at.saturating_add(self.bounds.retention_us) <= now_us)
    }

    /// A reservation by id (for inspection and tests).
    pub fn reservation(&self, id: ReservationId) -> Option<&Reservation> {
        self.reservations.get(&id)
    }

    /// Open holds across all subjects.
    pub fn open_holds(&self) -> usize {
        self.open_holds
    }

    /// Reservation records in memory (open and settled).
    pub fn reservation_count(&self) -> usize {
        self.reservations.len()
    }

    /// Subjects with live state in memory.
    pub fn subject_count(&self) -> usize {
        self.subjects.len()
    }

    /// A subject's usage and limits.
    pub fn usage(&self, subject: &str, now_us: u64) -> UsageReport {
        let tier = self.tier_of(subject);
        let limits = self.limits_of(subject);
        let state = self.subject_state(subject);
        let today = utc_day(now_us);
        UsageReport {
            subject: subject.to_string(),
            tier: tier.name.clone(),
            used_tokens: state.day_tokens.get(today),
            held_tokens: state.held_tokens,
            requests: state.day_requests.get(today),
            open_holds: state.open_holds,
            limits: state.statuses(&limits, now_us),
            used_tokens_month: state.month_tokens.get(crate::clock::utc_month(now_us)),
            shadow_denials: state.day_shadow_denials.get(today),
        }
    }

    /// Set a subject's tier and limit overrides (replacing what was set before).
    pub fn set_subject(
        &mut self,
        subject: &str,
        tier: &str,
        overrides: Overrides,
        out: &mut Vec<Mutation>,
    ) -> Result<(), EngineError> {
        if self.policy.tier(tier).is_none() {
            let names: Vec<_> = self.policy.tiers().map(|t| t.name.as_str()).collect();
            return Err(EngineError::InvalidArgument {
                field: "tier",
                rule: format!(
                    "{tier:?} is not a tier of the policy (tiers: {})",
                    names.join(", ")
                ),
            });
        }
        if let Some((field, value)) = overrides.out_of_range() {
            return Err(EngineError::InvalidArgument {
                field: "overrides",
                rule: format!("{field} = {value} is above the ceiling of {LIMIT_CEILING}"),
            });
        }
        let config = SubjectConfig {
            tier: tier.to_string(),
            overrides,
        };
        self.assignments.insert(subject.to_string(), config.clone());
        out.push(Mutation::Assignment {
            subject: subject.to_string(),
            config: Some(config),
        });
        Ok(())
    }

    /// A subject's tier, whether it was assigned (rather than the default), and its overrides.
    pub fn subject_tier(&self, subject: &str) -> (String, bool, Overrides) {
        (
            self.tier_of(subject).name.clone(),
            // Assigned to a tier the policy still has (a reload may have removed it).
            self.assignments
                .get(subject)
                .is_some_and(|c| self.policy.tier(&c.tier).is_some()),
            self.assignments
                .get(subject)
                .map(|c| c.overrides.clone())
                .unwrap_or_default(),
        )
    }

    /// Forget a subject's usage (tokens and requests today, minute window, bucket level). Open
    /// holds stay: they are still owed a Commit or Refund, and forgetting them would let their
    /// settlement release tokens that were never counted.
    pub fn reset_usage(&mut self, subject: &str, out: &mut Vec<Mutation>) {
        let old = self.subject_state(subject);
        let fresh = SubjectState {
            held_tokens: old.held_tokens,
            open_holds: old.open_holds,
            ..SubjectState::default()
        };
        self.put_subject(subject, fresh, out);
    }
}

#[cfg(test)]
mod tests;
