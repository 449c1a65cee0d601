//! The envelope: one message on the wire.

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use std::ops::Range;

use super::error::{EnvelopeError, SalvagedRequest};
use super::error_code::ErrorCode;
use super::key::{KeyError, MAX_KEY_BYTES, RequestKey};
use super::message_type::MessageType;
use super::msgpack::{self, Reader, SliceWriter, kind_name, m};
use super::payload::{Payload, PayloadError};

/// The `source` of errors the broker generates itself.
pub const BROKER: &str = "broker";

/// One message: a MessagePack map with string keys.
///
/// Decoding borrows from the frame: `id`, `source`, `target`, `error`,
/// `code`, `key` and `payload` are slices of the frame's `Bytes`
/// (reference-counted, not copied), so decoding a frame allocates nothing.
/// Keys not listed here are ignored on decode and therefore not forwarded.
///
/// `stream`, `more` and `key` are protocol v1.1: they are written only when
/// set (`true`, `Some`), so an envelope without them encodes exactly as in
/// v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// `type`: what kind of message this is.
    pub kind: MessageType,
    /// `id`: method name (request and its reply) or event name. Not unique.
    pub id: ByteString,
    /// `correlation_id`: chosen by the requester, copied into the reply. 0 on events.
    pub correlation_id: u64,
    /// `source`: the sender's process id, stamped by the broker.
    pub source: ByteString,
    /// `target`: `broker`, a process id, a service name or `*`.
    pub target: ByteString,
    /// `payload`: any MessagePack value, carried verbatim; `None` when absent.
    pub payload: Option<Payload>,
    /// `error`: human-readable message of an `error` envelope.
    pub error: Option<ByteString>,
    /// `code`: machine-readable code of an `error` envelope.
    pub code: Option<ByteString>,
    /// `timeout_ms`: per-request deadline override; on a request the broker
    /// delivers, the budget left (v1.1).
    pub timeout_ms: Option<u64>,
    /// `stream` (request, v1.1): the caller takes partial replies.
    pub stream: bool,
    /// `more` (response, v1.1): a partial reply; the final reply comes later.
    pub more: bool,
    /// `key` (request, v1.1): the routing key. A value that is not a str of
    /// at most 256 bytes decodes as [`RequestKey::Invalid`] (the frame stays
    /// valid; the router answers the request `bad_request`).
    pub key: Option<RequestKey>,
}

/// The shape of an envelope's encoding, computed before writing it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    /// Map entries.
    pub(crate) entries: usize,
    /// Encoded bytes.
    pub(crate) len: usize,
}

/// Where a decoder found each field in the frame: spans, not strings, so
/// no values with destructors live across the decode loop.
#[derive(Default)]
struct Spans {
    id: Option<Range<usize>>,
    correlation_id: Option<u64>,
    source: Option<Range<usize>>,
    target: Option<Range<usize>>,
    timeout_ms: Option<u64>,
    stream: bool,
    more: bool,
    key: Option<KeySpan>,
    error: Option<Range<usize>>,
    code: Option<Range<usize>>,
    payload: Option<Range<usize>>,
}

/// Where a decoder found `key`: a valid key's text, or the whole value of
/// one that is not.
enum KeySpan {
    Str(Range<usize>),
    Invalid(Range<usize>),
}

/// The keys as written: str header and name, one copy each.
mod key {
    pub const TYPE: &[u8] = b"\xa4type";
    pub const ID: &[u8] = b"\xa2id";
    pub const CORRELATION_ID: &[u8] = b"\xaecorrelation_id";
    pub const SOURCE: &[u8] = b"\xa6source";
    pub const TARGET: &[u8] = b"\xa6target";
    pub const TIMEOUT_MS: &[u8] = b"\xaatimeout_ms";
    pub const STREAM: &[u8] = b"\xa6stream";
    pub const MORE: &[u8] = b"\xa4more";
    pub const KEY: &[u8] = b"\xa3key";
    pub const ERROR: &[u8] = b"\xa5error";
    pub const CODE: &[u8] = b"\xa4code";
    pub const PAYLOAD: &[u8] = b"\xa7payload";
}

/// The keys the envelope knows, each with a bit for duplicate detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Type,
    Id,
    CorrelationId,
    Source,
    Target,
    Payload,
    Error,
    Code,
    TimeoutMs,
    Stream,
    More,
    Key,
}

