//! The gRPC server: Quota and Admin over the ledger, plus grpc.health.v1 and server reflection
//! so grpcurl and Kubernetes probes work without proto files.

mod admin;
pub mod auth;
pub mod codec;
pub mod content_type;
pub mod prompt;
mod quota;
pub mod reload;
pub mod transport;
pub mod validate;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::Routes;

pub use admin::{AdminAuth, AdminService};
pub use quota::QuotaService;
pub use transport::{Transport, TransportOptions};

use crate::ledger::{Housekeeping, Ledger, LocalLedger};
use crate::proto;
use crate::relay::ForwardingLedger;
use crate::telemetry;
use crate::tokens::TokenCounter;

/// How often the sweeper expires holds and purges settled records.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Room in a request message beyond the prompt bound: the other fields, and the framing of
/// up to `validate::MAX_MESSAGES` chat messages (a few bytes each).
pub const MESSAGE_OVERHEAD_BYTES: usize = 1024 * 1024;

/// How long in-flight calls may take to finish after SIGTERM or SIGINT before the server stops
/// waiting for them (`--shutdown-timeout`).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// How the server is configured beyond its ledger.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The bearer token Admin calls must carry (none: every Admin call is refused).
    pub admin_token: Option<String>,
    /// The most bytes of prompt text (or chat text) one request may carry.
    pub max_prompt_bytes: usize,
    /// After shutdown begins, how long in-flight calls may take to finish.
    pub shutdown_timeout: Duration,
    /// Connections and requests on the port: bounds and timeouts.
    pub transport: TransportOptions,
    /// TLS (mTLS with a client CA) on the gRPC port; the health-only port stays plaintext,
    /// for kubelet probes.
    pub tls: Option<Arc<transport::tls::TlsConfig>>,
    /// With replicas over mTLS: the SAN of the replicas' certificates, on which a follower's
    /// naming of the caller it authenticated is believed.
    pub replica_san: Option<Arc<str>>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            admin_token: None,
            max_prompt_bytes: validate::DEFAULT_MAX_PROMPT_BYTES,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            transport: TransportOptions::default(),
            tls: None,
            replica_san: None,
        }
    }
}

/// What answers the Quota and Admin calls: the ledger of this process, or one that forwards
/// to the tollgate that decides. Both are served by the same [`QuotaService`] and
/// [`AdminService`]; the variants say what else each needs (a sweeper and a final flush, or a
/// watch on the leader's health).
#[derive(Debug, Clone)]
pub enum Backend {
    /// The authoritative ledger.
    Local(Arc<LocalLedger>),
    /// Relay mode or a follower: no ledger here; forward to the upstream.
    Forwarding(Arc<ForwardingLedger>),
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reflection could not be built from the descriptors.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The ledger could not go on (a failed write or sync, a panic under the engine lock): the
    /// server drained and stopped. What is durable is what a restart loads.
    #[error("stopped after a fatal fault: {0}")]
    FailStop(String),
    /// The final flush at shutdown failed: decisions made in the last instants may be lost.
    #[error("final flush failed: {0}")]
    FinalFlush(crate::ledger::LedgerError),
}

/// The gRPC service names whose health is reported (besides "", the whole server).
const SERVICES: [&str; 2] = ["tollgate.v1.Quota", "tollgate.v1.Admin"];

/// How often a follower asks whether its leader serves.
const LEADER_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Serve the ledger on `listener` until `shutdown` completes (see [`serve_backend`]).
pub async fn serve(
    ledger: Arc<LocalLedger>,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_backend(Backend::Local(ledger), listener, None, options, shutdown).await
}

