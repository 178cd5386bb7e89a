//! Operating the real `tollgate` binary: Prometheus metrics after a scripted workload, graceful
//! shutdown on SIGTERM (under load, with a call in flight, and bounded by --shutdown-timeout),
//! the health-only listener, JSON logs that never carry a prompt, and the command line (help
//! text, `tollgate usage`).
//!
//! Everything runs on 127.0.0.1 with port 0 (the metrics port, which the binary does not
//! report, is a free port picked here, retried if taken meanwhile). The binary runs on the real
//! clock: holds live an hour, so none expires during a test; the day-bound figures assume the
//! test does not straddle a UTC midnight (the durability tests guard that; a workload of a
//! second here is not worth it).
//!
//! The shutdown tests measure time, so they run one at a time (`SERIAL`), and every bound they
//! assert has seconds of margin over what was measured on the project's 2-core machine.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use tollgate::proto::Decision;
use tollgate::server::validate::DEFAULT_MAX_PROMPT_BYTES;

/// The shutdown tests measure exit times: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Time for any one call that must not hang.
const CALL_LIMIT: Duration = Duration::from_secs(10);
/// Once health says NOT_SERVING, how soon new calls must be refused.
const REFUSED_WITHIN: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// Helpers

/// One sample of the Prometheus text exposition format.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parse the text exposition format (version 0.0.4): comments and blank lines skipped, label
/// values unescaped, an optional timestamp after the value ignored.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let name = line[..name_end].to_string();
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(after) = rest.strip_prefix('{') {
            let mut chars = after.char_indices().peekable();
            let end = loop {
                // Skip separators.
                while let Some(&(_, c)) = chars.peek() {
                    if c == ',' || c.is_whitespace() {
                        chars.next();
                    } else {
                        break;
                    }
                }
                let Some((i, c)) = chars.next() else {
                    panic!("unclosed labels in {line:?}")
                };
                if c == '}' {
                    break i + 1;
                }
                let mut key = String::from(c);
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                assert_eq!(
                    chars.next().map(|(_, c)| c),
                    Some('"'),
                    "label {key} of {line:?}"
                );
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c)) => value.push(c),
                            None => panic!("bad escape in {line:?}"),
                        },
                        Some((_, '"')) => break,
                        Some((_, c)) => value.push(c),
                        None => panic!("unterminated label value in {line:?}"),
                    }
                }
                assert!(
                    labels.insert(key.trim().to_string(), value).is_none(),
                    "a label twice in {line:?}"
                );
            };
            rest = &after[end..];
        }
        let value = rest
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value {v:?} in {line:?}")),
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

/// The samples of one scrape.
struct Metrics(Vec<Sample>, String);

impl Metrics {
    fn scrape(addr: SocketAddr) -> Self {
        let text = scrape(addr);
        Self(parse_exposition(&text), text)
    }

    /// The value of `name` with exactly the labels `labels` (in any order), if present.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<&Sample> = self
            .0
            .iter()
            .filter(|s| s.name == name && s.labels == want)
            .collect();
        assert!(found.len() <= 1, "{name}{labels:?} twice: {found:?}");
        found.first().map(|s| s.value)
    }

    /// The value of `name` with exactly `labels`, which must be present.
    #[track_caller]
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{}", self.1))
    }

    /// Every sample named `name`.
    fn all(&self, name: &str) -> Vec<&Sample> {
        self.0.iter().filter(|s| s.name == name).collect()
    }
}

/// A call refused by a server shutting down (or gone): UNAVAILABLE when the connection cannot
/// be made or the stream was refused; CANCELLED ("connection closed") when the call was queued
/// on a connection that closed before it was sent. Neither reached the service.
fn refused(e: &Status) -> bool {
    // UNKNOWN: a call caught on a connection as it closes fails with tonic's "transport error".
    // INTERNAL "h2 protocol error" with GOAWAY (NO_ERROR): a call sent just after the server's
    // GOAWAY, which tonic's client reports as a protocol error. Neither was answered, so
    // nothing was acknowledged; the restart check proves no more.
    matches!(
        e.code(),
        Code::Unavailable | Code::Cancelled | Code::Unknown
    ) || (e.code() == Code::Internal && e.message().starts_with("h2 protocol error"))
}

/// A model's price in µUSD per million (input, output) tokens.
type Price = (u64, u64);
const GPT_4O: Price = (2_500_000, 10_000_000);
const GPT_4O_MINI: Price = (150_000, 600_000);
const GPT_4_1: Price = (2_000_000, 8_000_000);

/// One rounding up per request, in whole micro-dollars.
fn cost(price: Price, prompt: u64, output: u64) -> u64 {
    (prompt * price.0 + output * price.1).div_ceil(1_000_000)
}

/// `tokens` bytes of pseudo-random lowercase letters without a single space: one unbroken run,
/// the slowest text to count (seconds for 4 MiB), to keep a Reserve in flight.
fn unbroken_letters(bytes: usize) -> String {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = String::with_capacity(bytes);
    for _ in 0..bytes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.push(char::from(b'a' + (state % 26) as u8));
    }
    out
}

/// `POLICY_LOAD` with a model, [`SLOW_COUNT_MODEL`], counted with r50k_base: tiktoken-rs,
/// which takes seconds on one unbroken 4 MiB run, so a call stays in flight while it is counted
/// (o200k_base and cl100k_base, counted with bpe-openai, take well under one).
fn policy_with_slow_counting() -> String {
    format!("{POLICY_LOAD}\n[models.\"{SLOW_COUNT_MODEL}\"]\nencoding = \"r50k_base\"\n")
}
const SLOW_COUNT_MODEL: &str = "slow-count";

/// A channel to `addr` (no connection is made until the first call).
fn lazy_channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy()
}

