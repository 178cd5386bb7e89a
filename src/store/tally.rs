//! What a store holds, summed up in three numbers: the last batch written, how many records,
//! and a digest of them. Backend-neutral: it works on records' bytes (`records.rs`).
//!
//! The digest is a multiset hash: the wrapping sum of one 64-bit hash per record, over its key
//! and its value. A record written adds its hash, a record removed subtracts it, an update does
//! both, so the writer keeps the sum current in O(1) a record; and a load, which reads every
//! record anyway, recomputes it for free. A lost, truncated or altered record changes the sum
//! (unless a 2^-64 chance), whatever the order records are read in.
//!
//! sled keeps its tally twice: inside sled, written in the same atomic batch as the records it
//! describes (so sled's own contents say what they should be), and outside sled, in the
//! watermark file, after each flush (so a sled that lost its latest batches, tally included, is
//! caught too). See `sled/verify.rs` for how they are compared; an export checks itself
//! against it too.

use xxhash_rust::xxh3::Xxh3;

/// The tally of a store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// The sequence number of the last batch written (0: none yet). Each write of the group
    /// commit is one batch, numbered from 1 up.
    pub batch: u64,
    /// Records held.
    pub records: u64,
    /// The wrapping sum of [`record_hash`] over the records held.
    pub digest: u64,
}

/// Bytes of an encoded tally.
pub const ENCODED_LEN: usize = 24;

/// Whether `key` is one of a backend's own keys (starting with `!`) rather than a record: left
/// out of the count and the digest.
pub fn is_meta(key: &[u8]) -> bool {
    key.first() == Some(&b'!')
}

/// The hash of one record. The key's length comes first, so a key and value can never be
/// mistaken for another split of the same bytes.
pub fn record_hash(key: &[u8], value: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key);
    h.update(value);
    h.digest()
}

impl Tally {
    /// Count a record in.
    pub fn add(&mut self, key: &[u8], value: &[u8]) {
        self.add_hash(record_hash(key, value));
    }

    /// Count a record out.
    pub fn remove(&mut self, key: &[u8], value: &[u8]) {
        self.remove_hash(record_hash(key, value));
    }

    /// Count in a record whose [`record_hash`] is `hash`.
    pub fn add_hash(&mut self, hash: u64) {
        self.records += 1;
        self.digest = self.digest.wrapping_add(hash);
    }

    /// Count out a record whose [`record_hash`] is `hash`.
    pub fn remove_hash(&mut self, hash: u64) {
        self.records = self.records.saturating_sub(1);
        self.digest = self.digest.wrapping_sub(hash);
    }

    /// Replace `old` (if any) with `new` (if any) under `key`.
    pub fn replace(&mut self, key: &[u8], old: Option<&[u8]>, new: Option<&[u8]>) {
        if let Some(old) = old {
            self.remove(key, old);
        }
        if let Some(new) = new {
            self.add(key, new);
        }
    }

    /// Whether the two describe the same records (whatever their batch numbers).
    pub fn same_records(&self, other: &Tally) -> bool {
        (self.records, self.digest) == (other.records, other.digest)
    }

    /// The record's bytes: batch, records, digest, each a big-endian u64.
    pub fn to_bytes(self) -> [u8; ENCODED_LEN] {
        let mut b = [0; ENCODED_LEN];
        b[..8].copy_from_slice(&self.batch.to_be_bytes());
        b[8..16].copy_from_slice(&self.records.to_be_bytes());
        b[16..].copy_from_slice(&self.digest.to_be_bytes());
        b
    }

    /// Read a tally written by [`Tally::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; ENCODED_LEN] = b.try_into().ok()?;
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Some(Self {
            batch: u64_at(0),
            records: u64_at(8),
            digest: u64_at(16),
        })
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "batch {}, {} records, digest {:016x}",
            self.batch, self.records, self.digest
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_depends_on_the_records_not_their_order() {
        let mut a = Tally::default();
        a.add(b"k1", b"v1");
        a.add(b"k2", b"v2");
        let mut b = Tally::default();
        b.add(b"k2", b"v2");
        b.add(b"k1", b"v1");
        assert!(a.same_records(&b));
        b.replace(b"k1", Some(b"v1"), Some(b"v1'"));
        assert!(!a.same_records(&b));
        b.replace(b"k1", Some(b"v1'"), Some(b"v1"));
        assert!(a.same_records(&b));
        b.replace(b"k2", Some(b"v2"), None);
        assert_eq!(b.records, 1);
        assert!(!a.same_records(&b));
        // The same bytes split differently are another record.
        assert_ne!(record_hash(b"k1v", b"1"), record_hash(b"k1", b"v1"));
    }

    #[test]
    fn a_tally_round_trips_through_its_bytes() {
        let t = Tally {
            batch: 7,
            records: 300,
            digest: 0xdead_beef_0123_4567,
        };
        assert_eq!(Tally::from_bytes(&t.to_bytes()), Some(t));
        assert_eq!(Tally::from_bytes(&t.to_bytes()[..23]), None);
    }
}
