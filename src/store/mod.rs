//! Durable records in sled, under `--data-dir`, and the checks that a data directory holds
//! everything that was acknowledged.
//!
//! - `records.rs`: one record's key and value (the key layout is documented there).
//! - `tally.rs`: the last batch, the count and a digest of the records, kept in sled with them.
//! - `watermark.rs`: the tally of the last durable batch, kept outside sled.
//! - `verify.rs`: what a start compares, and why a crash can never fail it.
//! - `writer.rs`: the group-commit writer thread.
//! - `reader.rs`: a consistent read of every record while the writer writes.
//! - `export.rs`, `import.rs`: the backup file (JSON Lines) and restoring it.

pub mod export;
mod export_format;
pub mod import;
mod reader;
mod records;
mod salvage;
mod tally;
mod verify;
mod watermark;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

pub use reader::{ConsistentReader, MAX_PRESERVED};
pub use records::Record;
pub use tally::Tally;
pub use verify::{DataLoss, Recovery};
pub use writer::{Durability, Ticket, Writer};

use crate::engine::{Mutation, Reservation, ScopeKey, ScopeState};
use crate::policy::SubjectConfig;
use records::corrupt;
use tally::{is_meta, TALLY_KEY};
use watermark::{Mark, Watermark};

/// The on-disk format version. A data directory written by another version is refused rather
/// than misread.
/// Version 2: a subject's tier assignment became a `SubjectConfig` (tier and overrides).
/// Version 3: subject state counts the UTC month and shadow-mode denials.
/// Version 4: scopes (group, client IP, fleet) beside subjects; money, savings and the
/// downgrade budget in every scope's state and every reservation; a subject's group.
/// Version 5: the tally record (`!tally`) in every batch, and the watermark file beside sled.
/// Records are as in version 4, so a version 4 directory is opened and upgraded in place
/// (its tally computed at load); version 4 builds refuse a version 5 directory, whose tally
/// they would not keep.
pub const FORMAT_VERSION: u32 = 5;
/// The oldest format this build opens (and upgrades).
const OLDEST_FORMAT: u32 = 4;
const FORMAT_KEY: &[u8] = b"!format";
/// sled's data file in the data directory (sled 0.34 keeps its log there).
pub const SLED_FILE: &str = "db";

/// A storage failure: the request that met it is answered UNAVAILABLE, and nothing is
/// acknowledged that is not durable.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    /// The data directory (the watermark, or syncing) failed.
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
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
        "storage: data directory has format version {found}, this build reads {OLDEST_FORMAT} to {FORMAT_VERSION}"
    )]
    Version {
        /// The version found.
        found: u32,
    },
    /// sled cannot read its own files.
    #[error(
        "storage: refusing a damaged data directory: sled cannot read it ({0}). Restore it from an export (`tollgate import --replace`), or serve what can still be read with --accept-data-loss"
    )]
    Unreadable(String),
    /// The store has lost acknowledged records, or cannot show it has not.
    #[error(
        "storage: refusing a damaged data directory: {0}. Restore it from an export (`tollgate import`), or serve what is left with --accept-data-loss"
    )]
    DataLoss(#[from] DataLoss),
    /// An import into the directory did not finish.
    #[error("storage: an import into {0} did not finish (its `import-in-progress` marker is there): run `tollgate import --replace` again")]
    ImportUnfinished(PathBuf),
    /// There is no store in the directory (and it must not be created).
    #[error("storage: {0} holds no tollgate store")]
    NoStore(PathBuf),
    /// Another consistent read (an export) is running.
    #[error("storage: another export is running; one runs at a time")]
    ReadBusy,
    /// The store changed more during a consistent read than it may keep for it.
    #[error("storage: more than {MAX_PRESERVED} records were written while the export ran; retry it when the service is less busy")]
    ReadOverflow,
    /// A write before the store was loaded and checked.
    #[error("storage: written before it was loaded and checked")]
    NotLoaded,
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

/// The sled database of one data directory, its tally and its watermark.
///
/// Why an extra `fdatasync` of sled's log after each flush: sled 0.34 flushes with
/// `sync_file_range`, which survives a killed process but not a power cut or kernel crash (it
/// neither flushes the disk's write cache nor the file's size). Syncing the log file through a
/// second descriptor does both; with group commit it costs one sync per batch, not per request.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    log: Option<File>,
    dir: PathBuf,
    recovery: Recovery,
    /// The format record as found at open (none: a new directory).
    format: Option<u32>,
    /// The watermark as found at open.
    mark: Mark,
    state: Mutex<State>,
}

