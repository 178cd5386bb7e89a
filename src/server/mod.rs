//! The gRPC server: Quota and Admin over the ledger, plus grpc.health.v1 and server reflection
//! so grpcurl and Kubernetes probes work without proto files.

mod admin;
mod export;
pub mod prompt;
mod quota;
pub mod reload;
mod status;
pub mod validate;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

pub use admin::{AdminAuth, AdminService};
pub use quota::QuotaService;

use crate::ledger::{Housekeeping, Ledger};
use crate::proto;
use crate::telemetry;
use crate::tokens::TokenCounter;

/// How often the sweeper expires holds and purges settled records.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Calls in flight at once on one connection.
pub const CONCURRENCY_PER_CONNECTION: usize = 1_024;

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
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            admin_token: None,
            max_prompt_bytes: validate::DEFAULT_MAX_PROMPT_BYTES,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }
}

/// What answers the Quota and Admin calls: the ledger of this process, or a relay to the
/// central one.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The authoritative ledger.
    Ledger(Arc<Ledger>),
    /// Relay mode: no ledger here; forward to the upstream.
    Relay(Arc<crate::relay::Relay>),
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The transport failed.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not be built from the descriptors.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// The gRPC service names whose health is reported (besides "", the whole server).
const SERVICES: [&str; 2] = ["tollgate.v1.Quota", "tollgate.v1.Admin"];

/// Serve the ledger on `listener` until `shutdown` completes (see [`serve_backend`]).
pub async fn serve(
    ledger: Arc<Ledger>,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_backend(Backend::Ledger(ledger), listener, None, options, shutdown).await
}

/// Serve `backend` on `listener` (and grpc.health.v1 alone on `health_listener`, so a server
/// bound to 127.0.0.1 can still be probed on the pod's address) until `shutdown` completes.
///
/// Shutdown: health turns NOT_SERVING at once, no new connection is accepted and HTTP/2
/// GOAWAY refuses new calls on open ones, calls in flight finish (for at most
/// `options.shutdown_timeout`), then the ledger is flushed.
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
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Bound the work one connection can put in flight; callers beyond it queue in HTTP/2.
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .add_service(health_service.clone())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let (router, sweeper) = match &backend {
        Backend::Ledger(ledger) => (
            router
                .add_service(
                    proto::quota_server::QuotaServer::new(QuotaService::new(
                        ledger.clone(),
                        prompts,
                        options.max_prompt_bytes,
                    ))
                    .max_decoding_message_size(max_message),
                )
                .add_service(proto::admin_server::AdminServer::with_interceptor(
                    AdminService::new(ledger.clone()),
                    AdminAuth::new(options.admin_token),
                )),
            Some(tokio::spawn(sweep(ledger.clone()))),
        ),
        Backend::Relay(relay) => (
            router
                .add_service(
                    proto::quota_server::QuotaServer::new(crate::relay::RelayQuota::new(
                        relay.clone(),
                        prompts,
                        options.max_prompt_bytes,
                    ))
                    .max_decoding_message_size(max_message),
                )
                .add_service(proto::admin_server::AdminServer::new(
                    crate::relay::RelayAdmin::new(relay.clone()),
                )),
            None,
        ),
    };

    // Shutdown begins once: it flips health, tells the health-only server to stop, and starts
    // the clock on in-flight calls.
    let (began_tx, began_rx) = tokio::sync::watch::channel(false);
    let mut health_for_shutdown = health.clone();
    let begin = async move {
        shutdown.await;
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
    let health_server = health_listener.map(|l| {
        let mut began = began_rx.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health_service)
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(l).with_nodelay(Some(true)),
                    async move {
                        let _ = began.wait_for(|b| *b).await;
                    },
                ),
        )
    });
    // The builder's `tcp_nodelay` is ignored for an incoming stream of our own, so the accepted
    // sockets are set here; without it Nagle holds back the last frames of an answer until the
    // client's delayed ACK (~40 ms a call).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = router.serve_with_incoming_shutdown(incoming, begin);
    tokio::pin!(server);
    let mut began = began_rx;
    let timeout = options.shutdown_timeout;
    let result = tokio::select! {
        r = &mut server => r,
        () = async move {
            let _ = began.wait_for(|b| *b).await;
            tokio::time::sleep(timeout).await;
        } => {
            tracing::warn!(
                timeout_s = timeout.as_secs_f64(),
                "shutdown timeout: calls still in flight are cut"
            );
            Ok(())
        }
    };
    if let Some(sweeper) = sweeper {
        sweeper.abort();
    }
    if let Some(h) = health_server {
        h.abort();
    }
    if let Backend::Ledger(ledger) = &backend {
        // Everything decided, answered or not, reaches the disk before the process exits.
        match ledger.flush().await {
            Ok(()) => tracing::info!("store flushed"),
            Err(e) => tracing::error!(error = %e, "final flush failed"),
        }
    }
    result.map_err(ServeError::from)
}

impl reload::PolicyHolder for Backend {
    fn current(&self) -> Result<Arc<crate::policy::Policy>, crate::ledger::LedgerError> {
        match self {
            Backend::Ledger(l) => l.current(),
            Backend::Relay(r) => r.current(),
        }
    }
    fn replace(
        &self,
        policy: Arc<crate::policy::Policy>,
    ) -> Result<(), crate::ledger::LedgerError> {
        match self {
            Backend::Ledger(l) => l.replace(policy),
            Backend::Relay(r) => r.replace(policy),
        }
    }
}

/// The sweeper: expires due holds and purges old records, so they never pile up even when no
/// request arrives to trigger it.
async fn sweep(ledger: Arc<Ledger>) {
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
                tracing::error!(error = %e, "housekeeping failed");
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
