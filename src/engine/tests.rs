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

pub(super) const POLICY: &str = r#"
default_tier = "free"

[tiers.free]
tokens_per_minute = 3000
burst_tokens = 5000
requests_per_minute = 30
tokens_per_day = 20000
max_concurrent = 4
hold_seconds = 30
usd_per_day = 0.5

[tiers.open]
hold_seconds = 45
tokens_per_day = 6000
downgrade = { model = "small", tokens_per_day = 8000 }

[groups.default]
tokens_per_day = 200000

[ip]
requests_per_minute = 40

[global]
max_concurrent = 12

[models.m]
encoding = "o200k_base"
input_usd_per_million = 2.5
output_usd_per_million = 10

[models.small]
encoding = "o200k_base"
input_usd_per_million = 0.15
output_usd_per_million = 0.6

[models.other]
encoding = "o200k_base"
"#;

/// 2026-03-10T23:50:00Z: ten minutes before midnight, so runs cross a UTC day.
pub(super) const START: u64 = 1_773_186_600_000_000;

/// The persisted image: what the mutations say, key by key.
#[derive(Default)]
pub(super) struct Disk {
    scopes: BTreeMap<ScopeKey, ScopeState>,
    reservations: BTreeMap<ReservationId, Reservation>,
    assignments: BTreeMap<String, crate::policy::SubjectConfig>,
}

