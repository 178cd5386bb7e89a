//! Quota.Extend (in process, on a manual clock), policy reload without a restart (the real
//! binary: SIGHUP, a changed file, a refused policy, a removed tier), and `tollgate check-policy`.
//!
//! The reload tests run on the real clock but assert nothing about timing: they wait for a
//! condition with a bounded polling loop (10 s in 50 ms steps) and fail with what they last saw
//! and the server's log. Their holds live an hour, so none expires during a test.

mod common;
use common::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prost_types::{Duration as PbDuration, Timestamp};
use tonic::{Code, Status};

use tollgate::proto::{Decision, ExtendRequest, GetSubjectRequest, GetUsageResponse};

// ------------------------------------------------------------------------------------------
// Extend
// ------------------------------------------------------------------------------------------

/// Holds of 60 s by default, at most 300 s a call and 600 s in all.
const EXTEND_POLICY: &str = r#"
default_tier = "basic"

[tiers.basic]
tokens_per_day = 1000000
hold_seconds = 60
max_hold_seconds = 300
max_hold_lifetime_seconds = 600
"#;

/// A Duration of whole seconds.
fn secs(s: i64) -> PbDuration {
    PbDuration {
        seconds: s,
        nanos: 0,
    }
}

/// The Timestamp of `us` microseconds since the epoch.
fn at(us: u64) -> Timestamp {
    Timestamp {
        seconds: i64::try_from(us / SEC).unwrap(),
        nanos: i32::try_from(us % SEC * 1_000).unwrap(),
    }
}

/// Put the manual clock at T0 + `us`.
fn set_clock(server: &TestServer, us: u64) {
    server.clock.set(T0 + us);
}

/// Reserve and insist on an allowed hold; returns its id and expiry.
async fn hold(q: &mut Quota, subject: &str, prompt: u64, output: u64) -> (String, Timestamp) {
    let r = rsv(q, reserve(subject, prompt, output)).await;
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    assert_eq!(r.reserved_tokens, prompt + output, "{r:?}");
    (r.reservation_id, r.expires_at.expect("expires_at"))
}

async fn extend(q: &mut Quota, id: &str, hold: Option<PbDuration>) -> Result<Timestamp, Status> {
    q.extend(ExtendRequest {
        reservation_id: id.to_string(),
        hold,
    })
    .await
    .map(|r| r.into_inner().expires_at.expect("expires_at"))
}

/// Extend, insisting on success.
async fn extend_ok(q: &mut Quota, id: &str, hold_secs: i64) -> Timestamp {
    extend(q, id, Some(secs(hold_secs)))
        .await
        .unwrap_or_else(|s| panic!("Extend({hold_secs} s) of {id}: {s:?}"))
}

/// Insist on an error with `code` whose message starts with `prefix` and contains every one of
/// `needles`.
fn assert_status(r: Result<Timestamp, Status>, code: Code, prefix: &str, needles: &[&str]) {
    let s = match r {
        Ok(t) => panic!("expected {code:?}, got Ok({t:?})"),
        Err(s) => s,
    };
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.message().starts_with(prefix),
        "message does not start with {prefix:?}: {:?}",
        s.message()
    );
    for n in needles {
        assert!(
            s.message().contains(n),
            "message lacks {n:?}: {:?}",
            s.message()
        );
    }
}

/// (used, held, open holds) of a subject.
async fn figures(q: &mut Quota, subject: &str) -> (u64, u64, u32) {
    let u = usage(q, subject).await;
    (u.used_tokens, u.held_tokens, u.open_holds)
}

/// Extend at 50 s of a 60 s hold: the new expiry is exactly now + hold; at 61 s (past the old
/// deadline) the hold is still HELD, and a Commit settles it as an open hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_moves_the_deadline_out_and_the_hold_stays_held_past_the_old_one() {
    let server = TestServer::start(EXTEND_POLICY).await;
    let mut q = server.quota().await;
    let (id, expires) = hold(&mut q, "alice", 100, 50).await;
    assert_eq!(expires, at(T0 + 60 * SEC));

    set_clock(&server, 50 * SEC);
    assert_eq!(extend_ok(&mut q, &id, 120).await, at(T0 + 170 * SEC));

    set_clock(&server, 61 * SEC);
    assert_eq!(figures(&mut q, "alice").await, (0, 150, 1));

    set_clock(&server, 100 * SEC);
    assert_eq!(figures(&mut q, "alice").await, (0, 150, 1));
    let c = commit(&mut q, &id, 100, 20).await;
    assert_eq!(
        (c.charged_tokens, c.released_tokens, c.debt_tokens),
        (120, 30, 0)
    );
    assert_eq!(figures(&mut q, "alice").await, (120, 0, 0));
    server.stop().await;
}

