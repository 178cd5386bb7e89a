//! Load a running tollgate through the network stack: C connections × S concurrent streams on
//! each, every stream a loop of Reserve then Commit, for a bounded time. Prints throughput and
//! latency percentiles (p50, p99, p99.9) of Reserve, Commit, and the pair.
//!
//! ```text
//! cargo run --release -- serve --listen 127.0.0.1:50051 --data-dir /tmp/tg \
//!     --policy examples/load-policy.toml --durability strict
//! cargo run --release --example load -- --target http://127.0.0.1:50051 \
//!     --connections 4 --streams 16 --duration 5
//! ```
//!
//! The server's policy must admit the load (`examples/load-policy.toml` does); denials are
//! counted and reported, not hidden. Client and server share the machine's cores, so on a small
//! machine the figures are a floor for the server alone. That is why the CPU time this client
//! spends per call is reported (and the server's, given `--server-pid`): on shared cores every
//! microsecond the client burns is one the server did not get.

use std::time::{Duration, Instant};

use clap::Parser;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use tollgate::proto::quota_client::QuotaClient;
use tollgate::proto::{CommitRequest, Decision, ReserveRequest};

/// Drive Reserve + Commit against a tollgate server and report throughput and latency.
#[derive(Debug, Parser)]
struct Args {
    /// The server's URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// HTTP/2 connections.
    #[arg(long, short = 'c', default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    connections: u16,
    /// Concurrent streams (callers) on each connection.
    #[arg(long, short = 's', default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    streams: u16,
    /// Seconds measured (after the warm-up), at most 600.
    #[arg(long, short = 'd', default_value_t = 5.0)]
    duration: f64,
    /// Seconds of warm-up before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Subjects the callers spread over.
    #[arg(long, default_value_t = 64)]
    subjects: u32,
    /// Each caller moves to the next of the subjects on every Reserve (caller n uses n, n +
    /// callers, n + 2 x callers, ... modulo `--subjects`), so the server keeps state for all of
    /// them, as with real traffic (the soak uses it); without it, caller n always uses n.
    #[arg(long)]
    rotate_subjects: bool,
    /// Prompt tokens per Reserve.
    #[arg(long, default_value_t = 100)]
    prompt_tokens: u64,
    /// Output tokens held per Reserve (Commit reports half of them used).
    #[arg(long, default_value_t = 200)]
    max_output_tokens: u64,
    /// The server's process id, on this machine: its CPU time over the measured window is
    /// reported per call too.
    #[arg(long)]
    server_pid: Option<u32>,
}

/// What one caller measured (latencies in microseconds).
#[derive(Debug, Default)]
struct Stats {
    reserve_us: Vec<u32>,
    commit_us: Vec<u32>,
    pair_us: Vec<u32>,
    denied: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.reserve_us.extend(other.reserve_us);
        self.commit_us.extend(other.commit_us);
        self.pair_us.extend(other.pair_us);
        self.denied += other.denied;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn error(&mut self, e: tonic::Status) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{:?}: {}", e.code(), e.message()));
        }
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// One caller: Reserve then Commit until `end`, recording what starts at or after `measure_from`.
async fn caller(
    mut client: QuotaClient<Channel>,
    args: &'static Args,
    n: u32,
    measure_from: Instant,
    end: Instant,
) -> Stats {
    let mut stats = Stats::default();
    let subjects = u64::from(args.subjects.max(1));
    let callers = u64::from(args.connections) * u64::from(args.streams);
    let mut next_subject = u64::from(n) % subjects;
    let mut request = ReserveRequest {
        subject: format!("load-{next_subject}"),
        model: "gpt-4o".into(),
        prompt_tokens: Some(args.prompt_tokens),
        max_output_tokens: Some(args.max_output_tokens),
        ..Default::default()
    };
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let measured = t0 >= measure_from;
        if args.rotate_subjects {
            next_subject = (next_subject + callers) % subjects;
            request.subject = format!("load-{next_subject}");
        }
        let reserved = match client.reserve(request.clone()).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                stats.error(e);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let t1 = Instant::now();
        if reserved.decision != Decision::Allowed as i32 {
            if measured {
                stats.denied += 1;
                stats.reserve_us.push(micros(t1 - t0));
            }
            continue;
        }
        let commit = CommitRequest {
            reservation_id: reserved.reservation_id,
            prompt_tokens: args.prompt_tokens,
            completion_tokens: args.max_output_tokens / 2,
            usage_unknown: false,
        };
        match client.commit(commit).await {
            Ok(_) => {
                let t2 = Instant::now();
                if measured {
                    stats.reserve_us.push(micros(t1 - t0));
                    stats.commit_us.push(micros(t2 - t1));
                    stats.pair_us.push(micros(t2 - t0));
                }
            }
            Err(e) => stats.error(e),
        }
    }
    stats
}

