//! Wire protocol v1.1: length-prefixed frames holding MessagePack envelopes.
//!
//! Layers, bottom up:
//! - [`FrameCodec`]: `u32` big-endian length + body; the limit is checked
//!   before anything is allocated.
//! - [`Envelope`]: the map inside a frame, decoded without copying; its
//!   [`Payload`] is carried as raw bytes and only decoded by whoever it is for.
//! - [`EnvelopeCodec`]: both together, for `FramedRead` / `FramedWrite`, with
//!   "stream broken" ([`FrameError`]) and "bad frame" ([`InvalidEnvelope`])
//!   kept apart because the broker answers them differently.
//! - [`msgpack_rpc`]: the other wire a child may speak, MessagePack-RPC,
//!   translated to and from envelopes at the pipe.
//! - [`federation`]: between brokers of a cluster, the NATS
//!   subjects, headers and heartbeat around unchanged envelopes.
//! - Typed payloads of the broker's RPCs ([`rpc`]) and stats ([`stats`]).
//! - The request lifecycle of v1.1: the `cancel` event ([`CancelNotice`],
//!   [`CancelReason`]), routing keys ([`RequestKey`]), and the envelope's
//!   `stream` and `more` for partial replies. v1 frames are unchanged: the
//!   new keys are written only when set.
//!
//! `PROTOCOL.md` at the repository root is the same contract written for
//! service authors in other languages.

mod cancel;
mod codec;
mod envelope;
mod error;
mod error_code;
pub mod federation;
mod frame;
mod key;
mod message_type;
pub(crate) mod msgpack;
pub mod msgpack_rpc;
mod payload;
mod process_status;
pub mod rpc;
pub mod stats;

pub use cancel::{CANCEL, CancelNotice, CancelNoticeError, CancelReason};
pub use codec::EnvelopeCodec;
pub use envelope::{BROKER, Envelope};
pub use error::{EnvelopeError, FrameError, InvalidEnvelope, SalvagedRequest};
pub use error_code::{ErrorCode, UnknownErrorCode};
pub use frame::{DEFAULT_MAX_FRAME_BYTES, FrameCodec, LENGTH_PREFIX};
pub use key::{KeyError, MAX_KEY_BYTES, RequestKey};
pub use message_type::{MessageType, UnknownMessageType};
pub use msgpack::{MsgpackError, SingleValueError};
pub use payload::{Payload, PayloadError};
pub use stats::{ClusterStats, MessageStats, NodeStats, ProcessMetrics};
