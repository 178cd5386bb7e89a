//! Randomised tests of the engine against its invariants: thousands of random Reserves,
//! Commits, Refunds and clock moves, with every invariant checked after each step, and the
//! mutation records replayed into a fresh engine that must agree with the original.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::*;
use crate::clock::{MICROS_PER_MINUTE, MICROS_PER_SECOND};

/// A small deterministic generator (xorshift64*), so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const POLICY: &str = r#"
default_tier = "free"

[tiers.free]
tokens_per_minute = 3000
burst_tokens = 5000
requests_per_minute = 30
tokens_per_day = 20000
max_concurrent = 4
hold_seconds = 30

[tiers.open]
hold_seconds = 45
"#;

/// 2026-03-10T23:50:00Z: ten minutes before midnight, so runs cross a UTC day.
const START: u64 = 1_773_186_600_000_000;

/// The persisted image: what the mutations say, key by key.
#[derive(Default)]
struct Disk {
    subjects: BTreeMap<String, SubjectState>,
    reservations: BTreeMap<ReservationId, Reservation>,
    assignments: BTreeMap<String, String>,
}

impl Disk {
    fn apply(&mut self, muts: Vec<Mutation>) {
        for m in muts {
            match m {
                Mutation::Subject { subject, state } => match state {
                    Some(s) => {
                        self.subjects.insert(subject, s);
                    }
                    None => {
                        self.subjects.remove(&subject);
                    }
                },
                Mutation::Reservation { id, record } => match record {
                    Some(r) => {
                        self.reservations.insert(id, *r);
                    }
                    None => {
                        self.reservations.remove(&id);
                    }
                },
                Mutation::Assignment { subject, tier } => match tier {
                    Some(t) => {
                        self.assignments.insert(subject, t);
                    }
                    None => {
                        self.assignments.remove(&subject);
                    }
                },
            }
        }
    }

    fn restore(&self, policy: Arc<Policy>) -> Engine {
        let mut e = Engine::new(policy, Bounds::default());
        let problems = e.restore(
            self.subjects.clone().into_iter().collect(),
            self.reservations.values().cloned().collect(),
            self.assignments.clone().into_iter().collect(),
        );
        assert!(problems.is_empty(), "{problems:?}");
        e
    }
}

fn check_invariants(e: &Engine, step: usize) {
    let mut held: HashMap<&str, (u64, u32)> = HashMap::new();
    let mut open = 0;
    for r in e.reservations.values() {
        if r.state == HoldState::Held {
            let h = held.entry(r.subject.as_str()).or_default();
            h.0 += r.held_tokens();
            h.1 += 1;
            open += 1;
            assert!(e.deadlines.contains(&(r.expires_us, r.id)), "step {step}");
        } else {
            let at = r.state.finished_at().unwrap();
            assert!(
                e.settled.contains(&(at, r.id)),
                "step {step}: settled index"
            );
        }
        if let Some(k) = &r.idempotency_key {
            // A key points at its newest reservation (older ones may be past retention).
            assert!(e.idempotency[&(r.subject.clone(), k.clone())] >= r.id);
        }
    }
    assert_eq!(e.open_holds, open, "step {step}: open hold count");
    assert_eq!(e.deadlines.len(), open, "step {step}: deadline index");
    assert_eq!(
        e.settled.len() + open,
        e.reservations.len(),
        "step {step}: every record is open or settled"
    );
    assert!(e.idempotency.len() <= e.reservations.len());
    for (subject, state) in &e.subjects {
        let (tokens, count) = held.get(subject.as_str()).copied().unwrap_or_default();
        assert_eq!(
            state.held_tokens, tokens,
            "step {step}: held tokens of {subject}"
        );
        assert_eq!(
            state.open_holds, count,
            "step {step}: open holds of {subject}"
        );
    }
    for subject in held.keys() {
        assert!(
            e.subjects.contains_key(*subject),
            "step {step}: holds without state"
        );
    }
}

fn usage_of_all(e: &Engine, now: u64) -> Vec<UsageReport> {
    let mut subjects: Vec<_> = e.subjects.keys().cloned().collect();
    subjects.sort();
    subjects.iter().map(|s| e.usage(s, now)).collect()
}

