//! The service of one connection: every call is counted while in flight, its metadata
//! bounded, and its request body paid for as it arrives, before tonic's `Routes` see it.
//!
//! A call is in flight from the moment its headers are dispatched until its answer has been
//! sent whole or the stream is reset: the guard lives in the response body, which hyper drops
//! at either. The connection's idle timeout, its close after GOAWAY and the shutdown log all
//! read these counts.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::Status;
use tower::Service;

use super::arrival::{ArrivingBody, ConnectionBudget};
use super::connections::{CallGuard, Connection};
use super::metadata;
use super::tls::PeerIdentity;

/// Routes, behind the per-call bounds of one connection.
#[derive(Clone)]
pub(super) struct CallService {
    routes: Routes,
    connection: Arc<Connection>,
    budget: ConnectionBudget,
    /// Who the peer proved to be (mTLS), handed to every call in its extensions.
    peer: Option<Arc<PeerIdentity>>,
}

impl CallService {
    pub(super) fn new(
        routes: Routes,
        connection: Arc<Connection>,
        budget: ConnectionBudget,
        peer: Option<Arc<PeerIdentity>>,
    ) -> Self {
        Self {
            peer,
            routes,
            connection,
            budget,
        }
    }
}

type CallFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl Service<Request<Incoming>> for CallService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = CallFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Routes are always ready; calls are bounded by HTTP/2's stream limit.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let call = self.connection.start_call();
        if let Some(status) = metadata::oversized(request.headers()) {
            return Box::pin(std::future::ready(Ok(answered(status.into_http(), call))));
        }
        let budget = &self.budget;
        let mut request = request.map(|body| Body::new(ArrivingBody::new(body, budget)));
        if let Some(peer) = &self.peer {
            request.extensions_mut().insert(peer.clone());
        }
        let answer = self.routes.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(answered(response, call))
        })
    }
}

/// `response`, whose call stays in flight until its body has been sent or dropped.
fn answered(response: Response<Body>, call: CallGuard) -> Response<Body> {
    response.map(|body| Body::new(InFlight { body, _call: call }))
}

/// A response body carrying its call's guard.
struct InFlight {
    body: Body,
    _call: CallGuard,
}

impl HttpBody for InFlight {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