impl Field {
    /// By length first, then one comparison of the whole key as an array
    /// (a word load or two, where a byte-wise match costs a compare and a
    /// branch per byte).
    fn from_key(key: &[u8]) -> Option<Self> {
        fn is<const N: usize>(key: &[u8], name: &[u8; N]) -> bool {
            <&[u8; N]>::try_from(key).is_ok_and(|k| k == name)
        }
        Some(match key.len() {
            2 if is(key, b"id") => Self::Id,
            3 if is(key, b"key") => Self::Key,
            4 if is(key, b"type") => Self::Type,
            4 if is(key, b"code") => Self::Code,
            4 if is(key, b"more") => Self::More,
            5 if is(key, b"error") => Self::Error,
            6 if is(key, b"source") => Self::Source,
            6 if is(key, b"target") => Self::Target,
            6 if is(key, b"stream") => Self::Stream,
            7 if is(key, b"payload") => Self::Payload,
            10 if is(key, b"timeout_ms") => Self::TimeoutMs,
            14 if is(key, b"correlation_id") => Self::CorrelationId,
            _ => return None,
        })
    }

    const fn name(self) -> &'static str {
        match self {
            Self::Type => "type",
            Self::Id => "id",
            Self::CorrelationId => "correlation_id",
            Self::Source => "source",
            Self::Target => "target",
            Self::Payload => "payload",
            Self::Error => "error",
            Self::Code => "code",
            Self::TimeoutMs => "timeout_ms",
            Self::Stream => "stream",
            Self::More => "more",
            Self::Key => "key",
        }
    }

    const fn bit(self) -> u16 {
        1 << self as u16
    }
}

/// Reads a str field (nil reads as absent): checks it is UTF-8 and returns
/// its span in the frame. The `ByteString` is made once the loop is done:
/// spans keep the decode loop's state small (no values with destructors
/// live across it), which is most of what decoding costs.
#[inline(always)]
fn read_str(
    frame: &[u8],
    reader: &mut Reader<'_>,
    field: Field,
) -> Result<Option<Range<usize>>, EnvelopeError> {
    let marker = reader.marker()?;
    match reader.str_body(marker)? {
        Some(range) if is_utf8(&frame[range.clone()]) => Ok(Some(range)),
        Some(_) => Err(EnvelopeError::InvalidUtf8 {
            field: field.name(),
        }),
        None if marker == m::NIL => Ok(None),
        None => Err(EnvelopeError::WrongType {
            field: field.name(),
            expected: "str",
            found: kind_name(marker),
        }),
    }
}

/// Whether `bytes` are UTF-8. Ids, targets and sources are short ASCII
/// names: an ASCII check settles those in a few instructions, where the
/// general check costs ~50 per string.
fn is_utf8(bytes: &[u8]) -> bool {
    is_ascii(bytes) || std::str::from_utf8(bytes).is_ok()
}

/// `bytes.is_ascii()`, with the short names of an envelope checked in two
/// overlapping word loads: `<[u8]>::is_ascii` goes byte by byte below a
/// word and aligns above it (callgrind: ~31 instructions per name, four
/// names per envelope decoded, against ~10 here).
#[inline(always)]
fn is_ascii(bytes: &[u8]) -> bool {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let n = bytes.len();
    if (8..=16).contains(&n) {
        let (Some(head), Some(tail)) = (bytes.first_chunk::<8>(), bytes.last_chunk::<8>()) else {
            return bytes.is_ascii();
        };
        (u64::from_ne_bytes(*head) | u64::from_ne_bytes(*tail)) & HIGH == 0
    } else if (4..8).contains(&n) {
        let (Some(head), Some(tail)) = (bytes.first_chunk::<4>(), bytes.last_chunk::<4>()) else {
            return bytes.is_ascii();
        };
        (u32::from_ne_bytes(*head) | u32::from_ne_bytes(*tail)) & HIGH as u32 == 0
    } else {
        bytes.is_ascii()
    }
}

/// The `ByteString` of a span [`read_str`] checked.
fn text(frame: &Bytes, span: Range<usize>) -> ByteString {
    // SAFETY: `read_str` returned this span only after `from_utf8` accepted
    // exactly these bytes of this frame; checking them again would double
    // the cost of the envelope's strings.
    unsafe { ByteString::from_bytes_unchecked(frame.slice(span)) }
}

/// Reads a non-negative int field (nil reads as absent).
#[inline(always)]
fn read_uint(reader: &mut Reader<'_>, field: Field) -> Result<Option<u64>, EnvelopeError> {
    let marker = reader.marker()?;
    let wrong = |found| EnvelopeError::WrongType {
        field: field.name(),
        expected: "a non-negative int",
        found,
    };
    match reader.uint_body(marker)? {
        Some(Some(v)) => Ok(Some(v)),
        Some(None) => Err(wrong("a negative int")),
        None if marker == m::NIL => Ok(None),
        None => Err(wrong(kind_name(marker))),
    }
}