/// An extended hold expires exactly at its new deadline (not a microsecond before), and is
/// charged in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_hold_expires_exactly_at_its_new_deadline_charged_in_full() {
    let server = TestServer::start(EXTEND_POLICY).await;
    let mut q = server.quota().await;
    let (id, _) = hold(&mut q, "alice", 100, 50).await;
    set_clock(&server, 50 * SEC);
    assert_eq!(extend_ok(&mut q, &id, 120).await, at(T0 + 170 * SEC));

    set_clock(&server, 61 * SEC);
    assert_eq!(figures(&mut q, "alice").await, (0, 150, 1));
    set_clock(&server, 170 * SEC - 1);
    assert_eq!(figures(&mut q, "alice").await, (0, 150, 1));
    set_clock(&server, 170 * SEC);
    assert_eq!(figures(&mut q, "alice").await, (150, 0, 0));
    assert_status(
        extend(&mut q, &id, Some(secs(60))).await,
        Code::FailedPrecondition,
        &format!("reservation {id} is EXPIRED"),
        &[],
    );
    server.stop().await;
}

/// Extend never pulls an expiry in, and repeating one (or asking for less than remains) returns
/// the unchanged expiry; sub-second holds are kept to the microsecond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_never_pulls_the_expiry_in_and_repeating_it_is_harmless() {
    let server = TestServer::start(EXTEND_POLICY).await;
    let mut q = server.quota().await;
    let (id, _) = hold(&mut q, "alice", 10, 0).await;

    set_clock(&server, 10 * SEC);
    // 50 s remain: asking for less, or exactly that, changes nothing.
    assert_eq!(extend_ok(&mut q, &id, 30).await, at(T0 + 60 * SEC));
    assert_eq!(extend_ok(&mut q, &id, 50).await, at(T0 + 60 * SEC));
    // Asking for more moves it to now + hold; the same call again gives the same answer.
    assert_eq!(extend_ok(&mut q, &id, 120).await, at(T0 + 130 * SEC));
    assert_eq!(extend_ok(&mut q, &id, 120).await, at(T0 + 130 * SEC));
    assert_eq!(extend_ok(&mut q, &id, 120).await, at(T0 + 130 * SEC));

    set_clock(&server, 20 * SEC);
    assert_eq!(extend_ok(&mut q, &id, 30).await, at(T0 + 130 * SEC));
    let half = PbDuration {
        seconds: 150,
        nanos: 500_000_000,
    };
    assert_eq!(
        extend(&mut q, &id, Some(half))
            .await
            .expect("Extend 150.5 s"),
        at(T0 + 170 * SEC + SEC / 2)
    );
    assert_eq!(
        extend(&mut q, &id, Some(half))
            .await
            .expect("Extend 150.5 s"),
        at(T0 + 170 * SEC + SEC / 2)
    );

    // The no-op Extends did not pull the deadline in: it is 170.5 s.
    set_clock(&server, 170 * SEC + SEC / 2 - 1);
    assert_eq!(figures(&mut q, "alice").await, (0, 10, 1));
    set_clock(&server, 170 * SEC + SEC / 2);
    assert_eq!(figures(&mut q, "alice").await, (10, 0, 0));
    server.stop().await;
}

