//! What one decision costs, and what durability adds to it.
//!
//! - `engine/*`: the pure engine in memory (what runs under the ledger's lock): a Reserve and
//!   its Commit on a tier with every limit, on one subject and round-robin over 10,000; the
//!   same with every scope (10,000 subjects in 100 groups behind 1,000 client IPs, with group,
//!   IP and fleet limits and priced models); and a Reserve that is denied.
//! - `ledger_sled/*`: the whole ledger (lock, engine, group-commit writer, sled) on a temporary
//!   data directory: strict durability with one caller at a time (every call waits for its own
//!   flush), strict with 64 concurrent callers (calls share flushes: group commit), and relaxed
//!   durability (answered before the flush) with 1 and 64 callers.
//!
//! One iteration is one Reserve plus its Commit; throughput is reported in calls (2 an
//! iteration). Run with `cargo bench --bench decision`.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

use tollgate::clock::SystemClock;
use tollgate::engine::{Bounds, Decision, Engine, ReservationId, ReserveInput, Usage};
use tollgate::ledger::LocalLedger;
use tollgate::policy::Policy;
use tollgate::store::Durability;

/// A tier with every limit, none of which a benchmark reaches.
const POLICY_ALL_LIMITS: &str = r#"
default_tier = "bench"

[tiers.bench]
tokens_per_minute = 1000000000
burst_tokens = 2000000000
requests_per_minute = 100000000
tokens_per_day = 1000000000000000
max_concurrent = 1000
hold_seconds = 300
"#;

/// Every limit in every scope, and prices, none of which a benchmark reaches.
const POLICY_ALL_SCOPES: &str = r#"
default_tier = "bench"

[tiers.bench]
tokens_per_minute = 1000000000
burst_tokens = 2000000000
requests_per_minute = 100000000
tokens_per_day = 1000000000000000
usd_per_day = 1000000000
max_concurrent = 1000
hold_seconds = 300
downgrade = { model = "gpt-4o-mini", tokens_per_day = 1000000 }

[groups.default]
tokens_per_minute = 1000000000
tokens_per_day = 1000000000000000
usd_per_month = 1000000000

[ip]
requests_per_minute = 100000000
tokens_per_minute = 1000000000

[ip.cidr."10.0.0.0/8"]
requests_per_minute = 1000000000

[global]
tokens_per_minute = 1000000000
max_concurrent = 100000

[models."gpt-4o"]
input_usd_per_million = 2.5
output_usd_per_million = 10.0

[models."gpt-4o-mini"]
input_usd_per_million = 0.15
output_usd_per_million = 0.6
"#;

/// A tier whose day is already too small for the benchmark's Reserve: every one is denied.
const POLICY_DENY: &str = r#"
default_tier = "tiny"

[tiers.tiny]
tokens_per_minute = 1000
requests_per_minute = 100
tokens_per_day = 100
max_concurrent = 10
"#;

/// 2026-03-10T12:00:00Z.
const T0: u64 = 1_773_144_000_000_000;
const PROMPT: u64 = 100;
const OUTPUT: u64 = 200;
const USAGE: Usage = Usage {
    prompt_tokens: 100,
    completion_tokens: 50,
    usage_unknown: false,
};
/// Concurrent callers in the group-commit benchmarks.
const CALLERS: u64 = 64;

fn policy(text: &str) -> Arc<Policy> {
    Arc::new(Policy::from_toml(text, "bench.toml").expect("bench policy"))
}

/// Default bounds, but few settled records kept: the benchmarks purge as they go, so memory
/// (and the sled tree) stays at a steady size however long they run.
fn bounds() -> Bounds {
    Bounds {
        max_settled: 50_000,
        ..Bounds::default()
    }
}

fn input(subject: &str, now_us: u64) -> ReserveInput {
    ReserveInput {
        caller: None,
        subject: subject.to_string(),
        model: "gpt-4o".to_string(),
        prompt_tokens: PROMPT,
        max_output_tokens: OUTPUT,
        idempotency_key: None,
        hold_us: None,
        dry_run: false,
        prompt_tokens_for: Vec::new(),
        group: None,
        client_ip: None,
        id: ReservationId::generate(now_us),
    }
}

