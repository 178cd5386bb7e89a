//! `tollgate import`: reading an export and restoring it into a [`Store`] that holds nothing.
//!
//! Two passes over the file. The first ([`check_file`]) checks all of it and touches nothing:
//! the header, every record (decoded as a load decodes it: each is encoded into its store bytes
//! and decoded back), no record twice, and the end line's counts and checksum. Only then does
//! the second ([`restore`]) write the records, in batches. What a backend does around the two
//! (sled: a marker file while the directory is half written, loading the result back) is in
//! its folder (`sled/restore.rs`).

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use super::export_format::{Counts, End, Line, MAX_LINE_BYTES};
use super::{Batch, Record, Store, StoreError};

/// Records written per batch.
const BATCH_RECORDS: usize = 4_096;

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Reading the file, or the directory, failed.
    #[error("import: {0}")]
    Io(#[from] io::Error),
    /// The file is not an export this build can restore, or is damaged.
    #[error("import: {file}: line {line}: {reason}; nothing was imported")]
    Refused {
        /// The file.
        file: PathBuf,
        /// The line (1-based).
        line: u64,
        /// Why.
        reason: String,
    },
    /// The directory already holds a store.
    #[error("import: {0} already holds a tollgate store ({1}); import restores into an empty directory (stop any server on it and pass --replace to delete that store first)")]
    NotEmpty(PathBuf, String),
    /// The database already holds records.
    #[error("import: {0} already holds {1} tollgate records; import restores into a store with none (pass --replace to delete them first)")]
    NotEmptyDatabase(String, i64),
    /// Writing the store failed.
    #[error("import: {0} (the directory keeps its import-in-progress marker, so no server starts on a half import; run the import again with --replace)")]
    Store(#[from] StoreError),
}

/// What an import restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportSummary {
    /// The records, by kind.
    pub counts: Counts,
}

/// Check the export `file` whole, touching nothing: what it holds.
pub fn check_file(file: &Path) -> Result<Counts, ImportError> {
    read_export(file, |_, _| Ok(()))
}

/// Write the records of the export `file` (checked by [`check_file`]) into `store`, which
/// holds nothing and has been loaded, in batches, then flush and close it: what was written.
pub fn restore(file: &Path, store: &dyn Store) -> Result<Counts, ImportError> {
    let mut batch = Batch::new();
    let written = read_export(file, |key, value| {
        batch.push(&key, Some(&value));
        if batch.len() >= BATCH_RECORDS {
            store.write(&std::mem::take(&mut batch))?;
            store.maintain()?;
        }
        Ok(())
    })?;
    store.write(&batch)?;
    store.flush()?;
    store.close()?;
    Ok(written)
}

/// Read and check the export `file`, handing each record's store key and value to `sink`;
/// the counts, once the end line has checked out.
pub(crate) fn read_export(
    file: &Path,
    mut sink: impl FnMut(Vec<u8>, Vec<u8>) -> Result<(), StoreError>,
) -> Result<Counts, ImportError> {
    let mut input = BufReader::new(File::open(file)?);
    let refused = |line: u64, reason: String| ImportError::Refused {
        file: file.to_path_buf(),
        line,
        reason,
    };
    let mut hash = Xxh3::new();
    let mut counts = Counts::default();
    let mut keys = HashSet::new();
    let mut buf = Vec::new();
    let mut number = 0u64;
    loop {
        buf.clear();
        let n = (&mut input)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)?;
        number += 1;
        if n == 0 {
            return Err(refused(
                number,
                "the file ends before its end line: it was cut short".into(),
            ));
        }
        if buf.len() > MAX_LINE_BYTES {
            return Err(refused(
                number,
                format!("longer than {MAX_LINE_BYTES} bytes"),
            ));
        }
        if buf.last() != Some(&b'\n') {
            return Err(refused(
                number,
                "the line is cut short (no newline): the file was truncated".into(),
            ));
        }
        let line: Line = Line::parse(&buf[..buf.len() - 1])
            .map_err(|e| refused(number, format!("not a line of an export: {e}")))?;
        match line {
            Line::Header(h) if number == 1 => {
                if let Some(why) = h.refusal() {
                    return Err(refused(number, why));
                }
            }
            _ if number == 1 => {
                return Err(refused(
                    number,
                    "the first line is not an export header: not a tollgate export".into(),
                ))
            }
            Line::End(end) => {
                check_end(&end, counts, hash.digest()).map_err(|why| refused(number, why))?;
                let mut rest = [0u8; 1];
                if input.read(&mut rest)? != 0 {
                    return Err(refused(number + 1, "data after the end line".into()));
                }
                return Ok(counts);
            }
            line => {
                let record = line.into_record().map_err(|why| refused(number, why))?;
                counts.add(&record);
                let (key, value) = record.encode();
                // What a load would read back: decoding the store bytes is load's own check.
                Record::decode(&key, &value).map_err(|e| refused(number, e.to_string()))?;
                if !keys.insert(xxh3_128(&key)) {
                    return Err(refused(
                        number,
                        format!(
                            "a second record for key {:?}",
                            String::from_utf8_lossy(&key)
                        ),
                    ));
                }
                sink(key, value)?;
            }
        }
        hash.update(&buf);
    }
}

fn check_end(end: &End, counts: Counts, sum: u64) -> Result<(), String> {
    if end.counts() != counts {
        return Err(format!(
            "the end line counts {} records ({} scopes, {} reservations, {} assignments), the file holds {} ({}, {}, {}): records are missing or were added",
            end.records, end.scopes, end.reservations, end.assignments,
            counts.records, counts.scopes, counts.reservations, counts.assignments
        ));
    }
    let expected = End::new(counts, sum).checksum;
    if end.checksum != expected {
        return Err(format!(
            "checksum {} does not match the file's ({expected}): the file was altered or damaged",
            end.checksum
        ));
    }
    Ok(())
}
