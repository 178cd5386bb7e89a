//! Resident memory per subject and per settled reservation, and the time a ledger takes to
//! load a million subjects, measured in this process (issue 10's footprint figures).
//!
//! ```text
//! cargo run --release --example footprint -- --subjects 1000000
//! # The restart alone, on a directory kept for reruns, and the real server on it:
//! cargo build --release
//! cargo run --release --example footprint -- --restart-only --data-dir /tmp/m1 --serve target/release/tollgate
//! # ...and the same ledger moved to PostgreSQL (export, import), the server timed on it too:
//! cargo run --release --example footprint -- --restart-only --data-dir /tmp/m1 --serve target/release/tollgate --store postgres://...
//! ```
//!
//! Three phases, each measured as the change in resident memory (`VmRSS` of
//! /proc/self/status) divided by the count:
//! 1. `subjects`: each of N subjects makes one Reserve and commits it (state with usage today:
//!    bucket, window, day and month counters), so its scope stays in memory;
//! 2. the same with the N committed reservations kept for retries (24 h): the difference is
//!    what a settled reservation costs (with `Bounds::max_settled = 0` they are purged at once);
//! 3. restart: the same N subjects written to a sled directory through the real ledger, then
//!    `LocalLedger::open` timed from a fresh process state (load plus checks); with `--serve`, also
//!    the real server started on that directory, timed until its health check says SERVING.
//!
//! Figures include the allocator's overhead, as resident memory does.

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;

use tollgate::clock::ManualClock;
use tollgate::engine::{Bounds, Decision, Engine, ReservationId, ReserveInput, Usage};
use tollgate::ledger::LocalLedger;
use tollgate::policy::Policy;
use tollgate::store::Durability;

#[derive(Debug, Parser)]
struct Args {
    /// Subjects (and reservations) to make.
    #[arg(long, default_value_t = 1_000_000)]
    subjects: u64,
    /// Skip the restart phase (it writes N subjects to a temporary sled directory).
    #[arg(long)]
    no_restart: bool,
    /// Only the restart phase (skip the resident-memory phases).
    #[arg(long)]
    restart_only: bool,
    /// The restart phase's data directory, kept: written if it holds no store, else only
    /// reopened (so the load can be timed and profiled again without writing it anew).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// Then time the real server on the same directory: this `tollgate` binary started with
    /// `serve --data-dir`, until its health check answers SERVING (what an operator waits for).
    #[arg(long)]
    serve: Option<std::path::PathBuf>,
    /// With --serve: then move the directory's ledger into this PostgreSQL database (`tollgate
    /// export`, then `tollgate import --replace`) and time the server on it the same way.
    #[arg(long, requires = "serve")]
    store: Option<String>,
}

const POLICY: &str = r#"
default_tier = "t"

[tiers.t]
tokens_per_minute = 1000000000
requests_per_minute = 1000000
tokens_per_day = 1000000000
tokens_per_month = 1000000000
max_concurrent = 100
"#;

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU time (user and system) of this process (`self`) or of the calling thread
/// (`thread-self`), from /proc, in seconds.
fn cpu(of: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{of}/stat")).unwrap_or_default();
    let fields: Vec<f64> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)) / ticks
}

fn input(subject: String, id: u128) -> ReserveInput {
    ReserveInput {
        caller: None,
        subject,
        model: "gpt-4o-mini".into(),
        prompt_tokens: 100,
        prompt_tokens_for: Vec::new(),
        max_output_tokens: 100,
        idempotency_key: Some(format!("k{id}")),
        hold_us: None,
        dry_run: false,
        group: None,
        client_ip: None,
        id: ReservationId(id),
    }
}

/// Resident bytes per subject after `n` subjects each Reserve and Commit once, keeping at most
/// `max_settled` settled reservations. Memory is handed back to the system (malloc_trim)
/// before and after, so each phase starts from what the process really holds.
fn fill(policy: &Arc<Policy>, n: u64, now: u64, max_settled: usize) -> f64 {
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe { libc::malloc_trim(0) };
    let before = rss();
    let mut engine = Engine::new(
        policy.clone(),
        Bounds {
            max_settled,
            max_scopes: usize::MAX,
            ..Bounds::default()
        },
    );
    let mut out = Vec::new();
    for i in 0..n {
        let id = u128::from(i) + 1;
        let r = engine
            .reserve(input(format!("user-{i:08}"), id), now, &mut out)
            .expect("reserve");
        assert_eq!(r.decision, Decision::Allowed);
        let usage = Usage {
            prompt_tokens: 100,
            completion_tokens: 50,
            usage_unknown: false,
        };
        engine
            .commit(ReservationId(id), usage, now, &mut out)
            .expect("commit");
        out.clear();
    }
    let per = rss().saturating_sub(before) as f64 / n as f64;
    drop(engine);
    per
}

