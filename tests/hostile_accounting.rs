//! End-to-end tests, over real gRPC on loopback, of the accounting under hostile traffic
//! (issue 9): a flood of denied Reserves, each with a new subject and a new client IP, never
//! locks a new user out, not even across a restart; and a Commit that no real call can report
//! is refused without changing anything, so it cannot put the whole fleet into debt.

mod common;
use common::*;

use std::sync::Arc;

use tonic::Code;

use tollgate::clock::ManualClock;
use tollgate::engine::Bounds;
use tollgate::policy::DEFAULT_POLICY_TOML;
use tollgate::proto::{Decision, GetUsageRequest, ReserveRequest};

/// A scope table small enough to fill in a test: 50 scopes where the default is 2,000,000.
const SMALL: Bounds = Bounds {
    max_scopes: 50,
    max_open_holds: 1_000_000,
    max_holds_per_subject: 10_000,
    max_settled: 2_000_000,
    retention_us: 24 * 3600 * SEC,
    max_per_pass: 4_096,
};

/// A Reserve from a new end user at `ip`.
fn from(subject: &str, model: &str, ip: String) -> ReserveRequest {
    ReserveRequest {
        client_ip: ip,
        ..on(model, subject, 100, 100)
    }
}

fn fleet() -> GetUsageRequest {
    GetUsageRequest::default()
}

/// Issue 9, item 1: with the table bounded at 50 scopes, 500 denied Reserves (the default free
/// tier does not allow gpt-4o), each with a new subject and a new client IP, leave only the
/// fleet's scope behind; a new user is then admitted, before and after a restart, and the
/// fleet's figures still count every denial. Before the fix, the first denials filled the
/// table and every new user got RESOURCE_EXHAUSTED.
#[tokio::test]
async fn denied_reserves_with_new_subjects_and_ips_never_lock_a_new_user_out() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let clock = Arc::new(ManualClock::new(T0));
    let server = TestServer::start_in(DEFAULT_POLICY_TOML, dir, clock, SMALL).await;
    let mut q = server.quota().await;
    for i in 0..500u32 {
        let ip = format!("198.51.{}.{}", i / 256, i % 256);
        let r = rsv(&mut q, from(&format!("anon-{i}"), "gpt-4o", ip)).await;
        assert_eq!(decision(&r), Decision::Denied, "{r:?}");
        assert_eq!(r.denied_by, "model", "{r:?}");
    }
    let (_, _, scopes) = server.ledger.counts().unwrap();
    assert_eq!(scopes, 1, "only the fleet's scope: denials made none");
    let r = rsv(
        &mut q,
        from("real-user", "gpt-4o-mini", "203.0.113.9".into()),
    )
    .await;
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    let u = q.get_usage(fleet()).await.unwrap().into_inner();
    assert_eq!(u.denials, 500);
    // 100 prompt + 100 output tokens of gpt-4o at $2.50 / $10 per million: 1,250 µUSD each.
    assert_eq!(u.saved_micro_usd, 500 * 1_250);

    let server = server.restart_with(DEFAULT_POLICY_TOML, SMALL).await;
    let (_, _, scopes) = server.ledger.counts().unwrap();
    assert_eq!(scopes, 3, "the user's subject and IP, and the fleet");
    let mut q = server.quota().await;
    let r = rsv(
        &mut q,
        from("second-user", "gpt-4o-mini", "203.0.113.10".into()),
    )
    .await;
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    assert_eq!(
        q.get_usage(fleet()).await.unwrap().into_inner().denials,
        500
    );
    server.stop().await;
}

/// The fleet shares one bucket; ann's tier allows a day's worth of large calls.
const FLEET_BUCKET: &str = r#"
default_tier = "t"

[tiers.t]
tokens_per_day = 100000000

[global]
tokens_per_minute = 100000
"#;

/// Issue 9, item 9: a Commit of 10^8 completion tokens against a 200-token hold (what no
/// model's context window allows) is INVALID_ARGUMENT naming the field and the rule, and
/// changes nothing: the subject's and the fleet's usage are as before, and the fleet's bucket
/// still admits other subjects. A Commit at the bound (2,000,000 tokens by default) is charged.
#[tokio::test]
async fn a_commit_no_real_call_can_report_is_refused_and_changes_nothing() {
    let server = TestServer::start(FLEET_BUCKET).await;
    let mut q = server.quota().await;
    let r = rsv(&mut q, reserve("ann", 100, 100)).await;
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    let before = (usage(&mut q, "ann").await, q.get_usage(fleet()).await);
    let before = (before.0, before.1.unwrap().into_inner());

    let refused = q
        .commit(commit_req(&r.reservation_id, 0, 100_000_000))
        .await;
    assert_status(
        refused,
        Code::InvalidArgument,
        &["completion_tokens", "max_commit_tokens (2000000)"],
    );
    let after = (usage(&mut q, "ann").await, q.get_usage(fleet()).await);
    assert_eq!((after.0, after.1.unwrap().into_inner()), before);
    let other = rsv(&mut q, reserve("bob", 50_000, 0)).await;
    assert_eq!(decision(&other), Decision::Allowed, "{other:?}");

    // At the bound: charged, the overage (debt) on every scope of the hold, the fleet's too.
    let c = commit(&mut q, &r.reservation_id, 1_000_000, 1_000_000).await;
    assert_eq!(c.charged_tokens, 2_000_000);
    assert_eq!(c.debt_tokens, 2_000_000 - 200);
    assert_eq!(usage(&mut q, "ann").await.used_tokens, 2_000_000);
    let denied = rsv(&mut q, reserve("carol", 10, 0)).await;
    assert_eq!(decision(&denied), Decision::Denied, "{denied:?}");
    assert_eq!(denied.denied_by, "global.tokens_per_minute");
    server.stop().await;
}
