//! The sled backend: records in one sled tree under `--data-dir`, and the checks that a data
//! directory holds everything that was acknowledged.
//!
//! - `log.rs`: the batch log: a batch written as one sled value, its records moved to their
//!   own keys later, each once.
//! - `load.rs`: the load at start, every record read and counted, on every core.
//! - `verify.rs`: what a start compares, and why a crash can never fail it.
//! - `watermark.rs`: the tally of the last durable batch, kept outside sled.
//! - `reader.rs`: a consistent read of every record while the writer writes.
//! - `salvage.rs`: what `--accept-data-loss` keeps of a store sled cannot read.
//! - `restore.rs`: `tollgate import` into a data directory.
//!
//! One sled tree, so that every batch is one atomic sled batch (sled batches are atomic within
//! a tree, not across trees). Besides the records (`records.rs`), keys of its own:
//!
//! | key                                  | value                                     |
//! |--------------------------------------|-------------------------------------------|
//! | `!format`                            | format version (u32 BE)                   |
//! | `!tally`                             | the store's [`Tally`] (see `tally.rs`)    |
//! | `~` + batch (u64 BE) + part (u16 BE) | a log entry: a batch's records (`log.rs`) |

mod load;
mod log;
mod reader;
pub mod restore;
mod salvage;
mod verify;
mod watermark;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

pub use reader::MAX_PRESERVED;

use super::records::corrupt;
use super::{Batch, RecordReader, Recovery, Snapshot, Store, StoreError, Tally};
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
/// Version 6: the batch log (`~` keys, `log.rs`). Records are as in version 5 (and 4), so
/// those directories are opened and upgraded in place; older builds refuse a version 6
/// directory, whose log they would not read.
pub const FORMAT_VERSION: u32 = 6;
/// The oldest format this build opens (and upgrades).
const OLDEST_FORMAT: u32 = 4;
/// The first format with a tally.
const TALLIED_FORMAT: u32 = 5;
const FORMAT_KEY: &[u8] = b"!format";
/// The key of the tally record.
const TALLY_KEY: &[u8] = b"!tally";
/// sled's data file in the data directory (sled 0.34 keeps its log there).
pub const SLED_FILE: &str = "db";

/// Make `dir` the owner's alone (0700), and every file in it (0600): subjects are often API
/// keys, and a directory made by an older build, or before the umask, was world-readable.
fn owner_only(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let tighten = |path: &Path, mode: u32| -> std::io::Result<bool> {
        let meta = std::fs::symlink_metadata(path)?;
        if meta.file_type().is_symlink() || meta.permissions().mode() & 0o077 == 0 {
            return Ok(false);
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        Ok(true)
    };
    let mut changed = tighten(dir, 0o700)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let mode = if entry.file_type()?.is_dir() {
            0o700
        } else {
            0o600
        };
        changed |= tighten(&entry.path(), mode)?;
    }
    if changed {
        tracing::info!(dir = %dir.display(), "data directory made the owner's alone (0700, files 0600)");
    }
    Ok(())
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

/// The sled database of one data directory, its tally and its watermark.
///
/// Why an extra `fdatasync` of sled's log after each flush: sled 0.34 flushes with
/// `sync_file_range`, which survives a killed process but not a power cut or kernel crash (it
/// neither flushes the disk's write cache nor the file's size). Syncing the log file through a
/// second descriptor does both; with group commit it costs one sync per batch, not per request.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    /// sled's data file, for the `fdatasync` after each flush.
    data_file: Option<File>,
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
    /// The batch log (see `log.rs`).
    log: log::Log,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl SledStore {
    /// Open (or create) the database under `dir`. Nothing is checked until [`Store::load`],
    /// except that a data file gone while its watermark remains is refused before sled would
    /// create an empty one.
    pub fn open(dir: &Path, recovery: Recovery) -> Result<Self, StoreError> {
        if dir.join(restore::MARKER).exists() {
            return Err(StoreError::ImportUnfinished(dir.to_path_buf()));
        }
        let store = Self::open_unchecked(dir, recovery)?;
        owner_only(dir)?;
        Ok(store)
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
                    return Err(StoreError::Version {
                        found,
                        oldest: OLDEST_FORMAT,
                        newest: FORMAT_VERSION,
                    });
                }
                Some(found)
            }
            None => None,
        };
        // Should a sled release move its log, flushing still works, with sled's own (weaker)
        // sync; the warning says so.
        let data_file_handle = match File::open(&data_file) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open sled's log for fdatasync; power-loss durability rests on sled alone");
                None
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                data_file: data_file_handle,
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
    fn load_checked(&self) -> Result<Snapshot, StoreError> {
        // The log first (it sorts last, and is bounded): its records override the records'
        // own keys.
        let entries = self
            .db()
            .scan_prefix([log::PREFIX])
            .collect::<Result<Vec<_>, _>>()
            .map_err(unreadable)?;
        let log = log::Log::restore(&entries)?;
        drop(entries);
        let loaded = self.read_all(&log, load::threads())?;
        self.settle(loaded.found, loaded.stored)?;
        self.state()?.log = log;
        Ok(loaded.snapshot)
    }

    fn evidence(&self, found: Tally, stored: Option<Tally>) -> verify::Evidence {
        verify::Evidence {
            found,
            stored,
            mark: self.inner.mark.clone(),
            has_tally: self.inner.format.is_some_and(|f| f >= TALLIED_FORMAT),
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
        if let Some(file) = &self.inner.data_file {
            file.sync_data()?;
        }
        Ok(())
    }

    /// Flush everything written so far to stable storage, then record it in the watermark.
    fn flush_and_mark(&self) -> Result<(), StoreError> {
        // Read before the flush: the flush covers every batch written before it began.
        let tally = self.state()?.tally;
        self.sync_sled()?;
        if let Some(w) = &mut self.state()?.watermark {
            w.record(tally)?;
        }
        Ok(())
    }

    /// Sync the watermark if its interval has passed (`force`: now).
    fn sync_watermark(&self, force: bool) -> Result<(), StoreError> {
        if let Some(w) = &mut self.state()?.watermark {
            if force {
                w.sync()?;
            } else {
                w.sync_if_due()?;
            }
        }
        Ok(())
    }

    /// Write `batch` to the log (see `log.rs`), in one atomic sled batch with the tally (not
    /// flushed).
    fn write_batch(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut state = self.state()?;
        if !state.loaded {
            return Err(StoreError::NotLoaded);
        }
        self.append(&mut state, batch)
    }
}