/// Reads a bool field (nil reads as absent, that is `false`).
#[inline(always)]
fn read_bool(reader: &mut Reader<'_>, field: Field) -> Result<bool, EnvelopeError> {
    match reader.marker()? {
        m::TRUE => Ok(true),
        m::FALSE | m::NIL => Ok(false),
        marker => Err(EnvelopeError::WrongType {
            field: field.name(),
            expected: "bool",
            found: kind_name(marker),
        }),
    }
}

/// Reads `key` (nil reads as absent). A value that is not a UTF-8 str of at
/// most [`MAX_KEY_BYTES`] is kept whole as an invalid key: the envelope
/// still decodes, and the router refuses the request. Only malformed
/// MessagePack fails the frame.
#[inline]
fn read_key(frame: &[u8], reader: &mut Reader<'_>) -> Result<Option<KeySpan>, EnvelopeError> {
    let start = reader.position();
    let marker = reader.marker()?;
    if marker == m::NIL {
        return Ok(None);
    }
    Ok(Some(match reader.str_body(marker)? {
        Some(range) if range.len() <= MAX_KEY_BYTES && is_utf8(&frame[range.clone()]) => {
            KeySpan::Str(range)
        }
        Some(_) => KeySpan::Invalid(start..reader.position()),
        None => {
            reader.skip_body(marker)?;
            KeySpan::Invalid(start..reader.position())
        }
    }))
}

/// `Some` and non-empty, else the field counts as missing.
fn present(value: &Option<ByteString>) -> bool {
    value.as_ref().is_some_and(|s| !s.is_empty())
}

/// What an envelope's type requires, as facts about its fields (an empty
/// string counts as missing, except `error`'s).
struct Required {
    kind: MessageType,
    has_id: bool,
    has_correlation_id: bool,
    has_target: bool,
    has_code: bool,
    has_error: bool,
}

impl Required {
    /// The first required field missing, in a fixed order.
    #[inline(always)]
    fn check(&self) -> Result<(), EnvelopeError> {
        let missing = |field| EnvelopeError::MissingField {
            field,
            kind: Some(self.kind),
        };
        if !self.has_id {
            return Err(missing("id"));
        }
        if self.kind != MessageType::Event && !self.has_correlation_id {
            return Err(missing("correlation_id"));
        }
        if matches!(self.kind, MessageType::Request | MessageType::Event) && !self.has_target {
            return Err(missing("target"));
        }
        if self.kind == MessageType::Error {
            if !self.has_code {
                return Err(missing("code"));
            }
            if !self.has_error {
                return Err(missing("error"));
            }
        }
        Ok(())
    }
}

impl Spans {
    /// Checks, before any string is made, the fields `kind` requires.
    #[inline(always)]
    fn check_required(&self, kind: MessageType) -> Result<(), EnvelopeError> {
        let non_empty = |span: &Option<Range<usize>>| span.as_ref().is_some_and(|r| !r.is_empty());
        Required {
            kind,
            has_id: non_empty(&self.id),
            has_correlation_id: self.correlation_id.is_some(),
            has_target: non_empty(&self.target),
            has_code: non_empty(&self.code),
            has_error: self.error.is_some(),
        }
        .check()
    }
}

impl Envelope {
    fn new(kind: MessageType, target: ByteString, id: ByteString, correlation_id: u64) -> Self {
        Self {
            kind,
            id,
            correlation_id,
            source: ByteString::new(),
            target,
            payload: None,
            error: None,
            code: None,
            timeout_ms: None,
            stream: false,
            more: false,
            key: None,
        }
    }

    /// A request for method `id` of `target`.
    pub fn request(
        target: impl Into<ByteString>,
        id: impl Into<ByteString>,
        correlation_id: u64,
    ) -> Self {
        Self::new(
            MessageType::Request,
            target.into(),
            id.into(),
            correlation_id,
        )
    }

    /// An event named `id` for `target` (a process, a service, `broker` or `*`).
    pub fn event(target: impl Into<ByteString>, id: impl Into<ByteString>) -> Self {
        Self::new(MessageType::Event, target.into(), id.into(), 0)
    }

    /// The successful reply to this request: addressed to its source, same `id`
    /// and `correlation_id`.
    pub fn response(&self, payload: Option<Payload>) -> Self {
        let mut reply = Self::new(
            MessageType::Response,
            self.source.clone(),
            self.id.clone(),
            self.correlation_id,
        );
        reply.payload = payload;
        reply
    }

