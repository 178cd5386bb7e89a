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

    let r = q
        .reserve(for_model("ann", "gpt-4o", 100))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(decision(&r), Decision::Denied);
    assert_eq!(r.denied_by, "model");
    assert!(r.retry_after.is_none(), "no wait helps: {r:?}");
    assert!(r.reservation_id.is_empty());
    let u = usage(&mut q, "ann").await;
    assert_eq!((u.held_tokens, u.open_holds, u.requests), (0, 0, 0));

    // The model is reported first even when another limit would also refuse.
    let r = q
        .reserve(for_model("ann", "gpt-4o", 20000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.denied_by, "model");

    // Listed models, and their dated snapshots, are allowed; a longer name is not the model.
    for model in ["gpt-4o-mini", "gpt-4o-mini-2024-07-18", "gpt-4.1-nano"] {
        let r = q
            .reserve(for_model("ann", model, 10))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(decision(&r), Decision::Allowed, "{model}");
    }
    let r = q
        .reserve(for_model("ann", "gpt-4o-mini-search", 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.denied_by, "model");

    // A tier without a list allows any model; moving ann there lets her use gpt-4o.
    let mut admin = server.admin().await;
    admin
        .set_subject(SetSubjectRequest {
            subject: "ann".into(),
            tier: "pro".into(),
        })
        .await
        .unwrap();
    let r = q
        .reserve(for_model("ann", "gpt-4o", 100))
        .await
        .unwrap()
        .into_inner();
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
