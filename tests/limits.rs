//! End-to-end tests of every limit over real gRPC on loopback: the token bucket
//! (tokens_per_minute and its burst), the sliding minute window (requests_per_minute),
//! max_concurrent, the UTC day (tokens_per_day), races of many clients on one subject, dry runs,
//! layered limits, and moving a subject between tiers. Time only moves through the ManualClock.

mod common;
use common::*;

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::Barrier;
use tonic::Code;

use tollgate::proto::admin_client::AdminClient;
use tollgate::proto::quota_client::QuotaClient;
use tollgate::proto::{Decision, GetSubjectRequest, LimitStatus, ReserveRequest, ReserveResponse};

const HOUR: u64 = 3600 * SEC;

fn dry(mut req: ReserveRequest) -> ReserveRequest {
    req.dry_run = true;
    req
}

#[track_caller]
fn assert_allowed(r: &ReserveResponse, tokens: u64) {
    assert_eq!(decision(r), Decision::Allowed, "{r:?}");
    assert_eq!(r.reserved_tokens, tokens, "{r:?}");
    assert!(r.denied_by.is_empty(), "{r:?}");
    assert!(r.retry_after.is_none(), "{r:?}");
    assert_eq!(r.reservation_id.len(), 36, "{r:?}");
    assert!(r.expires_at.is_some(), "{r:?}");
}

#[track_caller]
fn assert_denied(r: &ReserveResponse, by: &str, retry_after_us: Option<u64>) {
    assert_eq!(decision(r), Decision::Denied, "{r:?}");
    assert_eq!(r.denied_by, by, "{r:?}");
    assert_eq!(retry_us(r), retry_after_us, "retry_after of {r:?}");
    assert!(r.reservation_id.is_empty(), "{r:?}");
    assert_eq!(r.reserved_tokens, 0, "{r:?}");
    assert!(r.expires_at.is_none(), "{r:?}");
}

fn remaining(limits: &[LimitStatus], name: &str) -> u64 {
    limit(limits, name).remaining
}

fn reset_us(limits: &[LimitStatus], name: &str) -> u64 {
    dur_us(
        limit(limits, name)
            .reset_after
            .as_ref()
            .expect("reset_after"),
    )
}

// ---------------------------------------------------------------------------------------------
// 1. Token bucket: burst, exact retry_after, continuous refill, cap at burst.

const BUCKET: &str =
    "default_tier = \"t\"\n\n[tiers.t]\ntokens_per_minute = 600\nburst_tokens = 1200\n";

#[tokio::test]
async fn bucket_burst_then_exact_refill_and_cap() {
    let server = TestServer::start(BUCKET).await;
    let mut q = server.quota().await;

    let u = usage(&mut q, "alice").await;
    assert_eq!(limit(&u.limits, "tokens_per_minute").limit, 1200);
    assert_eq!(remaining(&u.limits, "tokens_per_minute"), 1200);
    assert_eq!(reset_us(&u.limits, "tokens_per_minute"), 0);

    // The whole burst at once.
    let r = rsv(&mut q, reserve("alice", 1000, 200)).await;
    assert_allowed(&r, 1200);
    assert_eq!(remaining(&r.limits, "tokens_per_minute"), 0);
    // 1200 tokens at 10 a second: full again in 120 s.
    assert_eq!(reset_us(&r.limits, "tokens_per_minute"), 120 * SEC);

    // Empty: 100 tokens take exactly 10 s at 600/min.
    let r = rsv(&mut q, reserve("alice", 100, 0)).await;
    assert_denied(&r, "tokens_per_minute", Some(10 * SEC));
    assert_eq!(remaining(&r.limits, "tokens_per_minute"), 0);

    // One microsecond early is still too early, and the hint says so.
    server.clock.advance(10 * SEC - 1);
    let r = rsv(&mut q, reserve("alice", 100, 0)).await;
    assert_denied(&r, "tokens_per_minute", Some(1));
    assert_eq!(remaining(&r.limits, "tokens_per_minute"), 99);

    server.clock.advance(1);
    let r = rsv(&mut q, reserve("alice", 100, 0)).await;
    assert_allowed(&r, 100);
    assert_eq!(remaining(&r.limits, "tokens_per_minute"), 0);

    // Refill is continuous: half a second gives 5 tokens; 6 need another 100 ms.
    server.clock.advance(SEC / 2);
    let u = usage(&mut q, "alice").await;
    assert_eq!(remaining(&u.limits, "tokens_per_minute"), 5);
    let r = rsv(&mut q, reserve("alice", 6, 0)).await;
    assert_denied(&r, "tokens_per_minute", Some(SEC / 10));
    let r = rsv(&mut q, reserve("alice", 5, 0)).await;
    assert_allowed(&r, 5);

    // A long idle refills to the burst and no further.
    server.advance_secs(3600);
    let u = usage(&mut q, "alice").await;
    assert_eq!(remaining(&u.limits, "tokens_per_minute"), 1200);
    assert_eq!(reset_us(&u.limits, "tokens_per_minute"), 0);
    let r = rsv(&mut q, reserve("alice", 1200, 0)).await;
    assert_allowed(&r, 1200);
    let r = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_denied(&r, "tokens_per_minute", Some(SEC / 10));

    // Larger than the burst: no wait can help, even with a full bucket.
    let r = rsv(&mut q, reserve("bob", 1000, 201)).await;
    assert_denied(&r, "tokens_per_minute", None);
    assert_eq!(remaining(&r.limits, "tokens_per_minute"), 1200);
    let u = usage(&mut q, "bob").await;
    assert_eq!((u.held_tokens, u.requests, u.open_holds), (0, 0, 0));

    server.stop().await;
}