fn engine(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(2));
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    for subjects in [1usize, 10_000] {
        let names: Vec<String> = (0..subjects).map(|i| format!("subject-{i}")).collect();
        g.bench_function(
            BenchmarkId::new("reserve+commit", format!("{subjects}_subjects")),
            |b| {
                let mut engine = Engine::new(policy(POLICY_ALL_LIMITS), bounds());
                let mut now = T0;
                let mut next = 0usize;
                let mut purged = Vec::new();
                b.iter(|| {
                    // A millisecond a decision: windows slide and buckets refill as in service.
                    now += 1_000;
                    let subject = &names[next % names.len()];
                    next += 1;
                    let mut muts = Vec::new();
                    let reserved = engine.reserve(input(subject, now), now, &mut muts).unwrap();
                    let id = reserved.reservation_id.expect("allowed");
                    let committed = engine.commit(id, USAGE, now, &mut muts).unwrap();
                    // What the sweeper does, a record at a time: steady state.
                    purged.clear();
                    engine.purge_settled(now, &mut purged);
                    black_box((reserved, muts, committed, &purged));
                });
            },
        );
    }
    g.bench_function(
        BenchmarkId::new("reserve+commit", "10000_subjects_all_scopes"),
        |b| {
            let mut engine = Engine::new(policy(POLICY_ALL_SCOPES), bounds());
            let names: Vec<String> = (0..10_000).map(|i| format!("subject-{i}")).collect();
            let groups: Vec<String> = (0..100).map(|i| format!("org-{i}")).collect();
            let mut now = T0;
            let mut next = 0usize;
            let mut purged = Vec::new();
            b.iter(|| {
                now += 1_000;
                let i = next;
                next += 1;
                let mut request = input(&names[i % names.len()], now);
                request.group = Some(groups[i % groups.len()].clone());
                request.client_ip = Some(std::net::IpAddr::from([
                    10,
                    0,
                    (i % 4) as u8,
                    (i % 250) as u8,
                ]));
                let mut muts = Vec::new();
                let reserved = engine.reserve(request, now, &mut muts).unwrap();
                let id = reserved.reservation_id.expect("allowed");
                let committed = engine.commit(id, USAGE, now, &mut muts).unwrap();
                purged.clear();
                engine.purge_settled(now, &mut purged);
                black_box((reserved, muts, committed, &purged));
            });
        },
    );
    g.throughput(Throughput::Elements(1));
    g.bench_function("reserve_denied", |b| {
        let mut engine = Engine::new(policy(POLICY_DENY), bounds());
        let mut now = T0;
        b.iter(|| {
            now += 1_000;
            let mut muts = Vec::new();
            let denied = engine.reserve(input("alice", now), now, &mut muts).unwrap();
            assert_eq!(denied.decision, Decision::Denied);
            black_box((denied, muts));
        });
    });
    g.finish();
}

fn open_ledger(dir: &Path, durability: Durability) -> Arc<LocalLedger> {
    Arc::new(
        LocalLedger::open(
            dir,
            policy(POLICY_ALL_LIMITS),
            bounds(),
            durability,
            Arc::new(SystemClock),
        )
        .expect("open ledger"),
    )
}

async fn reserve_commit(ledger: &LocalLedger, subject: &str) {
    let now = ledger.now_micros();
    let reserved = ledger.reserve(input(subject, now)).await.unwrap();
    let id = reserved.reservation_id.expect("allowed");
    black_box(ledger.commit(id, USAGE).await.unwrap());
}

/// Untimed, between batches: purge settled records past the bound, and let the writer catch up
/// (relaxed durability answers before the disk does).
async fn tidy(ledger: &LocalLedger) {
    while ledger.housekeeping().await.unwrap().purged > 0 {}
    ledger.flush().await.unwrap();
}

fn ledger_sled(c: &mut Criterion) {
    let rt = Runtime::new().expect("tokio runtime");
    let mut g = c.benchmark_group("ledger_sled");
    g.throughput(Throughput::Elements(2));
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(4));
    for (name, durability) in [
        ("strict", Durability::Strict),
        ("relaxed", Durability::Relaxed),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = open_ledger(dir.path(), durability);

        g.bench_function(BenchmarkId::new(name, "1_caller"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    tidy(&ledger).await;
                    let start = Instant::now();
                    for _ in 0..iters {
                        reserve_commit(&ledger, "alice").await;
                    }
                    start.elapsed()
                })
            });
        });

        g.bench_function(BenchmarkId::new(name, format!("{CALLERS}_callers")), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    tidy(&ledger).await;
                    let per_caller = iters.div_ceil(CALLERS);
                    let start = Instant::now();
                    let mut callers = JoinSet::new();
                    for n in 0..CALLERS {
                        let ledger = ledger.clone();
                        callers.spawn(async move {
                            let subject = format!("subject-{}", n % 16);
                            for _ in 0..per_caller {
                                reserve_commit(&ledger, &subject).await;
                            }
                        });
                    }
                    while let Some(done) = callers.join_next().await {
                        done.expect("caller");
                    }
                    // Time for `iters` pairs, of the `per_caller * CALLERS` made.
                    start
                        .elapsed()
                        .mul_f64(iters as f64 / (per_caller * CALLERS) as f64)
                })
            });
        });
        drop(ledger);
    }
    g.finish();
}

criterion_group!(benches, engine, ledger_sled);
criterion_main!(benches);