/// CPU time (user + system, all threads) a process has used so far, from `/proc/<pid>/stat`:
/// the same source for this client and for the server, so the two figures compare. Linux only;
/// `None` elsewhere or for a process that has gone.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    // Then field 3 (state) is first, so utime (field 14) and stime (15) are the 12th and 13th.
    let mut rest = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    // SAFETY: sysconf reads a constant of the system and has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) as f64 / ticks as f64)
}

/// CPU microseconds per call between two readings, or "n/a".
fn per_call(before: Option<f64>, after: Option<f64>, calls: usize) -> String {
    match (before, after) {
        (Some(b), Some(a)) if calls > 0 => format!("{:.1} us", (a - b) * 1e6 / calls as f64),
        _ => "n/a".to_string(),
    }
}

/// The `p` quantile (0..=1) of sorted values, nearest rank.
fn quantile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1])
}

fn report(name: &str, values: &mut [u32], seconds: f64) {
    values.sort_unstable();
    println!(
        "{name:<8} {:>10} {:>12.0} {:>10.0} {:>10.0} {:>10.0} {:>10.0}",
        values.len(),
        values.len() as f64 / seconds,
        quantile(values, 0.50),
        quantile(values, 0.99),
        quantile(values, 0.999),
        values.last().copied().map_or(f64::NAN, f64::from),
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: &'static Args = Box::leak(Box::new(Args::parse()));
    let valid =
        args.duration > 0.0 && args.duration <= 600.0 && (0.0..=60.0).contains(&args.warmup);
    if !valid {
        return Err("--duration must be in (0, 600] and --warmup in [0, 60] seconds".into());
    }
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        channels.push(Channel::from_shared(args.target.clone())?.connect().await?);
    }

    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let mut callers = JoinSet::new();
    let mut n = 0u32;
    for channel in &channels {
        for _ in 0..args.streams {
            let client = QuotaClient::new(channel.clone());
            callers.spawn(caller(client, args, n, measure_from, end));
            n += 1;
        }
    }
    let server_pid = args.server_pid.map(|p| p.to_string());
    tokio::time::sleep_until(measure_from.into()).await;
    let client_cpu = cpu_seconds("self");
    let server_cpu = server_pid.as_deref().and_then(cpu_seconds);
    let mut stats = Stats::default();
    while let Some(s) = callers.join_next().await {
        stats.merge(s?);
    }
    let seconds = (Instant::now() - measure_from).as_secs_f64();
    let client_cpu = (client_cpu, cpu_seconds("self"));
    let server_cpu = (server_cpu, server_pid.as_deref().and_then(cpu_seconds));
    let calls = stats.reserve_us.len() + stats.commit_us.len();

    println!(
        "target {}  {} connections x {} streams = {} callers  measured {:.2} s (after {:.1} s warm-up)",
        args.target,
        args.connections,
        args.streams,
        n,
        seconds,
        args.warmup
    );
    println!(
        "{:<8} {:>10} {:>12} {:>10} {:>10} {:>10} {:>10}",
        "call", "count", "per second", "p50 us", "p99 us", "p99.9 us", "max us"
    );
    let pairs = stats.pair_us.len();
    report("Reserve", &mut stats.reserve_us, seconds);
    report("Commit", &mut stats.commit_us, seconds);
    report("pair", &mut stats.pair_us, seconds);
    println!(
        "calls/s (Reserve + Commit): {:.0}   denied: {}   errors: {}",
        (2 * pairs) as f64 / seconds,
        stats.denied,
        stats.errors
    );
    println!(
        "cpu per call: client {}, server {} ({calls} calls measured; /proc resolution 1 tick)",
        per_call(client_cpu.0, client_cpu.1, calls),
        match server_pid {
            Some(_) => per_call(server_cpu.0, server_cpu.1, calls),
            None => "n/a (no --server-pid)".to_string(),
        },
    );
    if let Some(e) = stats.first_error {
        println!("first error: {e}");
    }
    if stats.denied > 0 && pairs == 0 {
        println!(
            "every Reserve was denied: start the server with --policy examples/load-policy.toml"
        );
    }
    Ok(())
}
