//! Fail-stop that everyone can see: when the store cannot write, health says NOT_SERVING, one
//! log line says why, the process drains and exits non-zero (so an orchestrator restarts it),
//! and the restart loads everything that was acknowledged.
//!
//! The fault is real, not injected: the binary runs under `ulimit -f` (RLIMIT_FSIZE) with
//! SIGXFSZ ignored, so once sled's log would grow past the limit its write fails with EFBIG,
//! exactly as on a full disk.

mod common;

use common::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use tollgate::proto::{Decision, GetUsageRequest};

/// The most Reserves sent before the file-size limit must have been met.
const MAX_RESERVES: usize = 50_000;

/// The next status a health Watch reports (bounded).
async fn next_status(
    stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> Option<ServingStatus> {
    let m = tokio::time::timeout(POLL_LIMIT, stream.message())
        .await
        .expect("the Watch reported nothing")
        .ok()??;
    ServingStatus::try_from(m.status).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_turns_health_not_serving_and_the_process_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", POLICY_LOAD);
    let data = dir.path().join("data");
    let log = dir.path().join("tollgate.log");
    let mut server = Serve::new(&data)
        .policy(&policy)
        .file_size_limit_kib(256)
        .log_to(&log)
        .start();

    // A watcher (a client-side load balancer) that must be told.
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "tollgate.v1.Quota".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_status(&mut watch).await, Some(ServingStatus::Serving));

    let mut q = server.quota().await;
    let mut acknowledged = Vec::new();
    let mut refusal = None;
    for i in 0..MAX_RESERVES {
        match q.reserve(reserve(&format!("user-{i}"), 100, 100)).await {
            Ok(r) => {
                let r = r.into_inner();
                assert_eq!(r.decision(), Decision::Allowed);
                acknowledged.push(r.reservation_id);
            }
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let refusal = refusal.expect("the file-size limit was never met");
    eprintln!(
        "{} Reserves acknowledged before the fault",
        acknowledged.len()
    );
    assert_eq!(refusal.code(), Code::Unavailable, "{refusal:?}");
    assert!(
        acknowledged.len() > 10,
        "the limit should leave room for some work first: {}",
        acknowledged.len()
    );

    // Health turns NOT_SERVING: the watcher is told before its stream ends.
    assert_eq!(
        next_status(&mut watch).await,
        Some(ServingStatus::NotServing)
    );
    let status = server
        .wait_exit(POLL_LIMIT)
        .expect("the process should exit after a failed write");
    assert_eq!(
        status.code(),
        Some(3),
        "fail-stop exit status; log:\n{}",
        server.log_text()
    );
    let text = server.log_text();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("fail-stop")).collect();
    assert_eq!(lines.len(), 1, "one clear line says why:\n{text}");
    assert!(
        lines[0].contains("store write failed"),
        "the line names the cause: {}",
        lines[0]
    );

    // A restart without the limit loads everything acknowledged; the write that failed was
    // never acknowledged, so it may or may not be there.
    let server = Serve::new(&data).policy(&policy).start();
    let mut q = server.quota().await;
    let fleet = q
        .get_usage(GetUsageRequest::default())
        .await
        .unwrap()
        .into_inner();
    let acked = u32::try_from(acknowledged.len()).unwrap();
    assert!(
        fleet.open_holds == acked || fleet.open_holds == acked + 1,
        "open holds {} after restart, {acked} acknowledged",
        fleet.open_holds
    );
    for id in [&acknowledged[0], acknowledged.last().unwrap()] {
        let c = q
            .commit(commit_req(id, 100, 10))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(c.charged_tokens, 110, "{id}");
    }
}
