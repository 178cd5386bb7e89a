//! Tier model lists: a tier may restrict the models its subjects use.

mod common;

use common::*;
use tollgate::proto::{Decision, ReserveRequest, SetSubjectRequest};

const POLICY: &str = r#"
default_tier = "free"

[tiers.free]
tokens_per_day = 10000
models = ["gpt-4o-mini", "gpt-4.1-nano"]

[tiers.pro]
tokens_per_day = 500000
"#;

fn for_model(subject: &str, model: &str, tokens: u64) -> ReserveRequest {
    ReserveRequest {
        model: model.to_string(),
        ..reserve(subject, tokens, 0)
    }
}

#[tokio::test]
async fn a_free_user_asking_for_an_expert_model_is_denied_by_model() {
    let server = TestServer::start(POLICY).await;
    let mut q = server.quota().await;

    let r = rsv(&mut q, for_model("ann", "gpt-4o", 100)).await;
    assert_eq!(decision(&r), Decision::Denied);
    assert_eq!(r.denied_by, "model");
    assert!(r.retry_after.is_none(), "no wait helps: {r:?}");
    assert!(r.reservation_id.is_empty());
    let u = usage(&mut q, "ann").await;
    assert_eq!((u.held_tokens, u.open_holds, u.requests), (0, 0, 0));

    // The model is reported first even when another limit would also refuse.
    let r = rsv(&mut q, for_model("ann", "gpt-4o", 20000)).await;
    assert_eq!(r.denied_by, "model");

    // Listed models, and their dated snapshots, are allowed; a longer name is not the model.
    for model in ["gpt-4o-mini", "gpt-4o-mini-2024-07-18", "gpt-4.1-nano"] {
        let r = rsv(&mut q, for_model("ann", model, 10)).await;
        assert_eq!(decision(&r), Decision::Allowed, "{model}");
    }
    let r = rsv(&mut q, for_model("ann", "gpt-4o-mini-search", 10)).await;
    assert_eq!(r.denied_by, "model");

    // A tier without a list allows any model; moving ann there lets her use gpt-4o.
    let mut admin = server.admin().await;
    admin
        .set_subject(set_subject_req("ann", "pro"))
        .await
        .unwrap();
    let r = rsv(&mut q, for_model("ann", "gpt-4o", 100)).await;
    assert_eq!(decision(&r), Decision::Allowed);
    server.stop().await;
}

