//! The reservation lifecycle over real gRPC: Reserve (HELD), Commit, Refund, expiry, debt,
//! idempotency, and the purge of settled records after the 24 h retention.

mod common;
use common::*;

use tokio::task::JoinSet;
use tollgate::proto::{CommitRequest, Decision, ReserveRequest};
use tonic::Code;

/// A bucket of 1,000 tokens a minute, 10,000 tokens a day, 60 s holds (at most 600 s).
const POLICY: &str = r#"
default_tier = "std"

[tiers.std]
tokens_per_minute = 1000
tokens_per_day = 10000
hold_seconds = 60
max_hold_seconds = 600
"#;

/// A bucket of 60 tokens a minute: exactly one token a second.
const POLICY_SLOW_BUCKET: &str = r#"
default_tier = "std"

[tiers.std]
tokens_per_minute = 60
tokens_per_day = 100000
"#;

/// Only a day quota.
const POLICY_DAY_1000: &str = r#"
default_tier = "std"

[tiers.std]
tokens_per_day = 1000
"#;

/// One open hold at a time.
const POLICY_ONE_AT_A_TIME: &str = r#"
default_tier = "std"

[tiers.std]
tokens_per_day = 10000
max_concurrent = 1
hold_seconds = 60
"#;

/// Room for thousands of holds.
const POLICY_ROOMY: &str = r#"
default_tier = "std"

[tiers.std]
tokens_per_day = 100000000
hold_seconds = 60
"#;

const T0_SECS: i64 = (T0 / SEC) as i64;

fn commit_unknown(id: &str) -> CommitRequest {
    CommitRequest {
        reservation_id: id.to_string(),
        usage_unknown: true,
        ..Default::default()
    }
}

fn with_key(mut r: ReserveRequest, key: &str) -> ReserveRequest {
    r.idempotency_key = key.to_string();
    r
}

fn with_hold(mut r: ReserveRequest, secs: i64) -> ReserveRequest {
    r.hold = Some(prost_types::Duration {
        seconds: secs,
        nanos: 0,
    });
    r
}

fn secs(d: Option<prost_types::Duration>) -> (i64, i32) {
    let d = d.expect("a duration");
    (d.seconds, d.nanos)
}

/// An allowed Reserve: its reservation id.
async fn hold(q: &mut Quota, req: ReserveRequest) -> String {
    let r = rsv(q, req).await;
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    assert_eq!(r.reservation_id.len(), 36, "{r:?}");
    r.reservation_id
}

/// (open holds, reservation records) in memory. (Subjects are left out: the background sweeper
/// may forget subjects at rest at any time.)
fn holds_and_records(server: &TestServer) -> (usize, usize) {
    let (open, records, _) = server.ledger.counts().unwrap();
    (open, records)
}

#[tokio::test]
async fn commit_charges_actual_usage_and_gives_the_rest_back_to_every_limit() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;

    let r = rsv(&mut q, reserve("alice", 100, 400)).await;
    assert_eq!(decision(&r), Decision::Allowed);
    assert_eq!(r.reserved_tokens, 500);
    assert_eq!(r.prompt_tokens, 100);
    assert_eq!(limit(&r.limits, "tokens_per_minute").remaining, 500);
    assert_eq!(limit(&r.limits, "tokens_per_day").remaining, 9_500);
    let expires = r.expires_at.unwrap();
    assert_eq!((expires.seconds, expires.nanos), (T0_SECS + 60, 0));

    let u = usage(&mut q, "alice").await;
    assert_eq!(
        (u.held_tokens, u.used_tokens, u.open_holds, u.requests),
        (500, 0, 1, 1)
    );

    let c = commit(&mut q, &r.reservation_id, 100, 50).await;
    assert_eq!(c.charged_tokens, 150);
    assert_eq!(c.released_tokens, 350);
    assert_eq!(c.debt_tokens, 0);
    assert_eq!(limit(&c.limits, "tokens_per_minute").remaining, 850);
    assert_eq!(limit(&c.limits, "tokens_per_day").remaining, 9_850);

    let u = usage(&mut q, "alice").await;
    assert_eq!(
        (u.held_tokens, u.used_tokens, u.open_holds, u.requests),
        (0, 150, 0, 1)
    );
    assert_eq!(limit(&u.limits, "tokens_per_minute").remaining, 850);
    assert_eq!(limit(&u.limits, "tokens_per_day").remaining, 9_850);
    server.stop().await;
}

