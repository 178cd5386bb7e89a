//! What survives a graceful restart, and the Admin service (auth, SetSubject, ResetUsage).

mod common;
use common::*;

use tollgate::proto::admin_client::AdminClient;
use tollgate::proto::{Decision, GetSubjectRequest, GetUsageResponse, ResetUsageRequest};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// std: a bucket of 600 tokens a minute (10 a second); pro: more of everything.
const POLICY: &str = r#"
default_tier = "std"

[tiers.std]
tokens_per_minute = 600
tokens_per_day = 10000
hold_seconds = 60

[tiers.pro]
tokens_per_minute = 6000
tokens_per_day = 100000
hold_seconds = 120
"#;

async fn hold(q: &mut Quota, req: tollgate::proto::ReserveRequest) -> String {
    let r = rsv(q, req).await;
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    r.reservation_id
}

/// (held, used, open holds, requests) of a usage report.
fn counts(u: &GetUsageResponse) -> (u64, u64, u32, u64) {
    (u.held_tokens, u.used_tokens, u.open_holds, u.requests)
}

#[tokio::test]
async fn holds_usage_bucket_keys_and_tiers_survive_a_restart() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;
    let mut admin = server.admin().await;

    admin
        .set_subject(set_subject_req("carol", "pro"))
        .await
        .unwrap();

    // alice: one open hold under a key, and one committed call.
    let mut keyed = reserve("alice", 100, 200);
    keyed.idempotency_key = "k1".into();
    let first = rsv(&mut q, keyed.clone()).await;
    assert_eq!(decision(&first), Decision::Allowed);
    let done = hold(&mut q, reserve("alice", 50, 50)).await;
    let c = commit(&mut q, &done, 50, 30).await;
    assert_eq!((c.charged_tokens, c.released_tokens), (80, 20));
    // Bucket: 600 - 300 - 100 + 20.
    let before = usage(&mut q, "alice").await;
    assert_eq!(counts(&before), (300, 80, 1, 2));
    assert_eq!(limit(&before.limits, "tokens_per_minute").remaining, 220);
    let carol_hold = hold(&mut q, reserve("carol", 1_000, 1_000)).await;

    // Ten seconds pass while the server is down (the bucket is stored as a level and a time,
    // so time that passes before the stop or after it is the same to it).
    server.advance_secs(10);
    let server = server.restart(POLICY).await;
    let mut q = server.quota().await;
    let mut admin = server.admin().await;

    let after = usage(&mut q, "alice").await;
    assert_eq!(counts(&after), (300, 80, 1, 2));
    assert_eq!(after.tier, "std");
    assert_eq!(
        limit(&after.limits, "tokens_per_minute").remaining,
        320,
        "refilled 10 s x 10/s"
    );
    assert_eq!(
        limit(&after.limits, "tokens_per_day").remaining,
        10_000 - 380
    );

    let carol = admin
        .get_subject(GetSubjectRequest {
            subject: "carol".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((carol.tier.as_str(), carol.assigned), ("pro", true));
    let carol_usage = usage(&mut q, "carol").await;
    assert_eq!(carol_usage.tier, "pro");
    assert_eq!(counts(&carol_usage), (2_000, 0, 1, 1));
    assert_eq!(limit(&carol_usage.limits, "tokens_per_minute").limit, 6_000);

    // The key still replays the first answer and holds nothing more.
    let again = rsv(&mut q, keyed).await;
    assert_eq!(again.reservation_id, first.reservation_id);
    assert_eq!(again.expires_at, first.expires_at);
    assert_eq!(counts(&usage(&mut q, "alice").await), (300, 80, 1, 2));
    // And a settled reservation is still settled.
    let c2 = commit(&mut q, &done, 50, 30).await;
    assert_eq!(
        (c2.charged_tokens, c2.released_tokens, c2.debt_tokens),
        (80, 20, 0)
    );

    // The hold made before the restart is committed after it.
    let c = commit(&mut q, &first.reservation_id, 100, 100).await;
    assert_eq!(
        (c.charged_tokens, c.released_tokens, c.debt_tokens),
        (200, 100, 0)
    );
    assert_eq!(limit(&c.limits, "tokens_per_minute").remaining, 420);
    assert_eq!(counts(&usage(&mut q, "alice").await), (0, 280, 0, 2));
    assert_eq!(refund(&mut q, &carol_hold).await, 2_000);
    server.stop().await;
}

#[tokio::test]
async fn a_hold_keeps_its_deadline_across_a_restart() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;
    let id = hold(&mut q, reserve("alice", 100, 200)).await;

    server.advance_secs(30);
    let server = server.restart(POLICY).await;
    let mut q = server.quota().await;
    assert_eq!(server.ledger.counts().unwrap().0, 1);

    server.advance_secs(29);
    assert_eq!(counts(&usage(&mut q, "alice").await), (300, 0, 1, 1));
    server.advance_secs(1);
    assert_eq!(counts(&usage(&mut q, "alice").await), (0, 300, 0, 1));
    assert_status(
        q.refund(refund_req(&id)).await,
        Code::FailedPrecondition,
        &["EXPIRED"],
    );
    server.stop().await;
}

