//! The load at start: every record read, counted into the tally and decoded, on every core.
//!
//! Why in parallel: a load reads every record once (1M subjects with 1M settled reservations
//! are 2M records), and sled's iterator, the digest and the decoding are each a few hundred
//! nanoseconds of CPU per record, one record after another. The key space is cut into ranges
//! by record kind (a reservation's, a subject's, the rest), and threads each take the next
//! range not yet taken until none is left; each counts and decodes what its range holds, and
//! the parts are summed (the tally's digest is a sum, so its order does not matter) and joined
//! (the ranges are disjoint, so no record is in two parts). Kinds rather than finer cuts: a
//! reservation's and a subject's records are most of a store, usually in like numbers, and a
//! cut by kind needs no knowledge of the keys inside a kind.
//!
//! Why `std::thread::scope` rather than a pool (rayon): a load is a handful of coarse ranges
//! read once at start, sled's iterators cannot be split further, and scoped threads borrow
//! the database and the log without a dependency or a `'static` bound.
//!
//! What a load checks is unchanged (`verify.rs`): every record and log entry is counted, the
//! sum compared with sled's tally and the watermark, and the first record that does not
//! decode (in key order across the ranges) fails the load.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};

use sled::IVec;

use super::{decode_tally, log, unreadable, SledStore, TALLY_KEY};
use crate::engine::{Reservation, ScopeKey, ScopeState};
use crate::policy::SubjectConfig;
use crate::store::tally::is_meta;
use crate::store::{Record, Snapshot, StoreError, Tally};

/// The first bytes of the key ranges a load reads apart (see `records.rs`): before `r`
/// (the store's own keys, assignments, the fleet's, groups' and IPs' scopes), reservations,
/// then subjects up to the log.
const CUTS: [u8; 2] = [b'r', b's'];

/// What one range held.
#[derive(Debug, Default)]
struct Part {
    /// Its records (not its log entries), counted.
    found: Tally,
    /// sled's tally record, if it was in the range.
    stored: Option<Tally>,
    scopes: HashMap<ScopeKey, ScopeState>,
    reservations: Vec<Reservation>,
    assignments: HashMap<String, SubjectConfig>,
}

impl Part {
    fn add(&mut self, record: Record, scopes: &mut Vec<(ScopeKey, ScopeState)>) {
        match record {
            Record::Scope(key, state) => scopes.push((key, state)),
            Record::Reservation(r) => self.reservations.push(*r),
            Record::Assignment(subject, config) => {
                self.assignments.insert(subject, config);
            }
        }
    }
}

/// What a load read: the records (the log's laid over their own keys), everything counted as
/// it is stored, and sled's tally record.
pub(super) struct Loaded {
    pub snapshot: Snapshot,
    pub found: Tally,
    pub stored: Option<Tally>,
}

