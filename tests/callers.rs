//! Authenticated callers and named operators, through the real binary: each refusal has the
//! right code, names what is missing, echoes no secret, and changes nothing; an allowed caller
//! works; the admin log names the operator and what changed.

mod common;
use common::*;

use tollgate::proto::{Decision, GetUsageRequest, ReserveRequest};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request};

const CHAT_TOKEN: &str = "chat-7f3a9c1e2b4d6f8a0c2e4a6b8d0f1a3c";
const SEARCH_TOKEN: &str = "search-0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e";
const ALICE_TOKEN: &str = "alice-ops-5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b";
const BATCH_TOKEN: &str = "batch-9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d";

use tollgate::policy::callers::token_sha256_hex as hex;

fn policy() -> String {
    format!(
        r#"
default_tier = "free"

[tiers.free]
tokens_per_day = 100000
hold_seconds = 3600

[tiers.pro]
tokens_per_day = 1000000

[callers.chat]
token_sha256 = "{chat}"
subject_prefix = "chat:"

[callers.search]
token_sha256 = "{search}"
calls = ["Reserve", "GetUsage"]
groups = ["search-team"]

[callers.batch]
token_sha256 = "{batch}"
subject_prefix = "chat:"

[operators.alice]
token_sha256 = "{alice}"
"#,
        chat = hex(CHAT_TOKEN),
        search = hex(SEARCH_TOKEN),
        alice = hex(ALICE_TOKEN),
        batch = hex(BATCH_TOKEN),
    )
}

fn with_auth<T>(message: T, value: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("authorization", MetadataValue::try_from(value).unwrap());
    r
}

fn as_chat<T>(message: T) -> Request<T> {
    with_auth(message, &format!("Bearer {CHAT_TOKEN}"))
}

fn as_search<T>(message: T) -> Request<T> {
    with_auth(message, &format!("Bearer {SEARCH_TOKEN}"))
}

/// `status`'s code is `code` and its message says `says` and none of the tokens.
fn refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, says: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(says), "{status:?}");
    for secret in [CHAT_TOKEN, SEARCH_TOKEN, ALICE_TOKEN, BATCH_TOKEN] {
        assert!(!status.message().contains(secret), "{status:?}");
    }
}

/// The real binary with the test policy, `extra` arguments and its log kept.
fn start(dir: &std::path::Path, extra: &[&str]) -> Process {
    let policy = write_file(dir, "policy.toml", &policy());
    Serve::new(&dir.join("data"))
        .policy(&policy)
        .args(extra)
        .env("RUST_LOG", "info")
        .log_to(&dir.join("server.log"))
        .start()
}

