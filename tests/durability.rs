//! "Nothing acknowledged is ever lost": the real binary, killed with SIGKILL (`kill -9`, no
//! shutdown path runs) right after, or in the middle of, its answers, then restarted over the
//! same data directory. Also: a bad policy file stops the binary with `file:line: reason`, and a
//! call the engine refuses keeps the expiries it made on the way.
//!
//! The binary runs on the real clock, so nothing here depends on timing: holds live an hour (none
//! expires during a test), and the day-bound figures (used tokens, requests) are only compared
//! when the test did not straddle a UTC midnight.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::{Code, Status};

use tollgate::clock::{utc_day, Clock, ManualClock, SystemClock};
use tollgate::engine::{Bounds, EngineError, ReservationId, ReserveInput, Usage};
use tollgate::ledger::{LedgerError, LocalLedger};
use tollgate::policy::Policy;
use tollgate::proto::quota_client::QuotaClient;
use tollgate::proto::{CommitRequest, Decision, GetSubjectRequest, GetUsageResponse};
use tollgate::store::Durability;

/// Two tiers with every token limit far away and hour-long holds (max_concurrent absent).
const POLICY_TWO_TIERS: &str = r#"
default_tier = "basic"

[tiers.basic]
tokens_per_minute = 100000000
requests_per_minute = 1000000
tokens_per_day = 1000000
hold_seconds = 3600

[tiers.gold]
tokens_per_minute = 100000000
requests_per_minute = 1000000
tokens_per_day = 1000000
hold_seconds = 3600
max_hold_seconds = 7200
"#;

/// Today's UTC day by the wall clock (the binary's clock).
fn today() -> u32 {
    utc_day(SystemClock.now_micros())
}

/// `tollgate serve` arguments: a policy file, strict durability, an admin token.
fn strict_args(policy: &Path) -> Vec<String> {
    vec![
        "--policy".into(),
        policy.display().to_string(),
        "--durability".into(),
        "strict".into(),
        "--admin-token".into(),
        ADMIN_TOKEN.into(),
    ]
}

/// Reserve and insist on an allowed hold; returns its id.
async fn hold(q: &mut QuotaClient<Channel>, subject: &str, prompt: u64, output: u64) -> String {
    let r = rsv(q, reserve(subject, prompt, output)).await;
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    assert_eq!(r.reserved_tokens, prompt + output);
    r.reservation_id
}

/// (used, held, open holds, requests) of a usage answer.
fn figures(u: &GetUsageResponse) -> (u64, u64, u32, u64) {
    (u.used_tokens, u.held_tokens, u.open_holds, u.requests)
}

