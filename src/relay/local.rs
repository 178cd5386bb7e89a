//! Holds a relay granted on its own while the upstream was unreachable (fail-open tiers), so
//! that their Commit, Refund and Extend are answered here rather than NOT_FOUND upstream.

use std::collections::{HashMap, VecDeque};

use crate::clock::MICROS_PER_DAY;
use crate::engine::{ReservationId, Usage};

/// Most fail-open holds remembered at once. When full, a fail-open tier fails closed: an
/// outage must not turn into unbounded memory.
pub const MAX_LOCAL_HOLDS: usize = 100_000;

/// One hold granted without the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalHold {
    /// Tokens held: prompt + output.
    pub tokens: u64,
    /// When it was made.
    pub created_us: u64,
    /// When it expires.
    pub expires_us: u64,
    /// The first Commit's usage, or `None` while open.
    pub committed: Option<Usage>,
    /// Whether it was refunded.
    pub refunded: bool,
    /// The longest it may live in all, through Extends (the tier's `max_hold_lifetime_seconds`).
    pub max_lifetime_us: u64,
    /// The longest one Extend may ask for (the tier's `max_hold_seconds`).
    pub max_extend_us: u64,
    /// The Reserve's subject and idempotency key, so a retry during the outage replays it.
    pub key: Option<(String, String)>,
    /// The caller that made it (`[callers]`): the only one that may settle or extend it.
    pub caller: Option<String>,
}

/// The fail-open holds, bounded in count and kept a day (the late-commit window).
#[derive(Debug, Default)]
pub struct LocalHolds {
    holds: HashMap<ReservationId, LocalHold>,
    /// Ids in creation order, to forget the oldest after a day.
    order: VecDeque<(u64, ReservationId)>,
    /// (subject, idempotency key) -> the hold the key made.
    keys: HashMap<(String, String), ReservationId>,
}

impl LocalHolds {
    /// Remember a new hold; `false` if the table is full (after forgetting those over a day
    /// old).
    pub fn insert(&mut self, id: ReservationId, hold: LocalHold, now_us: u64) -> bool {
        self.forget_old(now_us);
        if self.holds.len() >= MAX_LOCAL_HOLDS {
            return false;
        }
        self.order.push_back((hold.created_us, id));
        if let Some(key) = &hold.key {
            self.keys.insert(key.clone(), id);
        }
        self.holds.insert(id, hold);
        true
    }

    /// The hold an earlier Reserve with this subject and key made, if remembered.
    pub fn by_key(&self, subject: &str, key: &str) -> Option<(ReservationId, &LocalHold)> {
        let id = *self.keys.get(&(subject.to_string(), key.to_string()))?;
        self.holds.get(&id).map(|h| (id, h))
    }

    /// A remembered hold.
    pub fn get_mut(&mut self, id: ReservationId) -> Option<&mut LocalHold> {
        self.holds.get_mut(&id)
    }

    fn forget_old(&mut self, now_us: u64) {
        while let Some(&(created, id)) = self.order.front() {
            if created.saturating_add(MICROS_PER_DAY) > now_us {
                break;
            }
            self.order.pop_front();
            if let Some(hold) = self.holds.remove(&id) {
                if let Some(key) = hold.key {
                    if self.keys.get(&key) == Some(&id) {
                        self.keys.remove(&key);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(created_us: u64) -> LocalHold {
        LocalHold {
            caller: None,
            tokens: 10,
            created_us,
            expires_us: created_us + 1,
            committed: None,
            refunded: false,
            max_lifetime_us: 10,
            max_extend_us: 10,
            key: None,
        }
    }

    #[test]
    fn holds_are_forgotten_after_a_day_and_bounded() {
        let mut h = LocalHolds::default();
        assert!(h.insert(ReservationId(1), hold(0), 0));
        assert!(h.get_mut(ReservationId(1)).is_some());
        assert!(h.insert(ReservationId(2), hold(MICROS_PER_DAY), MICROS_PER_DAY));
        assert!(
            h.get_mut(ReservationId(1)).is_none(),
            "a day old: forgotten"
        );
        assert_eq!(h.holds.len(), 1);
        for i in 3..(MAX_LOCAL_HOLDS as u128 + 2) {
            assert!(h.insert(ReservationId(i), hold(MICROS_PER_DAY), MICROS_PER_DAY));
        }
        assert!(!h.insert(
            ReservationId(u128::MAX),
            hold(MICROS_PER_DAY),
            MICROS_PER_DAY
        ));
    }
}
