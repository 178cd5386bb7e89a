//! `--accept-data-loss` on a store sled itself cannot read (its log cut under a snapshot that
//! points into it, a damaged page, a record that does not decode): move sled's files aside,
//! keep every record that can still be read, and start a new sled with them.
//!
//! Why not stop at the refusal: the flag promises to start, and an operator who chose it wants
//! the service back with as much as can be had. Why move the files rather than delete them:
//! they may hold more than sled can read today; they are the operator's to inspect or discard.
//! The watermark stays where it is, so the start that follows reports what was found against
//! what was expected, as for any accepted loss.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{is_sled_file, log, watermark};
use crate::store::tally::is_meta;
use crate::store::{Record, StoreError};

/// Whether every record (and log entry) of `db` can be read and decoded.
pub fn readable(db: &sled::Db) -> Result<(), StoreError> {
    for item in db.iter() {
        let (key, value) = item?;
        decodes(&key, &value)?;
    }
    Ok(())
}

/// Whether a key and value of sled decode: a record, a log entry whose records do, or one of
/// the store's own keys.
fn decodes(key: &[u8], value: &[u8]) -> Result<(), StoreError> {
    if log::is_entry(key) {
        for (key, value) in log::replay([(key, value)])? {
            if let Some(value) = value {
                Record::decode(&key, &value)?;
            }
        }
    } else if !is_meta(key) {
        Record::decode(key, value)?;
    }
    Ok(())
}

/// What could be read of the sled in `from`: per kind of record (and the log), forward until
/// the first error, then backward until the first error (a damaged stretch loses only itself).
fn readable_records(from: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut found = BTreeMap::new();
    let Ok(db) = sled::Config::new().path(from).open() else {
        return found;
    };
    for kind in [b's', b'g', b'i', b'G', b'r', b'a', log::PREFIX] {
        let mut keep = |item: sled::Result<(sled::IVec, sled::IVec)>| match item {
            Ok((k, v)) => {
                if decodes(&k, &v).is_ok() {
                    found.insert(k.to_vec(), v.to_vec());
                }
                true
            }
            Err(_) => false,
        };
        let forward = db.scan_prefix([kind]).all(&mut keep);
        if !forward {
            let _ = db.scan_prefix([kind]).rev().all(&mut keep);
        }
    }
    found
}

/// Move sled's files out of `dir` into a new `damaged-<unix seconds>` directory beside them,
/// open a new sled in `dir` holding what could be read of them, and say so in the log.
pub fn rebuild(dir: &Path, why: &StoreError) -> Result<sled::Db, StoreError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside: PathBuf = dir.join(format!("damaged-{secs}"));
    std::fs::create_dir_all(&aside)?;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if name.to_str().is_some_and(is_sled_file) {
            std::fs::rename(dir.join(&name), aside.join(&name))?;
        }
    }
    let records = readable_records(&aside);
    let db = super::open_sled(dir)?;
    let mut batch = sled::Batch::default();
    for (k, v) in &records {
        batch.insert(k.as_slice(), v.as_slice());
    }
    db.apply_batch(batch)?;
    db.flush()?;
    tracing::error!(
        error = %why,
        moved_to = %aside.display(),
        salvaged = records.len(),
        watermark = ?watermark::read(dir)?,
        "DATA LOSS ACCEPTED (--accept-data-loss): sled cannot read its files; they were moved aside and the records still readable copied into a new store"
    );
    Ok(db)
}
