//! One atomic write: the records a group of decisions changed, each key once, with its last
//! value, encoded one after another in one buffer.
//!
//! Why coalesce before encoding: every decision writes the fleet's scope, and a Reserve and
//! its Commit often fall in the same group; only the last state of a key is ever read back, so
//! a group of a thousand decisions writes the fleet once, not a thousand times, and encodes it
//! once. Why one buffer: a group's records cost no allocation each, and a backend that logs
//! whole batches (sled's batch log) stores the buffer as it is.
//!
//! Layout, record after record: the key's length (u32, little-endian), the key, the value's
//! length (u32, little-endian; `u32::MAX`: the record is removed), the value.

use std::collections::HashMap;

use super::records::{self, corrupt, RecordKey};
use super::StoreError;
use crate::engine::Mutation;

const REMOVED: u32 = u32::MAX;

/// Encoded records, each key at most once; see the module documentation.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    bytes: Vec<u8>,
    records: usize,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records in the batch.
    pub fn len(&self) -> usize {
        self.records
    }

    /// Whether it holds no record.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// The encoded records (see the module documentation).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Read a batch from its bytes, checking its framing: [`StoreError::Corrupt`] (naming
    /// `key`, the key it was stored under) if they are not a batch.
    pub fn from_bytes(bytes: &[u8], key: &[u8]) -> Result<Self, StoreError> {
        let mut records = 0;
        let mut rest = bytes;
        while !rest.is_empty() {
            rest = next(rest)
                .ok_or_else(|| corrupt(key, "a batch's records are cut short"))?
                .1;
            records += 1;
        }
        Ok(Self {
            bytes: bytes.to_vec(),
            records,
        })
    }

    /// Append a record (its key must not be in the batch yet).
    pub fn push(&mut self, key: &[u8], value: Option<&[u8]>) {
        self.bytes
            .extend_from_slice(&len_u32(key.len()).to_le_bytes());
        self.bytes.extend_from_slice(key);
        match value {
            Some(v) => {
                self.bytes
                    .extend_from_slice(&len_u32(v.len()).to_le_bytes());
                self.bytes.extend_from_slice(v);
            }
            None => self.bytes.extend_from_slice(&REMOVED.to_le_bytes()),
        }
        self.records += 1;
    }

    /// Append the record `m` writes, encoded in place.
    fn push_mutation(&mut self, m: &Mutation) {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&[0; 4]);
        records::encode_key(m, &mut self.bytes);
        let key_len = len_u32(self.bytes.len() - at - 4);
        self.bytes[at..at + 4].copy_from_slice(&key_len.to_le_bytes());
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&[0; 4]);
        let value_len = if records::encode_value(m, &mut self.bytes) {
            len_u32(self.bytes.len() - at - 4)
        } else {
            REMOVED
        };
        self.bytes[at..at + 4].copy_from_slice(&value_len.to_le_bytes());
        self.records += 1;
    }

    /// The records: key, and value (none: removed).
    pub fn records(&self) -> Records<'_> {
        Records { rest: &self.bytes }
    }

    /// The encoded records cut into parts of at most `max` bytes (a longer record alone in
    /// its part), each a batch's bytes of its own: what a backend stores as several values.
    pub fn parts(&self, max: usize) -> Vec<&[u8]> {
        let mut parts = Vec::new();
        let (mut start, mut at) = (0, 0);
        let mut rest = self.bytes.as_slice();
        while let Some((_, after)) = next(rest) {
            let end = self.bytes.len() - after.len();
            if end - start > max && at > start {
                parts.push(&self.bytes[start..at]);
                start = at;
            }
            at = end;
            rest = after;
        }
        if at > start {
            parts.push(&self.bytes[start..at]);
        }
        parts
    }
}

/// A record's length as stored. Records are bounded far below 4 GiB (a request is at most a
/// few MiB), so a longer one is a programming error.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len)
        .ok()
        .filter(|&l| l != REMOVED)
        .expect("a record is shorter than 4 GiB")
}

/// A record in a batch: its key, and its value (none: removed).
pub type Entry<'a> = (&'a [u8], Option<&'a [u8]>);

