//! The PostgreSQL backend (`--store postgres://...`): every record one row, every group of
//! decisions one statement, so one transaction, acknowledged only once PostgreSQL's COMMIT
//! has returned.
//!
//! Why PostgreSQL for state shared by several machines: a transaction covers every record a
//! decision changed (all scopes or none), and with `synchronous_commit = on` (its default) and
//! a synchronous standby, a commit that returned survives the loss of a machine. Teams that
//! bill customers run it already.
//!
//! Why the blocking `postgres` client (tokio-postgres under a small runtime of its own) rather
//! than tokio-postgres on the server's runtime: the [`Store`] trait is called by the writer,
//! one OS thread that already waits for the disk (sled's sync) and answers callers through
//! channels. A blocking client keeps that thread's control flow the same for every backend and
//! keeps database round trips off the workers that answer gRPC. It must not be called from a
//! tokio worker (it would block the runtime); the server opens and loads it on a blocking
//! thread.
//!
//! Layout (schema version [`SCHEMA_VERSION`], created by tollgate at start):
//! - `tollgate_records (key bytea PRIMARY KEY, value bytea)`: one row per record, with the
//!   key and value bytes every backend stores (`records.rs`).
//! - `tollgate_meta`: one row: the schema version, the number of the last batch written, and
//!   how many records there are. Both numbers change in the same statement as the records,
//!   so a load can tell whether the table still holds what was acknowledged.

mod database;
pub mod lease;
mod reader;
mod renewal;
mod restore;
mod schema;

use std::sync::{Mutex, MutexGuard};

use postgres::{Client, Statement};

use super::records::Record;
use super::{Batch, RecordReader, Recovery, Snapshot, Store, StoreError};
use crate::store::DataLoss;

pub use lease::{Leader, LeaseConfig};
pub use restore::import;
pub use schema::SCHEMA_VERSION;

/// The records written or removed by one batch, and the meta row moved, in one statement (one
/// transaction, one round trip), fenced by the lease. Every part of one statement sees the
/// same snapshot, so `existing` counts the keys that were there before this batch: the new
/// ones are the rest (`up` runs whether or not it is read: PostgreSQL runs every
/// data-modifying part of a WITH to completion). A batch holds each key once, so no row is
/// both upserted and deleted. Fencing: the lease row is locked (FOR SHARE) and every part
/// writes only if the lease's epoch is still `$4`. A takeover's UPDATE of the lease waits for this
/// statement's lock, and a takeover committed before it leaves the row with another epoch
/// (READ COMMITTED re-reads a row updated since the snapshot before locking it): either way a
/// deposed leader's batch writes nothing and returns no row. See `lease.rs`.
const FENCED_WRITE: &str = "
WITH lease AS (
    SELECT epoch FROM tollgate_lease WHERE epoch = $4 FOR SHARE
), up AS (
    INSERT INTO tollgate_records (key, value)
    SELECT k, v FROM unnest($1::bytea[], $2::bytea[]) AS b(k, v)
    WHERE EXISTS (SELECT 1 FROM lease)
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value
    RETURNING 1
), gone AS (
    DELETE FROM tollgate_records
    WHERE key = ANY($3::bytea[]) AND EXISTS (SELECT 1 FROM lease)
    RETURNING 1
), existing AS (
    SELECT count(*) AS n FROM tollgate_records WHERE key = ANY($1::bytea[])
)
UPDATE tollgate_meta SET
    batch = batch + 1,
    records = records + cardinality($1::bytea[]) - (SELECT n FROM existing)
        - (SELECT count(*) FROM gone)
WHERE EXISTS (SELECT 1 FROM lease)
RETURNING batch, records";

/// A tollgate store in a PostgreSQL database.
pub struct PostgresStore {
    db: database::Database,
    /// Where, for logs: host, port and database, never the password.
    location: String,
    recovery: Recovery,
    inner: Mutex<Inner>,
    /// Whether the lease taken still holds: set once, when it is taken; read without the lock
    /// before every answer ([`Store::may_answer`]).
    authority: std::sync::OnceLock<renewal::Authority>,
}

