//! Durable records in sled, under `--data-dir`.
//!
//! One sled tree, keys prefixed by kind, so that every decision's records are written by one
//! atomic `apply_batch` (sled batches are atomic within a tree, not across trees):
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

mod writer;

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

pub use writer::{Durability, Ticket, Writer};

use crate::engine::{Mutation, Reservation, ScopeKey, ScopeState};
use crate::policy::SubjectConfig;

/// The on-disk format version. A data directory written by another version is refused rather
/// than misread.
/// Version 2: a subject's tier assignment became a `SubjectConfig` (tier and overrides).
/// Version 3: subject state counts the UTC month and shadow-mode denials.
/// Version 4: scopes (group, client IP, fleet) beside subjects; money, savings and the
/// downgrade budget in every scope's state and every reservation; a subject's group.
pub const FORMAT_VERSION: u32 = 4;
const FORMAT_KEY: &[u8] = b"!format";

/// A storage failure: the request that met it is answered UNAVAILABLE, and nothing is
/// acknowledged that is not durable.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    /// A record could not be decoded.
    #[error("storage: corrupt record under key {key:?}: {reason}")]
    Corrupt {
        /// The key, lossily printed.
        key: String,
        /// Why.
        reason: String,
    },
    /// The data directory is of another format version.
    #[error(
        "storage: data directory has format version {found}, this build reads {FORMAT_VERSION}"
    )]
    Version {
        /// The version found.
        found: u32,
    },
    /// An earlier write failed; the store refuses writes until restart.
    #[error("storage failed: {0}")]
    Failed(String),
    /// The writer has stopped (shutdown, or an earlier fatal error).
    #[error("storage: the writer has stopped")]
    WriterGone,
}

/// Everything persisted, as loaded at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Scope states.
    pub scopes: HashMap<ScopeKey, ScopeState>,
    /// All reservation records (open and settled).
    pub reservations: Vec<Reservation>,
    /// Tiers and overrides set by operators.
    pub assignments: HashMap<String, SubjectConfig>,
}

/// The sled database of one data directory.
///
/// Why an extra `fdatasync` of sled's log after each flush: sled 0.34 flushes with
/// `sync_file_range`, which survives a killed process but not a power cut or kernel crash (it
/// neither flushes the disk's write cache nor the file's size). Syncing the log file through a
/// second descriptor does both; with group commit it costs one sync per batch, not per request.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    log: Option<Arc<File>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn corrupt(key: &[u8], reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    }
}

impl Store {
    /// Open (or create) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // sled's own background flush is off: the writer decides when to flush (group commit).
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        match db.get(FORMAT_KEY)? {
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| corrupt(FORMAT_KEY, "format version is not 4 bytes"))?;
                if found != FORMAT_VERSION {
                    return Err(StoreError::Version { found });
                }
            }
            None => {
                db.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())?;
                db.flush()?;
            }
        }
        // sled keeps its log in `<dir>/db`. Should a sled release move it, flushing still
        // works, with sled's own (weaker) sync; the warning says so.
        let log = match File::open(dir.join("db")) {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open sled's log for fdatasync; power-loss durability rests on sled alone");
                None
            }
        };
        Ok(Self { db, log })
    }

    /// Read every record.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let mut snap = Snapshot::default();
        for item in self.db.iter() {
            let (key, value) = item?;
            let (kind, rest) = key
                .split_first()
                .ok_or_else(|| corrupt(&key, "empty key"))?;
            match kind {
                b's' | b'g' | b'i' | b'G' => {
                    let name = std::str::from_utf8(rest).map_err(|e| corrupt(&key, e))?;
                    let scope = match kind {
                        b's' => ScopeKey::Subject(Arc::from(name)),
                        b'g' => ScopeKey::Group(Arc::from(name)),
                        b'i' => ScopeKey::Ip(name.parse().map_err(|e| corrupt(&key, e))?),
                        _ => ScopeKey::Global,
                    };
                    let state: ScopeState =
                        postcard::from_bytes(&value).map_err(|e| corrupt(&key, e))?;
                    snap.scopes.insert(scope, state);
                }
                b'r' => {
                    let r: Reservation =
                        postcard::from_bytes(&value).map_err(|e| corrupt(&key, e))?;
                    if r.id.to_bytes() != rest {
                        return Err(corrupt(&key, "reservation id does not match its key"));
                    }
                    snap.reservations.push(r);
                }
                b'a' => {
                    let subject = std::str::from_utf8(rest).map_err(|e| corrupt(&key, e))?;
                    let config: SubjectConfig =
                        postcard::from_bytes(&value).map_err(|e| corrupt(&key, e))?;
                    snap.assignments.insert(subject.to_string(), config);
                }
                b'!' => {}
                _ => return Err(corrupt(&key, "unknown record kind")),
            }
        }
        Ok(snap)
    }

    /// Flush everything written so far to stable storage.
    pub fn flush(&self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        self.db.flush()?;
        if let Some(log) = &self.log {
            log.sync_data()
                .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        }
        crate::telemetry::flush_took(started.elapsed());
        Ok(())
    }

    /// Write mutations as one atomic batch (not flushed).
    pub(crate) fn apply(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for m in batch {
            encode(m, &mut b);
        }
        self.db.apply_batch(b)?;
        Ok(())
    }
}