/// A hold beyond max_hold_seconds, or a life beyond max_hold_lifetime_seconds (counted from the
/// Reserve), is INVALID_ARGUMENT naming `hold`, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_refuses_holds_beyond_the_tier_bounds() {
    let server = TestServer::start(EXTEND_POLICY).await;
    let mut q = server.quota().await;
    let (id, _) = hold(&mut q, "alice", 10, 0).await;

    assert_status(
        extend(&mut q, &id, Some(secs(301))).await,
        Code::InvalidArgument,
        "hold: ",
        &["max_hold_seconds", "300"],
    );
    assert_status(
        extend(
            &mut q,
            &id,
            Some(PbDuration {
                seconds: 300,
                nanos: 1_000,
            }),
        )
        .await,
        Code::InvalidArgument,
        "hold: ",
        &["max_hold_seconds"],
    );
    // Beyond the ceiling of a week, refused before the engine.
    assert_status(
        extend(&mut q, &id, Some(secs(7 * 24 * 3600 + 1))).await,
        Code::InvalidArgument,
        "hold: ",
        &["604800"],
    );
    // Nothing changed.
    assert_eq!(extend_ok(&mut q, &id, 1).await, at(T0 + 60 * SEC));
    // Exactly max_hold_seconds is allowed.
    assert_eq!(extend_ok(&mut q, &id, 300).await, at(T0 + 300 * SEC));

    // Each call is within max_hold_seconds, but the whole life is at most 600 s.
    set_clock(&server, 250 * SEC);
    assert_eq!(extend_ok(&mut q, &id, 300).await, at(T0 + 550 * SEC));
    set_clock(&server, 301 * SEC);
    assert_status(
        extend(&mut q, &id, Some(secs(300))).await,
        Code::InvalidArgument,
        "hold: ",
        &["max_hold_lifetime_seconds", "600", "601 s"],
    );
    // Refused: the expiry is unchanged.
    assert_eq!(extend_ok(&mut q, &id, 1).await, at(T0 + 550 * SEC));
    // Up to exactly 600 s in all is allowed.
    assert_eq!(extend_ok(&mut q, &id, 299).await, at(T0 + 600 * SEC));
    set_clock(&server, 400 * SEC);
    assert_status(
        extend(&mut q, &id, Some(secs(201))).await,
        Code::InvalidArgument,
        "hold: ",
        &["max_hold_lifetime_seconds"],
    );
    // Asking for no more than remains is still fine at the lifetime's end.
    assert_eq!(extend_ok(&mut q, &id, 200).await, at(T0 + 600 * SEC));

    set_clock(&server, 600 * SEC - 1);
    assert_eq!(figures(&mut q, "alice").await, (0, 10, 1));
    set_clock(&server, 600 * SEC);
    assert_eq!(figures(&mut q, "alice").await, (10, 0, 0));
    server.stop().await;
}

/// Missing, zero or negative holds name `hold`; a malformed id names `reservation_id`; an
/// unknown id is NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_validates_hold_and_reservation_id() {
    let server = TestServer::start(EXTEND_POLICY).await;
    let mut q = server.quota().await;
    let (id, _) = hold(&mut q, "alice", 10, 0).await;

    assert_status(
        extend(&mut q, &id, None).await,
        Code::InvalidArgument,
        "hold: ",
        &["required"],
    );
    for bad in [
        secs(0),
        PbDuration {
            seconds: 0,
            nanos: 999,
        },
        secs(-1),
        PbDuration {
            seconds: 0,
            nanos: -1,
        },
        PbDuration {
            seconds: -5,
            nanos: -5,
        },
        PbDuration {
            seconds: 1,
            nanos: 1_000_000_000,
        },
    ] {
        assert_status(
            extend(&mut q, &id, Some(bad)).await,
            Code::InvalidArgument,
            "hold: ",
            &[],
        );
    }

    for bad in [
        "",
        "not-an-id",
        "0192a8a4-1c2b-7cc0-8d1e-ZZZZZZZZZZZZ",
        "0192a8a41c2b7cc08d1e0123456789ab",
    ] {
        assert_status(
            extend(&mut q, bad, Some(secs(60))).await,
            Code::InvalidArgument,
            "reservation_id: ",
            &[],
        );
    }
    let unknown = WELL_FORMED_UNKNOWN_ID;
    assert_status(
        extend(&mut q, unknown, Some(secs(60))).await,
        Code::NotFound,
        &format!("reservation {unknown} not found"),
        &[],
    );

    // None of it changed the hold.
    assert_eq!(extend_ok(&mut q, &id, 1).await, at(T0 + 60 * SEC));
    assert_eq!(figures(&mut q, "alice").await, (0, 10, 1));
    server.stop().await;
}

