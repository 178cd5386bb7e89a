//! Settled reservations (committed, refunded, expired), kept for retries, replays and late
//! Commits until the retention runs out, each packed into one small byte string.
//!
//! Why packed: a settled reservation is read only when a client retries a Reserve or a Commit,
//! or commits late, yet up to `max_settled` (2 million) are kept. As a [`Reservation`] in a
//! `HashMap`, with a `BTreeSet` index and an idempotency map of `(String, String)`, each took
//! about 1 KB at a million. Here each is its fields in postcard's variable-length form (times
//! as offsets from its creation), about 70 bytes for a typical one, in a slot of a dense
//! vector; the indexes hold 4-byte slot numbers. Reading one back decodes it (well under a
//! microsecond), which only those rare calls pay. Decoding gives back exactly the record that
//! was stored ([`pack`] and [`unpack`] are inverse for every record), so every answer is the
//! one it was.
//!
//! The idempotency index here holds the keys of settled records only (an open hold's key is in
//! the engine's map of open keys; a key is in one or the other, never both). It is keyed by the
//! hash of (subject, key) and confirmed against the subject and key in the record itself, so
//! two pairs with the same hash are two entries, and a lookup never answers with another
//! subject's reservation.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;

use hashbrown::HashTable;
use serde::{Deserialize, Serialize};

use super::{HoldState, Requested, Reservation, ReservationId, Settlement, Usage};
use crate::policy::Price;

/// A [`Reservation`] without its id (the slot has it), strings borrowed when packing and
/// owned when unpacking. The subject and the idempotency key come first: the idempotency index
/// reads just those ([`Head`]).
#[derive(Serialize, Deserialize)]
struct Packed<S> {
    subject: S,
    idempotency_key: Option<S>,
    model: S,
    prompt_tokens: u64,
    max_output_tokens: u64,
    requested_hold_us: Option<u64>,
    created_us: u64,
    /// `expires_us - created_us`, wrapping (exact for any pair).
    expires_after_us: u64,
    state: PackedState,
    group: Option<S>,
    client_ip: Option<IpAddr>,
    price: Option<Price>,
    held_usd: u64,
    downgraded_from: Option<(S, u64)>,
    caller: Option<S>,
}

/// The first two fields of [`Packed`], borrowed from the bytes.
#[derive(Deserialize)]
struct Head<'a> {
    subject: &'a str,
    idempotency_key: Option<&'a str>,
}

/// [`HoldState`] with its time as an offset from the creation (wrapping).
#[derive(Serialize, Deserialize)]
enum PackedState {
    Held,
    Committed {
        usage: Usage,
        settlement: Settlement,
        after_us: u64,
    },
    Refunded {
        after_us: u64,
    },
    Expired {
        after_us: u64,
    },
}

/// `r` as bytes (its id aside).
pub(super) fn pack(r: &Reservation) -> Box<[u8]> {
    let after = |at_us: u64| at_us.wrapping_sub(r.created_us);
    let packed = Packed {
        subject: r.subject.as_str(),
        idempotency_key: r.idempotency_key.as_deref(),
        model: r.model.as_str(),
        prompt_tokens: r.prompt_tokens,
        max_output_tokens: r.max_output_tokens,
        requested_hold_us: r.requested_hold_us,
        created_us: r.created_us,
        expires_after_us: after(r.expires_us),
        state: match r.state {
            HoldState::Held => PackedState::Held,
            HoldState::Committed {
                usage,
                settlement,
                at_us,
            } => PackedState::Committed {
                usage,
                settlement,
                after_us: after(at_us),
            },
            HoldState::Refunded { at_us } => PackedState::Refunded {
                after_us: after(at_us),
            },
            HoldState::Expired { at_us } => PackedState::Expired {
                after_us: after(at_us),
            },
        },
        group: r.group.as_deref(),
        client_ip: r.client_ip,
        price: r.price,
        held_usd: r.held_usd,
        downgraded_from: r
            .downgraded_from
            .as_ref()
            .map(|d| (d.model.as_str(), d.prompt_tokens)),
        caller: r.caller.as_deref(),
    };
    // Serializing plain fields into a Vec cannot fail.
    postcard::to_allocvec(&packed)
        .expect("a reservation serializes")
        .into_boxed_slice()
}

