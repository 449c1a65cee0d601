//! Frames: a 4-byte big-endian length, then that many bytes.
//!
//! Hand-written rather than `tokio_util`'s `LengthDelimitedCodec` because the
//! protocol needs what that codec reports only as an opaque `io::Error`: a
//! typed "too large" (with the length, checked before any allocation) and a
//! typed "stream ended inside a frame", which the broker answers by
//! restarting the child. The whole framing is the twenty lines below.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::error::FrameError;

/// Default `max_frame_bytes`: 16 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Size of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// Splits a byte stream into frame bodies (`Bytes`, zero-copy) and writes
/// bodies with their prefix. A zero-length frame is returned as empty `Bytes`
/// for the layer above to reject; the stream stays in sync either way.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_frame_bytes: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_BYTES)
    }
}

impl FrameCodec {
    /// A codec that refuses frames longer than `max_frame_bytes` (capped at
    /// `u32::MAX`, the most a 4-byte prefix can say).
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            max_frame_bytes: max_frame_bytes.min(u32::MAX as usize),
        }
    }

    /// The limit in force.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Checks a body length against the limit.
    pub fn check_len(&self, len: usize) -> Result<(), FrameError> {
        if len > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: self.max_frame_bytes,
            });
        }
        Ok(())
    }
}

impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let Some(prefix) = src.first_chunk::<LENGTH_PREFIX>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        // Checked before anything is reserved for the body.
        self.check_len(len)?;
        let total = LENGTH_PREFIX + len;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(LENGTH_PREFIX);
        Ok(Some(src.split_to(len).freeze()))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => {
                let expected = src
                    .first_chunk::<LENGTH_PREFIX>()
                    .map_or(LENGTH_PREFIX, |p| {
                        LENGTH_PREFIX + u32::from_be_bytes(*p) as usize
                    });
                Err(FrameError::Truncated {
                    expected,
                    buffered: src.len(),
                })
            }
        }
    }
}

impl<B: AsRef<[u8]>> Encoder<B> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, body: B, dst: &mut BytesMut) -> Result<(), FrameError> {
        let body = body.as_ref();
        self.check_len(body.len())?;
        dst.reserve(LENGTH_PREFIX + body.len());
        dst.put_u32(body.len() as u32);
        dst.put_slice(body);
        Ok(())
    }
}