impl Disk {
    pub(super) fn apply(&mut self, muts: Vec<Mutation>) {
        for m in muts {
            match m {
                Mutation::Scope { key, state } => match state {
                    Some(s) => {
                        self.scopes.insert(key, s);
                    }
                    None => {
                        self.scopes.remove(&key);
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
                Mutation::Assignment { subject, config } => match config {
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

    pub(super) fn restore(&self, policy: Arc<Policy>, bounds: Bounds) -> Engine {
        let mut e = Engine::new(policy, bounds);
        let problems = e.restore(
            self.scopes.clone().into_iter().collect(),
            self.reservations.values().cloned().collect(),
            self.assignments.clone().into_iter().collect(),
        );
        assert!(problems.is_empty(), "{problems:?}");
        e
    }
}

pub(super) fn check_invariants(e: &Engine, step: usize) {
    // Per scope: (held tokens, of which on the downgrade budget, held µUSD, open holds).
    let mut held: HashMap<ScopeKey, (u64, u64, u64, u32)> = HashMap::new();
    let mut open = 0;
    e.settled.check();
    let settled = e.settled.all();
    let reservations: BTreeMap<ReservationId, Reservation> = e
        .open
        .iter()
        .map(|(id, r)| (*id, r.clone()))
        .chain(settled.iter().map(|(_, r)| (r.id, r.clone())))
        .collect();
    let settled_index: std::collections::BTreeSet<_> =
        settled.iter().map(|(at, r)| (*at, r.id)).collect();
    let idempotency = e.idempotency_keys();
    for r in reservations.values() {
        if r.state == HoldState::Held {
            for key in r.scopes() {
                let hold = r.hold_on(key.kind());
                let h = held.entry(key).or_default();
                h.0 += hold.tokens;
                h.1 += if hold.on_downgrade_budget {
                    hold.tokens
                } else {
                    0
                };
                h.2 += hold.usd;
                h.3 += 1;
            }
            open += 1;
            assert!(e.deadlines.contains(&(r.expires_us, r.id)), "step {step}");
        } else {
            let at = r.state.finished_at().unwrap();
            assert!(
                settled_index.contains(&(at, r.id)),
                "step {step}: settled index of {}",
                r.id
            );
        }
        if let Some(k) = &r.idempotency_key {
            // A key points at its newest reservation (older ones may be past retention).
            assert!(
                idempotency
                    .get(&(r.subject.clone(), k.clone()))
                    .is_some_and(|id| *id >= r.id),
                "step {step}: idempotency key {k:?} of {}",
                r.id
            );
        }
    }
    // Every index entry names a record in the state it is indexed for.
    for (at, id) in &settled_index {
        let r = reservations.get(id);
        assert_eq!(
            r.and_then(|r| r.state.finished_at()),
            Some(*at),
            "step {step}: settled entry {id}"
        );
    }
    for (deadline, id) in &e.deadlines {
        let r = reservations.get(id);
        assert!(
            r.is_some_and(|r| r.state == HoldState::Held && r.expires_us == *deadline),
            "step {step}: deadline entry {id}"
        );
    }
    for ((subject, key), id) in &idempotency {
        let r = reservations.get(id);
        assert!(
            r.is_some_and(|r| r.subject == *subject && r.idempotency_key.as_ref() == Some(key)),
            "step {step}: idempotency key {key:?} of {subject:?} names {id}, not a record with it"
        );
    }
    assert_eq!(e.open_holds(), open, "step {step}: open hold count");
    assert_eq!(e.deadlines.len(), open, "step {step}: deadline index");
    assert_eq!(
        e.settled.len() + open,
        reservations.len(),
        "step {step}: every record is open or settled"
    );
    // The sweeper's round-robin goes on from a scope in the table (or the start).
    assert!(e.rest_cursor <= e.scopes.len(), "step {step}: rest cursor");
    let b = &e.bounds;
    assert!(open <= b.max_open_holds, "step {step}: open holds");
    assert!(
        e.settled.len() <= b.max_settled,
        "step {step}: settled records"
    );
    assert!(e.scopes.len() <= b.max_scopes, "step {step}: scopes");
    for (key, state) in &e.scopes {
        let state = state.state();
        let truth = held.get(key).copied().unwrap_or_default();
        assert_eq!(
            (
                state.held_tokens,
                state.downgrade_held_tokens,
                state.held_usd,
                state.open_holds
            ),
            truth,
            "step {step}: holds of {key:?}"
        );
        if matches!(key, ScopeKey::Subject(_)) {
            assert!(
                state.open_holds <= b.max_holds_per_subject,
                "step {step}: holds of {key:?}"
            );
        }
    }
    for key in held.keys() {
        assert!(
            e.scopes.contains_key(key),
            "step {step}: holds without state"
        );
    }
}

fn usage_of_all(e: &Engine, now: u64) -> Vec<UsageReport> {
    let mut keys: Vec<_> = e.scopes.keys().cloned().collect();
    keys.sort();
    keys.iter()
        .map(|k| {
            let query = match k {
                ScopeKey::Subject(s) => UsageQuery {
                    subject: Some(s.to_string()),
                    ..UsageQuery::default()
                },
                ScopeKey::Group(g) => UsageQuery {
                    group: Some(g.to_string()),
                    ..UsageQuery::default()
                },
                ScopeKey::Ip(ip) => UsageQuery {
                    client_ip: Some(*ip),
                    ..UsageQuery::default()
                },
                ScopeKey::Global => UsageQuery::default(),
            };
            e.usage(&query, now)
        })
        .collect()
}

/// Every figure of a usage report that a period counter keeps.
fn period_figures(u: &UsageReport) -> [u64; 11] {
    [
        u.used_tokens,
        u.used_tokens_month,
        u.downgraded_tokens,
        u.requests,
        u.shadow_denials,
        u.denials,
        u.downgrades,
        u.spent_usd,
        u.spent_usd_month,
        u.saved_usd,
        u.saved_usd_month,
    ]
}

/// A subject's usage alone.
pub(super) fn of(subject: &str) -> UsageQuery {
    UsageQuery {
        subject: Some(subject.to_string()),
        ..UsageQuery::default()
    }
}

/// How a model run moves the clock and bounds the engine.
#[derive(Debug, Clone, Copy)]
struct Run {
    bounds: Bounds,
    /// Whether the clock sometimes steps back (an NTP correction), across midnight too.
    steps_back: bool,
}

/// What a run did, for the assertions that it exercised what it was meant to.
#[derive(Debug, Default)]
struct Seen {
    admitted: usize,
    downgrades: usize,
    exhausted: usize,
    /// Scopes evicted to make room.
    evicted: usize,
    steps_back: usize,
}

/// Thousands of random operations from `seed`, with every invariant checked after each, and
/// the mutation records replayed into a fresh engine that must agree with the original.
fn run_model(seed: u64, run: Run) -> Seen {
    let policy = Arc::new(Policy::from_toml(POLICY, "model.toml").unwrap());
    let mut e = Engine::new(policy.clone(), run.bounds);
    let mut disk = Disk::default();
    let mut rng = Rng(seed);
    let mut now = START;
    let subjects = ["ann", "ben", "cat", "dan"];
    let mut ids: Vec<ReservationId> = Vec::new();
    let mut over_hold_commits = 0;
    let mut seen = Seen::default();
    for step in 0..4_000 {
        match rng.below(100) {
            0..=44 => {
                let subject = subjects[rng.below(4) as usize];
                let key = (rng.below(4) == 0).then(|| format!("k{}", rng.below(20)));
                let prompt_tokens = rng.below(800);
                let input = ReserveInput {
                    caller: None,
                    subject: subject.to_string(),
                    model: ["m", "m", "small", "other"][rng.below(4) as usize].into(),
                    prompt_tokens,
                    prompt_tokens_for: vec![("small".into(), prompt_tokens / 2)],
                    max_output_tokens: rng.below(800),
                    idempotency_key: key,
                    hold_us: None,
                    dry_run: rng.below(10) == 0,
                    group: [None, Some("g1".into()), Some("g2".into())][rng.below(3) as usize]
                        .clone(),
                    client_ip: [None, Some([10, 0, 0, 1].into()), Some([10, 0, 0, 2].into())]
                        [rng.below(3) as usize],
                    id: ReservationId::generate(now + step as u64),
                };
                let dry_run = input.dry_run;
                let mut muts = Vec::new();
                let result = e.reserve(input, now, &mut muts);
                seen.evicted += muts
                    .iter()
                    .filter(|m| matches!(m, Mutation::Scope { state: None, .. }))
                    .count();
                match result {
                    Ok(o) => {
                        if let Some(id) = o.reservation_id {
                            ids.push(id);
                            seen.admitted += 1;
                        }
                        if o.replayed || dry_run {
                            assert!(muts.is_empty(), "a replay or dry run changes nothing");
                        }
                        if o.decision == Decision::Denied {
                            assert!(
                                muts.iter().all(|m| matches!(m, Mutation::Scope { .. })),
                                "a denial changes only scope counters"
                            );
                        }
                        if o.decision == Decision::Downgraded {
                            seen.downgrades += 1;
                        }
                    }
                    Err(EngineError::IdempotencyConflict { .. }) => {
                        assert!(muts.is_empty(), "a refused Reserve changes nothing");
                    }
                    Err(EngineError::Exhausted { .. }) => {
                        seen.exhausted += 1;
                        assert!(
                            muts.iter()
                                .all(|m| matches!(m, Mutation::Scope { state: None, .. })),
                            "a Reserve refused for room evicts, and changes nothing else"
                        );
                    }
                    Err(other) => panic!("seed {seed} step {step}: {other}"),
                }
                disk.apply(muts);
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
                // Mutations are kept even when the call fails: an overdue hold may have been
                // expired on the spot before the refusal.
                let mut muts = Vec::new();
                match e.commit(id, usage, now, &mut muts) {
                    Ok(o) => {
                        if o.settlement.debt_tokens > 0 {
                            over_hold_commits += 1;
                        }
                    }
                    Err(EngineError::IllegalTransition { .. } | EngineError::NotFound(_)) => {}
                    // A late Commit's debt for a forgotten scope, with the table full.
                    Err(EngineError::Exhausted { .. }) => seen.exhausted += 1,
                    Err(other) => panic!("seed {seed} step {step}: {other}"),
                }
                disk.apply(muts);
            }
            70..=84 if !ids.is_empty() => {
                let id = ids[rng.below(ids.len() as u64) as usize];
                let mut muts = Vec::new();
                match e.refund(id, now, &mut muts) {
                    Ok(_)
                    | Err(EngineError::IllegalTransition { .. } | EngineError::NotFound(_)) => {}
                    Err(other) => panic!("seed {seed} step {step}: {other}"),
                }
                disk.apply(muts);
            }
            85..=86 => {
                // Only cat and dan change tier, so ann and ben stay under the day quota.
                let subject = subjects[2 + rng.below(2) as usize];
                let tier = if rng.below(2) == 0 { "free" } else { "open" };
                let mut muts = Vec::new();
                // Sometimes with an override that tightens the day quota.
                let overrides = crate::policy::Overrides {
                    tokens_per_day: (rng.below(2) == 0).then_some(5_000),
                    ..Default::default()
                };
                let group = (rng.below(2) == 0).then(|| "g1".to_string());
                e.set_subject(subject, tier, group, overrides, &mut muts)
                    .unwrap();
                disk.apply(muts);
            }
            87 => {
                let mut out = Vec::new();
                e.purge_settled(now, &mut out);
                e.forget_scopes_at_rest(now, &mut out);
                disk.apply(out);
            }
            _ => {
                // Move time: mostly seconds, sometimes minutes, rarely hours; and, if the run
                // says so, sometimes back (seconds, minutes, or hours: across midnight too).
                let back = run.steps_back && rng.below(8) == 0;
                let by = match rng.below(20) {
                    0 => rng.below(3) * 3_600 * MICROS_PER_SECOND,
                    1..=4 => rng.below(3) * MICROS_PER_MINUTE,
                    _ => rng.below(5 * MICROS_PER_SECOND),
                };
                if back {
                    let before = usage_of_all(&e, now);
                    now -= by;
                    seen.steps_back += 1;
                    // What a period counts is never forgotten because the clock stepped back:
                    // a count left in a later period reads as the current one.
                    for (was, is) in before.iter().zip(usage_of_all(&e, now)) {
                        assert!(
                            period_figures(&is)
                                .iter()
                                .zip(period_figures(was))
                                .all(|(is, was)| *is >= was),
                            "seed {seed} step {step}: {was:?} became {is:?}"
                        );
                    }
                } else {
                    now += by;
                }
                // Half the time expiry is left to later, as when a bounded pass has not
                // reached a hold yet: Commit and Refund must expire overdue holds themselves.
                if rng.below(2) == 0 {
                    let mut out = Vec::new();
                    e.expire_due(now, &mut out);
                    disk.apply(out);
                }
            }
        }
        // Every step at first, then every 8th: a check decodes every settled record (see
        // settled.rs), which in a debug build made the run take half a minute.
        if step < 256 || step % 8 == 0 {
            check_invariants(&e, step);
        }
        // Without debt, the day quota is never exceeded by charged + held tokens.
        if over_hold_commits == 0 {
            for s in ["ann", "ben"] {
                let u = e.usage(&of(s), now);
                let spent = u.used_tokens + u.held_tokens;
                assert!(
                    spent <= 20_000,
                    "seed {seed} step {step}: {s} spent {spent}"
                );
            }
        }
        if step % 500 == 499 {
            // A denial's counters reach the store with the sweeper's next pass: run it first
            // (as many passes as a bounded pass needs).
            loop {
                let mut out = Vec::new();
                if e.save_denial_counters(&mut out) == 0 {
                    break;
                }
                disk.apply(out);
            }
            let replayed = disk.restore(policy.clone(), run.bounds);
            assert_eq!(
                usage_of_all(&replayed, now),
                usage_of_all(&e, now),
                "seed {seed} step {step}"
            );
            assert_eq!(
                replayed.all_reservations(),
                e.all_reservations(),
                "seed {seed} step {step}"
            );
            assert_eq!(replayed.scopes, e.scopes, "seed {seed} step {step}");
            assert_eq!(
                replayed.idempotency_keys(),
                e.idempotency_keys(),
                "seed {seed} step {step}"
            );
        }
    }
    let replayed = disk.restore(policy.clone(), run.bounds);
    assert_eq!(
        usage_of_all(&replayed, now),
        usage_of_all(&e, now),
        "seed {seed}"
    );
    seen
}

const SEEDS: [u64; 5] = [1, 7, 42, 1234, 99_991];

#[test]
fn random_operations_keep_every_invariant_and_replay_from_mutations() {
    let run = Run {
        bounds: Bounds::default(),
        steps_back: false,
    };
    for seed in SEEDS {
        let seen = run_model(seed, run);
        assert!(
            seen.admitted > 100,
            "seed {seed}: the run admitted holds ({})",
            seen.admitted
        );
        assert!(seen.downgrades > 0, "seed {seed}: the run downgraded some");
        assert_eq!(seen.exhausted, 0, "seed {seed}: no bound is reached");
    }
}

/// The same with every bound small enough to be reached all the time (settled records purged
/// early, scopes evicted, holds refused), and a clock that steps back as well as forward.
#[test]
fn random_operations_within_small_bounds_and_a_clock_stepping_back_keep_every_invariant() {
    let run = Run {
        bounds: Bounds {
            max_open_holds: 6,
            max_holds_per_subject: 2,
            // The fleet, 4 subjects, 2 groups and 2 IPs would need 9.
            max_scopes: 7,
            max_settled: 5,
            retention_us: Bounds::default().retention_us,
            max_per_pass: 2,
        },
        steps_back: true,
    };
    for seed in SEEDS {
        let seen = run_model(seed, run);
        assert!(
            seen.admitted > 50,
            "seed {seed}: the run admitted holds ({})",
            seen.admitted
        );
        assert!(seen.exhausted > 0, "seed {seed}: the bounds were reached");
        assert!(seen.evicted > 0, "seed {seed}: scopes were evicted");
        assert!(seen.steps_back > 0, "seed {seed}: the clock stepped back");
    }
}

#[test]
fn a_denial_changes_only_the_denial_and_savings_counters() {
    let policy = Arc::new(Policy::from_toml(POLICY, "p.toml").unwrap());
    let mut e = Engine::new(policy, Bounds::default());
    let input = |id| ReserveInput {
        caller: None,
        subject: "ann".into(),
        model: "m".into(),
        prompt_tokens: 3_000,
        max_output_tokens: 0,
        idempotency_key: None,
        hold_us: None,
        dry_run: false,
        prompt_tokens_for: Vec::new(),
        group: None,
        client_ip: None,
        id: ReservationId(id),
    };
    let mut muts = Vec::new();
    let first = e.reserve(input(1), START, &mut muts).unwrap();
    assert_eq!(first.decision, Decision::Allowed);
    assert!(!muts.is_empty());
    let before = e.usage(&of("ann"), START);
    let mut muts = Vec::new();
    let second = e.reserve(input(2), START, &mut muts).unwrap();
    assert_eq!(second.decision, Decision::Denied);
    assert_eq!(second.denied_by.as_deref(), Some("tokens_per_minute"));
    // 3,000 prompt tokens of "m" at $2.50 per million: 7,500 µUSD saved.
    assert_eq!(second.saved_usd, 7_500);
    let after = e.usage(&of("ann"), START);
    assert_eq!(
        after,
        UsageReport {
            denials: 1,
            saved_usd: 7_500,
            saved_usd_month: 7_500,
            ..before
        }
    );
    // The denial pushes no record (nobody waits for it, and a flood must not cost a write
    // each); the sweeper's next pass hands its counters to the store, once per scope.
    assert!(muts.is_empty(), "{muts:?}");
    e.reserve(input(3), START, &mut muts).unwrap();
    assert!(muts.is_empty(), "{muts:?}");
    let mut saved = Vec::new();
    assert_eq!(e.save_denial_counters(&mut saved), 2, "ann and the fleet");
    assert!(saved.iter().any(|m| matches!(
        m,
        Mutation::Scope { key: ScopeKey::Subject(s), state: Some(st) }
            if &**s == "ann" && st.day_denials.get(crate::clock::utc_day(START)) == 2
    )));
    assert_eq!(e.save_denial_counters(&mut saved), 0, "saved once");
    assert_eq!(e.reservation_count(), 1);
}

#[test]
fn bounds_refuse_instead_of_growing() {
    let policy = Arc::new(Policy::from_toml(POLICY, "p.toml").unwrap());
    let bounds = Bounds {
        max_open_holds: 3,
        // Two subjects and the fleet.
        max_scopes: 3,
        ..Bounds::default()
    };
    let mut e = Engine::new(policy, bounds);
    let input = |subject: &str, id| ReserveInput {
        caller: None,
        subject: subject.into(),
        model: "m".into(),
        prompt_tokens: 1,
        max_output_tokens: 0,
        idempotency_key: None,
        hold_us: None,
        dry_run: false,
        prompt_tokens_for: Vec::new(),
        group: None,
        client_ip: None,
        id: ReservationId(id),
    };
    e.reserve(input("a", 1), START, &mut Vec::new()).unwrap();
    e.reserve(input("b", 2), START, &mut Vec::new()).unwrap();
    assert_eq!(
        e.reserve(input("c", 3), START, &mut Vec::new())
            .unwrap_err(),
        EngineError::Exhausted {
            what: "scopes with live state",
            bound: 3
        }
    );
    e.reserve(input("a", 4), START, &mut Vec::new()).unwrap();
    assert_eq!(
        e.reserve(input("b", 5), START, &mut Vec::new())
            .unwrap_err(),
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
        caller: None,
        subject: "ann".into(),
        model: "m".into(),
        prompt_tokens: 10,
        max_output_tokens: 0,
        idempotency_key: Some("turn-1".into()),
        hold_us: None,
        dry_run: false,
        prompt_tokens_for: Vec::new(),
        group: None,
        client_ip: None,
        id: ReservationId(id),
    };
    let first = e.reserve(input(1), START, &mut Vec::new()).unwrap();
    let old = first.reservation_id.unwrap();
    let usage = Usage {
        prompt_tokens: 10,
        completion_tokens: 0,
        usage_unknown: false,
    };
    e.commit(old, usage, START, &mut Vec::new()).unwrap();
    // One microsecond inside the retention the commit still replays and the key still answers.
    assert!(e
        .commit(old, usage, START + day - 1, &mut Vec::new())
        .is_ok());
    let replay = e
        .reserve(input(2), START + day - 1, &mut Vec::new())
        .unwrap();
    assert_eq!(replay.reservation_id, Some(old));
    assert!(replay.replayed);
    // At the retention the record is gone for callers, purged or not.
    assert_eq!(
        e.commit(old, usage, START + day, &mut Vec::new())
            .unwrap_err(),
        EngineError::NotFound(old)
    );
    let fresh = e.reserve(input(3), START + day, &mut Vec::new()).unwrap();
    assert_eq!(fresh.reservation_id, Some(ReservationId(3)));
    assert!(!fresh.replayed);
    // Purging the old record must not drop the key's new entry.
    let mut out = Vec::new();
    assert_eq!(e.purge_settled(START + day, &mut out), 1);
    let again = e
        .reserve(input(4), START + day + 1, &mut Vec::new())
        .unwrap();
    assert_eq!(again.reservation_id, Some(ReservationId(3)));
    assert!(again.replayed);
}

pub(super) fn one_token(subject: &str, id: u128) -> ReserveInput {
    ReserveInput {
        caller: None,
        subject: subject.into(),
        model: "m".into(),
        prompt_tokens: 1,
        max_output_tokens: 0,
        idempotency_key: None,
        hold_us: None,
        dry_run: false,
        prompt_tokens_for: Vec::new(),
        group: None,
        client_ip: None,
        id: ReservationId(id),
    }
}

#[test]
fn subjects_at_rest_are_forgotten_a_bounded_number_per_pass() {
    let policy = Arc::new(Policy::from_toml(POLICY, "p.toml").unwrap());
    let bounds = Bounds {
        max_per_pass: 10,
        // 25 subjects and the fleet.
        max_scopes: 26,
        ..Bounds::default()
    };
    let mut e = Engine::new(policy, bounds);
    let mut out = Vec::new();
    for i in 0..25u32 {
        let id = e
            .reserve(
                one_token(&format!("s{i}"), u128::from(i) + 1),
                START,
                &mut out,
            )
            .unwrap()
            .reservation_id
            .unwrap();
        e.refund(id, START, &mut out).unwrap();
    }
    // Full: a new subject is refused at once (no scan in the request path).
    assert_eq!(
        e.reserve(one_token("new", 100), START, &mut out)
            .unwrap_err(),
        EngineError::Exhausted {
            what: "scopes with live state",
            bound: 26
        }
    );
    // Today they have requests on record, so none is at rest yet.
    assert_eq!(e.forget_scopes_at_rest(START, &mut out), 0);
    assert_eq!(e.scope_count(), 26);
    // Tomorrow they are: each pass forgets at most 10, with a delete record for each.
    let tomorrow = START + crate::clock::MICROS_PER_DAY;
    let mut deletes = Vec::new();
    assert_eq!(e.forget_scopes_at_rest(tomorrow, &mut deletes), 10);
    assert_eq!(deletes.len(), 10);
    assert!(deletes
        .iter()
        .all(|m| matches!(m, Mutation::Scope { state: None, .. })));
    assert_eq!(e.forget_scopes_at_rest(tomorrow, &mut deletes), 10);
    assert_eq!(e.forget_scopes_at_rest(tomorrow, &mut deletes), 6);
    assert_eq!(e.scope_count(), 0);
    assert!(e.reserve(one_token("new", 101), tomorrow, &mut out).is_ok());
}

#[test]
fn an_overdue_hold_beyond_a_bounded_pass_is_expired_by_its_own_settlement() {
    let policy = Arc::new(Policy::from_toml(POLICY, "p.toml").unwrap());
    let bounds = Bounds {
        max_per_pass: 1,
        ..Bounds::default()
    };
    let mut e = Engine::new(policy, bounds);
    let mut out = Vec::new();
    let a = e.reserve(one_token("open-a", 1), START, &mut out).unwrap();
    let b = e.reserve(one_token("open-b", 2), START, &mut out).unwrap();
    let (a, b) = (a.reservation_id.unwrap(), b.reservation_id.unwrap());
    // The "open" tier is not assigned: free's hold_seconds (30) applies.
    let later = START + 31 * MICROS_PER_SECOND;
    assert_eq!(e.expire_due(later, &mut out), 1, "the pass is bounded");
    let mut muts = Vec::new();
    let err = e.refund(b, later, &mut muts).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::IllegalTransition {
                state: "EXPIRED",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        !muts.is_empty(),
        "the expiry made on the spot is returned with the refusal"
    );
    assert_eq!(e.usage(&of("open-b"), later).used_tokens, 1);
    assert_eq!(e.usage(&of("open-b"), later).open_holds, 0);
    // The first was expired by the pass: a late Commit reconciles it.
    let c = e
        .commit(
            a,
            Usage {
                prompt_tokens: 0,
                completion_tokens: 0,
                usage_unknown: false,
            },
            later,
            &mut muts,
        )
        .unwrap();
    assert_eq!(c.settlement.charged_tokens, 0);
    assert_eq!(e.usage(&of("open-a"), later).used_tokens, 0);
}

/// A hold whose deadline fell in a day the scope has already left behind (an expiry pass
/// running late, after midnight) is not charged to today, and its late Commit gives nothing
/// back to today either: today counts only today's usage.
#[test]
fn a_late_expiry_from_yesterday_does_not_charge_today() {
    let policy = Arc::new(Policy::from_toml(POLICY, "p.toml").unwrap());
    let mut e = Engine::new(policy, Bounds::default());
    let mut out = Vec::new();
    let input = |tokens, id| ReserveInput {
        caller: None,
        prompt_tokens: tokens,
        model: "small".into(),
        ..one_token("ann", id)
    };
    // 23:50: a 100-token hold that expires at 23:50:30, unsettled.
    let old = e.reserve(input(100, 1), START, &mut out).unwrap();
    let old = old.reservation_id.unwrap();
    // 00:01 the next day, before any expiry pass: 10 tokens used today.
    let now = START + 11 * MICROS_PER_MINUTE;
    let used = |u: u64| Usage {
        prompt_tokens: u,
        completion_tokens: 0,
        usage_unknown: false,
    };
    let today = e.reserve(input(10, 2), now, &mut out).unwrap();
    e.commit(today.reservation_id.unwrap(), used(10), now, &mut out)
        .unwrap();
    assert_eq!(e.usage(&of("ann"), now).used_tokens, 10);
    // The pass reaches the old hold now: yesterday's hold does not land on today.
    assert_eq!(e.expire_due(now, &mut out), 1);
    assert_eq!(e.usage(&of("ann"), now).used_tokens, 10);
    assert_eq!(e.usage(&UsageQuery::default(), now).used_tokens, 10);
    // Its late Commit (nothing was used) changes today by nothing either.
    e.commit(old, used(0), now, &mut out).unwrap();
    assert_eq!(e.usage(&of("ann"), now).used_tokens, 10);
}
