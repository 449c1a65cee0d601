//! Two Python workers driven over their real stdin/stdout pipes:
//! `examples/python/echo_worker.py`, written with the Python SDK (the copy in
//! `sdk/python` when none is installed), and the worker of PROTOCOL.md's
//! section 7, written against the wire alone. Each: the `ready` handshake,
//! replies that copy `id` and `correlation_id` and address the requester, an
//! error code for an unknown method, a garbage frame skipped, and exit on the
//! `shutdown` event. (`tests/bridge.rs` runs the example under the broker.)

use bytes::BytesMut;
use procbroker::protocol::{Envelope, EnvelopeCodec, FrameCodec, MessageType};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tokio_util::codec::{Decoder, Encoder};

#[test]
fn the_python_example_speaks_the_protocol() {
    let script = format!(
        "{}/examples/python/echo_worker.py",
        env!("CARGO_MANIFEST_DIR")
    );
    speaks_the_protocol(
        &script,
        "[pyecho.0] shutdown: finishing the requests in flight",
    );
}

#[test]
fn the_protocol_pages_python_worker_speaks_the_protocol() {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/PROTOCOL.md"))
        .expect("PROTOCOL.md");
    let (_, rest) = page.split_once("```python\n").expect("a Python block");
    let (code, _) = rest.split_once("\n```").expect("its end");
    let dir = std::env::temp_dir().join(format!("procbroker-pyworker-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let script = dir.join("worker.py");
    std::fs::write(&script, code).expect("write");
    speaks_the_protocol(
        &script.display().to_string(),
        "[pyecho.0] shutdown: exiting",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn speaks_the_protocol(script: &str, shutdown_line: &str) {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = Command::new(&python)
        .arg(script)
        .env("PROCBROKER_PROCESS_ID", "pyecho.0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{python} is required (with the msgpack package): {e}"));

    let mut wire = BytesMut::new();
    let mut codec = EnvelopeCodec::default();
    let requests = [
        Envelope::request("pyecho", "Echo", 1)
            .with_source("client.0")
            .with_payload(&("any", [1u8, 2], None::<u8>))
            .expect("payload"),
        Envelope::request("pyecho", "Reverse", 2)
            .with_source("client.0")
            .with_payload(&"stressed")
            .expect("payload"),
        Envelope::request("pyecho", "Reverse", 3)
            .with_source("client.7")
            .with_payload(&42)
            .expect("payload"),
        Envelope::request("pyecho", "Nope", u64::MAX).with_source("client.0"),
    ];
    for (i, request) in requests.iter().enumerate() {
        if i == 2 {
            // Not MessagePack: the worker must skip it and keep serving.
            FrameCodec::default()
                .encode(&[0xc1u8, 0xc1][..], &mut wire)
                .expect("frame");
        }
        codec.encode(request, &mut wire).expect("encode");
    }
    codec
        .encode(
            &Envelope::event("pyecho.0", "shutdown").with_source("broker"),
            &mut wire,
        )
        .expect("encode");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&wire).expect("write");
    // stdin stays open: the worker must exit on `shutdown`, not on EOF.

    let mut stdout = child.stdout.take().expect("stdout");
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = done.send(stdout.read_to_end(&mut out).map(|_| out));
    });
    let out = finished
        .recv_timeout(Duration::from_secs(20))
        .expect("the worker exits after `shutdown` within 20 s")
        .expect("read stdout");
    let status = child.wait().expect("wait");
    drop(stdin);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        stderr.contains("[pyecho.0] skipping a bad frame"),
        "{stderr}"
    );
    assert!(stderr.contains(shutdown_line), "{stderr}");

    let mut buf = BytesMut::from(&out[..]);
    let mut frames = Vec::new();
    while let Some(item) = codec.decode_eof(&mut buf).expect("stream in sync") {
        frames.push(item.expect("valid envelope"));
    }
    assert_eq!(frames.len(), 5, "ready + one reply per request");
    assert_eq!(
        (frames[0].kind, &*frames[0].id, &*frames[0].target),
        (MessageType::Event, "ready", "broker")
    );
    // Handlers run concurrently: replies come in any order.
    frames[1..].sort_by_key(|reply| reply.correlation_id);
    for (request, reply) in requests.iter().zip(&frames[1..]) {
        assert_eq!(reply.id, request.id);
        assert_eq!(reply.correlation_id, request.correlation_id);
        assert_eq!(reply.target, request.source);
    }
    assert_eq!(frames[1].kind, MessageType::Response);
    assert_eq!(
        frames[1]
            .payload_as::<(String, Vec<u8>, Option<u8>)>()
            .expect("tuple"),
        ("any".into(), vec![1, 2], None)
    );
    assert_eq!(frames[2].payload_as::<String>().expect("str"), "desserts");
    assert_eq!(
        (frames[3].kind, frames[3].code.as_deref()),
        (MessageType::Error, Some("bad_request"))
    );
    assert_eq!(
        (frames[4].kind, frames[4].code.as_deref()),
        (MessageType::Error, Some("unknown_method"))
    );
}
