//! Properties of the codec over random envelopes and random byte streams.

use bytes::BytesMut;
use procbroker::protocol::{Envelope, EnvelopeCodec, FrameError, MessageType, Payload, RequestKey};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

fn msgpack_value() -> impl Strategy<Value = rmpv::Value> {
    use rmpv::Value;
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f32>().prop_map(Value::F32),
        any::<f64>().prop_map(Value::F64),
        ".{0,40}".prop_map(Value::from),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Value::Binary),
        (any::<i8>(), proptest::collection::vec(any::<u8>(), 0..20))
            .prop_map(|(t, d)| Value::Ext(t, d)),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec((inner.clone(), inner), 0..8).prop_map(Value::Map),
        ]
    })
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.-]{1,24}"
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        prop::sample::select(MessageType::ALL.to_vec()),
        name(),
        any::<u64>(),
        proptest::option::of(name()),
        name(),
        proptest::option::of(msgpack_value()),
        ".{0,60}",
        name(),
        proptest::option::of(any::<u64>()),
        (any::<bool>(), any::<bool>(), proptest::option::of(key())),
    )
        .prop_map(
            |(
                kind,
                id,
                correlation_id,
                source,
                target,
                payload,
                error,
                code,
                timeout_ms,
                (stream, more, key),
            )| {
                let mut e = Envelope::request(target, id, correlation_id);
                e.kind = kind;
                if let Some(source) = source {
                    e.source = source.into();
                }
                if kind == MessageType::Event {
                    e.correlation_id = 0;
                }
                if kind == MessageType::Error {
                    e.error = Some(error.into());
                    e.code = Some(code.into());
                }
                e.timeout_ms = timeout_ms;
                e.stream = stream;
                e.more = more;
                e.key = key;
                if let Some(value) = payload {
                    let mut raw = Vec::new();
                    rmpv::encode::write_value(&mut raw, &value).expect("vec write");
                    e.payload = Some(Payload::from_msgpack(raw).expect("one value"));
                }
                e
            },
        )
}

/// A v1.1 `key`: a str within the limit, or any other value (kept raw,
/// as the decoder keeps it).
fn key() -> impl Strategy<Value = RequestKey> {
    prop_oneof![
        ".{0,40}".prop_map(|k| RequestKey::new(k).expect("short")),
        "[a-z]{257,300}".prop_map(|k| raw_key(&rmpv::Value::from(k))),
        msgpack_value()
            .prop_filter("not a str", |v| !v.is_str() && !v.is_nil())
            .prop_map(|v| raw_key(&v)),
    ]
}

fn raw_key(value: &rmpv::Value) -> RequestKey {
    let mut raw = Vec::new();
    rmpv::encode::write_value(&mut raw, value).expect("vec write");
    RequestKey::Invalid(Payload::from_msgpack(raw).expect("one value"))
}

/// Decodes everything in `chunks`, fed one chunk at a time, then EOF.
/// Returns the items and the terminal stream error, if any.
fn decode_chunked(chunks: &[&[u8]]) -> (Vec<String>, Option<String>) {
    let mut codec = EnvelopeCodec::new(4096);
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    let mut feed = chunks.iter();
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(item)) => items.push(format!("{item:?}")),
            Ok(None) => match feed.next() {
                Some(chunk) => buf.extend_from_slice(chunk),
                None => break,
            },
            Err(e) => return (items, Some(describe(&e))),
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(item)) => items.push(format!("{item:?}")),
            Ok(None) => return (items, None),
            Err(e) => return (items, Some(describe(&e))),
        }
    }
}