impl SledStore {
    /// Read every record and log entry (the log's records overriding their own keys),
    /// counting them as they are stored, on up to `threads` threads.
    pub(super) fn read_all(&self, log: &log::Log, threads: usize) -> Result<Loaded, StoreError> {
        let mut ranges: Vec<(Option<u8>, u8)> = Vec::new();
        let mut lower = None;
        for cut in CUTS.into_iter().chain([log::PREFIX]) {
            ranges.push((lower, cut));
            lower = Some(cut);
        }
        let next = AtomicUsize::new(0);
        let read_ranges = || -> Vec<(usize, Result<Part, StoreError>)> {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(lower, upper)) = ranges.get(i) else {
                    return done;
                };
                done.push((i, self.read_range(lower, upper, log.pending())));
            }
        };
        let threads = threads.clamp(1, ranges.len());
        let mut parts: Vec<(usize, Result<Part, StoreError>)> = std::thread::scope(|s| {
            let others: Vec<_> = (1..threads).map(|_| s.spawn(read_ranges)).collect();
            let mut parts = read_ranges();
            for t in others {
                // A panic while reading is a bug: it goes on up, as it would have without threads.
                parts.extend(t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            }
            parts
        });
        parts.sort_by_key(|(i, _)| *i);
        let parts = parts
            .into_iter()
            .map(|(_, part)| part)
            .collect::<Result<Vec<_>, _>>()?;
        Self::join(parts, log)
    }

    /// The records under their own keys in `[lower, upper)` (by first byte), counted and decoded;
    /// those `pending` in the log are counted only (the log's value is the one that counts).
    fn read_range(
        &self,
        lower: Option<u8>,
        upper: u8,
        pending: &BTreeMap<IVec, Option<IVec>>,
    ) -> Result<Part, StoreError> {
        let mut part = Part::default();
        let mut scopes = Vec::new();
        let items = match lower {
            Some(lower) => self.db().range([lower]..[upper]),
            None => self.db().range(..[upper]),
        };
        for item in items {
            let (key, value) = item.map_err(unreadable)?;
            if is_meta(&key) {
                if key == TALLY_KEY {
                    part.stored = Some(decode_tally(&value)?);
                }
                continue;
            }
            part.found.add(&key, &value);
            if pending.is_empty() || !pending.contains_key(&key) {
                part.add(Record::decode(&key, &value)?, &mut scopes);
            }
        }
        // The map built here, sized once, while other threads still read their ranges.
        part.scopes = scopes.into_iter().collect();
        Ok(part)
    }

    /// The parts summed up and joined, with the log's records laid over them.
    fn join(parts: Vec<Part>, log: &log::Log) -> Result<Loaded, StoreError> {
        let mut found = log.tally();
        let mut stored = None;
        let mut snapshot = Snapshot::default();
        let reservations: usize = parts.iter().map(|p| p.reservations.len()).sum();
        for p in parts {
            found.records += p.found.records;
            found.digest = found.digest.wrapping_add(p.found.digest);
            stored = stored.or(p.stored);
            // Usually one part holds nearly all of a kind: it is taken as it is, not moved
            // entry by entry.
            take_or_extend(&mut snapshot.scopes, p.scopes);
            take_or_extend(&mut snapshot.assignments, p.assignments);
            if snapshot.reservations.is_empty() {
                snapshot.reservations = p.reservations;
                snapshot
                    .reservations
                    .reserve(reservations - snapshot.reservations.len());
            } else {
                snapshot.reservations.extend(p.reservations);
            }
        }
        snapshot.scopes.reserve(log.pending().len());
        for (key, value) in log.pending() {
            if let Some(value) = value {
                snapshot.add(Record::decode(key, value)?);
            }
        }
        Ok(Loaded {
            snapshot,
            found,
            stored,
        })
    }
}

/// `into` and `more` as one map: the smaller moved into the larger (a range holds the fleet's
/// scope beside a million subjects' in another).
fn take_or_extend<K: std::hash::Hash + Eq, V>(into: &mut HashMap<K, V>, mut more: HashMap<K, V>) {
    if into.len() < more.len() {
        std::mem::swap(into, &mut more);
    }
    into.extend(more);
}

