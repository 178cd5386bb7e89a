//! A call's metadata is bounded per call, so that a large header block costs its call, not the
//! connection.
//!
//! HTTP/2 decodes header blocks up to [`MAX_HEADER_LIST_BYTES`](super::MAX_HEADER_LIST_BYTES)
//! (past it h2 refuses the stream or, for a block it would have to buffer whole, closes the
//! connection); what tollgate's calls need is far less (an authorization token, a few tracing
//! headers), and every call in flight keeps its metadata, so a call over
//! [`MAX_METADATA_BYTES`] is answered RESOURCE_EXHAUSTED at once (as gRPC's C core answers
//! metadata over its limit) and other calls on the connection go on.

use http::HeaderMap;
use tonic::Status;

use super::MAX_METADATA_BYTES;

/// The per-field overhead HTTP/2 counts in a header list's size (RFC 9113, 6.5.2).
const FIELD_OVERHEAD: usize = 32;

/// The refusal of a call whose metadata is over the bound; None if it is within it.
pub(super) fn oversized(headers: &HeaderMap) -> Option<Status> {
    let size: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + FIELD_OVERHEAD)
        .sum();
    (size > MAX_METADATA_BYTES).then(|| {
        Status::resource_exhausted(format!(
            "the call's metadata is {size} bytes; at most {MAX_METADATA_BYTES} are accepted"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_over_the_bound_is_refused() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer x".parse().unwrap());
        assert!(oversized(&headers).is_none());
        headers.insert("x-big", "a".repeat(MAX_METADATA_BYTES).parse().unwrap());
        let status = oversized(&headers).expect("refused");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("16384"), "{status:?}");
    }
}
