//! A consistent read of every record while the writer keeps writing: what an export taken from
//! a serving tollgate needs.
//!
//! sled 0.34 has no snapshots (an iterator sees writes made while it runs), and stopping the
//! writer for the whole read would stall every strict answer for seconds. So the reader takes
//! a copy-on-write snapshot: when it starts, between two batches, the state is fixed at that
//! batch; from then on the writer, before it overwrites or removes a record the reader has not
//! reached yet (keys are read in order, so "not reached" is "above the cursor"), keeps the
//! record's value as it was (its pre-image: the writer reads it anyway, for the tally). The
//! reader reads sled in chunks, in key order, and where a record was kept, takes the kept value
//! (or skips it: a record created since the start). Each chunk and each write hold the store's
//! state lock, so a chunk never sees half a batch, and a chunk's read (a few hundred records)
//! delays the writer by a fraction of a millisecond.
//!
//! Memory: one pre-image per record written ahead of the cursor during the read, each freed
//! when the cursor passes it, at most [`MAX_PRESERVED`]; past that, the read fails rather than
//! grow (a store rewritten faster than it is read). The reader also checks itself: the records
//! it returned must add up to the tally of its starting batch, and, for a stopped store (not
//! loaded by a server), pass the start-up check against the watermark.

use std::collections::BTreeMap;
use std::ops::Bound;

use sled::IVec;

use super::{decode_tally, verify, SledStore, TALLY_KEY};
use crate::store::tally::{is_meta, Tally};
use crate::store::{RecordBytes, RecordReader, StoreError};

/// Pre-images kept for a reader at most.
pub const MAX_PRESERVED: usize = 1 << 20;

/// The writer's side: what a running reader needs kept. At most one reader at a time.
#[derive(Debug, Default)]
pub(super) struct Tap {
    session: Option<Session>,
}

#[derive(Debug)]
struct Session {
    /// The last key returned; records at or below it are done.
    cursor: Option<Vec<u8>>,
    /// Values as of the start, of records written since, above the cursor (None: did not
    /// exist).
    preserved: BTreeMap<Vec<u8>, Option<IVec>>,
    /// More than [`MAX_PRESERVED`] were needed.
    overflowed: bool,
    /// Every record has been returned: nothing more to keep.
    finished: bool,
}

impl Tap {
    /// The writer is about to replace `old` under `key`: keep it if a reader still needs it.
    pub(super) fn preserve(&mut self, key: &[u8], old: Option<&IVec>) {
        let Some(s) = &mut self.session else {
            return;
        };
        if s.overflowed
            || s.finished
            || s.cursor.as_deref().is_some_and(|c| key <= c)
            || s.preserved.contains_key(key)
        {
            return;
        }
        if s.preserved.len() >= MAX_PRESERVED {
            s.overflowed = true;
            s.preserved.clear();
            return;
        }
        s.preserved.insert(key.to_vec(), old.cloned());
    }
}

/// Reads every record of a store as of one batch, in key order, in chunks.
pub struct ConsistentReader {
    store: SledStore,
    start: Option<Tally>,
    /// What was returned so far, summed up.
    found: Tally,
    done: bool,
}

impl std::fmt::Debug for ConsistentReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsistentReader")
            .field("start", &self.start)
            .field("done", &self.done)
            .finish()
    }
}

impl SledStore {
    /// Start a consistent read of every record, as of the last batch written. One at a time:
    /// [`StoreError::ReadBusy`] while another runs.
    pub fn consistent_reader(&self) -> Result<ConsistentReader, StoreError> {
        let mut state = self.state()?;
        if state.tap.session.is_some() {
            return Err(StoreError::ReadBusy);
        }
        let start = self
            .db()
            .get(TALLY_KEY)?
            .map(|v| decode_tally(&v))
            .transpose()?;
        state.tap.session = Some(Session {
            cursor: None,
            preserved: BTreeMap::new(),
            overflowed: false,
            finished: false,
        });
        Ok(ConsistentReader {
            store: self.clone(),
            start,
            found: Tally::default(),
            done: false,
        })
    }
}

impl ConsistentReader {
    /// The tally of the batch the read is as of (none: a store written before tallies).
    pub fn start(&self) -> Option<Tally> {
        self.start
    }