/// The first record of `bytes` and what follows it; `None` if it is cut short.
fn next(bytes: &[u8]) -> Option<(Entry<'_>, &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<4>()?;
    let (key, rest) = rest.split_at_checked(u32::from_le_bytes(*len) as usize)?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    match u32::from_le_bytes(*len) {
        REMOVED => Some(((key, None), rest)),
        len => {
            let (value, rest) = rest.split_at_checked(len as usize)?;
            Some(((key, Some(value)), rest))
        }
    }
}

/// The records of a [`Batch`].
#[derive(Debug, Clone)]
pub struct Records<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Records<'a> {
    type Item = Entry<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        // A batch's framing is checked when it is built or read, so it never ends early here.
        let (entry, rest) = next(self.rest)?;
        self.rest = rest;
        Some(entry)
    }
}

/// Mutations waiting to be written, each record's last one only.
#[derive(Debug, Default)]
pub struct Coalesced {
    last: HashMap<RecordKey, Mutation>,
}

impl Coalesced {
    /// Take mutations in, in decision order: a later one of a record replaces an earlier one.
    pub fn add(&mut self, mutations: impl IntoIterator<Item = Mutation>) {
        for m in mutations {
            self.last.insert(RecordKey::of(&m), m);
        }
    }

    /// The batch of everything waiting (each record once), leaving nothing waiting.
    pub fn take(&mut self) -> Batch {
        let mut batch = Batch::new();
        for (_, m) in self.last.drain() {
            batch.push_mutation(&m);
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::{ScopeKey, ScopeState};
    use crate::store::Record;

    fn scope(key: ScopeKey, requests: u64) -> Mutation {
        let mut state = ScopeState::default();
        state.day_requests.add(1, requests);
        Mutation::Scope {
            key,
            state: Some(state),
        }
    }

    #[test]
    fn a_record_written_many_times_in_a_group_is_written_once_with_its_last_value() {
        let alice = ScopeKey::Subject(Arc::from("alice"));
        let mut c = Coalesced::default();
        c.add((1..=1_000).map(|n| scope(ScopeKey::Global, n)));
        c.add([scope(alice.clone(), 7)]);
        c.add([Mutation::Scope {
            key: ScopeKey::Ip("192.0.2.1".parse().unwrap()),
            state: None,
        }]);
        let batch = c.take();
        assert!(c.take().is_empty());
        assert_eq!(batch.len(), 3);
        let mut fleet = None;
        for (key, value) in batch.records() {
            match value {
                Some(v) => match Record::decode(key, v).unwrap() {
                    Record::Scope(ScopeKey::Global, s) => fleet = Some(s),
                    Record::Scope(k, s) => {
                        assert_eq!((k, s.day_requests.get(1)), (alice.clone(), 7))
                    }
                    other => panic!("{other:?}"),
                },
                None => assert_eq!(key, b"i192.0.2.1"),
            }
        }
        assert_eq!(fleet.unwrap().day_requests.get(1), 1_000);
        // The bytes read back as the same batch; cut short, they are refused.
        let again = Batch::from_bytes(batch.bytes(), b"k").unwrap();
        assert_eq!(
            again.records().collect::<Vec<_>>(),
            batch.records().collect::<Vec<_>>()
        );
        // Cut into parts at record boundaries, each a batch of its own.
        for max in [1, 40, 1 << 20] {
            let parts = batch.parts(max);
            let mut again = Vec::new();
            for part in &parts {
                assert!(part.len() <= max || Batch::from_bytes(part, b"k").unwrap().len() == 1);
                again.extend(
                    Batch::from_bytes(part, b"k")
                        .unwrap()
                        .records()
                        .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec))),
                );
            }
            let whole: Vec<_> = batch
                .records()
                .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
                .collect();
            assert_eq!(again, whole, "parts of at most {max} bytes");
            match max {
                1 => assert_eq!(parts.len(), 3),
                40 => assert!(parts.len() > 1),
                _ => assert_eq!(parts, vec![batch.bytes()]),
            }
        }
        let cut = &batch.bytes()[..batch.bytes().len() - 1];
        assert!(matches!(
            Batch::from_bytes(cut, b"k"),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
