//! Wire protocol v1: length-prefixed frames holding MessagePack envelopes.
//!
//! Layers, bottom up:
//! - [`FrameCodec`]: `u32` big-endian length + body; the limit is checked
//!   before anything is allocated.
//! - [`Envelope`]: the map inside a frame, decoded without copying; its
//!   [`Payload`] is carried as raw bytes and only decoded by whoever it is for.
//! - [`EnvelopeCodec`]: both together, for `FramedRead` / `FramedWrite`, with
//!   "stream broken" ([`FrameError`]) and "bad frame" ([`InvalidEnvelope`])
//!   kept apart because the broker answers them differently.
//! - [`msgpack_rpc`]: the other wire a child may speak, MessagePack-RPC
//!   (DESIGN 12), translated to and from envelopes at the pipe.
//! - [`federation`]: between brokers of a cluster (DESIGN 11), the NATS
//!   subjects, headers and heartbeat around unchanged envelopes.
//! - Typed payloads of the broker's RPCs ([`rpc`]) and stats ([`stats`]).
//!
//! `PROTOCOL.md` at the repository root is the same contract written for
//! service authors in other languages.

mod codec;
mod envelope;
mod error;
mod error_code;
pub mod federation;
mod frame;
mod message_type;
pub(crate) mod msgpack;
pub mod msgpack_rpc;
mod payload;
mod process_status;
pub mod rpc;
pub mod stats;

pub use codec::EnvelopeCodec;
pub use envelope::{BROKER, Envelope};
pub use error::{EnvelopeError, FrameError, InvalidEnvelope, SalvagedRequest};
pub use error_code::{ErrorCode, UnknownErrorCode};
pub use frame::{DEFAULT_MAX_FRAME_BYTES, FrameCodec, LENGTH_PREFIX};
pub use message_type::{MessageType, UnknownMessageType};
pub use msgpack::{MsgpackError, SingleValueError};
pub use payload::{Payload, PayloadError};
pub use stats::{ClusterStats, MessageStats, NodeStats, ProcessMetrics};
