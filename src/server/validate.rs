//! Every request field checked for shape and bounds before the engine is reached. A failure
//! names the field and the rule, and nothing has changed.

use std::time::Duration;

use tonic::Status;

use crate::engine::{ReservationId, ReserveInput, Usage};
use crate::policy::HOLD_SECONDS_CEILING;
use crate::proto;

/// Longest subject, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 256;
/// Longest model name, in bytes.
pub const MAX_MODEL_BYTES: usize = 128;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;
/// Most tokens one request may hold or report: 100 million, far above any model's context
/// window, and far enough below u64::MAX that no sum of them can overflow.
pub const MAX_TOKENS_PER_REQUEST: u64 = 100_000_000;

fn invalid(field: &str, rule: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {rule}"))
}

fn check_text(field: &str, value: &str, max: usize, required: bool) -> Result<(), Status> {
    if value.is_empty() && required {
        return Err(invalid(field, "is required and must not be empty"));
    }
    if value.len() > max {
        return Err(invalid(
            field,
            format!("must be at most {max} bytes (got {})", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// A subject: 1 to 256 bytes of UTF-8 without control characters.
pub fn subject(value: &str) -> Result<(), Status> {
    check_text("subject", value, MAX_SUBJECT_BYTES, true)
}

/// A tier name as given to SetSubject.
pub fn tier(value: &str) -> Result<(), Status> {
    check_text("tier", value, 64, true)
}

fn tokens(field: &str, value: u64) -> Result<u64, Status> {
    if value > MAX_TOKENS_PER_REQUEST {
        return Err(invalid(
            field,
            format!("must be at most {MAX_TOKENS_PER_REQUEST} (got {value})"),
        ));
    }
    Ok(value)
}

fn duration_us(field: &str, d: &prost_types::Duration) -> Result<u64, Status> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(invalid(field, "must be a positive duration"));
    }
    let secs = u64::try_from(d.seconds).unwrap_or(u64::MAX);
    if secs > HOLD_SECONDS_CEILING {
        return Err(invalid(
            field,
            format!("must be at most {HOLD_SECONDS_CEILING} seconds"),
        ));
    }
    let us = secs * 1_000_000 + u64::try_from(d.nanos).unwrap_or(0) / 1_000;
    if us == 0 {
        return Err(invalid(field, "must be longer than zero"));
    }
    Ok(us)
}

/// A Reserve request, checked.
pub fn reserve(req: proto::ReserveRequest) -> Result<ReserveInput, Status> {
    subject(&req.subject)?;
    check_text("model", &req.model, MAX_MODEL_BYTES, false)?;
    check_text(
        "idempotency_key",
        &req.idempotency_key,
        MAX_IDEMPOTENCY_KEY_BYTES,
        false,
    )?;
    let prompt_tokens = tokens("prompt_tokens", req.prompt_tokens)?;
    let max_output_tokens = tokens("max_output_tokens", req.max_output_tokens)?;
    if prompt_tokens + max_output_tokens > MAX_TOKENS_PER_REQUEST {
        return Err(invalid(
            "max_output_tokens",
            format!("prompt_tokens + max_output_tokens must be at most {MAX_TOKENS_PER_REQUEST}"),
        ));
    }
    let hold_us = req
        .hold
        .as_ref()
        .map(|d| duration_us("hold", d))
        .transpose()?;
    Ok(ReserveInput {
        subject: req.subject,
        model: req.model,
        prompt_tokens,
        max_output_tokens,
        idempotency_key: (!req.idempotency_key.is_empty()).then_some(req.idempotency_key),
        hold_us,
        dry_run: req.dry_run,
        id: ReservationId(0),
    })
}

/// A reservation id as returned by Reserve.
pub fn reservation_id(value: &str) -> Result<ReservationId, Status> {
    if value.is_empty() {
        return Err(invalid(
            "reservation_id",
            "is required and must not be empty",
        ));
    }
    value.parse().map_err(|_| {
        invalid(
            "reservation_id",
            "must be a reservation id as returned by Reserve (a 36-character UUID)",
        )
    })
}

/// A Commit request, checked.
pub fn commit(req: &proto::CommitRequest) -> Result<(ReservationId, Usage), Status> {
    let id = reservation_id(&req.reservation_id)?;
    let prompt_tokens = tokens("prompt_tokens", req.prompt_tokens)?;
    let completion_tokens = tokens("completion_tokens", req.completion_tokens)?;
    if req.usage_unknown && (prompt_tokens != 0 || completion_tokens != 0) {
        return Err(invalid(
            "usage_unknown",
            "when set, prompt_tokens and completion_tokens must be 0 (the full hold is charged)",
        ));
    }
    Ok((
        id,
        Usage {
            prompt_tokens,
            completion_tokens,
            usage_unknown: req.usage_unknown,
        },
    ))
}

/// Microseconds as a protobuf Duration.
pub fn to_duration(us: u64) -> prost_types::Duration {
    let d = Duration::from_micros(us);
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Microseconds since the epoch as a protobuf Timestamp.
pub fn to_timestamp(us: u64) -> prost_types::Timestamp {
    let d = to_duration(us);
    prost_types::Timestamp {
        seconds: d.seconds,
        nanos: d.nanos,
    }
}
