//! A request while it arrives: the bytes it may hold and how long it may take.
//!
//! tonic reads a request body as fast as the peer sends it, reserves each message's declared
//! length as soon as it has read the message's prefix, and keeps it all until the message is
//! whole, so a peer sending most of a large message on many streams and never finishing pinned
//! gigabytes. Here a request holds budget, in bytes, from its connection's budget and from the
//! budget of all connections, for what tonic buffers for it: a frame, plus the longest message
//! a prefix has declared, taken when the chunk carrying that prefix arrives and before tonic
//! sees it. What a request holds only grows, and is freed when its body has ended (or the call
//! is gone).
//!
//! A request whose bytes do not fit is refused at once (RESOURCE_EXHAUSTED, as every full
//! bound in tollgate), not made to wait: a request waiting for budget would leave its data
//! unread in HTTP/2, where it takes the connection's shared flow window, and the requests that
//! hold the budget could then not receive the rest of theirs (a request on the same
//! connection) and free it. Read at once, unread data never builds up, so a connection's
//! memory is its requests' budget.
//!
//! The whole body must arrive within the arrival timeout; otherwise the call is answered
//! DEADLINE_EXCEEDED and its bytes are freed. Processing (counting a prompt, the disk) starts
//! after the body has ended and is not timed here. The body is also followed through its gRPC
//! framing ([`Framing`]), so a truncated or empty one is INVALID_ARGUMENT.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::Status;

use super::framing::{Framing, PREFIX_LEN};
use super::MAX_FRAME_BYTES;

/// The budgets of a listener and the arrival timeout.
#[derive(Debug, Clone)]
pub(super) struct Bounds {
    all: Arc<Semaphore>,
    all_bytes: usize,
    per_connection: usize,
    timeout: Duration,
}

/// The budgets as one connection uses them.
#[derive(Debug, Clone)]
pub(super) struct ConnectionBudget {
    all: Arc<Semaphore>,
    all_bytes: usize,
    connection: Arc<Semaphore>,
    connection_bytes: usize,
    timeout: Duration,
}

impl Bounds {
    pub(super) fn new(all_bytes: usize, connection_bytes: usize, timeout: Duration) -> Self {
        Self {
            all: Arc::new(Semaphore::new(all_bytes)),
            all_bytes,
            per_connection: connection_bytes,
            timeout,
        }
    }

    pub(super) fn for_connection(&self) -> ConnectionBudget {
        ConnectionBudget {
            all: self.all.clone(),
            all_bytes: self.all_bytes,
            connection: Arc::new(Semaphore::new(self.per_connection)),
            connection_bytes: self.per_connection,
            timeout: self.timeout,
        }
    }

    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// What a request holds: as many bytes of its connection's budget as of all connections'.
#[derive(Debug, Default)]
struct Held {
    connection: Option<OwnedSemaphorePermit>,
    all: Option<OwnedSemaphorePermit>,
}

impl Held {
    fn bytes(&self) -> usize {
        self.all
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }
}

/// A request body that holds budget for what tonic buffers, and must arrive within the timeout.
pub(super) struct ArrivingBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    budget: ConnectionBudget,
    /// The most a request may hold: one that would need more is not charged, since tonic
    /// refuses a message over the largest size, which is well within a connection's budget.
    payable: usize,
    held: Held,
    received: u64,
    framing: Framing,
    ended: bool,
}

impl ArrivingBody {
    pub(super) fn new(inner: Incoming, budget: &ConnectionBudget) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(budget.timeout)),
            budget: budget.clone(),
            payable: budget
                .connection_bytes
                .min(budget.all_bytes)
                .min(u32::MAX as usize),
            held: Held::default(),
            received: 0,
            framing: Framing::default(),
            ended: false,
        }
    }

    /// The body is over (ended, failed or refused): what it held is freed.
    fn end(&mut self) {
        self.ended = true;
        self.held = Held::default();
    }

    fn fail(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.end();
        Poll::Ready(Some(Err(status)))
    }

    /// Hold `want` bytes in all (what is held only grows), or say which budget is full.
    fn hold(&mut self, want: usize) -> Result<(), Status> {
        let extra = want.saturating_sub(self.held.bytes());
        if extra == 0 || want > self.payable {
            return Ok(());
        }
        let extra = u32::try_from(extra).unwrap_or(u32::MAX);
        let full = |what: &str, bytes: usize| {
            Status::resource_exhausted(format!(
                "{what} is already receiving its bound of request bytes ({bytes}); retry shortly"
            ))
        };
        let connection = self
            .budget
            .connection
            .clone()
            .try_acquire_many_owned(extra)
            .map_err(|_| full("this connection", self.budget.connection_bytes))?;
        let all = self
            .budget
            .all
            .clone()
            .try_acquire_many_owned(extra)
            .map_err(|_| {
                full(
                    "the server (--max-request-bytes-in-flight)",
                    self.budget.all_bytes,
                )
            })?;
        for (held, more) in [
            (&mut self.held.connection, connection),
            (&mut self.held.all, all),
        ] {
            match held {
                Some(h) => h.merge(more),
                None => *held = Some(more),
            }
        }
        Ok(())
    }

    /// A chunk arrived: follow its framing and hold what tonic will buffer for it.
    fn arrived(&mut self, data: &Bytes) -> Result<(), Status> {
        self.received += data.len() as u64;
        let declared = self.framing.observe(data)?;
        let frame = MAX_FRAME_BYTES as usize;
        let message = declared.map_or(0, |len| len as usize + PREFIX_LEN);
        self.hold(frame + message)
    }
}

impl Body for ArrivingBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            let status = Status::deadline_exceeded(format!(
                "the request did not arrive whole within {} s ({} bytes arrived; \
                 --request-arrival-timeout)",
                this.budget.timeout.as_secs_f64(),
                this.received
            ));
            return this.fail(status);
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                let arrived = frame.data_ref().map_or(Ok(()), |data| this.arrived(data));
                match arrived {
                    Ok(()) => Poll::Ready(Some(Ok(frame))),
                    Err(status) => this.fail(status),
                }
            }
            Some(Err(e)) => {
                let status = Status::from_error(Box::new(e));
                this.fail(status)
            }
            None => {
                let framing = this.framing.finish();
                this.end();
                match framing {
                    Ok(()) => Poll::Ready(None),
                    Err(status) => Poll::Ready(Some(Err(status))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not the inner body's: the end must be polled, so the framing is checked at it.
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