#[test]
fn random_operations_keep_every_invariant_and_replay_from_mutations() {
    for seed in [1u64, 7, 42, 1234, 99_991] {
        let policy = Arc::new(Policy::from_toml(POLICY, "model.toml").unwrap());
        let mut e = Engine::new(policy.clone(), Bounds::default());
        let mut disk = Disk::default();
        let mut rng = Rng(seed);
        let mut now = START;
        let subjects = ["ann", "ben", "cat", "dan"];
        let mut ids: Vec<ReservationId> = Vec::new();
        let mut over_hold_commits = 0;
        for step in 0..4_000 {
            match rng.below(100) {
                0..=44 => {
                    let subject = subjects[rng.below(4) as usize];
                    let key = (rng.below(4) == 0).then(|| format!("k{}", rng.below(20)));
                    let input = ReserveInput {
                        subject: subject.to_string(),
                        model: "m".into(),
                        prompt_tokens: rng.below(800),
                        max_output_tokens: rng.below(800),
                        idempotency_key: key,
                        hold_us: None,
                        dry_run: rng.below(10) == 0,
                        id: ReservationId::generate(now + step as u64),
                    };
                    match e.reserve(input, now) {
                        Ok((o, muts)) => {
                            if let Some(id) = o.reservation_id {
                                ids.push(id);
                            }
                            if o.decision == Decision::Denied {
                                assert!(muts.iter().all(|m| !matches!(
                                    m,
                                    Mutation::Reservation { record: Some(r), .. } if r.state == HoldState::Held
                                )), "a denial holds nothing");
                            }
                            disk.apply(muts);
                        }
                        Err(EngineError::IdempotencyConflict { .. }) => {}
                        Err(other) => panic!("seed {seed} step {step}: {other}"),
                    }
                }
                45..=69 if !ids.is_empty() => {
                    let id = ids[rng.below(ids.len() as u64) as usize];
                    let usage = Usage {
                        prompt_tokens: rng.below(900),
                        completion_tokens: rng.below(900),
                        usage_unknown: rng.below(10) == 0,
                    };
                    let usage = if usage.usage_unknown {
                        Usage {
                            prompt_tokens: 0,
                            completion_tokens: 0,
                            ..usage
                        }
                    } else {
                        usage
                    };
                    match e.commit(id, usage, now) {
                        Ok((o, muts)) => {
                            if o.settlement.debt_tokens > 0 {
                                over_hold_commits += 1;
                            }
                            disk.apply(muts);
                        }
                        Err(EngineError::IllegalTransition { .. } | EngineError::NotFound(_)) => {}
                        Err(other) => panic!("seed {seed} step {step}: {other}"),
                    }
                }
                70..=84 if !ids.is_empty() => {
                    let id = ids[rng.below(ids.len() as u64) as usize];
                    match e.refund(id, now) {
                        Ok((_, muts)) => disk.apply(muts),
                        Err(EngineError::IllegalTransition { .. } | EngineError::NotFound(_)) => {}
                        Err(other) => panic!("seed {seed} step {step}: {other}"),
                    }
                }
                85..=86 => {
                    // Only cat and dan change tier, so ann and ben stay under the day quota.
                    let subject = subjects[2 + rng.below(2) as usize];
                    let tier = if rng.below(2) == 0 { "free" } else { "open" };
                    disk.apply(e.set_subject(subject, tier).unwrap());
                }
                87 => {
                    let mut out = Vec::new();
                    e.purge_settled(now, &mut out);
                    e.forget_subjects_at_rest(now, &mut out);
                    disk.apply(out);
                }
                _ => {
                    // Move time: mostly seconds, sometimes minutes, rarely hours.
                    now += match rng.below(20) {
                        0 => rng.below(3) * 3_600 * MICROS_PER_SECOND,
                        1..=4 => rng.below(3) * MICROS_PER_MINUTE,
                        _ => rng.below(5 * MICROS_PER_SECOND),
                    };
                    let mut out = Vec::new();
                    e.expire_due(now, &mut out);
                    disk.apply(out);
                }
            }
            check_invariants(&e, step);
            // Without debt, the day quota is never exceeded by charged + held tokens.
            if over_hold_commits == 0 {
                for s in ["ann", "ben"] {
                    let spent = e.subject_state(s).day_spent(now);
                    assert!(
                        spent <= 20_000,
                        "seed {seed} step {step}: {s} spent {spent}"
                    );
                }
            }
            if step % 500 == 499 {
                let replayed = disk.restore(policy.clone());
                assert_eq!(
                    usage_of_all(&replayed, now),
                    usage_of_all(&e, now),
                    "seed {seed} step {step}"
                );
                assert_eq!(
                    replayed.reservations, e.reservations,
                    "seed {seed} step {step}"
                );
            }
        }
        let replayed = disk.restore(policy.clone());
        assert_eq!(
            usage_of_all(&replayed, now),
            usage_of_all(&e, now),
            "seed {seed}"
        );
        assert!(
            ids.len() > 100,
            "seed {seed}: the run admitted holds ({})",
            ids.len()
        );
    }
}

