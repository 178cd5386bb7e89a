//! The gRPC port's transport: TCP connections accepted by our own loop and served as HTTP/2 by
//! hyper, with a bound on everything a peer can make the server hold.
//!
//! tonic's `Server` serves connections it accepts itself and exposes neither the connections
//! nor their life: it retries a failed `accept` at once (a spin at 100 % of a core once the
//! descriptors run out), waits for an HTTP/2 preface forever, keeps idle connections forever,
//! and its drain waits for every connection, even one that never sent a byte. So the server
//! runs hyper's HTTP/2 connection itself, with tonic's `Routes` as the service:
//!
//! - `accept`: accepting, with back-off and a rate-limited log when `accept` fails.
//! - `connections`: the bound on open connections, eviction of the longest-idle one when it
//!   is reached, and the count of calls in flight (per connection and in all).
//! - `connection`: one connection's life: the preface deadline, the idle timeout, graceful
//!   close.
//! - `calls` and `arrival`: what one call may hold: its metadata, and the bytes of its
//!   request while they arrive (a budget per connection and one for all, and a deadline).
//! - `descriptors`: the open-files limit, raised at start; the default connection bound.
//!
//! What tonic's server added on top of the services and is not kept: its per-connection
//! concurrency limit (HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS bounds the same thing in the
//! protocol) and its server-side `grpc-timeout` enforcement (a client whose deadline passes
//! resets the stream, which drops the call here too).

mod accept;
mod arrival;
mod calls;
mod connection;
mod connections;
mod descriptors;
mod framing;
mod heard;
mod log_limit;
mod metadata;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::Routes;

use self::connections::Connections;

/// HTTP/2 streams (calls) open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
/// A client queues further calls; a stream beyond it is refused (REFUSED_STREAM). Enough for
/// a relay multiplexing a whole pod's calls, whose calls take milliseconds.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// HTTP/2 flow-control window of one stream and of one connection, in bytes: what a peer may
/// send that the server has not read yet. Request bodies are read as they come, but a body a
/// service is slow to read (a reflection stream) keeps its data there: across all connections
/// that is bounded by the connection bound times this. 64 KiB (HTTP/2's own default) keeps it
/// to 640 MiB at 10,000 connections, and moves a 4 MiB prompt in 64 round trips (milliseconds
/// in a data centre).
pub const FLOW_WINDOW_BYTES: u32 = 64 * 1024;

/// The largest HTTP/2 frame accepted (the protocol's default and minimum).
pub const MAX_FRAME_BYTES: u32 = 16 * 1024;

/// The largest header block HTTP/2 decodes (SETTINGS_MAX_HEADER_LIST_SIZE). Metadata up to it
/// reaches the server, which refuses that call alone past [`MAX_METADATA_BYTES`]. Beyond
/// it h2 answers the stream 431, and beyond about 1.25 times it (CONTINUATION frames
/// that would have to be buffered whole) h2 closes the connection: that guard against header
/// floods lives in h2 and is kept.
pub const MAX_HEADER_LIST_BYTES: u32 = 256 * 1024;

/// The most metadata (header bytes as HTTP/2 counts them: name + value + 32 a field) one call
/// may carry; beyond it the call is refused with RESOURCE_EXHAUSTED, the connection is kept.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Bytes of requests being received on one connection (more if a largest message needs more):
/// one connection cannot take the whole budget of all.
pub const REQUEST_BYTES_PER_CONNECTION: usize = 16 * 1024 * 1024;

/// Default of `--max-request-bytes-in-flight`: bytes of requests being received, all
/// connections together.
pub const DEFAULT_MAX_REQUEST_BYTES_IN_FLIGHT: usize = 256 * 1024 * 1024;

