//! sled's batch log: a batch made durable with one sled insert, its records moved to their own
//! keys later, each once however many batches wrote it.
//!
//! Why: sled costs several µs of CPU for every record it inserts (its page cache, node updates,
//! epoch-based freeing), whatever the record's size, and a record's old value read for the
//! tally costs about a fifth of that again (BENCHMARKS.md). A group of decisions writes
//! hundreds of records; as one value it is one insert. So a write appends the whole batch to
//! the log (as one entry, or parts of at most [`ENTRY_BYTES`], all in one atomic sled batch with
//! the tally), and a checkpoint later moves the records the log holds to their own keys: each
//! record once, with its last value (the fleet's scope, which every decision writes, once per
//! checkpoint rather than once per group; a Reserve and its Commit, once), then removes the
//! entries it covers, oldest first.
//!
//! Keys: `~` + batch number (u64, big-endian) + part (u16, big-endian), after every record in
//! key order. Values: the batch's bytes (`batch.rs`). An entry is counted in the tally like a
//! record, so a lost, cut or altered entry is caught at start like a lost record.
//!
//! Why a load is right whatever instant a crash came at. A load reads the records, then the
//! entries left, oldest first, each overriding what came before. Every batch stays in the log
//! until a checkpoint has written each of its records (or a later value) to its own key, and
//! entries are removed oldest first. So for any record, the newest entry left that writes it
//! holds its last value (any later write would be in a later entry, which is still there);
//! and a record no entry left writes already has its last value under its own key. Each step,
//! a write or one chunk of a checkpoint, is one atomic sled batch with the tally, so this holds
//! after any prefix of them, which is what sled recovers.
//!
//! Bounds: a checkpoint starts once a second, or sooner when [`PENDING_SOON`] records or
//! [`ENTRIES_SOON`] entries wait; each step moves records or removes entries for at most
//! [`STEP_TIME`] (and at most [`STEP`] of them), after the writer has answered its group. Past [`PENDING_MAX`] records waiting, a
//! step goes on until fewer wait, before the writer takes its next group (so the queue fills
//! and callers wait): the records waiting, kept in memory for the checkpoint, stay bounded.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::time::{Duration, Instant};

use sled::IVec;

use super::{SledStore, State, TALLY_KEY};
use crate::store::records::corrupt;
use crate::store::tally::record_hash;
use crate::store::{Batch, StoreError, Tally};

/// The first byte of every log entry's key.
pub const PREFIX: u8 = b'~';
/// The most bytes of one entry: a larger batch is cut into parts (at record boundaries). Below
/// sled's threshold for keeping a value as a file of its own (a quarter of its 512 KiB segment).
pub const ENTRY_BYTES: usize = 64 * 1024;
/// How often a checkpoint starts, at most.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Records waiting that start a checkpoint before the interval.
pub const PENDING_SOON: usize = 16_384;
/// Entries waiting that start a checkpoint before the interval.
pub const ENTRIES_SOON: usize = 4_096;
/// Records moved, or entries removed, per checkpoint step at most.
pub const STEP: usize = 512;
/// How long one checkpoint step may go on (the time to move or remove one record more, past
/// it): what it may delay the writer's next group by.
pub const STEP_TIME: Duration = Duration::from_micros(250);
/// Records waiting past which steps go on before the next group is taken.
pub const PENDING_MAX: usize = 65_536;

/// The log as the store knows it in memory.
#[derive(Debug)]
pub(super) struct Log {
    /// Records in the log not yet moved to their own keys: the last value of each (none:
    /// removed).
    pending: BTreeMap<IVec, Option<IVec>>,
    /// The entries in sled, oldest first.
    entries: VecDeque<Entry>,
    /// The checkpoint under way.
    cut: Option<Cut>,
    /// When the last checkpoint started.
    last_cut: Instant,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            pending: BTreeMap::new(),
            entries: VecDeque::new(),
            cut: None,
            last_cut: Instant::now(),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    key: IVec,
    batch: u64,
    /// Its [`record_hash`], to count it out of the tally when it is removed.
    hash: u64,
}

