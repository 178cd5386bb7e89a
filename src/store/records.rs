//! One record: its key and value bytes in sled, and what they mean.
//!
//! One sled tree, keys prefixed by kind, so that every decision's records are written by one
//! atomic batch (sled batches are atomic within a tree, not across trees):
//!
//! | key                    | value (postcard)        |
//! |------------------------|-------------------------|
//! | `s` + subject          | [`ScopeState`]          |
//! | `g` + group            | [`ScopeState`]          |
//! | `i` + client IP (text) | [`ScopeState`]          |
//! | `G`                    | [`ScopeState`] (fleet)  |
//! | `r` + 16-byte id (BE)  | [`Reservation`]         |
//! | `a` + subject          | [`SubjectConfig`]       |
//! | `!format`              | format version (u32 BE) |
//! | `!tally`               | the store's [`Tally`](super::tally::Tally) |

use std::sync::Arc;

use super::StoreError;
use crate::engine::{Mutation, Reservation, ScopeKey, ScopeState};
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

/// A record's key and value bytes; no value: removed.
pub type Encoded = (Vec<u8>, Option<Vec<u8>>);

pub(super) fn corrupt(key: &[u8], reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    }
}

fn prefixed(kind: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(kind);
    k.extend_from_slice(rest);
    k
}

fn scope_key(key: &ScopeKey) -> Vec<u8> {
    match key {
        ScopeKey::Subject(s) => prefixed(b's', s.as_bytes()),
        ScopeKey::Group(g) => prefixed(b'g', g.as_bytes()),
        ScopeKey::Ip(ip) => prefixed(b'i', ip.to_string().as_bytes()),
        ScopeKey::Global => vec![b'G'],
    }
}

/// The key and value bytes of a mutation.
pub fn encode(m: &Mutation) -> Encoded {
    // postcard cannot fail on these types (no maps with non-string keys, no unsized data); an
    // error here would be a programming error, caught by the round-trip unit test.
    match m {
        Mutation::Scope { key, state } => (
            scope_key(key),
            state
                .as_ref()
                .map(|s| postcard::to_allocvec(s).expect("encode scope")),
        ),
        Mutation::Reservation { id, record } => (
            prefixed(b'r', &id.to_bytes()),
            record
                .as_ref()
                .map(|r| postcard::to_allocvec(r.as_ref()).expect("encode reservation")),
        ),
        Mutation::Assignment { subject, config } => (
            prefixed(b'a', subject.as_bytes()),
            config
                .as_ref()
                .map(|c| postcard::to_allocvec(c).expect("encode subject config")),
        ),
    }
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
        let (key, value) = encode(&m);
        (key, value.expect("a record has a value"))
    }

    /// Decode a record from sled; a key or value that does not decode is [`StoreError::Corrupt`].
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
                let r: Reservation = postcard::from_bytes(value).map_err(|e| corrupt(key, e))?;
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
