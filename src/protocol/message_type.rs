//! The four kinds of envelope (`type` on the wire).

use std::fmt;
use std::str::FromStr;

/// What an envelope is: a call, its answer, its failure, or a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// Asks `target` to run method `id`; expects exactly one `Response` or `Error`.
    Request,
    /// The successful answer to a request, with the same `id` and `correlation_id`.
    Response,
    /// Fire-and-forget notification named `id`; never answered.
    Event,
    /// The failed answer to a request: `code` and `error` say why.
    Error,
}

impl MessageType {
    /// Every kind, in wire order of the docs.
    pub const ALL: [MessageType; 4] = [Self::Request, Self::Response, Self::Event, Self::Error];

    /// The string written under `type`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Response => "response",
            Self::Event => "event",
            Self::Error => "error",
        }
    }

    /// The string as written on the wire: MessagePack str header and bytes.
    pub(crate) const fn encoded(self) -> &'static [u8] {
        match self {
            Self::Request => b"\xa7request",
            Self::Response => b"\xa8response",
            Self::Event => b"\xa5event",
            Self::Error => b"\xa5error",
        }
    }

    /// A reply is what answers a request: `Response` or `Error`.
    pub const fn is_reply(self) -> bool {
        matches!(self, Self::Response | Self::Error)
    }

    /// Parses the wire string from raw bytes (no UTF-8 check needed: only ASCII matches).
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(match bytes {
            b"request" => Self::Request,
            b"response" => Self::Response,
            b"event" => Self::Event,
            b"error" => Self::Error,
            _ => return None,
        })
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The string was not one of `request`, `response`, `event`, `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown message type {0:?} (expected request, response, event or error)")]
pub struct UnknownMessageType(pub String);

impl FromStr for MessageType {
    type Err = UnknownMessageType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_bytes(s.as_bytes()).ok_or_else(|| UnknownMessageType(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_its_string() {
        for kind in MessageType::ALL {
            assert_eq!(kind.as_str().parse::<MessageType>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.as_str());
            let mut wire = Vec::new();
            rmp::encode::write_str(&mut wire, kind.as_str()).expect("vec write");
            assert_eq!(kind.encoded(), wire);
        }
        assert!("Request".parse::<MessageType>().is_err());
    }
}
