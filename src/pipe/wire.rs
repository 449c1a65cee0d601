//! Which wire a child speaks: procbroker's framed envelopes, or
//! MessagePack-RPC translated to envelopes at the pipe. Both
//! read and write envelopes, so the bridge and the Router do not care.

use bytes::BytesMut;
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

impl Decoder for WireCodec {
    type Item = Result<Envelope, InvalidEnvelope>;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        match self {
            Self::Envelope(c) => c.decode(src),
            Self::MsgpackRpc(c) => c.decode(src),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        match self {
            Self::Envelope(c) => c.decode_eof(src),
            Self::MsgpackRpc(c) => c.decode_eof(src),
        }
    }
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