fn main() {
    let args = Args::parse();
    let n = args.subjects;
    let policy = Arc::new(Policy::from_toml(POLICY, "footprint.toml").expect("policy"));
    // The wall clock's now: a server started on the directory (`--serve`) keeps what was
    // written (settled reservations for 24 h), rather than purging it as past its retention.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_micros() as u64;

    if !args.restart_only {
        let subjects_only = fill(&policy, n, now, 0);
        let with_settled = fill(&policy, n, now, usize::MAX);
        println!("{n} subjects, each with one Reserve and its Commit (usage today and this month)");
        println!("resident bytes per subject with usage: {subjects_only:.0}");
        println!(
            "resident bytes per settled reservation kept for retries: {:.0}",
            with_settled - subjects_only
        );
    }

    if args.no_restart {
        return;
    }
    let temp = tempfile::tempdir().expect("tempdir");
    let dir = args.data_dir.as_deref().unwrap_or(temp.path());
    let written = dir.join(tollgate::store::sled::SLED_FILE).exists();
    let clock = Arc::new(ManualClock::new(now));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        if written {
            println!("{} holds a store: only reopened", dir.display());
            return;
        }
        let ledger = LocalLedger::open(
            dir,
            policy.clone(),
            Bounds::default(),
            Durability::Relaxed,
            clock.clone(),
        )
        .expect("open");
        let started = Instant::now();
        for i in 0..n {
            let r = ledger
                .reserve(input(format!("user-{i:08}"), 0))
                .await
                .expect("reserve");
            let id = r.reservation_id.expect("a hold");
            ledger
                .commit(
                    id,
                    Usage {
                        prompt_tokens: 100,
                        completion_tokens: 50,
                        usage_unknown: false,
                    },
                )
                .await
                .expect("commit");
        }
        ledger.flush().await.expect("flush");
        println!(
            "wrote {n} subjects through the ledger (relaxed) in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    });
    let started = Instant::now();
    let (process_cpu, thread_cpu) = (cpu("self"), cpu("thread-self"));
    let ledger = LocalLedger::open(dir, policy, Bounds::default(), Durability::Relaxed, clock)
        .expect("reopen");
    println!(
        "restart: LocalLedger::open with {n} subjects and {n} settled reservations took {:.2} s \
         (CPU: {:.2} s in all threads, {:.2} s in the opening thread)",
        started.elapsed().as_secs_f64(),
        cpu("self") - process_cpu,
        cpu("thread-self") - thread_cpu,
    );
    drop(ledger);
    if let Some(bin) = &args.serve {
        let on_sled = [std::ffi::OsStr::new("--data-dir"), dir.as_os_str()];
        runtime.block_on(time_serve(bin, &on_sled, "sled"));
        if let Some(url) = &args.store {
            let file = temp.path().join("export.jsonl");
            let started = Instant::now();
            run(
                bin,
                &[
                    "export".as_ref(),
                    "--data-dir".as_ref(),
                    dir.as_os_str(),
                    "--out".as_ref(),
                    file.as_os_str(),
                ],
            );
            let exported = started.elapsed();
            run(
                bin,
                &[
                    "import".as_ref(),
                    "--store".as_ref(),
                    url.as_ref(),
                    "--replace".as_ref(),
                    file.as_os_str(),
                ],
            );
            println!(
                "moved to PostgreSQL: export {:.2} s, import {:.2} s",
                exported.as_secs_f64(),
                (started.elapsed() - exported).as_secs_f64()
            );
            let on_postgres = [std::ffi::OsStr::new("--store"), url.as_ref()];
            runtime.block_on(time_serve(bin, &on_postgres, "PostgreSQL"));
        }
    }
    drop(runtime);
}

/// Run `bin` with `args` to its end; panics unless it succeeds.
fn run(bin: &std::path::Path, args: &[&std::ffi::OsStr]) {
    let status = std::process::Command::new(bin)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run tollgate");
    assert!(status.success(), "tollgate {args:?}: {status}");
}

/// Start `bin serve` with `store` (its store's flags) on a free loopback port, and print how
/// long it took to print its address and for its Quota service to answer health SERVING
/// (on PostgreSQL, a replica that follows says SERVING for "" only); then stop it (SIGTERM).
async fn time_serve(bin: &std::path::Path, store: &[&std::ffi::OsStr], name: &str) {
    use std::io::BufRead;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let started = Instant::now();
    let mut child = std::process::Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(store)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the server");
    let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let addr = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("tollgate listening on ").map(str::to_string))
        .expect("the server printed its address");
    let listening = started.elapsed();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: "tollgate.v1.Quota".into(),
            })
            .await
            .map(|r| r.into_inner().status());
        if status.ok() == Some(ServingStatus::Serving) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    println!(
        "serve on {name}: `tollgate serve` printed its address after {:.2} s, health SERVING after {:.2} s",
        listening.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}