/// A checkpoint under way: every record waiting is moved (in key order, after `cursor`), then
/// every entry up to batch `upto` is removed.
#[derive(Debug)]
struct Cut {
    upto: u64,
    cursor: Option<IVec>,
    records_done: bool,
}

/// An entry's key.
fn entry_key(batch: u64, part: u16) -> IVec {
    let mut key = [0u8; 11];
    key[0] = PREFIX;
    key[1..9].copy_from_slice(&batch.to_be_bytes());
    key[9..].copy_from_slice(&part.to_be_bytes());
    IVec::from(&key[..])
}

/// Whether `key` is a log entry's.
pub fn is_entry(key: &[u8]) -> bool {
    key.first() == Some(&PREFIX)
}

/// The batch number of an entry's key.
fn entry_batch(key: &[u8]) -> Result<u64, StoreError> {
    match key {
        [PREFIX, batch @ .., _, _] if batch.len() == 8 => {
            Ok(u64::from_be_bytes(batch.try_into().expect("8 bytes")))
        }
        _ => Err(corrupt(key, "a log entry's key is not 11 bytes")),
    }
}

/// The records of the log `entries` (in key order, so oldest first), each record's last
/// value: what they override at a load or a consistent read.
pub fn replay<'a>(
    entries: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<BTreeMap<IVec, Option<IVec>>, StoreError> {
    let mut last = BTreeMap::new();
    for (key, value) in entries {
        entry_batch(key)?;
        for (k, v) in Batch::from_bytes(value, key)?.records() {
            last.insert(IVec::from(k), v.map(IVec::from));
        }
    }
    Ok(last)
}

impl Log {
    /// The log a load found: `entries` in key order (so oldest first).
    pub fn restore(entries: &[(IVec, IVec)]) -> Result<Self, StoreError> {
        let mut log = Log {
            pending: replay(entries.iter().map(|(k, v)| (k.as_ref(), v.as_ref())))?,
            ..Log::default()
        };
        for (key, value) in entries {
            log.entries.push_back(Entry {
                key: key.clone(),
                batch: entry_batch(key)?,
                hash: record_hash(key, value),
            });
        }
        Ok(log)
    }

    /// The entries counted as a tally counts records (their batch left at 0).
    pub fn tally(&self) -> Tally {
        let mut t = Tally::default();
        for e in &self.entries {
            t.add_hash(e.hash);
        }
        t
    }

    /// The records waiting for a checkpoint, with their last values.
    pub fn pending(&self) -> &BTreeMap<IVec, Option<IVec>> {
        &self.pending
    }

    /// Whether a checkpoint step has work: one under way, or one due.
    fn due(&self) -> bool {
        self.cut.is_some()
            || (!self.entries.is_empty()
                && (self.last_cut.elapsed() >= INTERVAL
                    || self.pending.len() >= PENDING_SOON
                    || self.entries.len() >= ENTRIES_SOON))
    }
}

impl SledStore {
    /// Write `batch` as the log entries of the next batch number, with the tally, in one
    /// atomic sled batch (not flushed).
    pub(super) fn append(&self, state: &mut State, batch: &Batch) -> Result<(), StoreError> {
        let mut tally = state.tally;
        tally.batch += 1;
        let mut b = sled::Batch::default();
        let mut added = Vec::new();
        for (part, bytes) in batch.parts(ENTRY_BYTES).into_iter().enumerate() {
            let part = u16::try_from(part)
                .map_err(|_| StoreError::Failed("a batch of more than 65,535 parts".into()))?;
            let key = entry_key(tally.batch, part);
            let hash = record_hash(&key, bytes);
            tally.add_hash(hash);
            b.insert(key.clone(), bytes);
            added.push(Entry {
                key,
                batch: tally.batch,
                hash,
            });
        }
        b.insert(TALLY_KEY, &tally.to_bytes());
        self.db().apply_batch(b)?;
        state.tally = tally;
        state.log.entries.extend(added);
        for (key, value) in batch.records() {
            state
                .log
                .pending
                .insert(IVec::from(key), value.map(IVec::from));
        }
        Ok(())
    }

