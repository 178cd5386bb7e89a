//! Writing an export: every record of a store, as of one batch, as the file of
//! `export_format.rs`, whether the store is stopped (`tollgate export --data-dir`) or serving
//! (the Admin `Export` call, which `tollgate export --addr` uses).
//!
//! The records come from a backend's [`RecordReader`], which checks itself before it reports
//! the end: the records it returned must be the store as of its batch (and, for a stopped
//! store, pass the start-up check). An export that fails has no end line, so no import will
//! take it.

use std::io::{self, Write};

use xxhash_rust::xxh3::Xxh3;

pub use super::export_format::{Counts, Header, Line, FORMAT_NAME, VERSION};

use super::export_format::End;
use super::{Record, RecordReader, StoreError};

/// Records read from the store per chunk: one chunk holds the store's lock (so delays the
/// writer) for a fraction of a millisecond.
pub const CHUNK_RECORDS: usize = 256;

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading the store failed (or it failed its check).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the file failed.
    #[error("export: writing: {0}")]
    Io(#[from] io::Error),
}

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportSummary {
    /// The records, by kind.
    pub counts: Counts,
    /// The batch it is as of.
    pub batch: Option<u64>,
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    out: W,
    hash: Xxh3,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn write_line(out: &mut impl Write, line: &Line) -> io::Result<()> {
    serde_json::to_writer(&mut *out, line).map_err(io::Error::other)?;
    out.write_all(b"\n")
}

/// Write every record `reader` returns to `out`, as an export made at `now_us`.
pub fn write_export(
    reader: &mut dyn RecordReader,
    out: impl Write,
    now_us: u64,
) -> Result<ExportSummary, ExportError> {
    let batch = reader.batch();
    let mut out = Hashing {
        out,
        hash: Xxh3::new(),
    };
    write_line(&mut out, &Line::Header(Header::new(batch, now_us)))?;
    let mut counts = Counts::default();
    // The reader checks, before it reports the end, that it returned the store as of `batch`.
    while let Some(chunk) = reader.next_chunk(CHUNK_RECORDS)? {
        for (key, value) in chunk {
            let record = Record::decode(&key, &value)?;
            counts.add(&record);
            write_line(&mut out, &Line::from(record))?;
        }
    }
    let sum = out.hash.digest();
    let mut out = out.out;
    write_line(&mut out, &Line::End(End::new(counts, sum)))?;
    out.flush()?;
    Ok(ExportSummary { counts, batch })
}