#[tokio::test]
async fn refund_gives_the_whole_hold_back() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;

    let id = hold(&mut q, reserve("alice", 100, 400)).await;
    let u = usage(&mut q, "alice").await;
    assert_eq!(limit(&u.limits, "tokens_per_minute").remaining, 500);
    assert_eq!(limit(&u.limits, "tokens_per_day").remaining, 9_500);

    let r = q.refund(refund_req(&id)).await.unwrap().into_inner();
    assert_eq!(r.released_tokens, 500);

    let u = usage(&mut q, "alice").await;
    assert_eq!(
        (u.held_tokens, u.used_tokens, u.open_holds, u.requests),
        (0, 0, 0, 1)
    );
    assert_eq!(limit(&u.limits, "tokens_per_minute").remaining, 1_000);
    assert_eq!(limit(&u.limits, "tokens_per_day").remaining, 10_000);
    server.stop().await;
}

#[tokio::test]
async fn commit_above_the_hold_puts_the_bucket_in_debt_until_it_refills() {
    let server = TestServer::start(POLICY_SLOW_BUCKET).await;
    let mut q = server.quota().await;

    let r = rsv(&mut q, reserve("alice", 10, 40)).await;
    assert_eq!(limit(&r.limits, "tokens_per_minute").remaining, 10);
    let c = commit(&mut q, &r.reservation_id, 10, 140).await;
    assert_eq!(
        (c.charged_tokens, c.released_tokens, c.debt_tokens),
        (150, 0, 100)
    );
    // The bucket is at -90 tokens: it reports nothing left.
    assert_eq!(limit(&c.limits, "tokens_per_minute").remaining, 0);

    // 10 tokens need the bucket at +10: 100 tokens of refill at one a second.
    let denied = rsv(&mut q, reserve("alice", 10, 0)).await;
    assert_eq!(decision(&denied), Decision::Denied);
    assert_eq!(denied.denied_by, "tokens_per_minute");
    assert_eq!(secs(denied.retry_after), (100, 0));

    server.advance_secs(99);
    let denied = rsv(&mut q, reserve("alice", 10, 0)).await;
    assert_eq!(decision(&denied), Decision::Denied);
    assert_eq!(secs(denied.retry_after), (1, 0));

    server.advance_secs(1);
    let admitted = rsv(&mut q, reserve("alice", 10, 0)).await;
    assert_eq!(decision(&admitted), Decision::Allowed, "{admitted:?}");
    assert_eq!(limit(&admitted.limits, "tokens_per_minute").remaining, 0);

    // The overage was charged, not lost.
    let u = usage(&mut q, "alice").await;
    assert_eq!(
        (u.used_tokens, u.held_tokens, u.open_holds, u.requests),
        (150, 10, 1, 2)
    );
    server.stop().await;
}

#[tokio::test]
async fn commit_above_the_hold_puts_the_day_in_debt_until_the_next_utc_day() {
    let server = TestServer::start(POLICY_DAY_1000).await;
    let mut q = server.quota().await;

    let id = hold(&mut q, reserve("alice", 100, 100)).await;
    let c = commit(&mut q, &id, 100, 1_400).await;
    assert_eq!(
        (c.charged_tokens, c.released_tokens, c.debt_tokens),
        (1_500, 0, 1_300)
    );
    assert_eq!(limit(&c.limits, "tokens_per_day").remaining, 0);

    let u = usage(&mut q, "alice").await;
    assert_eq!((u.used_tokens, u.held_tokens), (1_500, 0));

    // Even one token is refused until midnight UTC, 12 h after noon.
    let denied = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_eq!(decision(&denied), Decision::Denied);
    assert_eq!(denied.denied_by, "tokens_per_day");
    assert_eq!(secs(denied.retry_after), (12 * 3600, 0));

    server.advance_secs(12 * 3600 - 1);
    let denied = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_eq!(decision(&denied), Decision::Denied);
    assert_eq!(secs(denied.retry_after), (1, 0));
    assert_eq!(usage(&mut q, "alice").await.used_tokens, 1_500);

    server.advance_secs(1);
    let admitted = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_eq!(decision(&admitted), Decision::Allowed, "{admitted:?}");
    assert_eq!(limit(&admitted.limits, "tokens_per_day").remaining, 999);
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.used_tokens, u.held_tokens, u.requests), (0, 1, 1));
    server.stop().await;
}

