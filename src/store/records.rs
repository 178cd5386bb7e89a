//! One record: its key and value bytes, and what they mean. Every backend stores these bytes
//! (sled as its keys and values), the tally digests them, and an export decodes them.
//!
//! | key                    | value (postcard)        |
//! |------------------------|-------------------------|
//! | `s` + subject          | [`ScopeState`]          |
//! | `g` + group            | [`ScopeState`]          |
//! | `i` + client IP (text) | [`ScopeState`]          |
//! | `G`                    | [`ScopeState`] (fleet)  |
//! | `r` + 16-byte id (BE)  | [`Reservation`]         |
//! | `a` + subject          | [`SubjectConfig`]       |
//!
//! A backend may keep keys of its own beside these (sled: `!format`, `!tally`, and its batch
//! log under `~`: see `sled/mod.rs`).

use std::io::Write;
use std::sync::Arc;

use super::StoreError;
use crate::engine::{Mutation, Reservation, ReservationId, ScopeKey, ScopeState};
use crate::policy::SubjectConfig;

/// One decoded record.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A scope's state.
    Scope(ScopeKey, ScopeState),
    /// A reservation (open or settled).
    Reservation(Box<Reservation>),
    /// A subject's tier, group and overrides.
    Assignment(String, SubjectConfig),
}

pub(super) fn corrupt(key: &[u8], reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    }
}

/// Which record a mutation writes: two mutations of the same key write the same record, and
/// only the last one needs writing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RecordKey {
    /// A scope's state.
    Scope(ScopeKey),
    /// A reservation.
    Reservation(ReservationId),
    /// A subject's assignment.
    Assignment(String),
}

impl RecordKey {
    /// The record `m` writes.
    pub fn of(m: &Mutation) -> Self {
        match m {
            Mutation::Scope { key, .. } => RecordKey::Scope(key.clone()),
            Mutation::Reservation { id, .. } => RecordKey::Reservation(*id),
            Mutation::Assignment { subject, .. } => RecordKey::Assignment(subject.clone()),
        }
    }
}

/// Append the key bytes of the record `m` writes to `out`.
pub fn encode_key(m: &Mutation, out: &mut Vec<u8>) {
    match m {
        Mutation::Scope { key, .. } => match key {
            ScopeKey::Subject(s) => prefixed(out, b's', s.as_bytes()),
            ScopeKey::Group(g) => prefixed(out, b'g', g.as_bytes()),
            ScopeKey::Ip(ip) => {
                out.push(b'i');
                // Writing to a Vec cannot fail.
                let _ = write!(out, "{ip}");
            }
            ScopeKey::Global => out.push(b'G'),
        },
        Mutation::Reservation { id, .. } => prefixed(out, b'r', &id.to_bytes()),
        Mutation::Assignment { subject, .. } => prefixed(out, b'a', subject.as_bytes()),
    }
}

/// Append the value bytes `m` writes to `out`; false (nothing appended) for a removal.
pub fn encode_value(m: &Mutation, out: &mut Vec<u8>) -> bool {
    // postcard cannot fail on these types (no maps with non-string keys, no unsized data); an
    // error here would be a programming error, caught by the round-trip unit test. Appending to
    // the caller's buffer (rather than `to_allocvec`) costs no allocation of its own.
    let taken = std::mem::take(out);
    let (written, present) = match m {
        Mutation::Scope { state, .. } => match state {
            Some(s) => (postcard::to_extend(s, taken), true),
            None => (Ok(taken), false),
        },
        Mutation::Reservation { record, .. } => match record {
            // The caller, when there is one, after the rest: a record without one keeps the
            // bytes it had before callers existed, and a build that predates them reads the
            // rest and ignores the tail.
            Some(r) => (
                postcard::to_extend(r.as_ref(), taken).and_then(|buf| match &r.caller {
                    Some(caller) => postcard::to_extend(caller, buf),
                    None => Ok(buf),
                }),
                true,
            ),
            None => (Ok(taken), false),
        },
        Mutation::Assignment { config, .. } => match config {
            Some(c) => (postcard::to_extend(c, taken), true),
            None => (Ok(taken), false),
        },
    };
    *out = written.expect("postcard encodes every record type");
    present
}