    /// Every record has been returned: check that they are the store as of the start.
    fn check(&self) -> Result<(), StoreError> {
        let state = self.store.state()?;
        if !state.loaded {
            // A stopped store: what was read must pass the start-up check.
            verify::check(&self.store.evidence(self.found, self.start))?;
            return Ok(());
        }
        match self.start {
            Some(start) if !self.found.same_records(&start) => Err(StoreError::ReadInconsistent {
                found: format!(
                    "{} records, digest {:016x}",
                    self.found.records, self.found.digest
                ),
                expected: start.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// The next records in key order, at most `max` read from sled (a few more may come from
    /// kept values); `None` when every record has been returned.
    fn chunk(&mut self, max: usize) -> Result<Option<Vec<(IVec, IVec)>>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let mut state = self.store.state()?;
        let session = state
            .tap
            .session
            .as_mut()
            .expect("a reader's session lives as long as the reader");
        if session.overflowed {
            return Err(StoreError::ReadOverflow(MAX_PRESERVED));
        }
        let lower = match &session.cursor {
            Some(c) => Bound::Excluded(c.clone()),
            None => Bound::Unbounded,
        };
        let mut chunk = Vec::new();
        let mut read = 0;
        let mut last = None;
        let mut range = self
            .store
            .db()
            .range::<Vec<u8>, _>((lower.clone(), Bound::Unbounded));
        while read < max {
            let Some(item) = range.next() else {
                break;
            };
            let (key, value) = item?;
            if is_meta(&key) {
                continue;
            }
            read += 1;
            if !session.preserved.contains_key(key.as_ref()) {
                chunk.push((key.clone(), value));
            }
            last = Some(key);
        }
        let exhausted = read < max;
        let upper = match (&last, exhausted) {
            (Some(k), false) => Bound::Included(k.to_vec()),
            _ => Bound::Unbounded,
        };
        let kept: Vec<Vec<u8>> = session
            .preserved
            .range::<Vec<u8>, _>((lower, upper))
            .map(|(k, _)| k.clone())
            .collect();
        for key in kept {
            if let Some(Some(value)) = session.preserved.remove(&key) {
                chunk.push((IVec::from(key), value));
            }
        }
        chunk.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if exhausted {
            self.done = true;
            session.finished = true;
            session.preserved.clear();
        } else {
            session.cursor = last.map(|k| k.to_vec());
        }
        Ok(Some(chunk))
    }
}

impl RecordReader for ConsistentReader {
    fn batch(&self) -> Option<u64> {
        self.start.map(|t| t.batch)
    }

    fn next_chunk(&mut self, max: usize) -> Result<Option<Vec<RecordBytes>>, StoreError> {
        match self.chunk(max)? {
            Some(chunk) => Ok(Some(
                chunk
                    .into_iter()
                    .map(|(k, v)| {
                        self.found.add(&k, &v);
                        (k.to_vec(), v.to_vec())
                    })
                    .collect(),
            )),
            None => {
                self.check()?;
                Ok(None)
            }
        }
    }
}

impl Drop for ConsistentReader {
    fn drop(&mut self) {
        if let Ok(mut state) = self.store.state() {
            state.tap.session = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::{Batch, Recovery};

    fn key(i: usize) -> Vec<u8> {
        format!("s{i:05}").into_bytes()
    }

    fn write(store: &SledStore, records: &[(Vec<u8>, Option<&str>)]) {
        // Each key once (the last write of it), as the writer's batches are.
        let last: BTreeMap<_, _> = records.iter().cloned().collect();
        let mut batch = Batch::new();
        for (k, v) in &last {
            batch.push(k, v.map(str::as_bytes));
        }
        store.write_batch(&batch).unwrap();
    }

    #[test]
    fn a_read_returns_the_records_as_of_its_start_whatever_is_written_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), Recovery::Refuse).unwrap();
        store.load_checked().unwrap();
        let mut expected = BTreeMap::new();
        for batch in 0..10 {
            let records: Vec<_> = (batch * 100..(batch + 1) * 100)
                .map(|i| (key(i * 2), Some("start")))
                .collect();
            write(&store, &records);
            for (k, v) in records {
                expected.insert(k, v.unwrap().as_bytes().to_vec());
            }
        }

        let mut reader = store.consistent_reader().unwrap();
        assert!(matches!(
            store.consistent_reader(),
            Err(StoreError::ReadBusy)
        ));
        let mut got = BTreeMap::new();
        let mut round = 0;
        while let Some(chunk) = reader.next_chunk(37).unwrap() {
            for (k, v) in chunk {
                assert!(
                    got.insert(k.to_vec(), v.to_vec()).is_none(),
                    "returned twice"
                );
            }
            // Between chunks, as the writer would: update and remove records ahead of the
            // reader and behind it, and create new ones, some between existing keys.
            round += 1;
            write(
                &store,
                &[
                    (key((round * 14) % 2_000), Some("updated")),
                    (key((round * 26 + 10) % 2_000), None),
                    (key((round * 38 + 1) % 2_000), Some("created")),
                    (key(1_990 - (round * 2) % 1_990), Some("updated again")),
                    (key(3_000 + round), Some("created after")),
                ],
            );
        }
        assert!(round > 20, "the read took {round} chunks");
        assert_eq!(got, expected);
        let start = reader.start().unwrap();
        let mut tally = Tally::default();
        for (k, v) in &got {
            tally.add(k, v);
        }
        assert!(tally.same_records(&start));
        drop(reader);
        // The next read starts afresh, from the store as it is now.
        let mut reader = store.consistent_reader().unwrap();
        let mut now = 0;
        while let Some(chunk) = reader.next_chunk(500).unwrap() {
            now += chunk.len();
        }
        assert_eq!(now as u64, reader.start().unwrap().records);
        assert_ne!(now, got.len());
    }
}
