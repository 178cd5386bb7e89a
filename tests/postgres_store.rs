//! The PostgreSQL store through the real binary and a real PostgreSQL server (started by the
//! tests: `common/postgres.rs`): acknowledged holds survive `kill -9`, rows changed behind
//! tollgate's back are refused at start, one replica leads while another follows (relaying to
//! it) and takes over with everything, a deposed leader is fenced, and an export moves a ledger from PostgreSQL to
//! sled and back.

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
        // Short, so that a restart after `kill -9` waits little for the lease to run out.
        "--lease-ttl".into(),
        "2".into(),
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

/// Start `serve` and wait until it leads (after a `kill -9`, a new server first follows the
/// dead one until its lease runs out).
async fn leading(serve: Serve, url: &str) -> Process {
    let p = tokio::task::spawn_blocking(move || serve.start())
        .await
        .unwrap();
    until_leading(url, &p).await;
    p
}

/// Wait until the server `p` holds the lease of the database at `url`.
async fn until_leading(url: &str, p: &Process) {
    let (url, address) = (url.to_string(), p.addr.to_string());
    tokio::task::spawn_blocking(move || common::postgres::wait_until_leading(&url, &address))
        .await
        .unwrap();
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

    let p = leading(Serve::new(&data).args(&args), &url).await;
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
    let p = leading(Serve::new(&data).args(&accepting).log_to(&log), &url).await;
    let mut q = p.quota().await;
    let held: u64 = figures(&mut q, "alice").await.1 + figures(&mut q, "bob").await.1;
    assert_eq!(held, 300, "what is left: the hold whose row remains");
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("DATA LOSS ACCEPTED"));
    p.kill9();
    let p = leading(Serve::new(&data).args(&args), &url).await;
    let mut q = p.quota().await;
    hold(&mut q, "carol", 1, 1).await;
}

/// Replicas on one database: the first leads; the second follows, relaying every call to the
/// leader (so both serve the one ledger); `kill -9` of the leader; the follower takes the lease
/// once it runs out, loads, and serves every hold the leader acknowledged, on the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_relays_to_the_leader_and_takes_over_when_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", POLICY);
    let url = server().database();
    let args = serve_args(&url, &policy);
    let leader = Serve::new(&dir.path().join("a")).args(&args).start();
    let log = dir.path().join("follower.log");
    let follower = Serve::new(&dir.path().join("b"))
        .args(&args)
        .env("RUST_LOG", "info")
        .log_to(&log)
        .start();
    let mut qa = leader.quota().await;
    let mut qb = follower.quota().await;
    // Calls to either replica reach the one ledger.
    let open = hold(&mut qb, "alice", 1000, 2000).await;
    let done = hold(&mut qa, "alice", 100, 100).await;
    commit(&mut qb, &done, 100, 50).await;
    assert_eq!(figures(&mut qa, "alice").await, (150, 3000, 1));
    assert_eq!(figures(&mut qb, "alice").await, (150, 3000, 1));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("following: relaying every call to the leader"),
        "{text}"
    );
    leader.kill9();

    until_leading(&url, &follower).await;
    let mut qb = follower.quota().await;
    assert_eq!(figures(&mut qb, "alice").await, (150, 3000, 1));
    commit(&mut qb, &open, 1000, 500).await;
    assert_eq!(figures(&mut qb, "alice").await, (1650, 0, 0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("leading: loading the ledger"), "{text}");
}