#[tokio::test]
async fn bucket_burst_defaults_to_tokens_per_minute() {
    let server =
        TestServer::start("default_tier = \"t\"\n\n[tiers.t]\ntokens_per_minute = 600\n").await;
    let mut q = server.quota().await;

    let u = usage(&mut q, "alice").await;
    assert_eq!(limit(&u.limits, "tokens_per_minute").limit, 600);
    assert_eq!(remaining(&u.limits, "tokens_per_minute"), 600);

    let r = rsv(&mut q, reserve("bob", 601, 0)).await;
    assert_denied(&r, "tokens_per_minute", None);

    let r = rsv(&mut q, reserve("alice", 600, 0)).await;
    assert_allowed(&r, 600);
    assert_eq!(reset_us(&r.limits, "tokens_per_minute"), 60 * SEC);
    let r = rsv(&mut q, reserve("alice", 60, 0)).await;
    assert_denied(&r, "tokens_per_minute", Some(6 * SEC));

    server.advance_secs(600);
    let u = usage(&mut q, "alice").await;
    assert_eq!(
        remaining(&u.limits, "tokens_per_minute"),
        600,
        "capped at 600"
    );

    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. requests_per_minute: the sliding-window estimate.

#[tokio::test]
async fn requests_per_minute_sliding_window() {
    let server =
        TestServer::start("default_tier = \"t\"\n\n[tiers.t]\nrequests_per_minute = 5\n").await;
    let mut q = server.quota().await;

    // T0 is on a minute boundary.
    for i in 0..5 {
        let r = rsv(&mut q, reserve("alice", 1, 0)).await;
        assert_allowed(&r, 1);
        assert_eq!(remaining(&r.limits, "requests_per_minute"), 4 - i);
    }
    // Five in this minute: the sixth fits once 4 of the 5 remain in the estimate, i.e. 12 s into
    // the next minute (5 * 48/60 = 4): 60 s + 12 s.
    let r = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_denied(&r, "requests_per_minute", Some(72 * SEC));
    assert_eq!(reset_us(&r.limits, "requests_per_minute"), 120 * SEC);

    server.clock.advance(72 * SEC - 1);
    let r = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_denied(&r, "requests_per_minute", Some(1));
    server.clock.advance(1);
    let r = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_allowed(&r, 1);
    assert_eq!(remaining(&r.limits, "requests_per_minute"), 0);

    // 12 s into the minute: 5 * 48/60 + 1 = 5. At 24 s: 5 * 36/60 + 1 = 4, so wait 12 s.
    let r = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_denied(&r, "requests_per_minute", Some(12 * SEC));
    server.advance_secs(12);
    let r = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_allowed(&r, 1);
    // 24 s in: 3 + 2 = 5 counted; empty once this minute and the next have passed.
    let u = usage(&mut q, "alice").await;
    assert_eq!(remaining(&u.limits, "requests_per_minute"), 0);
    assert_eq!(reset_us(&u.limits, "requests_per_minute"), 96 * SEC);

    // Two minutes later the window is empty.
    server.advance_secs(120);
    let u = usage(&mut q, "alice").await;
    assert_eq!(remaining(&u.limits, "requests_per_minute"), 5);
    assert_eq!(reset_us(&u.limits, "requests_per_minute"), 0);
    for _ in 0..5 {
        assert_allowed(&rsv(&mut q, reserve("alice", 1, 0)).await, 1);
    }
    // 24 s into this minute with 5 counted: (60 - 24) + 12 s.
    let r = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_denied(&r, "requests_per_minute", Some(48 * SEC));

    let u = usage(&mut q, "alice").await;
    assert_eq!(u.requests, 12, "only admitted requests count");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. max_concurrent.

#[tokio::test]
async fn max_concurrent_frees_a_slot_on_commit_refund_and_expiry() {
    let server = TestServer::start(
        "default_tier = \"t\"\n\n[tiers.t]\nmax_concurrent = 2\nhold_seconds = 60\n",
    )
    .await;
    let mut q = server.quota().await;

    let a = rsv(&mut q, reserve("alice", 10, 10)).await;
    assert_allowed(&a, 20);
    assert_eq!(remaining(&a.limits, "max_concurrent"), 1);
    let b = rsv(&mut q, reserve("alice", 10, 20)).await;
    assert_allowed(&b, 30);
    assert_eq!(remaining(&b.limits, "max_concurrent"), 0);
    assert_eq!(limit(&b.limits, "max_concurrent").limit, 2);

    let r = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_denied(&r, "max_concurrent", Some(SEC));
    // Another subject has its own slots.
    assert_allowed(&rsv(&mut q, reserve("bob", 1, 0)).await, 1);

    // Time alone does not free a slot (until a hold expires).
    server.advance_secs(1);
    let r = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_denied(&r, "max_concurrent", Some(SEC));

    // Commit frees one.
    assert_eq!(
        commit(&mut q, &a.reservation_id, 10, 5)
            .await
            .charged_tokens,
        15
    );
    let c = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_allowed(&c, 1);
    assert_denied(
        &rsv(&mut q, reserve("alice", 1, 0)).await,
        "max_concurrent",
        Some(SEC),
    );

    // Refund frees one.
    assert_eq!(refund(&mut q, &b.reservation_id).await, 30);
    let d = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_allowed(&d, 1);
    assert_denied(
        &rsv(&mut q, reserve("alice", 1, 0)).await,
        "max_concurrent",
        Some(SEC),
    );
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.open_holds, u.held_tokens, u.used_tokens), (2, 2, 15));

    // Expiry (hold_seconds = 60) frees both.
    server.advance_secs(60);
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.open_holds, u.held_tokens, u.used_tokens), (0, 0, 17));
    assert_eq!(remaining(&u.limits, "max_concurrent"), 2);
    assert_allowed(&rsv(&mut q, reserve("alice", 1, 0)).await, 1);
    assert_allowed(&rsv(&mut q, reserve("alice", 1, 0)).await, 1);
    assert_denied(
        &rsv(&mut q, reserve("alice", 1, 0)).await,
        "max_concurrent",
        Some(SEC),
    );

    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. tokens_per_day and UTC midnight.