/// Only a HELD reservation can be extended: COMMITTED, REFUNDED and EXPIRED are
/// FAILED_PRECONDITION naming the state. An overdue hold is expired by the Extend itself (no
/// other call comes between), charged in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_of_a_settled_hold_fails_naming_its_state() {
    let server = TestServer::start(EXTEND_POLICY).await;
    let mut q = server.quota().await;
    let (committed, _) = hold(&mut q, "alice", 100, 0).await;
    let (refunded, _) = hold(&mut q, "alice", 200, 0).await;
    let (overdue, _) = hold(&mut q, "alice", 400, 0).await;

    commit(&mut q, &committed, 60, 0).await;
    refund(&mut q, &refunded).await;
    for (id, state) in [(&committed, "COMMITTED"), (&refunded, "REFUNDED")] {
        assert_status(
            extend(&mut q, id, Some(secs(60))).await,
            Code::FailedPrecondition,
            &format!("reservation {id} is {state}: "),
            &[],
        );
    }
    assert_eq!(figures(&mut q, "alice").await, (60, 400, 1));

    // Exactly at its deadline, the first call is the Extend.
    set_clock(&server, 60 * SEC);
    assert_status(
        extend(&mut q, &overdue, Some(secs(60))).await,
        Code::FailedPrecondition,
        &format!("reservation {overdue} is EXPIRED: "),
        &[],
    );
    assert_eq!(figures(&mut q, "alice").await, (460, 0, 0));
    // Repeated, the same answer (and nothing charged twice).
    assert_status(
        extend(&mut q, &overdue, Some(secs(60))).await,
        Code::FailedPrecondition,
        &format!("reservation {overdue} is EXPIRED: "),
        &[],
    );
    assert_eq!(figures(&mut q, "alice").await, (460, 0, 0));
    server.stop().await;
}

/// The extended deadline is durable: after a restart the hold is still HELD past its original
/// deadline, expires at the extended one, and its life still counts from its Reserve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_deadline_survives_a_restart() {
    let server = TestServer::start(EXTEND_POLICY).await;
    let mut q = server.quota().await;
    let (short, _) = hold(&mut q, "alice", 100, 50).await;
    let (long, _) = hold(&mut q, "alice", 200, 0).await;
    set_clock(&server, 50 * SEC);
    assert_eq!(extend_ok(&mut q, &short, 120).await, at(T0 + 170 * SEC));
    assert_eq!(extend_ok(&mut q, &long, 300).await, at(T0 + 350 * SEC));
    drop(q);

    let server = server.restart(EXTEND_POLICY).await;
    let mut q = server.quota().await;
    set_clock(&server, 61 * SEC);
    assert_eq!(figures(&mut q, "alice").await, (0, 350, 2));
    // A repeat after the restart answers the stored expiry.
    assert_eq!(extend_ok(&mut q, &short, 100).await, at(T0 + 170 * SEC));
    set_clock(&server, 170 * SEC - 1);
    assert_eq!(figures(&mut q, "alice").await, (0, 350, 2));
    set_clock(&server, 170 * SEC);
    assert_eq!(figures(&mut q, "alice").await, (150, 200, 1));
    assert_status(
        extend(&mut q, &short, Some(secs(60))).await,
        Code::FailedPrecondition,
        &format!("reservation {short} is EXPIRED: "),
        &[],
    );

    // The life counts from the Reserve at T0, not from the restart at T0 + 50 s.
    set_clock(&server, 301 * SEC);
    assert_status(
        extend(&mut q, &long, Some(secs(300))).await,
        Code::InvalidArgument,
        "hold: ",
        &["max_hold_lifetime_seconds", "601 s"],
    );
    assert_eq!(extend_ok(&mut q, &long, 299).await, at(T0 + 600 * SEC));
    drop(q);

    // And that extension survives a second restart too.
    let server = server.restart(EXTEND_POLICY).await;
    let mut q = server.quota().await;
    set_clock(&server, 600 * SEC - 1);
    assert_eq!(figures(&mut q, "alice").await, (150, 200, 1));
    set_clock(&server, 600 * SEC);
    assert_eq!(figures(&mut q, "alice").await, (350, 0, 0));
    server.stop().await;
}

// ------------------------------------------------------------------------------------------
// Reload (the real binary)
// ------------------------------------------------------------------------------------------

