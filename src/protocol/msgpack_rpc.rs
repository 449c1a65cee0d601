//! MessagePack-RPC on a child's stdio: neovim `--embed`, pynvim
//! hosts and other programs nobody can change.
//!
//! The stream is MessagePack values back to back, with no length prefix: a
//! value ends where walking it ends (the same bounded, iterative walk as
//! payloads), and a value may not exceed `max_frame_bytes`. Each value must
//! be `[0, msgid, method, params]` (request), `[1, msgid, error, result]`
//! (response) or `[2, method, params]` (notification); anything else puts
//! the stream out of sync ([`FrameError::NotRpc`]), as a broken frame does.
//!
//! [`MsgpackRpcCodec`] translates at the pipe so that the bridge and the
//! Router see envelopes only:
//!
//! | to the child                     | written as                          |
//! |----------------------------------|-------------------------------------|
//! | request `{id, payload}`          | `[0, msgid, id, params]`            |
//! | event `{id, payload}`            | `[2, id, params]`                   |
//! | response to its request `msgid`  | `[1, msgid, nil, payload]`          |
//! | error to its request `msgid`     | `[1, msgid, [code, message], nil]`  |
//!
//! `params` is the payload if it is an array, `[payload]` otherwise, `[]` if
//! absent. The codec allocates msgids (u32, wrapping, skipping those in
//! flight) and remembers each request's origin, so `[1, msgid, nil,
//! result]` becomes the response to that origin with `result` verbatim as
//! its payload, and a non-nil error an `error` envelope (code `handler`, the
//! message found in the error value, the value verbatim as payload).
//! `[0, msgid, method, params]` from the child becomes a request to
//! `calls_to` with `correlation_id = msgid`, `[2, method, params]` an event
//! to `events_to`.

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio_util::codec::{Decoder, Encoder};

use super::envelope::Envelope;
use super::error::{FrameError, InvalidEnvelope};
use super::message_type::MessageType;
use super::msgpack::{self, MsgpackError, Reader, SliceWriter};
use super::payload::Payload;

/// The `code` of an error the child's handler returned.
pub const HANDLER_ERROR: &str = "handler";

/// Requests the child has not answered yet, past which the ones older than
/// the request timeout are forgotten (their callers already got `timeout`).
const REMEMBERED: usize = 65_536;

/// A request sent to the child and not yet answered.
#[derive(Debug)]
struct Sent {
    origin: ByteString,
    correlation_id: u64,
    method: ByteString,
    at: Instant,
}

/// What the two directions of one child's pipes share.
#[derive(Debug)]
struct Session {
    calls_to: ByteString,
    events_to: ByteString,
    request_timeout: Duration,
    next_msgid: u32,
    in_flight: HashMap<u32, Sent>,
}

impl Session {
    /// The next msgid not in flight.
    fn allocate(&mut self) -> u32 {
        loop {
            self.next_msgid = self.next_msgid.wrapping_add(1);
            if !self.in_flight.contains_key(&self.next_msgid) {
                return self.next_msgid;
            }
        }
    }

    fn remember(&mut self, msgid: u32, sent: Sent) {
        if self.in_flight.len() >= REMEMBERED {
            let expired = sent.at.checked_sub(self.request_timeout);
            self.in_flight
                .retain(|_, s| expired.is_none_or(|before| s.at > before));
        }
        self.in_flight.insert(msgid, sent);
    }
}

/// The codec of one child speaking MessagePack-RPC; clones share its state
/// (one goes to the reader, one to the writer of the same child).
#[derive(Debug, Clone)]
pub struct MsgpackRpcCodec {
    max_value_bytes: usize,
    session: Rc<RefCell<Session>>,
}

impl MsgpackRpcCodec {
    /// A codec for one child: its requests go to `calls_to`, its
    /// notifications to `events_to` (`""`: none; the broker answers or
    /// drops them), values up to `max_value_bytes`.
    pub fn new(
        max_value_bytes: usize,
        calls_to: &str,
        events_to: &str,
        request_timeout: Duration,
    ) -> Self {
        Self {
            max_value_bytes,
            session: Rc::new(RefCell::new(Session {
                calls_to: calls_to.into(),
                events_to: events_to.into(),
                request_timeout,
                next_msgid: 0,
                in_flight: HashMap::new(),
            })),
        }
    }

