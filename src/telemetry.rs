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

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
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
    counter!(
        DECISIONS,
        "tier" => tier.to_string(),
        "decision" => decision,
        "denied_by" => denied_by.to_string()
    )
    .increment(1);
}

/// Add to a counter without labels.
pub fn add(name: &'static str, value: u64) {
    if enabled() && value > 0 {
        counter!(name).increment(value);
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
    histogram!(
        RPC_SECONDS,
        "method" => method,
        "code" => code_name(code)
    )
    .record(started.elapsed().as_secs_f64());
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
