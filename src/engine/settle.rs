//! Commit, Refund and expiry: the ways a hold ends.

use super::{
    Engine, EngineError, HoldState, LimitStatus, Mutation, Reservation, ReservationId, ScopeKey,
    ScopeState, Scopes, Settlement, Usage,
};
use std::borrow::Cow;

use crate::clock::MICROS_PER_SECOND;
use crate::policy::Limits;

/// The answer to a Commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOutcome {
    /// What was charged and given back.
    pub settlement: Settlement,
    /// Every limit, after the Commit.
    pub limits: Vec<LimitStatus>,
    /// This repeats the answer to an earlier Commit (nothing was charged now).
    pub replayed: bool,
}

/// The answer to a Refund.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefundOutcome {
    /// Tokens given back.
    pub released_tokens: u64,
    /// This repeats the answer to an earlier Refund (nothing was given back now).
    pub replayed: bool,
}

fn usage_text(u: &Usage) -> String {
    if u.usage_unknown {
        "usage_unknown = true".to_string()
    } else {
        format!(
            "prompt_tokens = {}, completion_tokens = {}",
            u.prompt_tokens, u.completion_tokens
        )
    }
}

impl Engine {
    /// A reservation that is still kept: one settled longer than the retention ago is gone,
    /// whether or not the sweeper has purged it yet, so the answer does not depend on timing.
    fn existing(&self, id: ReservationId, now_us: u64) -> Result<Reservation, EngineError> {
        self.record(id)
            .filter(|r| !self.past_retention(r, now_us))
            .map(Cow::into_owned)
            .ok_or(EngineError::NotFound(id))
    }

    /// Charge the usage the provider reported. Usage above the hold is charged anyway (debt);
    /// the unused rest flows back to every limit it came from. A retry with the same usage
    /// returns the same answer; other usage is an illegal transition.
    pub fn commit(
        &mut self,
        id: ReservationId,
        usage: Usage,
        now_us: u64,
        out: &mut Vec<Mutation>,
    ) -> Result<CommitOutcome, EngineError> {
        self.check_commit_size(id, &usage)?;
        self.expire_if_overdue(id, now_us, out);
        let r = self.existing(id, now_us)?;
        let held = r.held_tokens();
        let expired_at = match r.state {
            HoldState::Held => None,
            HoldState::Expired { at_us } => Some(at_us),
            HoldState::Committed {
                usage: first,
                settlement,
                ..
            } => {
                if first == usage {
                    return Ok(CommitOutcome {
                        settlement,
                        limits: self.scopes_of(r.scopes()).statuses(now_us),
                        replayed: true,
                    });
                }
                return Err(EngineError::IllegalTransition {
                    id,
                    state: "COMMITTED",
                    detail: format!(
                        "it was committed with {}; a Commit with {} conflicts",
                        usage_text(&first),
                        usage_text(&usage)
                    ),
                });
            }
            HoldState::Refunded { .. } => {
                return Err(EngineError::IllegalTransition {
                    id,
                    state: "REFUNDED",
                    detail: "a refunded hold cannot be committed".into(),
                })
            }
        };

        let actual_usd = if usage.usage_unknown {
            r.held_usd
        } else {
            r.cost(usage.prompt_tokens, usage.completion_tokens)
        };
        let settlement = Settlement::of(held, &usage, actual_usd);
        let actual = settlement.charged_tokens;
        let scopes = self.changed_scopes(&r, |key, limits, state| {
            let hold = r.hold_on(key.kind());
            match expired_at {
                None => {
                    state.release(hold);
                    state.charge(now_us, actual, actual_usd, hold.on_downgrade_budget);
                }
                Some(at_us) => {
                    // Expiry charged the full hold to its day; reconcile to the real usage.
                    // Amounts given back to a period that is over change nothing; debt lands
                    // on today.
                    let dg = hold.on_downgrade_budget;
                    let (more, less) = (actual.saturating_sub(held), held.saturating_sub(actual));
                    let (more_usd, less_usd) = (
                        actual_usd.saturating_sub(hold.usd),
                        hold.usd.saturating_sub(actual_usd),
                    );
                    state.charge(now_us, more, more_usd, dg);
                    state.uncharge(at_us, now_us, less, less_usd, dg);
                }
            }
            state.settle_bucket(limits, now_us, held, actual);
        });
        // A late Commit that brings debt to a forgotten scope needs room for it, like a
        // Reserve: evicted for, or refused (the Commit changes nothing; a retry may find room).
        let new = self.scopes_to_create(&scopes, now_us);
        self.room_for(new, &scopes, now_us, out)?;
        self.write_scopes(&scopes, now_us, out);
        if expired_at.is_none() {
            self.deadlines.remove(&(r.expires_us, id));
        }
        let mut r = r;
        r.state = HoldState::Committed {
            usage,
            settlement,
            at_us: now_us,
        };
        self.put_settled(r, now_us, out);
        Ok(CommitOutcome {
            settlement,
            limits: scopes.statuses(now_us),
            replayed: false,
        })
    }