/// A call that fails (here: NOT_FOUND, FAILED_PRECONDITION) may first expire holds that are due;
/// those expiries must be persisted like any other, or a restart finds the holds still open and
/// charges them a second time.
#[tokio::test]
async fn an_expiry_made_by_a_failing_call_is_persisted_and_not_charged_twice() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;
    let a = hold(&mut q, reserve("alice", 100, 200)).await;
    let b = hold(&mut q, reserve("bob", 10, 20)).await;

    server.advance_secs(60);
    // Both fail, and both are the first calls to see the deadlines passed.
    assert_status(
        q.commit(commit_req(WELL_FORMED_UNKNOWN_ID, 1, 1)).await,
        Code::NotFound,
        &[],
    );
    assert_status(
        q.refund(refund_req(&b)).await,
        Code::FailedPrecondition,
        &["EXPIRED"],
    );
    // Alice's state is written again by a later call.
    let c = hold(&mut q, reserve("alice", 5, 5)).await;
    commit(&mut q, &c, 5, 5).await;
    assert_eq!(counts(&usage(&mut q, "alice").await), (0, 310, 0, 2));
    assert_eq!(counts(&usage(&mut q, "bob").await), (0, 30, 0, 1));

    let server = server.restart(POLICY).await;
    let mut q = server.quota().await;
    assert_eq!(server.ledger.counts().unwrap().0, 0);
    assert_eq!(counts(&usage(&mut q, "alice").await), (0, 310, 0, 2));
    assert_eq!(counts(&usage(&mut q, "bob").await), (0, 30, 0, 1));
    assert_status(
        q.refund(refund_req(&a)).await,
        Code::FailedPrecondition,
        &["EXPIRED"],
    );
    server.stop().await;
}

#[tokio::test]
async fn admin_calls_without_the_right_bearer_token_are_unauthenticated() {
    let server = TestServer::start(POLICY).await;

    let mut plain = AdminClient::connect(server.url()).await.unwrap();
    assert_status(
        plain.set_subject(set_subject_req("alice", "pro")).await,
        Code::Unauthenticated,
        &[],
    );
    assert_status(
        plain
            .get_subject(GetSubjectRequest {
                subject: "alice".into(),
            })
            .await,
        Code::Unauthenticated,
        &[],
    );
    assert_status(
        plain
            .reset_usage(ResetUsageRequest {
                subject: "alice".into(),
            })
            .await,
        Code::Unauthenticated,
        &[],
    );

    for bad in [
        "Bearer wrong-token".to_string(),
        format!("Bearer {ADMIN_TOKEN}x"),
        format!("Bearer {}", &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]),
        ADMIN_TOKEN.to_string(),
        format!("Basic {ADMIN_TOKEN}"),
        format!("Bearer  {ADMIN_TOKEN}x"),
    ] {
        let value: MetadataValue<_> = bad.parse().unwrap();
        let channel = Channel::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut wrong = AdminClient::with_interceptor(channel, move |mut req: Request<()>| {
            req.metadata_mut().insert("authorization", value.clone());
            Ok(req)
        });
        assert_status(
            wrong.set_subject(set_subject_req("alice", "pro")).await,
            Code::Unauthenticated,
            &[],
        );
    }

    // None of them assigned anything; the right token works.
    let mut admin = server.admin().await;
    let s = admin
        .get_subject(GetSubjectRequest {
            subject: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.tier.as_str(), s.assigned), ("std", false));
    server.stop().await;
}

#[tokio::test]
async fn set_subject_assigns_a_tier_and_an_unknown_tier_is_invalid() {
    let server = TestServer::start(POLICY).await;
    let mut admin = server.admin().await;
    let mut q = server.quota().await;

    for tier in ["gold", ""] {
        assert_status(
            admin.set_subject(set_subject_req("alice", tier)).await,
            Code::InvalidArgument,
            &["tier"],
        );
    }
    let s = admin
        .get_subject(GetSubjectRequest {
            subject: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.tier.as_str(), s.assigned), ("std", false));

    let set = admin
        .set_subject(set_subject_req("alice", "pro"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((set.subject.as_str(), set.tier.as_str()), ("alice", "pro"));
    let s = admin
        .get_subject(GetSubjectRequest {
            subject: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.tier.as_str(), s.assigned), ("pro", true));
    let u = usage(&mut q, "alice").await;
    assert_eq!(u.tier, "pro");
    assert_eq!(limit(&u.limits, "tokens_per_day").limit, 100_000);
    // A 5,000-token hold fits pro's bucket, not std's.
    hold(&mut q, reserve("alice", 2_500, 2_500)).await;
    server.stop().await;
}

#[tokio::test]
async fn reset_usage_clears_today_but_keeps_open_holds() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;
    let mut admin = server.admin().await;

    let open = hold(&mut q, reserve("alice", 100, 200)).await;
    let done = hold(&mut q, reserve("alice", 50, 50)).await;
    commit(&mut q, &done, 50, 50).await;
    let before = usage(&mut q, "alice").await;
    assert_eq!(counts(&before), (300, 100, 1, 2));
    assert_eq!(limit(&before.limits, "tokens_per_minute").remaining, 200);

    let r = admin
        .reset_usage(ResetUsageRequest {
            subject: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.subject, "alice");
    let after = usage(&mut q, "alice").await;
    assert_eq!(counts(&after), (300, 0, 1, 0));
    assert_eq!(limit(&after.limits, "tokens_per_minute").remaining, 600);
    assert_eq!(limit(&after.limits, "tokens_per_day").remaining, 9_700);
    assert_eq!(server.ledger.counts().unwrap().0, 1);

    // The open hold is still owed its Commit, and it counts after the reset.
    let c = commit(&mut q, &open, 100, 100).await;
    assert_eq!((c.charged_tokens, c.released_tokens), (200, 100));
    assert_eq!(counts(&usage(&mut q, "alice").await), (0, 200, 0, 0));

    // And the reset itself is durable.
    let server = server.restart(POLICY).await;
    let mut q = server.quota().await;
    assert_eq!(counts(&usage(&mut q, "alice").await), (0, 200, 0, 0));
    server.stop().await;
}
