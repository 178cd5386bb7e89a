//! Keeping memory bounded: purging settled reservations after the retention, forgetting
//! subjects at rest, and rebuilding the engine from persisted records.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Engine, HoldState, Mutation, Reservation, SubjectState};
use crate::policy::SubjectConfig;

impl Engine {
    /// Remove settled reservations older than the retention, or the oldest beyond
    /// `max_settled`, with their idempotency keys (at most `max_per_pass`). Returns how many.
    pub fn purge_settled(&mut self, now_us: u64, out: &mut Vec<Mutation>) -> usize {
        let mut purged = 0;
        while purged < self.bounds.max_per_pass {
            let Some(&(at_us, _)) = self.settled.first() else {
                break;
            };
            let too_old = at_us.saturating_add(self.bounds.retention_us) <= now_us;
            let too_many = self.settled.len() > self.bounds.max_settled;
            if !too_old && !too_many {
                break;
            }
            self.purge_oldest_settled(out);
            purged += 1;
        }
        purged
    }

    /// Remove the oldest settled reservation and its idempotency key.
    pub(super) fn purge_oldest_settled(&mut self, out: &mut Vec<Mutation>) {
        let Some((_, id)) = self.settled.pop_first() else {
            return;
        };
        if let Some(r) = self.reservations.remove(&id) {
            if let Some(key) = r.idempotency_key {
                // The key may have been reused after this record's retention ran out.
                let entry = (r.subject, key);
                if self.idempotency.get(&entry) == Some(&id) {
                    self.idempotency.remove(&entry);
                }
            }
        }
        out.push(Mutation::Reservation { id, record: None });
    }

    /// Visit the next `max_per_pass` subjects in round-robin order and forget those whose
    /// state is the same as a fresh subject's. Returns how many were forgotten.
    pub fn forget_subjects_at_rest(&mut self, now_us: u64, out: &mut Vec<Mutation>) -> usize {
        let mut forgotten = 0;
        for _ in 0..self.bounds.max_per_pass.min(self.rest_queue.len()) {
            let Some(subject) = self.rest_queue.pop_front() else {
                break;
            };
            let Some(state) = self.subjects.get(&subject) else {
                continue;
            };
            let limits = self.limits_of(&subject);
            if state.is_at_rest(&limits, now_us) {
                self.subjects.remove(&subject);
                out.push(Mutation::Subject {
                    subject: subject.to_string(),
                    state: None,
                });
                forgotten += 1;
            } else {
                self.rest_queue.push_back(subject);
            }
        }
        forgotten
    }

    /// Rebuild from persisted records. Reservations are the truth for what is held: each
    /// subject's `held_tokens` and `open_holds` are recomputed from them, and a disagreement is
    /// reported (it would mean a torn write, which sled's atomic batches rule out).
    pub fn restore(
        &mut self,
        subjects: HashMap<String, SubjectState>,
        reservations: Vec<Reservation>,
        assignments: HashMap<String, SubjectConfig>,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        self.subjects = subjects
            .into_iter()
            .map(|(k, v)| (Arc::<str>::from(k), v))
            .collect();
        self.assignments = assignments;
        let mut held: HashMap<&str, (u64, u32)> = HashMap::new();
        for r in &reservations {
            if r.state == HoldState::Held {
                let e = held.entry(r.subject.as_str()).or_default();
                e.0 += r.held_tokens();
                e.1 += 1;
            }
        }
        for (subject, state) in self.subjects.iter_mut() {
            let (tokens, count) = held.remove(&**subject).unwrap_or_default();
            if state.held_tokens != tokens || state.open_holds != count {
                problems.push(format!(
                    "subject {subject:?}: stored {} tokens in {} holds, reservations say {tokens} in {count}",
                    state.held_tokens, state.open_holds
                ));
                state.held_tokens = tokens;
                state.open_holds = count;
            }
        }
        for (subject, (tokens, count)) in held {
            problems.push(format!(
                "subject {subject:?} has {count} open holds but no state"
            ));
            self.subjects.insert(
                Arc::from(subject),
                SubjectState {
                    held_tokens: tokens,
                    open_holds: count,
                    ..SubjectState::default()
                },
            );
        }
        self.rest_queue = self.subjects.keys().cloned().collect();
        for r in reservations {
            match r.state.finished_at() {
                None => {
                    self.deadlines.insert((r.expires_us, r.id));
                    self.open_holds += 1;
                }
                Some(at_us) => {
                    self.settled.insert((at_us, r.id));
                }
            }
            if let Some(key) = &r.idempotency_key {
                // A reused key belongs to its newest reservation (ids sort by time).
                let slot = self
                    .idempotency
                    .entry((r.subject.clone(), key.clone()))
                    .or_insert(r.id);
                *slot = (*slot).max(r.id);
            }
            self.reservations.insert(r.id, r);
        }
        problems
    }
}