#[tokio::test]
async fn repeating_a_commit_or_a_refund_returns_the_same_result() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;

    let a = hold(&mut q, reserve("alice", 100, 400)).await;
    let first = commit(&mut q, &a, 100, 50).await;
    let again = commit(&mut q, &a, 100, 50).await;
    assert_eq!(first, again);
    assert_eq!(
        (
            again.charged_tokens,
            again.released_tokens,
            again.debt_tokens
        ),
        (150, 350, 0)
    );

    let b = hold(&mut q, reserve("alice", 30, 70)).await;
    let first = q.refund(refund_req(&b)).await.unwrap().into_inner();
    let again = q.refund(refund_req(&b)).await.unwrap().into_inner();
    assert_eq!(first.released_tokens, 100);
    assert_eq!(again.released_tokens, 100);

    // Charged once, released once.
    let u = usage(&mut q, "alice").await;
    assert_eq!(
        (u.used_tokens, u.held_tokens, u.open_holds, u.requests),
        (150, 0, 0, 2)
    );
    assert_eq!(limit(&u.limits, "tokens_per_minute").remaining, 850);
    server.stop().await;
}

#[tokio::test]
async fn conflicting_settlements_are_failed_precondition_naming_the_state() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;

    let refunded = hold(&mut q, reserve("alice", 100, 400)).await;
    refund(&mut q, &refunded).await;
    assert_status(
        q.commit(commit_req(&refunded, 100, 50)).await,
        Code::FailedPrecondition,
        &["REFUNDED", &refunded],
    );
    assert_status(
        q.commit(commit_unknown(&refunded)).await,
        Code::FailedPrecondition,
        &["REFUNDED"],
    );

    let committed = hold(&mut q, reserve("alice", 100, 400)).await;
    commit(&mut q, &committed, 100, 50).await;
    assert_status(
        q.refund(refund_req(&committed)).await,
        Code::FailedPrecondition,
        &["COMMITTED", &committed],
    );
    assert_status(
        q.commit(commit_req(&committed, 100, 51)).await,
        Code::FailedPrecondition,
        &[
            "COMMITTED",
            "completion_tokens = 50",
            "completion_tokens = 51",
        ],
    );
    assert_status(
        q.commit(commit_req(&committed, 150, 0)).await,
        Code::FailedPrecondition,
        &["COMMITTED"],
    );
    assert_status(
        q.commit(commit_unknown(&committed)).await,
        Code::FailedPrecondition,
        &["COMMITTED", "usage_unknown"],
    );

    // None of the refused calls changed anything.
    let u = usage(&mut q, "alice").await;
    assert_eq!(
        (u.used_tokens, u.held_tokens, u.open_holds, u.requests),
        (150, 0, 0, 2)
    );
    assert_eq!(limit(&u.limits, "tokens_per_minute").remaining, 850);
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_well_formed_id_is_not_found() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;
    assert_status(
        q.commit(commit_req(WELL_FORMED_UNKNOWN_ID, 1, 1)).await,
        Code::NotFound,
        &[WELL_FORMED_UNKNOWN_ID],
    );
    assert_status(
        q.refund(refund_req(WELL_FORMED_UNKNOWN_ID)).await,
        Code::NotFound,
        &[WELL_FORMED_UNKNOWN_ID],
    );
    assert_eq!(server.ledger.counts().unwrap(), (0, 0, 0));
    server.stop().await;
}

#[tokio::test]
async fn a_retried_reserve_returns_the_first_answer_and_holds_nothing_more() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;

    let first = rsv(&mut q, with_key(reserve("alice", 100, 400), "k1")).await;
    assert_eq!(decision(&first), Decision::Allowed);
    assert!(!first.replayed);
    let before = usage(&mut q, "alice").await;
    assert_eq!(
        (before.held_tokens, before.open_holds, before.requests),
        (500, 1, 1)
    );

    server.advance_secs(10);
    for _ in 0..3 {
        let again = rsv(&mut q, with_key(reserve("alice", 100, 400), "k1")).await;
        assert_eq!(decision(&again), Decision::Allowed);
        assert_eq!(again.reservation_id, first.reservation_id);
        assert_eq!(again.expires_at, first.expires_at);
        assert!(again.replayed);
        assert_eq!(again.reserved_tokens, 500);
        assert_eq!(again.model, "gpt-4o");
    }
    let after = usage(&mut q, "alice").await;
    assert_eq!(
        (after.held_tokens, after.open_holds, after.requests),
        (500, 1, 1)
    );
    assert_eq!(limit(&after.limits, "tokens_per_day").remaining, 9_500);
    assert_eq!(server.ledger.counts().unwrap().0, 1);

    // The one hold is settled once.
    let c = commit(&mut q, &first.reservation_id, 100, 100).await;
    assert_eq!(c.charged_tokens, 200);
    server.stop().await;
}

