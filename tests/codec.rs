//! The wire protocol end to end: round trips of every envelope type and every
//! MessagePack kind of payload (byte for byte), and every malformed input
//! mapped to its typed error.

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use procbroker::protocol::{
    Envelope, EnvelopeCodec, EnvelopeError, ErrorCode, FrameCodec, FrameError, InvalidEnvelope,
    MessageType, MsgpackError, Payload, SalvagedRequest,
};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{Decoder, Encoder, FramedRead};

fn frame(body: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(body.len() as u32);
    buf.put_slice(body);
    buf
}

fn pack(value: &rmpv::Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).expect("vec write");
    out
}

fn map(pairs: Vec<(&str, rmpv::Value)>) -> rmpv::Value {
    rmpv::Value::Map(
        pairs
            .into_iter()
            .map(|(k, v)| (rmpv::Value::from(k), v))
            .collect(),
    )
}

/// Decodes one frame with the envelope codec; panics on a stream error.
fn decode_one(body: &[u8]) -> Result<Envelope, InvalidEnvelope> {
    let mut buf = frame(body);
    let item = EnvelopeCodec::default()
        .decode_eof(&mut buf)
        .expect("stream in sync")
        .expect("a whole frame");
    assert!(buf.is_empty());
    item
}

fn invalid(body: &[u8]) -> EnvelopeError {
    decode_one(body).expect_err("must be rejected").error
}

fn encode(envelope: &Envelope) -> BytesMut {
    let mut buf = BytesMut::new();
    EnvelopeCodec::default()
        .encode(envelope, &mut buf)
        .expect("encode");
    buf
}

