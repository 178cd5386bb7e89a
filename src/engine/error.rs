//! What the engine refuses to do, and why. Mapped to gRPC status codes in exactly one place
//! (`server::status`).

use super::ReservationId;

/// An error from the engine. A denial is not an error (it is a [`super::ReserveOutcome`]); these
/// are requests the engine cannot act on at all. None of them changes any state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// A field breaks a rule (only the rules that need the policy are checked here; shape and
    /// bounds are checked before the engine is reached).
    #[error("{field}: {rule}")]
    InvalidArgument {
        /// The request field.
        field: &'static str,
        /// The rule it breaks.
        rule: String,
    },
    /// The reservation was made by another caller (`[callers]`): only that one may settle or
    /// extend it.
    #[error("reservation {0} was made by another caller: only the caller that made a hold may Commit, Refund or Extend it")]
    NotOwner(ReservationId),
    /// No reservation has this id (never made, or settled more than the retention ago).
    #[error("reservation {0} not found (unknown, or settled longer ago than the 24 h retention)")]
    NotFound(ReservationId),
    /// The reservation is in a state where this call is illegal.
    #[error("reservation {id} is {state}: {detail}")]
    IllegalTransition {
        /// The reservation.
        id: ReservationId,
        /// Its current state.
        state: &'static str,
        /// What is wrong with the call.
        detail: String,
    },
    /// A Reserve reused an idempotency key with a different request.
    #[error(
        "idempotency_key {key:?} was first used with {field} = {first}, now {field} = {now}; \
         use a new key for a different request"
    )]
    IdempotencyConflict {
        /// The key.
        key: String,
        /// The first field that differs.
        field: &'static str,
        /// Its value in the first request.
        first: String,
        /// Its value now.
        now: String,
    },
    /// A bound on held state is reached; the request is refused rather than memory growing.
    #[error("{what} is at its bound of {bound}; retry later")]
    Exhausted {
        /// What is full.
        what: &'static str,
        /// The bound.
        bound: u64,
    },
}