#[tokio::test]
async fn tokens_per_day_resets_at_utc_midnight() {
    let server =
        TestServer::start("default_tier = \"t\"\n\n[tiers.t]\ntokens_per_day = 500\n").await;
    let mut q = server.quota().await;

    let a = rsv(&mut q, reserve("alice", 200, 100)).await;
    assert_allowed(&a, 300);
    assert_eq!(
        commit(&mut q, &a.reservation_id, 200, 100)
            .await
            .charged_tokens,
        300
    );
    let b = rsv(&mut q, reserve("alice", 100, 100)).await;
    assert_allowed(&b, 200);
    assert_eq!(remaining(&b.limits, "tokens_per_day"), 0);
    assert_eq!(
        commit(&mut q, &b.reservation_id, 150, 50)
            .await
            .charged_tokens,
        200
    );

    let u = usage(&mut q, "alice").await;
    assert_eq!((u.used_tokens, u.held_tokens, u.requests), (500, 0, 2));
    assert_eq!(remaining(&u.limits, "tokens_per_day"), 0);
    assert_eq!(reset_us(&u.limits, "tokens_per_day"), 12 * HOUR);

    // Used up: the next day starts at midnight, 12 h after noon.
    let r = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_denied(&r, "tokens_per_day", Some(12 * HOUR));

    // 23:59:59 is still today.
    server.advance_secs(12 * 3600 - 1);
    let r = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_denied(&r, "tokens_per_day", Some(SEC));
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.used_tokens, u.requests), (500, 2));

    // Midnight: a new day from zero.
    server.advance_secs(1);
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.used_tokens, u.held_tokens, u.requests), (0, 0, 0));
    assert_eq!(remaining(&u.limits, "tokens_per_day"), 500);
    assert_eq!(reset_us(&u.limits, "tokens_per_day"), 24 * HOUR);

    let r = rsv(&mut q, reserve("alice", 400, 100)).await;
    assert_allowed(&r, 500);
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.used_tokens, u.held_tokens, u.requests), (0, 500, 1));
    // Now an open hold is what blocks, and holds outlive midnight: waiting for the next day
    // would not help, so the hint is the short one (a hold may settle any moment).
    assert_denied(
        &rsv(&mut q, reserve("alice", 1, 0)).await,
        "tokens_per_day",
        Some(SEC),
    );

    server.stop().await;
}