fn prefixed(out: &mut Vec<u8>, kind: u8, rest: &[u8]) {
    out.push(kind);
    out.extend_from_slice(rest);
}

impl Record {
    /// The key and value bytes of this record, as the writer stores it.
    pub fn encode(self) -> (Vec<u8>, Vec<u8>) {
        let m = match self {
            Record::Scope(key, state) => Mutation::Scope {
                key,
                state: Some(state),
            },
            Record::Reservation(r) => Mutation::Reservation {
                id: r.id,
                record: Some(r),
            },
            Record::Assignment(subject, config) => Mutation::Assignment {
                subject,
                config: Some(config),
            },
        };
        let (mut key, mut value) = (Vec::new(), Vec::new());
        encode_key(&m, &mut key);
        encode_value(&m, &mut value);
        (key, value)
    }

    /// Decode a record from its bytes; a key or value that does not decode is [`StoreError::Corrupt`].
    pub fn decode(key: &[u8], value: &[u8]) -> Result<Self, StoreError> {
        let (kind, rest) = key.split_first().ok_or_else(|| corrupt(key, "empty key"))?;
        match kind {
            b's' | b'g' | b'i' | b'G' => {
                let name = std::str::from_utf8(rest).map_err(|e| corrupt(key, e))?;
                let scope = match kind {
                    b's' => ScopeKey::Subject(Arc::from(name)),
                    b'g' => ScopeKey::Group(Arc::from(name)),
                    b'i' => ScopeKey::Ip(name.parse().map_err(|e| corrupt(key, e))?),
                    _ if rest.is_empty() => ScopeKey::Global,
                    _ => return Err(corrupt(key, "the fleet's key has a suffix")),
                };
                let state: ScopeState = postcard::from_bytes(value).map_err(|e| corrupt(key, e))?;
                Ok(Record::Scope(scope, state))
            }
            b'r' => {
                let (mut r, tail): (Reservation, _) =
                    postcard::take_from_bytes(value).map_err(|e| corrupt(key, e))?;
                if !tail.is_empty() {
                    let caller: String = postcard::from_bytes(tail).map_err(|e| corrupt(key, e))?;
                    r.caller = Some(caller);
                }
                if r.id.to_bytes() != rest {
                    return Err(corrupt(key, "reservation id does not match its key"));
                }
                Ok(Record::Reservation(Box::new(r)))
            }
            b'a' => {
                let subject = std::str::from_utf8(rest).map_err(|e| corrupt(key, e))?;
                let config: SubjectConfig =
                    postcard::from_bytes(value).map_err(|e| corrupt(key, e))?;
                Ok(Record::Assignment(subject.to_string(), config))
            }
            _ => Err(corrupt(key, "unknown record kind")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{HoldState, ReservationId};

    fn reservation(caller: Option<&str>) -> Reservation {
        Reservation {
            id: ReservationId::generate(1_000_000),
            subject: "chat:alice".into(),
            model: "gpt-4o".into(),
            prompt_tokens: 10,
            max_output_tokens: 20,
            requested_hold_us: None,
            created_us: 1_000_000,
            expires_us: 2_000_000,
            idempotency_key: Some("k".into()),
            state: HoldState::Held,
            group: None,
            client_ip: None,
            price: None,
            held_usd: 0,
            downgraded_from: None,
            caller: caller.map(str::to_string),
        }
    }

    fn round_trip(r: &Reservation) -> (Vec<u8>, Reservation) {
        let m = Mutation::Reservation {
            id: r.id,
            record: Some(Box::new(r.clone())),
        };
        let mut value = Vec::new();
        assert!(encode_value(&m, &mut value));
        let mut key = Vec::new();
        encode_key(&m, &mut key);
        match Record::decode(&key, &value).unwrap() {
            Record::Reservation(back) => (value, *back),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_reservation_round_trips_with_and_without_its_caller() {
        let owned = reservation(Some("chat"));
        let (_, back) = round_trip(&owned);
        assert_eq!(back, owned);
        // Without a caller, the bytes are those a build before callers wrote.
        let open = reservation(None);
        let (bytes, back) = round_trip(&open);
        assert_eq!(back, open);
        assert_eq!(bytes, postcard::to_allocvec(&open).unwrap());
    }
}