async fn open_holds(q: &mut Quota, subject: &str) -> u32 {
    let ask = GetUsageRequest {
        subject: subject.into(),
        ..Default::default()
    };
    q.get_usage(as_chat(ask))
        .await
        .unwrap()
        .into_inner()
        .open_holds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_authenticated_and_kept_to_their_rights() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let mut q = p.quota().await;

    // No credentials, a wrong token, a near miss, two headers, another scheme.
    refused(
        q.reserve(reserve("chat:alice", 10, 10)).await,
        Code::Unauthenticated,
        "no credentials",
    );
    refused(
        q.reserve(with_auth(reserve("chat:alice", 10, 10), "Bearer wrong"))
            .await,
        Code::Unauthenticated,
        "not a known caller",
    );
    let near = format!("Bearer {}x", &CHAT_TOKEN[..CHAT_TOKEN.len() - 1]);
    refused(
        q.reserve(with_auth(reserve("chat:alice", 10, 10), &near))
            .await,
        Code::Unauthenticated,
        "not a known caller",
    );
    let mut twice = as_chat(reserve("chat:alice", 10, 10));
    twice.metadata_mut().append(
        "authorization",
        MetadataValue::try_from(format!("Bearer {SEARCH_TOKEN}")).unwrap(),
    );
    refused(q.reserve(twice).await, Code::Unauthenticated, "not several");
    refused(
        q.reserve(with_auth(
            reserve("chat:alice", 10, 10),
            &format!("Basic {CHAT_TOKEN}"),
        ))
        .await,
        Code::Unauthenticated,
        "Bearer scheme",
    );
    // A caller outside its subject prefix.
    refused(
        q.reserve(as_chat(reserve("search:bob", 10, 10))).await,
        Code::PermissionDenied,
        "start with \"chat:\"",
    );
    // A caller outside its calls, and outside its groups.
    refused(
        q.commit(as_search(commit_req(
            "00000000-0000-7000-8000-000000000000",
            1,
            1,
        )))
        .await,
        Code::PermissionDenied,
        "may not call Commit",
    );
    refused(
        q.reserve(as_search(reserve("bob", 10, 10))).await,
        Code::PermissionDenied,
        "must name one of its groups",
    );
    refused(
        q.get_usage(as_search(GetUsageRequest::default())).await,
        Code::PermissionDenied,
        "may not read the usage of the fleet",
    );
    // A caller bound to a subject prefix may not charge a group's budget by naming it, nor
    // read a client IP's figures beside its own subject's.
    let grouped = ReserveRequest {
        group: "search-team".into(),
        ..reserve("chat:alice", 10, 10)
    };
    refused(
        q.reserve(as_chat(grouped)).await,
        Code::PermissionDenied,
        "may not name a group",
    );
    let by_ip = GetUsageRequest {
        subject: "chat:alice".into(),
        client_ip: "203.0.113.7".into(),
        ..Default::default()
    };
    refused(
        q.get_usage(as_chat(by_ip)).await,
        Code::PermissionDenied,
        "may not read the usage of the fleet or of a client IP",
    );
    // Nothing of the refused calls reached the ledger.
    assert_eq!(open_holds(&mut q, "chat:alice").await, 0);

    // Allowed callers work; the scheme is matched whatever its case.
    let r = q
        .reserve(with_auth(
            reserve("chat:alice", 100, 100),
            &format!("bearer {CHAT_TOKEN}"),
        ))
        .await
        .expect("an allowed caller is served")
        .into_inner();
    assert_eq!(decision(&r), Decision::Allowed);
    q.commit(as_chat(commit_req(&r.reservation_id, 100, 50)))
        .await
        .expect("its Commit");
    let grouped = ReserveRequest {
        group: "search-team".into(),
        ..reserve("bob", 10, 10)
    };
    let r = q.reserve(as_search(grouped)).await.unwrap().into_inner();
    assert_eq!(decision(&r), Decision::Allowed);
    assert_eq!(open_holds(&mut q, "chat:alice").await, 0);

    let text = p.log_text();
    for secret in [CHAT_TOKEN, SEARCH_TOKEN, ALICE_TOKEN] {
        assert!(!text.contains(secret), "a token in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_are_named_in_the_admin_log_with_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let mut admin = tollgate::proto::admin_client::AdminClient::new(
        tonic::transport::Channel::from_shared(p.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let set = set_subject_req("chat:alice", "pro");
    refused(
        admin
            .set_subject(with_auth(set.clone(), "Bearer not-alice"))
            .await,
        Code::Unauthenticated,
        "admin token is wrong",
    );
    admin
        .set_subject(with_auth(set, &format!("Bearer {ALICE_TOKEN}")))
        .await
        .expect("alice's token is an operator's");
    let line = p
        .log_line_until("subject set", |l| l.contains("operator=alice"))
        .await;
    assert!(
        line.contains("free -> pro") && line.contains("chat:alice"),
        "{line}"
    );
    // --admin-token still works, logged under its own name.
    let mut a = p.admin().await;
    a.reset_usage(tollgate::proto::ResetUsageRequest {
        subject: "chat:alice".into(),
    })
    .await
    .expect("--admin-token");
    let line = p
        .log_line_until("usage reset", |l| l.contains("operator=admin-token"))
        .await;
    assert!(line.contains("chat:alice"), "{line}");
    assert!(!p.log_text().contains(ALICE_TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_can_be_logged_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &["--log-subjects", "hashed"]);
    let mut a = p.admin().await;
    a.set_subject(set_subject_req("chat:sk-live-secret", "pro"))
        .await
        .unwrap();
    let digest = hex("chat:sk-live-secret");
    let line = p
        .log_line_until("subject set", |l| l.contains("operator="))
        .await;
    assert!(
        line.contains(&format!("sha256:{}", &digest[..16])),
        "{line}"
    );
    assert!(!p.log_text().contains("sk-live-secret"));
}

#[test]
fn the_data_directory_is_the_owners_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A directory an older build left world-readable is tightened too.
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut p = Serve::new(&data).sled_only().start();
    p.sigterm();
    p.wait_exit(std::time::Duration::from_secs(30));
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let m = mode(&path);
        assert_eq!(m & 0o077, 0, "{} is {m:o}", path.display());
    }
}

/// A hold is the caller's that made it: another caller's token on its reservation is refused
/// (Commit, Refund, Extend, and a Reserve replaying its idempotency key), before and after a
/// `kill -9` and restart; the hold stays as it was; its own caller settles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_caller_that_made_a_hold_may_settle_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let mut q = p.quota().await;
    let keyed = ReserveRequest {
        idempotency_key: "k1".into(),
        ..reserve("chat:alice", 100, 100)
    };
    let r = q
        .reserve(as_chat(keyed.clone()))
        .await
        .unwrap()
        .into_inner();
    let id = r.reservation_id.clone();
    let check = |q: &mut Quota| {
        let mut q = q.clone();
        let (id, keyed) = (id.clone(), keyed.clone());
        async move {
            refused(
                q.commit(with_auth(
                    commit_req(&id, 1, 1),
                    &format!("Bearer {BATCH_TOKEN}"),
                ))
                .await,
                Code::PermissionDenied,
                "made by another caller",
            );
            refused(
                q.refund(with_auth(refund_req(&id), &format!("Bearer {BATCH_TOKEN}")))
                    .await,
                Code::PermissionDenied,
                "made by another caller",
            );
            let extend = tollgate::proto::ExtendRequest {
                reservation_id: id.clone(),
                hold: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
            };
            refused(
                q.extend(with_auth(extend, &format!("Bearer {BATCH_TOKEN}")))
                    .await,
                Code::PermissionDenied,
                "made by another caller",
            );
            // Even with other sizes, the refusal is about the caller, and says nothing of the
            // first request.
            let other = ReserveRequest {
                max_output_tokens: Some(999),
                ..keyed
            };
            let replay = q
                .reserve(with_auth(other, &format!("Bearer {BATCH_TOKEN}")))
                .await
                .expect_err("another caller's key replays nothing");
            assert_eq!(replay.code(), Code::FailedPrecondition, "{replay:?}");
            assert!(
                replay.message().contains("caller") && !replay.message().contains("100"),
                "{replay:?}"
            );
            assert!(!replay.message().contains(&id), "{replay:?}");
        }
    };
    check(&mut q).await;
    p.kill9();
    let p = start_again(dir.path());
    let mut q = p.quota().await;
    check(&mut q).await;
    // Nothing changed: the hold is open, and its caller settles it.
    assert_eq!(open_holds(&mut q, "chat:alice").await, 1);
    let c = q
        .commit(as_chat(commit_req(&id, 100, 20)))
        .await
        .expect("its own caller commits")
        .into_inner();
    assert_eq!(c.charged_tokens, 120);
}

/// The server of [`start`] again on the same directory (after a kill).
fn start_again(dir: &std::path::Path) -> Process {
    Serve::new(&dir.join("data"))
        .policy(&dir.join("policy.toml"))
        .env("RUST_LOG", "info")
        .log_to(&dir.join("server-again.log"))
        .start()
}

/// On an address beyond loopback with no `[callers]`, the start says in the log that anyone
/// who reaches the port can spend any budget; with callers it does not.
#[test]
fn an_open_port_beyond_loopback_is_reported_at_start() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let with_callers = write_file(dir.path(), "policy.toml", &policy());
    for (name, policy) in [("open", None), ("callers", Some(&with_callers))] {
        let log = dir.path().join(format!("{name}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
            .arg(dir.path().join(name))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(p) = policy {
            cmd.arg("--policy").arg(p);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("tollgate listening on"), "{line}");
        child.kill().unwrap();
        child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let warned = text.contains("with no caller authentication");
        assert_eq!(warned, policy.is_none(), "{name}: {text}");
    }
}
