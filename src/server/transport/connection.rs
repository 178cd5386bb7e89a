//! One connection's life, from accept to close.
//!
//! Serving: hyper's HTTP/2 connection, until the peer closes it, or it sends no preface within
//! the arrival timeout (dropped: nothing was said, nothing to close gracefully), or it is
//! evicted at the connection bound (dropped: it had no call in flight), or it has had no call
//! in flight for the idle timeout, or shutdown begins.
//!
//! Closing (idle timeout or shutdown): GOAWAY, so the client sends no new call here and
//! reconnects for its next one; calls in flight finish; the connection closes when the client
//! has answered, or is dropped once it has no call in flight and the peer has been silent for
//! [`CLOSE_GRACE`] since GOAWAY: a peer that never answers holds nothing, one still sending
//! (a request it sent before it saw GOAWAY) is heard out. At shutdown a connection that never
//! sent its preface is dropped at once.
//!
//! The connection is polled before the timers (`biased`), so bytes that have arrived are
//! always read (and a call they carry counted) before a timer decides the connection is idle.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tower::Layer;

use super::arrival;
use super::calls::CallService;
use super::connections::{Connection, Slot};
use super::heard::{Heard, Listened};
use super::tls::{PeerIdentity, TlsConfig};
use super::CLOSE_GRACE;
use crate::server::content_type::GrpcOnlyLayer;
use tokio_util::either::Either;

/// What every connection of a listener shares.
pub(super) struct Shared {
    pub(super) http: http2::Builder<TokioExecutor>,
    /// TLS on this port, if configured.
    pub(super) tls: Option<Arc<TlsConfig>>,
    pub(super) routes: Routes,
    pub(super) arrival: arrival::Bounds,
    pub(super) idle_timeout: Duration,
}

/// Serve one accepted connection until it closes (see the module documentation). `draining`
/// is shutdown beginning; `stop` the drain timing out.
pub(super) async fn serve(
    stream: TcpStream,
    slot: Slot,
    shared: Arc<Shared>,
    draining: CancellationToken,
    stop: CancellationToken,
) {
    let connection = slot.connection().clone();
    let (io, heard) = Listened::new(stream);
    // With TLS, the handshake first: within the arrival timeout (a peer that opens a
    // connection and never finishes its handshake holds nothing for longer), and not past the
    // start of shutdown. A failed handshake (a plaintext client, no client certificate or one
    // another CA signed) closes the connection; rustls has sent its alert.
    let (io, peer) = match &shared.tls {
        None => (Either::Left(io), None),
        Some(tls) => {
            let handshake =
                tokio::time::timeout(shared.arrival.timeout(), tls.acceptor().accept(io));
            let done = tokio::select! {
                done = handshake => done,
                () = draining.cancelled() => return,
            };
            match done {
                Ok(Ok(stream)) => {
                    let peer = PeerIdentity::of(stream.get_ref().1.peer_certificates());
                    (Either::Right(stream), peer.map(Arc::new))
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed: connection closed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(
                        "no TLS handshake within the arrival timeout: connection dropped"
                    );
                    return;
                }
            }
        }
    };
    let service = GrpcOnlyLayer.layer(CallService::new(
        shared.routes.clone(),
        connection.clone(),
        shared.arrival.for_connection(),
        peer,
    ));
    let conn = shared
        .http
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);

    tokio::select! {
        biased;
        result = conn.as_mut() => return log_end(result),
        () = stop.cancelled() => return,
        () = connection.evicted() => return,
        () = heard.preface_missed(shared.arrival.timeout()) => {
            tracing::debug!("no HTTP/2 preface within the arrival timeout: connection dropped");
            return;
        }
        () = draining.cancelled() => {
            if !heard.preface_arrived() {
                return;
            }
        }
        () = connection.idle_for(shared.idle_timeout) => {
            tracing::debug!("idle timeout: connection closing");
        }
    }

    conn.as_mut().graceful_shutdown();
    let goaway = Instant::now();
    tokio::select! {
        biased;
        result = conn.as_mut() => log_end(result),
        () = stop.cancelled() => {},
        () = connection.evicted() => {},
        () = silent_without_calls(&connection, &heard, goaway) => {},
    }
}

/// Completes once the connection has no call in flight and its peer has sent nothing for
/// [`CLOSE_GRACE`], counted from GOAWAY at the earliest.
async fn silent_without_calls(connection: &Connection, heard: &Heard, goaway: Instant) {
    loop {
        connection.no_calls().await;
        let quiet_until = Instant::from_std(heard.last_read()).max(goaway) + CLOSE_GRACE;
        if Instant::now() >= quiet_until {
            return;
        }
        tokio::time::sleep_until(quiet_until).await;
    }
}

fn log_end(result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended");
    }
}
