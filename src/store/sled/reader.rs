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
//!
//! The batch log (`log.rs`): records written but not yet moved to their own keys are in log
//! entries, which sort after every record. The reader reads the entries there at its start
//! (bounded, like the log) and lays their records over the records' own keys, range by range;
//! entries written or removed while it runs are not its business (the checkpoints that remove
//! them write their records to their own keys, which the reader's copy-on-write covers).

use std::collections::BTreeMap;
use std::ops::Bound;

use sled::IVec;

use super::{decode_tally, log, verify, SledStore, TALLY_KEY};
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
    /// The records of the log entries there at the start (see `log.rs`), each record's last
    /// value: they override what the records' own keys held.
    log: BTreeMap<IVec, Option<IVec>>,
    /// What was read so far as it is stored (the log entries, then the records under their own
    /// keys), summed up: at the end, the tally of the start.
    found: Tally,
    done: bool,
}

/// A chunk of a read: the records under their own keys as of the start, in `(lower, upper]`.
type Chunk = (Vec<(IVec, IVec)>, Bound<Vec<u8>>, Bound<Vec<u8>>);

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
        // The log as of the start: the writer appends to it (and removes from it) only under
        // the state lock, held here.
        let entries = self
            .db()
            .scan_prefix([log::PREFIX])
            .collect::<Result<Vec<_>, _>>()?;
        let mut found = Tally::default();
        for (key, value) in &entries {
            found.add(key, value);
        }
        let log = log::replay(entries.iter().map(|(k, v)| (k.as_ref(), v.as_ref())))?;
        state.tap.session = Some(Session {
            cursor: None,
            preserved: BTreeMap::new(),
            overflowed: false,
            finished: false,
        });
        Ok(ConsistentReader {
            store: self.clone(),
            start,
            log,
            found,
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

    /// The next records under their own keys as of the start, in key order, at most `max` read
    /// from sled (a few more may come from kept values), and the key range they cover; `None`
    /// when every record has been returned.
    fn chunk(&mut self, max: usize) -> Result<Option<Chunk>, StoreError> {
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
        // Records only: the log sorts after them, and was read at the start.
        let mut range = self
            .store
            .db()
            .range::<Vec<u8>, _>((lower.clone(), Bound::Excluded(vec![log::PREFIX])));
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
            .range::<Vec<u8>, _>((lower.clone(), upper.clone()))
            .map(|(k, _)| k.clone())
            .collect();
        for key in kept {
            if let Some(Some(value)) = session.preserved.remove(&key) {
                chunk.push((IVec::from(key), value));
            }
        }
        if exhausted {
            self.done = true;
            session.finished = true;
            session.preserved.clear();
        } else {
            session.cursor = last.map(|k| k.to_vec());
        }
        Ok(Some((chunk, lower, upper)))
    }
}

impl RecordReader for ConsistentReader {
    fn batch(&self) -> Option<u64> {
        self.start.map(|t| t.batch)
    }

    fn next_chunk(&mut self, max: usize) -> Result<Option<Vec<RecordBytes>>, StoreError> {
        let Some((stored, lower, upper)) = self.chunk(max)? else {
            self.check()?;
            return Ok(None);
        };
        let mut records = BTreeMap::new();
        for (key, value) in stored {
            self.found.add(&key, &value);
            records.insert(key.to_vec(), value.to_vec());
        }
        // The log's records in the same key range replace (or remove) them.
        for (key, value) in self.log.range::<[u8], _>((
            lower.as_ref().map(Vec::as_slice),
            upper.as_ref().map(Vec::as_slice),
        )) {
            match value {
                Some(v) => records.insert(key.to_vec(), v.to_vec()),
                None => records.remove(key.as_ref()),
            };
        }
        Ok(Some(records.into_iter().collect()))
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

    /// Write `records` to the store and to the `model` of what it holds.
    fn write_both(
        store: &SledStore,
        model: &mut BTreeMap<Vec<u8>, Vec<u8>>,
        records: &[(Vec<u8>, Option<&str>)],
    ) {
        write(store, records);
        let last: BTreeMap<_, _> = records.iter().cloned().collect();
        for (k, v) in last {
            match v {
                Some(v) => model.insert(k, v.as_bytes().to_vec()),
                None => model.remove(&k),
            };
        }
    }

    /// One checkpoint step (see `log.rs`), due or not.
    fn checkpoint_step(store: &SledStore) {
        let mut state = store.state().unwrap();
        store.step(&mut state).unwrap();
    }

    /// A read returns the records as of its start, whether they were in the log or under their
    /// own keys then, whatever is written, checkpointed and removed while it runs; and it checks
    /// itself against the tally of its start (a chunk that fails to would fail the read).
    #[test]
    fn a_read_returns_the_records_as_of_its_start_whatever_is_written_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), Recovery::Refuse).unwrap();
        store.load_checked().unwrap();
        let mut model = BTreeMap::new();
        for batch in 0..10 {
            let records: Vec<_> = (batch * 100..(batch + 1) * 100)
                .map(|i| (key(i * 2), Some("start")))
                .collect();
            write_both(&store, &mut model, &records);
            // Half the store moved to the records' own keys, half still in the log.
            if batch == 4 {
                let mut state = store.state().unwrap();
                store.checkpoint_all(&mut state).unwrap();
            }
        }
        // Some of the log's records overwrite or remove records under their own keys.
        write_both(
            &store,
            &mut model,
            &[(key(2), Some("logged")), (key(4), None)],
        );

        for pass in 0..2 {
            let expected = model.clone();
            let mut reader = store.consistent_reader().unwrap();
            assert!(matches!(
                store.consistent_reader(),
                Err(StoreError::ReadBusy)
            ));
            let mut got = BTreeMap::new();
            let mut round = 0;
            while let Some(chunk) = reader.next_chunk(37).unwrap() {
                for (k, v) in chunk {
                    assert!(got.insert(k, v).is_none(), "returned twice");
                }
                // Between chunks, as the writer would: update and remove records ahead of the
                // reader and behind it, create new ones, some between existing keys, and move
                // them to their own keys (checkpoints), removing the log's entries.
                round += 1;
                write_both(
                    &store,
                    &mut model,
                    &[
                        (key((round * 14) % 2_000), Some("updated")),
                        (key((round * 26 + 10) % 2_000), None),
                        (key((round * 38 + 1) % 2_000), Some("created")),
                        (key(1_990 - (round * 2) % 1_990), Some("updated again")),
                        (key(3_000 + round + pass * 100), Some("created after")),
                    ],
                );
                checkpoint_step(&store);
            }
            assert!(round > 20, "the read took {round} chunks");
            assert_eq!(got, expected, "pass {pass}");
        }
    }
}
