//! Bad input is INVALID_ARGUMENT with a message that names the field, and changes nothing.

mod common;
use common::*;

use tollgate::proto::{Decision, GetUsageRequest, ReserveRequest};
use tonic::Code;

/// Large enough that the per-request bound, not the policy, is what is tested.
const POLICY_BIG: &str = r#"
default_tier = "big"

[tiers.big]
tokens_per_day = 1000000000
"#;

/// A server where alice has one committed call (used 30) and one open hold (held 20), so
/// "nothing changed" compares something.
async fn server_with_alice(policy: &str) -> (TestServer, Quota, String) {
    let server = TestServer::start(policy).await;
    let mut q = server.quota().await;
    let done = rsv(&mut q, reserve("alice", 10, 30)).await;
    assert_eq!(decision(&done), Decision::Allowed);
    commit(&mut q, &done.reservation_id, 10, 20).await;
    let open = rsv(&mut q, reserve("alice", 10, 10)).await;
    assert_eq!(decision(&open), Decision::Allowed);
    let u = usage(&mut q, "alice").await;
    assert_eq!(
        (u.used_tokens, u.held_tokens, u.open_holds, u.requests),
        (30, 20, 1, 2)
    );
    (server, q, open.reservation_id)
}

/// An INVALID_ARGUMENT whose message begins with the field's name.
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    field: &str,
) -> String {
    let status = match result {
        Ok(r) => panic!(
            "expected INVALID_ARGUMENT on {field}, got OK: {:?}",
            r.into_inner()
        ),
        Err(s) => s,
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with(&format!("{field}: ")),
        "message {:?} should name {field}",
        status.message()
    );
    status.message().to_string()
}

/// Runs a Reserve that must be refused as invalid on `field`, and checks that alice's usage
/// and the ledger's counts did not move.
async fn refused_reserve(
    server: &TestServer,
    q: &mut Quota,
    req: ReserveRequest,
    field: &str,
) -> String {
    let before = usage(q, "alice").await;
    let counts = server.ledger.counts().unwrap();
    let message = assert_invalid(q.reserve(req).await, field);
    assert_eq!(usage(q, "alice").await, before);
    assert_eq!(server.ledger.counts().unwrap(), counts);
    message
}

