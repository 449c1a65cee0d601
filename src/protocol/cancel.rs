//! The `cancel` event (protocol v1.1), both ways.
//!
//! - **Caller → broker**: a process cancels one of its own requests with the
//!   event `cancel` to `broker` whose `correlation_id` is that request's
//!   ([`Envelope::cancel_request`]); no payload. The broker answers the
//!   request at once with the error `cancelled` and tells the worker.
//! - **Broker → worker**: when a request that was delivered to a worker ends
//!   without that worker's final reply (its deadline passed, its caller
//!   cancelled it, exited or was stopped, its stream was cut, the drain at
//!   shutdown expired), the broker sends the worker the event `cancel`
//!   (`source = "broker"`) with the request's `correlation_id` and the
//!   payload [`CancelNotice`] `{source, reason}`: `source` is the request's
//!   `source` as the worker saw it, so `(source, correlation_id)` names the
//!   request. A worker honours `cancel` only from `broker`.

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use std::fmt;

use super::envelope::{BROKER, Envelope};
use super::msgpack::{self, Reader, SliceWriter};
use super::payload::Payload;

/// The event's name (`id`).
pub const CANCEL: &str = "cancel";

/// Why a delivered request was cancelled (`reason` of a [`CancelNotice`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CancelReason {
    /// Its deadline passed (the caller got `timeout`).
    Timeout,
    /// The caller cancelled it (and got `cancelled`).
    Cancelled,
    /// The caller's process exited or was stopped.
    CallerExited,
    /// Its stream was cut: the caller did not read its partial replies fast
    /// enough (the caller got `busy`).
    Busy,
    /// The drain at shutdown expired (or, inside an SDK, stdin closed).
    ShuttingDown,
    /// A reason this version does not know, as it was written.
    Other(ByteString),
}

impl CancelReason {
    /// The reasons this version knows, in protocol order.
    pub const KNOWN: [CancelReason; 5] = [
        Self::Timeout,
        Self::Cancelled,
        Self::CallerExited,
        Self::Busy,
        Self::ShuttingDown,
    ];

    /// The string written under `reason`.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::CallerExited => "caller_exited",
            Self::Busy => "busy",
            Self::ShuttingDown => "shutting_down",
            Self::Other(reason) => reason,
        }
    }

    /// The reason `reason` names (unknown ones kept as [`Other`](Self::Other)).
    pub fn from_wire(reason: ByteString) -> Self {
        Self::KNOWN
            .into_iter()
            .find(|known| known.as_str() == &*reason)
            .unwrap_or(Self::Other(reason))
    }
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The payload of a `cancel` from the broker to a worker: which request
/// (with the event's `correlation_id`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelNotice {
    /// The cancelled request's `source`, as the worker saw it.
    pub source: ByteString,
    /// Why.
    pub reason: CancelReason,
}

