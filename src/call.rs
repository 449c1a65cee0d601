//! The result of a call, shared by the embedding API and the service SDK.

use serde::de::DeserializeOwned;
use std::time::Duration;

use crate::protocol::{Envelope, ErrorCode, MessageType, Payload, PayloadError};

/// A successful reply.
// Boxed: a reply is handed from the Router (or the SDK's read batch) to
// the caller through a channel, a `Result` and the caller's own code, and
// a box moves as one pointer where the envelope is a few hundred bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply(Box<Envelope>);

impl Reply {
    /// Decodes the payload (an absent payload reads as nil).
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        self.0.payload_as()
    }

    /// The raw payload.
    pub fn payload(&self) -> Option<&Payload> {
        self.0.payload.as_ref()
    }

    /// Whether this is a partial reply (`more = true`) of a streaming call;
    /// the final reply comes after it.
    pub fn is_partial(&self) -> bool {
        self.0.more
    }

    /// The process that answered.
    pub fn source(&self) -> &str {
        &self.0.source
    }

    /// The whole response envelope.
    pub fn into_envelope(self) -> Envelope {
        *self.0
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The callee, or the broker on its behalf, answered with an error.
    #[error("{source_id} answered {code}: {message}")]
    Remote {
        /// Error code (see [`ErrorCode`] for the broker's own).
        code: String,
        /// Error message.
        message: String,
        /// Who answered (`broker` for broker-generated errors).
        source_id: String,
    },
    /// No reply came within the call's deadline plus a grace period (the
    /// broker normally answers `timeout` first; this is the last resort).
    #[error("no reply within {0:?}")]
    NoReply(Duration),
    /// The request payload could not be encoded.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// The Router is gone (the System is stopping).
    #[error("the broker is not running")]
    Closed,
}

impl CallError {
    /// The error code, if the callee or broker answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Remote { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The broker error code, if it is one of the broker's.
    pub fn broker_code(&self) -> Option<ErrorCode> {
        self.code().and_then(|c| c.parse().ok())
    }
}

impl Reply {
    /// A reply envelope as a call's result: `error` envelopes are errors.
    pub fn from_envelope(envelope: Envelope) -> Result<Self, CallError> {
        match envelope.kind {
            MessageType::Error => Err(Self::error(&envelope)),
            _ => Ok(Self(Box::new(envelope))),
        }
    }

    /// [`from_envelope`](Self::from_envelope) of a reply that is already
    /// boxed, as the Router and the SDK's client hand them over: the reply
    /// keeps the box.
    pub fn from_boxed(envelope: Box<Envelope>) -> Result<Self, CallError> {
        match envelope.kind {
            MessageType::Error => Err(Self::error(&envelope)),
            _ => Ok(Self(envelope)),
        }
    }

    fn error(envelope: &Envelope) -> CallError {
        CallError::Remote {
            code: envelope.code.as_deref().unwrap_or_default().to_owned(),
            message: envelope.error.as_deref().unwrap_or_default().to_owned(),
            source_id: envelope.source.to_string(),
        }
    }
}