/// What writes, flushes and consistent reads share, under one lock.
#[derive(Debug, Default)]
struct State {
    /// The tally of the last batch written.
    tally: Tally,
    /// Whether [`Store::load`] has checked the store (writes are refused before).
    loaded: bool,
    /// Open once loaded.
    watermark: Option<Watermark>,
    tap: reader::Tap,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Open (or create) the database under `dir`. Nothing is checked until [`Store::load`],
    /// except that a data file gone while its watermark remains is refused before sled would
    /// create an empty one.
    pub fn open(dir: &Path, recovery: Recovery) -> Result<Self, StoreError> {
        if dir.join(import::MARKER).exists() {
            return Err(StoreError::ImportUnfinished(dir.to_path_buf()));
        }
        Self::open_unchecked(dir, recovery)
    }

    /// Open the store an import is writing (whose marker [`Store::open`] refuses).
    fn open_during_import(dir: &Path) -> Result<Self, StoreError> {
        Self::open_unchecked(dir, Recovery::Refuse)
    }

    fn open_unchecked(dir: &Path, recovery: Recovery) -> Result<Self, StoreError> {
        let mark = watermark::read(dir)?;
        let data_file = dir.join(SLED_FILE);
        if mark != Mark::Missing && !data_file.exists() && recovery == Recovery::Refuse {
            return Err(verify::data_file_missing(&data_file, &mark).into());
        }
        let db = match open_sled(dir).and_then(|db| match recovery {
            Recovery::AcceptLoss => salvage::readable(&db).map(|()| db),
            Recovery::Refuse => Ok(db),
        }) {
            Ok(db) => db,
            Err(e) if recovery == Recovery::AcceptLoss => salvage::rebuild(dir, &e)?,
            Err(e) => return Err(e),
        };
        let format = match db.get(FORMAT_KEY)? {
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| corrupt(FORMAT_KEY, "format version is not 4 bytes"))?;
                if !(OLDEST_FORMAT..=FORMAT_VERSION).contains(&found) {
                    return Err(StoreError::Version { found });
                }
                Some(found)
            }
            None => None,
        };
        // Should a sled release move its log, flushing still works, with sled's own (weaker)
        // sync; the warning says so.
        let log = match File::open(&data_file) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open sled's log for fdatasync; power-loss durability rests on sled alone");
                None
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                log,
                dir: dir.to_path_buf(),
                recovery,
                format,
                mark,
                state: Mutex::new(State::default()),
            }),
        })
    }

    /// Open the store under `dir`, which must hold one: [`StoreError::NoStore`] rather than
    /// create an empty one (for reading a stopped directory).
    pub fn open_existing(dir: &Path) -> Result<Self, StoreError> {
        if !dir.join(SLED_FILE).exists() && watermark::read(dir)? == Mark::Missing {
            return Err(StoreError::NoStore(dir.to_path_buf()));
        }
        Self::open(dir, Recovery::Refuse)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn db(&self) -> &sled::Db {
        &self.inner.db
    }

    fn state(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.inner
            .state
            .lock()
            .map_err(|_| StoreError::Failed("a panic while the store's state was locked".into()))
    }

    /// Read every record, and check that they are all that was acknowledged (see
    /// `verify.rs`): a damaged store is [`StoreError::DataLoss`], unless the store was opened
    /// with [`Recovery::AcceptLoss`]. Then the watermark is (re)written and writes may begin.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let mut snap = Snapshot::default();
        let mut found = Tally::default();
        let mut stored = None;
        for item in self.db().iter() {
            let (key, value) = item.map_err(unreadable)?;
            if is_meta(&key) {
                if key == TALLY_KEY {
                    stored = Some(decode_tally(&value)?);
                }
                continue;
            }
            found.add(&key, &value);
            match Record::decode(&key, &value)? {
                Record::Scope(scope, state) => {
                    snap.scopes.insert(scope, state);
                }
                Record::Reservation(r) => snap.reservations.push(*r),
                Record::Assignment(subject, config) => {
                    snap.assignments.insert(subject, config);
                }
            }
        }
        self.settle(found, stored)?;
        Ok(snap)
    }

    /// Check the records read (`found`) against the store's own tally and its watermark, with
    /// no change to anything: the tally the store is at.
    pub fn check(&self, found: Tally) -> Result<Tally, StoreError> {
        let stored = self
            .db()
            .get(TALLY_KEY)?
            .map(|v| decode_tally(&v))
            .transpose()?;
        Ok(verify::check(&self.evidence(found, stored))?)
    }

    fn evidence(&self, found: Tally, stored: Option<Tally>) -> verify::Evidence {
        verify::Evidence {
            found,
            stored,
            mark: self.inner.mark.clone(),
            current_format: self.inner.format == Some(FORMAT_VERSION),
        }
    }

    /// After the load: take the store as it is checked to be (or, accepting a loss, as it is),
    /// record its tally in sled if it has none yet, sync, and write the watermark.
    fn settle(&self, found: Tally, stored: Option<Tally>) -> Result<(), StoreError> {
        let tally = match verify::check(&self.evidence(found, stored)) {
            Ok(tally) => tally,
            Err(loss) if self.inner.recovery == Recovery::Refuse => return Err(loss.into()),
            Err(loss) => {
                let mark_batch = match &self.inner.mark {
                    Mark::Found(w) => w.batch,
                    _ => 0,
                };
                let batch = stored.map_or(0, |s| s.batch).max(mark_batch) + 1;
                tracing::error!(
                    problem = %loss.what,
                    found = %loss.found,
                    expected = %loss.expected,
                    dir = %self.dir().display(),
                    "DATA LOSS ACCEPTED (--accept-data-loss): serving the {} records left; the watermark starts again from batch {batch}",
                    found.records
                );
                Tally { batch, ..found }
            }
        };
        if stored != Some(tally) || self.inner.format != Some(FORMAT_VERSION) {
            let mut b = sled::Batch::default();
            b.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes());
            b.insert(TALLY_KEY, &tally.to_bytes());
            self.db().apply_batch(b)?;
        }
        // What sled holds is synced before the watermark names it: sled may have recovered
        // batches that a crash left in the page cache only.
        self.sync_sled()?;
        let watermark = Watermark::create(self.dir(), tally)?;
        let mut state = self.state()?;
        state.tally = tally;
        state.loaded = true;
        state.watermark = Some(watermark);
        Ok(())
    }

    fn sync_sled(&self) -> Result<(), StoreError> {
        self.db().flush()?;
        if let Some(log) = &self.inner.log {
            log.sync_data()?;
        }
        Ok(())
    }

    /// Flush everything written so far to stable storage, then record it in the watermark.
    pub fn flush(&self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        // Read before the flush: the flush covers every batch written before it began.
        let tally = self.state()?.tally;
        self.sync_sled()?;
        if let Some(w) = &mut self.state()?.watermark {
            w.record(tally)?;
        }
        crate::telemetry::flush_took(started.elapsed());
        Ok(())
    }

    /// Sync the watermark if its interval has passed (`force`: now).
    pub fn sync_watermark(&self, force: bool) -> Result<(), StoreError> {
        if let Some(w) = &mut self.state()?.watermark {
            if force {
                w.sync()?;
            } else {
                w.sync_if_due()?;
            }
        }
        Ok(())
    }

    /// Write mutations as one atomic batch (not flushed).
    pub(crate) fn apply(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        // Last write wins within a batch, as in sled's own batch.
        let records: BTreeMap<Vec<u8>, Option<Vec<u8>>> =
            batch.iter().map(records::encode).collect();
        self.write(records)
    }

    /// Write `records` (key to new value; none: remove) as one atomic batch (not flushed),
    /// with the tally brought up to date in the same batch, and what they replace kept for a
    /// consistent reader that still needs it.
    pub(crate) fn write(
        &self,
        records: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    ) -> Result<(), StoreError> {
        let mut state = self.state()?;
        if !state.loaded {
            return Err(StoreError::NotLoaded);
        }
        let mut tally = state.tally;
        let mut b = sled::Batch::default();
        for (key, new) in records {
            let old = self.db().get(&key)?;
            tally.replace(&key, old.as_deref(), new.as_deref());
            state.tap.preserve(&key, old.as_ref());
            match new {
                Some(v) => b.insert(key, v),
                None => b.remove(key),
            }
        }
        tally.batch += 1;
        b.insert(TALLY_KEY, &tally.to_bytes());
        self.db().apply_batch(b)?;
        state.tally = tally;
        Ok(())
    }
}