/// Serve `backend` on `listener` (and grpc.health.v1 alone on `health_listener`, so a server
/// bound to 127.0.0.1 can still be probed on the pod's address) until `shutdown` completes.
///
/// Both ports are served by [`Transport`], which bounds connections and what their requests
/// hold (`options.transport`).
///
/// Shutdown: health turns NOT_SERVING at once, no new connection is accepted and HTTP/2
/// GOAWAY refuses new calls on open ones, calls in flight finish (for at most
/// `options.shutdown_timeout`; connections without calls do not hold the drain), then the
/// ledger is flushed.
pub async fn serve_backend(
    backend: Backend,
    listener: TcpListener,
    health_listener: Option<TcpListener>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let prompts = prompt::PromptCounter::new(TokenCounter::for_this_machine());
    // Load the tokenizers now, off the reactor, so the first requests do not pay for it.
    if let Ok(policy) = reload::PolicyHolder::current(&backend) {
        prompts.warm_up(&policy);
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in SERVICES {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // A message may carry a whole prompt: room for the prompt bound plus the other fields and
    // the framing of up to MAX_MESSAGES chat messages. Past it, gRPC refuses the message.
    let max_message = options
        .max_prompt_bytes
        .saturating_add(MESSAGE_OVERHEAD_BYTES);
    let routes = Routes::new(health_service.clone())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let ledger: Arc<dyn Ledger> = match &backend {
        Backend::Local(l) => l.clone(),
        Backend::Forwarding(f) => f.clone(),
    };
    let routes = routes.add_service(
        proto::quota_server::QuotaServer::new(
            QuotaService::new(ledger.clone(), prompts, options.max_prompt_bytes)
                .trusting_replicas(options.replica_san.clone()),
        )
        .max_decoding_message_size(max_message),
    );
    let admin = AdminService::new(ledger.clone());
    let (routes, sweeper) = match &backend {
        Backend::Local(local) => (
            routes.add_service(proto::admin_server::AdminServer::with_interceptor(
                admin,
                AdminAuth::new(options.admin_token, ledger),
            )),
            Some(tokio::spawn(sweep(local.clone()))),
        ),
        // The tollgate that decides checks the token the call carries.
        Backend::Forwarding(_) => (
            routes.add_service(proto::admin_server::AdminServer::new(admin)),
            None,
        ),
    };

    // The counts of sampled log lines are logged when their window ends, even if the flood
    // that filled it has stopped.
    let summaries = tokio::spawn(async {
        let mut tick = tokio::time::interval(crate::sampled_log::INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            crate::sampled_log::flush_all(false);
        }
    });

    // Shutdown begins once, on the signal or on a fail-stop: it flips health, tells the
    // health-only server to stop, and starts the clock on in-flight calls.
    let (began_tx, began_rx) = tokio::sync::watch::channel(false);
    let mut health_for_shutdown = health.clone();
    let fail_stop = match &backend {
        Backend::Local(ledger) => Some(ledger.fail_stop().clone()),
        Backend::Forwarding(_) => None,
    };
    let fault: Arc<std::sync::OnceLock<String>> = Arc::default();
    let fault_seen = fault.clone();
    let begin = async move {
        let tripped = async {
            match &fail_stop {
                Some(f) => f.tripped().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown => {}
            reason = tripped => {
                // The one line that says why the process is about to exit non-zero.
                tracing::error!(
                    %reason,
                    "fail-stop: health NOT_SERVING; draining, then exiting non-zero (a restart loads what is durable)"
                );
                let _ = fault_seen.set(reason);
            }
        }
        // Health watchers (client-side load balancers, Envoy) see NOT_SERVING; then their
        // streams end, since a watch never finishes by itself and would hold the drain for the
        // whole timeout. Probes that connect anew are refused: the listeners close now.
        for name in std::iter::once("").chain(SERVICES) {
            health_for_shutdown
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
        }
        for name in std::iter::once("").chain(SERVICES) {
            health_for_shutdown.clear_service_status(name).await;
        }
        tracing::info!("shutting down: refusing new calls, finishing in-flight ones");
        let _ = began_tx.send(true);
    };
    // A follower's relay is ready only while its leader is: checked every second, off once
    // shutdown begins (which sets NOT_SERVING itself). "" (alive) stays SERVING.
    let leader_watch = match &backend {
        Backend::Forwarding(relay) if relay.is_follower() => {
            let (relay, health, began) = (relay.clone(), health.clone(), began_rx.clone());
            Some(tokio::spawn(async move {
                let mut serving = true;
                loop {
                    tokio::time::sleep(LEADER_CHECK_EVERY).await;
                    let now = relay.upstream_serving().await;
                    if *began.borrow() {
                        return;
                    }
                    if now != serving {
                        serving = now;
                        let status = if now {
                            tonic_health::ServingStatus::Serving
                        } else {
                            tonic_health::ServingStatus::NotServing
                        };
                        for name in SERVICES {
                            health.set_service_status(name, status).await;
                        }
                        tracing::info!(
                            leader_serving = now,
                            "following: readiness follows the leader"
                        );
                    }
                }
            }))
        }
        _ => None,
    };
    let timeout = options.shutdown_timeout;
    let health_server = health_listener.map(|l| {
        let mut began = began_rx.clone();
        let transport = Transport::for_health(&options.transport);
        tokio::spawn(async move {
            let began = async move {
                let _ = began.wait_for(|b| *b).await;
            };
            transport
                .serve(l, Routes::new(health_service), began, timeout)
                .await;
        })
    });
    // Serves until shutdown begins, then drains: at most `timeout` for the calls in flight.
    Transport::new(&options.transport, max_message)
        .with_tls(options.tls.clone())
        .serve(listener, routes, begin, timeout)
        .await;
    if let Some(sweeper) = sweeper {
        sweeper.abort();
    }
    summaries.abort();
    if let Some(w) = leader_watch {
        w.abort();
    }
    crate::sampled_log::flush_all(true);
    if let Some(h) = health_server {
        h.abort();
    }
    if let Some(reason) = fault.get() {
        // The writer refuses everything after the fault: there is nothing more to flush.
        return Err(ServeError::FailStop(reason.clone()));
    }
    if let Backend::Local(ledger) = &backend {
        // Everything decided, answered or not, reaches the disk before the process exits.
        match ledger.flush().await {
            Ok(()) => tracing::info!("store flushed"),
            Err(e) => return Err(ServeError::FinalFlush(e)),
        }
    }
    Ok(())
}

impl reload::PolicyHolder for Backend {
    fn current(&self) -> Result<Arc<crate::policy::Policy>, crate::ledger::LedgerError> {
        match self {
            Backend::Local(l) => l.current(),
            Backend::Forwarding(f) => Ok(f.current_policy()),
        }
    }
    fn replace(
        &self,
        policy: Arc<crate::policy::Policy>,
    ) -> Result<(), crate::ledger::LedgerError> {
        match self {
            Backend::Local(l) => l.replace(policy),
            Backend::Forwarding(f) => {
                f.set_policy(policy);
                Ok(())
            }
        }
    }
}

/// The sweeper: expires due holds and purges old records, so they never pile up even when no
/// request arrives to trigger it.
async fn sweep(ledger: Arc<LocalLedger>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let pass = ledger.housekeeping().await;
        if let Ok(Housekeeping {
            counts: (open, records, scopes),
            ..
        }) = &pass
        {
            telemetry::set(telemetry::OPEN_HOLDS, *open);
            telemetry::set(telemetry::RESERVATIONS, *records);
            telemetry::set(telemetry::SCOPES, *scopes);
        }
        match pass {
            Ok(h) if h.expired > 0 || h.purged > 0 || h.forgotten > 0 => {
                tracing::debug!(
                    expired = h.expired,
                    purged = h.purged,
                    forgotten = h.forgotten,
                    "housekeeping"
                );
            }
            Ok(_) => {}
            Err(e) => {
                // Expiry and purging are part of the ledger's promises: without them holds
                // would never expire. Stop the process (a fault that already tripped keeps its
                // first reason).
                ledger.fail_stop().trip(format!("housekeeping failed: {e}"));
                return;
            }
        }
    }
}

/// Bind `addr` (port 0 picks a free port) and report the address bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