/// One tier, `basic`, with `tokens_per_day` padded so that every such policy has the same size.
fn day_policy(tokens_per_day: u64) -> String {
    format!(
        "default_tier = \"basic\"\n\n[tiers.basic]\ntokens_per_day = {tokens_per_day:<12}\nhold_seconds = 3600\n"
    )
}

/// A started server (its stderr at RUST_LOG=info in a log file), its policy file and its
/// temporary directory. Derefs to the [`Process`].
struct Served {
    process: Process,
    policy: PathBuf,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Served {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl Served {
    /// `tollgate serve --policy FILE --data-dir DIR --admin-token ...` on `policy_text`.
    fn start(policy_text: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = write_file(dir.path(), "policy.toml", policy_text);
        let process = Serve::new(&dir.path().join("data"))
            .policy(&policy)
            .env("RUST_LOG", "info")
            .log_to(&dir.path().join("stderr.log"))
            .start();
        Self {
            process,
            policy,
            _dir: dir,
        }
    }

    /// Poll GetUsage of `subject` until `ok` holds (at most POLL_LIMIT).
    async fn usage_until(
        &self,
        q: &mut Quota,
        subject: &str,
        what: &str,
        ok: impl Fn(&GetUsageResponse) -> bool,
    ) -> GetUsageResponse {
        let start = Instant::now();
        loop {
            let u = usage(q, subject).await;
            if ok(&u) {
                return u;
            }
            if start.elapsed() > POLL_LIMIT {
                panic!(
                    "{what}: not within {POLL_LIMIT:?}; last GetUsage: {u:?}\nserver log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(POLL_STEP).await;
        }
    }
}

fn day_limit(u: &GetUsageResponse) -> u64 {
    limit(&u.limits, "tokens_per_day").limit
}

/// Reserve `tokens` prompt tokens (no output) and return the response.
async fn try_reserve(
    q: &mut Quota,
    subject: &str,
    tokens: u64,
) -> tollgate::proto::ReserveResponse {
    rsv(q, reserve(subject, tokens, 0)).await
}

fn assert_denied_by_day(r: &tollgate::proto::ReserveResponse) {
    assert_eq!(decision(r), Decision::Denied, "{r:?}");
    assert_eq!(r.denied_by, "tokens_per_day", "{r:?}");
    assert_eq!(r.reserved_tokens, 0, "{r:?}");
    assert_eq!(r.reservation_id, "", "{r:?}");
}

/// SIGHUP reloads the policy: a Reserve denied under 500 a day is allowed under 1000, and the
/// usage and holds made before are kept. The new file has the old one's size and modification
/// time, so the file poller cannot see it: only the SIGHUP can have loaded it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_policy_and_keeps_usage_and_holds() {
    let s = Served::start(&day_policy(500));
    let mut q = s.quota().await;
    let (_id, _) = hold(&mut q, "alice", 400, 0).await;
    assert_denied_by_day(&try_reserve(&mut q, "alice", 200).await);

    let before = fs::metadata(&s.policy).expect("stat policy");
    let tmp = s.policy.with_extension("toml.new");
    fs::write(&tmp, day_policy(1000)).expect("write the new policy");
    fs::File::options()
        .write(true)
        .open(&tmp)
        .and_then(|f| f.set_modified(before.modified()?))
        .expect("set the modification time");
    fs::rename(&tmp, &s.policy).expect("rename");
    let after = fs::metadata(&s.policy).expect("stat policy");
    assert_eq!(
        (after.modified().unwrap(), after.len()),
        (before.modified().unwrap(), before.len()),
        "the new file must look unchanged to the poller"
    );

    s.sighup();
    let u = s
        .usage_until(&mut q, "alice", "tokens_per_day 1000 after SIGHUP", |u| {
            day_limit(u) == 1000
        })
        .await;
    assert_eq!((u.held_tokens, u.open_holds, u.used_tokens), (400, 1, 0));
    let line = s
        .log_line_until("the SIGHUP reload", |l| l.contains("policy reloaded"))
        .await;
    assert!(line.contains("why=SIGHUP"), "{line}");

    let (_id2, _) = hold(&mut q, "alice", 200, 0).await;
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.held_tokens, u.open_holds, u.used_tokens), (600, 2, 0));
    assert_eq!(u.tier, "basic");
    let day = limit(&u.limits, "tokens_per_day");
    assert_eq!((day.limit, day.remaining), (1000, 400));
    assert!(
        !s.log_text().contains("file changed"),
        "the poller reloaded too:\n{}",
        s.log_text()
    );
    s.process.kill9();
}

/// A SIGHUP right after the server says it is listening reloads (and does not kill it: SIGHUP's
/// default action would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_right_after_start_is_handled_not_fatal() {
    // Before the fix to spawn_reloader, about one start in ten died of this SIGHUP.
    for round in 0..20 {
        let mut s = Served::start(&day_policy(500));
        s.sighup();
        let start = Instant::now();
        loop {
            if let Some(status) = s.process.child.try_wait().expect("try_wait") {
                panic!(
                    "round {round}: the server died of a SIGHUP sent right after it said it was \
                     listening ({status}); log:\n{}",
                    s.log_text()
                );
            }
            let text = s.log_text();
            if text
                .lines()
                .any(|l| l.contains("policy reload: no change") && l.contains("why=SIGHUP"))
            {
                break;
            }
            assert!(
                start.elapsed() < POLL_LIMIT,
                "round {round}: no SIGHUP reload logged within {POLL_LIMIT:?}; log:\n{text}"
            );
            tokio::time::sleep(POLL_STEP).await;
        }
        let mut q = s.quota().await;
        assert_eq!(
            day_limit(&usage(&mut q, "alice").await),
            500,
            "round {round}"
        );
        s.process.kill9();
    }
}