struct Inner {
    client: ClientOnAnyThread,
    write: Statement,
    /// The lease this store writes under (none: it does not lead, and may not write).
    lease: Option<Leading>,
    loaded: bool,
    /// The last batch written, and the records after it (as PostgreSQL returned them).
    batch: i64,
    records: i64,
    /// An earlier failure: every later write is refused (the writer fail-stops on the first).
    failed: Option<String>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connect to `url` (`postgres://user@host:port/db?...`), create or check the schema.
    /// Blocking: call it from a thread that may block, never from a tokio worker.
    pub fn connect(url: &str, recovery: Recovery) -> Result<Self, StoreError> {
        let db = database::Database::from_url(url)?;
        let location = if db.tls() {
            format!("{} (TLS)", describe(db.config()))
        } else {
            describe(db.config())
        };
        let mut client = connect(&db, &location)?;
        schema::ensure(&mut client)?;
        let write = client.prepare(FENCED_WRITE).map_err(backend)?;
        Ok(Self {
            db,
            location,
            recovery,
            authority: std::sync::OnceLock::new(),
            inner: Mutex::new(Inner {
                client: ClientOnAnyThread(Some(client)),
                write,
                lease: None,
                loaded: false,
                batch: 0,
                records: 0,
                failed: None,
            }),
        })
    }

    fn inner(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Failed("the store's lock was poisoned".into()))
    }

    /// Wait until this server holds the lease (calling `standby` with the lease as it is, each
    /// time it is found held by another), then keep it renewed; see [`PostgresStore::try_lead`].
    /// Blocking.
    pub fn lead(
        &self,
        config: LeaseConfig,
        failed: crate::failstop::FailStop,
        mut standby: impl FnMut(&Leader),
    ) -> Result<i64, StoreError> {
        loop {
            if let Some(epoch) = self.try_lead(&config, &failed)? {
                return Ok(epoch);
            }
            standby(&self.leader()?);
            std::thread::sleep(Self::poll_every(&config));
        }
    }

    /// How often a replica that does not lead looks at the lease: every third of the TTL, at
    /// most every second.
    pub fn poll_every(config: &LeaseConfig) -> std::time::Duration {
        config.renew_every().min(std::time::Duration::from_secs(1))
    }

    /// Take the lease if it has run out, and then keep it renewed on a thread of its own, which
    /// trips `failed` if the lease is lost or not renewed in time: the epoch, or none if
    /// another holds it. Blocking. Call before [`Store::load`]: what is loaded after taking the
    /// lease includes every batch any earlier leader wrote.
    pub fn try_lead(
        &self,
        config: &LeaseConfig,
        failed: &crate::failstop::FailStop,
    ) -> Result<Option<i64>, StoreError> {
        let mut inner = self.inner()?;
        if let Some(leading) = &inner.lease {
            return Ok(Some(leading.epoch));
        }
        let sent = std::time::Instant::now();
        let Some(epoch) = lease::try_acquire(&mut *inner.client, config)? else {
            return Ok(None);
        };
        let renewal =
            renewal::Renewal::start(self.db.clone(), config.clone(), epoch, sent, failed.clone());
        let _ = self.authority.set(renewal.authority(config));
        inner.lease = Some(Leading { epoch, renewal });
        Ok(Some(epoch))
    }

    /// The lease as the database holds it now. Blocking.
    pub fn leader(&self) -> Result<Leader, StoreError> {
        lease::current(&mut *self.inner()?.client)
    }
}

/// The lease held: its epoch, and the renewal thread (stopped when the store is dropped).
struct Leading {
    epoch: i64,
    renewal: renewal::Renewal,
}

/// The blocking client, dropped on a thread of its own: dropping it closes the connection with
/// a blocking call, which would panic on a tokio worker (where a server drops its ledger).
pub(super) struct ClientOnAnyThread(pub(super) Option<Client>);

impl std::ops::Deref for ClientOnAnyThread {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.0.as_ref().expect("the client is only taken by drop")
    }
}

impl std::ops::DerefMut for ClientOnAnyThread {
    fn deref_mut(&mut self) -> &mut Client {
        self.0.as_mut().expect("the client is only taken by drop")
    }
}

impl Drop for ClientOnAnyThread {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::spawn(move || drop(client)).join();
            }
        }
    }
}

/// Host, port and database of `config`, for logs and errors: no user, no password.
fn describe(config: &postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("postgres://{host}:{port}/{db}")
}

fn connect(db: &database::Database, location: &str) -> Result<Client, StoreError> {
    db.connect(None)
        .map_err(|e| StoreError::Backend(format!("cannot connect to {location}: {e}").into()))
}

