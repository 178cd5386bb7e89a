//! `tollgate import --store postgres://...`: an export restored into PostgreSQL in ONE
//! transaction, after the whole file has been checked ([`check_file`]): the database holds
//! all of the file or, after any failure (the file, the connection, a crash), none of it. So
//! PostgreSQL needs no marker for a half import, unlike a sled directory.

use std::path::Path;

use postgres::Client;

use super::{backend, schema, PostgresStore};
use crate::store::import::{check_file, read_export, ImportError, ImportSummary};
use crate::store::{Recovery, Store, StoreError};

/// Rows sent per INSERT.
const ROWS_PER_INSERT: usize = 4_096;

/// Restore `file` into the database at `url`, which must hold no records (with `replace`,
/// its records are deleted first, in the same transaction).
pub fn import(file: &Path, url: &str, replace: bool) -> Result<ImportSummary, ImportError> {
    let counts = check_file(file)?;
    let store = PostgresStore::connect(url, Recovery::Refuse)?;
    let location = store.location();
    let mut inner = store.inner()?;
    let written = write_all(&mut inner.client, file, replace, &location)?;
    drop(inner);
    // Load it back as a start would: what serve will see.
    let loaded = store.load()?.len();
    if written != counts || loaded as u64 != counts.records {
        return Err(StoreError::Failed(format!(
            "{loaded} records load back, where the file holds {}",
            counts.records
        ))
        .into());
    }
    Ok(ImportSummary { counts })
}

fn write_all(
    client: &mut Client,
    file: &Path,
    replace: bool,
    location: &str,
) -> Result<crate::store::export_format::Counts, ImportError> {
    let mut tx = client.transaction().map_err(backend)?;
    // The meta row locked first: a server writing meanwhile waits, then finds the batch moved
    // and stops (its ledger is no longer what the database holds).
    let (batch, records) = schema::lock_meta(&mut tx)?;
    if records > 0 && !replace {
        return Err(ImportError::NotEmptyDatabase(location.to_string(), records));
    }
    tx.execute("DELETE FROM tollgate_records", &[])
        .map_err(backend)?;
    let insert = tx
        .prepare("INSERT INTO tollgate_records (key, value) SELECT * FROM unnest($1::bytea[], $2::bytea[])")
        .map_err(backend)?;
    let mut keys: Vec<Vec<u8>> = Vec::with_capacity(ROWS_PER_INSERT);
    let mut values: Vec<Vec<u8>> = Vec::with_capacity(ROWS_PER_INSERT);
    let mut total: i64 = 0;
    let written = read_export(file, |key, value| {
        keys.push(key);
        values.push(value);
        if keys.len() >= ROWS_PER_INSERT {
            total += tx.execute(&insert, &[&keys, &values]).map_err(backend)? as i64;
            keys.clear();
            values.clear();
        }
        Ok(())
    })?;
    if !keys.is_empty() {
        total += tx.execute(&insert, &[&keys, &values]).map_err(backend)? as i64;
    }
    tx.execute(
        "UPDATE tollgate_meta SET batch = $1, records = $2",
        &[&(batch + 1), &total],
    )
    .map_err(backend)?;
    tx.commit().map_err(backend)?;
    Ok(written)
}
