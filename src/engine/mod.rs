//! The decision engine: limits, buckets, windows and the reservation state machine, in memory,
//! with no I/O and no clock of its own (every call is given `now`).
//!
//! Each call that changes state pushes the [`Mutation`]s it makes, in order and as it makes
//! them, to an `out` vector the caller passes, so that no error path can lose one; the ledger
//! persists them before it answers. Dry runs change nothing and push nothing; a denial changes
//! only the counters of denials and savings.
//!
//! A Reserve is checked and charged against every scope that applies to it at once: its
//! subject, its group, its client IP and the fleet ([`ScopeKey`]), under the one engine lock.

mod bucket;
mod error;
mod evict;
mod housekeeping;
mod packed_scope;
mod period;
mod reservation;
mod reserve;
mod scope;
mod settle;
mod settled;
mod usage;
mod window;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use indexmap::IndexMap;

use packed_scope::PackedScope;
use settled::Settled;

pub use bucket::{BucketLimit, TokenBucket};
pub use error::EngineError;
pub use period::PeriodCounter;
pub use reservation::{
    HoldState, MalformedId, Requested, Reservation, ReservationId, Settlement, Usage,
};
pub use reserve::{Decision, ReserveInput, ReserveOutcome};
pub use scope::{Ask, Hold, LimitStatus, Refusal, ScopeKey, ScopeKind, ScopeState};
pub use settle::{CommitOutcome, RefundOutcome};
pub use usage::{UsageQuery, UsageReport};
pub use window::RequestWindow;

use crate::clock::MICROS_PER_DAY;
use crate::policy::{Limits, Overrides, Policy, SubjectConfig, Tier, LIMIT_CEILING};

/// One change to durable state. `None` deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// A scope's quota state.
    Scope {
        /// The scope.
        key: ScopeKey,
        /// Its new state.
        state: Option<ScopeState>,
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

/// The scopes of one call (subject first, fleet last), each with its limits and its state as
/// read at the start of the call: a decision changes these copies and writes them back whole.
pub(super) struct Scopes(Vec<(ScopeKey, Arc<Limits>, ScopeState)>);

impl Scopes {
    /// The subject's limits (the subject is always first).
    fn subject_limits(&self) -> &Arc<Limits> {
        &self.0[0].1
    }

    /// The status of every limit of every scope.
    fn statuses(&self, now_us: u64) -> Vec<LimitStatus> {
        let mut out = Vec::new();
        for (key, limits, state) in &self.0 {
            state.statuses(limits, now_us, key.kind(), &key.id(), &mut out);
        }
        out
    }
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
    /// Scopes (subjects, groups, client IPs) with live state. Only admitted calls fill it (a
    /// denial creates no subject's or client IP's scope). Scopes at rest are forgotten by the
    /// sweeper; a call that needs a new scope while the table is full first evicts scopes no
    /// limit needs any more (a bounded number looked at per call), and is refused only if
    /// that frees no room.
    pub max_scopes: usize,
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
            max_scopes: 2_000_000,
            max_settled: 2_000_000,
            retention_us: MICROS_PER_DAY,
            max_per_pass: 4_096,
        }
    }
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
    /// Every scope with live state, packed (see [`PackedScope`]). An `IndexMap`, not a
    /// `HashMap`: its entries sit in one dense vector (a hash map's table is at most 7/8 full
    /// and, just past a power of two, half empty, which doubled the bytes per scope at a
    /// million), and the sweeper walks that vector by position (`rest_cursor`).
    scopes: IndexMap<ScopeKey, PackedScope>,
    /// The position in `scopes` where the sweeper's round-robin goes on: a walk that costs
    /// O(1) per scope visited, never a scan of all, and needs no second copy of every key. A
    /// scope forgotten is swap-removed, so the last scope takes its place and is visited next;
    /// a new scope goes to the end. Every scope is still visited once per round.
    rest_cursor: usize,
    assignments: HashMap<String, SubjectConfig>,
    /// Open holds (HELD reservations).
    open: HashMap<ReservationId, Reservation>,
    /// Open holds by deadline: the sweeper pops from the front.
    deadlines: BTreeSet<(u64, ReservationId)>,
    /// Settled reservations, packed, by id, by settle time (purged from the front after the
    /// retention) and by idempotency key.
    settled: Settled,
    /// (subject, key) -> the open hold the key made. A key is here or owned by a settled
    /// record in `settled`, never both: the reservation the key made last.
    open_keys: HashMap<(String, String), ReservationId>,
    /// Scopes whose latest change was a denial's counters (denials, savings), not yet handed
    /// to the store. Why not at once: a denial acknowledges nothing, so nobody waits for its
    /// record, and a flood of denials must not cost a record (and a queue slot) each. The
    /// sweeper persists these in bounded batches ([`Engine::save_denial_counters`]); a later
    /// decision that writes the scope writes them with it. A crash loses at most the last
    /// pass's denial counters, never an acknowledged decision.
    unsaved: HashSet<ScopeKey>,
}

