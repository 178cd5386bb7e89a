//! Prometheus metrics: what tollgate decided, held, charged and saved, and how long it took.
//!
//! Recorded through the `metrics` facade and exposed by `metrics-exporter-prometheus` on
//! `--metrics-listen` (text format at `/metrics`). Without that flag no recorder is installed
//! and every call here is a no-op costing a few nanoseconds, so the decision path pays nothing
//! for metrics nobody scrapes.
//!
//! Label values are bounded: tiers come from the policy, `denied_by` from a fixed set of limit
//! names, methods and codes from the proto. No subject, group or IP is ever a label (that would
//! make the series count grow with the user count).
//!
//! Why the handles are cached (see [`Handles`]): asked through the macros on every call, each
//! record built its key (a label vector, and a `String` per dynamic label value), hashed it
//! and looked it up in the exporter's registry: three to five allocations and a lock a Reserve,
//! for a counter increment. A thread keeps the handles it has used; each is then an atomic add.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram, Counter, Histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Reserves decided, by tier, decision and `denied_by`.
pub const DECISIONS: &str = "tollgate_decisions_total";
/// Tokens put on hold by admitted Reserves.
pub const TOKENS_HELD: &str = "tollgate_tokens_held_total";
/// Tokens charged by Commits.
pub const TOKENS_CHARGED: &str = "tollgate_tokens_charged_total";
/// Tokens given back by Commits (the unused rest) and Refunds.
pub const TOKENS_RELEASED: &str = "tollgate_tokens_released_total";
/// Holds open now.
pub const OPEN_HOLDS: &str = "tollgate_open_holds";
/// Holds that expired (charged in full).
pub const HOLDS_EXPIRED: &str = "tollgate_holds_expired_total";
/// Micro-dollars charged by Commits.
pub const SPENT: &str = "tollgate_spent_micro_usd_total";
/// Micro-dollars saved by denials and downgrades.
pub const SAVED: &str = "tollgate_saved_micro_usd_total";
/// Scopes (subjects, groups, IPs, fleet) with live state in memory.
pub const SCOPES: &str = "tollgate_scopes";
/// Reservation records in memory (open and settled).
pub const RESERVATIONS: &str = "tollgate_reservations";
/// gRPC call latency, by method and status code.
pub const RPC_SECONDS: &str = "tollgate_rpc_duration_seconds";
/// Time to make one group of decisions durable (sled flush plus fdatasync).
pub const FLUSH_SECONDS: &str = "tollgate_store_flush_duration_seconds";
/// Relay mode: Reserves answered without the upstream, by tier and fail mode.
pub const UPSTREAM_FAILURES: &str = "tollgate_relay_upstream_unavailable_total";

/// Whether a recorder is installed. The `metrics` macros are cheap without one, but their
/// label values (tier names) are built before the recorder is asked; checked first, they are
/// never built for metrics nobody scrapes.
static ENABLED: AtomicBool = AtomicBool::new(false);

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Start serving `/metrics` on `addr` (a background task of the current tokio runtime).
pub fn install(addr: SocketAddr) -> Result<(), BuildError> {
    builder()?.with_http_listener(addr).install()?;
    enable();
    Ok(())
}

/// Record metrics in this process without serving them, and return the handle that renders
/// them (for tests, and for embedding tollgate's server in another program).
pub fn install_recorder() -> Result<PrometheusHandle, BuildError> {
    let handle = builder()?.install_recorder()?;
    enable();
    Ok(handle)
}

/// The exporter's configuration: histograms, not summaries, since buckets aggregate across
/// instances and over time.
fn builder() -> Result<PrometheusBuilder, BuildError> {
    let rpc_buckets = [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0, 2.5,
    ];
    let flush_buckets = [
        0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(RPC_SECONDS.into()), &rpc_buckets)?
        .set_buckets_for_metric(Matcher::Full(FLUSH_SECONDS.into()), &flush_buckets)
}

fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
    describe();
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        DECISIONS,
        "Reserves decided, by tier, decision and denied_by."
    );
    describe_counter!(TOKENS_HELD, Unit::Count, "Tokens put on hold by Reserves.");
    describe_counter!(TOKENS_CHARGED, Unit::Count, "Tokens charged by Commits.");
    describe_counter!(
        TOKENS_RELEASED,
        Unit::Count,
        "Tokens given back by Commits and Refunds."
    );
    describe_gauge!(OPEN_HOLDS, "Holds open now.");
    describe_counter!(
        HOLDS_EXPIRED,
        "Holds that expired and were charged in full."
    );
    describe_counter!(SPENT, "Micro-dollars charged by Commits.");
    describe_counter!(SAVED, "Micro-dollars saved by denials and downgrades.");
    describe_gauge!(SCOPES, "Scopes with live state in memory.");
    describe_gauge!(RESERVATIONS, "Reservation records in memory.");
    describe_histogram!(RPC_SECONDS, Unit::Seconds, "gRPC call latency.");
    describe_histogram!(
        FLUSH_SECONDS,
        Unit::Seconds,
        "Time to make one group of decisions durable."
    );
    describe_counter!(
        UPSTREAM_FAILURES,
        "Relay: Reserves answered without the upstream, by tier and fail mode."
    );
}

