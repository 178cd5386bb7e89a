//! The gRPC server: Quota and Admin over the ledger, plus grpc.health.v1 and server reflection
//! so grpcurl and Kubernetes probes work without proto files.

mod admin;
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

use crate::ledger::Ledger;
use crate::proto;
use crate::tokens::TokenCounter;

/// How often the sweeper expires holds and purges settled records.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Calls in flight at once on one connection.
pub const CONCURRENCY_PER_CONNECTION: usize = 1_024;

/// Room in a request message beyond the prompt bound: the other fields, and the framing of
/// up to `validate::MAX_MESSAGES` chat messages (a few bytes each).
pub const MESSAGE_OVERHEAD_BYTES: usize = 1024 * 1024;

/// How the server is configured beyond its ledger.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The bearer token Admin calls must carry (none: every Admin call is refused).
    pub admin_token: Option<String>,
    /// The most bytes of prompt text (or chat text) one request may carry.
    pub max_prompt_bytes: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            admin_token: None,
            max_prompt_bytes: validate::DEFAULT_MAX_PROMPT_BYTES,
        }
    }
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

/// Serve on `listener` until `shutdown` completes; in-flight calls finish first. Runs the
/// housekeeping sweeper for as long as it serves, and flushes the ledger on the way out.
pub async fn serve(
    ledger: Arc<Ledger>,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let counter = TokenCounter::for_this_machine();
    // Load the tokenizers now, off the reactor, so the first requests do not pay for it.
    counter.warm_up(
        &ledger
            .policy()
            .map(|p| p.encodings_in_use())
            .unwrap_or_default(),
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<proto::quota_server::QuotaServer<QuotaService>>()
        .await;
    health
        .set_serving::<proto::admin_server::AdminServer<AdminService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let sweeper = tokio::spawn(sweep(ledger.clone()));
    let quota = proto::quota_server::QuotaServer::new(QuotaService::new(
        ledger.clone(),
        counter,
        options.max_prompt_bytes,
    ))
    // A message may carry a whole prompt: room for the prompt bound plus the other fields and
    // the framing of up to MAX_MESSAGES chat messages. Past it, gRPC refuses the message.
    .max_decoding_message_size(
        options
            .max_prompt_bytes
            .saturating_add(MESSAGE_OVERHEAD_BYTES),
    );
    let admin = proto::admin_server::AdminServer::with_interceptor(
        AdminService::new(ledger.clone()),
        AdminAuth::new(options.admin_token),
    );
    let health_for_shutdown = health.clone();
    // The builder's `tcp_nodelay` is ignored for an incoming stream of our own, so the accepted
    // sockets are set here; without it Nagle holds back the last frames of an answer until the
    // client's delayed ACK (~40 ms a call).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let result = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Bound the work one connection can put in flight; callers beyond it queue in HTTP/2.
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(quota)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            // Probes see NOT_SERVING while in-flight calls finish.
            health_for_shutdown
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            health_for_shutdown
                .set_not_serving::<proto::quota_server::QuotaServer<QuotaService>>()
                .await;
            health_for_shutdown
                .set_not_serving::<proto::admin_server::AdminServer<AdminService>>()
                .await;
            tracing::info!("shutting down: finishing in-flight calls");
        })
        .await;
    sweeper.abort();
    if let Err(e) = ledger.flush().await {
        tracing::error!(error = %e, "final flush failed");
    }
    result.map_err(ServeError::from)
}

/// The sweeper: expires due holds and purges old records, so they never pile up even when no
/// request arrives to trigger it.
async fn sweep(ledger: Arc<Ledger>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match ledger.housekeeping().await {
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