    /// Checkpoint steps: one if one is due, more while too many records wait. Whether more
    /// work waits (a checkpoint under way).
    pub(super) fn checkpoint(&self, state: &mut State) -> Result<bool, StoreError> {
        while state.log.due() {
            self.step(state)?;
            if state.log.pending.len() <= PENDING_MAX {
                break;
            }
        }
        Ok(state.log.cut.is_some())
    }

    /// Move every record waiting and remove every entry (at a clean stop).
    pub(super) fn checkpoint_all(&self, state: &mut State) -> Result<(), StoreError> {
        while !state.log.entries.is_empty() || state.log.cut.is_some() {
            self.step(state)?;
        }
        Ok(())
    }

    /// One checkpoint step, as one atomic sled batch with the tally: start a checkpoint if
    /// none is under way, then move the next records waiting to their own keys, or, once all
    /// are moved, remove the next entries it covers, oldest first (for at most [`STEP_TIME`]).
    pub(super) fn step(&self, state: &mut State) -> Result<(), StoreError> {
        let upto = state.tally.batch;
        let log = &mut state.log;
        let cut = log.cut.get_or_insert_with(|| Cut {
            upto,
            cursor: None,
            records_done: false,
        });
        if cut.cursor.is_none() && !cut.records_done {
            log.last_cut = Instant::now();
        }
        let mut tally = state.tally;
        let mut b = sled::Batch::default();
        let mut moved = Vec::new();
        let mut removed = 0;
        let started = Instant::now();
        let full = |n: usize| n >= STEP || started.elapsed() >= STEP_TIME;
        if !cut.records_done {
            let from = cut.cursor.clone().map_or(Bound::Unbounded, Bound::Excluded);
            let mut left = log.pending.range((from, Bound::Unbounded));
            while !full(moved.len()) {
                let Some((key, new)) = left.next() else {
                    cut.records_done = true;
                    break;
                };
                let old = self.db().get(key)?;
                tally.replace(key, old.as_deref(), new.as_deref());
                state.tap.preserve(key, old.as_ref());
                match new {
                    Some(v) => b.insert(key.clone(), v.clone()),
                    None => b.remove(key.clone()),
                }
                moved.push(key.clone());
            }
        } else {
            for entry in &log.entries {
                if entry.batch > cut.upto || full(removed) {
                    break;
                }
                tally.remove_hash(entry.hash);
                b.remove(entry.key.clone());
                removed += 1;
            }
        }
        tally.batch += 1;
        b.insert(TALLY_KEY, &tally.to_bytes());
        self.db().apply_batch(b)?;
        state.tally = tally;
        for key in &moved {
            log.pending.remove(key);
        }
        if let Some(last) = moved.pop() {
            cut.cursor = Some(last);
        }
        log.entries.drain(..removed);
        if cut.records_done && log.entries.front().is_none_or(|e| e.batch > cut.upto) {
            log.cut = None;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::{Mutation, ScopeKey, ScopeState};
    use crate::store::sled::tests::{apply, reopen};
    use crate::store::{Recovery, Store};

    fn requests(n: u64) -> ScopeState {
        let mut s = ScopeState::default();
        s.day_requests.add(1, n);
        s
    }

    fn scope(subject: &str, n: u64) -> Mutation {
        Mutation::Scope {
            key: ScopeKey::Subject(Arc::from(subject)),
            state: Some(requests(n)),
        }
    }

    fn keys(store: &SledStore) -> (usize, usize) {
        let (mut records, mut entries) = (0, 0);
        for item in store.db().iter() {
            let (k, _) = item.unwrap();
            if is_entry(&k) {
                entries += 1;
            } else if k[0] != b'!' {
                records += 1;
            }
        }
        (records, entries)
    }

    fn subjects(store: &SledStore) -> BTreeMap<String, u64> {
        store
            .load()
            .unwrap()
            .scopes
            .into_iter()
            .map(|(k, s)| (format!("{k:?}"), s.day_requests.get(1)))
            .collect()
    }

    #[test]
    fn a_write_is_one_entry_and_a_checkpoint_writes_each_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), Recovery::Refuse).unwrap();
        store.load().unwrap();
        // Three groups, each writing "hot" and a subject of its own; the last removes "b".
        for (n, other) in ["a", "b", "c"].iter().enumerate() {
            apply(&store, vec![scope("hot", n as u64 + 1), scope(other, 1)]);
        }
        apply(
            &store,
            vec![Mutation::Scope {
                key: ScopeKey::Subject(Arc::from("b")),
                state: None,
            }],
        );
        // Every group is one log entry; no record has a key of its own yet.
        assert_eq!(keys(&store), (0, 4));
        let state_before = store.state().unwrap().tally;
        {
            let mut state = store.state().unwrap();
            store.checkpoint_all(&mut state).unwrap();
        }
        // Three records (hot, a, c), each written once, and no entry left.
        assert_eq!(keys(&store), (3, 0));
        let after = store.state().unwrap().tally;
        assert_eq!(after.records, 3);
        assert!(after.batch > state_before.batch);
        store.flush().unwrap();
        drop(store);
        let store = reopen(dir.path(), Recovery::Refuse);
        let got = subjects(&store);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[&subject("hot")], 3);
    }

    fn subject(name: &str) -> String {
        format!("{:?}", ScopeKey::Subject(Arc::from(name)))
    }

    /// Any state a crash can leave (the writes and checkpoint steps up to any point) loads as
    /// the records written up to it: sled is reopened after every write and every step, now
    /// and then in the middle of a checkpoint, and checked against a model.
    #[test]
    fn writes_and_checkpoint_steps_cut_off_anywhere_load_as_the_records_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut model: BTreeMap<String, u64> = BTreeMap::new();
        let mut store = SledStore::open(dir.path(), Recovery::Refuse).unwrap();
        store.load().unwrap();
        let reopen = |store: SledStore, model: &BTreeMap<String, u64>, when: &str| {
            store.flush().unwrap();
            drop(store);
            let store = reopen(dir.path(), Recovery::Refuse);
            assert_eq!(&subjects(&store), model, "{when}");
            store
        };
        for round in 0..30u64 {
            // A group: the hot subject and 40 of 900 others (so a checkpoint moves more than a
            // step's worth), and now and then a removal.
            let mut group = vec![scope("hot", round)];
            model.insert(subject("hot"), round);
            for i in 0..40 {
                let s = format!("s{}", (round * 97 + i * 31) % 900);
                if round % 4 == 1 && i % 10 == 0 {
                    group.push(Mutation::Scope {
                        key: ScopeKey::Subject(Arc::from(s.as_str())),
                        state: None,
                    });
                    model.remove(&subject(&s));
                } else {
                    group.push(scope(&s, round));
                    model.insert(subject(&s), round);
                }
            }
            apply(&store, group);
            store = reopen(store, &model, &format!("round {round}, written"));
            // Checkpoint steps, as the writer's idle time allows; reopened between them, the
            // checkpoint under way is lost, as in a crash, and the log is replayed.
            for step in 0..(round % 4) {
                {
                    let mut state = store.state().unwrap();
                    state.log.last_cut = Instant::now() - INTERVAL;
                    store.step(&mut state).unwrap();
                }
                if step == 1 {
                    store = reopen(store, &model, &format!("round {round}, step {step}"));
                }
            }
        }
        let mut state = store.state().unwrap();
        store.checkpoint_all(&mut state).unwrap();
        drop(state);
        let store = reopen(store, &model, "at the end");
        assert_eq!(keys(&store), (model.len(), 0));
    }
}