/// One Reserve's decision.
pub fn decision(tier: &str, decision: &'static str, denied_by: &str) {
    if !enabled() {
        return;
    }
    Handles::with(|h| {
        use_handle(
            &mut h.decisions,
            |(t, d, b)| **t == *tier && *d == decision && **b == *denied_by,
            || {
                let c = counter!(
                    DECISIONS,
                    "tier" => tier.to_string(),
                    "decision" => decision,
                    "denied_by" => denied_by.to_string()
                );
                ((tier.into(), decision, denied_by.into()), c)
            },
            |c| c.increment(1),
        );
    });
}

/// Add to a counter without labels.
pub fn add(name: &'static str, value: u64) {
    if enabled() && value > 0 {
        Handles::with(|h| {
            use_handle(
                &mut h.counters,
                |n| *n == name,
                || (name, counter!(name)),
                |c| c.increment(value),
            );
        });
    }
}

/// Set a gauge without labels.
pub fn set(name: &'static str, value: usize) {
    if enabled() {
        gauge!(name).set(value as f64);
    }
}

/// Record how long a store flush took.
pub fn flush_took(elapsed: Duration) {
    if enabled() {
        histogram!(FLUSH_SECONDS).record(elapsed.as_secs_f64());
    }
}

/// Record one gRPC call: its method, its status code and how long since `started`.
pub fn rpc(method: &'static str, code: tonic::Code, started: Instant) {
    if !enabled() {
        return;
    }
    let seconds = started.elapsed().as_secs_f64();
    Handles::with(|h| {
        use_handle(
            &mut h.rpc,
            |(m, c)| *m == method && *c == code,
            || {
                let h = histogram!(RPC_SECONDS, "method" => method, "code" => code_name(code));
                ((method, code), h)
            },
            |h| h.record(seconds),
        );
    });
}

/// A relay Reserve answered without its upstream.
pub fn upstream_failure(tier: &str, mode: &'static str) {
    if !enabled() {
        return;
    }
    counter!(UPSTREAM_FAILURES, "tier" => tier.to_string(), "mode" => mode).increment(1);
}

/// Time `call` and record it under `method` with its status code.
pub async fn timed<T>(
    method: &'static str,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let started = Instant::now();
    let result = call.await;
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    rpc(method, code, started);
    result
}

/// Handles a thread has used, at most [`MAX_CACHED_HANDLES`] of each kind (the series are
/// bounded, see the module documentation; the cap bounds a thread's cache even so). Past the
/// cap a handle is looked up in the registry each time, as the macros do.
///
/// Why per thread: the handles are then read without a lock or a shared cache line; a runtime
/// has a few worker threads, each holding at most a few dozen handles.
#[derive(Default)]
struct Handles {
    /// By method and status code.
    rpc: Vec<((&'static str, tonic::Code), Histogram)>,
    /// By tier, decision and `denied_by`.
    decisions: Vec<(DecisionLabels, Counter)>,
    /// Counters without labels, by name.
    counters: Vec<(&'static str, Counter)>,
}

/// A decision's labels: tier, decision, `denied_by`.
type DecisionLabels = (Box<str>, &'static str, Box<str>);

/// See [`Handles`].
const MAX_CACHED_HANDLES: usize = 256;

thread_local! {
    static HANDLES: RefCell<Handles> = RefCell::new(Handles::default());
}

impl Handles {
    /// Run `f` over this thread's handles (over none, in a thread being torn down).
    fn with(f: impl FnOnce(&mut Handles)) {
        let mut f = Some(f);
        let _ = HANDLES.try_with(|handles| {
            if let (Ok(mut handles), Some(f)) = (handles.try_borrow_mut(), f.take()) {
                f(&mut handles);
            }
        });
        if let Some(f) = f {
            f(&mut Handles::default());
        }
    }
}

/// Apply `act` to the handle in `cache` that `is` picks; if none, to the one `make` registers,
/// kept in `cache` while it holds fewer than [`MAX_CACHED_HANDLES`].
fn use_handle<K, H>(
    cache: &mut Vec<(K, H)>,
    is: impl Fn(&K) -> bool,
    make: impl FnOnce() -> (K, H),
    act: impl FnOnce(&H),
) {
    if let Some((_, handle)) = cache.iter().find(|(key, _)| is(key)) {
        return act(handle);
    }
    let (key, handle) = make();
    act(&handle);
    if cache.len() < MAX_CACHED_HANDLES {
        cache.push((key, handle));
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