    /// The frame limit in force.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_value_bytes
    }

    /// Requests sent to the child and not answered (nor forgotten) yet.
    pub fn in_flight(&self) -> usize {
        self.session.borrow().in_flight.len()
    }

    /// The envelope one value from the child stands for.
    fn envelope(&self, value: Bytes) -> Result<Envelope, FrameError> {
        let message = RpcMessage::parse(&value)?;
        let mut session = self.session.borrow_mut();
        let slice = |range: Range<usize>| Payload::from_checked(value.slice(range));
        let text = |range: Range<usize>| {
            ByteString::try_from(value.slice(range))
                .map_err(|_| FrameError::NotRpc("a method name that is not UTF-8".into()))
        };
        Ok(match message {
            RpcMessage::Request {
                msgid,
                method,
                params,
            } => Envelope::request(session.calls_to.clone(), text(method)?, u64::from(msgid))
                .with_raw_payload(slice(params)),
            RpcMessage::Notification { method, params } => {
                Envelope::event(session.events_to.clone(), text(method)?)
                    .with_raw_payload(slice(params))
            }
            RpcMessage::Response {
                msgid,
                error,
                result,
            } => {
                let Some(sent) = session.in_flight.remove(&msgid) else {
                    // Nobody asked (or it was forgotten): the Router counts
                    // it as an unmatched reply.
                    return Ok(
                        Envelope::request("", "", u64::from(msgid)).response(Some(slice(result)))
                    );
                };
                let request = Envelope::request("", sent.method, sent.correlation_id)
                    .with_source(sent.origin);
                if value[error.clone()] == [0xc0] {
                    request.response(Some(slice(result)))
                } else {
                    let message = error_message(&value[error.clone()]);
                    request
                        .error_reply(HANDLER_ERROR, message)
                        .with_raw_payload(slice(error))
                }
            }
        })
    }

    /// Writes what `envelope` stands for to the child; nothing for what a
    /// MessagePack-RPC peer has no word for.
    fn write(&self, envelope: &Envelope, dst: &mut BytesMut) -> Result<(), FrameError> {
        let start = dst.len();
        match envelope.kind {
            MessageType::Request => {
                let mut session = self.session.borrow_mut();
                let msgid = session.allocate();
                array(dst, 4);
                uint(dst, 0);
                uint(dst, u64::from(msgid));
                string(dst, &envelope.id);
                params(dst, envelope.payload.as_ref());
                self.check(dst, start)?;
                session.remember(
                    msgid,
                    Sent {
                        origin: envelope.source.clone(),
                        correlation_id: envelope.correlation_id,
                        method: envelope.id.clone(),
                        at: Instant::now(),
                    },
                );
                return Ok(());
            }
            MessageType::Event => {
                array(dst, 3);
                uint(dst, 2);
                string(dst, &envelope.id);
                params(dst, envelope.payload.as_ref());
            }
            MessageType::Response => {
                array(dst, 4);
                uint(dst, 1);
                uint(dst, envelope.correlation_id);
                dst.put_u8(0xc0);
                match &envelope.payload {
                    Some(payload) => dst.put_slice(payload.as_bytes()),
                    None => dst.put_u8(0xc0),
                }
            }
            MessageType::Error => {
                array(dst, 4);
                uint(dst, 1);
                uint(dst, envelope.correlation_id);
                array(dst, 2);
                string(dst, envelope.code.as_deref().unwrap_or_default());
                string(dst, envelope.error.as_deref().unwrap_or_default());
                dst.put_u8(0xc0);
            }
        }
        self.check(dst, start)
    }

    /// Undoes a write over the limit.
    fn check(&self, dst: &mut BytesMut, start: usize) -> Result<(), FrameError> {
        let len = dst.len() - start;
        if len > self.max_value_bytes {
            dst.truncate(start);
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: self.max_value_bytes,
            });
        }
        Ok(())
    }
}

impl Decoder for MsgpackRpcCodec {
    type Item = Result<Envelope, InvalidEnvelope>;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        if src.is_empty() {
            return Ok(None);
        }
        let mut reader = Reader::new(&src[..]);
        match reader.value_span() {
            Ok(span) if span.end > self.max_value_bytes => Err(FrameError::TooLarge {
                len: span.end as u64,
                max: self.max_value_bytes,
            }),
            Ok(span) => {
                let value = src.split_to(span.end).freeze();
                self.envelope(value).map(|e| Some(Ok(e)))
            }
            Err(MsgpackError::Truncated { .. }) if src.len() <= self.max_value_bytes => Ok(None),
            Err(MsgpackError::Truncated { .. }) => Err(FrameError::TooLarge {
                len: src.len() as u64,
                max: self.max_value_bytes,
            }),
            Err(e) => Err(FrameError::NotRpc(e.to_string())),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                expected: src.len() + 1,
                buffered: src.len(),
            }),
        }
    }
}