/// Reserve needs a subject; GetUsage without one answers for the whole fleet.
#[tokio::test]
async fn an_empty_subject_is_invalid_for_reserve_and_means_the_fleet_for_get_usage() {
    let (server, mut q, _) = server_with_alice(POLICY_500).await;
    let counts = server.ledger.counts().unwrap();
    let m = assert_invalid(q.reserve(reserve("", 10, 10)).await, "subject");
    assert!(m.contains("required"), "{m}");
    let fleet = q
        .get_usage(GetUsageRequest {
            subject: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (fleet.scope.as_str(), fleet.subject.as_str()),
        ("global", "")
    );
    assert_eq!(server.ledger.counts().unwrap(), counts);
    server.stop().await;
}

#[tokio::test]
async fn a_subject_of_257_bytes_is_invalid_and_256_is_accepted() {
    let server = TestServer::start(POLICY_500).await;
    let mut q = server.quota().await;

    let long = "s".repeat(257);
    let m = assert_invalid(q.reserve(reserve(&long, 10, 10)).await, "subject");
    assert!(m.contains("256") && m.contains("257"), "{m}");
    assert_invalid(
        q.get_usage(GetUsageRequest {
            subject: long.clone(),
            ..Default::default()
        })
        .await,
        "subject",
    );
    // Multi-byte characters count in bytes: 128 two-byte characters plus one byte is 257.
    let wide = format!("{}x", "é".repeat(128));
    assert_eq!(wide.len(), 257);
    assert_invalid(q.reserve(reserve(&wide, 10, 10)).await, "subject");
    assert_eq!(server.ledger.counts().unwrap(), (0, 0, 0));

    let max = "s".repeat(256);
    let r = rsv(&mut q, reserve(&max, 10, 10)).await;
    assert_eq!(decision(&r), Decision::Allowed);
    let u = usage(&mut q, &max).await;
    assert_eq!((u.held_tokens, u.open_holds), (20, 1));
    assert_eq!(u.subject, max);
    server.stop().await;
}

#[tokio::test]
async fn a_subject_with_a_control_character_is_invalid() {
    let (server, mut q, _) = server_with_alice(POLICY_500).await;
    let counts = server.ledger.counts().unwrap();
    for subject in ["ali\nce", "alice\0", "\ttab", "del\u{7f}", "c1\u{85}"] {
        let m = assert_invalid(q.reserve(reserve(subject, 10, 10)).await, "subject");
        assert!(m.contains("control"), "{m}");
        assert_invalid(
            q.get_usage(GetUsageRequest {
                subject: subject.to_string(),
                ..Default::default()
            })
            .await,
            "subject",
        );
    }
    assert_eq!(server.ledger.counts().unwrap(), counts);
    assert_eq!(usage(&mut q, "alice").await.open_holds, 1);
    server.stop().await;
}

#[tokio::test]
async fn token_counts_above_the_per_request_bound_are_invalid() {
    let (server, mut q, open) = server_with_alice(POLICY_BIG).await;

    let m = refused_reserve(
        &server,
        &mut q,
        reserve("alice", u64::MAX, 0),
        "prompt_tokens",
    )
    .await;
    assert!(m.contains(&u64::MAX.to_string()), "{m}");
    refused_reserve(
        &server,
        &mut q,
        reserve("alice", 0, u64::MAX),
        "max_output_tokens",
    )
    .await;
    refused_reserve(
        &server,
        &mut q,
        reserve("alice", 100_000_001, 0),
        "prompt_tokens",
    )
    .await;
    // Each is within the bound, their sum is not.
    let m = refused_reserve(
        &server,
        &mut q,
        reserve("alice", 60_000_000, 40_000_001),
        "max_output_tokens",
    )
    .await;
    assert!(m.contains("prompt_tokens + max_output_tokens"), "{m}");
    assert!(m.contains("100000000"), "{m}");

    // Exactly the bound is a valid request (the policy then decides).
    let r = rsv(&mut q, reserve("alice", 60_000_000, 40_000_000)).await;
    assert_eq!(decision(&r), Decision::Allowed);
    assert_eq!(r.reserved_tokens, 100_000_000);

    // Commit reports are bounded too, and a refused Commit leaves the hold open.
    let before = usage(&mut q, "alice").await;
    assert_invalid(
        q.commit(commit_req(&open, u64::MAX, 0)).await,
        "prompt_tokens",
    );
    assert_invalid(
        q.commit(commit_req(&open, 0, 100_000_001)).await,
        "completion_tokens",
    );
    assert_eq!(usage(&mut q, "alice").await, before);
    let released = refund(&mut q, &open).await;
    assert_eq!(released, 20);
    server.stop().await;
}

#[tokio::test]
async fn a_malformed_reservation_id_is_invalid_and_an_empty_one_is_required() {
    let (server, mut q, open) = server_with_alice(POLICY_500).await;
    let before = usage(&mut q, "alice").await;
    let counts = server.ledger.counts().unwrap();

    let junk36 = "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz";
    assert_eq!(junk36.len(), 36);
    // The open hold's id without its hyphens (32 hex digits) is not the form handed out.
    let simple = open.replace('-', "");
    let braced = format!("{{{open}}}");
    for bad in [
        "abc",
        junk36,
        &simple,
        &braced,
        &format!("{open} "),
        &open[..35],
    ] {
        let m = assert_invalid(q.commit(commit_req(bad, 1, 1)).await, "reservation_id");
        assert!(m.contains("36-character"), "{bad:?}: {m}");
        let m = assert_invalid(q.refund(refund_req(bad)).await, "reservation_id");
        assert!(m.contains("36-character"), "{bad:?}: {m}");
    }
    let m = assert_invalid(q.commit(commit_req("", 1, 1)).await, "reservation_id");
    assert!(m.contains("required"), "{m}");
    let m = assert_invalid(q.refund(refund_req("")).await, "reservation_id");
    assert!(m.contains("required"), "{m}");

    assert_eq!(usage(&mut q, "alice").await, before);
    assert_eq!(server.ledger.counts().unwrap(), counts);
    server.stop().await;
}

#[tokio::test]
async fn a_negative_or_zero_hold_is_invalid() {
    let (server, mut q, _) = server_with_alice(POLICY_500).await;
    for (seconds, nanos, rule) in [
        (-1, 0, "positive"),
        (0, -1, "positive"),
        (-5, -500, "positive"),
        (0, 0, "longer than zero"),
        // Less than a microsecond rounds to nothing.
        (0, 999, "longer than zero"),
    ] {
        let mut req = reserve("alice", 10, 10);
        req.hold = Some(prost_types::Duration { seconds, nanos });
        let m = refused_reserve(&server, &mut q, req, "hold").await;
        assert!(m.contains(rule), "({seconds}, {nanos}): {m}");
    }
    // Beyond the ceiling of a week, whatever the tier says.
    let mut req = reserve("alice", 10, 10);
    req.hold = Some(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 0,
    });
    refused_reserve(&server, &mut q, req, "hold").await;

    // One microsecond is a valid hold.
    let mut req = reserve("alice", 10, 10);
    req.hold = Some(prost_types::Duration {
        seconds: 0,
        nanos: 1_000,
    });
    let r = rsv(&mut q, req).await;
    assert_eq!(decision(&r), Decision::Allowed);
    let e = r.expires_at.unwrap();
    assert_eq!((e.seconds, e.nanos), ((T0 / SEC) as i64, 1_000));
    server.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_of_256_bytes_is_invalid_and_255_is_accepted() {
    let (server, mut q, _) = server_with_alice(POLICY_500).await;
    let mut req = reserve("alice", 10, 10);
    req.idempotency_key = "k".repeat(256);
    let m = refused_reserve(&server, &mut q, req, "idempotency_key").await;
    assert!(m.contains("255"), "{m}");
    let mut req = reserve("alice", 10, 10);
    req.idempotency_key = "key\nwith newline".into();
    refused_reserve(&server, &mut q, req, "idempotency_key").await;

    let mut req = reserve("alice", 10, 10);
    req.idempotency_key = "k".repeat(255);
    let first = rsv(&mut q, req.clone()).await;
    assert_eq!(decision(&first), Decision::Allowed);
    let again = rsv(&mut q, req).await;
    assert_eq!(again.reservation_id, first.reservation_id);
    assert_eq!(usage(&mut q, "alice").await.open_holds, 2);
    server.stop().await;
}

#[tokio::test]
async fn a_model_name_over_128_bytes_is_invalid() {
    let (server, mut q, _) = server_with_alice(POLICY_500).await;
    let mut req = reserve("alice", 10, 10);
    req.model = "m".repeat(129);
    refused_reserve(&server, &mut q, req, "model").await;
    let mut req = reserve("alice", 10, 10);
    req.model = "m".repeat(128);
    assert_eq!(decision(&rsv(&mut q, req).await), Decision::Allowed);
    server.stop().await;
}

#[tokio::test]
async fn the_minimal_policy_example_works() {
    let server = TestServer::start(POLICY_500).await;
    let mut q = server.quota().await;

    let r = rsv(&mut q, reserve("alice", 100, 100)).await;
    assert_eq!(decision(&r), Decision::Allowed);
    // Only tokens_per_day applies; holds last the default 300 s.
    let names: Vec<_> = r.limits.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["tokens_per_day"]);
    assert_eq!(limit(&r.limits, "tokens_per_day").remaining, 300);
    assert_eq!(r.expires_at.unwrap().seconds, (T0 / SEC) as i64 + 300);

    let c = commit(&mut q, &r.reservation_id, 100, 20).await;
    assert_eq!((c.charged_tokens, c.released_tokens), (120, 80));
    let u = usage(&mut q, "alice").await;
    assert_eq!(u.tier, "free");
    assert_eq!((u.used_tokens, u.held_tokens, u.requests), (120, 0, 1));
    assert_eq!(limit(&u.limits, "tokens_per_day").remaining, 380);

    // Any number of requests a minute; only the day's 500 tokens bind.
    for _ in 0..19 {
        let r = rsv(&mut q, reserve("alice", 20, 0)).await;
        assert_eq!(decision(&r), Decision::Allowed);
    }
    let denied = rsv(&mut q, reserve("alice", 1, 0)).await;
    assert_eq!(decision(&denied), Decision::Denied);
    assert_eq!(denied.denied_by, "tokens_per_day");
    server.stop().await;
}
