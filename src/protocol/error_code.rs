//! Machine-readable error codes of broker-generated errors.

use std::fmt;
use std::str::FromStr;

/// Why the broker (not a service) failed a request. Sent as `code`.
///
/// Services may put any string in `code` (the SDK defaults to `handler`), so an
/// envelope keeps `code` as a string; this enum is for the codes the broker
/// itself produces and for callers that want to match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No process or service has that name.
    UnknownTarget,
    /// The service exists but has no ready worker.
    Unavailable,
    /// Every candidate worker's queue is full.
    Busy,
    /// No reply came before the request's deadline.
    Timeout,
    /// The worker died with the request in flight.
    WorkerExited,
    /// The target does not serve that method.
    UnknownMethod,
    /// The payload does not fit the method, or the envelope is malformed.
    BadRequest,
    /// The frame would exceed `max_frame_bytes`.
    TooLarge,
    /// The broker is draining and accepts no new requests.
    ShuttingDown,
    /// The caller may not use this method (control RPCs).
    Forbidden,
    /// A broker bug or an unexpected internal failure.
    Internal,
    /// The caller cancelled the request (protocol v1.1: the `cancel` event
    /// to `broker`).
    Cancelled,
}

impl ErrorCode {
    /// Every code, in protocol order (v1.1's `cancelled` last).
    pub const ALL: [ErrorCode; 12] = [
        Self::UnknownTarget,
        Self::Unavailable,
        Self::Busy,
        Self::Timeout,
        Self::WorkerExited,
        Self::UnknownMethod,
        Self::BadRequest,
        Self::TooLarge,
        Self::ShuttingDown,
        Self::Forbidden,
        Self::Internal,
        Self::Cancelled,
    ];

    /// Its position in [`ALL`](Self::ALL), for counting by code.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The string written under `code`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::UnknownTarget => "unknown_target",
            Self::Unavailable => "unavailable",
            Self::Busy => "busy",
            Self::Timeout => "timeout",
            Self::WorkerExited => "worker_exited",
            Self::UnknownMethod => "unknown_method",
            Self::BadRequest => "bad_request",
            Self::TooLarge => "too_large",
            Self::ShuttingDown => "shutting_down",
            Self::Forbidden => "forbidden",
            Self::Internal => "internal",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The string is not one of the broker's codes (it may still be a service's own).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a broker error code")]
pub struct UnknownErrorCode(pub String);

impl FromStr for ErrorCode {
    type Err = UnknownErrorCode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|code| code.as_str() == s)
            .ok_or_else(|| UnknownErrorCode(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_string() {
        for code in ErrorCode::ALL {
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(code));
            assert_eq!(code.to_string(), code.as_str());
        }
        assert_eq!(
            "handler".parse::<ErrorCode>(),
            Err(UnknownErrorCode("handler".into()))
        );
    }
}
