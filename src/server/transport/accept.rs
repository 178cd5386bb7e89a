//! Accepting connections without spinning when `accept` fails.
//!
//! Once the process is out of descriptors (EMFILE, or ENFILE for the whole system), `accept`
//! fails at once for as long as a connection waits in the backlog; retrying at once (what
//! tonic's server does) spins a core and starves the connections that could free one. Here a
//! failure is logged (rate-limited) and retried after a delay that doubles from 5 ms to 1 s, as
//! Go's net/http does; the delay resets with the next success. Errors that concern only the
//! connection being accepted (the peer reset it while it waited) are retried at once.

use std::io;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::connections::Connections;
use super::log_limit::{LogLimit, INTERVAL};

/// The first delay after a failed `accept`.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// The longest delay between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The listener, and how long to wait after the next failure.
pub(super) struct Acceptor {
    listener: TcpListener,
    backoff: Duration,
    failures: LogLimit,
}

impl Acceptor {
    pub(super) fn new(listener: TcpListener) -> Self {
        Self {
            listener,
            backoff: FIRST_BACKOFF,
            failures: LogLimit::new(INTERVAL),
        }
    }

    /// The next connection. Cancel-safe: dropping the future loses no connection.
    pub(super) async fn accept(&mut self, connections: &Connections) -> TcpStream {
        loop {
            match self.listener.accept().await {
                Ok((stream, _peer)) => {
                    self.backoff = FIRST_BACKOFF;
                    return stream;
                }
                Err(e) if concerns_one_connection(&e) => {
                    tracing::debug!(error = %e, "accept: connection gone before it was accepted");
                }
                Err(e) => {
                    if let Some(suppressed) = self.failures.ready() {
                        tracing::warn!(
                            error = %e,
                            open_connections = connections.open(),
                            retry_ms = u64::try_from(self.backoff.as_millis()).unwrap_or(u64::MAX),
                            suppressed,
                            "cannot accept connections: backing off"
                        );
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// An `accept` error about the connection being accepted, not the listener or the process.
fn concerns_one_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::PermissionDenied
    )
}