/// The reservation `bytes` ([`pack`]) hold, with its id.
pub(super) fn unpack(id: ReservationId, bytes: &[u8]) -> Reservation {
    // Only `pack` wrote these bytes, in this process.
    let p: Packed<String> = postcard::from_bytes(bytes).expect("packed by pack()");
    let at = |after_us: u64| p.created_us.wrapping_add(after_us);
    Reservation {
        id,
        subject: p.subject,
        model: p.model,
        prompt_tokens: p.prompt_tokens,
        max_output_tokens: p.max_output_tokens,
        requested_hold_us: p.requested_hold_us,
        created_us: p.created_us,
        expires_us: at(p.expires_after_us),
        idempotency_key: p.idempotency_key,
        state: match p.state {
            PackedState::Held => HoldState::Held,
            PackedState::Committed {
                usage,
                settlement,
                after_us,
            } => HoldState::Committed {
                usage,
                settlement,
                at_us: at(after_us),
            },
            PackedState::Refunded { after_us } => HoldState::Refunded {
                at_us: at(after_us),
            },
            PackedState::Expired { after_us } => HoldState::Expired {
                at_us: at(after_us),
            },
        },
        group: p.group,
        client_ip: p.client_ip,
        price: p.price,
        held_usd: p.held_usd,
        caller: p.caller,
        downgraded_from: p.downgraded_from.map(|(model, prompt_tokens)| Requested {
            model,
            prompt_tokens,
        }),
    }
}

fn head(bytes: &[u8]) -> Head<'_> {
    postcard::take_from_bytes::<Head<'_>>(bytes)
        .expect("packed by pack()")
        .0
}

/// Whether `slot` holds a record of `subject` with the idempotency `key`: what confirms an
/// entry of the key index, whose hash alone may be another pair's.
fn holds_key(slot: &Option<Slot>, subject: &str, key: &str) -> bool {
    slot.as_ref().is_some_and(|s| {
        let h = head(&s.bytes);
        h.subject == subject && h.idempotency_key == Some(key)
    })
}

/// One settled reservation.
#[derive(Debug)]
struct Slot {
    id: ReservationId,
    bytes: Box<[u8]>,
}

/// The settled reservations, by id, by settle time and by idempotency key. `S` hashes ids
/// and keys (a test gives one under which every key collides).
#[derive(Debug, Default)]
pub(super) struct Settled<S = RandomState> {
    /// Slots by number; a removed one is `None` until reused (`free`), so numbers in the
    /// indexes stay valid.
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Slot numbers by the id in the slot.
    by_id: HashTable<u32>,
    /// Slot numbers by the (subject, idempotency key) in the slot, for the records that own
    /// their key.
    by_key: HashTable<u32>,
    /// (settle time, id) in order, the id as its high and low words (24 bytes an entry, not
    /// the 32 a `u128` aligned to 16 takes): purged from the front.
    order: BTreeSet<(u64, u64, u64)>,
    hasher: S,
}

fn order_entry(at_us: u64, id: ReservationId) -> (u64, u64, u64) {
    (at_us, (id.0 >> 64) as u64, id.0 as u64)
}

impl<S: BuildHasher> Settled<S> {
    /// Settled records kept.
    pub(super) fn len(&self) -> usize {
        self.order.len()
    }

    fn slot(&self, n: u32) -> &Slot {
        self.slots[n as usize]
            .as_ref()
            .expect("indexes name live slots")
    }

    fn id_hash(&self, id: ReservationId) -> u64 {
        self.hasher.hash_one(id)
    }

    fn key_hash(&self, subject: &str, key: &str) -> u64 {
        self.hasher.hash_one((subject, key))
    }

    fn find(&self, id: ReservationId) -> Option<u32> {
        let slots = &self.slots;
        self.by_id
            .find(self.id_hash(id), |&n| {
                slots[n as usize].as_ref().is_some_and(|s| s.id == id)
            })
            .copied()
    }

    /// The settled reservation `id`, if kept.
    pub(super) fn get(&self, id: ReservationId) -> Option<Reservation> {
        self.find(id).map(|n| unpack(id, &self.slot(n).bytes))
    }

    /// Whether `id` is kept here.
    pub(super) fn contains(&self, id: ReservationId) -> bool {
        self.find(id).is_some()
    }

    /// The settled reservation that owns `key` of `subject`, if any.
    pub(super) fn key_owner(&self, subject: &str, key: &str) -> Option<ReservationId> {
        let slots = &self.slots;
        self.by_key
            .find(self.key_hash(subject, key), |&n| {
                holds_key(&slots[n as usize], subject, key)
            })
            .map(|&n| self.slot(n).id)
    }