impl Engine {
    /// An empty engine.
    pub fn new(policy: Arc<Policy>, bounds: Bounds) -> Self {
        Self {
            policy,
            bounds,
            scopes: IndexMap::new(),
            rest_cursor: 0,
            assignments: HashMap::new(),
            open: HashMap::new(),
            deadlines: BTreeSet::new(),
            settled: Settled::default(),
            open_keys: HashMap::new(),
            unsaved: HashSet::new(),
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

    /// The limits of a scope: a subject's tier with its overrides, or the policy's for a
    /// group, a client IP or the fleet.
    pub fn scope_limits(&self, key: &ScopeKey) -> Arc<Limits> {
        let scopes = self.policy.scopes();
        match key {
            ScopeKey::Subject(s) => self.limits_of(s),
            ScopeKey::Group(g) => scopes.group(g),
            ScopeKey::Ip(ip) => scopes.ip(*ip),
            ScopeKey::Global => scopes.global(),
        }
    }

    /// The scopes `keys` name, with their limits and current state.
    fn scopes_of(&self, keys: Vec<ScopeKey>) -> Scopes {
        Scopes(
            keys.into_iter()
                .map(|k| {
                    let limits = self.scope_limits(&k);
                    let state = self.scope_state(&k);
                    (k, limits, state)
                })
                .collect(),
        )
    }

    /// Whether a scope's refusals are enforced (false: shadow mode).
    fn enforces(&self, limits: &Limits) -> bool {
        self.policy.enforce() && limits.enforce
    }

    fn scope_state(&self, key: &ScopeKey) -> ScopeState {
        self.scopes
            .get(key)
            .map(PackedScope::state)
            .unwrap_or_default()
    }

    fn put_scope(&mut self, key: &ScopeKey, state: ScopeState, out: &mut Vec<Mutation>) {
        self.set_scope(key, state);
        if !self.unsaved.is_empty() {
            // This record carries the denial counters too.
            self.unsaved.remove(key);
        }
        out.push(Mutation::Scope {
            key: key.clone(),
            state: Some(state),
        });
    }

    /// Change a scope's state in memory only, for a denial's counters: see `unsaved`.
    fn put_scope_unsaved(&mut self, key: &ScopeKey, state: ScopeState) {
        self.set_scope(key, state);
        self.unsaved.insert(key.clone());
    }

    fn set_scope(&mut self, key: &ScopeKey, state: ScopeState) {
        match self.scopes.get_mut(key) {
            Some(slot) => slot.set(&state),
            None => {
                self.scopes.insert(key.clone(), PackedScope::pack(&state));
            }
        }
    }

    /// Hand the store the scopes only denials changed since their last record (at most
    /// `max_per_pass`). Returns how many. A scope forgotten since needs nothing: its removal
    /// was recorded.
    pub fn save_denial_counters(&mut self, out: &mut Vec<Mutation>) -> usize {
        let keys: Vec<ScopeKey> = self
            .unsaved
            .iter()
            .take(self.bounds.max_per_pass)
            .cloned()
            .collect();
        let mut saved = 0;
        for key in keys {
            self.unsaved.remove(&key);
            if let Some(state) = self.scopes.get(&key) {
                out.push(Mutation::Scope {
                    key,
                    state: Some(state.state()),
                });
                saved += 1;
            }
        }
        saved
    }

    /// The group a subject is assigned to by SetSubject, if any.
    pub fn assigned_group(&self, subject: &str) -> Option<&str> {
        self.assignments
            .get(subject)
            .and_then(|c| c.group.as_deref())
    }

    /// Write an open hold (new or extended).
    fn put_open(&mut self, r: Reservation, out: &mut Vec<Mutation>) {
        out.push(Mutation::Reservation {
            id: r.id,
            record: Some(Box::new(r.clone())),
        });
        self.open.insert(r.id, r);
    }

    /// The reservation `id`, open or settled, whatever its age.
    fn record(&self, id: ReservationId) -> Option<Cow<'_, Reservation>> {
        match self.open.get(&id) {
            Some(r) => Some(Cow::Borrowed(r)),
            None => self.settled.get(id).map(Cow::Owned),
        }
    }

    /// Refuse `caller` on reservation `id` if another caller made it. A hold made while the
    /// Quota API was open (no caller) may be settled by anyone; an unknown id passes (the call
    /// itself then answers NOT_FOUND).
    pub fn check_owner(&self, id: ReservationId, caller: Option<&str>) -> Result<(), EngineError> {
        match self.record(id) {
            Some(r) if r.caller.is_some() && r.caller.as_deref() != caller => {
                Err(EngineError::NotOwner(id))
            }
            _ => Ok(()),
        }
    }

    /// The reservation the idempotency `key` of `subject` made last, if it is still kept.
    fn key_owner(&self, subject: &str, key: &str) -> Option<ReservationId> {
        self.open_keys
            .get(&(subject.to_string(), key.to_string()))
            .copied()
            .or_else(|| self.settled.key_owner(subject, key))
    }

    /// Whether a settled reservation is older than the retention (and so no longer answers).
    fn past_retention(&self, r: &Reservation, now_us: u64) -> bool {
        r.state
            .finished_at()
            .is_some_and(|at| at.saturating_add(self.bounds.retention_us) <= now_us)
    }

    /// Open holds across all subjects.
    pub fn open_holds(&self) -> usize {
        // Every open hold has exactly one deadline, and nothing else does.
        self.deadlines.len()
    }

    /// Reservation records in memory (open and settled).
    pub fn reservation_count(&self) -> usize {
        self.open.len() + self.settled.len()
    }

    /// Scopes with live state in memory.
    pub fn scope_count(&self) -> usize {
        self.scopes.len()
    }

    /// Set a subject's tier, group and limit overrides (replacing what was set before).
    pub fn set_subject(
        &mut self,
        subject: &str,
        tier: &str,
        group: Option<String>,
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
            group,
        };
        self.assignments.insert(subject.to_string(), config.clone());
        out.push(Mutation::Assignment {
            subject: subject.to_string(),
            config: Some(config),
        });
        Ok(())
    }