    /// Refuse usage no real call can have: more tokens than the policy's `max_commit_tokens`,
    /// unless the hold itself was larger (a Commit within its hold takes nothing that was not
    /// admitted). Checked before anything changes, even an overdue hold's expiry. A retry of a
    /// Commit already made is left to the replay rules: it charges nothing.
    ///
    /// The prompt is not compared with the prompt held: a provider's count differs from the
    /// caller's for good reasons (a tokenizer that is only approximate, system prompts or tool
    /// definitions the provider adds, images), and usage is truth; the bound on the whole is
    /// what keeps one report from putting the fleet into debt.
    fn check_commit_size(&self, id: ReservationId, usage: &Usage) -> Result<(), EngineError> {
        let total = usage.prompt_tokens.saturating_add(usage.completion_tokens);
        let max = self.policy.max_commit_tokens();
        if usage.usage_unknown || total <= max {
            return Ok(());
        }
        let held = match self.record(id).as_deref() {
            Some(r) if matches!(r.state, HoldState::Committed { .. }) => return Ok(()),
            Some(r) if total <= r.held_tokens() => return Ok(()),
            Some(r) => r.held_tokens(),
            None => 0,
        };
        Err(EngineError::InvalidArgument {
            field: "completion_tokens",
            rule: format!(
                "prompt_tokens + completion_tokens ({} + {} = {total}) must be at most the policy's max_commit_tokens ({max}), or the hold ({held}) if larger: no real call reports more",
                usage.prompt_tokens, usage.completion_tokens
            ),
        })
    }

    /// The scopes of `r`, each with `change` applied to a copy of its state (nothing written
    /// yet: see [`write_scopes`](Self::write_scopes)).
    fn changed_scopes(
        &self,
        r: &Reservation,
        mut change: impl FnMut(&ScopeKey, &Limits, &mut ScopeState),
    ) -> Scopes {
        let mut scopes = self.scopes_of(r.scopes());
        for (key, limits, state) in &mut scopes.0 {
            change(key, limits, state);
        }
        scopes
    }

    /// Scopes of `scopes` that have no state yet and would be created by
    /// [`write_scopes`](Self::write_scopes). Only a late Commit's can: an open hold keeps
    /// every scope it counts in, but an expired one does not, and the sweeper may have
    /// forgotten them since.
    fn scopes_to_create(&self, scopes: &Scopes, now_us: u64) -> usize {
        scopes
            .0
            .iter()
            .filter(|(key, limits, state)| {
                !self.scopes.contains_key(key) && !state.is_at_rest(now_us, || limits.clone())
            })
            .count()
    }

    /// Persist changed scopes; a scope with no state yet whose new state is still a fresh
    /// one's is not created (there is nothing to remember, and it would take a place in the
    /// table).
    fn write_scopes(&mut self, scopes: &Scopes, now_us: u64, out: &mut Vec<Mutation>) {
        for (key, limits, state) in &scopes.0 {
            if self.scopes.contains_key(key) || !state.is_at_rest(now_us, || limits.clone()) {
                self.put_scope(key, *state, out);
            }
        }
    }

    /// Give a whole hold back: the call never happened. A retry returns the same answer.
    pub fn refund(
        &mut self,
        id: ReservationId,
        now_us: u64,
        out: &mut Vec<Mutation>,
    ) -> Result<RefundOutcome, EngineError> {
        self.expire_if_overdue(id, now_us, out);
        let r = self.existing(id, now_us)?;
        let held = r.held_tokens();
        match r.state {
            HoldState::Held => {}
            HoldState::Refunded { .. } => {
                return Ok(RefundOutcome {
                    released_tokens: held,
                    replayed: true,
                });
            }
            HoldState::Committed { .. } => {
                return Err(EngineError::IllegalTransition {
                    id,
                    state: "COMMITTED",
                    detail: "a committed hold cannot be refunded".into(),
                })
            }
            HoldState::Expired { .. } => {
                return Err(EngineError::IllegalTransition {
                    id,
                    state: "EXPIRED",
                    detail: "the hold expired and was charged in full; Commit the real usage \
                             (within 24 h) to reconcile"
                        .into(),
                })
            }
        }
        let scopes = self.changed_scopes(&r, |key, limits, state| {
            state.release(r.hold_on(key.kind()));
            state.settle_bucket(limits, now_us, held, 0);
        });
        self.write_scopes(&scopes, now_us, out);
        self.deadlines.remove(&(r.expires_us, id));
        let mut r = r;
        r.state = HoldState::Refunded { at_us: now_us };
        self.put_settled(r, now_us, out);
        Ok(RefundOutcome {
            released_tokens: held,
            replayed: false,
        })
    }

