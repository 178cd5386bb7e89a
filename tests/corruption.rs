//! A damaged data directory is refused at start rather than served as a smaller ledger; an
//! operator may accept the loss, explicitly and loudly; a crash at any instant never trips the
//! check; and `tollgate export` / `tollgate import` back a ledger up while it serves and
//! restore it, refusing an export that was cut short or altered.
//!
//! All through the real binary, on the real clock: holds live an hour, so none expires during a
//! test.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::task::JoinSet;
use tonic::Code;

use tollgate::proto::{
    self, CommitRequest, Decision, ExportRequest, GetSubjectRequest, GetUsageRequest,
    GetUsageResponse, LimitOverrides, SetSubjectRequest,
};

/// Limits no test reaches, hour-long holds, and a second tier to assign.
const POLICY: &str = r#"
default_tier = "load"

[tiers.load]
tokens_per_minute = 1000000000000
requests_per_minute = 1000000000
tokens_per_day = 1000000000000
hold_seconds = 3600

[tiers.gold]
tokens_per_minute = 1000000000000
requests_per_minute = 1000000000
tokens_per_day = 1000000000000
hold_seconds = 3600
max_concurrent = 1000

[groups."acme"]
tokens_per_day = 1000000000

[models."gpt-4o"]
input_usd_per_million = 2.5
output_usd_per_million = 10.0
"#;

/// How long a command of the binary may take (it takes well under a second).
const COMMAND_LIMIT: Duration = Duration::from_secs(60);
/// The holds made before each damage.
const HOLDS: u32 = 300;

/// A temporary directory with the policy file and a data directory (not created yet).
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    policy: PathBuf,
    data: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    Fixture {
        policy: write_file(&root, "policy.toml", POLICY),
        data: root.join("data"),
        root,
        _dir: dir,
    }
}

impl Fixture {
    /// `tollgate serve` over `data`, strict, with the policy and the admin token.
    fn serve(&self, data: &Path) -> Serve {
        Serve::new(data)
            .policy(&self.policy)
            .args(["--durability", "strict"])
    }

    /// sled's data file.
    fn data_file(&self) -> PathBuf {
        self.data.join("db")
    }
}

/// Stop `server` with SIGTERM; it must exit 0.
fn stop(mut server: Process) {
    server.sigterm();
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("tollgate exits after SIGTERM");
    assert!(status.success(), "SIGTERM: {status:?}");
}

/// The fleet's open holds.
async fn fleet_open_holds(server: &Process) -> u32 {
    let mut q = server.quota().await;
    q.get_usage(GetUsageRequest::default())
        .await
        .expect("GetUsage")
        .into_inner()
        .open_holds
}

/// Serve, make [`HOLDS`] holds (ten subjects), stop cleanly.
async fn holds_then_clean_stop(f: &Fixture) {
    let server = f.serve(&f.data).start();
    let mut q = server.quota().await;
    for i in 0..HOLDS {
        let r = rsv(&mut q, reserve(&format!("user-{}", i % 10), 100, 50)).await;
        assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    }
    assert_eq!(fleet_open_holds(&server).await, HOLDS);
    stop(server);
}