/// Open sled in `dir`. Its own background flush is off: the writer decides when to flush
/// (group commit).
fn open_sled(dir: &Path) -> Result<sled::Db, StoreError> {
    sled::Config::new()
        .path(dir)
        .flush_every_ms(None)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(unreadable)
}

/// A sled error, as a refusal of a damaged store when sled reports corruption.
fn unreadable(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => StoreError::Unreadable(e.to_string()),
        other => StoreError::Sled(other),
    }
}

/// Whether `name`, in a data directory, is one of sled's files.
fn is_sled_file(name: &str) -> bool {
    matches!(name, SLED_FILE | "conf" | "blobs") || name.starts_with("snap.")
}

fn decode_tally(v: &[u8]) -> Result<Tally, StoreError> {
    Tally::from_bytes(v).ok_or_else(|| corrupt(TALLY_KEY, "tally is not 24 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{HoldState, ReservationId, Settlement, Usage};

    #[test]
    fn records_round_trip_through_sled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Recovery::Refuse).unwrap();
        store.load().unwrap();
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
        let snap = Store::open(dir.path(), Recovery::Refuse)
            .unwrap()
            .load()
            .unwrap();
        for k in &keys {
            assert_eq!(snap.scopes[k], state, "{k:?}");
        }
        assert_eq!(snap.scopes.len(), keys.len());
        assert_eq!(snap.assignments["alice"].group.as_deref(), Some("acme"));
        assert_eq!(snap.reservations, vec![r]);
        assert_eq!(snap.assignments["alice"].tier, "pro");
        assert_eq!(snap.assignments["alice"].overrides.tokens_per_day, Some(7));
    }

    fn write_three(dir: &Path) {
        let store = Store::open(dir, Recovery::Refuse).unwrap();
        store.load().unwrap();
        for subject in ["a", "b", "c"] {
            store
                .apply(&[Mutation::Assignment {
                    subject: subject.into(),
                    config: Some(SubjectConfig {
                        tier: "pro".into(),
                        overrides: Default::default(),
                        group: None,
                    }),
                }])
                .unwrap();
            store.flush().unwrap();
        }
    }

    #[test]
    fn a_store_that_lost_records_is_refused_until_the_loss_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        write_three(dir.path());
        // A record lost inside what sled kept.
        {
            let db = sled::open(dir.path()).unwrap();
            db.remove(b"ab").unwrap();
            db.flush().unwrap();
        }
        let refused = Store::open(dir.path(), Recovery::Refuse)
            .unwrap()
            .load()
            .unwrap_err();
        assert!(
            matches!(&refused, StoreError::DataLoss(l) if l.what.contains("lost or altered")),
            "{refused}"
        );
        let snap = Store::open(dir.path(), Recovery::AcceptLoss)
            .unwrap()
            .load()
            .unwrap();
        assert_eq!(snap.assignments.len(), 2);
        // Accepted once: the store starts afresh from what is left.
        let snap = Store::open(dir.path(), Recovery::Refuse)
            .unwrap()
            .load()
            .unwrap();
        assert_eq!(snap.assignments.len(), 2);
    }

    #[test]
    fn a_store_that_lost_its_latest_batches_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_three(dir.path());
        // sled back at an earlier batch, consistent with itself (its tail cut off): only the
        // watermark knows batch 3 was made durable.
        {
            let db = sled::open(dir.path()).unwrap();
            db.remove(b"ac").unwrap();
            let mut t = Tally::from_bytes(&db.get(TALLY_KEY).unwrap().unwrap()).unwrap();
            t.batch -= 1;
            t.records -= 1;
            t.digest = t.digest.wrapping_sub(tally::record_hash(
                b"ac",
                &postcard::to_allocvec(&SubjectConfig {
                    tier: "pro".into(),
                    overrides: Default::default(),
                    group: None,
                })
                .unwrap(),
            ));
            db.insert(TALLY_KEY, &t.to_bytes()).unwrap();
            db.flush().unwrap();
        }
        let refused = Store::open(dir.path(), Recovery::Refuse)
            .unwrap()
            .load()
            .unwrap_err();
        assert!(
            matches!(&refused, StoreError::DataLoss(l) if l.what.contains("the latest 1 batches are lost")),
            "{refused}"
        );
    }
}