/// Threads a load reads on: one per core.
pub(super) fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::{Mutation, ReservationId};
    use crate::store::sled::tests::{apply, reopen, sample_reservation};
    use crate::store::{Batch, Recovery, Store};

    fn scope(key: ScopeKey, n: u64) -> Mutation {
        let mut state = ScopeState::default();
        state.day_requests.add(1, n);
        Mutation::Scope {
            key,
            state: Some(state),
        }
    }

    fn reservation(n: u64) -> Mutation {
        let mut r = sample_reservation(ReservationId(1_000 + u128::from(n)));
        r.prompt_tokens = n;
        Mutation::Reservation {
            id: r.id,
            record: Some(Box::new(r)),
        }
    }

    /// Records of every kind in every range, some under their own keys, some only in the
    /// log, some overwritten or removed by the log: the same snapshot and the same count
    /// on one thread as on several, and what was written.
    #[test]
    fn a_load_on_several_threads_reads_what_one_thread_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), Recovery::Refuse).unwrap();
        store.load().unwrap();
        let subject = |i: u64| ScopeKey::Subject(Arc::from(format!("s{i}").as_str()));
        let mut first: Vec<Mutation> = (0..300).map(|i| scope(subject(i), i)).collect();
        first.extend((0..300).map(reservation));
        first.push(scope(ScopeKey::Global, 7));
        first.push(scope(ScopeKey::Group(Arc::from("acme")), 8));
        first.push(scope(ScopeKey::Ip("203.0.113.7".parse().unwrap()), 9));
        apply(&store, first);
        // Moved to their own keys; then more, left in the log, over them.
        store.checkpoint_all(&mut store.state().unwrap()).unwrap();
        let mut later: Vec<Mutation> = (250..400).map(|i| scope(subject(i), i + 1_000)).collect();
        later.extend((290..310).map(reservation));
        later.push(Mutation::Scope {
            key: subject(3),
            state: None,
        });
        later.push(Mutation::Scope {
            key: ScopeKey::Group(Arc::from("acme")),
            state: None,
        });
        later.push(scope(ScopeKey::Global, 70));
        apply(&store, later);
        store.flush().unwrap();
        let log = log::Log::restore(
            &store
                .db()
                .scan_prefix([log::PREFIX])
                .collect::<Result<Vec<_>, _>>()
                .unwrap(),
        )
        .unwrap();
        assert!(!log.pending().is_empty());

        let one = store.read_all(&log, 1).unwrap();
        for threads in [2, 3, 8] {
            let many = store.read_all(&log, threads).unwrap();
            assert_eq!(many.found, one.found, "{threads} threads");
            assert_eq!(many.stored, one.stored);
            assert_eq!(many.snapshot.scopes, one.snapshot.scopes);
            assert_eq!(many.snapshot.assignments, one.snapshot.assignments);
            let ids = |l: &Loaded| {
                let mut ids: Vec<_> = l.snapshot.reservations.iter().map(|r| r.id).collect();
                ids.sort();
                ids
            };
            assert_eq!(ids(&many), ids(&one));
        }
        // What was written, and the count matches sled's own tally.
        let s = &one.snapshot;
        assert_eq!(s.scopes.len(), 400 - 1 + 2);
        assert_eq!(s.scopes[&subject(0)].day_requests.get(1), 0);
        assert_eq!(s.scopes[&subject(260)].day_requests.get(1), 1_260);
        assert!(!s.scopes.contains_key(&subject(3)));
        assert_eq!(s.scopes[&ScopeKey::Global].day_requests.get(1), 70);
        assert_eq!(s.reservations.len(), 310);
        assert!(one.found.same_records(&one.stored.unwrap()));
        drop(store);
        assert_eq!(
            reopen(dir.path(), Recovery::Refuse).load().unwrap().len(),
            711
        );
    }

    /// A record that does not decode fails the load, whichever range it is in and however
    /// many threads read; with two, the first in key order is the one reported.
    #[test]
    fn a_record_that_does_not_decode_fails_a_load_on_any_thread() {
        for keys in [
            &[&b"Gx"[..]][..],
            &[b"s-bad"],
            &[b"a\xff", b"s-bad"],
            &[b"r-bad"],
        ] {
            let dir = tempfile::tempdir().unwrap();
            let store = SledStore::open(dir.path(), Recovery::Refuse).unwrap();
            store.load().unwrap();
            apply(&store, (0..50).map(reservation).collect());
            let mut batch = Batch::new();
            for key in keys {
                batch.push(key, Some(b"not postcard"));
            }
            store.write_batch(&batch).unwrap();
            store.checkpoint_all(&mut store.state().unwrap()).unwrap();
            store.flush().unwrap();
            drop(store);
            for threads in [1, 2, 3] {
                let store = reopen(dir.path(), Recovery::Refuse);
                let log = log::Log::default();
                let err = store.read_all(&log, threads).err().expect("refused");
                let reported = String::from_utf8_lossy(keys[0]).into_owned();
                assert!(
                    matches!(&err, StoreError::Corrupt { key, .. } if *key == reported),
                    "{threads} threads, {keys:?}: {err}"
                );
            }
        }
    }
}