#[tokio::test]
async fn a_reused_key_with_a_different_request_names_the_field_that_differs() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;
    let first = hold(&mut q, with_key(reserve("alice", 100, 400), "k1")).await;
    let before = usage(&mut q, "alice").await;

    let mut other_model = with_key(reserve("alice", 100, 400), "k1");
    other_model.model = "gpt-4o-mini".into();
    assert_status(
        q.reserve(other_model).await,
        Code::FailedPrecondition,
        &[
            "k1",
            "with model = \"gpt-4o\"",
            "now model = \"gpt-4o-mini\"",
        ],
    );
    assert_status(
        q.reserve(with_key(reserve("alice", 101, 400), "k1")).await,
        Code::FailedPrecondition,
        &["with prompt_tokens = 100", "now prompt_tokens = 101"],
    );
    assert_status(
        q.reserve(with_key(reserve("alice", 100, 401), "k1")).await,
        Code::FailedPrecondition,
        &[
            "with max_output_tokens = 400",
            "now max_output_tokens = 401",
        ],
    );
    assert_status(
        q.reserve(with_hold(with_key(reserve("alice", 100, 400), "k1"), 30))
            .await,
        Code::FailedPrecondition,
        &["with hold = ", "now hold = "],
    );

    assert_eq!(usage(&mut q, "alice").await, before);
    assert_eq!(server.ledger.counts().unwrap().0, 1);
    // The first request itself still replays.
    assert_eq!(
        hold(&mut q, with_key(reserve("alice", 100, 400), "k1")).await,
        first
    );
    server.stop().await;
}

#[tokio::test]
async fn the_same_key_for_another_subject_is_independent() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;
    let a = hold(&mut q, with_key(reserve("alice", 100, 400), "k1")).await;
    let b = hold(&mut q, with_key(reserve("bob", 100, 400), "k1")).await;
    assert_ne!(a, b);
    // A different payload under the same key is fine for another subject.
    let c = hold(&mut q, with_key(reserve("carol", 7, 3), "k1")).await;
    assert_ne!(c, a);

    let u = usage(&mut q, "alice").await;
    assert_eq!((u.held_tokens, u.open_holds), (500, 1));
    let u = usage(&mut q, "bob").await;
    assert_eq!((u.held_tokens, u.open_holds), (500, 1));
    let u = usage(&mut q, "carol").await;
    assert_eq!((u.held_tokens, u.open_holds), (10, 1));
    assert_eq!(server.ledger.counts().unwrap().0, 3);

    refund(&mut q, &a).await;
    assert_eq!(
        hold(&mut q, with_key(reserve("bob", 100, 400), "k1")).await,
        b
    );
    server.stop().await;
}

#[tokio::test]
async fn usage_unknown_charges_the_full_hold() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;

    let id = hold(&mut q, reserve("alice", 100, 400)).await;
    let c = q.commit(commit_unknown(&id)).await.unwrap().into_inner();
    assert_eq!(
        (c.charged_tokens, c.released_tokens, c.debt_tokens),
        (500, 0, 0)
    );
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.used_tokens, u.held_tokens, u.open_holds), (500, 0, 0));
    assert_eq!(limit(&u.limits, "tokens_per_minute").remaining, 500);
    server.stop().await;
}

#[tokio::test]
async fn usage_unknown_with_token_counts_is_invalid_and_changes_nothing() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;

    let id = hold(&mut q, reserve("alice", 100, 400)).await;
    let before = usage(&mut q, "alice").await;
    for (p, c) in [(1, 0), (0, 1), (100, 400)] {
        let mut req = commit_req(&id, p, c);
        req.usage_unknown = true;
        assert_status(
            q.commit(req).await,
            Code::InvalidArgument,
            &["usage_unknown"],
        );
    }
    assert_eq!(usage(&mut q, "alice").await, before);
    // Still HELD: a refund gives it all back.
    assert_eq!(refund(&mut q, &id).await, 500);
    server.stop().await;
}