/// (a) Every kind of acknowledged change, then `kill -9` at once: a restart has all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_change_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", POLICY_TWO_TIERS);
    let data = dir.path().join("data");
    let args = strict_args(&policy);
    let day = today();

    let server = Process::serve(&data, &args);
    let mut q = server.quota().await;
    let mut a = server.admin().await;

    let set = a
        .set_subject(set_subject_req("alice", "gold"))
        .await
        .expect("SetSubject")
        .into_inner();
    assert_eq!(set.tier, "gold");

    // Committed below the hold: 120 charged, 180 back.
    let r1 = hold(&mut q, "alice", 100, 200).await;
    let c1 = commit(&mut q, &r1, 50, 70).await;
    assert_eq!(
        (c1.charged_tokens, c1.released_tokens, c1.debt_tokens),
        (120, 180, 0)
    );
    // Refunded: nothing charged.
    let r2 = hold(&mut q, "alice", 300, 0).await;
    let f2 = q.refund(refund_req(&r2)).await.unwrap().into_inner();
    assert_eq!(f2.released_tokens, 300);
    // Left open, with an idempotency key.
    let mut keyed = reserve("alice", 10, 20);
    keyed.idempotency_key = "k3".into();
    let r3 = rsv(&mut q, keyed.clone()).await;
    assert_eq!(decision(&r3), Decision::Allowed);
    let r3 = r3.reservation_id;
    // Committed with unknown usage: the full hold (10) is charged.
    let r4 = hold(&mut q, "alice", 5, 5).await;
    let c4 = q
        .commit(CommitRequest {
            reservation_id: r4.clone(),
            usage_unknown: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((c4.charged_tokens, c4.released_tokens), (10, 0));
    // Committed above the hold: 40 charged, 20 of them debt.
    let r5 = hold(&mut q, "alice", 10, 10).await;
    let c5 = commit(&mut q, &r5, 10, 30).await;
    assert_eq!(
        (c5.charged_tokens, c5.released_tokens, c5.debt_tokens),
        (40, 0, 20)
    );
    // Another subject, default tier, left open.
    let r6 = hold(&mut q, "bob", 7, 8).await;
    // The last answer: a Commit. Then kill -9 at once.
    let r7 = hold(&mut q, "bob", 1, 1).await;
    let c7 = commit(&mut q, &r7, 1, 0).await;
    assert_eq!(c7.charged_tokens, 1);
    server.kill9();

    // What the acknowledged answers imply.
    let alice = (120 + 10 + 40, 30, 1, 5);
    let bob = (1, 15, 1, 2);

    let server = Process::serve(&data, &args);
    let mut q = server.quota().await;
    let mut a = server.admin().await;
    let ua = usage(&mut q, "alice").await;
    let ub = usage(&mut q, "bob").await;
    assert_eq!(ua.tier, "gold", "the tier assignment survived");
    assert_eq!(ub.tier, "basic");
    let got = a
        .get_subject(GetSubjectRequest {
            subject: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.tier.as_str(), got.assigned), ("gold", true));
    // Holds are not day-bound: always exact.
    assert_eq!((ua.held_tokens, ua.open_holds), (alice.1, alice.2));
    assert_eq!((ub.held_tokens, ub.open_holds), (bob.1, bob.2));
    if today() == day {
        assert_eq!(figures(&ua), alice, "alice after kill -9: {ua:?}");
        assert_eq!(figures(&ub), bob, "bob after kill -9: {ub:?}");
    }

    // Settled reservations replay their first answers.
    let again = commit(&mut q, &r1, 50, 70).await;
    assert_eq!(
        (
            again.charged_tokens,
            again.released_tokens,
            again.debt_tokens
        ),
        (120, 180, 0)
    );
    let again = commit(&mut q, &r5, 10, 30).await;
    assert_eq!((again.charged_tokens, again.debt_tokens), (40, 20));
    let again = q
        .commit(CommitRequest {
            reservation_id: r4.clone(),
            usage_unknown: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.charged_tokens, 10);
    let again = commit(&mut q, &r7, 1, 0).await;
    assert_eq!(again.charged_tokens, 1);
    let again = q.refund(refund_req(&r2)).await.unwrap().into_inner();
    assert_eq!(again.released_tokens, 300);
    // ... and keep their states: a refunded hold cannot be committed, a committed one not
    // refunded, and a Commit with other usage conflicts.
    let e = q.commit(commit_req(&r2, 1, 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = q.refund(refund_req(&r1)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = q.commit(commit_req(&r1, 50, 71)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // The idempotency key still answers with the first hold, and holds nothing more.
    let replay = rsv(&mut q, keyed).await;
    assert_eq!(replay.reservation_id, r3);
    assert_eq!(replay.reserved_tokens, 30);
    assert_eq!(
        (usage(&mut q, "alice").await.held_tokens),
        30,
        "a replay holds nothing"
    );

    // The open holds can still be settled.
    let c3 = commit(&mut q, &r3, 10, 5).await;
    assert_eq!((c3.charged_tokens, c3.released_tokens), (15, 15));
    let f6 = q.refund(refund_req(&r6)).await.unwrap().into_inner();
    assert_eq!(f6.released_tokens, 15);
    let alice = (alice.0 + 15, 0, 0, alice.3);
    let bob = (bob.0, 0, 0, bob.3);

    // And what was acknowledged after the restart survives a second kill -9.
    server.kill9();
    let server = Process::serve(&data, &args);
    let mut q = server.quota().await;
    let ua = usage(&mut q, "alice").await;
    let ub = usage(&mut q, "bob").await;
    assert_eq!((ua.held_tokens, ua.open_holds), (0, 0));
    assert_eq!((ub.held_tokens, ub.open_holds), (0, 0));
    if today() == day {
        assert_eq!(
            figures(&ua),
            alice,
            "alice after the second kill -9: {ua:?}"
        );
        assert_eq!(figures(&ub), bob, "bob after the second kill -9: {ub:?}");
    }
    assert_eq!(ua.tier, "gold");
    let again = commit(&mut q, &r3, 10, 5).await;
    assert_eq!(again.charged_tokens, 15);
    server.kill9();
}

const LOAD_TASKS: usize = 16;
const LOAD_SUBJECTS: usize = 4;
/// Each task stops after this many Reserves (a bound; the kill comes first).
const MAX_RESERVES_PER_TASK: usize = 2_000;
/// ... or after this long.
const LOAD_DEADLINE: Duration = Duration::from_secs(3);
/// The server is killed this long after the load starts, or once half of all the Reserves the
/// tasks may make are acknowledged, whichever is first: either way while they are sending.
const KILL_AFTER: Duration = Duration::from_millis(1_500);
const PROMPT: u64 = 10;
const OUTPUT: u64 = 20;
const HELD: u64 = PROMPT + OUTPUT;
/// What a committing task reports: 10 prompt + 5 completion.
const CHARGED: u64 = 15;

/// What one load task saw.
#[derive(Debug, Default)]
struct TaskLog {
    subject: String,
    commits: bool,
    /// Reservation ids whose Reserve was acknowledged.
    reserved: Vec<String>,
    /// Ids whose Commit was acknowledged (a prefix of `reserved`).
    committed: Vec<String>,
    /// A Reserve sent whose answer never came (it may or may not have landed).
    reserve_in_flight: bool,
    /// A Commit sent whose answer never came (it may or may not have landed).
    commit_in_flight: Option<String>,
    /// The error that stopped the task, if one did.
    error: Option<Status>,
}

async fn load_task(url: String, n: usize, acked: Arc<AtomicUsize>, start: Instant) -> TaskLog {
    let mut log = TaskLog {
        subject: format!("load-{}", n % LOAD_SUBJECTS),
        // Half the tasks Commit each hold; the others leave them open.
        commits: n % 2 == 0,
        ..TaskLog::default()
    };
    let mut q = QuotaClient::connect(url).await.expect("connect");
    while log.reserved.len() < MAX_RESERVES_PER_TASK && start.elapsed() < LOAD_DEADLINE {
        let id = match q.reserve(reserve(&log.subject, PROMPT, OUTPUT)).await {
            Ok(r) => {
                let r = r.into_inner();
                assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
                acked.fetch_add(1, Ordering::Relaxed);
                log.reserved.push(r.reservation_id.clone());
                r.reservation_id
            }
            Err(e) => {
                log.reserve_in_flight = true;
                log.error = Some(e);
                break;
            }
        };
        if log.commits {
            match q.commit(commit_req(&id, PROMPT, CHARGED - PROMPT)).await {
                Ok(c) => {
                    assert_eq!(c.into_inner().charged_tokens, CHARGED);
                    log.committed.push(id);
                }
                Err(e) => {
                    log.commit_in_flight = Some(id);
                    log.error = Some(e);
                    break;
                }
            }
        }
    }
    log
}

/// What the logs of one subject's tasks imply.
#[derive(Debug, Default, Clone, Copy)]
struct Expect {
    /// Acknowledged Reserves.
    reserves: u64,
    /// Reserves in flight at the kill.
    reserves_in_flight: u64,
    /// Acknowledged Commits.
    commits: u64,
    /// Commits in flight at the kill.
    commits_in_flight: u64,
    /// Acknowledged holds never committed nor sent a Commit.
    open: u64,
}

fn expectations(logs: &[TaskLog], subject: &str) -> Expect {
    let mut x = Expect::default();
    for log in logs.iter().filter(|l| l.subject == subject) {
        x.reserves += log.reserved.len() as u64;
        x.reserves_in_flight += u64::from(log.reserve_in_flight);
        x.commits += log.committed.len() as u64;
        x.commits_in_flight += u64::from(log.commit_in_flight.is_some());
        if !log.commits {
            x.open += log.reserved.len() as u64;
        }
    }
    x
}

/// (b) 16 clients hammer Reserve (+ Commit for half) and the server is killed under them: every
/// acknowledged hold and Commit is there after the restart; unacknowledged ones may or may not be.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_work_survives_kill_9_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", POLICY_LOAD);
    let data = dir.path().join("data");
    let args = strict_args(&policy);
    let day = today();

    let server = Process::serve(&data, &args);
    let acked = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for n in 0..LOAD_TASKS {
        tasks.spawn(load_task(server.url(), n, acked.clone(), start));
    }
    let half = LOAD_TASKS * MAX_RESERVES_PER_TASK / 2;
    while start.elapsed() < KILL_AFTER && acked.load(Ordering::Relaxed) < half {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at_kill = acked.load(Ordering::Relaxed);
    server.kill9();
    let mut logs = Vec::new();
    while let Some(log) = tasks.join_next().await {
        logs.push(log.expect("load task"));
    }

    let cut = logs.iter().filter(|l| l.error.is_some()).count();
    assert!(
        cut > 0,
        "the kill came after every task had finished: {at_kill} acknowledged"
    );
    for log in &logs {
        if let Some(e) = &log.error {
            assert!(
                !matches!(
                    e.code(),
                    Code::InvalidArgument
                        | Code::NotFound
                        | Code::FailedPrecondition
                        | Code::ResourceExhausted
                ),
                "a task was refused by the server, not cut by the kill: {e:?}"
            );
        }
    }
    let total: usize = logs.iter().map(|l| l.reserved.len()).sum();
    assert!(total > 0, "nothing was acknowledged before the kill");
    eprintln!(
        "load: {total} Reserves and {} Commits acknowledged in {:?}; {cut} of {LOAD_TASKS} tasks cut by the kill",
        logs.iter().map(|l| l.committed.len()).sum::<usize>(),
        start.elapsed()
    );

    let server = Process::serve(&data, &args);
    let mut q = server.quota().await;
    let subjects: Vec<String> = (0..LOAD_SUBJECTS).map(|s| format!("load-{s}")).collect();
    let same_day = || today() == day;

    // Before anything is settled: every acknowledged operation is counted, and at most the
    // in-flight ones beyond.
    let mut requests = Vec::new();
    for subject in &subjects {
        let x = expectations(&logs, subject);
        let u = usage(&mut q, subject).await;
        let open_min = x.open;
        let open_max = x.open + x.reserves_in_flight + x.commits_in_flight;
        assert!(
            (open_min..=open_max).contains(&u64::from(u.open_holds)),
            "{subject}: {} open holds, acknowledged imply {open_min}..={open_max}: {x:?}",
            u.open_holds
        );
        assert_eq!(
            u.held_tokens,
            u64::from(u.open_holds) * HELD,
            "{subject}: {u:?}"
        );
        if same_day() {
            assert!(
                (x.reserves..=x.reserves + x.reserves_in_flight).contains(&u.requests),
                "{subject}: {} requests, acknowledged {}: {x:?}",
                u.requests,
                x.reserves
            );
            assert!(
                (x.commits * CHARGED..=(x.commits + x.commits_in_flight) * CHARGED)
                    .contains(&u.used_tokens),
                "{subject}: {} used, acknowledged Commits imply {}: {x:?}",
                u.used_tokens,
                x.commits * CHARGED
            );
        }
        requests.push(u.requests);
    }

    // Every acknowledged reservation exists: committed ones replay their Commit, open ones can be
    // refunded, and Commits in flight can be (re)sent with the same answer.
    enum Check {
        Commit(String),
        Refund(String),
    }
    let mut checks: Vec<Check> = Vec::new();
    for log in &logs {
        if log.commits {
            checks.extend(log.committed.iter().cloned().map(Check::Commit));
            checks.extend(log.commit_in_flight.iter().cloned().map(Check::Commit));
        } else {
            checks.extend(log.reserved.iter().cloned().map(Check::Refund));
        }
    }
    let checks = Arc::new(std::sync::Mutex::new(checks));
    let mut workers = JoinSet::new();
    for _ in 0..LOAD_TASKS {
        let checks = checks.clone();
        let mut q = q.clone();
        workers.spawn(async move {
            loop {
                let next = checks.lock().unwrap().pop();
                match next {
                    None => break,
                    Some(Check::Commit(id)) => {
                        let c = q
                            .commit(commit_req(&id, PROMPT, CHARGED - PROMPT))
                            .await
                            .unwrap_or_else(|e| panic!("Commit {id} after restart: {e:?}"))
                            .into_inner();
                        assert_eq!(c.charged_tokens, CHARGED, "{id}");
                        assert_eq!(c.released_tokens, HELD - CHARGED, "{id}");
                    }
                    Some(Check::Refund(id)) => {
                        let f = q
                            .refund(refund_req(&id))
                            .await
                            .unwrap_or_else(|e| panic!("Refund {id} after restart: {e:?}"))
                            .into_inner();
                        assert_eq!(f.released_tokens, HELD, "{id}");
                    }
                }
            }
        });
    }
    while let Some(w) = workers.join_next().await {
        w.expect("check worker");
    }

    // Settled: only Reserves in flight at the kill (whose ids nobody learned) may still hold, and
    // every known Commit is charged exactly once.
    for (subject, requests_before) in subjects.iter().zip(requests) {
        let x = expectations(&logs, subject);
        let u = usage(&mut q, subject).await;
        assert!(
            u64::from(u.open_holds) <= x.reserves_in_flight,
            "{subject}: {} holds left, {} Reserves were in flight: {u:?}",
            u.open_holds,
            x.reserves_in_flight
        );
        assert_eq!(
            u.held_tokens,
            u64::from(u.open_holds) * HELD,
            "{subject}: {u:?}"
        );
        if same_day() {
            assert_eq!(
                u.requests, requests_before,
                "{subject}: settling admits nothing"
            );
            assert_eq!(
                u.used_tokens,
                (x.commits + x.commits_in_flight) * CHARGED,
                "{subject}: {x:?}"
            );
        }
    }
    server.kill9();
}

/// (b2) Relaxed durability loses at most what the README says: what was answered since the
/// last completed write and sync. Holds are answered (before anything is written), then, with
/// a background caller keeping the writer busy, two more syncs complete (the flush count in
/// /metrics, read after the last answer, moves by two: the second sync began after the first
/// ended, so after the answers, and took everything queued by then); then `kill -9`. A restart
/// has every one of those holds. Holds answered after that, with no sync awaited, may be lost,
/// but never more than were answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relaxed_mode_loses_at_most_what_was_answered_since_the_last_sync() {
    const SYNCED: u32 = 60;
    const LATE: u32 = 60;
    const FLUSHES: &str = "tollgate_store_flush_duration_seconds_count";
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", POLICY_LOAD);
    let data = dir.path().join("data");
    let serve = Serve::new(&data)
        .policy(&policy)
        .args(["--durability", "relaxed"]);
    let (server, metrics) = start_with_metrics(serve.clone());
    let mut q = server.quota().await;
    for _ in 0..SYNCED {
        hold(&mut q, "synced", 10, 10).await;
    }
    let flushes = || metric(&scrape(metrics), FLUSHES).unwrap_or(0.0);
    let after_answers = flushes();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let background = {
        let (url, stop) = (server.url(), stop.clone());
        tokio::spawn(async move {
            let mut q = QuotaClient::connect(url).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                if q.reserve(reserve("background", 1, 1)).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut waited = 0;
    while flushes() < after_answers + 2.0 {
        waited += 1;
        assert!(waited < 3_000, "no two syncs in 30 s of relaxed load");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..LATE {
        hold(&mut q, "late", 10, 10).await;
    }
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    let _ = background.await;

    let server = serve.start();
    let mut q = server.quota().await;
    assert_eq!(usage(&mut q, "synced").await.open_holds, SYNCED);
    let late = usage(&mut q, "late").await.open_holds;
    assert!(late <= LATE, "{late} late holds, of {LATE} answered");
    eprintln!("after kill -9: {late} of the {LATE} holds answered after the last awaited sync");
    server.kill9();
}

/// (c) A bad policy file: `tollgate serve` exits non-zero, naming file, line and reason, and
/// never opens the data directory nor listens.
#[test]
fn a_bad_policy_file_stops_the_binary_with_file_line_and_reason() {
    let cases = [
        (
            "misspelt.toml",
            "default_tier = \"free\"\n\n[tiers.free]\ntokens_per_day = 500\ntokens_per_dya = 5\n",
            5,
            "tokens_per_dya",
        ),
        (
            "no-default.toml",
            "default_tier = \"gold\"\n\n[tiers.free]\ntokens_per_day = 500\n",
            1,
            "default_tier \"gold\" is not a tier",
        ),
        (
            "negative.toml",
            "default_tier = \"free\"\n[tiers.free]\ntokens_per_day = -5\n",
            3,
            "",
        ),
        (
            "holds.toml",
            "default_tier = \"free\"\n[tiers.free]\nhold_seconds = 100\nmax_hold_seconds = 50\n",
            2,
            "hold_seconds (100) must not exceed max_hold_seconds (50)",
        ),
    ];
    for (name, text, line, reason) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), name, text);
        let data = dir.path().join("data");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data)
            .arg("--policy")
            .arg(&path)
            .env("RUST_LOG", "warn");
        let out = run_to_exit(cmd, Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{name}: exit {:?}", out.status);
        let at = format!("{}:{line}:", path.display());
        assert!(
            stderr.contains(&at),
            "{name}: no {at:?} in stderr: {stderr}"
        );
        assert!(
            stderr.contains(reason),
            "{name}: no {reason:?} in stderr: {stderr}"
        );
        assert!(
            !stdout.contains("listening"),
            "{name}: it listened: {stdout}"
        );
        assert!(!data.exists(), "{name}: the data directory was created");
    }
}

/// The usage query for subject "alice".
fn alice() -> tollgate::engine::UsageQuery {
    tollgate::engine::UsageQuery {
        subject: Some("alice".into()),
        ..Default::default()
    }
}

/// A Reserve of `tokens` prompt tokens for `subject`, as the ledger takes it.
fn input(subject: &str, tokens: u64, hold_us: Option<u64>) -> ReserveInput {
    ReserveInput {
        caller: None,
        subject: subject.into(),
        model: "gpt-4o".into(),
        prompt_tokens: tokens,
        max_output_tokens: 0,
        idempotency_key: None,
        hold_us,
        dry_run: false,
        prompt_tokens_for: Vec::new(),
        group: None,
        client_ip: None,
        id: ReservationId(0),
    }
}

/// A call the engine refuses may first expire due holds (every call does); those expiries are
/// state changes like any other and must reach the disk, or a restart holds (and later charges)
/// the expired tokens a second time.
#[tokio::test]
async fn a_refused_call_keeps_the_expiries_it_made() {
    const POLICY: &str = "default_tier = \"free\"\n[tiers.free]\ntokens_per_day = 1000000\n";
    let policy = Arc::new(Policy::from_toml(POLICY, "p.toml").unwrap());
    let unknown = ReservationId::generate(T0);
    let usage = Usage {
        prompt_tokens: 1,
        completion_tokens: 0,
        usage_unknown: false,
    };
    for refused in ["commit", "refund", "reserve"] {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(T0));
        // sled's I/O threads may hold the database file (and its lock) for a moment after the
        // last handle is dropped: a reopen in the same process retries briefly.
        let open = || {
            let mut tries = 0;
            loop {
                match LocalLedger::open(
                    dir.path(),
                    policy.clone(),
                    Bounds::default(),
                    Durability::Strict,
                    clock.clone(),
                ) {
                    Ok(ledger) => return ledger,
                    Err(e) if tries < 100 => {
                        tries += 1;
                        eprintln!("reopen {tries}: {e}");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("open ledger: {e:?}"),
                }
            }
        };
        let ledger = open();
        ledger
            .reserve(input("alice", 100, Some(10 * SEC)))
            .await
            .unwrap();
        clock.advance_secs(11);
        let e = match refused {
            "commit" => ledger.commit(unknown, usage).await.map(drop),
            "refund" => ledger.refund(unknown).await.map(drop),
            // Longer than the tier's max_hold_seconds (3600).
            _ => ledger
                .reserve(input("alice", 1, Some(7200 * SEC)))
                .await
                .map(drop),
        }
        .unwrap_err();
        assert!(
            matches!(
                e,
                LedgerError::Engine(EngineError::NotFound(_) | EngineError::InvalidArgument { .. })
            ),
            "{refused}: {e:?}"
        );
        // A later decision persists alice's state (which has the expiry's charge).
        ledger.reserve(input("alice", 1, None)).await.unwrap();
        let before = ledger.usage(&alice()).await.unwrap();
        assert_eq!(
            (before.used_tokens, before.held_tokens, before.open_holds),
            (100, 1, 1),
            "{refused}"
        );
        drop(ledger);

        let ledger = open();
        let after = ledger.usage(&alice()).await.unwrap();
        assert_eq!(
            (
                after.used_tokens,
                after.held_tokens,
                after.open_holds,
                after.requests
            ),
            (100, 1, 1, 2),
            "{refused}: the expired hold came back after a restart"
        );
    }
}