fn describe(e: &FrameError) -> String {
    match e {
        // The buffered count depends on where the stream was cut.
        FrameError::Truncated { .. } => "truncated".into(),
        other => other.to_string(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_envelopes_round_trip(envelopes in proptest::collection::vec(envelope(), 1..6)) {
        let mut codec = EnvelopeCodec::default();
        let mut buf = BytesMut::new();
        for e in &envelopes {
            prop_assert_eq!(e.encoded_len() + 4, {
                let before = buf.len();
                codec.encode(e, &mut buf).expect("encode");
                buf.len() - before
            });
        }
        for e in &envelopes {
            let back = codec.decode(&mut buf).expect("in sync").expect("whole").expect("valid");
            prop_assert_eq!(&back, e);
        }
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn random_bytes_never_panic_and_chunking_does_not_matter(
        data in proptest::collection::vec(any::<u8>(), 0..2048),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let whole = decode_chunked(&[&data]);
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for p in points {
            chunks.push(&data[start..p]);
            start = p;
        }
        chunks.push(&data[start..]);
        prop_assert_eq!(decode_chunked(&chunks), whole);
    }

    #[test]
    fn valid_streams_decode_the_same_however_they_are_split(
        envelopes in proptest::collection::vec(envelope(), 1..5),
        step in 1usize..64,
    ) {
        let mut codec = EnvelopeCodec::default();
        let mut wire = BytesMut::new();
        for e in &envelopes {
            codec.encode(e, &mut wire).expect("encode");
        }
        let chunks: Vec<&[u8]> = wire.chunks(step).collect();
        let (items, err) = decode_chunked(&chunks);
        prop_assert_eq!(err, None);
        // Items are `Result<Envelope, InvalidEnvelope>` printed with `{:?}`.
        let expected: Vec<String> = envelopes.iter().map(|e| format!("{:?}", Ok::<_, ()>(e))).collect();
        prop_assert_eq!(items, expected);
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        e in envelope(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut wire = BytesMut::new();
        EnvelopeCodec::default().encode(&e, &mut wire).expect("encode");
        let mut bytes = wire.to_vec();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let _ = decode_chunked(&[&bytes]);
    }
}

/// A value that is anything but a str.
fn not_a_str() -> impl Strategy<Value = rmpv::Value> {
    msgpack_value().prop_filter("not a str", |v| !v.is_str())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A request whose fields come in any order, with wrong types anywhere
    /// (its `id`, extra keys that are not strs, values of any shape), is
    /// still salvaged by its `correlation_id`: it gets `bad_request`, never
    /// silence.
    #[test]
    fn a_bad_request_is_salvaged_whatever_its_key_order_and_wrong_types(
        correlation_id in any::<u64>(),
        bad_id in not_a_str(),
        extras in proptest::collection::vec((prop_oneof![
            name().prop_map(rmpv::Value::from),
            not_a_str(),
        ], msgpack_value()), 0..5),
        order in any::<prop::sample::Index>(),
        seed in any::<u64>(),
    ) {
        use rmpv::Value;
        let mut entries: Vec<(Value, Value)> = extras
            .into_iter()
            .filter(|(k, _)| !matches!(k.as_str(), Some("type" | "correlation_id" | "id")))
            .collect();
        entries.push(("id".into(), bad_id));
        entries.push(("target".into(), "echo".into()));
        // Shuffle the fields deterministically from the seed, then put
        // `correlation_id` anywhere, `type` first or last.
        let mut state = seed | 1;
        for i in (1..entries.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            entries.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let at = order.index(entries.len() + 1);
        entries.insert(at, ("correlation_id".into(), Value::from(correlation_id)));
        if seed % 2 == 0 {
            entries.insert(0, ("type".into(), "request".into()));
        } else {
            entries.push(("type".into(), "request".into()));
        }
        let mut body = Vec::new();
        rmpv::encode::write_value(&mut body, &Value::Map(entries)).expect("encode");
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
        wire.extend_from_slice(&body);
        let item = EnvelopeCodec::default().decode(&mut wire).expect("in sync").expect("whole");
        let invalid = item.expect_err("an id that is not a str is invalid");
        let salvaged = invalid.request.expect("salvaged");
        prop_assert_eq!(salvaged.correlation_id, correlation_id);
    }
}