#[test]
fn a_bad_model_list_is_refused_with_its_line() {
    let e = tollgate::policy::Policy::from_toml(
        "default_tier = \"t\"\n[tiers.t]\nmodels = [\"\"]\n",
        "p.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("p.toml:3:"), "{e}");
    assert!(e.contains("models"), "{e}");
    let e = tollgate::policy::Policy::from_toml(
        "default_tier = \"t\"\n[tiers.t]\nmodels = \"gpt-4o\"\n",
        "p.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("p.toml:3:"), "{e}");
}

#[tokio::test]
async fn overrides_apply_to_one_subject_and_survive_a_restart() {
    let server = TestServer::start(POLICY).await;
    let mut admin = server.admin().await;
    let set = admin
        .set_subject(SetSubjectRequest {
            subject: "vip".into(),
            tier: "free".into(),
            overrides: Some(tollgate::proto::LimitOverrides {
                tokens_per_day: Some(50_000),
                max_concurrent: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.overrides.unwrap().tokens_per_day, Some(50_000));

    let mut q = server.quota().await;
    // 20,000 is over free's 10,000 a day but within vip's override.
    let r = rsv(&mut q, for_model("vip", "gpt-4o-mini", 20_000)).await;
    assert_eq!(decision(&r), Decision::Allowed);
    assert_eq!(limit(&r.limits, "tokens_per_day").limit, 50_000);
    // max_concurrent = 1 comes from the override too (free sets none).
    let r2 = rsv(&mut q, for_model("vip", "gpt-4o-mini", 10)).await;
    assert_eq!(r2.denied_by, "max_concurrent");
    // Another free subject keeps the tier's limits.
    let other = rsv(&mut q, for_model("ann", "gpt-4o-mini", 20_000)).await;
    assert_eq!(other.denied_by, "tokens_per_day");

    let server = server.restart(POLICY).await;
    let mut admin = server.admin().await;
    let got = admin
        .get_subject(tollgate::proto::GetSubjectRequest {
            subject: "vip".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.tier.as_str(), got.assigned), ("free", true));
    let o = got.overrides.unwrap();
    assert_eq!(
        (o.tokens_per_day, o.max_concurrent),
        (Some(50_000), Some(1))
    );
    let mut q = server.quota().await;
    let u = usage(&mut q, "vip").await;
    assert_eq!(limit(&u.limits, "tokens_per_day").limit, 50_000);
    assert_eq!(limit(&u.limits, "max_concurrent").limit, 1);
    assert_eq!(u.held_tokens, 20_000);

    // SetSubject replaces: without overrides, the tier's limits are back.
    admin
        .set_subject(set_subject_req("vip", "free"))
        .await
        .unwrap();
    let u = usage(&mut q, "vip").await;
    assert_eq!(limit(&u.limits, "tokens_per_day").limit, 10_000);
    server.stop().await;
}

#[tokio::test]
async fn an_override_above_the_ceiling_is_invalid() {
    let server = TestServer::start(POLICY).await;
    let mut admin = server.admin().await;
    let e = admin
        .set_subject(SetSubjectRequest {
            subject: "x".into(),
            tier: "free".into(),
            overrides: Some(tollgate::proto::LimitOverrides {
                tokens_per_day: Some(u64::MAX),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().starts_with("overrides: tokens_per_day"),
        "{}",
        e.message()
    );
    server.stop().await;
}

const MONTHLY: &str = r#"
default_tier = "m"

[tiers.m]
tokens_per_day = 100000
tokens_per_month = 1000
"#;

#[tokio::test]
async fn tokens_per_month_spans_days_and_resets_with_the_utc_month() {
    // T0 is 2026-03-10T12:00Z: the next month starts in 21 days and 12 hours.
    let to_april: u64 = (21 * 24 + 12) * 3600;
    let server = TestServer::start(MONTHLY).await;
    let mut q = server.quota().await;
    let r = rsv(&mut q, reserve("ann", 600, 0)).await;
    commit(&mut q, &r.reservation_id, 600, 0).await;
    let r = rsv(&mut q, reserve("ann", 500, 0)).await;
    assert_eq!(r.denied_by, "tokens_per_month");
    assert_eq!(r.retry_after.unwrap().seconds, to_april as i64);
    assert_eq!(limit(&r.limits, "tokens_per_month").remaining, 400);

    // A new day does not reset the month.
    server.advance_secs(24 * 3600);
    let u = usage(&mut q, "ann").await;
    assert_eq!((u.used_tokens, u.used_tokens_month), (0, 600));
    let r = rsv(&mut q, reserve("ann", 500, 0)).await;
    assert_eq!(r.denied_by, "tokens_per_month");

    // April does.
    server.advance_secs(to_april - 24 * 3600);
    let u = usage(&mut q, "ann").await;
    assert_eq!(u.used_tokens_month, 0);
    let r = rsv(&mut q, reserve("ann", 500, 0)).await;
    assert_eq!(decision(&r), Decision::Allowed);
    // More than the whole month can never fit.
    let r = rsv(&mut q, reserve("bob", 1001, 0)).await;
    assert_eq!(r.denied_by, "tokens_per_month");
    assert!(r.retry_after.is_none());
    server.stop().await;
}

const SHADOW: &str = r#"
default_tier = "enforced"

[tiers.enforced]
tokens_per_day = 100

[tiers.trial]
tokens_per_day = 100
models = ["gpt-4o-mini"]
enforce = false
"#;

#[tokio::test]
async fn shadow_mode_never_denies_but_reports_and_counts() {
    let server = TestServer::start(SHADOW).await;
    let mut admin = server.admin().await;
    admin
        .set_subject(set_subject_req("tess", "trial"))
        .await
        .unwrap();
    let mut q = server.quota().await;

    // Within the limits: nothing to report.
    let ok = rsv(&mut q, for_model("tess", "gpt-4o-mini", 10)).await;
    assert_eq!(ok.shadow_denied_by, "");
    // Over the day quota: allowed anyway, and the would-be denial is reported.
    let r = rsv(&mut q, for_model("tess", "gpt-4o-mini", 150)).await;
    assert_eq!(decision(&r), Decision::Allowed);
    assert_eq!(r.shadow_denied_by, "tokens_per_day");
    assert!(!r.reservation_id.is_empty());
    // A model outside the tier: allowed too, reported as "model".
    let r = rsv(&mut q, for_model("tess", "gpt-4o", 10)).await;
    assert_eq!(
        (decision(&r), r.shadow_denied_by.as_str()),
        (Decision::Allowed, "model")
    );
    // A dry run reports without counting.
    let dry = rsv(
        &mut q,
        ReserveRequest {
            dry_run: true,
            ..for_model("tess", "gpt-4o-mini", 500)
        },
    )
    .await;
    assert_eq!(dry.shadow_denied_by, "tokens_per_day");

    let u = usage(&mut q, "tess").await;
    assert_eq!((u.shadow_denials, u.held_tokens, u.requests), (2, 170, 3));

    // An enforced tier still denies.
    let r = rsv(&mut q, reserve("ed", 150, 0)).await;
    assert_eq!(
        (decision(&r), r.denied_by.as_str()),
        (Decision::Denied, "tokens_per_day")
    );
    assert_eq!(usage(&mut q, "ed").await.shadow_denials, 0);
    server.stop().await;
}

#[tokio::test]
async fn a_whole_policy_can_be_in_shadow_mode() {
    let policy = format!("enforce = false\n{SHADOW}");
    let server = TestServer::start(&policy).await;
    let mut q = server.quota().await;
    let r = rsv(&mut q, reserve("ed", 150, 0)).await;
    assert_eq!(
        (decision(&r), r.shadow_denied_by.as_str()),
        (Decision::Allowed, "tokens_per_day")
    );
    assert_eq!(usage(&mut q, "ed").await.shadow_denials, 1);
    server.stop().await;
}