    /// Forget that a settled reservation owns `key` of `subject` (a new hold takes the key).
    pub(super) fn release_key(&mut self, subject: &str, key: &str) {
        let hash = self.key_hash(subject, key);
        let slots = &self.slots;
        if let Ok(entry) = self
            .by_key
            .find_entry(hash, |&n| holds_key(&slots[n as usize], subject, key))
        {
            entry.remove();
        }
    }

    /// Keep `r`, settled at `at_us`, not kept yet; `owns_key`: its idempotency key answers
    /// for it.
    pub(super) fn insert(&mut self, r: &Reservation, at_us: u64, owns_key: bool) {
        debug_assert!(!self.contains(r.id));
        let slot = Slot {
            id: r.id,
            bytes: pack(r),
        };
        let n = match self.free.pop() {
            Some(n) => {
                self.slots[n as usize] = Some(slot);
                n
            }
            None => {
                self.slots.push(Some(slot));
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 settled records")
            }
        };
        let (slots, hasher) = (&self.slots, &self.hasher);
        let rehash_id = |&m: &u32| {
            hasher.hash_one(
                slots[m as usize]
                    .as_ref()
                    .expect("indexes name live slots")
                    .id,
            )
        };
        self.by_id
            .insert_unique(hasher.hash_one(r.id), n, rehash_id);
        if let (true, Some(key)) = (owns_key, r.idempotency_key.as_deref()) {
            let rehash_key = |&m: &u32| {
                let h = head(
                    &slots[m as usize]
                        .as_ref()
                        .expect("indexes name live slots")
                        .bytes,
                );
                hasher.hash_one((h.subject, h.idempotency_key.unwrap_or_default()))
            };
            self.by_key
                .insert_unique(hasher.hash_one((r.subject.as_str(), key)), n, rehash_key);
        }
        self.order.insert(order_entry(at_us, r.id));
    }

    /// Replace the kept record of `r.id` with `r`, settled at `at_us`: a late Commit of an
    /// expired hold. Its subject and key are the same, and so is whether the key answers for
    /// it.
    pub(super) fn update(&mut self, r: &Reservation, at_us: u64) {
        let Some(n) = self.find(r.id) else {
            debug_assert!(false, "update of a record not kept");
            return;
        };
        if let Some(slot) = self.slots[n as usize].as_mut() {
            let old = unpack(r.id, &slot.bytes);
            debug_assert_eq!(
                (&old.subject, &old.idempotency_key),
                (&r.subject, &r.idempotency_key)
            );
            slot.bytes = pack(r);
            if let Some(old_at_us) = old.state.finished_at() {
                self.order.remove(&order_entry(old_at_us, r.id));
            }
        }
        self.order.insert(order_entry(at_us, r.id));
    }

    /// The oldest (settle time, id), if any.
    pub(super) fn oldest(&self) -> Option<(u64, ReservationId)> {
        self.order
            .first()
            .map(|&(at, hi, lo)| (at, ReservationId((u128::from(hi) << 64) | u128::from(lo))))
    }

    /// Remove the oldest record with its idempotency key (if it owns it). Returns its id.
    pub(super) fn pop_oldest(&mut self) -> Option<ReservationId> {
        let (_, id) = self.oldest()?;
        self.order.pop_first();
        let n = self.find(id).expect("the order names kept records");
        let hash = self.id_hash(id);
        if let Ok(entry) = self.by_id.find_entry(hash, |&m| m == n) {
            entry.remove();
        }
        let slot = self.slots[n as usize].take().expect("a live slot");
        let h = head(&slot.bytes);
        if let Some(key) = h.idempotency_key {
            let hash = self.key_hash(h.subject, key);
            if let Ok(entry) = self.by_key.find_entry(hash, |&m| m == n) {
                entry.remove();
            }
        }
        self.free.push(n);
        if self.order.is_empty() {
            // Nothing kept: give the slots back.
            self.slots = Vec::new();
            self.free = Vec::new();
        }
        Some(id)
    }

    /// Every kept record with its settle time, in settle order (for checks and tests).
    #[cfg(test)]
    pub(super) fn all(&self) -> Vec<(u64, Reservation)> {
        let ids: Vec<_> = self
            .order
            .iter()
            .map(|&(at, hi, lo)| (at, ReservationId((u128::from(hi) << 64) | u128::from(lo))))
            .collect();
        ids.into_iter()
            .map(|(at, id)| (at, self.get(id).expect("kept")))
            .collect()
    }

