//! The high-water mark: the [`Tally`] of the last batch known durable, kept outside sled, in
//! `<data dir>/watermark`, so that a sled that lost acknowledged batches is refused at start.
//!
//! Why a file outside sled: what sled loses, it loses silently (sled 0.34 recovers a truncated
//! or damaged log by stopping at the damage, and starts on what it has), so sled cannot be the
//! witness of its own losses. Why it can never cause a false refusal after a crash: it is
//! written only after sled's flush and `fdatasync` have returned, so the batch it names is
//! always on disk in sled; a crash between the two leaves the mark behind sled, never ahead.
//!
//! Why two fixed slots with a checksum each, written alternately in place, rather than a new
//! file renamed over the old one each time: an in-place `pwrite` of 64 bytes costs a system
//! call and no metadata change, and a torn write (a power cut inside it) spoils one slot while
//! the other still holds the mark before it, which is behind sled too, so still safe. A file
//! renamed into place would cost a directory sync per batch to be as safe. The file is created
//! (and rewritten, when an operator accepts a loss) atomically: written to a temporary file,
//! synced, renamed, and the directory synced.
//!
//! Why it is written after every flush but synced only once a second (and at shutdown): an
//! `fdatasync` of its own per batch would double the cost of the group commit. Until the sync,
//! the mark lives in the page cache: it survives `kill -9` and a crash of tollgate, and after a
//! power cut it is at most a second behind, which only narrows what the check can see, never
//! refuses a good store.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::store::tally::{Tally, ENCODED_LEN};

/// The file's name in the data directory.
pub const FILE_NAME: &str = "watermark";
/// How often, at most, the mark is synced to disk.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

const MAGIC: &[u8; 8] = b"TGWMARK1";
const SLOT_LEN: usize = 64;
const FILE_LEN: usize = 2 * SLOT_LEN;
const CHECKED_LEN: usize = SLOT_LEN - 8;

/// What the data directory's watermark says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mark {
    /// No watermark file.
    Missing,
    /// The newest valid slot.
    Found(Tally),
    /// A file that is not a watermark, or whose slots are both damaged.
    Unreadable(String),
}

/// The watermark file's path in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Read the watermark of `dir`.
pub fn read(dir: &Path) -> io::Result<Mark> {
    let bytes = match std::fs::read(path(dir)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Mark::Missing),
        Err(e) => return Err(e),
    };
    if bytes.len() != FILE_LEN {
        return Ok(Mark::Unreadable(format!(
            "{} bytes, where a watermark has {FILE_LEN}",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(SLOT_LEN)
        .filter_map(decode_slot)
        .max_by_key(|t| t.batch)
        .map_or_else(
            || Mark::Unreadable("neither of its two slots has a valid checksum".into()),
            Mark::Found,
        ))
}

fn encode_slot(t: Tally) -> [u8; SLOT_LEN] {
    let mut slot = [0; SLOT_LEN];
    slot[..8].copy_from_slice(MAGIC);
    slot[8..8 + ENCODED_LEN].copy_from_slice(&t.to_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&slot[..CHECKED_LEN]);
    slot[CHECKED_LEN..].copy_from_slice(&sum.to_be_bytes());
    slot
}

fn decode_slot(slot: &[u8]) -> Option<Tally> {
    let sum = u64::from_be_bytes(slot[CHECKED_LEN..].try_into().ok()?);
    if &slot[..8] != MAGIC || xxhash_rust::xxh3::xxh3_64(&slot[..CHECKED_LEN]) != sum {
        return None;
    }
    Tally::from_bytes(&slot[8..8 + ENCODED_LEN])
}

/// The open watermark file of a data directory, written by the store after each flush.
#[derive(Debug)]
pub struct Watermark {
    file: File,
    /// The slot the next mark goes to (the other holds the mark before).
    next_slot: u64,
    /// The batch of the last mark written.
    marked: u64,
    /// Whether a mark was written since the last sync.
    unsynced: bool,
    last_sync: Instant,
}

impl Watermark {
    /// Write a new watermark file in `dir` holding `tally` in both slots, atomically, and keep
    /// it open for the marks that follow.
    pub fn create(dir: &Path, tally: Tally) -> io::Result<Self> {
        let tmp = dir.join(format!("{FILE_NAME}.tmp"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let slot = encode_slot(tally);
        file.write_all(&slot)?;
        file.write_all(&slot)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path(dir))?;
        File::open(dir)?.sync_all()?;
        Ok(Self {
            file,
            next_slot: 0,
            marked: tally.batch,
            unsynced: false,
            last_sync: Instant::now(),
        })
    }

    /// Record `tally`, whose batch the caller has just made durable in sled, in the slot that
    /// does not hold the last mark. Not synced: see [`Watermark::sync_if_due`].
    pub fn record(&mut self, tally: Tally) -> io::Result<()> {
        if tally.batch <= self.marked {
            return Ok(());
        }
        let offset = self.next_slot * SLOT_LEN as u64;
        self.file.write_all_at(&encode_slot(tally), offset)?;
        self.next_slot = 1 - self.next_slot;
        self.marked = tally.batch;
        self.unsynced = true;
        Ok(())
    }

    /// Sync the marks written, if [`SYNC_INTERVAL`] has passed since the last sync.
    pub fn sync_if_due(&mut self) -> io::Result<()> {
        if self.unsynced && self.last_sync.elapsed() >= SYNC_INTERVAL {
            self.sync()?;
        }
        Ok(())
    }

    /// Sync the marks written.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(batch: u64) -> Tally {
        Tally {
            batch,
            records: batch * 2,
            digest: batch * 3,
        }
    }

    #[test]
    fn the_newest_valid_slot_is_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), Mark::Missing);
        let mut w = Watermark::create(dir.path(), tally(5)).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Mark::Found(tally(5)));
        w.record(tally(6)).unwrap();
        w.record(tally(7)).unwrap();
        // An older batch never replaces a newer mark.
        w.record(tally(6)).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Mark::Found(tally(7)));
        w.sync().unwrap();
        drop(w);

        // A torn write spoils one slot: the other, older mark is read.
        let mut bytes = std::fs::read(path(dir.path())).unwrap();
        let newest = (0..2)
            .find(|i| decode_slot(&bytes[i * SLOT_LEN..(i + 1) * SLOT_LEN]) == Some(tally(7)))
            .unwrap();
        bytes[newest * SLOT_LEN + 20] ^= 0xff;
        std::fs::write(path(dir.path()), &bytes).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Mark::Found(tally(6)));

        // Both spoiled, or the wrong size: unreadable, never a mark of zero.
        bytes[(1 - newest) * SLOT_LEN + 3] ^= 0xff;
        std::fs::write(path(dir.path()), &bytes).unwrap();
        assert!(matches!(read(dir.path()).unwrap(), Mark::Unreadable(_)));
        std::fs::write(path(dir.path()), &bytes[..100]).unwrap();
        assert!(matches!(read(dir.path()).unwrap(), Mark::Unreadable(_)));
    }
}