    /// Push an open hold's expiry out so that it lives at least `hold_us` from now (never
    /// pulling it in), within the tier's `max_hold_seconds` per call and
    /// `max_hold_lifetime_seconds` in all. Returns the new expiry. Repeating it is harmless.
    pub fn extend(
        &mut self,
        id: ReservationId,
        hold_us: u64,
        now_us: u64,
        out: &mut Vec<Mutation>,
    ) -> Result<u64, EngineError> {
        self.expire_if_overdue(id, now_us, out);
        let r = self.existing(id, now_us)?;
        if r.state != HoldState::Held {
            return Err(EngineError::IllegalTransition {
                id,
                state: r.state.name(),
                detail: "only a HELD reservation can be extended".into(),
            });
        }
        let tier = self.tier_of(&r.subject);
        let limits = &self.limits_of(&r.subject);
        super::reserve::check_hold(limits, &tier.name, hold_us)?;
        let wanted = now_us.saturating_add(hold_us).max(r.expires_us);
        if wanted == r.expires_us {
            // Nothing to push out (even if a reload has since lowered the lifetime).
            return Ok(wanted);
        }
        let lifetime_us = limits.max_hold_lifetime_seconds * MICROS_PER_SECOND;
        if wanted.saturating_sub(r.created_us) > lifetime_us {
            return Err(EngineError::InvalidArgument {
                field: "hold",
                rule: format!(
                    "would make the hold live {} s in all, more than max_hold_lifetime_seconds ({}) of tier {:?}",
                    (wanted - r.created_us) / MICROS_PER_SECOND,
                    limits.max_hold_lifetime_seconds,
                    tier.name
                ),
            });
        }
        let mut r = r;
        self.deadlines.remove(&(r.expires_us, id));
        r.expires_us = wanted;
        self.deadlines.insert((wanted, id));
        self.put_open(r, out);
        Ok(wanted)
    }

    /// Expire holds whose deadline has passed (at most `max_per_pass`): each is charged in full,
    /// since the app server most likely made the call and then died. Returns how many expired.
    pub fn expire_due(&mut self, now_us: u64, out: &mut Vec<Mutation>) -> usize {
        let mut expired = 0;
        while expired < self.bounds.max_per_pass {
            let Some(&(deadline, id)) = self.deadlines.first() else {
                break;
            };
            if deadline > now_us {
                break;
            }
            self.expire_hold(id, now_us, out);
            expired += 1;
        }
        expired
    }

    /// Expire one open hold at its deadline (found due at `now_us`).
    fn expire_hold(&mut self, id: ReservationId, now_us: u64, out: &mut Vec<Mutation>) {
        let mut r = self.open[&id].clone();
        debug_assert_eq!(r.state, HoldState::Held);
        let deadline = r.expires_us;
        self.deadlines.remove(&(deadline, id));
        let held = r.held_tokens();
        // The hold expired at its deadline, not when this runs (a pass can run late, e.g. after
        // a restart past midnight): it is charged to the deadline's day and month, and not at
        // all to a period the scope has already left behind (that period is over, and a late
        // Commit's reconciliation skips it by the same rule). The bucket keeps the full hold:
        // it was all used.
        let scopes = self.changed_scopes(&r, |key, _, state| {
            let hold = r.hold_on(key.kind());
            state.release(hold);
            state.charge_expired(deadline, now_us, held, hold.usd, hold.on_downgrade_budget);
        });
        self.write_scopes(&scopes, now_us, out);
        r.state = HoldState::Expired { at_us: deadline };
        self.put_settled(r, deadline, out);
    }

    /// Write a settled record, index it as settled at `at_us`, and keep the settled set within
    /// its bound by purging the oldest (so the bound holds even between sweeper passes).
    ///
    /// In this order, so that whatever the purge takes it takes whole, record, index entry and
    /// idempotency key together: the oldest may be the record just settled (expired at a
    /// deadline older than every other settled record's time, or settled after the clock
    /// stepped back), and purging it before it was written would leave it written back and in
    /// no index.
    ///
    /// A hold that was open moves from the open holds to the settled records, and its
    /// idempotency key with it; an expired one (a late Commit) is replaced in place.
    fn put_settled(&mut self, r: Reservation, at_us: u64, out: &mut Vec<Mutation>) {
        debug_assert_eq!(r.state.finished_at(), Some(at_us));
        if self.open.remove(&r.id).is_some() {
            let owns_key = r.idempotency_key.as_ref().is_some_and(|key| {
                let entry = (r.subject.clone(), key.clone());
                let owns = self.open_keys.get(&entry) == Some(&r.id);
                if owns {
                    self.open_keys.remove(&entry);
                }
                owns
            });
            self.settled.insert(&r, at_us, owns_key);
        } else {
            self.settled.update(&r, at_us);
        }
        out.push(Mutation::Reservation {
            id: r.id,
            record: Some(Box::new(r)),
        });
        if self.settled.len() > self.bounds.max_settled {
            self.purge_oldest_settled(out);
        }
    }

    /// Expire `id` now if it is an open hold past its deadline that a bounded expiry pass has
    /// not reached yet, so a Commit or Refund never skips its expiry.
    fn expire_if_overdue(&mut self, id: ReservationId, now_us: u64, out: &mut Vec<Mutation>) {
        if let Some(r) = self.open.get(&id) {
            if r.expires_us <= now_us {
                self.expire_hold(id, now_us, out);
            }
        }
    }
}