impl Store for SledStore {
    fn location(&self) -> String {
        self.dir().display().to_string()
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        self.load_checked()
    }

    fn write(&self, batch: &Batch) -> Result<(), StoreError> {
        self.write_batch(batch)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.flush_and_mark()
    }

    fn maintain(&self) -> Result<bool, StoreError> {
        let more = {
            let mut state = self.state()?;
            if !state.loaded {
                return Ok(false);
            }
            self.checkpoint(&mut state)?
        };
        // The watermark's own sync (once a second).
        self.sync_watermark(false)?;
        Ok(more)
    }

    fn close(&self) -> Result<(), StoreError> {
        {
            let mut state = self.state()?;
            if !state.loaded {
                return Ok(());
            }
            self.checkpoint_all(&mut state)?;
        }
        self.flush_and_mark()?;
        self.sync_watermark(true)
    }

    fn reader(&self) -> Result<Box<dyn RecordReader>, StoreError> {
        Ok(Box::new(self.consistent_reader()?))
    }
}

/// sled's page cache, at most. Why far below sled's default (1 GiB): the engine holds every
/// record in memory already, and sled reads its pages only for checkpoints (`log.rs`) and at
/// start. Measured with 1M subjects: 125 MB less resident (about 10%) for 5% more writer CPU.
pub const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Open sled in `dir`. Its own background flush is off: the writer decides when to flush
/// (group commit).
fn open_sled(dir: &Path) -> Result<sled::Db, StoreError> {
    sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_BYTES)
        .flush_every_ms(None)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(unreadable)
}

