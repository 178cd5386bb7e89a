//! The first exercise of the issue: a 500-token daily quota over real gRPC.

mod common;

use common::*;
use tollgate::proto::Decision;

#[tokio::test]
async fn a_600_token_reserve_is_denied_and_two_300s_admit_one() {
    let server = TestServer::start(POLICY_500).await;
    let mut q = server.quota().await;

    let r = rsv(&mut q, reserve("alice", 600, 0)).await;
    assert_eq!(decision(&r), Decision::Denied);
    assert_eq!(r.denied_by, "tokens_per_day");
    assert!(r.reservation_id.is_empty());
    assert!(r.retry_after.is_none(), "600 > 500 can never fit: {r:?}");

    let first = rsv(&mut q, reserve("alice", 300, 0)).await;
    assert_eq!(decision(&first), Decision::Allowed);
    assert_eq!(first.reserved_tokens, 300);
    assert!(!first.reservation_id.is_empty());
    assert_eq!(limit(&first.limits, "tokens_per_day").remaining, 200);

    let second = rsv(&mut q, reserve("alice", 300, 0)).await;
    assert_eq!(decision(&second), Decision::Denied);
    assert_eq!(second.denied_by, "tokens_per_day");
    // The first hold is what blocks it, and holds outlive midnight, so the hint is short: the
    // first call may commit less than it held at any moment.
    assert_eq!(second.retry_after.unwrap().seconds, 1);

    // Once the first commits only 150, the second fits.
    let c = commit(&mut q, &first.reservation_id, 100, 50).await;
    assert_eq!((c.charged_tokens, c.released_tokens), (150, 150));
    let third = rsv(&mut q, reserve("alice", 300, 0)).await;
    assert_eq!(decision(&third), Decision::Allowed);
    // Now charged usage (150 + 300 held) leaves 50; 300 more waits for tomorrow, 12 h from noon.
    let fourth = rsv(&mut q, reserve("alice", 100, 0)).await;
    assert_eq!(decision(&fourth), Decision::Denied);
    assert_eq!(fourth.retry_after.unwrap().seconds, 12 * 3600);

    let u = q
        .get_usage(tollgate::proto::GetUsageRequest {
            subject: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.held_tokens, 300);
    assert_eq!(u.used_tokens, 150);
    assert_eq!(u.requests, 2);
    assert_eq!(u.open_holds, 1);
    assert_eq!(u.tier, "free");
    server.stop().await;
}

/// A new user's first call against the embedded default policy: a short prompt as text, no
/// max_output_tokens. Every tier must admit it (the default output hold is 4,096 tokens).
#[tokio::test]
async fn the_embedded_default_policy_admits_a_typical_first_reserve_in_every_tier() {
    let server = TestServer::start(tollgate::policy::DEFAULT_POLICY_TOML).await;
    let mut admin = server.admin().await;
    let mut q = server.quota().await;
    for tier in ["free", "pro", "enterprise"] {
        let subject = format!("new-{tier}");
        admin
            .set_subject(set_subject_req(&subject, tier))
            .await
            .unwrap();
        let r = rsv(
            &mut q,
            tollgate::proto::ReserveRequest {
                subject,
                model: "gpt-4o-mini".into(),
                prompt: Some("Hello there, how many tokens is this?".into()),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(decision(&r), Decision::Allowed, "{tier}: {r:?}");
        assert_eq!(
            r.reserved_tokens,
            r.prompt_tokens + tollgate::policy::DEFAULT_MAX_OUTPUT_TOKENS,
            "{tier}"
        );
    }
    server.stop().await;
}
