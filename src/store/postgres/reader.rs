//! A consistent read of every record while the writer goes on (an export): one REPEATABLE
//! READ transaction on a connection of its own, read through a cursor in key order, so the
//! records are the database as of one batch however long the export takes, and memory holds
//! one chunk at a time.

use postgres::Client;

use super::{backend, schema, ClientOnAnyThread};
use crate::store::{RecordBytes, RecordReader, StoreError};

/// See the module documentation.
pub struct PostgresReader {
    client: ClientOnAnyThread,
    batch: i64,
    records: i64,
    read: i64,
    done: bool,
}

impl PostgresReader {
    /// Open the transaction and the cursor on `client`.
    pub fn start(mut client: Client) -> Result<Self, StoreError> {
        client
            .batch_execute(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
                 DECLARE tollgate_export NO SCROLL CURSOR FOR
                     SELECT key, value FROM tollgate_records ORDER BY key;",
            )
            .map_err(backend)?;
        let (batch, records) = schema::read_meta(&mut client)?;
        Ok(Self {
            client: ClientOnAnyThread(Some(client)),
            batch,
            records,
            read: 0,
            done: false,
        })
    }
}

impl RecordReader for PostgresReader {
    fn batch(&self) -> Option<u64> {
        u64::try_from(self.batch).ok()
    }

    fn next_chunk(&mut self, max: usize) -> Result<Option<Vec<RecordBytes>>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let rows = self
            .client
            .query(
                &format!("FETCH {} FROM tollgate_export", max.clamp(1, 100_000)),
                &[],
            )
            .map_err(backend)?;
        if rows.is_empty() {
            self.done = true;
            let _ = self.client.batch_execute("COMMIT");
            if self.read != self.records {
                return Err(StoreError::ReadInconsistent {
                    found: format!("{} records", self.read),
                    expected: format!("{} records at batch {}", self.records, self.batch),
                });
            }
            return Ok(None);
        }
        self.read += rows.len() as i64;
        Ok(Some(
            rows.iter()
                .map(|row| (row.get::<_, Vec<u8>>(0), row.get::<_, Vec<u8>>(1)))
                .collect(),
        ))
    }
}