fn round_trip(envelope: &Envelope) -> Envelope {
    let mut buf = encode(envelope);
    let back = EnvelopeCodec::default()
        .decode(&mut buf)
        .expect("in sync")
        .expect("whole")
        .expect("valid");
    assert!(buf.is_empty());
    back
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Params {
    name: String,
    value: i64,
}

#[test]
fn every_type_round_trips() {
    let request = Envelope::request("echo", "Echo", 7)
        .with_payload(&Params {
            name: "test".into(),
            value: 123,
        })
        .expect("payload")
        .with_source("client.0")
        .with_timeout_ms(250);
    let response = request
        .response(Some(Payload::encode(&"done").expect("payload")))
        .with_source("echo.3");
    let error = request
        .error_reply("handler", "it broke")
        .with_source("echo.3");
    let broker_error = request.broker_error(ErrorCode::Busy, "every queue is full");
    let event = Envelope::event("*", "config_changed")
        .with_payload(&[1, 2, 3])
        .expect("payload");

    for envelope in [&request, &response, &error, &broker_error, &event] {
        assert_eq!(&round_trip(envelope), envelope);
    }
    assert_eq!(response.kind, MessageType::Response);
    assert_eq!(response.target, "client.0");
    assert_eq!(response.correlation_id, 7);
    assert_eq!(response.id, "Echo");
    assert_eq!(broker_error.source, "broker");
    assert_eq!(broker_error.error_code(), Some(ErrorCode::Busy));
    assert_eq!(error.error_code(), None, "handler is a service's code");
    assert_eq!(
        round_trip(&request).payload_as::<Params>().expect("typed"),
        Params {
            name: "test".into(),
            value: 123
        }
    );
    // An absent payload reads as nil.
    assert_eq!(
        Envelope::event("x", "y")
            .payload_as::<Option<u8>>()
            .expect("nil"),
        None
    );
}

/// Hand-made MessagePack values, including non-shortest encodings that a
/// re-encoding library would normalise: the broker must not.
fn payload_of_every_kind() -> Vec<(&'static str, Vec<u8>)> {
    let mut cases: Vec<(&'static str, Vec<u8>)> = vec![
        ("nil", vec![0xc0]),
        ("false", vec![0xc2]),
        ("true", vec![0xc3]),
        ("positive fixint", vec![0x7f]),
        ("negative fixint", vec![0xe0]),
        ("u8", vec![0xcc, 0xff]),
        ("u16", vec![0xcd, 0xff, 0xfe]),
        ("u32", vec![0xce, 0xff, 0xff, 0xff, 0xfd]),
        (
            "u64",
            vec![0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        (
            "u64 holding 1 (not shortest)",
            vec![0xcf, 0, 0, 0, 0, 0, 0, 0, 1],
        ),
        ("i8", vec![0xd0, 0x80]),
        ("i16", vec![0xd1, 0x80, 0x00]),
        ("i32", vec![0xd2, 0x80, 0, 0, 0]),
        ("i64", vec![0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        ("i8 holding 5 (not shortest)", vec![0xd0, 0x05]),
        ("f32", vec![0xca, 0x3f, 0xc0, 0x00, 0x00]),
        (
            "f64",
            vec![0xcb, 0x40, 0x09, 0x21, 0xfb, 0x54, 0x44, 0x2d, 0x18],
        ),
        (
            "f32 NaN with payload bits",
            vec![0xca, 0x7f, 0xc0, 0x12, 0x34],
        ),
        ("empty fixstr", vec![0xa0]),
        ("empty str8 (not shortest)", vec![0xd9, 0x00]),
        ("bin8", vec![0xc4, 0x03, 0x00, 0x0a, 0xff]),
        ("empty bin", vec![0xc4, 0x00]),
        ("fixext1", vec![0xd4, 0x01, 0xaa]),
        ("fixext16", [vec![0xd8, 0xff], vec![7; 16]].concat()),
        (
            "ext8 timestamp96",
            [vec![0xc7, 12, 0xff], vec![1; 12]].concat(),
        ),
        ("empty array", vec![0x90]),
        ("empty map", vec![0x80]),
        (
            "map with non-string keys",
            vec![0x82, 0x01, 0xc3, 0xc0, 0x92, 0x01, 0x02],
        ),
    ];
    cases.push((
        "str of 70 KB (str32)",
        pack(&rmpv::Value::from("é".repeat(35_000))),
    ));
    cases.push((
        "bin32 of 70 KB",
        pack(&rmpv::Value::Binary(vec![0u8; 70_000])),
    ));
    cases.push((
        "array16",
        pack(&rmpv::Value::Array(
            (0..1000).map(rmpv::Value::from).collect(),
        )),
    ));
    cases.push((
        "nested",
        pack(&map(vec![
            (
                "a",
                rmpv::Value::Array(vec![map(vec![("b", rmpv::Value::Nil)])]),
            ),
            ("c", rmpv::Value::Ext(-1, vec![0; 8])),
            ("d", rmpv::Value::F32(0.25)),
        ])),
    ));
    let mut deep = vec![0x91u8; 5000];
    deep.push(0x01);
    cases.push(("5000 nested arrays", deep));
    cases
}

#[test]
fn payload_of_every_kind_survives_byte_for_byte() {
    for (name, raw) in payload_of_every_kind() {
        let payload = Payload::from_msgpack(raw.clone()).expect(name);
        for kind in MessageType::ALL {
            let mut envelope = Envelope::request("svc", "M", 1);
            envelope.kind = kind;
            if kind == MessageType::Error {
                envelope = envelope.error_reply("handler", "x");
            }
            let envelope = envelope.with_raw_payload(payload.clone());
            let back = round_trip(&envelope);
            assert_eq!(
                back.payload.as_ref().map(|p| p.as_bytes().as_ref()),
                Some(raw.as_slice()),
                "{name} in a {kind}"
            );
        }
    }
}

#[test]
fn decoded_strings_and_payload_are_slices_of_the_frame() {
    let body = encode(
        &Envelope::request("echo", "Echo", 1)
            .with_payload(&vec![0u8; 64])
            .expect("payload"),
    )
    .split_off(4)
    .freeze();
    let envelope = Envelope::decode(&body).expect("valid");
    let range = body.as_ptr_range();
    for ptr in [
        envelope.id.as_ptr(),
        envelope.target.as_ptr(),
        envelope
            .payload
            .as_ref()
            .expect("payload")
            .as_bytes()
            .as_ptr(),
    ] {
        assert!(range.contains(&ptr), "not a slice of the frame");
    }
}

#[test]
fn unknown_keys_are_ignored_and_nil_optionals_are_absent() {
    let body = pack(&map(vec![
        ("type", "event".into()),
        ("id", "tick".into()),
        ("target", "*".into()),
        (
            "future_key",
            map(vec![("nested", rmpv::Value::Array(vec![1.into()]))]),
        ),
        ("error", rmpv::Value::Nil),
        ("timeout_ms", rmpv::Value::Nil),
        ("source", rmpv::Value::Nil),
    ]));
    let envelope = decode_one(&body).expect("valid");
    assert_eq!(envelope.kind, MessageType::Event);
    assert_eq!(envelope.error, None);
    assert_eq!(envelope.timeout_ms, None);
    assert!(envelope.source.is_empty());
    assert_eq!(envelope.payload, None);
}

#[test]
fn non_negative_signed_ints_are_accepted_as_correlation_ids() {
    // Some msgpack libraries (JavaScript's, Go's with int64) write signed forms.
    let body = pack(&map(vec![
        ("type", "response".into()),
        ("id", "M".into()),
        ("correlation_id", rmpv::Value::from(5i64)),
    ]));
    let mut raw = body.clone();
    // Re-write the correlation id as an i64 (0xd3) explicitly.
    let at = raw.len() - 1;
    raw.truncate(at);
    raw.extend_from_slice(&[0xd3, 0, 0, 0, 0, 0, 0, 0, 5]);
    assert_eq!(decode_one(&raw).expect("valid").correlation_id, 5);
}

// ---- malformed input -----------------------------------------------------

#[test]
fn truncated_prefix_and_truncated_body_are_torn_frames() {
    let mut codec = EnvelopeCodec::default();
    let mut buf = BytesMut::from(&[0u8, 0][..]);
    assert!(codec.decode(&mut buf).expect("not yet").is_none());
    match codec.decode_eof(&mut buf) {
        Err(FrameError::Truncated {
            expected: 4,
            buffered: 2,
        }) => {}
        other => panic!("{other:?}"),
    }

    let whole = encode(&Envelope::event("x", "y"));
    let mut buf = BytesMut::from(&whole[..whole.len() - 1]);
    assert!(codec.decode(&mut buf).expect("not yet").is_none());
    match codec.decode_eof(&mut buf) {
        Err(FrameError::Truncated { expected, buffered }) => {
            assert_eq!((expected, buffered), (whole.len(), whole.len() - 1));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn zero_length_frame_is_rejected_and_the_stream_stays_in_sync() {
    let mut buf = frame(&[]);
    buf.unsplit(encode(&Envelope::event("x", "y")));
    let mut codec = EnvelopeCodec::default();
    let first = codec.decode(&mut buf).expect("in sync").expect("whole");
    assert_eq!(first.expect_err("empty").error, EnvelopeError::Empty);
    let second = codec.decode(&mut buf).expect("in sync").expect("whole");
    assert_eq!(second.expect("valid").id, "y");
}

#[test]
fn length_over_the_limit_fails_before_any_allocation() {
    let mut codec = EnvelopeCodec::new(1024);
    for len in [1025u32, 0x6865_6c6c /* "hell" */, u32::MAX] {
        let mut buf = BytesMut::with_capacity(16);
        buf.put_u32(len);
        buf.put_slice(b"abc");
        let capacity = buf.capacity();
        match codec.decode(&mut buf) {
            Err(FrameError::TooLarge { len: l, max: 1024 }) => assert_eq!(l, u64::from(len)),
            other => panic!("{other:?}"),
        }
        assert_eq!(buf.capacity(), capacity, "nothing reserved for {len}");
    }
    // Exactly at the limit is fine, and so is the encoder's check.
    let mut at_limit = BytesMut::new();
    FrameCodec::new(8)
        .encode(&[0xc0u8; 8][..], &mut at_limit)
        .expect("8 of 8");
    assert!(matches!(
        FrameCodec::new(8).encode(&[0u8; 9][..], &mut BytesMut::new()),
        Err(FrameError::TooLarge { len: 9, max: 8 })
    ));
    let big = Envelope::event("x", "y").with_raw_payload(
        Payload::from_msgpack(pack(&rmpv::Value::Binary(vec![0; 2000]))).expect("bin"),
    );
    assert!(matches!(
        EnvelopeCodec::new(1024).encode(&big, &mut BytesMut::new()),
        Err(FrameError::TooLarge { max: 1024, .. })
    ));
}

#[test]
fn body_that_is_not_msgpack() {
    assert_eq!(
        invalid(&[0xc1]),
        EnvelopeError::Malformed(MsgpackError::Reserved { offset: 0 })
    );
    // A map that promises more entries than the frame can hold.
    assert!(matches!(
        invalid(&[0x8f, 0xa4]),
        EnvelopeError::Malformed(MsgpackError::Truncated { .. })
    ));
    // JSON text is not MessagePack either: '{' is a positive fixint.
    assert_eq!(
        invalid(br#"{"type":"request"}"#),
        EnvelopeError::NotAMap { found: "uint" }
    );
}

#[test]
fn body_that_is_not_a_map() {
    assert_eq!(
        invalid(&pack(&rmpv::Value::Array(vec!["request".into()]))),
        EnvelopeError::NotAMap { found: "array" }
    );
    assert_eq!(invalid(&[0xc0]), EnvelopeError::NotAMap { found: "nil" });
}

#[test]
fn missing_fields_name_the_field() {
    let missing = |field, kind| EnvelopeError::MissingField { field, kind };
    assert_eq!(
        invalid(&pack(&map(vec![("id", "x".into())]))),
        missing("type", None)
    );
    assert_eq!(
        invalid(&pack(&map(vec![
            ("type", "request".into()),
            ("id", "M".into()),
            ("target", "t".into())
        ]))),
        missing("correlation_id", Some(MessageType::Request))
    );
    assert_eq!(
        invalid(&pack(&map(vec![
            ("type", "request".into()),
            ("id", "M".into()),
            ("correlation_id", 1.into())
        ]))),
        missing("target", Some(MessageType::Request))
    );
    assert_eq!(
        invalid(&pack(&map(vec![
            ("type", "event".into()),
            ("id", "".into()),
            ("target", "t".into())
        ]))),
        missing("id", Some(MessageType::Event))
    );
    assert_eq!(
        invalid(&pack(&map(vec![
            ("type", "error".into()),
            ("id", "M".into()),
            ("correlation_id", 1.into()),
            ("error", "boom".into()),
        ]))),
        missing("code", Some(MessageType::Error))
    );
}

#[test]
fn unknown_type() {
    assert_eq!(
        invalid(&pack(&map(vec![
            ("type", "Request".into()),
            ("id", "M".into())
        ]))),
        EnvelopeError::UnknownType("Request".into())
    );
}

#[test]
fn wrong_field_types() {
    let base = |field: &str, value: rmpv::Value| {
        let mut pairs = vec![
            ("type", rmpv::Value::from("request")),
            ("id", "M".into()),
            ("target", "t".into()),
            ("correlation_id", 1.into()),
        ];
        pairs.retain(|(k, _)| *k != field);
        pairs.push((field, value));
        invalid(&pack(&rmpv::Value::Map(
            pairs.into_iter().map(|(k, v)| (k.into(), v)).collect(),
        )))
    };
    let wrong = |field, expected, found| EnvelopeError::WrongType {
        field,
        expected,
        found,
    };
    let uint = "a non-negative int";
    assert_eq!(base("type", 1.into()), wrong("type", "str", "uint"));
    assert_eq!(base("id", 5.into()), wrong("id", "str", "uint"));
    assert_eq!(
        base("target", rmpv::Value::Binary(b"t".to_vec())),
        wrong("target", "str", "bin")
    );
    assert_eq!(
        base("correlation_id", "1".into()),
        wrong("correlation_id", uint, "str")
    );
    assert_eq!(
        base("correlation_id", (-1).into()),
        wrong("correlation_id", uint, "a negative int")
    );
    assert_eq!(
        base("timeout_ms", rmpv::Value::F64(1.0)),
        wrong("timeout_ms", uint, "float")
    );
    assert_eq!(base("code", true.into()), wrong("code", "str", "bool"));
}

#[test]
fn non_string_key_duplicate_key_and_bad_utf8() {
    assert_eq!(
        invalid(&[0x81, 0x01, 0xc0]),
        EnvelopeError::KeyNotString {
            offset: 1,
            found: "uint"
        }
    );
    assert_eq!(
        invalid(&pack(&map(vec![("id", "a".into()), ("id", "b".into())]))),
        EnvelopeError::DuplicateKey("id")
    );
    // {"type": "event", "id": <0xff>, "target": "t"}
    let mut body = vec![0x83];
    body.extend(pack(&"type".into()));
    body.extend(pack(&"event".into()));
    body.extend(pack(&"id".into()));
    body.extend([0xa1, 0xff]);
    body.extend(pack(&"target".into()));
    body.extend(pack(&"t".into()));
    assert_eq!(invalid(&body), EnvelopeError::InvalidUtf8 { field: "id" });
}

#[test]
fn trailing_bytes_after_the_envelope() {
    let mut body = pack(&map(vec![
        ("type", "event".into()),
        ("id", "e".into()),
        ("target", "t".into()),
    ]));
    body.extend([0xc0, 0xc0]);
    assert_eq!(invalid(&body), EnvelopeError::TrailingBytes(2));
}

#[test]
fn a_rejected_request_with_a_readable_correlation_id_is_salvaged() {
    let rejected = decode_one(&pack(&map(vec![
        ("type", "request".into()),
        ("id", "Spawn".into()),
        ("correlation_id", 41.into()),
        ("timeout_ms", "soon".into()),
        ("target", "broker".into()),
    ])))
    .expect_err("bad timeout");
    assert_eq!(
        rejected.request,
        Some(SalvagedRequest {
            correlation_id: 41,
            id: Some("Spawn".into())
        })
    );
    // Not a request, or no correlation id: nothing to answer.
    for body in [
        pack(&map(vec![
            ("type", "event".into()),
            ("correlation_id", 1.into()),
        ])),
        pack(&map(vec![("type", "request".into()), ("id", "M".into())])),
        vec![0xc1],
    ] {
        assert_eq!(decode_one(&body).expect_err("invalid").request, None);
    }
}

#[tokio::test]
async fn framed_read_over_a_pipe_keeps_going_past_bad_frames_and_stops_on_torn_ones() {
    let (mut writer, reader) = tokio::io::duplex(64);
    let mut stream = FramedRead::new(reader, EnvelopeCodec::default());
    let good = encode(&Envelope::event("broker", "ready"));
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&good);
    bytes.extend_from_slice(&frame(&[0xc1]));
    bytes.extend_from_slice(&good);
    bytes.extend_from_slice(&good[..7]);
    tokio::spawn(async move {
        // Dribble it in 3-byte writes to cross every boundary.
        for chunk in bytes.chunks(3) {
            writer.write_all(chunk).await.expect("write");
        }
    });
    let first = stream.next().await.expect("item").expect("in sync");
    assert_eq!(first.expect("valid").id, "ready");
    let second = stream.next().await.expect("item").expect("in sync");
    assert!(second.is_err());
    let third = stream.next().await.expect("item").expect("in sync");
    assert_eq!(third.expect("valid").id, "ready");
    match stream.next().await {
        Some(Err(FrameError::Truncated { buffered: 7, .. })) => {}
        other => panic!("{other:?}"),
    }
    assert!(stream.next().await.is_none());
}

#[test]
fn relay_rewrites_source_and_keeps_the_rest() {
    let incoming = encode(
        &Envelope::request("echo", "Echo", 9)
            .with_source("forged")
            .with_payload(&"hi")
            .expect("payload"),
    );
    let mut buf = incoming.clone();
    let mut envelope = EnvelopeCodec::default()
        .decode(&mut buf)
        .expect("in sync")
        .expect("whole")
        .expect("valid");
    envelope.source = Bytes::from_static(b"client.0").try_into().expect("utf8");
    let out = encode(&envelope);
    let back = Envelope::decode(&out.freeze().slice(4..)).expect("valid");
    assert_eq!(back.source, "client.0");
    assert_eq!(back.payload_as::<String>().expect("str"), "hi");
    assert_eq!(back.correlation_id, 9);
}

// ---- protocol v1.1: stream, more, key, cancel ------------------------------

#[test]
fn v1_1_keys_round_trip_and_are_written_only_when_set() {
    let request = Envelope::request("counter", "Count", 11)
        .with_source("client.0")
        .with_timeout_ms(900)
        .with_stream()
        .with_key("session-7")
        .expect("a short key")
        .with_payload(&3u8)
        .expect("payload");
    let partial = request
        .partial_response(Some(Payload::encode(&0u8).expect("payload")))
        .with_source("counter.1");
    let last = request.response(None).with_source("counter.1");
    for envelope in [&request, &partial, &last] {
        assert_eq!(&round_trip(envelope), envelope);
    }
    assert!(partial.more && !last.more);
    assert_eq!(
        round_trip(&request).key.expect("key").as_str(),
        Ok("session-7")
    );

    // The encoder's order: after `timeout_ms`, before `error` and `payload`.
    let wire = encode(&request);
    let at = |name: &str| {
        wire.windows(name.len())
            .position(|w| w == name.as_bytes())
            .unwrap_or_else(|| panic!("{name} written"))
    };
    assert!(at("timeout_ms") < at("stream"));
    assert!(at("stream") < at("key"));
    assert!(at("key") < at("payload"));

    // Unset, they are not written: a v1 envelope's bytes are v1's.
    let v1 = Envelope::request("echo", "Echo", 7)
        .with_source("client.0")
        .with_payload(&"x")
        .expect("payload");
    let bytes = encode(&v1);
    for name in ["stream", "more", "key"] {
        assert!(
            !bytes.windows(name.len()).any(|w| w == name.as_bytes()),
            "{name} written for a v1 envelope"
        );
    }
    assert_eq!(bytes.len(), 4 + v1.encoded_len());
}

#[test]
fn false_and_nil_flags_are_absent_and_other_types_are_refused() {
    let with = |field: &str, value: rmpv::Value| {
        pack(&map(vec![
            ("type", "request".into()),
            ("id", "M".into()),
            ("correlation_id", 1.into()),
            ("target", "t".into()),
            (field, value),
        ]))
    };
    for field in ["stream", "more"] {
        for absent in [false.into(), rmpv::Value::Nil] {
            let e = decode_one(&with(field, absent)).expect("valid");
            assert!(!e.stream && !e.more);
        }
        let e = decode_one(&with(field, true.into())).expect("valid");
        assert_eq!((e.stream, e.more), (field == "stream", field == "more"));
        assert_eq!(
            invalid(&with(field, 1.into())),
            EnvelopeError::WrongType {
                field: if field == "stream" { "stream" } else { "more" },
                expected: "bool",
                found: "uint",
            }
        );
    }
    // A nil key is no key.
    assert_eq!(
        decode_one(&with("key", rmpv::Value::Nil))
            .expect("valid")
            .key,
        None
    );
}

/// A key routing cannot use does not make the frame invalid: the envelope
/// decodes with the key marked invalid (the router answers `bad_request`),
/// and a relay writes its bytes back unchanged.
#[test]
fn a_bad_key_decodes_as_invalid_and_is_relayed_byte_for_byte() {
    use procbroker::protocol::{KeyError, MAX_KEY_BYTES, RequestKey};
    let request = |key: rmpv::Value| {
        pack(&map(vec![
            ("type", "request".into()),
            ("id", "M".into()),
            ("correlation_id", 1.into()),
            ("target", "t".into()),
            ("key", key),
        ]))
    };
    let longest = "k".repeat(MAX_KEY_BYTES);
    let fits = decode_one(&request(longest.as_str().into())).expect("valid");
    assert_eq!(fits.key.expect("key").as_str(), Ok(longest.as_str()));

    let cases = [
        (
            rmpv::Value::from("k".repeat(MAX_KEY_BYTES + 1)),
            KeyError::TooLong(MAX_KEY_BYTES + 1),
        ),
        (rmpv::Value::from(42), KeyError::NotAString("uint")),
        (
            rmpv::Value::Binary(b"k".to_vec()),
            KeyError::NotAString("bin"),
        ),
        (
            rmpv::Value::Array(vec!["k".into()]),
            KeyError::NotAString("array"),
        ),
    ];
    for (value, problem) in cases {
        let body = request(value.clone());
        let e = decode_one(&body).expect("still a valid envelope");
        let key = e.key.clone().expect("a key");
        assert!(matches!(key, RequestKey::Invalid(_)), "{value:?}");
        assert_eq!(key.problem(), Some(problem), "{value:?}");
        // Re-encoded, the key's bytes are the ones that came.
        let again = encode(&e);
        let value_bytes = pack(&value);
        assert!(
            again.windows(value_bytes.len()).any(|w| w == value_bytes),
            "{value:?} relayed verbatim"
        );
        assert_eq!(&round_trip(&e), &e);
    }
    // A str that is not UTF-8.
    let mut body = request("xx".into());
    let len = body.len();
    body[len - 2..].copy_from_slice(&[0xff, 0xfe]);
    let e = decode_one(&body).expect("valid");
    assert_eq!(e.key.expect("key").problem(), Some(KeyError::NotUtf8));
    // Malformed MessagePack in the key is a bad frame like anywhere else.
    // (The key `"k"` rewritten as an array holding the reserved 0xc1.)
    let mut torn = request("k".into());
    let len = torn.len();
    torn[len - 2..].copy_from_slice(&[0x91, 0xc1]);
    assert!(matches!(
        decode_one(&torn).map_err(|e| e.error),
        Err(EnvelopeError::Malformed(_))
    ));

    // Built by hand, a key over the limit is refused at once.
    assert_eq!(
        Envelope::request("t", "M", 1)
            .with_key("k".repeat(MAX_KEY_BYTES + 1))
            .map(|_| ()),
        Err(KeyError::TooLong(MAX_KEY_BYTES + 1))
    );
}

#[test]
fn a_valid_key_is_a_slice_of_the_frame() {
    let body = encode(
        &Envelope::request("svc", "M", 1)
            .with_key("a-session-key")
            .expect("key"),
    )
    .split_off(4)
    .freeze();
    let envelope = Envelope::decode(&body).expect("valid");
    let Some(procbroker::protocol::RequestKey::Str(key)) = &envelope.key else {
        panic!("a valid key");
    };
    assert!(body.as_ptr_range().contains(&key.as_ptr()));
}

#[test]
fn the_cancel_event_both_ways() {
    use procbroker::protocol::{CancelNotice, CancelReason};
    // Caller → broker: the request's correlation id, no payload.
    let ask = round_trip(&Envelope::cancel_request(41).with_source("client.0"));
    assert!(ask.is_cancel());
    assert_eq!((&*ask.target, ask.correlation_id), ("broker", 41));
    assert_eq!(ask.payload, None);
    // Broker → worker: {source, reason}, readable by any MessagePack library.
    let told = round_trip(&Envelope::cancel_notice(
        "svc.0",
        41,
        "client.0",
        CancelReason::Timeout,
    ));
    assert_eq!(
        (&*told.source, &*told.target, told.correlation_id),
        ("broker", "svc.0", 41)
    );
    let value: rmpv::Value =
        rmpv::decode::read_value(&mut told.payload.as_ref().expect("payload").as_bytes().as_ref())
            .expect("msgpack");
    assert_eq!(
        value,
        map(vec![
            ("source", "client.0".into()),
            ("reason", "timeout".into())
        ])
    );
    let notice = CancelNotice::from_payload(told.payload.as_ref()).expect("notice");
    assert_eq!(notice.reason, CancelReason::Timeout);
    let reasons: Vec<&str> = CancelReason::KNOWN
        .iter()
        .map(CancelReason::as_str)
        .collect();
    assert_eq!(
        reasons,
        [
            "timeout",
            "cancelled",
            "caller_exited",
            "busy",
            "shutting_down"
        ]
    );
    assert_eq!(
        CancelReason::from_wire("later".into()),
        CancelReason::Other("later".into())
    );
    // The caller's request is then answered with the new code.
    assert_eq!("cancelled".parse::<ErrorCode>(), Ok(ErrorCode::Cancelled));
}