fn backend(e: postgres::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

impl Store for PostgresStore {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        let mut inner = self.inner()?;
        let mut snap = Snapshot::default();
        // One snapshot for the meta row and every record: what they say must agree.
        let mut tx = inner
            .client
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(backend)?;
        let (batch, stored) = schema::read_meta(&mut tx)?;
        let mut found: i64 = 0;
        let rows = tx
            .query_raw(
                "SELECT key, value FROM tollgate_records",
                std::iter::empty::<i32>(),
            )
            .map_err(backend)?;
        use postgres::fallible_iterator::FallibleIterator;
        let mut rows = rows;
        while let Some(row) = rows.next().map_err(backend)? {
            let key: &[u8] = row.get(0);
            let value: &[u8] = row.get(1);
            snap.add(Record::decode(key, value)?);
            found += 1;
        }
        drop(rows);
        tx.commit().map_err(backend)?;
        if found != stored {
            let loss = DataLoss {
                what: format!(
                    "{} holds {found} records, but its last batch ({batch}) left {stored}: rows were removed or added outside tollgate",
                    self.location
                ),
                found: format!("{found} records"),
                expected: format!("{stored} records at batch {batch}"),
            };
            if self.recovery == Recovery::Refuse {
                return Err(loss.into());
            }
            tracing::error!(
                problem = %loss.what,
                found = %loss.found,
                expected = %loss.expected,
                "DATA LOSS ACCEPTED (--accept-data-loss): serving what the database holds"
            );
            inner
                .client
                .execute("UPDATE tollgate_meta SET records = $1", &[&found])
                .map_err(backend)?;
        }
        inner.batch = batch;
        inner.records = found;
        inner.loaded = true;
        Ok(snap)
    }

    fn write(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut inner = self.inner()?;
        if let Some(why) = &inner.failed {
            return Err(StoreError::Failed(why.clone()));
        }
        if !inner.loaded {
            return Err(StoreError::NotLoaded);
        }
        let mut keys: Vec<&[u8]> = Vec::with_capacity(batch.len());
        let mut values: Vec<&[u8]> = Vec::with_capacity(batch.len());
        let mut removed: Vec<&[u8]> = Vec::new();
        for (key, value) in batch.records() {
            match value {
                Some(v) => {
                    keys.push(key);
                    values.push(v);
                }
                None => removed.push(key),
            }
        }
        let inner = &mut *inner;
        let Some(epoch) = inner.lease.as_ref().map(|l| l.epoch) else {
            return Err(StoreError::Failed(
                "written without the lease: a server writes only while it leads".into(),
            ));
        };
        let result = inner
            .client
            .query_opt(&inner.write, &[&keys, &values, &removed, &epoch]);
        match result {
            Ok(None) => {
                let why = format!(
                    "deposed: another replica took the lease of {} (this one's epoch was {}); nothing of this batch was written",
                    self.location,
                    inner.lease.as_ref().map_or(0, |l| l.epoch)
                );
                inner.failed = Some(why.clone());
                Err(StoreError::Failed(why))
            }
            Ok(Some(row)) => {
                let batch: i64 = row.get(0);
                let records: i64 = row.get(1);
                // One writer: every batch moves the number by exactly one.
                if batch != inner.batch + 1 {
                    let why = format!(
                        "{} moved from batch {} to {batch}: another process writes the same database",
                        self.location, inner.batch
                    );
                    inner.failed = Some(why.clone());
                    return Err(StoreError::Failed(why));
                }
                inner.batch = batch;
                inner.records = records;
                Ok(())
            }
            Err(e) => {
                inner.failed = Some(e.to_string());
                Err(backend(e))
            }
        }
    }

    /// Nothing to do: each batch was one statement, so one transaction, and it returned only
    /// once PostgreSQL had committed it (durably, with `synchronous_commit = on`).
    fn flush(&self) -> Result<(), StoreError> {
        match &self.inner()?.failed {
            Some(why) => Err(StoreError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    fn maintain(&self) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// Give the lease up (a follower takes over at once rather than after the TTL).
    fn close(&self) -> Result<(), StoreError> {
        self.flush()?;
        let mut inner = self.inner()?;
        if let Some(leading) = inner.lease.take() {
            leading.renewal.stop();
            lease::release(&mut *inner.client, leading.epoch)?;
        }
        Ok(())
    }

    fn reader(&self) -> Result<Box<dyn RecordReader>, StoreError> {
        let client = connect(&self.db, &self.location)?;
        Ok(Box::new(reader::PostgresReader::start(client)?))
    }

    fn may_answer(&self) -> Result<(), StoreError> {
        match self.authority.get() {
            Some(lease) if lease.holds() => Ok(()),
            Some(_) => Err(StoreError::NotLeader(format!(
                "the lease of {} may have run out (not renewed in time, or taken by another replica)",
                self.location
            ))),
            None => Err(StoreError::NotLeader(format!(
                "this replica does not hold the lease of {}",
                self.location
            ))),
        }
    }
}
