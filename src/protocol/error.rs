//! What can be wrong with bytes from a pipe, split by what the reader must do.
//!
//! The two failures are handled differently, so they are two types:
//! - [`FrameError`]: the byte stream itself is broken (a length over the limit,
//!   EOF inside a frame, an I/O error). The reader cannot find the next frame;
//!   the pipe must be dropped and its child restarted.
//! - [`EnvelopeError`]: one frame arrived whole but is not a valid envelope. The
//!   length prefix kept the stream in sync; drop the frame, count it, go on.

use bytestring::ByteString;
use std::io;

use super::message_type::MessageType;
use super::msgpack::MsgpackError;

/// The stream is out of sync or closed mid-frame: stop reading this pipe.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds the limit; nothing was allocated for it. A
    /// peer printing text on stdout usually shows up here (`"hell"` is a
    /// length of 1.7 GB).
    #[error("frame length {len} exceeds the limit of {max} bytes")]
    TooLarge {
        /// The length the prefix announced.
        len: u64,
        /// The configured `max_frame_bytes`.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame: {buffered} of {expected} bytes")]
    Truncated {
        /// Bytes the frame needed, prefix included (4 when even the prefix is cut).
        expected: usize,
        /// Bytes that had arrived.
        buffered: usize,
    },
    /// Reading or writing the pipe failed.
    #[error("pipe I/O: {0}")]
    Io(#[from] io::Error),
    /// A `protocol = "msgpack-rpc"` child sent a value that is not a
    /// MessagePack-RPC request, response or notification.
    #[error("not MessagePack-RPC: {0}")]
    NotRpc(String),
}

/// A whole frame that is not a valid envelope. The stream is still in sync.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// A frame of length 0 (the protocol requires at least one byte).
    #[error("empty frame")]
    Empty,
    /// The body is not well-formed MessagePack.
    #[error("not MessagePack: {0}")]
    Malformed(#[from] MsgpackError),
    /// The body is a MessagePack value, but not a map.
    #[error("envelope must be a map, found {found}")]
    NotAMap {
        /// The kind of value found.
        found: &'static str,
    },
    /// A map key that is not a string.
    #[error("envelope map key at byte {offset} is a {found}, not a str")]
    KeyNotString {
        /// Offset of the key in the frame body.
        offset: usize,
        /// The kind of value found.
        found: &'static str,
    },
    /// A known key appears twice: which one counts would be a guess.
    #[error("duplicate key {0:?}")]
    DuplicateKey(&'static str),
    /// A field the envelope's type requires is absent (or nil, or empty).
    #[error("missing required field {field:?}{}", kind.map(|k| format!(" for a {k}")).unwrap_or_default())]
    MissingField {
        /// The key.
        field: &'static str,
        /// The envelope's type, when it was readable.
        kind: Option<MessageType>,
    },
    /// `type` holds a string that is not a message type.
    #[error("unknown type {0:?} (expected request, response, event or error)")]
    UnknownType(String),
    /// A field holds a value of the wrong MessagePack type.
    #[error("field {field:?} must be {expected}, found {found}")]
    WrongType {
        /// The key.
        field: &'static str,
        /// What the protocol requires.
        expected: &'static str,
        /// What was there.
        found: &'static str,
    },
    /// A string field is not valid UTF-8.
    #[error("field {field:?} is not valid UTF-8")]
    InvalidUtf8 {
        /// The key.
        field: &'static str,
    },
    /// Bytes follow the envelope inside the frame.
    #[error("{0} trailing bytes after the envelope")]
    TrailingBytes(usize),
}

/// A frame that was rejected, with what could still be read of it: if it looks
/// like a request with a readable `correlation_id`, the broker answers it with
/// `bad_request` instead of leaving the caller to time out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid envelope ({len} B): {error}")]
pub struct InvalidEnvelope {
    /// What was wrong.
    pub error: EnvelopeError,
    /// The frame's body length.
    pub len: usize,
    /// Set when the frame is recognisably a request with a readable correlation id.
    pub request: Option<SalvagedRequest>,
}

/// The parts of a rejected request needed to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SalvagedRequest {
    /// The requester's correlation id.
    pub correlation_id: u64,
    /// The method name, if it was a readable string.
    pub id: Option<ByteString>,
}