    /// A partial reply to this request (`more = true`, v1.1): one of those
    /// a request that asked `stream = true` may get before its final reply.
    pub fn partial_response(&self, payload: Option<Payload>) -> Self {
        let mut partial = self.response(payload);
        partial.more = true;
        partial
    }

    /// The failed reply to this request, with a code (any string; see
    /// [`ErrorCode`] for the broker's own) and a human-readable message.
    pub fn error_reply(&self, code: impl Into<ByteString>, message: impl Into<ByteString>) -> Self {
        let mut reply = Self::new(
            MessageType::Error,
            self.source.clone(),
            self.id.clone(),
            self.correlation_id,
        );
        reply.code = Some(code.into());
        reply.error = Some(message.into());
        reply
    }

    /// A broker-generated error reply: `source = "broker"` and a broker code.
    pub fn broker_error(&self, code: ErrorCode, message: impl Into<ByteString>) -> Self {
        Self::broker_error_to(
            self.source.clone(),
            self.id.clone(),
            self.correlation_id,
            code,
            message,
        )
    }

    /// A broker-generated error for request `correlation_id` (method `id`)
    /// of `origin`, addressed to it: for when the request itself is gone
    /// (timed out, its worker exited, it could not be decoded).
    pub fn broker_error_to(
        origin: ByteString,
        id: ByteString,
        correlation_id: u64,
        code: ErrorCode,
        message: impl Into<ByteString>,
    ) -> Self {
        let mut reply = Self::new(MessageType::Error, origin, id, correlation_id);
        reply.code = Some(ByteString::from_static(code.as_str()));
        reply.error = Some(message.into());
        reply.source = ByteString::from_static(BROKER);
        reply
    }

    /// Sets the payload to `value`, serialized with named fields.
    pub fn with_payload<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, PayloadError> {
        self.payload = Some(Payload::encode(value)?);
        Ok(self)
    }

    /// Sets the payload to an already-encoded value.
    pub fn with_raw_payload(mut self, payload: Payload) -> Self {
        self.payload = Some(payload);
        self
    }

    /// Sets `source` (the broker overwrites it on every frame a child sends).
    pub fn with_source(mut self, source: impl Into<ByteString>) -> Self {
        self.source = source.into();
        self
    }