/// Start `tollgate serve` over `data` expecting a refusal: its exit status and stderr. Fails
/// the test at once if it serves instead.
fn refused(f: &Fixture, data: &Path, extra: &[&str]) -> (ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .arg("--policy")
        .arg(&f.policy)
        .args(extra)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tollgate");
    // The first line, or end of file when it exits without serving.
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    if line.starts_with("tollgate listening on") {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "tollgate served a damaged data directory; stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A refusal at start: a non-zero exit and a clear message naming the damage (one of
/// `causes`: sled may notice some damage itself, and report it as unreadable) and the way out.
#[track_caller]
fn assert_refused(status: ExitStatus, stderr: &str, causes: &[&str]) {
    eprintln!("refused ({status:?}):\n{stderr}");
    assert!(!status.success(), "exit {status:?}; stderr:\n{stderr}");
    for needle in ["refusing a damaged data directory", "--accept-data-loss"] {
        assert!(
            stderr.contains(needle),
            "stderr should say {needle:?}:\n{stderr}"
        );
    }
    assert!(
        causes.iter().any(|c| stderr.contains(c)),
        "stderr should say one of {causes:?}:\n{stderr}"
    );
}

/// What a cut or damaged sled file is refused for: batches missing at its end, records
/// missing inside it, or pages sled cannot read.
const DAMAGE: &[&str] = &[
    "sled ends at batch",
    "lost or altered",
    "sled cannot read it",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_file_cut_to_half_is_refused_at_start() {
    let f = fixture();
    holds_then_clean_stop(&f).await;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(f.data_file())
        .unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len / 2).unwrap();
    drop(file);
    let (status, stderr) = refused(&f, &f.data, &[]);
    assert_refused(status, &stderr, DAMAGE);
    // Refused again: a refusal changes nothing.
    let (status, stderr) = refused(&f, &f.data, &[]);
    assert_refused(status, &stderr, DAMAGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_in_the_data_file_are_refused_at_start() {
    let f = fixture();
    holds_then_clean_stop(&f).await;
    let mut bytes = std::fs::read(f.data_file()).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xa5;
    }
    std::fs::write(f.data_file(), &bytes).unwrap();
    let (status, stderr) = refused(&f, &f.data, &[]);
    assert_refused(status, &stderr, DAMAGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_data_file_is_refused_at_start() {
    let f = fixture();
    holds_then_clean_stop(&f).await;
    std::fs::remove_file(f.data_file()).unwrap();
    let (status, stderr) = refused(&f, &f.data, &[]);
    assert_refused(status, &stderr, &["data file"]);
    assert!(
        !f.data_file().exists(),
        "a refused start created a new, empty data file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_emptied_but_for_its_watermark_is_refused_at_start() {
    let f = fixture();
    holds_then_clean_stop(&f).await;
    for entry in std::fs::read_dir(&f.data).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() == "watermark" {
            continue;
        }
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
    let (status, stderr) = refused(&f, &f.data, &[]);
    assert_refused(status, &stderr, &["data file"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_the_loss_serves_what_is_left_says_so_and_starts_afresh() {
    let f = fixture();
    holds_then_clean_stop(&f).await;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(f.data_file())
        .unwrap();
    file.set_len(file.metadata().unwrap().len() / 2).unwrap();
    drop(file);

    let log = f.root.join("accept.log");
    let server = f
        .serve(&f.data)
        .args(["--accept-data-loss"])
        .log_to(&log)
        .start();
    let line = server
        .log_line_until("the accepted loss", |l| {
            l.contains("DATA LOSS ACCEPTED") && l.contains("expected")
        })
        .await;
    for needle in ["problem=", "found=", "expected=batch "] {
        assert!(line.contains(needle), "{needle:?} in {line}");
    }
    let left = fleet_open_holds(&server).await;
    assert!(left < HOLDS, "{left} of {HOLDS} holds left after the cut");
    // It serves: a new hold is made and kept.
    let mut q = server.quota().await;
    let r = rsv(&mut q, reserve("after", 1, 1)).await;
    assert_eq!(decision(&r), Decision::Allowed);
    stop(server);

    // Accepted once: the next start, without the flag, is the store as it now is.
    let server = f.serve(&f.data).start();
    assert_eq!(fleet_open_holds(&server).await, left + 1);
    stop(server);

    // The environment variable does the same: a deleted data file, accepted, starts empty.
    std::fs::remove_file(f.data_file()).unwrap();
    let server = f
        .serve(&f.data)
        .env("TOLLGATE_ACCEPT_DATA_LOSS", "true")
        .log_to(&log)
        .start();
    server
        .log_line_until("the accepted loss", |l| l.contains("DATA LOSS ACCEPTED"))
        .await;
    assert_eq!(fleet_open_holds(&server).await, 0);
    stop(server);
}

/// `kill -9` at any instant of the group commit (here: under 8 clients of strict Reserves and
/// Commits, several times over) must never make the next start refuse the store: the
/// watermark is written only after the flush it names, so a crash leaves it behind sled, never
/// ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_strict_load_never_trips_the_check() {
    const CYCLES: usize = 6;
    const CLIENTS: usize = 8;
    let f = fixture();
    let mut acknowledged_open = 0u32;
    for cycle in 0..CYCLES {
        let log = f.root.join(format!("cycle-{cycle}.log"));
        let server = match f.serve(&f.data).log_to(&log).try_start() {
            Ok(s) => s,
            Err(e) => panic!("cycle {cycle}: a restart after kill -9 was refused: {e}"),
        };
        assert!(
            fleet_open_holds(&server).await >= acknowledged_open,
            "cycle {cycle}: acknowledged holds lost"
        );
        let stop_load = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let mut clients = JoinSet::new();
        for n in 0..CLIENTS {
            let url = server.url();
            let (stop_load, acked, open) = (stop_load.clone(), acked.clone(), open.clone());
            clients.spawn(async move {
                let Ok(mut q) = proto::quota_client::QuotaClient::connect(url).await else {
                    return;
                };
                while !stop_load.load(Ordering::Relaxed) {
                    let Ok(r) = q.reserve(reserve(&format!("k{n}"), 10, 10)).await else {
                        return;
                    };
                    acked.fetch_add(1, Ordering::Relaxed);
                    let id = r.into_inner().reservation_id;
                    if n % 2 == 0 {
                        if q.commit(commit_req(&id, 10, 5)).await.is_err() {
                            return;
                        }
                    } else {
                        open.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        // Kill at a point that varies from cycle to cycle, with every client mid-call.
        let target = 50 + 40 * cycle;
        for _ in 0..2_000 {
            if acked.load(Ordering::Relaxed) >= target {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            acked.load(Ordering::Relaxed) >= target,
            "cycle {cycle}: the load made no progress"
        );
        server.kill9();
        stop_load.store(true, Ordering::Relaxed);
        while clients.join_next().await.is_some() {}
        acknowledged_open += open.load(Ordering::Relaxed) as u32;
    }
    let server = f.serve(&f.data).start();
    assert!(fleet_open_holds(&server).await >= acknowledged_open);
    stop(server);
}

/// What a usage answer says, without the figures that move with the clock (bucket refill).
fn figures(u: &GetUsageResponse) -> Vec<u64> {
    vec![
        u.used_tokens,
        u.used_tokens_month,
        u.held_tokens,
        u.requests,
        u64::from(u.open_holds),
        u.denials,
        u.spent_micro_usd,
        u.spent_micro_usd_month,
        u.held_micro_usd,
        u.saved_micro_usd,
    ]
}

fn usage_of(subject: &str, group: &str, client_ip: &str) -> GetUsageRequest {
    GetUsageRequest {
        subject: subject.into(),
        group: group.into(),
        client_ip: client_ip.into(),
    }
}

/// Run `tollgate ARGS...` to its exit.
fn tollgate(args: &[&std::ffi::OsStr], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(args).env("RUST_LOG", "warn");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    run_to_exit(cmd, COMMAND_LIMIT)
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// `tollgate import --data-dir DIR FILE`.
fn import(file: &Path, dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        os("import"),
        os("--data-dir"),
        dir.as_os_str(),
        file.as_os_str(),
    ];
    args.extend(extra.iter().map(|a| os(a)));
    tollgate(&args, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_export_taken_while_serving_restores_into_a_fresh_directory() {
    let f = fixture();
    let server = f.serve(&f.data).start();
    let mut q = server.quota().await;
    let mut a = server.admin().await;

    let set = SetSubjectRequest {
        subject: "alice".into(),
        tier: "gold".into(),
        group: "acme".into(),
        overrides: Some(LimitOverrides {
            tokens_per_day: Some(5_000_000),
            ..Default::default()
        }),
    };
    a.set_subject(set).await.expect("SetSubject");
    let mut with_ip = reserve("alice", 1_000, 500);
    with_ip.client_ip = "203.0.113.7".into();
    with_ip.idempotency_key = "turn-1".into();
    let open = rsv(&mut q, with_ip.clone()).await;
    assert_eq!(decision(&open), Decision::Allowed);
    let committed = rsv(&mut q, reserve("alice", 2_000, 1_000))
        .await
        .reservation_id;
    let first_commit = commit(&mut q, &committed, 2_000, 300).await;
    let refunded = rsv(&mut q, reserve("alice", 40, 60)).await.reservation_id;
    assert_eq!(refund(&mut q, &refunded).await, 100);
    let mut bob = reserve("bob", 300, 200);
    bob.group = "acme".into();
    let bob_open = rsv(&mut q, bob).await.reservation_id;
    // A denial, for the savings figures: over alice's own daily override.
    let denied = rsv(&mut q, reserve("alice", 4_000_000, 2_000_000)).await;
    assert_eq!(decision(&denied), Decision::Denied);

    let queries = [
        usage_of("alice", "", ""),
        usage_of("bob", "", ""),
        usage_of("", "acme", ""),
        usage_of("", "", "203.0.113.7"),
    ];
    let mut before = Vec::new();
    for query in &queries {
        before.push(figures(
            &q.get_usage(query.clone()).await.unwrap().into_inner(),
        ));
    }
    let alice_before = a
        .get_subject(GetSubjectRequest {
            subject: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();

    // The Export call is an Admin call: no token, no export.
    let mut anonymous = proto::admin_client::AdminClient::connect(server.url())
        .await
        .unwrap();
    assert_eq!(
        anonymous
            .export(ExportRequest {})
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    // A running server's directory is locked: the offline export says where to turn.
    let locked = tollgate(&[os("export"), os("--data-dir"), f.data.as_os_str()], &[]);
    assert!(!locked.status.success());
    assert!(
        String::from_utf8_lossy(&locked.stderr).contains("--addr"),
        "{}",
        String::from_utf8_lossy(&locked.stderr)
    );

    // Export while other subjects keep the writer busy.
    let stop_load = Arc::new(AtomicBool::new(false));
    let mut load = JoinSet::new();
    for n in 0..4 {
        let (url, stop_load) = (server.url(), stop_load.clone());
        load.spawn(async move {
            let mut q = proto::quota_client::QuotaClient::connect(url)
                .await
                .unwrap();
            let mut made = 0;
            while !stop_load.load(Ordering::Relaxed) || made < 20 {
                let r = q
                    .reserve(reserve(&format!("load-{n}"), 1, 1))
                    .await
                    .unwrap();
                let id = r.into_inner().reservation_id;
                q.commit(commit_req(&id, 1, 1)).await.unwrap();
                made += 1;
            }
        });
    }
    let backup = f.root.join("backup.jsonl");
    let url = server.url();
    let exported = tollgate(
        &[
            os("export"),
            os("--addr"),
            os(&url),
            os("--out"),
            backup.as_os_str(),
        ],
        &[("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)],
    );
    stop_load.store(true, Ordering::Relaxed);
    while let Some(done) = load.join_next().await {
        done.expect("load task");
    }
    assert!(
        exported.status.success(),
        "export: {}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let text = std::fs::read_to_string(&backup).unwrap();
    let header = text.lines().next().unwrap();
    assert!(
        header.starts_with(
            r#"{"kind":"header","format":"tollgate-export","version":1,"store_format":5"#
        ),
        "{header}"
    );
    assert!(text.lines().last().unwrap().starts_with(r#"{"kind":"end""#));
    assert!(text.contains(r#""kind":"assignment","subject":"alice""#));
    stop(server);

    // Restore into a new directory and serve from it.
    let restored = f.root.join("restored");
    let out = import(&backup, &restored, &[]);
    assert!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = f.serve(&restored).start();
    let mut q = server.quota().await;
    let mut a = server.admin().await;
    for (query, figures_before) in queries.iter().zip(&before) {
        let now = q.get_usage(query.clone()).await.unwrap().into_inner();
        assert_eq!(&figures(&now), figures_before, "{query:?}");
    }
    let alice_after = a
        .get_subject(GetSubjectRequest {
            subject: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alice_after, alice_before);
    // The holds are the same holds: the open one commits, the committed one answers its retry
    // as before, the idempotency key still replays, the refunded one stays refunded.
    let c = commit(&mut q, &open.reservation_id, 1_000, 200).await;
    assert_eq!((c.charged_tokens, c.released_tokens), (1_200, 300));
    let again = commit(&mut q, &committed, 2_000, 300).await;
    assert_eq!(
        (again.charged_tokens, again.released_tokens),
        (first_commit.charged_tokens, first_commit.released_tokens)
    );
    let replay = rsv(&mut q, with_ip).await;
    assert!(replay.replayed);
    assert_eq!(replay.reservation_id, open.reservation_id);
    assert_status(
        q.commit(CommitRequest {
            reservation_id: refunded.clone(),
            prompt_tokens: 1,
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        &["REFUNDED"],
    );
    assert_eq!(refund(&mut q, &bob_open).await, 500);
    stop(server);
}

/// An export of a stopped directory with a few records, as text.
async fn small_export(f: &Fixture) -> String {
    let server = f.serve(&f.data).start();
    let mut q = server.quota().await;
    for subject in ["ann", "ben", "cat"] {
        rsv(&mut q, reserve(subject, 10, 20)).await;
    }
    stop(server);
    let out = tollgate(&[os("export"), os("--data-dir"), f.data.as_os_str()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_cut_short_or_altered_is_refused_by_import() {
    let f = fixture();
    let good = small_export(&f).await;
    let lines: Vec<&str> = good.lines().collect();
    // header, 3 subjects + group-less fleet scope, 3 reservations, end.
    assert!(lines.len() >= 8, "{good}");

    let without_end = lines[..lines.len() - 1].join("\n") + "\n";
    let mid_line = &good[..good.len() - 10];
    let without_a_record = [&lines[..2], &lines[3..]].concat().join("\n") + "\n";
    let edited = good.replacen("\"max_output_tokens\":20", "\"max_output_tokens\":2", 1);
    assert_ne!(edited, good);
    let garbage_after = good.clone() + "{}\n";
    let twice = [&lines[..2], &lines[1..]].concat().join("\n") + "\n";
    for (name, text, reason) in [
        (
            "without-end",
            without_end.as_str(),
            "ends before its end line",
        ),
        ("mid-line", mid_line, "cut short"),
        (
            "without-a-record",
            without_a_record.as_str(),
            "records are missing",
        ),
        ("edited", edited.as_str(), "checksum"),
        (
            "garbage-after",
            garbage_after.as_str(),
            "after the end line",
        ),
        ("twice", twice.as_str(), "a second record"),
    ] {
        let file = write_file(&f.root, &format!("{name}.jsonl"), text);
        let dir = f.root.join(format!("into-{name}"));
        let out = import(&file, &dir, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: imported:\n{stderr}");
        assert!(stderr.contains(reason), "{name}: {reason:?} in:\n{stderr}");
        assert!(
            !dir.join("db").exists(),
            "{name}: a refused import wrote a store"
        );
    }

    // The good one restores, but not over a store.
    let file = write_file(&f.root, "good.jsonl", &good);
    let out = import(&file, &f.data, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a tollgate store"));
    let out = import(&file, &f.data, &["--replace"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An import that did not finish leaves its marker: no server starts on half a store.
    let marker = f.data.join("import-in-progress");
    std::fs::write(&marker, "").unwrap();
    let (status, stderr) = refused(&f, &f.data, &[]);
    assert!(
        !status.success() && stderr.contains("did not finish"),
        "{stderr}"
    );
    std::fs::remove_file(&marker).unwrap();
    let server = f.serve(&f.data).start();
    assert_eq!(fleet_open_holds(&server).await, 3);
    stop(server);
    // Exported again, the restored store is the same records.
    let again = tollgate(&[os("export"), os("--data-dir"), f.data.as_os_str()], &[]);
    let records = |t: &str| {
        t.lines()
            .filter(|l| !l.contains(r#""kind":"header""#) && !l.contains(r#""kind":"end""#))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        records(&String::from_utf8_lossy(&again.stdout)),
        records(&good)
    );
}