async fn health_check(addr: SocketAddr, service: &str) -> Result<ServingStatus, Status> {
    let mut h = HealthClient::new(lazy_channel(addr));
    let r = tokio::time::timeout(
        CALL_LIMIT,
        h.check(HealthCheckRequest {
            service: service.to_string(),
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("health Check of {service:?} on {addr} hung"))?;
    Ok(ServingStatus::try_from(r.into_inner().status).expect("a known status"))
}

/// A health Watch of `service` on `addr`, after its first answer (which must be SERVING).
async fn watch_serving(
    addr: SocketAddr,
    service: &str,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let mut h = HealthClient::new(lazy_channel(addr));
    let mut stream = h
        .watch(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .expect("health Watch")
        .into_inner();
    let first = stream.message().await.expect("Watch").expect("a status");
    assert_eq!(
        ServingStatus::try_from(first.status),
        Ok(ServingStatus::Serving),
        "{service:?} on {addr}"
    );
    stream
}

/// The next status a Watch reports (within CALL_LIMIT).
async fn next_status(
    stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> ServingStatus {
    let m = tokio::time::timeout(CALL_LIMIT, stream.message())
        .await
        .expect("the Watch reported nothing")
        .expect("Watch")
        .expect("the Watch ended without a status");
    ServingStatus::try_from(m.status).expect("a known status")
}

/// Wait (off the runtime) for the process to exit, at most `limit`; its status and when it was
/// seen, or a panic with its log.
async fn wait_exit(mut p: Process, limit: Duration) -> (ExitStatus, Instant, Process) {
    tokio::task::spawn_blocking(move || {
        let status = p.wait_exit(limit);
        let at = Instant::now();
        match status {
            Some(s) => (s, at, p),
            None => panic!(
                "tollgate did not exit within {limit:?} of the wait; log:\n{}",
                p.log_text()
            ),
        }
    })
    .await
    .expect("the waiter")
}

/// Parse one JSON log line.
fn json_line(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"))
}

/// The address the health-only listener bound, from its JSON log line.
async fn health_addr(p: &Process) -> SocketAddr {
    let line = p
        .log_line_until("the health-only listener", |l| l.contains("health alone"))
        .await;
    json_line(&line)["addr"]
        .as_str()
        .unwrap_or_else(|| panic!("no addr in {line}"))
        .parse()
        .expect("an address")
}

// ---------------------------------------------------------------------------------------------
// 1. Metrics

/// Small budgets so denials happen, prices so money moves, and a tier that downgrades.
const METRICS_POLICY: &str = r#"
default_tier = "basic"

[tiers.basic]
tokens_per_day = 1000
hold_seconds = 3600

[tiers.pro]
models = ["gpt-4o", "gpt-4o-mini"]
tokens_per_day = 100000
hold_seconds = 3600
downgrade = { model = "gpt-4o-mini", tokens_per_day = 100000 }

[models."gpt-4o"]
input_usd_per_million = 2.5
output_usd_per_million = 10.0

[models."gpt-4o-mini"]
input_usd_per_million = 0.15
output_usd_per_million = 0.6

[models."gpt-4.1"]
input_usd_per_million = 2.0
output_usd_per_million = 8.0
"#;

/// A scripted workload, then one scrape: every decision, token and micro-dollar the answers
/// imply is in the counters exactly (replays and dry runs count nothing), the open-holds gauge
/// follows, and the RPC histogram counted every call by method and code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_a_scripted_workload_did() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", METRICS_POLICY);
    let (server, metrics) = start_with_metrics(
        Serve::new(&dir.path().join("data"))
            .policy(&policy)
            .log_to(&dir.path().join("stderr.log")),
    );

    // Before any call: the sweeper's gauges are there, no decision yet.
    let before = Metrics::scrape(metrics);
    assert!(
        before.all("tollgate_decisions_total").is_empty(),
        "{}",
        before.1
    );

    let mut q = server.quota().await;
    let set = server
        .admin()
        .await
        .set_subject(set_subject_req("pat", "pro"))
        .await
        .expect("SetSubject")
        .into_inner();
    assert_eq!(set.tier, "pro");

    // ann, basic tier: 1,000 tokens a day on gpt-4o.
    let r1 = rsv(&mut q, reserve("ann", 100, 200)).await;
    let r2 = rsv(&mut q, reserve("ann", 200, 100)).await;
    let r3 = rsv(&mut q, reserve("ann", 100, 100)).await;
    for (r, held) in [(&r1, 300), (&r2, 300), (&r3, 200)] {
        assert_eq!(decision(r), Decision::Allowed, "{r:?}");
        assert_eq!(
            (r.reserved_tokens, r.tier.as_str()),
            (held, "basic"),
            "{r:?}"
        );
    }
    // 800 held: 300 more is over the day.
    let d1 = rsv(&mut q, reserve("ann", 300, 0)).await;
    assert_eq!(decision(&d1), Decision::Denied, "{d1:?}");
    assert_eq!(d1.denied_by, "tokens_per_day");
    assert_eq!(d1.saved_micro_usd, cost(GPT_4O, 300, 0));

    // Committed below the hold, committed exactly, refunded.
    let c1 = commit(&mut q, &r1.reservation_id, 100, 50).await;
    assert_eq!((c1.charged_tokens, c1.released_tokens), (150, 150));
    assert_eq!(c1.charged_micro_usd, cost(GPT_4O, 100, 50));
    let c2 = commit(&mut q, &r2.reservation_id, 200, 100).await;
    assert_eq!((c2.charged_tokens, c2.released_tokens), (300, 0));
    assert_eq!(c2.charged_micro_usd, cost(GPT_4O, 200, 100));
    let f3 = q
        .refund(refund_req(&r3.reservation_id))
        .await
        .expect("Refund")
        .into_inner();
    assert_eq!(f3.released_tokens, 200);

    // 450 used: 600 more is over the day; 500 fits and stays open.
    let d2 = rsv(&mut q, reserve("ann", 600, 0)).await;
    assert_eq!(
        (decision(&d2), d2.denied_by.as_str()),
        (Decision::Denied, "tokens_per_day")
    );
    assert_eq!(d2.saved_micro_usd, cost(GPT_4O, 600, 0));
    let r6 = rsv(&mut q, reserve("ann", 500, 0)).await;
    assert_eq!(
        (decision(&r6), r6.reserved_tokens),
        (Decision::Allowed, 500)
    );

    // Counted nowhere: a replayed Commit, a dry run (denied), an invalid Reserve.
    let again = commit(&mut q, &r1.reservation_id, 100, 50).await;
    assert_eq!((again.charged_tokens, again.released_tokens), (150, 150));
    let mut dry = reserve("ann", 600, 0);
    dry.dry_run = true;
    let dry = rsv(&mut q, dry).await;
    assert_eq!(decision(&dry), Decision::Denied, "{dry:?}");
    let invalid = q.reserve(reserve("", 1, 1)).await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");

    // pat, pro tier: gpt-4.1 is not in the list, so it is granted on gpt-4o-mini.
    let g1 = rsv(&mut q, on("gpt-4.1", "pat", 1_000, 100)).await;
    assert_eq!(decision(&g1), Decision::Downgraded, "{g1:?}");
    assert_eq!(
        (g1.model.as_str(), g1.reserved_tokens),
        ("gpt-4o-mini", 1_100)
    );
    let downgrade_saved = cost(GPT_4_1, 1_000, 100) - cost(GPT_4O_MINI, 1_000, 100);
    assert_eq!(g1.saved_micro_usd, downgrade_saved);
    let cg = commit(&mut q, &g1.reservation_id, 1_000, 50).await;
    assert_eq!((cg.charged_tokens, cg.released_tokens), (1_050, 50));
    assert_eq!(cg.charged_micro_usd, cost(GPT_4O_MINI, 1_000, 50));
    let p2 = rsv(&mut q, on("gpt-4o", "pat", 100, 100)).await;
    assert_eq!(
        (decision(&p2), p2.reserved_tokens),
        (Decision::Allowed, 200)
    );

    // What the answers imply.
    let held = 300 + 300 + 200 + 500 + 1_100 + 200;
    let charged = 150 + 300 + 1_050;
    let released =
        c1.released_tokens + c2.released_tokens + f3.released_tokens + cg.released_tokens;
    let spent = c1.charged_micro_usd + c2.charged_micro_usd + cg.charged_micro_usd;
    let saved = d1.saved_micro_usd + d2.saved_micro_usd + downgrade_saved;
    assert_eq!((spent, saved), (750 + 1_500 + 180, 750 + 1_500 + 2_590));
    let reserves_ok = 9; // r1 r2 r3 d1 d2 r6 dry g1 p2
    let open = 2; // r6, p2

    // The gauge is set by the sweeper every 100 ms.
    let start = Instant::now();
    let m = loop {
        let m = Metrics::scrape(metrics);
        // Both gauges of one sweeper pass after the workload: an earlier pass may already
        // have seen `open` holds open, with fewer records.
        if m.get("tollgate_open_holds", &[]) == Some(open as f64)
            && m.get("tollgate_reservations", &[]) == Some(6.0)
        {
            break m;
        }
        assert!(
            start.elapsed() < POLL_LIMIT,
            "tollgate_open_holds never became {open} with 6 records:\n{}",
            m.1
        );
        tokio::time::sleep(POLL_STEP).await;
    };
    let d = "tollgate_decisions_total";
    let decisions = [
        (("basic", "ALLOWED", ""), 4.0),
        (("basic", "DENIED", "tokens_per_day"), 2.0),
        (("pro", "DOWNGRADED", ""), 1.0),
        (("pro", "ALLOWED", ""), 1.0),
    ];
    for ((tier, decision, denied_by), n) in decisions {
        assert_eq!(
            m.value(
                d,
                &[
                    ("tier", tier),
                    ("decision", decision),
                    ("denied_by", denied_by)
                ]
            ),
            n,
            "{tier} {decision} {denied_by:?}:\n{}",
            m.1
        );
    }
    assert_eq!(m.all(d).len(), decisions.len(), "{}", m.1);
    assert_eq!(m.value("tollgate_tokens_held_total", &[]), held as f64);
    assert_eq!(
        m.value("tollgate_tokens_charged_total", &[]),
        charged as f64
    );
    assert_eq!(
        m.value("tollgate_tokens_released_total", &[]),
        released as f64
    );
    assert_eq!(m.value("tollgate_spent_micro_usd_total", &[]), spent as f64);
    assert_eq!(m.value("tollgate_saved_micro_usd_total", &[]), saved as f64);
    assert_eq!(m.get("tollgate_holds_expired_total", &[]), None, "{}", m.1);
    assert_eq!(m.value("tollgate_open_holds", &[]), open as f64);
    // Live records: the 6 reservations made (settled ones are kept for replays).
    assert_eq!(m.value("tollgate_reservations", &[]), 6.0, "{}", m.1);

    // RPC latency: one observation per call, by method and code.
    let rpc = "tollgate_rpc_duration_seconds";
    let count = |method: &str, code: &str| {
        m.value(
            &format!("{rpc}_count"),
            &[("method", method), ("code", code)],
        )
    };
    assert_eq!(count("Reserve", "OK"), reserves_ok as f64);
    assert_eq!(count("Reserve", "INVALID_ARGUMENT"), 1.0);
    assert_eq!(count("Commit", "OK"), 4.0);
    assert_eq!(count("Refund", "OK"), 1.0);
    assert_eq!(count("SetSubject", "OK"), 1.0);
    // A histogram: cumulative buckets ending in +Inf = count, and a positive sum.
    let buckets: Vec<&Sample> = m
        .all(&format!("{rpc}_bucket"))
        .into_iter()
        .filter(|s| s.labels["method"] == "Reserve" && s.labels["code"] == "OK")
        .collect();
    assert!(buckets.len() > 2, "{}", m.1);
    let mut les: Vec<(f64, f64)> = buckets
        .iter()
        .map(|s| {
            let le = &s.labels["le"];
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, s.value)
        })
        .collect();
    les.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(les.windows(2).all(|w| w[0].1 <= w[1].1), "{les:?}");
    assert_eq!(les.last().unwrap(), &(f64::INFINITY, reserves_ok as f64));
    assert!(
        m.value(
            &format!("{rpc}_sum"),
            &[("method", "Reserve"), ("code", "OK")]
        ) > 0.0
    );
    // Strict durability: each decision group was flushed, and timed.
    let flushes = m.value("tollgate_store_flush_duration_seconds_count", &[]);
    assert!(flushes > 0.0, "{}", m.1);
    // Metric names only: no subject is ever a label.
    assert!(!m.1.contains("ann") && !m.1.contains("pat"), "{}", m.1);

    // A later scrape after more work moves only what that work moved.
    let _ = rsv(&mut q, reserve("ann", 1, 0)).await;
    let m2 = Metrics::scrape(metrics);
    assert_eq!(
        m2.value(
            d,
            &[
                ("tier", "basic"),
                ("decision", "ALLOWED"),
                ("denied_by", "")
            ]
        ),
        5.0
    );
    assert_eq!(
        m2.value("tollgate_tokens_held_total", &[]),
        (held + 1) as f64
    );
    assert_eq!(
        m2.value("tollgate_tokens_charged_total", &[]),
        charged as f64
    );
    server.kill9();
}

// ---------------------------------------------------------------------------------------------
// 2. Graceful shutdown

const LOAD_TASKS: usize = 8;
const LOAD_SUBJECTS: usize = 4;
/// SIGTERM comes this long after the load starts.
const SIGNAL_AFTER: Duration = Duration::from_millis(1_000);
/// The default shutdown timeout (what a load test's exit is bounded by), plus a margin.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
const EXIT_MARGIN: Duration = Duration::from_secs(5);
const PROMPT: u64 = 10;
const OUTPUT: u64 = 20;
const HELD: u64 = PROMPT + OUTPUT;
/// What a committing task reports: 10 prompt + 5 completion.
const CHARGED: u64 = 15;

/// What one load task saw.
#[derive(Debug, Default)]
struct TaskLog {
    subject: String,
    commits: bool,
    /// Ids whose Reserve was acknowledged.
    reserved: Vec<String>,
    /// Ids whose Commit was acknowledged.
    committed: Vec<String>,
    /// Acknowledged before the signal was sent.
    before_signal: usize,
    /// The error that stopped the task.
    error: Option<Status>,
    /// How long after the signal the error came.
    error_after_signal: Option<Duration>,
}

async fn load_task(
    url: String,
    n: usize,
    signalled: Arc<std::sync::Mutex<Option<Instant>>>,
) -> TaskLog {
    let mut log = TaskLog {
        subject: format!("load-{}", n % LOAD_SUBJECTS),
        commits: n % 2 == 0,
        ..TaskLog::default()
    };
    let mut q = Quota::connect(url).await.expect("connect");
    let acked = |log: &mut TaskLog| {
        if signalled.lock().unwrap().is_none() {
            log.before_signal += 1;
        }
    };
    let fail = |log: &mut TaskLog, e: Status| {
        log.error_after_signal = signalled.lock().unwrap().map(|t| t.elapsed());
        log.error = Some(e);
    };
    loop {
        let r = tokio::time::timeout(CALL_LIMIT, q.reserve(reserve(&log.subject, PROMPT, OUTPUT)))
            .await
            .unwrap_or_else(|_| panic!("task {n}: a Reserve hung for {CALL_LIMIT:?}"));
        let id = match r {
            Ok(r) => {
                let r = r.into_inner();
                assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
                log.reserved.push(r.reservation_id.clone());
                acked(&mut log);
                r.reservation_id
            }
            Err(e) => {
                fail(&mut log, e);
                return log;
            }
        };
        if log.commits {
            let c = tokio::time::timeout(
                CALL_LIMIT,
                q.commit(commit_req(&id, PROMPT, CHARGED - PROMPT)),
            )
            .await
            .unwrap_or_else(|_| panic!("task {n}: a Commit hung for {CALL_LIMIT:?}"));
            match c {
                Ok(c) => {
                    assert_eq!(c.into_inner().charged_tokens, CHARGED);
                    log.committed.push(id);
                    acked(&mut log);
                }
                Err(e) => {
                    fail(&mut log, e);
                    return log;
                }
            }
        }
    }
}

/// SIGTERM in the middle of 8 clients doing Reserve (+ Commit for half): the process exits 0
/// well within the shutdown timeout, every client's next call is refused (see `refused`) instead
/// of hanging, and after a restart on the same data directory every acknowledged Reserve and
/// Commit is there, and nothing else: a graceful stop, unlike `kill -9`, leaves no call whose
/// fate is unknown (each was either answered or refused before it ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_exits_0_and_keeps_every_acknowledged_operation() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", POLICY_LOAD);
    let data = dir.path().join("data");
    let serve = || {
        Serve::new(&data)
            .policy(&policy)
            .args(["--durability", "strict"])
            .env("RUST_LOG", "info")
            .log_to(&dir.path().join("stderr.log"))
    };
    let server = serve().start();

    let signalled = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let mut tasks = JoinSet::new();
    for n in 0..LOAD_TASKS {
        tasks.spawn(load_task(server.url(), n, signalled.clone()));
    }
    tokio::time::sleep(SIGNAL_AFTER).await;
    let sent = Instant::now();
    *signalled.lock().unwrap() = Some(sent);
    server.sigterm();
    let (status, exited, server) = wait_exit(server, SHUTDOWN_TIMEOUT + EXIT_MARGIN).await;
    let exit_took = exited - sent;
    let mut logs = Vec::new();
    while let Some(log) = tasks.join_next().await {
        logs.push(log.expect("load task"));
    }
    let log_text = server.log_text();
    assert_eq!(status.code(), Some(0), "{status:?}; log:\n{log_text}");
    assert!(
        exit_took < SHUTDOWN_TIMEOUT,
        "SIGTERM to exit took {exit_took:?} with only short calls in flight"
    );
    for want in [
        "shutting down: refusing new calls, finishing in-flight ones",
        "store flushed",
        "stopped",
    ] {
        assert!(
            log_text.contains(want),
            "no {want:?} in the log:\n{log_text}"
        );
    }
    assert!(!log_text.contains("shutdown timeout"), "{log_text}");

    // Every task was stopped by the shutdown, soon, and as a refusal.
    for (n, log) in logs.iter().enumerate() {
        let e = log
            .error
            .as_ref()
            .expect("each task runs until a call fails");
        assert!(refused(e), "task {n}: {e:?}");
        let after = log
            .error_after_signal
            .unwrap_or_else(|| panic!("task {n} failed before the signal: {e:?}"));
        assert!(
            after < exit_took + EXIT_MARGIN,
            "task {n} failed {after:?} after the signal"
        );
    }
    // And a call now is refused at once.
    let start = Instant::now();
    let e = tokio::time::timeout(CALL_LIMIT, async {
        match Quota::connect(server.url()).await {
            Ok(mut q) => q.reserve(reserve("late", 1, 1)).await.map(drop),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    })
    .await
    .expect("a call after the exit hung")
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );

    let reserves: usize = logs.iter().map(|l| l.reserved.len()).sum();
    let commits: usize = logs.iter().map(|l| l.committed.len()).sum();
    let before: usize = logs.iter().map(|l| l.before_signal).sum();
    assert!(reserves > 0, "nothing was acknowledged");
    eprintln!(
        "graceful load: {reserves} Reserves + {commits} Commits acknowledged ({before} before \
         SIGTERM, {} while draining); SIGTERM to exit {exit_took:?}; errors: {:?}",
        reserves + commits - before,
        logs.iter()
            .map(|l| l.error.as_ref().map(|e| e.message().to_string()))
            .collect::<Vec<_>>()
    );
    drop(server);

    // Restart on the same data directory.
    let server = serve().start();
    let mut q = server.quota().await;
    for s in 0..LOAD_SUBJECTS {
        let subject = format!("load-{s}");
        let mine: Vec<&TaskLog> = logs.iter().filter(|l| l.subject == subject).collect();
        let reserved: u64 = mine.iter().map(|l| l.reserved.len() as u64).sum();
        let committed: u64 = mine.iter().map(|l| l.committed.len() as u64).sum();
        let open = reserved - committed;
        let u = usage(&mut q, &subject).await;
        assert_eq!(
            (u64::from(u.open_holds), u.held_tokens),
            (open, open * HELD),
            "{subject}: {reserved} Reserves and {committed} Commits acknowledged: {u:?}"
        );
        assert_eq!(u.requests, reserved, "{subject}: {u:?}");
        assert_eq!(u.used_tokens, committed * CHARGED, "{subject}: {u:?}");
    }

    // Every acknowledged Commit replays its settlement; every other acknowledged hold is still
    // open and can be refunded whole.
    let mut checks: Vec<(bool, String)> = Vec::new();
    for log in &logs {
        for id in &log.reserved {
            checks.push((log.committed.contains(id), id.clone()));
        }
    }
    let checks = Arc::new(std::sync::Mutex::new(checks));
    let mut workers = JoinSet::new();
    for _ in 0..4 {
        let checks = checks.clone();
        let mut q = q.clone();
        workers.spawn(async move {
            loop {
                let next = checks.lock().unwrap().pop();
                match next {
                    None => break,
                    Some((true, id)) => {
                        let c = q
                            .commit(commit_req(&id, PROMPT, CHARGED - PROMPT))
                            .await
                            .unwrap_or_else(|e| panic!("Commit {id} after restart: {e:?}"))
                            .into_inner();
                        assert_eq!(
                            (c.charged_tokens, c.released_tokens),
                            (CHARGED, HELD - CHARGED),
                            "{id}"
                        );
                    }
                    Some((false, id)) => {
                        let f = q
                            .refund(refund_req(&id))
                            .await
                            .unwrap_or_else(|e| panic!("Refund {id} after restart: {e:?}"))
                            .into_inner();
                        assert_eq!(f.released_tokens, HELD, "{id}");
                    }
                }
            }
        });
    }
    while let Some(w) = workers.join_next().await {
        w.expect("check worker");
    }
    for s in 0..LOAD_SUBJECTS {
        let u = usage(&mut q, &format!("load-{s}")).await;
        assert_eq!((u.open_holds, u.held_tokens), (0, 0), "load-{s}: {u:?}");
    }
    server.kill9();
}

/// While a call is still in flight after SIGTERM (a 4 MiB prompt being counted): health
/// Watches on both listeners report NOT_SERVING, a new call on a new or an open connection
/// fails at once with UNAVAILABLE, a new health Check is refused; the call in flight is answered
/// in full, the process then exits 0, and its hold is there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn during_shutdown_health_is_not_serving_and_new_calls_fail_while_one_finishes() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", &policy_with_slow_counting());
    let data = dir.path().join("data");
    let serve = || {
        Serve::new(&data)
            .policy(&policy)
            .args(["--health-listen", "127.0.0.1:0", "--shutdown-timeout", "60"])
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .log_to(&dir.path().join("stderr.log"))
    };
    let server = serve().start();
    let health = health_addr(&server).await;

    let mut watch_main = watch_serving(server.addr, "").await;
    let mut watch_quota = watch_serving(server.addr, "tollgate.v1.Quota").await;
    let mut watch_health = watch_serving(health, "").await;
    // A connection opened (and used) before the signal.
    let mut idle = server.quota().await;
    usage(&mut idle, "nobody").await;

    let big = unbroken_letters(DEFAULT_MAX_PROMPT_BYTES);
    let mut big_q = server.quota().await;
    let big_call = tokio::spawn(async move {
        let r = big_q
            .reserve(reserve_text("big", SLOW_COUNT_MODEL, &big, Some(0)))
            .await;
        (r, Instant::now())
    });
    // Long enough for 4 MiB to reach the server over loopback; counting it takes seconds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !big_call.is_finished(),
        "the big Reserve was answered before the signal"
    );

    let sent = Instant::now();
    server.sigterm();
    assert_eq!(
        next_status(&mut watch_main).await,
        ServingStatus::NotServing
    );
    assert_eq!(
        next_status(&mut watch_quota).await,
        ServingStatus::NotServing
    );
    assert_eq!(
        next_status(&mut watch_health).await,
        ServingStatus::NotServing
    );
    let not_serving_after = sent.elapsed();

    // New calls are refused at once: on the open connection, on a new one, and health on both
    // ports. NOT_SERVING is published a moment before the listeners close and GOAWAY goes out,
    // so a call in that moment may still be admitted (it is then answered, and durable): each
    // probe repeats until refused, which must come within REFUSED_WITHIN and never hang.
    let start = Instant::now();
    let mut late = 0; // "late" Reserves admitted after NOT_SERVING was seen.
    let mut fresh = tollgate::proto::quota_client::QuotaClient::new(lazy_channel(server.addr));
    for q in [&mut idle, &mut fresh] {
        loop {
            let r = tokio::time::timeout(CALL_LIMIT, q.reserve(reserve("late", 1, 1)))
                .await
                .expect("a Reserve hung during shutdown");
            match r {
                Ok(_) => late += 1,
                Err(e) => {
                    assert!(refused(&e), "{e:?}");
                    break;
                }
            }
            assert!(
                start.elapsed() < REFUSED_WITHIN,
                "Reserves still admitted {:?} after NOT_SERVING",
                start.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for addr in [server.addr, health] {
        loop {
            match health_check(addr, "").await {
                // Answered in that moment: it must say so.
                Ok(status) => assert_eq!(status, ServingStatus::NotServing, "{addr}"),
                Err(e) => {
                    assert!(refused(&e), "Check on {addr}: {e:?}");
                    break;
                }
            }
            assert!(
                start.elapsed() < REFUSED_WITHIN,
                "health still answering on {addr} {:?} after NOT_SERVING",
                start.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let refusals_took = start.elapsed();
    assert!(
        !big_call.is_finished(),
        "the big Reserve was answered before the checks were done: they did not run during \
         the shutdown"
    );
    assert!(
        server
            .log_text()
            .contains("shutting down: refusing new calls"),
        "{}",
        server.log_text()
    );
    // A Watch left open would itself be a call in flight: let them go.
    drop((watch_main, watch_quota, watch_health));

    let (r, answered) = big_call.await.unwrap();
    let r = r
        .expect("the Reserve in flight at SIGTERM is answered")
        .into_inner();
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    assert!(r.prompt_tokens > 1_000_000, "{}", r.prompt_tokens);
    let (status, exited, server) = wait_exit(server, Duration::from_secs(60)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?}; log:\n{}",
        server.log_text()
    );
    eprintln!(
        "in-flight shutdown: NOT_SERVING {not_serving_after:?} after SIGTERM, refusals took \
         {refusals_took:?} ({late} late Reserves admitted first), the big Reserve answered \
         {:?} and the process exited {:?} after it",
        answered - sent,
        exited - sent
    );
    assert!(
        !server.log_text().contains("shutdown timeout"),
        "{}",
        server.log_text()
    );
    drop(server);

    let server = serve().start();
    let mut q = server.quota().await;
    let u = usage(&mut q, "big").await;
    assert_eq!(
        (u.open_holds, u.held_tokens),
        (1, r.reserved_tokens),
        "{u:?}"
    );
    let f = q
        .refund(refund_req(&r.reservation_id))
        .await
        .expect("Refund")
        .into_inner();
    assert_eq!(f.released_tokens, r.reserved_tokens);
    server.kill9();
}

/// A health Watch (a stream with no end of its own, as client-side load balancers keep open)
/// does not hold the shutdown: it reports NOT_SERVING and then ends, and the process exits 0
/// without waiting for the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_health_watch_sees_not_serving_then_ends_without_holding_the_shutdown() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", POLICY_LOAD);
    let server = Serve::new(&dir.path().join("data"))
        .policy(&policy)
        .args(["--shutdown-timeout", "30"])
        .env("RUST_LOG", "info")
        .log_to(&dir.path().join("stderr.log"))
        .start();
    let mut watch = watch_serving(server.addr, "").await;
    server.sigterm();
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    let end = tokio::time::timeout(CALL_LIMIT, watch.message())
        .await
        .expect("the Watch neither ended nor reported");
    assert!(
        !matches!(end, Ok(Some(_))),
        "the Watch goes on after NOT_SERVING: {end:?}"
    );
    let (status, _, server) = wait_exit(server, Duration::from_secs(25)).await;
    let log = server.log_text();
    assert_eq!(status.code(), Some(0), "{status:?}; log:\n{log}");
    assert!(
        !log.contains("calls still in flight are cut"),
        "the Watch held the drain until the timeout:\n{log}"
    );
    assert!(log.contains("store flushed"), "{log}");
}

/// `--shutdown-timeout 1` bounds the exit while prompts are still being counted: the process
/// exits 0 about a second after SIGTERM, saying it cut calls, and what it acknowledged before
/// is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_timeout_bounds_the_exit_with_calls_still_in_flight() {
    let _serial = SERIAL.lock().await;
    let timeout = Duration::from_secs(1);
    // Measured: 1.0 s; the margin is for a loaded machine.
    let bound = timeout + Duration::from_secs(2);
    for case in ["counting"] {
        let dir = tempfile::tempdir().unwrap();
        let policy = write_file(dir.path(), "policy.toml", &policy_with_slow_counting());
        let data = dir.path().join("data");
        let serve = || {
            Serve::new(&data)
                .policy(&policy)
                .args(["--shutdown-timeout", "1"])
                .env("RUST_LOG", "info")
                .log_to(&dir.path().join("stderr.log"))
        };
        let server = serve().start();
        let mut q = server.quota().await;
        let kept = rsv(&mut q, reserve("kept", 7, 8)).await;
        assert_eq!(decision(&kept), Decision::Allowed);

        let mut in_flight = Vec::new();
        // As many 4 MiB prompts as the machine counts at once, and more waiting.
        let big = Arc::new(unbroken_letters(DEFAULT_MAX_PROMPT_BYTES));
        for _ in 0..4 {
            let big = big.clone();
            let mut q = server.quota().await;
            in_flight.push(tokio::spawn(async move {
                q.reserve(reserve_text("big", SLOW_COUNT_MODEL, &big, Some(0)))
                    .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(in_flight.iter().all(|c| !c.is_finished()));

        let sent = Instant::now();
        server.sigterm();
        let (status, exited, server) = wait_exit(server, Duration::from_secs(30)).await;
        let took = exited - sent;
        let log = server.log_text();
        eprintln!("--shutdown-timeout 1 with a {case} in flight: SIGTERM to exit {took:?}");
        assert_eq!(status.code(), Some(0), "{case}: {status:?}; log:\n{log}");
        assert!(
            log.contains("shutdown timeout: calls still in flight are cut"),
            "{case}: {log}"
        );
        assert!(log.contains("store flushed"), "{case}: {log}");
        assert!(
            took >= timeout,
            "{case}: exited {took:?} after SIGTERM, before the timeout"
        );
        assert!(
            took < bound,
            "{case}: SIGTERM to exit took {took:?}, over {bound:?}; log:\n{log}"
        );
        for c in in_flight {
            let e = c.await.unwrap().expect_err("a call cut by the timeout");
            // The connection is closed under it: tonic reports a broken pipe as UNKNOWN.
            assert!(
                matches!(
                    e.code(),
                    Code::Unknown | Code::Unavailable | Code::Cancelled
                ),
                "{case}: {e:?}"
            );
        }
        drop(server);

        let server = serve().start();
        let mut q = server.quota().await;
        let u = usage(&mut q, "kept").await;
        assert_eq!((u.open_holds, u.held_tokens), (1, 15), "{case}: {u:?}");
        // The cut calls never got past counting.
        let u = usage(&mut q, "big").await;
        assert_eq!((u.open_holds, u.requests), (0, 0), "{case}: {u:?}");
        server.kill9();
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Health-only listener

/// `--health-listen`: grpc.health.v1 alone on its own port (SERVING for the server and each
/// service), and nothing else there (Quota calls are UNIMPLEMENTED); the main port still serves
/// both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_listener_serves_health_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(dir.path(), "policy.toml", POLICY_LOAD);
    let server = Serve::new(&dir.path().join("data"))
        .policy(&policy)
        .args(["--health-listen", "127.0.0.1:0", "--log-format", "json"])
        .env("RUST_LOG", "info")
        .log_to(&dir.path().join("stderr.log"))
        .start();
    let health = health_addr(&server).await;
    assert_ne!(health, server.addr);
    assert_eq!(health.ip(), server.addr.ip());

    for addr in [health, server.addr] {
        for service in ["", "tollgate.v1.Quota", "tollgate.v1.Admin"] {
            assert_eq!(
                health_check(addr, service).await.expect("Check"),
                ServingStatus::Serving,
                "{service:?} on {addr}"
            );
        }
        let e = health_check(addr, "no.such.Service").await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    }

    let mut on_health = tollgate::proto::quota_client::QuotaClient::new(lazy_channel(health));
    let e = on_health.reserve(reserve("alice", 1, 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    let e = on_health
        .get_usage(tollgate::proto::GetUsageRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    let e = admin_client(format!("http://{health}"))
        .await
        .get_subject(tollgate::proto::GetSubjectRequest {
            subject: "alice".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    // The same calls on the main port work.
    let mut q = server.quota().await;
    assert_eq!(
        decision(&rsv(&mut q, reserve("alice", 1, 1)).await),
        Decision::Allowed
    );

    server.sigterm();
    let (status, _, server) = wait_exit(server, SHUTDOWN_TIMEOUT + EXIT_MARGIN).await;
    assert_eq!(status.code(), Some(0), "{}", server.log_text());
}

// ---------------------------------------------------------------------------------------------
// 4. JSON logs

/// `--log-format json`: every stderr line is one JSON object; a denial is an INFO line
/// "reserve denied" with subject, tier and denied_by, an admitted Reserve a DEBUG line
/// "reserve decided"; the prompt text itself appears nowhere, even at RUST_LOG=debug (every
/// crate's debug output included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_decisions_and_never_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(
        dir.path(),
        "policy.toml",
        "default_tier = \"basic\"\n[tiers.basic]\ntokens_per_day = 40\nhold_seconds = 3600\n",
    );
    let server = Serve::new(&dir.path().join("data"))
        .policy(&policy)
        .args(["--log-format", "json"])
        .env("RUST_LOG", "debug")
        .log_to(&dir.path().join("stderr.log"))
        .start();
    let mut q = server.quota().await;
    // Distinctive words, each its own token run, so a leak of any part is visible.
    let allowed_secret = "zanzibarquokka allowed-prompt-7f3a91 please summarise my diary";
    let denied_secret = "xylophonewombat denied-prompt-c0ffee42 ".repeat(20);
    let r = rsv(
        &mut q,
        reserve_text("log-alice", "gpt-4o", allowed_secret, Some(0)),
    )
    .await;
    assert_eq!(decision(&r), Decision::Allowed, "{r:?}");
    let d = rsv(
        &mut q,
        reserve_text("log-alice", "gpt-4o", &denied_secret, Some(0)),
    )
    .await;
    assert_eq!(
        (decision(&d), d.denied_by.as_str()),
        (Decision::Denied, "tokens_per_day")
    );
    // CountTokens too: the text is counted, never logged.
    q.count_tokens(tollgate::proto::CountTokensRequest {
        model: "gpt-4o".into(),
        prompt: Some(allowed_secret.into()),
        messages: Vec::new(),
    })
    .await
    .expect("CountTokens");

    let line = server
        .log_line_until("the denial", |l| l.contains("reserve denied"))
        .await;
    let v = json_line(&line);
    assert_eq!(v["message"], "reserve denied", "{line}");
    assert_eq!(v["level"], "INFO", "{line}");
    assert_eq!(v["subject"], "log-alice", "{line}");
    assert_eq!(v["tier"], "basic", "{line}");
    assert_eq!(v["denied_by"], "tokens_per_day", "{line}");
    assert_eq!(v["prompt_tokens"], d.prompt_tokens, "{line}");
    assert!(
        v["timestamp"].is_string() && v["target"].is_string(),
        "{line}"
    );

    let line = server
        .log_line_until("the admission", |l| l.contains("reserve decided"))
        .await;
    let v = json_line(&line);
    assert_eq!(v["message"], "reserve decided", "{line}");
    assert_eq!(v["level"], "DEBUG", "{line}");
    assert_eq!(v["subject"], "log-alice", "{line}");
    assert_eq!(v["tier"], "basic", "{line}");
    assert_eq!(v["decision"], "ALLOWED", "{line}");
    assert_eq!(v["reserved_tokens"], r.reserved_tokens, "{line}");

    // Stop gracefully so every line is written, then read them all.
    server.sigterm();
    let (status, _, server) = wait_exit(server, SHUTDOWN_TIMEOUT + EXIT_MARGIN).await;
    assert_eq!(status.code(), Some(0));
    let text = server.log_text();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 5, "{text}");
    for line in &lines {
        let v = json_line(line);
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines.iter().any(|l| json_line(l)["message"] == "stopped"),
        "{text}"
    );
    assert!(
        lines.iter().any(|l| json_line(l)["level"] == "DEBUG"
            && !json_line(l)["target"]
                .as_str()
                .unwrap()
                .starts_with("tollgate")),
        "RUST_LOG=debug reaches the dependencies too"
    );
    for needle in [
        "zanzibarquokka",
        "7f3a91",
        "summarise my diary",
        "xylophonewombat",
        "c0ffee42",
    ] {
        assert!(
            !text.contains(needle),
            "the prompt leaked ({needle:?}) into:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. The command line

/// Run the binary with `args` (no TOLLGATE_* variables set) to its exit.
fn tollgate(args: &[&str]) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(args).env("NO_COLOR", "1").env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("TOLLGATE_") {
            cmd.env_remove(k);
        }
    }
    let out = run_to_exit(cmd, Duration::from_secs(30));
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every serve flag names its environment variable in the help (and --log-format, a global
/// flag, in the top-level help too).
#[test]
fn help_names_every_environment_variable() {
    let (status, top, _) = tollgate(&["--help"]);
    assert!(status.success());
    for want in [
        "serve",
        "usage",
        "check-policy",
        "count-tokens",
        "TOLLGATE_LOG_FORMAT",
    ] {
        assert!(top.contains(want), "no {want:?} in tollgate --help:\n{top}");
    }
    let (status, serve, _) = tollgate(&["serve", "--help"]);
    assert!(status.success());
    let flags = [
        ("--listen", "TOLLGATE_LISTEN"),
        ("--data-dir", "TOLLGATE_DATA_DIR"),
        ("--policy", "TOLLGATE_POLICY"),
        ("--admin-token", "TOLLGATE_ADMIN_TOKEN"),
        ("--durability", "TOLLGATE_DURABILITY"),
        ("--max-prompt-bytes", "TOLLGATE_MAX_PROMPT_BYTES"),
        ("--metrics-listen", "TOLLGATE_METRICS_LISTEN"),
        ("--health-listen", "TOLLGATE_HEALTH_LISTEN"),
        ("--shutdown-timeout", "TOLLGATE_SHUTDOWN_TIMEOUT"),
        ("--upstream", "TOLLGATE_UPSTREAM"),
        ("--upstream-timeout", "TOLLGATE_UPSTREAM_TIMEOUT"),
        ("--log-format", "TOLLGATE_LOG_FORMAT"),
    ];
    for (flag, env) in flags {
        assert!(serve.contains(flag), "no {flag} in serve --help:\n{serve}");
        assert!(
            serve.contains(&format!("[env: {env}")),
            "no [env: {env}] in serve --help:\n{serve}"
        );
    }
    let (status, usage, _) = tollgate(&["usage", "--help"]);
    assert!(status.success());
    assert!(usage.contains("[env: TOLLGATE_ADDR"), "{usage}");

    // The environment really is read: TOLLGATE_SHUTDOWN_TIMEOUT is checked like the flag.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("TOLLGATE_SHUTDOWN_TIMEOUT", "0");
    let out = run_to_exit(cmd, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("must be above 0"), "{stderr}");
}

/// The cells of the table line whose first cells are `first` (split on whitespace).
fn row<'a>(table: &'a str, first: &[&str]) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.starts_with(first))
        .unwrap_or_else(|| panic!("no row {first:?} in:\n{table}"))
}

/// `tollgate usage SUBJECT --addr` against a live server after some traffic: who, the tier,
/// the tokens and dollars, and a row per limit; without a subject, the fleet; an address that
/// does not answer is a clear error and a non-zero exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_prints_a_subject_and_the_fleet_from_a_live_server() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_file(
        dir.path(),
        "policy.toml",
        r#"
default_tier = "basic"

[tiers.basic]
tokens_per_day = 5000
requests_per_minute = 100
hold_seconds = 3600

[global]
tokens_per_minute = 1000000

[models."gpt-4o"]
input_usd_per_million = 2.5
output_usd_per_million = 10.0
"#,
    );
    let server = Serve::new(&dir.path().join("data")).policy(&policy).start();
    let mut q = server.quota().await;
    let r = rsv(&mut q, reserve("carol", 1_000, 500)).await;
    assert_eq!(decision(&r), Decision::Allowed);
    let c = commit(&mut q, &r.reservation_id, 1_000, 200).await;
    assert_eq!(c.charged_micro_usd, cost(GPT_4O, 1_000, 200)); // 4,500 µUSD
    let open = rsv(&mut q, reserve("carol", 300, 0)).await;
    assert_eq!(decision(&open), Decision::Allowed);
    let denied = rsv(&mut q, reserve("carol", 5_000, 0)).await;
    assert_eq!(decision(&denied), Decision::Denied);
    let _ = rsv(&mut q, reserve("dave", 10, 0)).await;

    let addr = server.url();
    let usage_cli = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            tollgate(&args)
        })
        .await
        .unwrap()
    };
    let (status, table, stderr) = usage_cli(vec![
        "usage".into(),
        "carol".into(),
        "--addr".into(),
        addr.clone(),
    ])
    .await;
    assert!(status.success(), "{status:?}: {stderr}");
    assert_eq!(stderr, "");
    assert_eq!(
        table.lines().next(),
        Some("subject carol (tier basic)"),
        "{table}"
    );
    assert_eq!(row(&table, &["tokens", "used", "today"])[3], "1200");
    assert_eq!(row(&table, &["tokens", "held", "now"])[3], "300");
    assert_eq!(row(&table, &["open", "holds"])[2], "1");
    assert_eq!(row(&table, &["requests", "today"])[2], "2");
    assert_eq!(row(&table, &["denied", "today"])[2], "1");
    assert_eq!(row(&table, &["spent", "today"])[2], "$0.004500");
    assert_eq!(
        row(&table, &["held", "now", "(worst", "case)"])[4],
        "$0.000750"
    );
    assert_eq!(row(&table, &["saved", "today"])[2], "$0.012500");
    // The limit rows: scope, id, limit, configured, remaining, resets in.
    let header = row(&table, &["scope"]);
    assert_eq!(
        header,
        [
            "scope",
            "id",
            "limit",
            "configured",
            "remaining",
            "resets",
            "in"
        ]
    );
    let day = row(&table, &["subject", "carol", "tokens_per_day"]);
    assert_eq!((day[3], day[4]), ("5000", "3500"), "{table}");
    let rpm = row(&table, &["subject", "carol", "requests_per_minute"]);
    assert_eq!((rpm[3], rpm[4]), ("100", "98"), "{table}");
    let global = row(&table, &["global"]);
    assert_eq!(
        (global[1], global[2]),
        ("tokens_per_minute", "1000000"),
        "{table}"
    );

    let (status, fleet, stderr) = usage_cli(vec!["usage".into(), "--addr".into(), addr]).await;
    assert!(status.success(), "{status:?}: {stderr}");
    assert_eq!(fleet.lines().next(), Some("the whole fleet"), "{fleet}");
    assert_eq!(row(&fleet, &["tokens", "used", "today"])[3], "1200");
    assert_eq!(row(&fleet, &["tokens", "held", "now"])[3], "310");
    assert_eq!(row(&fleet, &["requests", "today"])[2], "3");
    assert_eq!(row(&fleet, &["spent", "today"])[2], "$0.004500");
    assert!(!fleet.contains("carol"), "{fleet}");
    assert_eq!(row(&fleet, &["global"])[1], "tokens_per_minute");

    // Nothing listens there any more.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let start = Instant::now();
    let (status, stdout, stderr) = usage_cli(vec![
        "usage".into(),
        "carol".into(),
        "--addr".into(),
        dead.clone(),
    ])
    .await;
    assert!(!status.success(), "{status:?}");
    assert_eq!(stdout, "");
    assert!(
        stderr.starts_with(&format!("tollgate: cannot connect to {dead}")),
        "{stderr}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    // Not a URL at all.
    let (status, _, stderr) =
        usage_cli(vec!["usage".into(), "--addr".into(), "not a url".into()]).await;
    assert!(!status.success());
    assert!(stderr.contains("is not a URL"), "{stderr}");
    server.kill9();
}

/// SIGTERM sent the moment the address is printed is a clean stop (exit 0), not the signal's
/// default action, which would kill the process before its store is flushed: the handlers are
/// registered before the address is printed. Sent with libc's `kill` straight after the line is
/// read, 20 times, because the window this closes (from the print to the server's first poll
/// of its shutdown future) was a few hundred microseconds wide.
#[test]
fn sigterm_the_moment_the_address_is_printed_is_a_clean_stop() {
    for cycle in 0..20 {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        let mut server = Serve::new(&dir.path().join("data")).log_to(&log).start();
        let pid = libc::pid_t::try_from(server.child.id()).expect("a pid");
        // SAFETY: kill(2) with a valid signal number; the child is ours and not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "kill");
        let status = server
            .wait_exit(Duration::from_secs(30))
            .expect("tollgate exits after SIGTERM");
        assert_eq!(
            status.code(),
            Some(0),
            "cycle {cycle}: {status:?}; log:\n{}",
            server.log_text()
        );
    }
}

/// sled keeps one ledger per data directory: a second StatefulSet replica (a name ending in
/// `-1`) is refused at start, naming the reason and the way out, while replica `-0` serves.
#[test]
fn a_second_replica_on_sled_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let refused = Serve::new(&dir.path().join("data"))
        .sled_only()
        .env("TOLLGATE_REPLICA_NAME", "tollgate-central-1")
        .log_to(&log)
        .try_start();
    assert!(refused.is_err(), "replica -1 started on sled");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("every quota would count once per replica") && text.contains("--store"),
        "{text}"
    );
    let first = Serve::new(&dir.path().join("data"))
        .sled_only()
        .env("TOLLGATE_REPLICA_NAME", "tollgate-central-0")
        .start();
    drop(first);
}
