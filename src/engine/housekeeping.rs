//! Keeping memory bounded: purging settled reservations after the retention, forgetting
//! scopes at rest, and rebuilding the engine from persisted records.

use std::collections::{HashMap, HashSet};

use super::{
    Engine, HoldState, Mutation, PackedScope, Reservation, ReservationId, ScopeKey, ScopeState,
};
use crate::policy::SubjectConfig;

impl Engine {
    /// Remove settled reservations older than the retention, or the oldest beyond
    /// `max_settled`, with their idempotency keys (at most `max_per_pass`). Returns how many.
    pub fn purge_settled(&mut self, now_us: u64, out: &mut Vec<Mutation>) -> usize {
        let mut purged = 0;
        while purged < self.bounds.max_per_pass {
            let Some((at_us, _)) = self.settled.oldest() else {
                break;
            };
            let too_old = at_us.saturating_add(self.bounds.retention_us) <= now_us;
            let too_many = self.settled.len() > self.bounds.max_settled;
            if !too_old && !too_many {
                break;
            }
            self.purge_oldest_settled(out);
            purged += 1;
        }
        purged
    }

    /// Remove the oldest settled reservation and its idempotency key.
    pub(super) fn purge_oldest_settled(&mut self, out: &mut Vec<Mutation>) {
        // Its key goes with it unless it was reused after this record's retention ran out.
        let Some(id) = self.settled.pop_oldest() else {
            return;
        };
        out.push(Mutation::Reservation { id, record: None });
    }

    /// Visit the next `max_per_pass` scopes in round-robin order and forget those whose state
    /// is the same as a fresh scope's. Returns how many were forgotten.
    pub fn forget_scopes_at_rest(&mut self, now_us: u64, out: &mut Vec<Mutation>) -> usize {
        let looks = self.bounds.max_per_pass;
        self.forget_round_robin(looks, usize::MAX, out, |e, key, state| {
            state.is_at_rest(now_us, || e.scope_limits(key))
        })
    }

    /// Visit at most `looks` scopes in round-robin order from `rest_cursor`, and forget those
    /// `forget` picks, with a delete record each, until `wanted` are forgotten. Returns how many
    /// were. The one walk the sweeper and eviction share, so a scope is visited in turn
    /// whoever visits it.
    pub(super) fn forget_round_robin(
        &mut self,
        looks: usize,
        wanted: usize,
        out: &mut Vec<Mutation>,
        forget: impl Fn(&Self, &ScopeKey, &ScopeState) -> bool,
    ) -> usize {
        let mut forgotten = 0;
        for _ in 0..looks.min(self.scopes.len()) {
            if forgotten == wanted {
                break;
            }
            if self.rest_cursor >= self.scopes.len() {
                self.rest_cursor = 0;
            }
            let Some((key, packed)) = self.scopes.get_index(self.rest_cursor) else {
                break;
            };
            if forget(self, key, &packed.state()) {
                // The last scope moves here, and is the next one visited.
                if let Some((key, _)) = self.scopes.swap_remove_index(self.rest_cursor) {
                    out.push(Mutation::Scope { key, state: None });
                }
                forgotten += 1;
            } else {
                self.rest_cursor += 1;
            }
        }
        forgotten
    }

    /// Rebuild from persisted records. Reservations are the truth for what is held: each
    /// scope's held tokens, held money and open holds are recomputed from them, and a
    /// disagreement is reported (it would mean a torn write, which sled's atomic batches rule
    /// out).
    pub fn restore(
        &mut self,
        scopes: HashMap<ScopeKey, ScopeState>,
        reservations: Vec<Reservation>,
        assignments: HashMap<String, SubjectConfig>,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        let mut scopes = scopes;
        self.assignments = assignments;
        let mut held: HashMap<ScopeKey, ScopeState> = HashMap::new();
        for r in &reservations {
            if r.state == HoldState::Held {
                for key in r.scopes() {
                    let hold = r.hold_on(key.kind());
                    let e = held.entry(key).or_default();
                    e.held_tokens += hold.tokens;
                    e.held_usd += hold.usd;
                    if hold.on_downgrade_budget {
                        e.downgrade_held_tokens += hold.tokens;
                    }
                    e.open_holds += 1;
                }
            }
        }
        let holds = |s: &ScopeState| {
            (
                s.held_tokens,
                s.downgrade_held_tokens,
                s.held_usd,
                s.open_holds,
            )
        };
        for (key, state) in scopes.iter_mut() {
            // No open hold anywhere (a store at rest): no lookup per scope.
            let truth = if held.is_empty() {
                ScopeState::default()
            } else {
                held.remove(key).unwrap_or_default()
            };
            if holds(state) != holds(&truth) {
                problems.push(format!(
                    "scope {:?} {:?}: stored holds (tokens, downgrade tokens, µUSD, count) {:?}, reservations say {:?}",
                    key.kind(),
                    key.id(),
                    holds(state),
                    holds(&truth)
                ));
                state.held_tokens = truth.held_tokens;
                state.downgrade_held_tokens = truth.downgrade_held_tokens;
                state.held_usd = truth.held_usd;
                state.open_holds = truth.open_holds;
            }
        }
        for (key, truth) in held {
            problems.push(format!(
                "scope {:?} {:?} has {} open holds but no state",
                key.kind(),
                key.id(),
                truth.open_holds
            ));
            scopes.insert(key, truth);
        }
        self.scopes = scopes
            .into_iter()
            .map(|(key, state)| (key, PackedScope::pack(&state)))
            .collect();
        self.rest_cursor = 0;
        // A reused key belongs to its newest reservation (ids sort by time).
        // Sized once: at a million records, growing moves every entry at each doubling.
        let mut key_owners: HashMap<(&str, &str), ReservationId> =
            HashMap::with_capacity(reservations.len());
        for r in &reservations {
            if let Some(key) = &r.idempotency_key {
                let slot = key_owners
                    .entry((r.subject.as_str(), key.as_str()))
                    .or_insert(r.id);
                *slot = (*slot).max(r.id);
            }
        }
        let owners: HashSet<ReservationId> = key_owners.into_values().collect();
        for r in reservations {
            let owns_key = owners.contains(&r.id);
            match r.state.finished_at() {
                None => {
                    self.deadlines.insert((r.expires_us, r.id));
                    if let (true, Some(key)) = (owns_key, &r.idempotency_key) {
                        self.open_keys
                            .insert((r.subject.clone(), key.clone()), r.id);
                    }
                    self.open.insert(r.id, r);
                }
                Some(at_us) => self.settled.insert(&r, at_us, owns_key),
            }
        }
        problems
    }
}