    /// Sets the per-request deadline override.
    pub fn with_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.timeout_ms = Some(timeout_ms);
        self
    }

    /// Asks for partial replies (`stream = true`, v1.1).
    pub fn with_stream(mut self) -> Self {
        self.stream = true;
        self
    }

    /// Sets the routing key (v1.1); refused if longer than 256 bytes.
    pub fn with_key(mut self, key: impl Into<ByteString>) -> Result<Self, KeyError> {
        self.key = Some(RequestKey::new(key)?);
        Ok(self)
    }

    /// Deserializes the payload into `T`; an absent payload reads as nil (so
    /// `()` and `Option<_>` accept it).
    pub fn payload_as<'de, T: Deserialize<'de>>(&'de self) -> Result<T, PayloadError> {
        match &self.payload {
            Some(payload) => payload.decode(),
            None => Ok(rmp_serde::from_slice(Payload::NIL_BYTES)?),
        }
    }

    /// `code` as a broker error code, if it is one.
    pub fn error_code(&self) -> Option<ErrorCode> {
        self.code.as_deref().and_then(|c| c.parse().ok())
    }

    /// Decodes one frame body. Strings and payload become slices of `frame`.
    #[inline]
    pub fn decode(frame: &Bytes) -> Result<Self, EnvelopeError> {
        Self::decode_mapped(frame, |error| error)
    }

    /// [`decode`](Self::decode) with its error mapped by `on_error`. The
    /// envelope is built once, in the caller's result: an envelope is a few
    /// hundred bytes, and each move of it between `Option` and `Result`
    /// wrappers is a `memcpy` (a quarter of a small round trip's time when
    /// decoding went through three of them).
    #[inline(always)]
    pub(crate) fn decode_mapped<E>(
        frame: &Bytes,
        on_error: impl FnOnce(EnvelopeError) -> E,
    ) -> Result<Self, E> {
        match Self::canonical_spans(frame) {
            Some((kind, spans)) => Ok(Self::assemble(frame, kind, spans)),
            None => Self::decode_any(frame).map_err(on_error),
        }
    }

    /// The fast path: the keys in the order [`encode`](Self::encode_laid_out)
    /// writes them (procbroker's own peers, and the SDKs that copy it),
    /// each matched as one byte string. No key lookup, no duplicate
    /// tracking: keys in that strict order cannot repeat. Anything else
    /// (another order, nil values, unknown keys, any error) returns `None`
    /// and [`decode_any`](Self::decode_any) decodes the frame from the start,
    /// so errors are reported the one way.
    ///
    /// Returns where the fields are, already checked for what the type
    /// requires; [`assemble`](Self::assemble) makes the envelope of them.
    #[inline(always)]
    fn canonical_spans(frame: &Bytes) -> Option<(MessageType, Spans)> {
        let mut reader = Reader::new(frame);
        let entries = match reader.marker().ok()? {
            marker @ 0x81..=0x8c => usize::from(marker & 0x0f),
            _ => return None,
        };
        // The general decoder's readers; an error or a nil (absent in the
        // general decoder, never written by the encoder) leaves the fast path.
        #[inline(always)]
        fn str_at(frame: &[u8], reader: &mut Reader<'_>, field: Field) -> Option<Range<usize>> {
            read_str(frame, reader, field).ok().flatten()
        }
        #[inline(always)]
        fn uint_at(reader: &mut Reader<'_>, field: Field) -> Option<u64> {
            read_uint(reader, field).ok().flatten()
        }
        if !reader.eat(key::TYPE) {
            return None;
        }
        let kind = MessageType::from_bytes(&frame[str_at(frame, &mut reader, Field::Type)?])?;
        if !reader.eat(key::ID) {
            return None;
        }
        let mut spans = Spans {
            id: Some(str_at(frame, &mut reader, Field::Id)?),
            ..Spans::default()
        };
        let mut read = 2;
        if read < entries && reader.eat(key::CORRELATION_ID) {
            spans.correlation_id = Some(uint_at(&mut reader, Field::CorrelationId)?);
            read += 1;
        }
        if read < entries && reader.eat(key::SOURCE) {
            spans.source = Some(str_at(frame, &mut reader, Field::Source)?);
            read += 1;
        }
        if read < entries && reader.eat(key::TARGET) {
            spans.target = Some(str_at(frame, &mut reader, Field::Target)?);
            read += 1;
        }
        if read < entries && reader.eat(key::TIMEOUT_MS) {
            spans.timeout_ms = Some(uint_at(&mut reader, Field::TimeoutMs)?);
            read += 1;
        }
        // v1.1: written only when set, so a `false` is the general
        // decoder's.
        if read < entries && reader.eat(key::STREAM) {
            spans.stream = reader.marker().ok()? == m::TRUE;
            if !spans.stream {
                return None;
            }
            read += 1;
        }
        if read < entries && reader.eat(key::MORE) {
            spans.more = reader.marker().ok()? == m::TRUE;
            if !spans.more {
                return None;
            }
            read += 1;
        }
        if read < entries && reader.eat(key::KEY) {
            spans.key = Some(read_key(frame, &mut reader).ok()??);
            read += 1;
        }
        if read < entries && reader.eat(key::ERROR) {
            spans.error = Some(str_at(frame, &mut reader, Field::Error)?);
            read += 1;
        }
        if read < entries && reader.eat(key::CODE) {
            spans.code = Some(str_at(frame, &mut reader, Field::Code)?);
            read += 1;
        }
        if read < entries && reader.eat(key::PAYLOAD) {
            spans.payload = Some(reader.value_span().ok()?);
            read += 1;
        }
        if read != entries || reader.remaining() > 0 {
            return None;
        }
        spans.check_required(kind).ok()?;
        Some((kind, spans))
    }

    /// The fast path alone, as an envelope (the tests compare it with the
    /// general decoder).
    #[cfg(test)]
    fn decode_canonical(frame: &Bytes) -> Option<Self> {
        Self::canonical_spans(frame).map(|(kind, spans)| Self::assemble(frame, kind, spans))
    }

    /// The general decoder: keys in any order, nil as absent, unknown keys
    /// skipped, every error named.
    fn decode_any(frame: &Bytes) -> Result<Self, EnvelopeError> {
        if frame.is_empty() {
            return Err(EnvelopeError::Empty);
        }
        let mut reader = Reader::new(frame);
        let marker = reader.marker()?;
        let entries = reader.map_len(marker)?.ok_or(EnvelopeError::NotAMap {
            found: kind_name(marker),
        })?;
        // Each entry takes at least two bytes; refuse lying counts up front.
        if entries > reader.remaining() / 2 {
            return Err(msgpack::MsgpackError::Truncated {
                offset: reader.position(),
            }
            .into());
        }

        let mut seen = 0u16;
        let mut kind = None;
        let mut spans = Spans::default();

        for _ in 0..entries {
            let key_at = reader.position();
            let key_marker = reader.marker()?;
            let Some(key) = reader.str_body(key_marker)? else {
                return Err(EnvelopeError::KeyNotString {
                    offset: key_at,
                    found: kind_name(key_marker),
                });
            };
            let Some(field) = Field::from_key(&frame[key]) else {
                reader.value_span()?;
                continue;
            };
            if seen & field.bit() != 0 {
                return Err(EnvelopeError::DuplicateKey(field.name()));
            }
            seen |= field.bit();
            match field {
                Field::Type => {
                    let marker = reader.marker()?;
                    match reader.str_body(marker)? {
                        Some(range) => {
                            let raw = &frame[range];
                            kind = Some(MessageType::from_bytes(raw).ok_or_else(|| {
                                let shown = &raw[..raw.len().min(64)];
                                EnvelopeError::UnknownType(String::from_utf8_lossy(shown).into())
                            })?);
                        }
                        None if marker == m::NIL => {}
                        None => {
                            return Err(EnvelopeError::WrongType {
                                field: "type",
                                expected: "str",
                                found: kind_name(marker),
                            });
                        }
                    }
                }
                Field::Id => spans.id = read_str(frame, &mut reader, field)?,
                Field::Source => spans.source = read_str(frame, &mut reader, field)?,
                Field::Target => spans.target = read_str(frame, &mut reader, field)?,
                Field::Error => spans.error = read_str(frame, &mut reader, field)?,
                Field::Code => spans.code = read_str(frame, &mut reader, field)?,
                Field::CorrelationId => spans.correlation_id = read_uint(&mut reader, field)?,
                Field::TimeoutMs => spans.timeout_ms = read_uint(&mut reader, field)?,
                Field::Stream => spans.stream = read_bool(&mut reader, field)?,
                Field::More => spans.more = read_bool(&mut reader, field)?,
                Field::Key => spans.key = read_key(frame, &mut reader)?,
                Field::Payload => spans.payload = Some(reader.value_span()?),
            }
        }
        if reader.remaining() > 0 {
            return Err(EnvelopeError::TrailingBytes(reader.remaining()));
        }

        let kind = kind.ok_or(EnvelopeError::MissingField {
            field: "type",
            kind: None,
        })?;
        spans.check_required(kind)?;
        Ok(Self::assemble(frame, kind, spans))
    }

    /// The envelope of the fields a decoder found and checked: built in
    /// place, where its caller returns it.
    #[inline(always)]
    fn assemble(frame: &Bytes, kind: MessageType, spans: Spans) -> Self {
        let text_of = |span: Option<Range<usize>>| span.map(|span| text(frame, span));
        Self {
            kind,
            id: text_of(spans.id).unwrap_or_default(),
            correlation_id: spans.correlation_id.unwrap_or(0),
            source: text_of(spans.source).unwrap_or_default(),
            target: text_of(spans.target).unwrap_or_default(),
            payload: spans
                .payload
                .map(|span| Payload::from_checked(frame.slice(span))),
            error: text_of(spans.error),
            code: text_of(spans.code),
            timeout_ms: spans.timeout_ms,
            stream: spans.stream,
            more: spans.more,
            key: spans.key.map(|key| match key {
                KeySpan::Str(span) => RequestKey::Str(text(frame, span)),
                KeySpan::Invalid(span) => {
                    RequestKey::Invalid(Payload::from_checked(frame.slice(span)))
                }
            }),
        }
    }

    /// Checks the fields this envelope's type requires.
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        Required {
            kind: self.kind,
            has_id: !self.id.is_empty(),
            has_correlation_id: true,
            has_target: !self.target.is_empty(),
            has_code: present(&self.code),
            has_error: self.error.is_some(),
        }
        .check()
    }

    /// Whether `correlation_id` is written: always, except on events that have none.
    fn writes_correlation_id(&self) -> bool {
        self.kind != MessageType::Event || self.correlation_id != 0
    }

    /// Exact size of the encoded map, so a buffer can be reserved once.
    pub fn encoded_len(&self) -> usize {
        self.layout().len
    }

    /// How many map entries the encoding has and how many bytes it takes.
    pub(crate) fn layout(&self) -> Layout {
        let mut entries = 2;
        let mut len = key::TYPE.len() + self.kind.encoded().len() + key::ID.len();
        len += msgpack::str_len(&self.id);
        if self.writes_correlation_id() {
            entries += 1;
            len += key::CORRELATION_ID.len() + msgpack::uint_len(self.correlation_id);
        }
        if !self.source.is_empty() {
            entries += 1;
            len += key::SOURCE.len() + msgpack::str_len(&self.source);
        }
        if !self.target.is_empty() {
            entries += 1;
            len += key::TARGET.len() + msgpack::str_len(&self.target);
        }
        if let Some(ms) = self.timeout_ms {
            entries += 1;
            len += key::TIMEOUT_MS.len() + msgpack::uint_len(ms);
        }
        if self.stream {
            entries += 1;
            len += key::STREAM.len() + 1;
        }
        if self.more {
            entries += 1;
            len += key::MORE.len() + 1;
        }
        if let Some(k) = &self.key {
            entries += 1;
            len += key::KEY.len() + k.encoded_len();
        }
        if let Some(error) = &self.error {
            entries += 1;
            len += key::ERROR.len() + msgpack::str_len(error);
        }
        if let Some(code) = &self.code {
            entries += 1;
            len += key::CODE.len() + msgpack::str_len(code);
        }
        if let Some(payload) = &self.payload {
            entries += 1;
            len += key::PAYLOAD.len() + payload.len();
        }
        Layout {
            entries,
            len: len + msgpack::map_header_len(entries),
        }
    }

    /// Appends the envelope (the map, without a length prefix) to `dst`.
    /// Allocates nothing when `dst` has [`encoded_len`](Self::encoded_len)
    /// bytes of spare capacity; otherwise grows it once.
    pub fn encode_into(&self, dst: &mut BytesMut) {
        self.encode_laid_out(dst, self.layout());
    }

    /// [`encode_into`](Self::encode_into) with the layout already computed.
    pub(crate) fn encode_laid_out(&self, dst: &mut BytesMut, layout: Layout) {
        dst.reserve(layout.len);
        self.encode_head(dst, layout);
        if let Some(payload) = &self.payload {
            dst.extend_from_slice(payload.as_bytes());
        }
    }

    /// Appends the encoding up to the payload's bytes, which are the
    /// encoding's last bytes: written after it, they complete the map.
    pub(crate) fn encode_head(&self, dst: &mut BytesMut, layout: Layout) {
        // The payload is written last and may be large: the caller copies
        // it straight in (or writes it from where it is), rather than
        // zero-filling its space first.
        let payload_len = self.payload.as_ref().map_or(0, Payload::len);
        let start = dst.len();
        dst.resize(start + layout.len - payload_len, 0);
        let mut w = SliceWriter::new(&mut dst[start..]);
        w.map_header(layout.entries);
        w.bytes(key::TYPE);
        w.bytes(self.kind.encoded());
        w.bytes(key::ID);
        w.str(&self.id);
        if self.writes_correlation_id() {
            w.bytes(key::CORRELATION_ID);
            w.uint(self.correlation_id);
        }
        if !self.source.is_empty() {
            w.bytes(key::SOURCE);
            w.str(&self.source);
        }
        if !self.target.is_empty() {
            w.bytes(key::TARGET);
            w.str(&self.target);
        }
        if let Some(ms) = self.timeout_ms {
            w.bytes(key::TIMEOUT_MS);
            w.uint(ms);
        }
        if self.stream {
            w.bytes(key::STREAM);
            w.bytes(&[m::TRUE]);
        }
        if self.more {
            w.bytes(key::MORE);
            w.bytes(&[m::TRUE]);
        }
        match &self.key {
            Some(RequestKey::Str(k)) => {
                w.bytes(key::KEY);
                w.str(k);
            }
            Some(RequestKey::Invalid(raw)) => {
                w.bytes(key::KEY);
                w.bytes(raw.as_bytes());
            }
            None => {}
        }
        if let Some(error) = &self.error {
            w.bytes(key::ERROR);
            w.str(error);
        }
        if let Some(code) = &self.code {
            w.bytes(key::CODE);
            w.str(code);
        }
        if self.payload.is_some() {
            w.bytes(key::PAYLOAD);
        }
        debug_assert_eq!(w.written(), layout.len - payload_len, "layout disagrees");
    }

    /// The encoded map as a new buffer (convenience; the codec reuses one).
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut buf);
        buf.freeze()
    }
}

