//! Tollgate: a gRPC quota decision service that stands between applications and the LLM
//! providers they pay for.
//!
//! Before an LLM call an app server asks "may this subject spend about N tokens now?"; tollgate
//! **Reserves** them (a hold). After the call the app **Commits** the usage the provider
//! reported (the unused rest flows back) or **Refunds** the hold. Answers are atomic across all
//! of a subject's limits and durable before they are sent.
//!
//! # Layout
//! - [`clock`]: time as an input (`Clock`, `SystemClock`, `ManualClock`).
//! - [`policy`]: the policy file: tiers and their limits, the limits of groups, client IPs and
//!   the fleet, model prices in micro-dollars, who may call (`[callers]`, `[operators]`);
//!   parsed and validated.
//! - [`engine`]: pure decisions in memory, no I/O: token buckets, minute windows, day and month
//!   counters, money, per-scope state (subject, group, IP, fleet), auto-downgrade, savings, the
//!   reservation state machine. Each change yields mutation records.
//! - [`store`]: the `Store` trait, sled (the embedded default) and PostgreSQL (replicas) under
//!   it, and the group-commit writer that makes mutation records durable.
//! - [`ledger`]: the `Ledger` trait the server calls, and the local ledger (the engine behind
//!   its lock plus the writer) that decides.
//! - [`failstop`]: the one switch that a failed write or a panic under the engine lock trips,
//!   so health turns NOT_SERVING and the process exits non-zero instead of limping on.
//! - [`server`]: one Quota and one Admin service over any `Ledger` (authentication,
//!   validation, prompt counting), health, reflection, the transport's bounds and TLS.
//! - [`relay`]: the forwarding ledger, for relay mode (sidecars) and follower replicas: decide
//!   upstream, exactly once, fail open or closed per tier when the upstream is gone.
//! - [`sampled_log`]: log lines for floods (denials, fallbacks) sampled per window.
//! - [`telemetry`]: Prometheus metrics (decisions, tokens, money, latencies), no-ops unless
//!   `--metrics-listen` is given.
//! - [`proto`]: the generated gRPC types of `proto/tollgate/v1/quota.proto`.
//!
//! The engine never imports tonic; the server never does arithmetic on quotas.

pub mod clock;
pub mod engine;
pub mod failstop;
pub mod ledger;
pub mod policy;
pub mod relay;
pub mod sampled_log;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tokens;

/// The generated gRPC types and services of `tollgate.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("tollgate.v1");
    include!(concat!(env!("OUT_DIR"), "/clients/tollgate.v1.rs"));

    /// The encoded descriptors of `tollgate.v1`, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tollgate_descriptor.bin"));

    /// Microseconds as a protobuf Duration.
    pub fn to_duration(us: u64) -> prost_types::Duration {
        let d = std::time::Duration::from_micros(us);
        prost_types::Duration {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        }
    }

    /// Microseconds since the epoch as a protobuf Timestamp.
    pub fn to_timestamp(us: u64) -> prost_types::Timestamp {
        let d = to_duration(us);
        prost_types::Timestamp {
            seconds: d.seconds,
            nanos: d.nanos,
        }
    }
}
