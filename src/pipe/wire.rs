//! Which wire a child speaks: procbroker's framed envelopes, or
//! MessagePack-RPC translated to envelopes at the pipe. Both
//! read and write envelopes, so the bridge and the Router do not care.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::protocol::msgpack_rpc::MsgpackRpcCodec;
use crate::protocol::{Envelope, EnvelopeCodec, FrameError, InvalidEnvelope};

/// The codec of one child's pipes.
#[derive(Debug, Clone)]
pub enum WireCodec {
    /// Length-prefixed envelopes.
    Envelope(EnvelopeCodec),
    /// MessagePack-RPC; the reader's and the writer's clones share the
    /// msgids in flight.
    MsgpackRpc(MsgpackRpcCodec),
}

impl From<EnvelopeCodec> for WireCodec {
    fn from(codec: EnvelopeCodec) -> Self {
        Self::Envelope(codec)
    }
}

impl From<MsgpackRpcCodec> for WireCodec {
    fn from(codec: MsgpackRpcCodec) -> Self {
        Self::MsgpackRpc(codec)
    }
}

/// What a child's stdout yields: an envelope, or a frame that is not one.
/// Both boxed: from here an envelope is handed on a dozen times (a batch,
/// the bridge, the Router, the recipient's inbox), and a pointer moves
/// where a few hundred bytes would.
pub type Incoming = Result<Box<Envelope>, Box<InvalidEnvelope>>;

impl WireCodec {
    /// Encodes `envelope` as [`Encoder::encode`] does, except that on the
    /// envelope wire a payload of `min_payload` bytes or more is not copied:
    /// the frame up to it goes into `dst` and the payload's bytes are
    /// returned, to be written right after. MessagePack-RPC frames are
    /// always encoded whole (`None`).
    pub fn encode_split(
        &mut self,
        envelope: &Envelope,
        dst: &mut BytesMut,
        min_payload: usize,
    ) -> Result<Option<Bytes>, FrameError> {
        match self {
            Self::Envelope(c) => c.encode_split(envelope, dst, min_payload),
            Self::MsgpackRpc(c) => c.encode(envelope, dst).map(|()| None),
        }
    }
}

impl Decoder for WireCodec {
    type Item = Incoming;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Incoming>, FrameError> {
        let decoded = match self {
            Self::Envelope(c) => c.decode(src),
            Self::MsgpackRpc(c) => c.decode(src),
        };
        Ok(decoded?.map(boxed))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Incoming>, FrameError> {
        let decoded = match self {
            Self::Envelope(c) => c.decode_eof(src),
            Self::MsgpackRpc(c) => c.decode_eof(src),
        };
        Ok(decoded?.map(boxed))
    }
}

#[inline]
fn boxed(decoded: Result<Envelope, InvalidEnvelope>) -> Incoming {
    decoded.map(Box::new).map_err(Box::new)
}

impl Encoder<&Envelope> for WireCodec {
    type Error = FrameError;

    fn encode(&mut self, envelope: &Envelope, dst: &mut BytesMut) -> Result<(), FrameError> {
        match self {
            Self::Envelope(c) => c.encode(envelope, dst),
            Self::MsgpackRpc(c) => c.encode(envelope, dst),
        }
    }
}