/// A `cancel` payload that is not `{source: str, reason: str}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelNoticeError {
    /// The event had no payload.
    #[error("cancel without a payload")]
    Missing,
    /// The payload is not a map.
    #[error("cancel payload must be a map, found {0}")]
    NotAMap(&'static str),
    /// A key the notice needs is absent, or not a UTF-8 str.
    #[error("cancel payload needs {0:?} as a str")]
    Field(&'static str),
    /// Not well-formed MessagePack.
    #[error(transparent)]
    Malformed(#[from] msgpack::MsgpackError),
}

mod key {
    pub const SOURCE: &[u8] = b"\xa6source";
    pub const REASON: &[u8] = b"\xa6reason";
}

impl CancelNotice {
    /// Encodes the notice as a payload (`{source, reason}`): one allocation,
    /// of its exact size.
    pub fn to_payload(&self) -> Payload {
        let reason = self.reason.as_str();
        let len = msgpack::map_header_len(2)
            + key::SOURCE.len()
            + msgpack::str_len(&self.source)
            + key::REASON.len()
            + msgpack::str_len(reason);
        let mut buf = BytesMut::zeroed(len);
        let mut w = SliceWriter::new(&mut buf[..]);
        w.map_header(2);
        w.bytes(key::SOURCE);
        w.str(&self.source);
        w.bytes(key::REASON);
        w.str(reason);
        debug_assert_eq!(w.written(), len);
        Payload::from_checked(buf.freeze())
    }

    /// Reads a notice from a `cancel` event's payload. Keys other than
    /// `source` and `reason` are ignored; the strings are slices of the
    /// payload (no copy).
    pub fn from_payload(payload: Option<&Payload>) -> Result<Self, CancelNoticeError> {
        let bytes: &Bytes = payload.ok_or(CancelNoticeError::Missing)?.as_bytes();
        let mut reader = Reader::new(bytes);
        let marker = reader.marker()?;
        let entries = reader
            .map_len(marker)?
            .ok_or(CancelNoticeError::NotAMap(msgpack::kind_name(marker)))?;
        let (mut source, mut reason) = (None, None);
        for _ in 0..entries {
            let key_marker = reader.marker()?;
            let key = reader.str_body(key_marker)?;
            if key.is_none() {
                reader.skip_body(key_marker)?;
            }
            let value_marker = reader.marker()?;
            let slot = match key.map(|k| &bytes[k]) {
                Some(b"source") => &mut source,
                Some(b"reason") => &mut reason,
                _ => {
                    reader.skip_body(value_marker)?;
                    continue;
                }
            };
            match reader.str_body(value_marker)? {
                Some(span) => *slot = ByteString::try_from(bytes.slice(span)).ok(),
                None => reader.skip_body(value_marker)?,
            }
        }
        Ok(Self {
            source: source.ok_or(CancelNoticeError::Field("source"))?,
            reason: CancelReason::from_wire(reason.ok_or(CancelNoticeError::Field("reason"))?),
        })
    }
}

impl Envelope {
    /// The `cancel` a caller sends the broker for its own request
    /// `correlation_id` (no payload).
    pub fn cancel_request(correlation_id: u64) -> Self {
        let mut cancel = Self::event(BROKER, CANCEL);
        cancel.correlation_id = correlation_id;
        cancel
    }

    /// The `cancel` the broker sends `worker` for the request
    /// `correlation_id` of `origin` (the request's `source` as `worker`
    /// saw it), with the reason.
    pub fn cancel_notice(
        worker: impl Into<ByteString>,
        correlation_id: u64,
        origin: impl Into<ByteString>,
        reason: CancelReason,
    ) -> Self {
        let notice = CancelNotice {
            source: origin.into(),
            reason,
        };
        let mut cancel = Self::event(worker, CANCEL)
            .with_source(BROKER)
            .with_raw_payload(notice.to_payload());
        cancel.correlation_id = correlation_id;
        cancel
    }

    /// Whether this is a `cancel` event.
    pub fn is_cancel(&self) -> bool {
        self.kind == super::message_type::MessageType::Event && &*self.id == CANCEL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_round_trips_and_reads_like_any_msgpack_map() {
        for reason in CancelReason::KNOWN
            .into_iter()
            .chain([CancelReason::Other("later".into())])
        {
            let notice = CancelNotice {
                source: "client.0".into(),
                reason: reason.clone(),
            };
            let payload = notice.to_payload();
            assert_eq!(
                CancelNotice::from_payload(Some(&payload)).as_ref(),
                Ok(&notice)
            );
            let value: std::collections::BTreeMap<String, String> =
                payload.decode().expect("a str map");
            assert_eq!(value["source"], "client.0");
            assert_eq!(value["reason"], reason.as_str());
        }
    }

    #[test]
    fn a_notice_ignores_other_keys_and_names_what_is_missing() {
        let payload = |v: rmpv::Value| {
            let mut out = Vec::new();
            rmpv::encode::write_value(&mut out, &v).expect("encode");
            Payload::from_msgpack(out).expect("one value")
        };
        let map = |pairs: Vec<(rmpv::Value, rmpv::Value)>| payload(rmpv::Value::Map(pairs));
        let with_extra = map(vec![
            (1.into(), 2.into()),
            ("reason".into(), "timeout".into()),
            ("extra".into(), rmpv::Value::Array(vec![1.into()])),
            ("source".into(), "a.0".into()),
        ]);
        let notice = CancelNotice::from_payload(Some(&with_extra)).expect("notice");
        assert_eq!(
            (&*notice.source, notice.reason),
            ("a.0", CancelReason::Timeout)
        );
        let no_source = map(vec![("reason".into(), "busy".into())]);
        assert_eq!(
            CancelNotice::from_payload(Some(&no_source)),
            Err(CancelNoticeError::Field("source"))
        );
        let int_reason = map(vec![
            ("source".into(), "a.0".into()),
            ("reason".into(), 3.into()),
        ]);
        assert_eq!(
            CancelNotice::from_payload(Some(&int_reason)),
            Err(CancelNoticeError::Field("reason"))
        );
        assert_eq!(
            CancelNotice::from_payload(Some(&payload(7.into()))),
            Err(CancelNoticeError::NotAMap("uint"))
        );
        assert_eq!(
            CancelNotice::from_payload(None),
            Err(CancelNoticeError::Missing)
        );
    }

    #[test]
    fn the_two_cancel_envelopes() {
        let ask = Envelope::cancel_request(9);
        assert!(ask.is_cancel());
        assert_eq!((&*ask.target, ask.correlation_id), (BROKER, 9));
        assert!(ask.payload.is_none());
        let told = Envelope::cancel_notice("svc.1", 9, "client.0", CancelReason::CallerExited);
        assert!(told.is_cancel());
        assert_eq!(
            (&*told.target, &*told.source, told.correlation_id),
            ("svc.1", BROKER, 9)
        );
        let notice = CancelNotice::from_payload(told.payload.as_ref()).expect("notice");
        assert_eq!(notice.reason, CancelReason::CallerExited);
        assert_eq!(&*notice.source, "client.0");
    }
}
