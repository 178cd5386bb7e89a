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

mod reader;
mod restore;
mod schema;

use std::sync::{Mutex, MutexGuard};

use postgres::{Client, Statement};

use super::records::Record;
use super::{Batch, RecordReader, Recovery, Snapshot, Store, StoreError};
use crate::store::DataLoss;

pub use restore::import;
pub use schema::SCHEMA_VERSION;

/// How long a connection attempt may take before the store is reported unreachable.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Records written or removed by one batch, and the meta row moved in the same statement.
/// Every part of one statement sees the same snapshot, so `existing` counts the keys that were
/// there before this batch: the new ones are the rest. (`up` runs whether or not it is read:
/// PostgreSQL runs every data-modifying part of a WITH to completion.) A batch holds each key
/// once, so no row is both upserted and deleted.
const WRITE_BATCH: &str = "
WITH up AS (
    INSERT INTO tollgate_records (key, value)
    SELECT * FROM unnest($1::bytea[], $2::bytea[])
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value
    RETURNING 1
), gone AS (
    DELETE FROM tollgate_records WHERE key = ANY($3::bytea[]) RETURNING 1
), existing AS (
    SELECT count(*) AS n FROM tollgate_records WHERE key = ANY($1::bytea[])
)
UPDATE tollgate_meta SET
    batch = batch + 1,
    records = records + cardinality($1::bytea[]) - (SELECT n FROM existing)
        - (SELECT count(*) FROM gone)
RETURNING batch, records";

/// A tollgate store in a PostgreSQL database.
pub struct PostgresStore {
    config: postgres::Config,
    /// Where, for logs: host, port and database, never the password.
    location: String,
    recovery: Recovery,
    inner: Mutex<Inner>,
}

struct Inner {
    client: ClientOnAnyThread,
    write: Statement,
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
        let mut config: postgres::Config = url.parse().map_err(|e| {
            StoreError::Backend(format!("--store: not a PostgreSQL URL: {e}").into())
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("tollgate");
        }
        let location = describe(&config);
        let mut client = connect(&config, &location)?;
        schema::ensure(&mut client)?;
        let write = client.prepare(WRITE_BATCH).map_err(backend)?;
        Ok(Self {
            config,
            location,
            recovery,
            inner: Mutex::new(Inner {
                client: ClientOnAnyThread(Some(client)),
                write,
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

    /// The last batch written (0 before any).
    pub fn batch(&self) -> Result<i64, StoreError> {
        Ok(self.inner()?.batch)
    }
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

fn connect(config: &postgres::Config, location: &str) -> Result<Client, StoreError> {
    config
        .connect(postgres::NoTls)
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
        let started = std::time::Instant::now();
        let result = inner
            .client
            .query_one(&inner.write, &[&keys, &values, &removed]);
        // The statement's commit is this backend's flush (the metric of every backend's).
        crate::telemetry::flush_took(started.elapsed());
        match result {
            Ok(row) => {
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

    fn close(&self) -> Result<(), StoreError> {
        self.flush()
    }

    fn reader(&self) -> Result<Box<dyn RecordReader>, StoreError> {
        let client = connect(&self.config, &self.location)?;
        Ok(Box::new(reader::PostgresReader::start(client)?))
    }
}
