//! The envelope codec: frames in, envelopes out, and back.

use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::envelope::{Envelope, salvage_request};
use super::error::{FrameError, InvalidEnvelope};
use super::frame::{FrameCodec, LENGTH_PREFIX};

/// Decodes frames into envelopes and encodes envelopes into frames.
///
/// The two failure classes (the stream is out of sync: restart the child;
/// one frame is bad: count it and go on) are two layers of the item type:
/// - `Err(FrameError)` from the decoder ends the stream (out of sync);
/// - `Ok(Some(Err(InvalidEnvelope)))` is one bad frame; keep reading.
///
/// Use with `FramedRead` / `FramedWrite`. The encoder writes the map straight
/// into the output buffer: no intermediate allocation, one reservation.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnvelopeCodec {
    frames: FrameCodec,
}

impl EnvelopeCodec {
    /// A codec with the given `max_frame_bytes` for both directions.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            frames: FrameCodec::new(max_frame_bytes),
        }
    }

    /// The frame limit in force.
    pub fn max_frame_bytes(&self) -> usize {
        self.frames.max_frame_bytes()
    }

    /// Encodes `envelope` as [`Encoder::encode`] does, except that a payload
    /// of `min_payload` bytes or more is not copied: the frame up to the
    /// payload's bytes goes into `dst`, and the payload's bytes are returned,
    /// to be written right after it. Together they are the same bytes.
    pub fn encode_split(
        &mut self,
        envelope: &Envelope,
        dst: &mut BytesMut,
        min_payload: usize,
    ) -> Result<Option<Bytes>, FrameError> {
        let layout = envelope.layout();
        self.frames.check_len(layout.len)?;
        let apart = envelope
            .payload
            .as_ref()
            .filter(|payload| payload.len() >= min_payload);
        let copied = layout.len - apart.map_or(0, |payload| payload.len());
        dst.reserve(LENGTH_PREFIX + copied);
        dst.put_u32(layout.len as u32);
        match apart {
            Some(payload) => {
                envelope.encode_head(dst, layout);
                Ok(Some(payload.as_bytes().clone()))
            }
            None => {
                envelope.encode_laid_out(dst, layout);
                Ok(None)
            }
        }
    }

    /// The envelope of one frame, or why it is not one. Inlined, with the
    /// item built where the decoder returns it: an envelope is a few hundred
    /// bytes, and wrapping it in one `Result` and `Option` after another
    /// would copy it each time.
    #[inline(always)]
    fn envelope(frame: &bytes::Bytes) -> Result<Envelope, InvalidEnvelope> {
        Envelope::decode_mapped(frame, |error| InvalidEnvelope {
            error,
            len: frame.len(),
            request: salvage_request(frame),
        })
    }
}

impl Decoder for EnvelopeCodec {
    type Item = Result<Envelope, InvalidEnvelope>;
    type Error = FrameError;

    #[inline]
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        let Some(frame) = self.frames.decode(src)? else {
            return Ok(None);
        };
        Ok(Some(Self::envelope(&frame)))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        let Some(frame) = self.frames.decode_eof(src)? else {
            return Ok(None);
        };
        Ok(Some(Self::envelope(&frame)))
    }
}

impl Encoder<&Envelope> for EnvelopeCodec {
    type Error = FrameError;

    fn encode(&mut self, envelope: &Envelope, dst: &mut BytesMut) -> Result<(), FrameError> {
        // No payload is large enough to be left out: the frame is whole.
        self.encode_split(envelope, dst, usize::MAX).map(drop)
    }
}

impl Encoder<Envelope> for EnvelopeCodec {
    type Error = FrameError;

    fn encode(&mut self, envelope: Envelope, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode(&envelope, dst)
    }
}