#[tokio::test]
async fn a_hold_that_expired_before_midnight_is_charged_to_its_own_day() {
    let server = TestServer::start(
        "default_tier = \"t\"\n\n[tiers.t]\ntokens_per_day = 500\nhold_seconds = 60\n",
    )
    .await;
    let mut q = server.quota().await;

    // Never settled: it expires at 12:01 and is charged in full to that day.
    let r = rsv(&mut q, reserve("alice", 400, 100)).await;
    assert_allowed(&r, 500);
    // Blocked by its own open hold, which midnight does not release: the short hint.
    assert_denied(
        &rsv(&mut q, reserve("alice", 1, 0)).await,
        "tokens_per_day",
        Some(SEC),
    );

    // Nothing runs between noon and midnight (as after a restart past midnight): the expiry is
    // only processed in the new day, but it belongs to the old one.
    server.advance_secs(12 * 3600);
    let u = usage(&mut q, "alice").await;
    assert_eq!(
        (u.used_tokens, u.held_tokens, u.open_holds, u.requests),
        (0, 0, 0, 0)
    );
    assert_eq!(remaining(&u.limits, "tokens_per_day"), 500);
    let r2 = rsv(&mut q, reserve("alice", 400, 100)).await;
    assert_allowed(&r2, 500);

    // A late Commit of yesterday's hold gives nothing back to today; debt lands on today.
    let c = commit(&mut q, &r.reservation_id, 100, 0).await;
    assert_eq!(
        (c.charged_tokens, c.released_tokens, c.debt_tokens),
        (100, 400, 0)
    );
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.used_tokens, u.held_tokens), (0, 500));

    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Races: many clients, one subject, never more and never fewer than the limit admits.