/// A bad new policy (a syntax error; a default_tier that is not a tier) is refused with file,
/// line and reason in the log, and the old policy stays in force; a good one after it loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_policy_is_refused_and_the_old_one_stays_in_force() {
    let s = Served::start(&day_policy(1000));
    let mut q = s.quota().await;
    hold(&mut q, "alice", 600, 0).await;
    let path = s.policy.display().to_string();

    // Each bad file would set tokens_per_day = 300 if it were taken.
    let cases = [
        (
            "default_tier = \"basic\"\n\n[tiers.basic]\ntokens_per_day = 300 oops\nhold_seconds = 3600\n",
            4,
            "",
            300,
        ),
        (
            "default_tier = \"gold\"\n\n[tiers.basic]\ntokens_per_day = 300\nhold_seconds = 3600\n",
            1,
            "default_tier \"gold\" is not a tier",
            100,
        ),
    ];
    let mut held = 600;
    for (text, line, reason, reserve_after) in cases {
        replace_file(&s.policy, text);
        s.sighup();
        let at = format!("{path}:{line}:");
        let logged = s
            .log_line_until(&format!("refusal of {at}"), |l| {
                l.contains("policy reload refused") && l.contains(&at)
            })
            .await;
        assert!(logged.contains(reason), "{logged}");
        // The old limit stays, through at least one poll of the (changed) file.
        for _ in 0..5 {
            let u = usage(&mut q, "alice").await;
            assert_eq!(day_limit(&u), 1000, "{at}: {u:?}");
            assert_eq!(u.held_tokens, held);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Under the refused policy's 300 a day this would be denied.
        hold(&mut q, "alice", reserve_after, 0).await;
        held += reserve_after;
    }
    assert_eq!(held, 1000);
    assert_denied_by_day(&try_reserve(&mut q, "alice", 1).await);
    assert!(
        !s.log_text().contains("policy reloaded"),
        "a refused policy was loaded:\n{}",
        s.log_text()
    );

    // A good policy after the bad ones is taken.
    replace_file(&s.policy, &day_policy(2000));
    s.sighup();
    let u = s
        .usage_until(&mut q, "alice", "tokens_per_day 2000", |u| {
            day_limit(u) == 2000
        })
        .await;
    assert_eq!((u.held_tokens, u.open_holds, u.used_tokens), (1000, 3, 0));
    hold(&mut q, "alice", 1, 0).await;
    s.process.kill9();
}