    /// A subject's tier, whether it was assigned (rather than the default), its overrides and
    /// its group.
    pub fn subject_config(&self, subject: &str) -> (String, bool, Overrides, Option<String>) {
        let config = self.assignments.get(subject);
        (
            self.tier_of(subject).name.clone(),
            // Assigned to a tier the policy still has (a reload may have removed it).
            config.is_some_and(|c| self.policy.tier(&c.tier).is_some()),
            config.map(|c| c.overrides.clone()).unwrap_or_default(),
            config.and_then(|c| c.group.clone()),
        )
    }

    /// Forget a subject's usage (tokens and requests today, minute window, bucket level). Open
    /// holds stay: they are still owed a Commit or Refund, and forgetting them would let their
    /// settlement release tokens that were never counted.
    pub fn reset_usage(&mut self, subject: &str, out: &mut Vec<Mutation>) {
        let key = ScopeKey::Subject(Arc::from(subject));
        let old = self.scope_state(&key);
        let fresh = ScopeState {
            held_tokens: old.held_tokens,
            downgrade_held_tokens: old.downgrade_held_tokens,
            held_usd: old.held_usd,
            open_holds: old.open_holds,
            ..ScopeState::default()
        };
        self.put_scope(&key, fresh, out);
    }
}

/// Views for the tests' invariant checks.
#[cfg(test)]
impl Engine {
    /// Every reservation kept, open or settled.
    fn all_reservations(&self) -> std::collections::BTreeMap<ReservationId, Reservation> {
        let settled = self.settled.all().into_iter().map(|(_, r)| (r.id, r));
        self.open
            .iter()
            .map(|(id, r)| (*id, r.clone()))
            .chain(settled)
            .collect()
    }

    /// Every idempotency key kept, with the reservation it answers with.
    fn idempotency_keys(&self) -> std::collections::BTreeMap<(String, String), ReservationId> {
        let keys: Vec<_> = self
            .open_keys
            .iter()
            .map(|(k, id)| (k.clone(), *id))
            .collect();
        let settled = self.settled.keys();
        let all: std::collections::BTreeMap<_, _> = keys
            .iter()
            .cloned()
            .chain(settled.iter().cloned())
            .collect();
        assert_eq!(
            all.len(),
            keys.len() + settled.len(),
            "a key is owned by an open hold or a settled record, never both"
        );
        all
    }
}

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod settled_tests;
#[cfg(test)]
mod tests;