/// Default of `--request-arrival-timeout`.
pub const DEFAULT_REQUEST_ARRIVAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Default of `--idle-timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// HTTP/2 PING after this long without a frame from the peer; no answer within
/// [`KEEPALIVE_TIMEOUT`] closes the connection. A peer that vanished (no FIN, no RST) is found.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// After GOAWAY, how long a connection with no call in flight and a silent peer may take to
/// close by itself before it is dropped: a healthy client answers within a round trip; one that
/// never does must not hold a drain.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Connections the health-only listener (`--health-listen`) keeps open at once: probes.
pub const HEALTH_MAX_CONNECTIONS: usize = 64;

/// How the transport treats connections and requests (the flags of the same names).
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// Connections open at once on the gRPC port; None: derived from the open-files limit.
    pub max_connections: Option<usize>,
    /// How long a connection may take to send its HTTP/2 preface, and a request to arrive
    /// whole (its body to its end). Processing is not counted.
    pub request_arrival_timeout: Duration,
    /// A connection with no call in flight for this long is closed with GOAWAY.
    pub idle_timeout: Duration,
    /// Bytes of requests being received, all connections together.
    pub max_request_bytes_in_flight: usize,
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            max_connections: None,
            request_arrival_timeout: DEFAULT_REQUEST_ARRIVAL_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_request_bytes_in_flight: DEFAULT_MAX_REQUEST_BYTES_IN_FLIGHT,
        }
    }
}

/// The transport of one listener, its bounds resolved.
#[derive(Clone)]
pub struct Transport {
    http: http2::Builder<TokioExecutor>,
    connections: Arc<Connections>,
    arrival: arrival::Bounds,
    idle_timeout: Duration,
    tls: Option<Arc<tls::TlsConfig>>,
}

impl Transport {
    /// The gRPC port's transport. `max_message` is the largest request message the services
    /// accept: every budget holds at least one. Raises the open-files limit (once a process)
    /// and logs it with the connection bound.
    pub fn new(options: &TransportOptions, max_message: usize) -> Self {
        let open_files = descriptors::raise_open_files_limit();
        let derived = descriptors::default_max_connections(open_files);
        let max_connections = options.max_connections.unwrap_or(derived).max(1);
        if max_connections > derived {
            tracing::warn!(
                max_connections,
                open_files,
                "--max-connections is above what the open-files limit leaves for connections: \
                 accept will fail (and back off) before the bound is reached"
            );
        }
        // A request holds its message and a frame: one of the largest must fit.
        let per_connection = REQUEST_BYTES_PER_CONNECTION
            .max(max_message.saturating_add(2 * MAX_FRAME_BYTES as usize));
        let all = options
            .max_request_bytes_in_flight
            .max(per_connection)
            .min(Semaphore::MAX_PERMITS);
        tracing::info!(
            open_files,
            max_connections,
            request_bytes_in_flight = all,
            "transport bounds"
        );
        Self::with(options, max_connections, all, per_connection)
    }

    /// A transport for the health-only listener: few connections, its own small budget.
    pub fn for_health(options: &TransportOptions) -> Self {
        let bytes = REQUEST_BYTES_PER_CONNECTION;
        Self::with(options, HEALTH_MAX_CONNECTIONS, bytes, bytes)
    }

    fn with(
        options: &TransportOptions,
        max_connections: usize,
        all_bytes: usize,
        connection_bytes: usize,
    ) -> Self {
        let mut http = http2::Builder::new(TokioExecutor::new());
        http.timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .initial_stream_window_size(FLOW_WINDOW_BYTES)
            .initial_connection_window_size(FLOW_WINDOW_BYTES)
            .max_frame_size(MAX_FRAME_BYTES)
            .max_header_list_size(MAX_HEADER_LIST_BYTES)
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT);
        Self {
            http,
            connections: Arc::new(Connections::new(max_connections)),
            arrival: arrival::Bounds::new(
                all_bytes,
                connection_bytes,
                options.request_arrival_timeout,
            ),
            idle_timeout: options.idle_timeout,
            tls: None,
        }
    }

    /// Serve TLS (and, with a client CA, mTLS) on this port.
    pub fn with_tls(mut self, tls: Option<Arc<tls::TlsConfig>>) -> Self {
        self.tls = tls;
        self
    }

    /// Serve `routes` on `listener` until `shutdown` completes; then stop accepting (the
    /// listener closes), send GOAWAY on every connection and wait for the calls in flight, at
    /// most `drain_timeout`. A connection that never sent its preface is dropped at once, and
    /// one with no call in flight after [`CLOSE_GRACE`]: only calls hold the drain.
    pub async fn serve(
        &self,
        listener: TcpListener,
        routes: Routes,
        shutdown: impl Future<Output = ()>,
        drain_timeout: Duration,
    ) {
        let shared = Arc::new(connection::Shared {
            http: self.http.clone(),
            tls: self.tls.clone(),
            routes: routes.prepare(),
            arrival: self.arrival.clone(),
            idle_timeout: self.idle_timeout,
        });
        let tasks = TaskTracker::new();
        let draining = CancellationToken::new();
        let stop = CancellationToken::new();
        let mut acceptor = accept::Acceptor::new(listener);
        let mut refused = log_limit::LogLimit::new(log_limit::INTERVAL);
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                () = &mut shutdown => break,
                stream = acceptor.accept(&self.connections) => stream,
            };
            let Some(slot) = self.connections.admit() else {
                if let Some(suppressed) = refused.ready() {
                    tracing::warn!(
                        open = self.connections.open(),
                        suppressed,
                        "connection refused: --max-connections reached and every connection \
                         has calls in flight"
                    );
                }
                continue;
            };
            // Without it Nagle holds back the last frames of an answer until the client's
            // delayed ACK (~40 ms a call).
            let _ = stream.set_nodelay(true);
            tasks.spawn(connection::serve(
                stream,
                slot,
                shared.clone(),
                draining.clone(),
                stop.clone(),
            ));
        }
        drop(acceptor);
        draining.cancel();
        tasks.close();
        if tokio::time::timeout(drain_timeout, tasks.wait())
            .await
            .is_err()
        {
            let cut = self.connections.calls_in_flight();
            if cut > 0 {
                tracing::warn!(
                    calls = cut,
                    timeout_s = drain_timeout.as_secs_f64(),
                    "shutdown timeout: calls still in flight are cut"
                );
            }
            stop.cancel();
            tasks.wait().await;
        }
    }
}