/// `attempts` Reserves spread over `tasks` tasks, each with its own connection, released
/// together. Returns (admitted ids, denials by limit name).
async fn race(
    server: &TestServer,
    tasks: usize,
    attempts: usize,
    tokens: u64,
) -> (Vec<String>, Vec<String>) {
    let barrier = Arc::new(Barrier::new(tasks));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let url = server.url();
        let barrier = barrier.clone();
        let mine = attempts / tasks + usize::from(t < attempts % tasks);
        handles.push(tokio::spawn(async move {
            let mut q = QuotaClient::connect(url).await.expect("connect");
            barrier.wait().await;
            let mut admitted = Vec::new();
            let mut denied = Vec::new();
            for _ in 0..mine {
                let r = rsv(&mut q, reserve("shared", tokens, 0)).await;
                match decision(&r) {
                    Decision::Allowed => {
                        assert_eq!(r.reserved_tokens, tokens);
                        admitted.push(r.reservation_id);
                    }
                    Decision::Denied => denied.push(r.denied_by),
                    other => panic!("unexpected decision {other:?}"),
                }
            }
            (admitted, denied)
        }));
    }
    let mut admitted = Vec::new();
    let mut denied = Vec::new();
    for h in handles {
        let (a, d) = h.await.expect("task");
        admitted.extend(a);
        denied.extend(d);
    }
    (admitted, denied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_reserves_admit_exactly_the_daily_budget() {
    let server =
        TestServer::start("default_tier = \"t\"\n\n[tiers.t]\ntokens_per_day = 1000\n").await;

    let (admitted, denied) = race(&server, 32, 200, 10).await;
    assert_eq!(admitted.len(), 100, "1000 tokens / 10 each");
    assert_eq!(denied.len(), 100);
    assert!(denied.iter().all(|d| d == "tokens_per_day"), "{denied:?}");
    let unique: HashSet<_> = admitted.iter().collect();
    assert_eq!(unique.len(), 100, "every hold has its own id");

    let mut q = server.quota().await;
    let u = usage(&mut q, "shared").await;
    assert_eq!(u.held_tokens, 1000);
    assert_eq!(u.open_holds, 100);
    assert_eq!(u.requests, 100);
    assert_eq!(u.used_tokens, 0);
    assert_eq!(remaining(&u.limits, "tokens_per_day"), 0);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_reserves_admit_exactly_max_concurrent() {
    let server = TestServer::start("default_tier = \"t\"\n\n[tiers.t]\nmax_concurrent = 5\n").await;

    let (admitted, denied) = race(&server, 32, 96, 10).await;
    assert_eq!(admitted.len(), 5);
    assert_eq!(denied.len(), 91);
    assert!(denied.iter().all(|d| d == "max_concurrent"), "{denied:?}");

    let mut q = server.quota().await;
    let u = usage(&mut q, "shared").await;
    assert_eq!(u.open_holds, 5);
    assert_eq!(u.held_tokens, 50);
    assert_eq!(u.requests, 5);
    assert_eq!(remaining(&u.limits, "max_concurrent"), 0);

    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. dry_run decides and holds nothing.

#[tokio::test]
async fn dry_run_decides_but_holds_nothing() {
    let server = TestServer::start(
        "default_tier = \"t\"\n\n[tiers.t]\ntokens_per_minute = 600\nrequests_per_minute = 2\n\
         tokens_per_day = 1000\nmax_concurrent = 1\n",
    )
    .await;
    let mut q = server.quota().await;
    let fresh = usage(&mut q, "alice").await;

    // Allowed, again and again (more often than requests_per_minute and max_concurrent would
    // admit if anything were counted), with nothing held.
    for _ in 0..4 {
        let r = rsv(&mut q, dry(reserve("alice", 250, 50))).await;
        assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
        assert_eq!(r.reserved_tokens, 300);
        assert!(r.reservation_id.is_empty(), "{r:?}");
        assert!(r.expires_at.is_none(), "{r:?}");
        assert!(r.denied_by.is_empty() && r.retry_after.is_none(), "{r:?}");
        assert_eq!(remaining(&r.limits, "tokens_per_minute"), 600);
        assert_eq!(remaining(&r.limits, "requests_per_minute"), 2);
        assert_eq!(remaining(&r.limits, "tokens_per_day"), 1000);
        assert_eq!(remaining(&r.limits, "max_concurrent"), 1);
    }
    assert_eq!(usage(&mut q, "alice").await, fresh);

    // Denied as a real Reserve would be.
    let r = rsv(&mut q, dry(reserve("alice", 601, 0))).await;
    assert_denied(&r, "tokens_per_minute", None);
    assert_eq!(usage(&mut q, "alice").await, fresh);

    let held = rsv(&mut q, reserve("alice", 300, 100)).await;
    assert_allowed(&held, 400);
    let after_hold = usage(&mut q, "alice").await;
    assert_eq!(
        (
            after_hold.held_tokens,
            after_hold.open_holds,
            after_hold.requests
        ),
        (400, 1, 1)
    );

    let r = rsv(&mut q, dry(reserve("alice", 100, 0))).await;
    assert_denied(&r, "max_concurrent", Some(SEC));
    // 200 left in the bucket: 300 need 100 more, 10 s at 10 a second.
    let r = rsv(&mut q, dry(reserve("alice", 300, 0))).await;
    assert_denied(&r, "tokens_per_minute", Some(10 * SEC));
    assert_eq!(usage(&mut q, "alice").await, after_hold);

    // The dry runs did not count as requests: one real request more is admitted.
    assert_eq!(refund(&mut q, &held.reservation_id).await, 400);
    let r = rsv(&mut q, dry(reserve("alice", 10, 0))).await;
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    assert_allowed(&rsv(&mut q, reserve("alice", 10, 0)).await, 10);
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.held_tokens, u.open_holds, u.requests), (10, 1, 2));

    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. All four limits at once: the binding one is reported.

const LAYERED: &str = "default_tier = \"t\"\n\n[tiers.t]\ntokens_per_minute = 600\n\
                       burst_tokens = 1200\nrequests_per_minute = 3\ntokens_per_day = 1500\n\
                       max_concurrent = 2\n";

#[track_caller]
fn assert_all_four(limits: &[LimitStatus]) {
    let names: Vec<&str> = limits.iter().map(|l| l.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [
            "max_concurrent",
            "requests_per_minute",
            "tokens_per_day",
            "tokens_per_minute"
        ],
        "{limits:?}"
    );
    assert!(limits.iter().all(|l| l.scope == "subject"), "{limits:?}");
}

#[tokio::test]
async fn layered_limits_report_the_longest_wait() {
    let server = TestServer::start(LAYERED).await;
    let mut q = server.quota().await;

    let a = rsv(&mut q, reserve("alice", 500, 100)).await;
    assert_allowed(&a, 600);
    assert_all_four(&a.limits);
    let b = rsv(&mut q, reserve("alice", 495, 100)).await;
    assert_allowed(&b, 595);
    assert_all_four(&b.limits);
    // Bucket 5, window 2 of 3, day 1195 of 1500, 2 of 2 holds.

    // max_concurrent (1 s) and the bucket (5 tokens: 0.5 s) refuse: max_concurrent binds.
    let r = rsv(&mut q, reserve("alice", 10, 0)).await;
    assert_denied(&r, "max_concurrent", Some(SEC));
    assert_all_four(&r.limits);
    assert_eq!(remaining(&r.limits, "tokens_per_minute"), 5);
    assert_eq!(remaining(&r.limits, "requests_per_minute"), 1);
    assert_eq!(remaining(&r.limits, "tokens_per_day"), 305);
    assert_eq!(remaining(&r.limits, "max_concurrent"), 0);

    // The bucket needs 100 more tokens: 10 s, longer than max_concurrent's 1 s.
    let r = rsv(&mut q, reserve("alice", 105, 0)).await;
    assert_denied(&r, "tokens_per_minute", Some(10 * SEC));
    assert_all_four(&r.limits);

    // 400 more would break the day too, but open holds (1195) are what block it there, and
    // they outlive midnight: the day's hint is 1 s, so the bucket's 39.5 s binds.
    let r = rsv(&mut q, reserve("alice", 400, 0)).await;
    assert_denied(&r, "tokens_per_minute", Some(39 * SEC + SEC / 2));
    assert_all_four(&r.limits);

    // Free a slot and refill the bucket; a third request fills the minute window.
    assert_eq!(refund(&mut q, &b.reservation_id).await, 595);
    let c = rsv(&mut q, reserve("alice", 100, 0)).await;
    assert_allowed(&c, 100);
    // Now max_concurrent (1 s) and requests_per_minute (3 this minute: 60 s + 20 s) refuse.
    let r = rsv(&mut q, reserve("alice", 200, 0)).await;
    assert_denied(&r, "requests_per_minute", Some(80 * SEC));
    assert_all_four(&r.limits);
    let expect = [
        ("tokens_per_minute", 1200, 500),
        ("requests_per_minute", 3, 0),
        ("tokens_per_day", 1500, 800),
        ("max_concurrent", 2, 0),
    ];
    for (name, lim, rem) in expect {
        assert_eq!(limit(&r.limits, name).limit, lim, "{name}");
        assert_eq!(remaining(&r.limits, name), rem, "{name}");
    }

    // Larger than the burst: never, which outranks any wait (tokens_per_day says 12 h).
    let r = rsv(&mut q, reserve("alice", 1300, 0)).await;
    assert_denied(&r, "tokens_per_minute", None);

    // With the holds settled only the window is left; waiting as told is enough.
    assert_eq!(
        commit(&mut q, &a.reservation_id, 500, 100)
            .await
            .charged_tokens,
        600
    );
    assert_eq!(
        commit(&mut q, &c.reservation_id, 60, 40)
            .await
            .charged_tokens,
        100
    );
    let r = rsv(&mut q, reserve("alice", 200, 0)).await;
    assert_denied(&r, "requests_per_minute", Some(80 * SEC));
    server.advance_secs(80);
    let r = rsv(&mut q, reserve("alice", 200, 0)).await;
    assert_allowed(&r, 200);
    assert_all_four(&r.limits);
    assert_eq!(remaining(&r.limits, "tokens_per_day"), 1500 - 700 - 200);

    let u = usage(&mut q, "alice").await;
    assert_all_four(&u.limits);
    assert_eq!(u.limits.len(), 4);
    assert_eq!((u.used_tokens, u.held_tokens, u.requests), (700, 200, 4));

    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. SetSubject moves a subject to another tier.

const TWO_TIERS: &str = "default_tier = \"free\"\n\n[tiers.free]\ntokens_per_day = 100\n\
                         max_concurrent = 1\n\n[tiers.pro]\ntokens_per_day = 1000\n\
                         max_concurrent = 3\n";

#[tokio::test]
async fn set_subject_moves_a_subject_to_another_tier() {
    let server = TestServer::start(TWO_TIERS).await;
    let mut q = server.quota().await;
    let mut admin = server.admin().await;

    let r = rsv(&mut q, reserve("bob", 100, 50)).await;
    assert_denied(&r, "tokens_per_day", None);
    assert_eq!(limit(&r.limits, "tokens_per_day").limit, 100);

    // Without the token nothing changes.
    let mut anonymous = AdminClient::connect(server.url()).await.expect("connect");
    let err = anonymous
        .set_subject(set_subject_req("bob", "pro"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(usage(&mut q, "bob").await.tier, "free");

    let s = admin
        .set_subject(set_subject_req("bob", "pro"))
        .await
        .expect("set_subject")
        .into_inner();
    assert_eq!((s.subject.as_str(), s.tier.as_str()), ("bob", "pro"));
    let g = admin
        .get_subject(GetSubjectRequest {
            subject: "bob".into(),
        })
        .await
        .expect("get_subject")
        .into_inner();
    assert_eq!((g.tier.as_str(), g.assigned), ("pro", true));
    let g = admin
        .get_subject(GetSubjectRequest {
            subject: "carol".into(),
        })
        .await
        .expect("get_subject")
        .into_inner();
    assert_eq!((g.tier.as_str(), g.assigned), ("free", false));

    // The very next Reserve sees pro's limits.
    let r = rsv(&mut q, reserve("bob", 100, 50)).await;
    assert_allowed(&r, 150);
    assert_eq!(limit(&r.limits, "tokens_per_day").limit, 1000);
    assert_eq!(remaining(&r.limits, "tokens_per_day"), 850);
    assert_eq!(limit(&r.limits, "max_concurrent").limit, 3);
    assert_eq!(remaining(&r.limits, "max_concurrent"), 2);
    let u = usage(&mut q, "bob").await;
    assert_eq!(
        (u.tier.as_str(), u.held_tokens, u.open_holds),
        ("pro", 150, 1)
    );
    // Other subjects stay on the default.
    assert_denied(
        &rsv(&mut q, reserve("carol", 100, 50)).await,
        "tokens_per_day",
        None,
    );

    // An unknown tier is refused and changes nothing.
    let err = admin
        .set_subject(set_subject_req("bob", "gold"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(usage(&mut q, "bob").await.tier, "pro");

    // Back to free: its limits apply to what bob already holds.
    admin
        .set_subject(set_subject_req("bob", "free"))
        .await
        .expect("set_subject");
    let r = rsv(&mut q, reserve("bob", 10, 0)).await;
    // max_concurrent (1 s) and tokens_per_day (150 held of 100: until holds settle, 1 s) refuse.
    assert_eq!(r.retry_after.as_ref().map(|d| d.seconds), Some(1));
    assert!(
        r.denied_by == "tokens_per_day" || r.denied_by == "max_concurrent",
        "{r:?}"
    );
    assert_eq!(limit(&r.limits, "tokens_per_day").limit, 100);
    assert_eq!(remaining(&r.limits, "tokens_per_day"), 0);
    assert_eq!(remaining(&r.limits, "max_concurrent"), 0);
    let u = usage(&mut q, "bob").await;
    assert_eq!(
        (u.tier.as_str(), u.held_tokens, u.requests),
        ("free", 150, 1)
    );

    server.stop().await;
}