/// A changed file is reloaded without any signal (the poller checks every second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_policy_file_is_reloaded_without_sighup() {
    let s = Served::start(&day_policy(1000));
    let mut q = s.quota().await;
    hold(&mut q, "alice", 100, 0).await;
    let u = usage(&mut q, "alice").await;
    assert!(
        u.limits.iter().all(|l| l.name != "requests_per_minute"),
        "{u:?}"
    );

    replace_file(
        &s.policy,
        "default_tier = \"basic\"\n\n[tiers.basic]\ntokens_per_day = 250\nrequests_per_minute = 100\nhold_seconds = 3600\n",
    );
    let u = s
        .usage_until(&mut q, "alice", "tokens_per_day 250 from the poller", |u| {
            day_limit(u) == 250
        })
        .await;
    assert_eq!(limit(&u.limits, "requests_per_minute").limit, 100);
    assert_eq!((u.held_tokens, u.open_holds), (100, 1));

    assert_denied_by_day(&try_reserve(&mut q, "alice", 200).await);
    hold(&mut q, "alice", 150, 0).await;
    let u = usage(&mut q, "alice").await;
    let day = limit(&u.limits, "tokens_per_day");
    assert_eq!((u.held_tokens, day.limit, day.remaining), (250, 250, 0));
    let line = s
        .log_line_until("the reload", |l| l.contains("policy reloaded"))
        .await;
    assert!(line.contains("why=file changed"), "{line}");
    s.process.kill9();
}

const TWO_TIERS: &str = "default_tier = \"basic\"\n\n[tiers.basic]\ntokens_per_day = 1000\nhold_seconds = 3600\n\n[tiers.gold]\ntokens_per_day = 5000\nhold_seconds = 3600\n";
const BASIC_ONLY: &str =
    "default_tier = \"basic\"\n\n[tiers.basic]\ntokens_per_day = 1000\nhold_seconds = 3600\n";

/// A tier removed by a reload: its subjects fall back to the default tier, with their open
/// holds kept; the assignment itself is kept, so the tier's return restores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_removed_by_reload_falls_back_to_the_default_and_keeps_holds() {
    let s = Served::start(TWO_TIERS);
    let mut q = s.quota().await;
    let mut a = s.admin().await;
    let set = a
        .set_subject(set_subject_req("alice", "gold"))
        .await
        .expect("SetSubject")
        .into_inner();
    assert_eq!(set.tier, "gold");
    let (id, _) = hold(&mut q, "alice", 2000, 0).await;
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.tier.as_str(), day_limit(&u)), ("gold", 5000));

    replace_file(&s.policy, BASIC_ONLY);
    s.sighup();
    let u = s
        .usage_until(&mut q, "alice", "alice on tier basic", |u| {
            u.tier == "basic"
        })
        .await;
    assert_eq!((u.held_tokens, u.open_holds, u.used_tokens), (2000, 1, 0));
    let day = limit(&u.limits, "tokens_per_day");
    assert_eq!((day.limit, day.remaining), (1000, 0));
    assert_denied_by_day(&try_reserve(&mut q, "alice", 1).await);
    let sub = a
        .get_subject(GetSubjectRequest {
            subject: "alice".into(),
        })
        .await
        .expect("GetSubject")
        .into_inner();
    assert_eq!(sub.tier, "basic");
    let err = a
        .set_subject(set_subject_req("bob", "gold"))
        .await
        .expect_err("gold is gone");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("tier: "), "{err:?}");

    // The open hold settles under the new tier.
    let c = commit(&mut q, &id, 300, 200).await;
    assert_eq!(
        (c.charged_tokens, c.released_tokens, c.debt_tokens),
        (500, 1500, 0)
    );
    let u = usage(&mut q, "alice").await;
    assert_eq!(
        (u.tier.as_str(), u.held_tokens, u.open_holds),
        ("basic", 0, 0)
    );

    // The assignment was kept: gold's return puts alice back on it.
    replace_file(&s.policy, TWO_TIERS);
    s.sighup();
    let u = s
        .usage_until(&mut q, "alice", "alice back on tier gold", |u| {
            u.tier == "gold"
        })
        .await;
    assert_eq!(day_limit(&u), 5000);
    s.process.kill9();
}

// ------------------------------------------------------------------------------------------
// check-policy
// ------------------------------------------------------------------------------------------

fn check_policy(path: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("check-policy")
        .arg(path)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run tollgate check-policy")
}