#[tokio::test]
async fn an_unsettled_hold_expires_at_the_tier_default_and_is_charged_in_full() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;

    let r = rsv(&mut q, reserve("alice", 100, 400)).await;
    assert_eq!(r.expires_at.unwrap().seconds, T0_SECS + 60);

    server.advance_secs(59);
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.held_tokens, u.used_tokens, u.open_holds), (500, 0, 1));

    server.advance_secs(1);
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.held_tokens, u.used_tokens, u.open_holds), (0, 500, 0));
    assert_eq!(limit(&u.limits, "tokens_per_day").remaining, 9_500);
    assert_eq!(server.ledger.counts().unwrap().0, 0);
    server.stop().await;
}

#[tokio::test]
async fn a_requested_hold_duration_sets_the_deadline() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;

    let r = rsv(&mut q, with_hold(reserve("alice", 100, 400), 15)).await;
    assert_eq!(decision(&r), Decision::Allowed);
    assert_eq!(r.expires_at.unwrap().seconds, T0_SECS + 15);
    // Longer than the default is allowed up to max_hold_seconds.
    let long = rsv(&mut q, with_hold(reserve("bob", 1, 1), 600)).await;
    assert_eq!(long.expires_at.unwrap().seconds, T0_SECS + 600);

    server.advance_secs(14);
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.held_tokens, u.used_tokens, u.open_holds), (500, 0, 1));
    server.advance_secs(1);
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.held_tokens, u.used_tokens, u.open_holds), (0, 500, 0));

    // Past the tier default (60 s) bob's 600 s hold is still open.
    server.advance_secs(100);
    let u = usage(&mut q, "bob").await;
    assert_eq!((u.held_tokens, u.used_tokens, u.open_holds), (2, 0, 1));
    server.advance_secs(485);
    let u = usage(&mut q, "bob").await;
    assert_eq!((u.held_tokens, u.used_tokens, u.open_holds), (0, 2, 0));
    server.stop().await;
}

#[tokio::test]
async fn reserve_expires_due_holds_before_deciding() {
    let server = TestServer::start(POLICY_ONE_AT_A_TIME).await;
    let mut q = server.quota().await;

    hold(&mut q, with_hold(reserve("alice", 10, 10), 15)).await;
    let denied = rsv(&mut q, reserve("alice", 10, 10)).await;
    assert_eq!(decision(&denied), Decision::Denied);
    assert_eq!(denied.denied_by, "max_concurrent");

    server.advance_secs(15);
    // No GetUsage in between: the Reserve itself expires the first hold and admits.
    let admitted = rsv(&mut q, reserve("alice", 10, 10)).await;
    assert_eq!(decision(&admitted), Decision::Allowed, "{admitted:?}");
    let u = usage(&mut q, "alice").await;
    assert_eq!(
        (u.held_tokens, u.used_tokens, u.open_holds, u.requests),
        (20, 20, 1, 2)
    );
    server.stop().await;
}

#[tokio::test]
async fn refund_after_expiry_is_failed_precondition_naming_expired() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;

    let id = hold(&mut q, reserve("alice", 100, 400)).await;
    server.advance_secs(60);
    assert_status(
        q.refund(refund_req(&id)).await,
        Code::FailedPrecondition,
        &["EXPIRED", &id],
    );
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.held_tokens, u.used_tokens, u.open_holds), (0, 500, 0));
    server.stop().await;
}

#[tokio::test]
async fn a_late_commit_reconciles_an_expired_hold_to_the_actual_usage() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;

    let id = hold(&mut q, reserve("alice", 100, 400)).await;
    server.advance_secs(60);
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.held_tokens, u.used_tokens, u.open_holds), (0, 500, 0));

    server.advance_secs(3_600);
    let c = commit(&mut q, &id, 100, 50).await;
    assert_eq!(
        (c.charged_tokens, c.released_tokens, c.debt_tokens),
        (150, 350, 0)
    );
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.held_tokens, u.used_tokens, u.open_holds), (0, 150, 0));
    assert_eq!(limit(&u.limits, "tokens_per_day").remaining, 9_850);

    // Now COMMITTED: the same Commit repeats, anything else conflicts.
    assert_eq!(commit(&mut q, &id, 100, 50).await, c);
    assert_status(
        q.refund(refund_req(&id)).await,
        Code::FailedPrecondition,
        &["COMMITTED"],
    );
    assert_eq!(usage(&mut q, "alice").await.used_tokens, 150);
    server.stop().await;
}

