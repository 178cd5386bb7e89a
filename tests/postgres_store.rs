//! The PostgreSQL store through the real binary and a real PostgreSQL server (started by the
//! tests: `common/postgres.rs`): acknowledged holds survive `kill -9`, rows changed behind
//! tollgate's back are refused at start, a second process writing the same database stops the
//! first, and an export moves a ledger from PostgreSQL to sled and back.

mod common;
use common::postgres::{server, PgServer};
use common::*;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tollgate::proto::Decision;

const POLICY: &str = r#"
default_tier = "free"

[tiers.free]
tokens_per_day = 10000
hold_seconds = 3600
"#;

fn serve_args(url: &str, policy: &Path) -> Vec<String> {
    vec![
        "--store".into(),
        url.into(),
        "--policy".into(),
        policy.display().to_string(),
        "--admin-token".into(),
        ADMIN_TOKEN.into(),
    ]
}

async fn hold(q: &mut Quota, subject: &str, prompt: u64, output: u64) -> String {
    let r = rsv(q, reserve(subject, prompt, output)).await;
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    r.reservation_id
}

/// (used, held, open holds) of `subject`.
async fn figures(q: &mut Quota, subject: &str) -> (u64, u64, u32) {
    let u = usage(q, subject).await;
    (u.used_tokens, u.held_tokens, u.open_holds)
}