/// A valid file: "FILE: OK", then every tier (the default marked, the limits it sets, hold
/// bounds with the lifetime default of max(86400, max_hold_seconds)), every scope and every
/// model with its price.
#[test]
fn check_policy_accepts_a_valid_file_and_names_every_tier_and_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    fs::write(
        &path,
        r#"
default_tier = "basic"

[tiers.basic]
tokens_per_day = 500
hold_seconds = 60

[tiers.gold]
tokens_per_minute = 6000
burst_tokens = 9000
max_concurrent = 3
max_hold_seconds = 100000

[tiers.short]
max_hold_seconds = 300
max_hold_lifetime_seconds = 600

[models."my-model"]
encoding = "cl100k_base"

[models."gpt-4o"]
default_max_output_tokens = 1000
input_usd_per_million = 2.5
output_usd_per_million = 10.0

[groups."acme"]
tokens_per_day = 90000

[ip.cidr."10.0.0.0/8"]
requests_per_minute = 1000
"#,
    )
    .unwrap();
    let out = check_policy(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout {stdout}\nstderr {stderr}"
    );
    assert_eq!(stderr, "");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], format!("{}: OK", path.display()), "{stdout}");
    for want in [
        "commits: at most 2000000 tokens (prompt + completion) each, or the hold if larger",
        "tier basic (default)",
        "  holds: 60 s by default, at most 3600 s a request, 86400 s in all",
        "tier gold",
        "  tokens_per_minute 6000 (burst 9000), max_concurrent 3",
        "tier basic (default)",
        "  tokens_per_day 500",
        "  holds: 300 s by default, at most 100000 s a request, 100000 s in all",
        "tier short",
        "  holds: 300 s by default, at most 300 s a request, 600 s in all",
        "model gpt-4o: encoding o200k_base, default_max_output_tokens 1000, $2.5 / $10 per million tokens in / out",
        "model my-model: encoding cl100k_base, default_max_output_tokens 4096, no price",
        "group acme: tokens_per_day 90000",
        "ip: no limits",
        "ip 10.0.0.0/8: requests_per_minute 1000",
        "global: no limits",
    ] {
        assert!(lines.contains(&want), "no line {want:?} in:\n{stdout}");
    }
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("tier ")).count(),
        3,
        "{stdout}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("model ")).count(),
        2,
        "{stdout}"
    );
}

/// A bad file: exit 2, nothing on stdout, "policy refused: FILE:LINE:COL: reason" on stderr.
#[test]
fn check_policy_refuses_a_bad_file_with_file_line_and_reason() {
    let cases = [
        (
            "syntax.toml",
            "default_tier = \"basic\"\n\n[tiers.basic]\ntokens_per_day = 300 oops\n",
            4,
            "",
        ),
        (
            "no-default.toml",
            "default_tier = \"gold\"\n\n[tiers.basic]\ntokens_per_day = 300\n",
            1,
            "default_tier \"gold\" is not a tier of this policy (tiers: basic)",
        ),
        (
            "lifetime.toml",
            "default_tier = \"basic\"\n\n[tiers.basic]\nmax_hold_seconds = 900\nmax_hold_lifetime_seconds = 600\n",
            3,
            "max_hold_seconds (900) must not exceed max_hold_lifetime_seconds (600)",
        ),
        (
            "zero-lifetime.toml",
            "default_tier = \"basic\"\n\n[tiers.basic]\nmax_hold_seconds = 60\nmax_hold_lifetime_seconds = 0\n",
            5,
            "max_hold_lifetime_seconds must be from 1 to 604800",
        ),
        (
            "commit-bound.toml",
            "default_tier = \"basic\"\nmax_commit_tokens = 100000001\n\n[tiers.basic]\n",
            2,
            "max_commit_tokens must be from 1 to 100000000",
        ),
    ];
    for (name, text, line, reason) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        fs::write(&path, text).unwrap();
        let out = check_policy(&path);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: stderr {stderr}");
        assert_eq!(stdout, "", "{name}");
        let prefix = format!("tollgate: policy refused: {}:{line}:", path.display());
        assert!(
            stderr.starts_with(&prefix),
            "{name}: stderr does not start with {prefix:?}: {stderr}"
        );
        assert!(stderr.contains(reason), "{name}: no {reason:?} in {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
    }

    // A file that does not exist is refused the same way.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let out = check_policy(&missing);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.starts_with(&format!("tollgate: policy refused: {}:", missing.display()))
            && stderr.contains("cannot read the policy file"),
        "{stderr}"
    );
}
