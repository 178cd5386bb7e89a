//! The codec of tollgate's own gRPC services: prost's encoding, with a decoder that answers a
//! request that is not a valid protobuf message as the caller's error.
//!
//! tonic's `ProstCodec` turns every `DecodeError` into INTERNAL, which tells a caller the
//! server failed; but invalid UTF-8 in a string, a wrong wire type or a truncated message is a
//! bad request, and the README promises INVALID_ARGUMENT for bad requests. The decoder is the
//! one place that knows the error came from the bytes received, so the code is chosen there
//! rather than by rewriting statuses afterwards. build.rs names this codec for the generated
//! servers only: the generated clients (relay, `tollgate usage`) keep `ProstCodec`, since an
//! answer that does not decode is not the caller's fault.
//!
//! The encoder is our own too, for speed: prost writes every varint and key one byte at a time
//! (`put_u8`), and tonic's `EncodeBuf` forwards each byte to `BytesMut::extend_from_slice`, a
//! capacity check and a `memcpy` call per byte: about 3 % of a dry-run Reserve's server CPU
//! (BENCHMARKS.md, "hot path"). [`ByteWriter`] writes a byte in place instead.

use std::marker::PhantomData;

use bytes::buf::UninitSlice;
use bytes::BufMut;
use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// prost encoding and decoding; a request that does not decode is INVALID_ARGUMENT.
#[derive(Debug)]
pub struct RequestCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for RequestCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = AnswerEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        AnswerEncoder { _type: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder { _type: PhantomData }
    }
}

/// Decodes a request message; prost's error (which names the message and field) becomes the
/// INVALID_ARGUMENT message.
#[derive(Debug)]
pub struct RequestDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            Status::invalid_argument(format!("the request is not a valid protobuf message: {e}"))
        })
    }
}

/// Encodes an answer: its whole length reserved once, then written through [`ByteWriter`].
#[derive(Debug)]
pub struct AnswerEncoder<T> {
    _type: PhantomData<T>,
}

impl<T: Message> Encoder for AnswerEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode_raw(&mut ByteWriter(buf));
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// A `BufMut` over tonic's buffer (or any other) whose `put_u8` writes the byte in place (see the module
/// documentation); everything else is the buffer's own.
struct ByteWriter<'a, B>(&'a mut B);

// SAFETY: every method forwards to the inner `BufMut`, except `put_u8`, which writes one byte
// into the chunk `chunk_mut` returned (never empty for a growable buffer; otherwise forwarded)
// before advancing past that byte alone.
unsafe impl<B: BufMut> BufMut for ByteWriter<'_, B> {
    #[inline]
    fn remaining_mut(&self) -> usize {
        self.0.remaining_mut()
    }

    #[inline]
    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.0.advance_mut(cnt) }
    }

    #[inline]
    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.0.chunk_mut()
    }

    #[inline]
    fn put_slice(&mut self, src: &[u8]) {
        self.0.put_slice(src);
    }

    #[inline]
    fn put_u8(&mut self, n: u8) {
        let chunk = self.0.chunk_mut();
        if chunk.len() == 0 {
            self.0.put_slice(&[n]);
            return;
        }
        chunk.write_byte(0, n);
        // SAFETY: the byte just written is initialised.
        unsafe { self.0.advance_mut(1) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    /// Every kind of field a Quota answer has: varints, strings, nested and repeated messages.
    fn answer() -> proto::ReserveResponse {
        let limit = |i: u64| proto::LimitStatus {
            name: format!("limit_{i}"),
            limit: 1_000_000_000_000_000 - i,
            remaining: i * 300,
            reset_after: Some(prost_types::Duration {
                seconds: 59,
                nanos: 999_000,
            }),
            scope: "subject".into(),
            scope_id: "ü-subject".into(),
        };
        proto::ReserveResponse {
            decision: proto::Decision::Allowed as i32,
            reservation_id: "0193c4e8-0000-7000-8000-000000000001".into(),
            model: "gpt-4o".into(),
            reserved_tokens: 200,
            limits: (0..9).map(limit).collect(),
            expires_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 1,
            }),
            reserved_micro_usd: u64::MAX,
            tier: "bench".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_byte_writer_encodes_exactly_as_prost_does() {
        let answer = answer();
        // From empty (the buffer grows under the writer) and from a reserved buffer.
        for capacity in [0, answer.encoded_len()] {
            let mut buf = bytes::BytesMut::with_capacity(capacity);
            answer.encode_raw(&mut ByteWriter(&mut buf));
            assert_eq!(&buf[..], &answer.encode_to_vec()[..]);
        }
    }
}