impl Encoder<&Envelope> for MsgpackRpcCodec {
    type Error = FrameError;

    fn encode(&mut self, envelope: &Envelope, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.write(envelope, dst)
    }
}

/// One value of the stream, with the spans of its parts.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RpcMessage {
    Request {
        msgid: u32,
        method: Range<usize>,
        params: Range<usize>,
    },
    Response {
        msgid: u32,
        error: Range<usize>,
        result: Range<usize>,
    },
    Notification {
        method: Range<usize>,
        params: Range<usize>,
    },
}

fn not_rpc(what: &str) -> FrameError {
    FrameError::NotRpc(what.to_string())
}

fn next_uint(r: &mut Reader<'_>, what: &str) -> Result<u64, FrameError> {
    let marker = r.marker().map_err(|e| not_rpc(&e.to_string()))?;
    match r.uint_body(marker) {
        Ok(Some(Some(v))) => Ok(v),
        _ => Err(not_rpc(what)),
    }
}

fn next_msgid(r: &mut Reader<'_>) -> Result<u32, FrameError> {
    let what = "a msgid that is not a u32";
    u32::try_from(next_uint(r, what)?).map_err(|_| not_rpc(what))
}

fn next_str(r: &mut Reader<'_>) -> Result<Range<usize>, FrameError> {
    let marker = r.marker().map_err(|e| not_rpc(&e.to_string()))?;
    match r.str_body(marker) {
        Ok(Some(range)) => Ok(range),
        _ => Err(not_rpc("a method name that is not a str")),
    }
}

fn next_any(r: &mut Reader<'_>) -> Result<Range<usize>, FrameError> {
    r.value_span().map_err(|e| not_rpc(&e.to_string()))
}

fn next_array(r: &mut Reader<'_>, value: &[u8]) -> Result<Range<usize>, FrameError> {
    let span = next_any(r)?;
    match value[span.start] {
        0x90..=0x9f | 0xdc | 0xdd => Ok(span),
        _ => Err(not_rpc("params that are not an array")),
    }
}

impl RpcMessage {
    /// Reads one whole value.
    pub(crate) fn parse(value: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(value);
        let marker = r.marker().map_err(|e| not_rpc(&e.to_string()))?;
        let len = match marker {
            0x90..=0x9f => usize::from(marker & 0x0f),
            _ => return Err(not_rpc("a value that is not a 3- or 4-element array")),
        };
        let kind = next_uint(&mut r, "a message type that is not 0, 1 or 2")?;
        Ok(match (kind, len) {
            (0, 4) => Self::Request {
                msgid: next_msgid(&mut r)?,
                method: next_str(&mut r)?,
                params: next_array(&mut r, value)?,
            },
            (1, 4) => Self::Response {
                msgid: next_msgid(&mut r)?,
                error: next_any(&mut r)?,
                result: next_any(&mut r)?,
            },
            (2, 3) => Self::Notification {
                method: next_str(&mut r)?,
                params: next_array(&mut r, value)?,
            },
            _ => {
                return Err(not_rpc(
                    "an array that is not a request, response or notification",
                ));
            }
        })
    }
}

/// The human message in an error value: a str, or the first str inside an
/// array (neovim sends `[type, message]`), or a map's `message`.
fn error_message(error: &[u8]) -> String {
    let value = rmpv::decode::read_value(&mut &error[..]).ok();
    let found = value.as_ref().and_then(|v| match v {
        rmpv::Value::String(s) => s.as_str().map(str::to_owned),
        rmpv::Value::Array(items) => items.iter().find_map(|i| i.as_str().map(str::to_owned)),
        rmpv::Value::Map(entries) => entries
            .iter()
            .find(|(k, _)| k.as_str() == Some("message"))
            .and_then(|(_, v)| v.as_str().map(str::to_owned)),
        _ => None,
    });
    found.unwrap_or_else(|| match value {
        Some(v) => format!("error {v}"),
        None => "error".to_string(),
    })
}

/// Answers every request in `input` with its params, as
/// `[1, msgid, nil, params]` appended to `output`; returns how many bytes of
/// `input` were whole values (the rest waits for more). Notifications and
/// responses are ignored. The built-in `rpc-echo` worker is this in a loop.
pub(crate) fn echo_requests(input: &[u8], output: &mut BytesMut) -> Result<usize, FrameError> {
    let mut reader = Reader::new(input);
    let mut used = 0;
    loop {
        match reader.value_span() {
            Ok(span) => {
                let value = &input[span.clone()];
                if let RpcMessage::Request { msgid, params, .. } = RpcMessage::parse(value)? {
                    array(output, 4);
                    uint(output, 1);
                    uint(output, u64::from(msgid));
                    output.put_u8(0xc0);
                    output.put_slice(&value[params]);
                }
                used = span.end;
            }
            Err(MsgpackError::Truncated { .. }) => return Ok(used),
            Err(e) => return Err(FrameError::NotRpc(e.to_string())),
        }
    }
}

