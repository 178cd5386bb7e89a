//! Making room in a full scope table for an admitted call, by evicting scopes that no limit
//! needs any more.
//!
//! The sweeper forgets a scope only when its state is the same as a fresh one's, so nothing
//! is lost; but a scope with usage this month is kept until the month ends for its GetUsage
//! figures, and a table full of such scopes would refuse every new user for the rest of the
//! month. So a call that needs a new scope and finds the table full first evicts scopes whose
//! state no limit that applies to them reads: what that loses are figures only GetUsage
//! reports of that one scope (requests, denials, savings, and use or spending in a period no
//! quota of it counts), never anything a decision depends on, and the group's and the fleet's
//! figures keep them. The fleet's scope is never evicted.

use super::{Engine, EngineError, Mutation, ScopeKey, Scopes};

/// Scopes looked at, at most, by one call that needs room: eviction runs under the engine lock
/// in the request path, so it is bounded, never a scan of the table. It goes round-robin with
/// the sweeper's queue, so a call that finds nothing leaves the next call the next scopes.
pub(super) const EVICTION_PROBES: usize = 64;

impl Engine {
    /// Make room for `new` scopes that have no state yet, evicting (see the module doc) if the
    /// table is at its bound; the scopes of `call` are never evicted. Refused if the table is
    /// still full: every scope looked at still counts against some limit.
    pub(super) fn room_for(
        &mut self,
        new: usize,
        call: &Scopes,
        now_us: u64,
        out: &mut Vec<Mutation>,
    ) -> Result<(), EngineError> {
        let max = self.bounds.max_scopes;
        if new == 0 || self.scopes.len() + new <= max {
            return Ok(());
        }
        self.evict(self.scopes.len() + new - max, call, now_us, out);
        if self.scopes.len() + new > max {
            return Err(EngineError::Exhausted {
                what: "scopes with live state",
                bound: max as u64,
            });
        }
        Ok(())
    }

    /// Evict up to `wanted` scopes that no limit needs, looking at no more than
    /// [`EVICTION_PROBES`].
    fn evict(&mut self, wanted: usize, call: &Scopes, now_us: u64, out: &mut Vec<Mutation>) {
        self.forget_round_robin(EVICTION_PROBES, wanted, out, |e, key, state| {
            let spared = *key == ScopeKey::Global || call.0.iter().any(|(k, _, _)| k == key);
            !spared && state.is_evictable(now_us, || e.scope_limits(key))
        });
    }
}
