//! With no admin token configured, every Admin call is refused, whatever it carries.

use std::sync::Arc;

use tokio::sync::oneshot;
use tonic::Code;

use tollgate::clock::ManualClock;
use tollgate::engine::Bounds;
use tollgate::ledger::LocalLedger;
use tollgate::policy::Policy;
use tollgate::proto::admin_client::AdminClient;
use tollgate::proto::{GetSubjectRequest, ResetUsageRequest, SetSubjectRequest};
use tollgate::store::Durability;

#[tokio::test]
async fn without_a_configured_token_every_admin_call_is_unauthenticated() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(
        LocalLedger::open(
            dir.path(),
            Arc::new(Policy::embedded_default()),
            Bounds::default(),
            Durability::Strict,
            Arc::new(ManualClock::new(1_773_144_000_000_000)),
        )
        .unwrap(),
    );
    let (listener, addr) = tollgate::server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(tollgate::server::serve(
        ledger.clone(),
        listener,
        tollgate::server::ServeOptions::default(),
        async {
            let _ = stopped.await;
        },
    ));

    let mut admin = AdminClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    // Any bearer at all, even an empty one, is refused: there is nothing to match.
    for bearer in [None, Some("Bearer "), Some("Bearer anything")] {
        let mut set = tonic::Request::new(SetSubjectRequest {
            subject: "alice".into(),
            tier: "pro".into(),
            ..Default::default()
        });
        let mut get = tonic::Request::new(GetSubjectRequest {
            subject: "alice".into(),
        });
        let mut reset = tonic::Request::new(ResetUsageRequest {
            subject: "alice".into(),
        });
        if let Some(b) = bearer {
            set.metadata_mut()
                .insert("authorization", b.parse().unwrap());
            get.metadata_mut()
                .insert("authorization", b.parse().unwrap());
            reset
                .metadata_mut()
                .insert("authorization", b.parse().unwrap());
        }
        let errors = [
            admin.set_subject(set).await.unwrap_err(),
            admin.get_subject(get).await.unwrap_err(),
            admin.reset_usage(reset).await.unwrap_err(),
        ];
        for e in errors {
            assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
            assert!(e.message().contains("--admin-token"), "{}", e.message());
        }
    }
    // Nothing was assigned.
    assert_eq!(
        ledger.subject_config("alice").unwrap(),
        ("free".to_string(), false, Default::default(), None)
    );
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