#[test]
fn a_denial_changes_nothing() {
    let policy = Arc::new(Policy::from_toml(POLICY, "p.toml").unwrap());
    let mut e = Engine::new(policy, Bounds::default());
    let input = |id| ReserveInput {
        subject: "ann".into(),
        model: "m".into(),
        prompt_tokens: 3_000,
        max_output_tokens: 0,
        idempotency_key: None,
        hold_us: None,
        dry_run: false,
        id: ReservationId(id),
    };
    let (first, muts) = e.reserve(input(1), START).unwrap();
    assert_eq!(first.decision, Decision::Allowed);
    assert!(!muts.is_empty());
    let before = e.usage("ann", START);
    let (second, muts) = e.reserve(input(2), START).unwrap();
    assert_eq!(second.decision, Decision::Denied);
    assert_eq!(second.denied_by, Some("tokens_per_minute"));
    assert!(muts.is_empty(), "{muts:?}");
    assert_eq!(e.usage("ann", START), before);
    assert_eq!(e.reservation_count(), 1);
}

#[test]
fn bounds_refuse_instead_of_growing() {
    let policy = Arc::new(Policy::from_toml(POLICY, "p.toml").unwrap());
    let bounds = Bounds {
        max_open_holds: 3,
        max_subjects: 2,
        ..Bounds::default()
    };
    let mut e = Engine::new(policy, bounds);
    let input = |subject: &str, id| ReserveInput {
        subject: subject.into(),
        model: "m".into(),
        prompt_tokens: 1,
        max_output_tokens: 0,
        idempotency_key: None,
        hold_us: None,
        dry_run: false,
        id: ReservationId(id),
    };
    e.reserve(input("a", 1), START).unwrap();
    e.reserve(input("b", 2), START).unwrap();
    assert_eq!(
        e.reserve(input("c", 3), START).unwrap_err(),
        EngineError::Exhausted {
            what: "subjects with live state",
            bound: 2
        }
    );
    e.reserve(input("a", 4), START).unwrap();
    assert_eq!(
        e.reserve(input("b", 5), START).unwrap_err(),
        EngineError::Exhausted {
            what: "open holds",
            bound: 3
        }
    );
    assert_eq!(e.open_holds(), 3);
}

#[test]
fn retention_is_exact_and_a_reused_key_survives_the_old_records_purge() {
    let policy = Arc::new(Policy::from_toml(POLICY, "p.toml").unwrap());
    let mut e = Engine::new(policy, Bounds::default());
    let day = Bounds::default().retention_us;
    let input = |id| ReserveInput {
        subject: "ann".into(),
        model: "m".into(),
        prompt_tokens: 10,
        max_output_tokens: 0,
        idempotency_key: Some("turn-1".into()),
        hold_us: None,
        dry_run: false,
        id: ReservationId(id),
    };
    let (first, _) = e.reserve(input(1), START).unwrap();
    let old = first.reservation_id.unwrap();
    let usage = Usage {
        prompt_tokens: 10,
        completion_tokens: 0,
        usage_unknown: false,
    };
    e.commit(old, usage, START).unwrap();
    // One microsecond inside the retention the commit still replays and the key still answers.
    assert!(e.commit(old, usage, START + day - 1).is_ok());
    let (replay, _) = e.reserve(input(2), START + day - 1).unwrap();
    assert_eq!(replay.reservation_id, Some(old));
    assert!(replay.replayed);
    // At the retention the record is gone for callers, purged or not.
    assert_eq!(
        e.commit(old, usage, START + day).unwrap_err(),
        EngineError::NotFound(old)
    );
    let (fresh, _) = e.reserve(input(3), START + day).unwrap();
    assert_eq!(fresh.reservation_id, Some(ReservationId(3)));
    assert!(!fresh.replayed);
    // Purging the old record must not drop the key's new entry.
    let mut out = Vec::new();
    assert_eq!(e.purge_settled(START + day, &mut out), 1);
    let (again, _) = e.reserve(input(4), START + day + 1).unwrap();
    assert_eq!(again.reservation_id, Some(ReservationId(3)));
    assert!(again.replayed);
}