fn tollgate(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(args);
    run_to_exit(cmd, Duration::from_secs(60))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_holds_and_commits_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", POLICY);
    let url = server().database();
    let args = serve_args(&url, &policy);
    let data = dir.path().join("unused");

    let p = Serve::new(&data).args(&args).start();
    let mut q = p.quota().await;
    let committed = hold(&mut q, "alice", 100, 200).await;
    commit(&mut q, &committed, 100, 50).await;
    let open = hold(&mut q, "alice", 300, 400).await;
    let before = figures(&mut q, "alice").await;
    assert_eq!(before, (150, 700, 1));
    p.kill9();

    let p = Serve::new(&data).args(&args).start();
    let mut q = p.quota().await;
    assert_eq!(figures(&mut q, "alice").await, before);
    // The open hold is still there to commit; the committed one answers as committed again.
    commit(&mut q, &open, 300, 100).await;
    assert_eq!(figures(&mut q, "alice").await, (550, 0, 0));
    let again = q
        .commit(commit_req(&committed, 100, 50))
        .await
        .expect("a retried Commit is answered as the first");
    assert_eq!(again.into_inner().charged_tokens, 150);
    // The rows are in the database, as the meta row says.
    let name = PgServer::name_of(&url);
    let rows = server().psql(name, "SELECT count(*) FROM tollgate_records");
    let meta = server().psql(name, "SELECT records FROM tollgate_meta");
    assert_eq!(rows, meta);
    assert!(rows.parse::<u64>().unwrap() >= 4, "{rows} rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_removed_behind_its_back_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", POLICY);
    let url = server().database();
    let args = serve_args(&url, &policy);
    let data = dir.path().join("unused");

    let mut p = Serve::new(&data).args(&args).start();
    let mut q = p.quota().await;
    hold(&mut q, "alice", 100, 200).await;
    hold(&mut q, "bob", 100, 200).await;
    p.sigterm();
    assert_eq!(
        p.wait_exit(Duration::from_secs(30)).and_then(|s| s.code()),
        Some(0)
    );

    // A reservation row deleted outside tollgate: bob's hold would silently vanish.
    server().psql(
        PgServer::name_of(&url),
        "DELETE FROM tollgate_records WHERE key = (SELECT key FROM tollgate_records WHERE substring(key from 1 for 1) = 'r' ORDER BY key LIMIT 1)",
    );
    let log = dir.path().join("refused.log");
    let refused = Serve::new(&data).args(&args).log_to(&log).try_start();
    assert!(refused.is_err(), "a database missing a row was served");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("rows were removed or added outside tollgate") && !text.contains("tollgate@"),
        "the refusal names the problem and not the URL's user: {text}"
    );

    // Accepting the loss serves what is left, and the count starts afresh from it.
    let mut accepting = args.clone();
    accepting.push("--accept-data-loss".into());
    let log = dir.path().join("accepted.log");
    let p = Serve::new(&data).args(&accepting).log_to(&log).start();
    let mut q = p.quota().await;
    let held: u64 = figures(&mut q, "alice").await.1 + figures(&mut q, "bob").await.1;
    assert_eq!(held, 300, "what is left: the hold whose row remains");
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("DATA LOSS ACCEPTED"));
    p.kill9();
    let p = Serve::new(&data).args(&args).start();
    let mut q = p.quota().await;
    hold(&mut q, "carol", 1, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_writing_the_same_database_stops_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", POLICY);
    let url = server().database();
    let args = serve_args(&url, &policy);
    let log = dir.path().join("first.log");
    let mut first = Serve::new(&dir.path().join("a"))
        .args(&args)
        .log_to(&log)
        .start();
    let second = Serve::new(&dir.path().join("b")).args(&args).start();
    let mut q2 = second.quota().await;
    hold(&mut q2, "alice", 10000, 0).await;
    // The first still believes alice has 10,000 tokens left: it must not say so.
    let mut q1 = first.quota().await;
    let answer = q1.reserve(reserve("alice", 10000, 0)).await;
    let status = answer.expect_err("a ledger behind the database answers nothing");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let exit = first
        .wait_exit(Duration::from_secs(30))
        .expect("the first stops");
    assert_eq!(
        exit.code(),
        Some(3),
        "fail-stop; log:\n{}",
        first.log_text()
    );
    assert!(first
        .log_text()
        .contains("another process writes the same database"));
    // The second goes on, and its hold is the only one.
    assert_eq!(figures(&mut q2, "alice").await, (0, 10000, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_moves_a_ledger_from_postgres_to_sled_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", POLICY);
    let url = server().database();
    let args = serve_args(&url, &policy);

    let mut p = Serve::new(&dir.path().join("unused")).args(&args).start();
    let mut q = p.quota().await;
    let done = hold(&mut q, "alice", 100, 200).await;
    commit(&mut q, &done, 100, 100).await;
    let open = hold(&mut q, "alice", 50, 50).await;
    let before = figures(&mut q, "alice").await;
    p.sigterm();
    assert_eq!(
        p.wait_exit(Duration::from_secs(30)).and_then(|s| s.code()),
        Some(0)
    );

    let export = dir.path().join("ledger.jsonl");
    let out = tollgate(&["export", "--store", &url, "--out", export.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Into sled: the same figures, and the open hold commits there.
    let sled_dir = dir.path().join("sled");
    let out = tollgate(&[
        "import",
        export.to_str().unwrap(),
        "--data-dir",
        sled_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = Serve::new(&sled_dir)
        .args(["--policy", policy.to_str().unwrap()])
        .start();
    let mut q = p.quota().await;
    assert_eq!(figures(&mut q, "alice").await, before);
    drop(p);

    // Into another database: refused while it holds records, whole with --replace.
    let url2 = server().database();
    let out = tollgate(&["import", export.to_str().unwrap(), "--store", &url2]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tollgate(&["import", export.to_str().unwrap(), "--store", &url2]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already holds"), "{err}");
    let out = tollgate(&[
        "import",
        export.to_str().unwrap(),
        "--store",
        &url2,
        "--replace",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = Serve::new(&dir.path().join("unused2"))
        .args(serve_args(&url2, &policy))
        .start();
    let mut q = p.quota().await;
    assert_eq!(figures(&mut q, "alice").await, before);
    commit(&mut q, &open, 50, 0).await;
    assert_eq!(figures(&mut q, "alice").await, (250, 0, 0));
}

#[test]
fn a_store_that_is_not_a_postgres_url_is_refused_without_echoing_it() {
    let out = tollgate(&["serve", "--store", "mysql://root:hunter2@db/x"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("postgres://"), "{err}");
    assert!(!err.contains("hunter2"), "the password was echoed: {err}");
}
