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

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

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
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
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
