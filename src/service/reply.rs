//! What a handler answers: its error type, its result, and the address of
//! the reply it becomes. Apart from the handler table, so that the
//! request's context can name them without importing the table.

use bytestring::ByteString;

use crate::protocol::{Envelope, ErrorCode, MessageType, Payload};

/// The code of a handler's own errors unless it picks another.
pub const HANDLER: &str = "handler";

/// A failed request, as a handler reports it: becomes an `error` reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct HandlerError {
    /// Machine-readable code (`handler` by default).
    pub code: String,
    /// Human-readable message.
    pub message: String,
}

impl HandlerError {
    /// An error with the default code `handler`.
    pub fn new(message: impl Into<String>) -> Self {
        Self::with_code(HANDLER, message)
    }

    /// An error with a code of the handler's choosing.
    pub fn with_code(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }

    /// An error with one of the broker's codes.
    pub fn broker(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::with_code(code.as_str(), message)
    }
}

/// What a handler resolves to: a payload (or none) or an error.
pub type HandlerResult = Result<Option<Payload>, HandlerError>;

/// What a reply needs of its request: method, correlation id, requester.
/// Kept instead of the whole request while a handler runs.
#[derive(Debug, Clone)]
pub struct ReplyAddress {
    id: ByteString,
    correlation_id: u64,
    to: ByteString,
}

impl ReplyAddress {
    /// The address of `request`'s reply.
    pub fn of(request: &Envelope) -> Self {
        Self {
            id: request.id.clone(),
            correlation_id: request.correlation_id,
            to: request.source.clone(),
        }
    }

    /// A partial reply (`more = true`) with `payload`.
    pub fn partial(&self, payload: Option<Payload>) -> Envelope {
        let mut partial = Envelope::request(self.to.clone(), self.id.clone(), self.correlation_id);
        partial.kind = MessageType::Response;
        partial.more = true;
        partial.payload = payload;
        partial
    }

    /// The requester and correlation id: what names the request.
    pub(crate) fn request(&self) -> (&ByteString, u64) {
        (&self.to, self.correlation_id)
    }

    /// [`reply`](Self::reply), written over `slot` (an envelope the
    /// caller no longer needs, in a box it wants to reuse).
    /// Field by field, so the reply is not built elsewhere and copied in;
    /// the pattern names every field, so a new one cannot be missed.
    pub(crate) fn reply_into(self, result: HandlerResult, slot: &mut Envelope) {
        let Envelope {
            kind,
            id,
            correlation_id,
            source,
            target,
            payload,
            error,
            code,
            timeout_ms,
            stream,
            more,
            key,
        } = slot;
        *id = self.id;
        *correlation_id = self.correlation_id;
        *source = ByteString::new();
        *target = self.to;
        *timeout_ms = None;
        *stream = false;
        *more = false;
        *key = None;
        match result {
            Ok(reply) => {
                *kind = MessageType::Response;
                *payload = reply;
                *error = None;
                *code = None;
            }
            Err(e) => {
                *kind = MessageType::Error;
                *payload = None;
                *code = Some(e.code.into());
                *error = Some(e.message.into());
            }
        }
    }

    /// The reply for a handler's result: a response, or an error reply.
    pub fn reply(self, result: HandlerResult) -> Envelope {
        let mut reply = Envelope::request(self.to, self.id, self.correlation_id);
        match result {
            Ok(payload) => {
                reply.kind = MessageType::Response;
                reply.payload = payload;
            }
            Err(e) => {
                reply.kind = MessageType::Error;
                reply.code = Some(e.code.into());
                reply.error = Some(e.message.into());
            }
        }
        reply
    }
}

impl From<crate::call::CallError> for HandlerError {
    /// A failed call inside a handler fails the handler: the callee's code
    /// passes through, other failures are `internal`.
    fn from(e: crate::call::CallError) -> Self {
        match e {
            crate::call::CallError::Remote {
                code,
                message,
                source_id,
            } => Self::with_code(code, format!("{source_id}: {message}")),
            other => Self::broker(ErrorCode::Internal, other.to_string()),
        }
    }
}

impl From<crate::protocol::PayloadError> for HandlerError {
    /// A reply payload that does not decode is the handler's `internal` error.
    fn from(e: crate::protocol::PayloadError) -> Self {
        Self::broker(ErrorCode::Internal, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request with every field set, as a slot holds it before the reply.
    fn full_request() -> Envelope {
        let mut request = Envelope::request("calc", "Add", 7)
            .with_source("client.0")
            .with_timeout_ms(250)
            .with_stream()
            .with_key("user-1")
            .expect("key")
            .with_payload(&[1, 2])
            .expect("payload");
        request.more = true;
        request.error = Some("left over".into());
        request.code = Some("left_over".into());
        request
    }

    #[test]
    fn a_reply_written_into_its_request_is_the_reply_built_anew() {
        let results: [HandlerResult; 3] = [
            Ok(Some(Payload::encode(&3).expect("payload"))),
            Ok(None),
            Err(HandlerError::with_code("mine", "no")),
        ];
        for result in results {
            let mut slot = full_request();
            let address = ReplyAddress::of(&slot);
            address.clone().reply_into(result.clone(), &mut slot);
            assert_eq!(slot, address.reply(result.clone()), "{result:?}");
        }
    }
}