fn prefixed(kind: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(kind);
    k.extend_from_slice(rest);
    k
}

fn encode(m: &Mutation, b: &mut sled::Batch) {
    // postcard cannot fail on these types (no maps with non-string keys, no unsized data); an
    // error here would be a programming error, caught by the round-trip unit test.
    match m {
        Mutation::Scope { key, state } => {
            let key = match key {
                ScopeKey::Subject(s) => prefixed(b's', s.as_bytes()),
                ScopeKey::Group(g) => prefixed(b'g', g.as_bytes()),
                ScopeKey::Ip(ip) => prefixed(b'i', ip.to_string().as_bytes()),
                ScopeKey::Global => vec![b'G'],
            };
            match state {
                Some(s) => b.insert(key, postcard::to_allocvec(s).expect("encode scope")),
                None => b.remove(key),
            }
        }
        Mutation::Reservation { id, record } => {
            let key = prefixed(b'r', &id.to_bytes());
            match record {
                Some(r) => b.insert(
                    key,
                    postcard::to_allocvec(r.as_ref()).expect("encode reservation"),
                ),
                None => b.remove(key),
            }
        }
        Mutation::Assignment { subject, config } => {
            let key = prefixed(b'a', subject.as_bytes());
            match config {
                Some(c) => b.insert(
                    key,
                    postcard::to_allocvec(c).expect("encode subject config"),
                ),
                None => b.remove(key),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{HoldState, ReservationId, Settlement, Usage};

    #[test]
    fn records_round_trip_through_sled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let r = Reservation {
            id: ReservationId::generate(1_000),
            subject: "alice".into(),
            model: "gpt-4o".into(),
            prompt_tokens: 10,
            max_output_tokens: 20,
            requested_hold_us: Some(5),
            created_us: 1_000,
            expires_us: 6_000,
            idempotency_key: Some("k".into()),
            state: HoldState::Committed {
                usage: Usage {
                    prompt_tokens: 10,
                    completion_tokens: 3,
                    usage_unknown: false,
                },
                settlement: Settlement {
                    charged_tokens: 13,
                    released_tokens: 17,
                    debt_tokens: 0,
                    charged_usd: 33,
                },
                at_us: 2_000,
            },
            group: Some("acme".into()),
            client_ip: Some("2001:db8::".parse().unwrap()),
            price: Some(crate::policy::Price {
                input_per_million: 2_500_000,
                output_per_million: 10_000_000,
            }),
            held_usd: 225,
            downgraded_from: Some(crate::engine::Requested {
                model: "gpt-4".into(),
                prompt_tokens: 11,
            }),
        };
        let mut state = ScopeState::default();
        state.day_tokens.add(3, 13);
        let ip: std::net::IpAddr = "203.0.113.7".parse().unwrap();
        let keys = [
            ScopeKey::Subject(Arc::from("alice")),
            ScopeKey::Group(Arc::from("acme")),
            ScopeKey::Ip(ip),
            ScopeKey::Ip("2001:db8:1:2::".parse().unwrap()),
            ScopeKey::Global,
        ];
        let mut batch: Vec<Mutation> = keys
            .iter()
            .map(|k| Mutation::Scope {
                key: k.clone(),
                state: Some(state),
            })
            .collect();
        store.apply(&batch.split_off(0)).unwrap();
        store
            .apply(&[
                Mutation::Reservation {
                    id: r.id,
                    record: Some(Box::new(r.clone())),
                },
                Mutation::Assignment {
                    subject: "alice".into(),
                    config: Some(SubjectConfig {
                        tier: "pro".into(),
                        overrides: crate::policy::Overrides {
                            tokens_per_day: Some(7),
                            ..Default::default()
                        },
                        group: Some("acme".into()),
                    }),
                },
            ])
            .unwrap();
        store.flush().unwrap();
        drop(store);
        let snap = Store::open(dir.path()).unwrap().load().unwrap();
        for k in &keys {
            assert_eq!(snap.scopes[k], state, "{k:?}");
        }
        assert_eq!(snap.scopes.len(), keys.len());
        assert_eq!(snap.assignments["alice"].group.as_deref(), Some("acme"));
        assert_eq!(snap.reservations, vec![r]);
        assert_eq!(snap.assignments["alice"].tier, "pro");
        assert_eq!(snap.assignments["alice"].overrides.tokens_per_day, Some(7));
    }
}