/// A leader that lost its lease (paused past the TTL while another took over) can never write
/// again: its batch is fenced by the epoch in the same statement, and nothing of it lands.
/// Through the store itself, so the fencing is tested apart from the watchdog that would
/// normally stop such a leader first.
#[test]
fn a_deposed_leader_cannot_write() {
    use tollgate::failstop::FailStop;
    use tollgate::store::postgres::{LeaseConfig, PostgresStore};
    use tollgate::store::{Batch, Recovery, Store};

    let url = server().database();
    let name = PgServer::name_of(&url).to_string();
    let ttl = Duration::from_secs(600);
    let a = PostgresStore::connect(&url, Recovery::Refuse).unwrap();
    let a_failed = FailStop::new();
    let epoch_a = a
        .lead(LeaseConfig::new("a".into(), ttl), a_failed.clone(), |_| {})
        .unwrap();
    a.load().unwrap();
    // Real records (assignments), so that B's load decodes them.
    let record = |subject: &str| {
        tollgate::store::Record::Assignment(
            subject.into(),
            tollgate::policy::SubjectConfig {
                tier: "free".into(),
                overrides: Default::default(),
                group: None,
            },
        )
        .encode()
    };
    let (before_key, before_value) = record("before");
    let mut batch = Batch::new();
    batch.push(&before_key, Some(&before_value));
    a.write(&batch).expect("the leader writes");

    // B cannot take a lease that holds...
    let b = PostgresStore::connect(&url, Recovery::Refuse).unwrap();
    let mut seen = Vec::new();
    let b_thread = std::thread::spawn(move || {
        let epoch = b
            .lead(LeaseConfig::new("b".into(), ttl), FailStop::new(), |l| {
                seen.push(l.epoch)
            })
            .unwrap();
        (b, epoch, seen)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!b_thread.is_finished(), "B took a lease that held");
    // ...until it runs out (A paused past its TTL: here, expired by hand).
    server().psql(
        &name,
        "UPDATE tollgate_lease SET expires_at = now() - interval '1 second'",
    );
    let (b, epoch_b, seen) = b_thread.join().unwrap();
    assert!(
        epoch_b > epoch_a,
        "a takeover raises the epoch: {epoch_a} -> {epoch_b}"
    );
    assert!(
        seen.contains(&epoch_a),
        "the standby saw the leader: {seen:?}"
    );
    b.load().unwrap();

    let rows_before = server().psql(&name, "SELECT count(*) FROM tollgate_records");
    let mut late = Batch::new();
    let (after_key, after_value) = record("after");
    late.push(&after_key, Some(&after_value));
    late.push(&before_key, None);
    let refused = a
        .write(&late)
        .expect_err("a deposed leader's batch is refused");
    assert!(refused.to_string().contains("deposed"), "{refused}");
    assert_eq!(
        server().psql(&name, "SELECT count(*) FROM tollgate_records"),
        rows_before,
        "nothing of the fenced batch was written"
    );
    assert_eq!(
        server().psql(
            &name,
            "SELECT count(*) FROM tollgate_records WHERE key = 'abefore'::bytea"
        ),
        "1",
        "the record the fenced batch would have removed is still there"
    );
    // The new leader writes on.
    let mut next = Batch::new();
    let (b_key, b_value) = record("by-b");
    next.push(&b_key, Some(&b_value));
    b.write(&next).expect("the new leader writes");
    drop(a_failed);
}

/// Wait until every thread of process `pid` is stopped (state `T` in /proc).
fn stopped(pid: u32) {
    let start = std::time::Instant::now();
    loop {
        let all = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(Result::ok)
            .all(|t| {
                std::fs::read_to_string(t.path().join("stat"))
                    .ok()
                    .and_then(|s| {
                        s.rsplit_once(')')
                            .map(|(_, r)| r.trim_start().starts_with('T'))
                    })
                    .unwrap_or(true)
            });
        if all {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "pid {pid} did not stop"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A leader paused (SIGSTOP) past its lease: the follower takes over and serves; the old
/// leader, resumed, stops (exit 3, naming the lease) instead of deciding from a ledger that is
/// no longer the database's, and none of the calls that waited for it is answered OK (writes,
/// denials, dry runs and reads alike), nor does any of its holds land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_stops_when_it_resumes_and_the_follower_serves() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", POLICY);
    let url = server().database();
    let args = serve_args(&url, &policy);
    let log = dir.path().join("leader.log");
    let mut leader = Serve::new(&dir.path().join("a"))
        .args(&args)
        .log_to(&log)
        .start();
    let mut q = leader.quota().await;
    hold(&mut q, "alice", 4000, 0).await;
    let follower = Serve::new(&dir.path().join("b")).args(&args).start();
    leader.signal("STOP");
    // kill(2) returns before every thread has stopped: wait until each one has, or a call
    // sent now could still be answered in that instant (on a busy machine, milliseconds).
    stopped(leader.child.id());
    // Calls sent to the paused leader wait in its socket: holds (which would write), a denial
    // and a dry run (answered from memory), a read. None of them may be answered OK.
    let mut pending = Vec::new();
    for n in 0..4 {
        let mut q = q.clone();
        let mut req = reserve("bob", 1000, 0);
        req.idempotency_key = format!("bob-{n}");
        pending.push(tokio::spawn(async move {
            format!("{:?}", q.reserve(req).await.map(|r| r.into_inner()))
        }));
    }
    let mut denied = reserve("alice", 7000, 0);
    let mut dry = reserve("alice", 1, 0);
    dry.dry_run = true;
    for req in [denied.clone(), dry] {
        let mut q = q.clone();
        pending.push(tokio::spawn(async move {
            format!("{:?}", q.reserve(req).await.map(|r| r.into_inner()))
        }));
    }
    {
        let mut q = q.clone();
        pending.push(tokio::spawn(async move {
            let ask = tollgate::proto::GetUsageRequest {
                subject: "alice".into(),
                ..Default::default()
            };
            format!("{:?}", q.get_usage(ask).await.map(|r| r.into_inner()))
        }));
    }
    until_leading(&url, &follower).await;
    let mut q2 = follower.quota().await;
    hold(&mut q2, "alice", 6000, 0).await;
    leader.signal("CONT");
    let exit = leader
        .wait_exit(Duration::from_secs(30))
        .expect("the resumed leader stops");
    assert_eq!(exit.code(), Some(3), "log:\n{}", leader.log_text());
    assert!(leader.log_text().contains("lease"), "{}", leader.log_text());
    for call in pending {
        let answer = call.await.unwrap();
        assert!(
            answer.starts_with("Err("),
            "a call pending on the deposed leader was answered: {answer}"
        );
    }
    // None of its holds landed, and the budget was spent once: 10,000 of 10,000 held, and
    // nothing more is allowed.
    assert_eq!(figures(&mut q2, "bob").await, (0, 0, 0));
    assert_eq!(figures(&mut q2, "alice").await, (0, 10000, 2));
    denied.prompt_tokens = Some(1);
    let r = rsv(&mut q2, denied).await;
    assert_eq!(decision(&r), Decision::Denied);
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

/// The health of `service` at `addr` (an empty service: the server as a whole).
async fn health(addr: std::net::SocketAddr, service: &str) -> i32 {
    use tonic_health::pb::health_client::HealthClient;
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return -1;
    };
    let Ok(channel) = endpoint
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
    else {
        return -1;
    };
    let mut client = HealthClient::new(channel);
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map_or(-1, |r| r.into_inner().status)
}

/// A follower is ready (its Quota service SERVING) only while its leader is: a paused leader
/// turns it NOT_SERVING, a resumed one SERVING again; the follower stays alive ("" SERVING)
/// throughout. A lease far longer than the pause, so nobody takes over meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_readiness_follows_its_leader() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", POLICY);
    let url = server().database();
    let args = [
        "--store",
        url.as_str(),
        "--policy",
        policy.to_str().unwrap(),
        "--lease-ttl",
        "60",
        "--upstream-timeout",
        "0.5",
    ];
    let leader = Serve::new(&dir.path().join("a")).args(args).start();
    let follower = Serve::new(&dir.path().join("b")).args(args).start();
    let serving = ServingStatus::Serving as i32;
    let not_serving = ServingStatus::NotServing as i32;
    let until = |want: i32, what: &'static str| {
        let addr = follower.addr;
        async move {
            let mut waited = 0;
            while health(addr, "tollgate.v1.Quota").await != want {
                waited += 1;
                assert!(
                    waited < 300,
                    "the follower's Quota health never became {what}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    until(serving, "SERVING").await;
    leader.signal("STOP");
    until(not_serving, "NOT_SERVING with its leader paused").await;
    assert_eq!(
        health(follower.addr, "").await,
        serving,
        "the follower stays alive"
    );
    leader.signal("CONT");
    until(serving, "SERVING again with its leader back").await;
}

/// With `sslmode=require&sslrootcert=FILE` the store's connections are TLS, verified against
/// that CA (PostgreSQL reports each as encrypted); without the CA the URL is refused at start,
/// and a CA that did not sign the server's certificate cannot connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_speaks_tls_to_postgres_when_the_url_asks() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", POLICY);
    let url = server().tls_database();
    let p = leading(
        Serve::new(&dir.path().join("a")).args(serve_args(&url, &policy)),
        &url,
    )
    .await;
    let mut q = p.quota().await;
    hold(&mut q, "alice", 10, 10).await;
    let name = PgServer::name_of(&url);
    let encrypted = server().psql(
        name,
        "SELECT count(*) FILTER (WHERE s.ssl) || '/' || count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'tollgate' AND a.datname = current_database()",
    );
    let (tls, all) = encrypted.split_once('/').unwrap();
    assert!(
        all != "0" && tls == all,
        "connections over TLS / all: {encrypted}"
    );

    // No CA: refused, naming the setting, echoing no password.
    let plain = url
        .split('?')
        .next()
        .unwrap()
        .replace("tollgate@", "tollgate:pw-secret@");
    let log = dir.path().join("no-ca.log");
    let refused = Serve::new(&dir.path().join("b"))
        .args(serve_args(&format!("{plain}?sslmode=require"), &policy))
        .log_to(&log)
        .try_start();
    assert!(refused.is_err());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("sslmode=require needs sslrootcert") && !text.contains("pw-secret"),
        "{text}"
    );

    // Another CA: the server's certificate is not trusted.
    let other = write_file(
        dir.path(),
        "other-ca.pem",
        &rcgen::CertifiedIssuer::self_signed(
            {
                let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
                p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
                p
            },
            rcgen::KeyPair::generate().unwrap(),
        )
        .unwrap()
        .pem(),
    );
    let log = dir.path().join("other-ca.log");
    let refused = Serve::new(&dir.path().join("c"))
        .args(serve_args(
            &format!(
                "{}?sslmode=require&sslrootcert={}",
                url.split('?').next().unwrap(),
                other.display()
            ),
            &policy,
        ))
        .log_to(&log)
        .try_start();
    assert!(refused.is_err(), "a server the CA did not sign was trusted");
}
