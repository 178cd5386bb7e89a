//! Only gRPC calls reach the services: an HTTP/2 request that is not one is refused before any
//! service sees it, so it can change nothing.
//!
//! tonic routes by path alone: a POST to `/tollgate.v1.Quota/Reserve` with no content-type,
//! `text/plain` or `application/json` and a body that happens to decode would make a hold. A
//! gRPC call is a POST whose content-type is `application/grpc`, optionally with a subtype
//! naming the message encoding (`application/grpc+proto`) and parameters after `;`. tollgate
//! speaks protobuf only, so `+json` and other subtypes are refused as well. The answers follow
//! grpc-go: HTTP 415 for another content-type, 405 for another method, with a short text body
//! saying what is expected, since the client is by definition not a gRPC client.

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{header, Method, Request, Response, StatusCode};
use tonic::body::Body;
use tower::{Layer, Service};

/// What the refusals say.
const EXPECTED: &str = "tollgate serves gRPC only: a call is an HTTP/2 POST with content-type \
                        application/grpc or application/grpc+proto\n";

/// Puts [`GrpcOnly`] in front of a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcOnlyLayer;

impl<S> Layer<S> for GrpcOnlyLayer {
    type Service = GrpcOnly<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcOnly { inner }
    }
}

/// Passes gRPC calls to the inner service and answers anything else itself (415 or 405).
#[derive(Debug, Clone)]
pub struct GrpcOnly<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for GrpcOnly<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
    S::Future: Unpin,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = GrpcOnlyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match refusal(&request) {
            Some(status) => GrpcOnlyFuture::Refused(ready(Ok(refuse(status)))),
            None => GrpcOnlyFuture::Call(self.inner.call(request)),
        }
    }
}

/// The answer of [`GrpcOnly`]: the refusal, or the inner service's answer.
#[derive(Debug)]
pub enum GrpcOnlyFuture<F> {
    /// Not a gRPC call: answered here.
    Refused(Ready<Result<Response<Body>, Infallible>>),
    /// A gRPC call: the inner service answers.
    Call(F),
}

impl<F> Future for GrpcOnlyFuture<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>> + Unpin,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            GrpcOnlyFuture::Refused(refusal) => Pin::new(refusal).poll(cx),
            GrpcOnlyFuture::Call(call) => Pin::new(call).poll(cx),
        }
    }
}

/// Why `request` is not a gRPC call this server accepts, as the HTTP status to answer.
fn refusal<B>(request: &Request<B>) -> Option<StatusCode> {
    if request.method() != Method::POST {
        return Some(StatusCode::METHOD_NOT_ALLOWED);
    }
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_grpc_proto);
    (!grpc).then_some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
}

/// `application/grpc` or `application/grpc+proto`, in any case, parameters allowed.
fn is_grpc_proto(content_type: &str) -> bool {
    let media_type = content_type
        .split_once(';')
        .map_or(content_type, |(t, _)| t)
        .trim();
    media_type.eq_ignore_ascii_case("application/grpc")
        || media_type.eq_ignore_ascii_case("application/grpc+proto")
}

fn refuse(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Body::new(http_body_util::Full::new(
        bytes::Bytes::from_static(EXPECTED.as_bytes()),
    )));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, header::HeaderValue::from_static("POST"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_are_recognised() {
        for ok in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC",
            "application/grpc; charset=utf-8",
            "application/grpc+proto;x=1",
        ] {
            assert!(is_grpc_proto(ok), "{ok}");
        }
        for refused in [
            "",
            "text/plain",
            "application/json",
            "application/grpc+json",
            "application/grpc-web",
            "application/grpcx",
            "application/grpc+protobuf",
        ] {
            assert!(!is_grpc_proto(refused), "{refused}");
        }
    }

    #[test]
    fn only_grpc_posts_pass() {
        let call = |method: Method, content_type: Option<&str>| {
            let mut r = Request::builder()
                .method(method)
                .uri("/tollgate.v1.Quota/Reserve");
            if let Some(t) = content_type {
                r = r.header(header::CONTENT_TYPE, t);
            }
            refusal(&r.body(()).unwrap())
        };
        assert_eq!(call(Method::POST, Some("application/grpc")), None);
        assert_eq!(
            call(Method::POST, None),
            Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
        assert_eq!(
            call(Method::POST, Some("text/plain")),
            Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
        assert_eq!(
            call(Method::GET, Some("application/grpc")),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
    }
}