    /// Check that the indexes and the slots agree (for tests).
    #[cfg(test)]
    pub(super) fn check(&self) {
        let live = self.slots.iter().filter(|s| s.is_some()).count();
        assert_eq!(live, self.order.len(), "a slot per settled record");
        assert_eq!(self.by_id.len(), live, "an id entry per slot");
        assert_eq!(live + self.free.len(), self.slots.len(), "free slots");
        for &n in &self.free {
            assert!(self.slots[n as usize].is_none(), "a free slot is empty");
        }
    }

    /// (subject, key) -> id of every key a settled record owns (for checks and tests).
    #[cfg(test)]
    pub(super) fn keys(&self) -> Vec<((String, String), ReservationId)> {
        self.by_key
            .iter()
            .map(|&n| {
                let s = self.slot(n);
                let h = head(&s.bytes);
                let key = h.idempotency_key.expect("indexed by its key");
                ((h.subject.to_string(), key.to_string()), s.id)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasherDefault, Hasher};
    use std::net::Ipv6Addr;

    use super::*;

    fn record(id: u128, subject: &str, key: Option<&str>) -> Reservation {
        Reservation {
            caller: None,
            id: ReservationId(id),
            subject: subject.into(),
            model: "gpt-4o-mini".into(),
            prompt_tokens: 100,
            max_output_tokens: 100,
            requested_hold_us: None,
            created_us: 1_773_144_000_000_000,
            expires_us: 1_773_144_060_000_000,
            idempotency_key: key.map(str::to_string),
            state: HoldState::Committed {
                usage: Usage {
                    prompt_tokens: 100,
                    completion_tokens: 50,
                    usage_unknown: false,
                },
                settlement: Settlement::of(
                    200,
                    &Usage {
                        prompt_tokens: 100,
                        completion_tokens: 50,
                        usage_unknown: false,
                    },
                    0,
                ),
                at_us: 1_773_144_001_000_000,
            },
            group: None,
            client_ip: None,
            price: None,
            held_usd: 0,
            downgraded_from: None,
        }
    }

    /// Records of every shape: each state, every optional field set, extreme numbers, times
    /// before the creation (a clock that stepped back) and long strings.
    fn every_shape() -> Vec<Reservation> {
        let base = record(1, "user-00000001", Some("k1"));
        let long = "é".repeat(128);
        vec![
            base.clone(),
            Reservation {
                caller: None,
                id: ReservationId(u128::MAX),
                subject: long.clone(),
                model: String::new(),
                prompt_tokens: u64::MAX,
                max_output_tokens: 0,
                requested_hold_us: Some(u64::MAX),
                created_us: u64::MAX,
                expires_us: 0,
                idempotency_key: Some(long.clone()),
                state: HoldState::Expired { at_us: 3 },
                group: Some(long.clone()),
                client_ip: Some(Ipv6Addr::LOCALHOST.into()),
                price: Some(Price {
                    input_per_million: 150_000,
                    output_per_million: u64::MAX,
                }),
                held_usd: u64::MAX,
                downgraded_from: Some(Requested {
                    model: long,
                    prompt_tokens: 7,
                }),
            },
            Reservation {
                caller: None,
                id: ReservationId(3),
                state: HoldState::Refunded { at_us: 0 },
                idempotency_key: Some(String::new()),
                client_ip: Some([10, 0, 0, 1].into()),
                ..base.clone()
            },
            Reservation {
                state: HoldState::Committed {
                    usage: Usage {
                        prompt_tokens: 0,
                        completion_tokens: u64::MAX,
                        usage_unknown: true,
                    },
                    // Not what Settlement::of would say: kept as it was, not recomputed.
                    settlement: Settlement {
                        charged_tokens: 1,
                        released_tokens: 2,
                        debt_tokens: 3,
                        charged_usd: 4,
                    },
                    at_us: u64::MAX,
                },
                id: ReservationId(4),
                idempotency_key: None,
                ..base.clone()
            },
            Reservation {
                caller: None,
                id: ReservationId(5),
                state: HoldState::Held,
                idempotency_key: Some("k5".into()),
                ..base
            },
        ]
    }

    /// Every answer about a settled reservation (a replayed Reserve, a retried Commit or
    /// Refund, a late Commit) is computed from the record: packing must give back exactly the
    /// record it was given, field for field.
    #[test]
    fn a_packed_record_unpacks_to_the_same_record() {
        for r in every_shape() {
            assert_eq!(unpack(r.id, &pack(&r)), r);
        }
    }

    /// What the footprint is for: a typical settled reservation (subject, model and key of
    /// about 10 bytes each, committed) packs into a few dozen bytes, and its slot holds only
    /// the id and a pointer. (Unpacked, the record alone was `size_of::<Reservation>()`, over
    /// 300 bytes, plus its strings.)
    #[test]
    fn a_typical_settled_record_is_small() {
        assert!(pack(&record(1, "user-00000001", Some("k1000000"))).len() <= 72);
        assert!(std::mem::size_of::<Option<Slot>>() <= 32);
    }

    #[test]
    fn records_are_found_by_id_key_and_age_and_leave_whole() {
        let mut s = Settled::<RandomState>::default();
        let shapes = every_shape();
        for (i, r) in shapes.iter().enumerate() {
            s.insert(r, 100 - i as u64, true);
            s.check();
        }
        for r in &shapes {
            assert_eq!(s.get(r.id).as_ref(), Some(r));
            if let Some(key) = &r.idempotency_key {
                assert_eq!(s.key_owner(&r.subject, key), Some(r.id));
            }
        }
        // Oldest first: the last inserted, settled at 96.
        assert_eq!(s.oldest(), Some((96, shapes[4].id)));
        let mut popped = Vec::new();
        while let Some(id) = s.pop_oldest() {
            s.check();
            assert_eq!(s.get(id), None);
            popped.push(id);
        }
        let expected: Vec<_> = shapes.iter().rev().map(|r| r.id).collect();
        assert_eq!(popped, expected);
        assert_eq!(s.key_owner("user-00000001", "k1"), None);
    }

    /// A hasher under which every id and every key collides.
    #[derive(Default)]
    struct Collide;

    impl Hasher for Collide {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, _: &[u8]) {}
    }

    /// Two subjects with the same key, and keys that collide: a lookup answers only with the
    /// reservation of that very subject and key, never another's with the same hash, and
    /// removing one leaves the others answering.
    #[test]
    fn colliding_keys_never_answer_with_another_subjects_reservation() {
        let mut s = Settled::<BuildHasherDefault<Collide>>::default();
        let alice = record(1, "alice", Some("k"));
        let bob = record(2, "bob", Some("k"));
        let alice_other = record(3, "alice", Some("k2"));
        let no_key = record(4, "alice", None);
        for (at, r) in [&alice, &bob, &alice_other, &no_key]
            .into_iter()
            .enumerate()
        {
            s.insert(r, at as u64, true);
        }
        s.check();
        assert_eq!(s.key_owner("alice", "k"), Some(alice.id));
        assert_eq!(s.key_owner("bob", "k"), Some(bob.id));
        assert_eq!(s.key_owner("alice", "k2"), Some(alice_other.id));
        assert_eq!(s.key_owner("carol", "k"), None);
        assert_eq!(s.key_owner("bob", "k2"), None);
        // A key given to a new hold no longer answers for alice's record, and bob's stays.
        s.release_key("alice", "k");
        assert_eq!(s.key_owner("alice", "k"), None);
        assert_eq!(s.key_owner("bob", "k"), Some(bob.id));
        // Alice's record is purged first; bob's key still answers.
        assert_eq!(s.pop_oldest(), Some(alice.id));
        assert_eq!(s.get(alice.id), None);
        assert_eq!(s.key_owner("bob", "k"), Some(bob.id));
        assert_eq!(s.get(bob.id).as_ref(), Some(&bob));
        // A record that does not own its key (it was reused) is not found by it.
        let mut t = Settled::<BuildHasherDefault<Collide>>::default();
        t.insert(&bob, 0, false);
        assert_eq!(t.key_owner("bob", "k"), None);
        assert_eq!(t.get(bob.id).as_ref(), Some(&bob));
    }

    /// A late Commit replaces an expired record in place: same slot, new settle time, and
    /// the key still answers with it.
    #[test]
    fn an_update_moves_the_record_in_the_order() {
        let mut s = Settled::<RandomState>::default();
        let expired = Reservation {
            state: HoldState::Expired { at_us: 10 },
            ..record(1, "alice", Some("k"))
        };
        let other = record(2, "bob", None);
        s.insert(&expired, 10, true);
        s.insert(&other, 20, true);
        let committed = record(1, "alice", Some("k"));
        s.update(&committed, 30);
        s.check();
        assert_eq!(s.oldest(), Some((20, other.id)));
        assert_eq!(s.get(committed.id).as_ref(), Some(&committed));
        assert_eq!(s.key_owner("alice", "k"), Some(committed.id));
        assert_eq!(s.len(), 2);
    }
}
