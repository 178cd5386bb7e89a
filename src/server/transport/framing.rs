//! The gRPC framing of a request body, followed as it arrives, so that a body that is not a
//! whole sequence of messages is answered as the bad request it is.
//!
//! Each message is a 5-byte prefix (a compression flag, a big-endian u32 length) and that many
//! bytes. tonic answers a body that ends inside a message ("Unexpected EOF") and one that
//! carries no message ("Missing request message") with INTERNAL, and a set compression flag
//! with INTERNAL too; all three are the caller's error. Every call this server serves carries
//! at least one message, and none of its services accepts compression (tonic refuses a
//! `grpc-encoding` it does not accept before reading the body), so any set flag is refused.
//!
//! It also says what each chunk declares: tonic reserves a message's declared length as soon
//! as it has read the prefix, so that length is what the request will hold, and what its
//! budget must cover before tonic sees the chunk (`super::arrival`).

use tonic::Status;

/// The length prefix of a gRPC message.
pub(super) const PREFIX_LEN: usize = 5;

/// Where the body is in its framing.
#[derive(Debug, Default)]
pub(super) struct Framing {
    prefix: [u8; PREFIX_LEN],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
    messages: u64,
}

impl Framing {
    /// Follow `data`, the next bytes of the body; the largest message length a prefix
    /// completed in it declares, if any.
    pub(super) fn observe(&mut self, mut data: &[u8]) -> Result<Option<u32>, Status> {
        let mut largest = None;
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = data
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                self.remaining -= take as u64;
                data = &data[take..];
                if self.remaining == 0 {
                    self.messages += 1;
                }
                continue;
            }
            let take = data.len().min(PREFIX_LEN - self.prefix_len);
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
            self.prefix_len += take;
            data = &data[take..];
            if self.prefix_len == PREFIX_LEN {
                self.prefix_len = 0;
                if self.prefix[0] != 0 {
                    return Err(Status::invalid_argument(
                        "a request message is marked compressed: this server accepts \
                         uncompressed messages only",
                    ));
                }
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]);
                largest = largest.max(Some(len));
                if len == 0 {
                    self.messages += 1;
                } else {
                    self.remaining = u64::from(len);
                }
            }
        }
        Ok(largest)
    }

    /// The body has ended: it must have ended between messages, after at least one.
    pub(super) fn finish(&self) -> Result<(), Status> {
        if self.prefix_len > 0 || self.remaining > 0 {
            return Err(Status::invalid_argument(
                "the request ends inside a message: the message is truncated",
            ));
        }
        if self.messages == 0 {
            return Err(Status::invalid_argument("the request carries no message"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn whole_messages_in_any_chunks_pass() {
        let mut body = frame(b"hello");
        body.extend(frame(b""));
        body.extend(frame(&[7; 300]));
        for chunk in [1, 2, 5, 6, 64, body.len()] {
            let mut f = Framing::default();
            let mut largest = None;
            for piece in body.chunks(chunk) {
                largest = largest.max(f.observe(piece).unwrap());
            }
            f.finish().unwrap();
            assert_eq!(f.messages, 3);
            assert_eq!(largest, Some(300));
        }
    }

    #[test]
    fn a_truncated_body_an_empty_one_and_a_compressed_flag_are_refused() {
        let whole = frame(b"hello");
        for cut in 1..whole.len() {
            let mut f = Framing::default();
            f.observe(&whole[..cut]).unwrap();
            let e = f.finish().unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains("truncated"), "{e:?}");
        }
        let e = Framing::default().finish().unwrap_err();
        assert!(e.message().contains("no message"), "{e:?}");
        let mut compressed = frame(b"x");
        compressed[0] = 1;
        let e = Framing::default().observe(&compressed).unwrap_err();
        assert!(e.message().contains("compressed"), "{e:?}");
    }
}