// The envelope's writer does the encoding; these append one item each.

/// Appends `len` bytes written by `f`.
fn put(dst: &mut BytesMut, len: usize, f: impl FnOnce(&mut SliceWriter<'_>)) {
    let start = dst.len();
    dst.resize(start + len, 0);
    f(&mut SliceWriter::new(&mut dst[start..]));
}

fn array(dst: &mut BytesMut, len: usize) {
    put(dst, msgpack::map_header_len(len), |w| w.array_header(len));
}

fn uint(dst: &mut BytesMut, v: u64) {
    put(dst, msgpack::uint_len(v), |w| w.uint(v));
}

fn string(dst: &mut BytesMut, s: &str) {
    put(dst, msgpack::str_len(s), |w| w.str(s));
}

/// `params`: the payload if it is an array, else `[payload]`; `[]` if absent.
fn params(dst: &mut BytesMut, payload: Option<&Payload>) {
    match payload.map(|p| p.as_bytes()) {
        None => array(dst, 0),
        Some(bytes) if matches!(bytes.first(), Some(0x90..=0x9f | 0xdc | 0xdd)) => {
            dst.put_slice(bytes);
        }
        Some(bytes) => {
            array(dst, 1);
            dst.put_slice(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> MsgpackRpcCodec {
        MsgpackRpcCodec::new(1024, "host", "sink", Duration::from_secs(30))
    }

    fn value(v: &rmpv::Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).expect("encode");
        out
    }

    fn read(bytes: &[u8]) -> rmpv::Value {
        rmpv::decode::read_value(&mut &bytes[..]).expect("one value")
    }

    #[test]
    fn a_request_goes_out_and_its_reply_comes_back_to_its_origin() {
        let mut c = codec();
        let request = Envelope::request("nvim", "nvim_eval", 77)
            .with_source("client.0")
            .with_payload(&"1+1")
            .expect("payload");
        let mut wire = BytesMut::new();
        c.encode(&request, &mut wire).expect("encode");
        assert_eq!(
            read(&wire),
            rmpv::Value::Array(vec![
                0.into(),
                1.into(),
                "nvim_eval".into(),
                vec![rmpv::Value::from("1+1")].into()
            ])
        );
        assert_eq!(c.in_flight(), 1);

        let mut input = BytesMut::from(
            &value(&rmpv::Value::Array(vec![
                1.into(),
                1.into(),
                rmpv::Value::Nil,
                2.into(),
            ]))[..],
        );
        let reply = c
            .decode(&mut input)
            .expect("in sync")
            .expect("whole")
            .expect("valid");
        assert_eq!(reply.kind, MessageType::Response);
        assert_eq!(&*reply.target, "client.0");
        assert_eq!(reply.correlation_id, 77);
        assert_eq!(&*reply.id, "nvim_eval");
        assert_eq!(reply.payload.expect("result").as_bytes().as_ref(), &[2]);
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn an_error_value_becomes_an_error_envelope_with_its_message() {
        let mut c = codec();
        let request = Envelope::request("nvim", "nvim_eval", 5).with_source("client.0");
        c.encode(&request, &mut BytesMut::new()).expect("encode");
        let error = rmpv::Value::Array(vec![0.into(), "Vim:E121: Undefined variable: x".into()]);
        let mut input = BytesMut::from(
            &value(&rmpv::Value::Array(vec![
                1.into(),
                1.into(),
                error.clone(),
                rmpv::Value::Nil,
            ]))[..],
        );
        let reply = c
            .decode(&mut input)
            .expect("in sync")
            .expect("whole")
            .expect("valid");
        assert_eq!(reply.kind, MessageType::Error);
        assert_eq!(reply.code.as_deref(), Some(HANDLER_ERROR));
        assert_eq!(
            reply.error.as_deref(),
            Some("Vim:E121: Undefined variable: x")
        );
        assert_eq!(
            reply.payload.expect("value").as_bytes().as_ref(),
            &value(&error)[..]
        );
    }

    #[test]
    fn requests_and_notifications_from_the_child_become_envelopes() {
        let mut c = codec();
        let mut input = BytesMut::new();
        input.extend_from_slice(&value(&rmpv::Value::Array(vec![
            0.into(),
            9.into(),
            "Lookup".into(),
            vec![rmpv::Value::from(1)].into(),
        ])));
        input.extend_from_slice(&value(&rmpv::Value::Array(vec![
            2.into(),
            "changed".into(),
            Vec::<rmpv::Value>::new().into(),
        ])));
        let call = c
            .decode(&mut input)
            .expect("sync")
            .expect("whole")
            .expect("valid");
        assert_eq!(
            (call.kind, &*call.target, &*call.id, call.correlation_id),
            (MessageType::Request, "host", "Lookup", 9)
        );
        assert_eq!(
            call.payload.expect("params").as_bytes().as_ref(),
            &[0x91, 1]
        );
        let event = c
            .decode(&mut input)
            .expect("sync")
            .expect("whole")
            .expect("valid");
        assert_eq!(
            (event.kind, &*event.target, &*event.id),
            (MessageType::Event, "sink", "changed")
        );

        // Its answer goes back with the child's msgid.
        let mut wire = BytesMut::new();
        c.encode(&call_reply(9), &mut wire).expect("encode");
        assert_eq!(
            read(&wire),
            rmpv::Value::Array(vec![1.into(), 9.into(), rmpv::Value::Nil, "ok".into()])
        );
        wire.clear();
        let error = Envelope::request("", "Lookup", 9).error_reply("unknown_target", "no host");
        c.encode(&error, &mut wire).expect("encode");
        assert_eq!(
            read(&wire),
            rmpv::Value::Array(vec![
                1.into(),
                9.into(),
                vec![rmpv::Value::from("unknown_target"), "no host".into()].into(),
                rmpv::Value::Nil
            ])
        );
    }

    fn call_reply(msgid: u64) -> Envelope {
        Envelope::request("", "Lookup", msgid)
            .response(None)
            .with_payload(&"ok")
            .expect("payload")
    }

    #[test]
    fn values_arrive_in_pieces_and_bad_ones_put_the_stream_out_of_sync() {
        let mut c = codec();
        let whole = value(&rmpv::Value::Array(vec![
            2.into(),
            "e".into(),
            vec![rmpv::Value::from("x".repeat(40))].into(),
        ]));
        let mut input = BytesMut::from(&whole[..10]);
        assert!(c.decode(&mut input).expect("in sync").is_none());
        input.extend_from_slice(&whole[10..]);
        assert!(c.decode(&mut input).expect("in sync").is_some());

        for bad in [
            value(&rmpv::Value::from(42)),
            value(&rmpv::Value::Array(vec![
                5.into(),
                1.into(),
                "m".into(),
                Vec::<rmpv::Value>::new().into(),
            ])),
            value(&rmpv::Value::Array(vec![
                0.into(),
                "x".into(),
                "m".into(),
                Vec::<rmpv::Value>::new().into(),
            ])),
            value(&rmpv::Value::Array(vec![
                0.into(),
                1.into(),
                2.into(),
                Vec::<rmpv::Value>::new().into(),
            ])),
            value(&rmpv::Value::Array(vec![2.into(), "m".into(), 3.into()])),
            vec![0xc1],
        ] {
            let mut input = BytesMut::from(&bad[..]);
            assert!(
                matches!(c.decode(&mut input), Err(FrameError::NotRpc(_))),
                "{bad:?}"
            );
        }
        let big = value(&rmpv::Value::Array(vec![
            2.into(),
            "e".into(),
            vec![rmpv::Value::from("x".repeat(2000))].into(),
        ]));
        let mut input = BytesMut::from(&big[..1500]);
        assert!(matches!(
            c.decode(&mut input),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn msgids_skip_those_in_flight_when_they_wrap() {
        let mut c = codec();
        c.session.borrow_mut().next_msgid = u32::MAX - 1;
        let request = Envelope::request("nvim", "m", 1).with_source("a");
        let mut wire = BytesMut::new();
        c.encode(&request, &mut wire).expect("encode"); // u32::MAX
        c.encode(&request, &mut wire).expect("encode"); // 0
        c.session.borrow_mut().next_msgid = u32::MAX - 1;
        c.encode(&request, &mut wire).expect("encode"); // skips MAX and 0: 1
        let ids: Vec<u32> = c.session.borrow().in_flight.keys().copied().collect();
        let mut ids = ids;
        ids.sort_unstable();
        assert_eq!(ids, [0, 1, u32::MAX]);
    }
}
