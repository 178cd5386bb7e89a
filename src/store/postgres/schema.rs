//! The tables tollgate keeps in PostgreSQL, created and checked at start.
//!
//! Why tollgate creates its own schema rather than shipping migrations for an operator to run:
//! the service is the only writer, the schema is two tables, and a version number in the meta
//! row lets a later build upgrade it in place (or refuse a database written by a newer one).

use postgres::{Client, GenericClient};

use super::backend;
use crate::store::StoreError;

/// The schema this build writes and reads.
pub const SCHEMA_VERSION: i32 = 1;

/// Create the tables if they are not there; refuse a schema of another version. Serialized by
/// a transaction-scoped advisory lock, so replicas starting together create it once.
pub fn ensure(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction().map_err(backend)?;
    // The lock's key: "tollgate" in ASCII, as a number no other program is likely to pick.
    tx.execute("SELECT pg_advisory_xact_lock(8387236823647430245)", &[])
        .map_err(backend)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tollgate_records (
             key bytea PRIMARY KEY,
             value bytea NOT NULL
         );
         CREATE TABLE IF NOT EXISTS tollgate_meta (
             only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
             schema_version integer NOT NULL,
             batch bigint NOT NULL CHECK (batch >= 0),
             records bigint NOT NULL
         );",
    )
    .map_err(backend)?;
    super::lease::ensure(&mut tx)?;
    let version: Option<i32> = tx
        .query_opt("SELECT schema_version FROM tollgate_meta", &[])
        .map_err(backend)?
        .map(|row| row.get(0));
    match version {
        None => {
            tx.execute(
                "INSERT INTO tollgate_meta (schema_version, batch, records)
                 SELECT $1, 0, count(*) FROM tollgate_records",
                &[&SCHEMA_VERSION],
            )
            .map_err(backend)?;
        }
        Some(SCHEMA_VERSION) => {}
        Some(found) => {
            return Err(StoreError::Version {
                found: u32::try_from(found).unwrap_or(0),
                oldest: SCHEMA_VERSION as u32,
                newest: SCHEMA_VERSION as u32,
            });
        }
    }
    tx.commit().map_err(backend)
}

/// The last batch written and the records it left, from the meta row.
pub fn read_meta(client: &mut impl GenericClient) -> Result<(i64, i64), StoreError> {
    let row = client
        .query_one("SELECT batch, records FROM tollgate_meta", &[])
        .map_err(backend)?;
    Ok((row.get(0), row.get(1)))
}

/// The meta row, locked until the end of the transaction: the last batch and the records.
pub fn lock_meta(client: &mut impl GenericClient) -> Result<(i64, i64), StoreError> {
    let row = client
        .query_one("SELECT batch, records FROM tollgate_meta FOR UPDATE", &[])
        .map_err(backend)?;
    Ok((row.get(0), row.get(1)))
}
