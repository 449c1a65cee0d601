//! Cross-language: frames written by Python's `msgpack` decode here, and
//! frames written here decode in Python (a real `python3` subprocess running
//! `tests/python/interop.py`). Fails, never skips, when Python or its
//! `msgpack` package is missing: install them with
//! `python3 -m pip install -r tests/python/requirements.txt`.

use bytes::BytesMut;
use procbroker::protocol::{Envelope, EnvelopeCodec, MessageType, Payload};
use serde::Serialize;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use tokio_util::codec::{Decoder, Encoder};

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn script() -> String {
    format!("{}/tests/python/interop.py", env!("CARGO_MANIFEST_DIR"))
}

fn require_python_msgpack() {
    let ok = Command::new(python())
        .args(["-c", "import msgpack"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{} with the msgpack package is required: python3 -m pip install -r tests/python/requirements.txt",
        python()
    );
}

fn decode_all(bytes: &[u8]) -> Vec<Envelope> {
    let mut codec = EnvelopeCodec::default();
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(item) = codec.decode_eof(&mut buf).expect("stream in sync") {
        out.push(item.expect("valid envelope"));
    }
    out
}

fn value(payload: &Payload) -> rmpv::Value {
    rmpv::decode::read_value(&mut payload.as_bytes().as_ref()).expect("one msgpack value")
}

#[test]
fn frames_written_by_python_decode_in_rust() {
    require_python_msgpack();
    let out = Command::new(python())
        .args([&script(), "gen"])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frames = decode_all(&out.stdout);
    assert_eq!(frames.len(), 5);

    assert_eq!(frames[0].kind, MessageType::Event);
    assert_eq!((&*frames[0].id, &*frames[0].target), ("ready", "broker"));

    #[derive(serde::Deserialize, PartialEq, Debug)]
    struct Params {
        name: String,
        value: i64,
    }
    assert_eq!(frames[1].kind, MessageType::Request);
    assert_eq!(frames[1].correlation_id, 1);
    assert_eq!(
        frames[1].payload_as::<Params>().expect("typed"),
        Params {
            name: "test".into(),
            value: 123
        }
    );

    let big = &frames[2];
    assert_eq!(big.correlation_id, u64::MAX);
    assert_eq!(big.source, "forged");
    assert_eq!(big.timeout_ms, Some(1500));
    let items = value(big.payload.as_ref().expect("payload"));
    let items = items.as_array().expect("array");
    assert_eq!(items.len(), 11);
    assert!(items[0].is_nil());
    assert_eq!(items[3].as_i64(), Some(i64::MIN));
    assert_eq!(items[4].as_u64(), Some(u64::MAX));
    assert_eq!(items[7].as_str().map(str::len), Some(80_000));
    assert_eq!(items[8].as_slice(), Some(&[0u8, 0xff][..]));
    assert_eq!(items[9], rmpv::Value::Ext(5, b"abc".to_vec()));

    assert_eq!(frames[3].kind, MessageType::Response);
    assert_eq!(
        frames[3].payload.as_ref().map(|p| p.as_bytes().as_ref()),
        Some(&[0xc0][..])
    );

    assert_eq!(frames[4].kind, MessageType::Error);
    assert_eq!(frames[4].code.as_deref(), Some("handler"));
    assert_eq!(frames[4].error.as_deref(), Some("division by zero"));
}

/// Python decodes f32 as a float and writes it back as f64; compare values.
fn normalise(v: rmpv::Value) -> rmpv::Value {
    use rmpv::Value;
    match v {
        Value::F32(f) => Value::F64(f64::from(f)),
        Value::Array(items) => Value::Array(items.into_iter().map(normalise).collect()),
        Value::Map(pairs) => Value::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (normalise(k), normalise(v)))
                .collect(),
        ),
        other => other,
    }
}

#[test]
fn frames_written_by_rust_decode_in_python() {
    require_python_msgpack();
    #[derive(Serialize)]
    struct Cve<'a> {
        id: &'a str,
        score: f32,
        refs: Vec<&'a str>,
        raw: serde_bytes::ByteBuf,
    }
    let mut sent = vec![
        Envelope::event("broker", "ready").with_source("py.0"),
        Envelope::request("py", "Echo", 7)
            .with_source("client.0")
            .with_timeout_ms(100)
            .with_payload(&Cve {
                id: "CVE-2024-0001",
                score: 9.75,
                refs: vec!["https://example.org/a"; 60],
                raw: serde_bytes::ByteBuf::from(vec![0, 1, 255]),
            })
            .expect("payload"),
        Envelope::request("py", "Big", u64::MAX)
            .with_source("client.0")
            .with_payload(&"x".repeat(70_000))
            .expect("payload"),
    ];
    let request = sent[1].clone();
    sent.push(request.error_reply("handler", "nope").with_source("svc.1"));
    sent.push(request.response(None).with_source("svc.1"));

    let mut child = Command::new(python())
        .args([&script(), "echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn python");
    let mut wire = BytesMut::new();
    for e in &sent {
        EnvelopeCodec::default()
            .encode(e, &mut wire)
            .expect("encode");
    }
    {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&wire).expect("write to python");
    } // EOF: python exits after answering
    let mut out = Vec::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_end(&mut out)
        .expect("read python");
    assert!(child.wait().expect("wait").success());

    let replies = decode_all(&out);
    assert_eq!(replies.len(), sent.len());
    for (request, reply) in sent.iter().zip(&replies) {
        assert_eq!(reply.kind, MessageType::Response);
        assert_eq!(reply.id, request.id);
        assert_eq!(reply.correlation_id, request.correlation_id);
        assert_eq!(reply.target, request.source);
        let echoed = value(reply.payload.as_ref().expect("payload"));
        let seen = &echoed["seen"];
        assert_eq!(seen["type"].as_str(), Some(request.kind.as_str()));
        assert_eq!(seen["id"].as_str(), Some(&*request.id));
        assert_eq!(seen["source"].as_str(), Some(&*request.source));
        if request.kind != MessageType::Event {
            assert_eq!(
                seen["correlation_id"].as_u64(),
                Some(request.correlation_id)
            );
        }
        assert_eq!(seen["timeout_ms"].as_u64(), request.timeout_ms);
        assert_eq!(seen["code"].as_str(), request.code.as_deref());
        assert_eq!(seen["error"].as_str(), request.error.as_deref());
        let original = request.payload.as_ref().map_or(rmpv::Value::Nil, value);
        assert_eq!(normalise(echoed["payload"].clone()), normalise(original));
    }
}