#[tokio::test]
async fn a_late_commit_above_the_hold_charges_the_debt() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;

    let id = hold(&mut q, reserve("alice", 100, 400)).await;
    server.advance_secs(61);
    assert_eq!(usage(&mut q, "alice").await.used_tokens, 500);
    let c = commit(&mut q, &id, 100, 600).await;
    assert_eq!(
        (c.charged_tokens, c.released_tokens, c.debt_tokens),
        (700, 0, 200)
    );
    let u = usage(&mut q, "alice").await;
    assert_eq!((u.held_tokens, u.used_tokens, u.open_holds), (0, 700, 0));
    server.stop().await;
}

#[tokio::test]
async fn a_hold_above_max_hold_seconds_is_invalid_and_holds_nothing() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;
    let before = usage(&mut q, "alice").await;
    assert_status(
        q.reserve(with_hold(reserve("alice", 100, 400), 601)).await,
        Code::InvalidArgument,
        &["hold", "600"],
    );
    assert_eq!(usage(&mut q, "alice").await, before);
    assert_eq!(server.ledger.counts().unwrap().0, 0);
    server.stop().await;
}

#[tokio::test]
async fn settled_and_expired_records_are_purged_after_the_retention() {
    const N: usize = 1_000;
    let server = TestServer::start(POLICY_ROOMY).await;
    let q = server.quota().await;

    // 1,000 holds, made concurrently (group commit makes that fast), each with a key.
    let mut tasks = JoinSet::new();
    for i in 0..N {
        let mut q = q.clone();
        tasks.spawn(async move {
            let req = with_key(
                reserve(&format!("user-{}", i % 10), 10, 10),
                &format!("key-{i}"),
            );
            (i, hold(&mut q, req).await)
        });
    }
    let mut ids = vec![String::new(); N];
    while let Some(done) = tasks.join_next().await {
        let (i, id) = done.unwrap();
        ids[i] = id;
    }
    assert_eq!(holds_and_records(&server), (N, N));

    // A third committed, a third refunded, a third left to expire.
    let mut q = q.clone();
    for (i, id) in ids.iter().enumerate() {
        match i % 3 {
            0 => {
                commit(&mut q, id, 10, 5).await;
            }
            1 => {
                refund(&mut q, id).await;
            }
            _ => {}
        }
    }
    let left = N / 3;
    assert_eq!(holds_and_records(&server), (left, N));

    // At T0 + 60 s the rest expire (and are settled then).
    server.advance_secs(60);
    server.ledger.housekeeping().await.unwrap();
    assert_eq!(holds_and_records(&server), (0, N));
    let u = usage(&mut q, "user-2").await;
    assert_eq!((u.open_holds, u.held_tokens), (0, 0));

    // 24 h after the commits and refunds (T0), those go; the expired ones are 60 s younger.
    server.advance_secs(24 * 3600 - 60);
    server.ledger.housekeeping().await.unwrap();
    assert_eq!(holds_and_records(&server), (0, left));
    assert_status(
        q.commit(commit_req(&ids[0], 10, 5)).await,
        Code::NotFound,
        &[&ids[0]],
    );
    assert_status(
        q.refund(refund_req(&ids[1])).await,
        Code::NotFound,
        &[&ids[1]],
    );
    // An expired one can still be committed late (within its own 24 h).
    let late = commit(&mut q, &ids[2], 10, 0).await;
    assert_eq!((late.charged_tokens, late.released_tokens), (10, 10));

    server.advance_secs(60);
    server.ledger.housekeeping().await.unwrap();
    assert_eq!(
        holds_and_records(&server),
        (0, 1),
        "only the late commit is left"
    );
    assert_status(
        q.commit(commit_req(&ids[5], 10, 5)).await,
        Code::NotFound,
        &[],
    );
    assert_status(q.refund(refund_req(&ids[5])).await, Code::NotFound, &[]);

    // The keys went with their records: an old key makes a new hold now.
    let fresh = hold(&mut q, with_key(reserve("user-0", 10, 10), "key-0")).await;
    assert_ne!(fresh, ids[0]);
    refund(&mut q, &fresh).await;

    // 24 h after the late commit and the refund, nothing is left, and a restart brings
    // nothing back.
    server.advance_secs(24 * 3600);
    server.ledger.housekeeping().await.unwrap();
    assert_eq!(holds_and_records(&server), (0, 0));
    let server = server.restart(POLICY_ROOMY).await;
    assert_eq!(holds_and_records(&server), (0, 0));
    let mut q = server.quota().await;
    assert_status(
        q.commit(commit_req(&ids[2], 10, 0)).await,
        Code::NotFound,
        &[],
    );
    server.stop().await;
}
