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
//!   the fleet, model prices in micro-dollars; parsed and validated.
//! - [`engine`]: pure decisions in memory, no I/O: token buckets, minute windows, day and month
//!   counters, money, per-scope state (subject, group, IP, fleet), auto-downgrade, savings, the
//!   reservation state machine. Each change yields mutation records.
//! - [`store`]: sled under the data directory, and the group-commit writer that makes mutation
//!   records durable.
//! - [`ledger`]: the engine behind its lock plus the writer: what the server calls.
//! - [`failstop`]: the one switch that a failed write or a panic under the engine lock trips,
//!   so health turns NOT_SERVING and the process exits non-zero instead of limping on.
//! - [`server`]: thin tonic adapters (Quota, Admin), validation, health, reflection.
//! - [`relay`]: relay mode for sidecars: count locally, decide upstream, fail open or closed
//!   per tier when the upstream is gone.
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
}
