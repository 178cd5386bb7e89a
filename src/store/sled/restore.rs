//! `tollgate import` into a data directory: the directory's side of restoring an export.
//!
//! The file is checked whole first (`import.rs`); only then is the directory touched: a marker
//! file says an import is under way (a store is refused while it is there, so a half import
//! never serves as a smaller ledger), the records are written with their tally, flushed, the
//! watermark written, the result loaded back as a start does, and the marker removed.

use std::fs::File;
use std::io;
use std::path::Path;

use super::{is_sled_file, watermark, SledStore, SLED_FILE};
use crate::store::import::{check_file, restore, ImportError, ImportSummary};
use crate::store::{Store, StoreError};

/// The marker of an import under way, in the data directory.
pub const MARKER: &str = "import-in-progress";

/// Restore the export `file` into `dir` (created if missing). `replace`: delete a store that
/// `dir` holds first (refused while a server has it open).
pub fn import(file: &Path, dir: &Path, replace: bool) -> Result<ImportSummary, ImportError> {
    let counts = check_file(file)?;
    clear(dir, replace)?;
    let marker = dir.join(MARKER);
    File::create(&marker)?.sync_all()?;
    File::open(dir)?.sync_all()?;

    let store = SledStore::open_during_import(dir)?;
    store.load()?;
    let written = restore(file, &store)?;
    drop(store);

    // Load it back as a start would: what serve will see.
    let store = SledStore::open_during_import(dir)?;
    let records = store.load()?.len();
    store.close()?;
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
    is_sled_file(name) || name == MARKER || name.starts_with(watermark::FILE_NAME)
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