/// Reads what it can of a rejected frame: is it a request, and with which
/// correlation id and method? Lenient on purpose: stops at the first thing it
/// cannot read and keeps what it has.
pub(crate) fn salvage_request(frame: &Bytes) -> Option<SalvagedRequest> {
    let mut reader = Reader::new(frame);
    let marker = reader.marker().ok()?;
    let entries = reader.map_len(marker).ok()??;
    let mut is_request = false;
    let mut correlation_id = None;
    let mut id = None;
    // A field of the wrong type is skipped, never the end of the search: a
    // bad `id` must not hide the `correlation_id` after it (that request
    // would go unanswered). Only a truncated value stops the walk.
    for _ in 0..entries {
        let Ok(key_marker) = reader.marker() else {
            break;
        };
        let key = match reader.str_body(key_marker) {
            Ok(Some(range)) => Some(range),
            Ok(None) => match reader.skip_body(key_marker) {
                Ok(()) => None,
                Err(_) => break,
            },
            Err(_) => break,
        };
        let Ok(marker) = reader.marker() else { break };
        let read = match key.map(|k| &frame[k]) {
            Some(b"type") => reader
                .str_body(marker)
                .map(|range| range.map(|r| is_request = &frame[r] == b"request")),
            Some(b"correlation_id") => reader.uint_body(marker).map(|v| {
                v.map(|v| {
                    if let Some(v) = v {
                        correlation_id = Some(v);
                    }
                })
            }),
            Some(b"id") => reader
                .str_body(marker)
                .map(|range| range.map(|r| id = ByteString::try_from(frame.slice(r)).ok())),
            _ => Ok(None),
        };
        match read {
            Ok(Some(())) => {}
            // Not the type this key should have (or a key we do not need):
            // its value is skipped whole.
            Ok(None) => {
                if reader.skip_body(marker).is_err() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    if !is_request {
        return None;
    }
    Some(SalvagedRequest {
        correlation_id: correlation_id?,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_ascii_check_finds_a_high_byte_at_any_place_of_any_length() {
        for len in 0..=40 {
            let mut bytes = vec![b'a'; len];
            assert!(is_ascii(&bytes), "{len} ASCII bytes");
            for at in 0..len {
                for high in [0x80, 0xc3, 0xff] {
                    bytes[at] = high;
                    assert!(!is_ascii(&bytes), "{high:#x} at {at} of {len}");
                    bytes[at] = b'a';
                }
            }
        }
    }

    proptest! {
        #[test]
        fn is_utf8_agrees_with_the_standard_library(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            prop_assert_eq!(is_utf8(&bytes), std::str::from_utf8(&bytes).is_ok());
            prop_assert_eq!(is_ascii(&bytes), bytes.is_ascii());
        }

        #[test]
        fn any_text_is_utf8(text in "\\PC{0,24}") {
            prop_assert!(is_utf8(text.as_bytes()));
        }
    }

    fn envelope() -> impl Strategy<Value = Envelope> {
        let name = "[a-z@.]{0,12}";
        (
            0..4u8,
            (name, name, name),
            (any::<u64>(), proptest::option::of(any::<u64>())),
            proptest::option::of(("[ -~é]{0,40}", "[a-z_]{0,12}")),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            (
                any::<bool>(),
                any::<bool>(),
                proptest::option::of(prop_oneof![
                    "[a-z]{0,12}".prop_map(|k| RequestKey::new(k).expect("short")),
                    any::<u32>()
                        .prop_map(|n| RequestKey::Invalid(Payload::encode(&n).expect("an int"))),
                ]),
            ),
        )
            .prop_map(
                |(
                    kind,
                    (id, source, target),
                    (correlation_id, timeout_ms),
                    error,
                    payload,
                    (stream, more, key),
                )| {
                    let mut envelope = Envelope::request(target, id, correlation_id);
                    envelope.kind = [
                        MessageType::Request,
                        MessageType::Response,
                        MessageType::Event,
                        MessageType::Error,
                    ][usize::from(kind)];
                    envelope.source = source.into();
                    envelope.timeout_ms = timeout_ms;
                    envelope.stream = stream;
                    envelope.more = more;
                    envelope.key = key;
                    if let Some((message, code)) = error {
                        envelope.error = Some(message.into());
                        envelope.code = Some(code.into());
                    }
                    if let Some(bytes) = payload {
                        envelope = envelope
                            .with_payload(&serde_bytes::ByteBuf::from(bytes))
                            .expect("bin payload");
                    }
                    envelope
                },
            )
    }

    proptest! {
        /// What the encoder writes takes the fast path, and the fast path
        /// agrees with the general decoder on every frame it accepts, a
        /// byte changed or cut anywhere included.
        #[test]
        fn the_fast_path_agrees_with_the_general_decoder(
            envelope in envelope(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<bool>(),
        ) {
            let frame = envelope.to_bytes();
            let general = Envelope::decode_any(&frame);
            if general.is_ok() {
                prop_assert_eq!(Envelope::decode_canonical(&frame).map(Ok), Some(general));
            }
            let mut changed = frame.to_vec();
            let i = at.index(changed.len());
            if cut {
                changed.truncate(i);
            } else {
                changed[i] = byte;
            }
            let changed = Bytes::from(changed);
            if let Some(fast) = Envelope::decode_canonical(&changed) {
                prop_assert_eq!(Envelope::decode_any(&changed), Ok(fast));
            }
        }
    }
}
