//! `tollgate import`: restore an export into a data directory that holds no store.
//!
//! Two passes over the file. The first checks all of it and touches nothing: the header, every
//! record (decoded as a load decodes it: each is encoded into its store bytes and decoded back),
//! no record twice, and the end line's counts and checksum. Only then is the directory touched:
//! a marker file says an import is under way (a store is refused while it is there, so a half
//! import never serves as a smaller ledger), the second pass writes the records in batches,
//! with the tally, then flushes, writes the watermark, loads the result back as a start does,
//! and removes the marker.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use super::export_format::{Counts, End, Line, MAX_LINE_BYTES};
use super::{watermark, Record, Store, StoreError, SLED_FILE};

/// The marker of an import under way, in the data directory.
pub const MARKER: &str = "import-in-progress";
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
    /// Writing the store failed.
    #[error("import: {0} (the directory keeps its {MARKER} marker, so no server starts on a half import; run the import again with --replace)")]
    Store(#[from] StoreError),
}

/// What an import restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportSummary {
    /// The records, by kind.
    pub counts: Counts,
}

/// Restore the export `file` into `dir` (created if missing). `replace`: delete a store that
/// `dir` holds first (refused while a server has it open).
pub fn import(file: &Path, dir: &Path, replace: bool) -> Result<ImportSummary, ImportError> {
    let counts = read_export(file, |_, _| Ok(()))?;
    clear(dir, replace)?;
    let marker = dir.join(MARKER);
    File::create(&marker)?.sync_all()?;
    File::open(dir)?.sync_all()?;

    let store = Store::open_during_import(dir)?;
    store.load()?;
    let mut pending = BTreeMap::new();
    let written = read_export(file, |key, value| {
        pending.insert(key, Some(value));
        if pending.len() >= BATCH_RECORDS {
            store.write(std::mem::take(&mut pending))?;
        }
        Ok(())
    })?;
    store.write(pending)?;
    store.flush()?;
    store.sync_watermark(true)?;
    drop(store);

    // Load it back as a start would: what serve will see.
    let store = Store::open_during_import(dir)?;
    let loaded = store.load()?;
    let records = loaded.scopes.len() + loaded.reservations.len() + loaded.assignments.len();
    if written != counts || records as u64 != counts.records {
        return Err(StoreError::Failed(format!(
            "{records} records load back, where the file holds {}",
            counts.records
        ))
        .into());
    }
    drop(store);
    std::fs::remove_file(&marker)?;
    File::open(dir)?.sync_all()?;
    Ok(ImportSummary { counts })
}

/// The names of a store's files in its directory: sled's, the watermark, the import marker.
fn store_file(name: &str) -> bool {
    super::is_sled_file(name) || name == MARKER || name.starts_with(watermark::FILE_NAME)
}

/// Make sure `dir` exists and holds no store; with `replace`, delete the one it holds.
fn clear(dir: &Path, replace: bool) -> Result<(), ImportError> {
    std::fs::create_dir_all(dir)?;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(name) = name.to_str().filter(|n| store_file(n)) {
            found.push(name.to_string());
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    found.sort();
    if !replace {
        return Err(ImportError::NotEmpty(dir.to_path_buf(), found.join(", ")));
    }
    // sled holds an exclusive lock on its data file while it is open: the same lock, taken
    // here, proves no server is using the store about to be deleted.
    let data = dir.join(SLED_FILE);
    let _lock = match File::open(&data) {
        Ok(f) => {
            fs2::FileExt::try_lock_exclusive(&f).map_err(|e| {
                io::Error::other(format!(
                    "{} is in use (a server is running on it?): {e}",
                    data.display()
                ))
            })?;
            Some(f)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    for name in found {
        let path = dir.join(&name);
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Read and check the export `file`, handing each record's store key and value to `sink`;
/// the counts, once the end line has checked out.
fn read_export(
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
