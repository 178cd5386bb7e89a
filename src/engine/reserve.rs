//! Reserve: decide, and hold.

use super::{
    Engine, EngineError, HoldState, LimitStatus, Mutation, Refusal, Reservation, ReservationId,
};
use crate::clock::{utc_day, MICROS_PER_SECOND};

/// The answer to a Reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Held.
    Allowed,
    /// A limit said no.
    Denied,
}

/// A Reserve, already checked for shape and bounds (see `server::validate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveInput {
    /// Whose quota.
    pub subject: String,
    /// The model.
    pub model: String,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Output tokens to hold.
    pub max_output_tokens: u64,
    /// Retry key.
    pub idempotency_key: Option<String>,
    /// Requested hold life; `None` takes the tier's `hold_seconds`.
    pub hold_us: Option<u64>,
    /// Decide, hold nothing.
    pub dry_run: bool,
    /// The id to give the hold (generated before the engine lock is taken).
    pub id: ReservationId,
}

/// What a Reserve decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveOutcome {
    /// Allowed or denied.
    pub decision: Decision,
    /// The hold, when allowed and not a dry run.
    pub reservation_id: Option<ReservationId>,
    /// The model granted.
    pub model: String,
    /// Tokens held (0 when denied).
    pub reserved_tokens: u64,
    /// Prompt tokens counted.
    pub prompt_tokens: u64,
    /// The limit that said no.
    pub denied_by: Option<&'static str>,
    /// When a retry can succeed (None when allowed, or when none can).
    pub retry_after_us: Option<u64>,
    /// Every limit, after the decision.
    pub limits: Vec<LimitStatus>,
    /// When the hold expires.
    pub expires_us: Option<u64>,
    /// This answers an earlier Reserve with the same idempotency key.
    pub replayed: bool,
    /// Shadow mode: the limit that would have denied this Reserve, allowed anyway.
    pub shadow_denied_by: Option<&'static str>,
}

/// Of several refusals, the one to report: the one a client must wait longest for, since a retry
/// can only succeed once every limit admits it (never counts as longest).
/// A model outside the tier is reported before anything else: it is the most basic refusal.
fn binding(refusals: &[Refusal]) -> Option<Refusal> {
    refusals
        .iter()
        .copied()
        .find(|r| r.limit == "model")
        .or_else(|| {
            refusals
                .iter()
                .copied()
                .max_by_key(|r| r.retry_after_us.unwrap_or(u64::MAX))
        })
}

impl Engine {
    /// Decide a Reserve and, if every limit admits it, hold its tokens.
    pub fn reserve(
        &mut self,
        input: ReserveInput,
        now_us: u64,
        out: &mut Vec<Mutation>,
    ) -> Result<ReserveOutcome, EngineError> {
        let held = input
            .prompt_tokens
            .checked_add(input.max_output_tokens)
            .ok_or(EngineError::InvalidArgument {
                field: "max_output_tokens",
                rule: "prompt_tokens + max_output_tokens overflows".into(),
            })?;

        if !input.dry_run {
            if let Some(replay) = self.replay(&input, now_us)? {
                return Ok(replay);
            }
        }

        let limits = self.limits_of(&input.subject);
        let hold_us = match input.hold_us {
            Some(h) if h > limits.max_hold_seconds * MICROS_PER_SECOND => {
                return Err(EngineError::InvalidArgument {
                    field: "hold",
                    rule: format!(
                        "must be at most {} seconds (max_hold_seconds of tier {:?})",
                        limits.max_hold_seconds,
                        self.tier_of(&input.subject).name
                    ),
                })
            }
            Some(h) => h,
            None => limits.hold_seconds * MICROS_PER_SECOND,
        };

        let mut state = self.subject_state(&input.subject);
        let refusals = state.refusals(&limits, now_us, held, &input.model);
        let enforce = self.policy.enforce() && limits.enforce;
        let shadow_denied_by = match binding(&refusals) {
            Some(refusal) if !enforce => Some(refusal.limit),
            Some(refusal) => {
                return Ok(ReserveOutcome {
                    decision: Decision::Denied,
                    reservation_id: None,
                    model: input.model,
                    reserved_tokens: 0,
                    prompt_tokens: input.prompt_tokens,
                    denied_by: Some(refusal.limit),
                    retry_after_us: refusal.retry_after_us,
                    limits: state.statuses(&limits, now_us),
                    expires_us: None,
                    replayed: false,
                    shadow_denied_by: None,
                })
            }
            None => None,
        };
        if input.dry_run {
            return Ok(ReserveOutcome {
                decision: Decision::Allowed,
                reservation_id: None,
                model: input.model,
                reserved_tokens: held,
                prompt_tokens: input.prompt_tokens,
                denied_by: None,
                retry_after_us: None,
                limits: state.statuses(&limits, now_us),
                expires_us: None,
                replayed: false,
                shadow_denied_by,
            });
        }
        self.check_room(&input.subject, &state)?;

        // Admitted: charge every limit together.
        if let Some(config) = limits.bucket() {
            let mut bucket = state
                .bucket_or_full(&limits, now_us)
                .expect("a tier with a bucket config yields a bucket");
            bucket.take(config, now_us, held);
            state.bucket = Some(bucket);
        }
        state.window.record(now_us);
        state.day_requests.add(utc_day(now_us), 1);
        if shadow_denied_by.is_some() {
            state.day_shadow_denials.add(utc_day(now_us), 1);
            tracing::info!(
                subject = %input.subject,
                would_deny = shadow_denied_by.unwrap_or_default(),
                "shadow mode: allowed a Reserve that would have been denied"
            );
        }
        state.held_tokens += held;
        state.open_holds += 1;
        self.put_subject(&input.subject, state, out);

        let expires_us = now_us.saturating_add(hold_us);
        let reservation = Reservation {
            id: input.id,
            subject: input.subject,
            model: input.model,
            prompt_tokens: input.prompt_tokens,
            max_output_tokens: input.max_output_tokens,
            requested_hold_us: input.hold_us,
            created_us: now_us,
            expires_us,
            idempotency_key: input.idempotency_key,
            state: HoldState::Held,
        };
        if let Some(key) = &reservation.idempotency_key {
            self.idempotency
                .insert((reservation.subject.clone(), key.clone()), reservation.id);
        }
        self.deadlines.insert((expires_us, reservation.id));
        self.open_holds += 1;
        let outcome = ReserveOutcome {
            decision: Decision::Allowed,
            reservation_id: Some(reservation.id),
            model: reservation.model.clone(),
            reserved_tokens: held,
            prompt_tokens: reservation.prompt_tokens,
            denied_by: None,
            retry_after_us: None,
            limits: state.statuses(&limits, now_us),
            expires_us: Some(expires_us),
            replayed: false,
            shadow_denied_by,
        };
        self.put_reservation(reservation, out);
        Ok(outcome)
    }

