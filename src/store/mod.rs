//! Durable records: the [`Store`] trait every backend implements, what all backends share,
//! and the group-commit writer that feeds a backend.
//!
//! Shared by every backend (this folder):
//! - `records.rs`: one record's key and value bytes, and what they mean.
//! - `batch.rs`: one atomic write: the records a group of decisions changed, each key once.
//! - `tally.rs`: the count and digest of a store's records, for checks at start and export.
//! - `writer.rs`: the group-commit writer thread, over any [`Store`].
//! - `export.rs`, `export_format.rs`, `import.rs`: the backup file (JSON Lines), writing it
//!   from a [`RecordReader`] and restoring it into a [`Store`].
//!
//! One folder per backend, holding everything specific to it: `sled/` (the embedded store under
//! `--data-dir`: its batch log, watermark, start-up checks, consistent reads and salvage).
//! A new backend is a new folder implementing [`Store`] and [`RecordReader`]; nothing here
//! changes.

mod batch;
pub mod export;
mod export_format;
pub mod import;
pub mod postgres;
mod records;
pub mod sled;
mod tally;
mod writer;

use std::collections::HashMap;
use std::path::PathBuf;

pub use batch::Batch;
pub use records::Record;
pub use tally::Tally;
pub use writer::{Durability, Ticket, Writer};

use crate::engine::{Reservation, ScopeKey, ScopeState};
use crate::policy::SubjectConfig;

/// The format of the records themselves (their keys and values: `records.rs`), which an
/// export's `store_format` names. A backend's own layout around them has its own version
/// (sled: [`sled::FORMAT_VERSION`]).
pub const RECORD_FORMAT: u32 = 5;

/// Where a ledger's records live. The writer thread is its only writer.
///
/// The contract: [`Store::load`] reads everything once at start, and checks that it is all
/// that was acknowledged; then [`Store::write`] takes one [`Batch`] at a time, each applied
/// atomically (after a crash, a batch is there whole or not at all, and if a batch is there,
/// every batch before it is too), and durable once a later [`Store::flush`] has returned.
/// Between the two, [`Store::maintain`] gives the backend the writer's spare time.
///
/// Why a trait object (`Arc<dyn Store>`) rather than a type parameter: the writer calls it a
/// few times per batch of up to thousands of decisions, so dynamic dispatch costs nothing
/// measurable, and the ledger, the server and the tests stay free of a backend parameter.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Where the records are, for logs ("/var/lib/tollgate").
    fn location(&self) -> String;

    /// Read every record, and check that they are all that was acknowledged: a damaged store
    /// is [`StoreError::DataLoss`] (or, if the backend was opened accepting a loss, served as
    /// it is, loudly). Writes are refused before it.
    fn load(&self) -> Result<Snapshot, StoreError>;

    /// Write one batch atomically. Not durable until [`Store::flush`] returns.
    fn write(&self, batch: &Batch) -> Result<(), StoreError>;

    /// Make every batch written so far durable.
    fn flush(&self) -> Result<(), StoreError>;

    /// Work the backend may defer until the waiting answers are sent (sled: moving its batch
    /// log into its records, syncing its watermark). Called by the writer after every group;
    /// bounded, so it delays the next group by little. Whether more such work waits (the
    /// writer then comes back for it as soon as it is idle).
    fn maintain(&self) -> Result<bool, StoreError>;

    /// At a clean stop, after the last flush: leave the store quick to load.
    fn close(&self) -> Result<(), StoreError>;

    /// Start a consistent read of every record, as of the last batch written, while writes go
    /// on (an export).
    fn reader(&self) -> Result<Box<dyn RecordReader>, StoreError>;

    /// Whether this process may still answer from the state it holds in memory. A store that
    /// one process owns (sled) always may. A shared one may refuse: PostgreSQL's leader once its
    /// lease could have run out, since a follower may be deciding by then. Checked before every
    /// answer, so that a leader paused past its lease (SIGSTOP, a stalled VM) answers none of
    /// the calls that waited for it: not the writes, which the epoch fences anyway, and not the
    /// denials and reads either, which would come from a ledger that is no longer the one in
    /// force. Must be cheap: it is on every call's path.
    fn may_answer(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Every record of a store as of one batch, in key order, in chunks; see [`Store::reader`].
pub trait RecordReader: Send {
    /// The batch the read is as of (none: a store that does not number its batches).
    fn batch(&self) -> Option<u64>;

    /// The next records (key and value bytes, see `records.rs`) in key order, about `max`;
    /// `None` once every record has been returned. Before returning `None`, the reader checks
    /// that what it read is the store as of its batch ([`StoreError::ReadInconsistent`] if
    /// not, or [`StoreError::DataLoss`] for a stopped store that fails its start-up check).
    fn next_chunk(&mut self, max: usize) -> Result<Option<Vec<RecordBytes>>, StoreError>;
}

/// A record's key and value bytes (see `records.rs`).
pub type RecordBytes = (Vec<u8>, Vec<u8>);

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

impl Snapshot {
    /// Take one decoded record in (a later one of the same key replaces it).
    pub fn add(&mut self, record: Record) {
        match record {
            Record::Scope(scope, state) => {
                self.scopes.insert(scope, state);
            }
            Record::Reservation(r) => self.reservations.push(*r),
            Record::Assignment(subject, config) => {
                self.assignments.insert(subject, config);
            }
        }
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.scopes.len() + self.reservations.len() + self.assignments.len()
    }

    /// Whether it holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What to do with a store that fails its check at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recovery {
    /// Refuse to open it (the default).
    #[default]
    Refuse,
    /// Open it anyway, log what was found against what was expected, and start the checks
    /// afresh from what is there (`--accept-data-loss`).
    AcceptLoss,
}

/// A store that has lost acknowledged records, or cannot show that it has not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} (found: {found}; expected: {expected})")]
pub struct DataLoss {
    /// What is wrong.
    pub what: String,
    /// What the store holds.
    pub found: String,
    /// What the store should hold.
    pub expected: String,
}

/// A storage failure: the request that met it is answered UNAVAILABLE, and nothing is
/// acknowledged that is not durable.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (sled, a database connection).
    #[error("storage: {0}")]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    /// This replica no longer leads (its lease ran out or was taken): it must not answer.
    #[error("not the leader: {0}")]
    NotLeader(String),
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
    /// The store is of a format version this build does not read.
    #[error(
        "storage: data directory has format version {found}, this build reads {oldest} to {newest}"
    )]
    Version {
        /// The version found.
        found: u32,
        /// The oldest this build reads.
        oldest: u32,
        /// This build's.
        newest: u32,
    },
    /// The backend cannot read its own data.
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
    #[error("storage: more than {0} records were written while the export ran; retry it when the service is less busy")]
    ReadOverflow(usize),
    /// What a consistent read returned does not add up to the store as of its batch.
    #[error("export: the records read ({found}) do not add up to the store's tally ({expected}); nothing was exported")]
    ReadInconsistent {
        /// What was read.
        found: String,
        /// The tally.
        expected: String,
    },
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