/// A sled error, as a refusal of a damaged store when sled reports corruption.
fn unreadable(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => StoreError::Unreadable(e.to_string()),
        other => other.into(),
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
    use crate::engine::{
        HoldState, Mutation, Reservation, ReservationId, ScopeKey, ScopeState, Settlement, Usage,
    };
    use crate::policy::SubjectConfig;
    use crate::store::batch::Coalesced;
    use crate::store::tally::record_hash;

    /// Open the store in `dir` again, in the same process: sled's I/O threads may hold its
    /// file (and lock) for a moment after the last handle is dropped, so this retries briefly.
    pub(super) fn reopen(dir: &Path, recovery: Recovery) -> SledStore {
        for _ in 0..200 {
            match SledStore::open(dir, recovery) {
                Err(e) if e.to_string().contains("could not acquire lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other.unwrap(),
            }
        }
        panic!("{} stayed locked for 2 s", dir.display());
    }

    /// Write `mutations` as the writer would: one batch, each record once.
    pub(super) fn apply(store: &SledStore, mutations: Vec<Mutation>) {
        let mut c = Coalesced::default();
        c.add(mutations);
        store.write(&c.take()).unwrap();
    }

    /// A settled reservation with every field set.
    pub(super) fn sample_reservation(id: ReservationId) -> Reservation {
        Reservation {
            caller: None,
            id,
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
        }
    }

    #[test]
    fn records_round_trip_through_sled() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), Recovery::Refuse).unwrap();
        store.load().unwrap();
        let r = sample_reservation(ReservationId::generate(1_000));
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
        let batch: Vec<Mutation> = keys
            .iter()
            .map(|k| Mutation::Scope {
                key: k.clone(),
                state: Some(state),
            })
            .collect();
        apply(&store, batch);
        apply(
            &store,
            vec![
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
            ],
        );
        store.flush().unwrap();
        drop(store);
        let snap = reopen(dir.path(), Recovery::Refuse).load().unwrap();
        for k in &keys {
            assert_eq!(snap.scopes[k], state, "{k:?}");
        }
        assert_eq!(snap.scopes.len(), keys.len());
        assert_eq!(snap.assignments["alice"].group.as_deref(), Some("acme"));
        assert_eq!(snap.reservations, vec![r]);
        assert_eq!(snap.assignments["alice"].tier, "pro");
        assert_eq!(snap.assignments["alice"].overrides.tokens_per_day, Some(7));
    }

    /// Three assignments (a, b, c), each its own batch; `close`: then moved to their own keys
    /// (as a clean stop does), else left in the log.
    fn write_three(dir: &Path, close: bool) {
        let store = SledStore::open(dir, Recovery::Refuse).unwrap();
        store.load().unwrap();
        for subject in ["a", "b", "c"] {
            apply(
                &store,
                vec![Mutation::Assignment {
                    subject: subject.into(),
                    config: Some(SubjectConfig {
                        tier: "pro".into(),
                        overrides: Default::default(),
                        group: None,
                    }),
                }],
            );
            store.flush().unwrap();
        }
        if close {
            store.close().unwrap();
        }
    }

    #[test]
    fn a_store_that_lost_records_is_refused_until_the_loss_is_accepted() {
        for in_log in [false, true] {
            lost_record_refused_then_accepted(in_log);
        }
    }

    /// A record lost inside what sled kept: under its own key, or (`in_log`) a log entry.
    fn lost_record_refused_then_accepted(in_log: bool) {
        let dir = tempfile::tempdir().unwrap();
        write_three(dir.path(), !in_log);
        {
            let db = sled::open(dir.path()).unwrap();
            let lost = if in_log {
                let entries: Vec<_> = db.scan_prefix([log::PREFIX]).keys().collect();
                assert_eq!(entries.len(), 3, "one entry per batch");
                entries[1].clone().unwrap()
            } else {
                assert_eq!(db.scan_prefix([log::PREFIX]).count(), 0);
                sled::IVec::from(b"ab")
            };
            db.remove(lost).unwrap().unwrap();
            db.flush().unwrap();
        }
        let refused = reopen(dir.path(), Recovery::Refuse).load().unwrap_err();
        assert!(
            matches!(&refused, StoreError::DataLoss(l) if l.what.contains("lost or altered")),
            "{refused}"
        );
        let snap = reopen(dir.path(), Recovery::AcceptLoss).load().unwrap();
        assert_eq!(snap.assignments.len(), 2);
        // Accepted once: the store starts afresh from what is left.
        let snap = reopen(dir.path(), Recovery::Refuse).load().unwrap();
        assert_eq!(snap.assignments.len(), 2);
    }

    #[test]
    fn a_store_that_lost_its_latest_batches_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_three(dir.path(), true);
        // sled back at an earlier batch, consistent with itself (its tail cut off): only the
        // watermark knows batch 3 was made durable.
        {
            let db = sled::open(dir.path()).unwrap();
            db.remove(b"ac").unwrap();
            let mut t = Tally::from_bytes(&db.get(TALLY_KEY).unwrap().unwrap()).unwrap();
            t.batch -= 1;
            t.records -= 1;
            t.digest = t.digest.wrapping_sub(record_hash(
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
        let refused = reopen(dir.path(), Recovery::Refuse).load().unwrap_err();
        assert!(
            matches!(&refused, StoreError::DataLoss(l) if l.what.contains("the latest 1 batches are lost")),
            "{refused}"
        );
    }
}