    /// Bounds on memory that an admitted hold must fit within.
    fn check_room(&self, subject: &str, state: &super::SubjectState) -> Result<(), EngineError> {
        if self.open_holds >= self.bounds.max_open_holds {
            return Err(EngineError::Exhausted {
                what: "open holds",
                bound: self.bounds.max_open_holds as u64,
            });
        }
        if state.open_holds >= self.bounds.max_holds_per_subject {
            return Err(EngineError::Exhausted {
                what: "open holds of this subject",
                bound: u64::from(self.bounds.max_holds_per_subject),
            });
        }
        // No scan here: forgetting subjects at rest is the sweeper's job, a bounded amount per
        // pass, so a flood of new subjects cannot make a request hold the lock for long.
        if !self.subjects.contains_key(subject) && self.subjects.len() >= self.bounds.max_subjects {
            return Err(EngineError::Exhausted {
                what: "subjects with live state",
                bound: self.bounds.max_subjects as u64,
            });
        }
        Ok(())
    }

    /// The first answer again, if this is a retry of a Reserve with the same key.
    fn replay(
        &self,
        input: &ReserveInput,
        now_us: u64,
    ) -> Result<Option<ReserveOutcome>, EngineError> {
        let Some(key) = &input.idempotency_key else {
            return Ok(None);
        };
        let Some(id) = self.idempotency.get(&(input.subject.clone(), key.clone())) else {
            return Ok(None);
        };
        let first = &self.reservations[id];
        if self.past_retention(first, now_us) {
            return Ok(None);
        }
        let differs = |field: &'static str, a: String, b: String| {
            Err(EngineError::IdempotencyConflict {
                key: key.clone(),
                field,
                first: a,
                now: b,
            })
        };
        if first.model != input.model {
            return differs(
                "model",
                format!("{:?}", first.model),
                format!("{:?}", input.model),
            );
        }
        if first.prompt_tokens != input.prompt_tokens {
            return differs(
                "prompt_tokens",
                first.prompt_tokens.to_string(),
                input.prompt_tokens.to_string(),
            );
        }
        if first.max_output_tokens != input.max_output_tokens {
            return differs(
                "max_output_tokens",
                first.max_output_tokens.to_string(),
                input.max_output_tokens.to_string(),
            );
        }
        if first.requested_hold_us != input.hold_us {
            let show = |h: Option<u64>| h.map_or("(default)".to_string(), |us| format!("{us}us"));
            return differs("hold", show(first.requested_hold_us), show(input.hold_us));
        }
        let limits = &self.limits_of(&input.subject);
        Ok(Some(ReserveOutcome {
            decision: Decision::Allowed,
            reservation_id: Some(first.id),
            model: first.model.clone(),
            reserved_tokens: first.held_tokens(),
            prompt_tokens: first.prompt_tokens,
            denied_by: None,
            retry_after_us: None,
            limits: self.subject_state(&input.subject).statuses(limits, now_us),
            expires_us: Some(first.expires_us),
            replayed: true,
            shadow_denied_by: None,
        }))
    }
}
