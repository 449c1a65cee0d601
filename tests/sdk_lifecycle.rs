//! The Rust SDK's request lifecycle (protocol v1.1), over the real pipes of
//! `procbroker worker conformance`: the test plays the broker, writing
//! frames to the worker's stdin and reading its stdout, which is what a
//! conformance kit does for what a broker cannot show. Deadlines seen,
//! `cancel` from the broker honoured and from anyone else ignored,
//! streaming replies, concurrency, calls out with their deadline and their
//! cancellation, `shutdown` only from the broker, and exit at EOF.
//!
//! Every wait is bounded: a worker that never answers fails a test, it
//! does not hang it.

use bytes::{Bytes, BytesMut};
use procbroker::protocol::{
    CancelReason, Envelope, EnvelopeCodec, MessageType, Payload, RequestKey,
};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use tokio_util::codec::{Decoder, Encoder};

const BIN: &str = env!("CARGO_BIN_EXE_procbroker");
/// The subject's process id, as the broker would name it.
const ME: &str = "subject.0";
/// The requester the test plays besides the broker.
const CALLER: &str = "client.0";

/// The conformance worker, driven over its stdin and stdout.
struct Subject {
    child: Child,
    stdin: Option<ChildStdin>,
    chunks: Receiver<Vec<u8>>,
    read: BytesMut,
    next_id: u64,
}

impl Subject {
    /// Starts the worker and waits for its `ready`.
    fn start() -> Self {
        let mut child = Command::new(BIN)
            .args(["worker", "conformance"])
            .env("PROCBROKER_PROCESS_ID", ME)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("procbroker worker conformance");
        let mut stdout = child.stdout.take().expect("stdout");
        let (tx, chunks) = std::sync::mpsc::channel();
        // A thread reads, so every wait on the worker can time out.
        std::thread::spawn(move || {
            let mut buf = [0u8; 1 << 16];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        let mut subject = Self {
            child,
            stdin,
            chunks,
            read: BytesMut::new(),
            next_id: 100,
        };
        let ready = subject.recv(Duration::from_secs(10)).expect("ready");
        assert_eq!((ready.kind, &*ready.id), (MessageType::Event, "ready"));
        assert_eq!(&*ready.target, "broker");
        subject
    }

    /// Writes one frame to the worker (stamped with `source`, as the broker
    /// stamps what it routes).
    fn send(&mut self, envelope: &Envelope) {
        let mut frame = BytesMut::new();
        EnvelopeCodec::default()
            .encode(envelope, &mut frame)
            .expect("encode");
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(&frame).expect("write");
        stdin.flush().expect("flush");
    }

    /// The next frame the worker wrote, within `timeout`.
    fn recv(&mut self, timeout: Duration) -> Option<Envelope> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(item) = EnvelopeCodec::default()
                .decode(&mut self.read)
                .expect("the worker's stdout is in sync")
            {
                return Some(item.expect("the worker writes valid envelopes"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.read.extend_from_slice(&chunk),
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => {
                    // Stdout closed: what is buffered is all there is.
                    return EnvelopeCodec::default()
                        .decode_eof(&mut self.read)
                        .ok()
                        .flatten()
                        .map(|item| item.expect("valid"));
                }
            }
        }
    }

    /// The next frame, which must come within 5 s.
    fn expect(&mut self, what: &str) -> Envelope {
        self.recv(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no {what} within 5 s"))
    }

    /// A request from `client.0` to the worker, with a fresh correlation id.
    fn request(&mut self, method: &str, payload: Option<Value>) -> Envelope {
        self.next_id += 1;
        let mut request = Envelope::request(ME, method, self.next_id).with_source(CALLER);
        if let Some(value) = payload {
            request = request.with_payload(&value).expect("payload");
        }
        request
    }

    /// Sends `request` and returns its reply (frames for other requests
    /// before it are a failure).
    fn call(&mut self, request: &Envelope) -> Envelope {
        self.send(request);
        let reply = self.expect(&format!("reply to {}", request.id));
        assert_eq!(
            (reply.correlation_id, &*reply.target),
            (request.correlation_id, CALLER),
            "{reply:?}"
        );
        reply
    }

    /// `method` with `payload`, its reply's payload as JSON.
    fn value_of(&mut self, method: &str, payload: Option<Value>) -> Value {
        let request = self.request(method, payload);
        let reply = self.call(&request);
        assert_eq!(reply.kind, MessageType::Response, "{reply:?}");
        assert!(!reply.more);
        decoded(&reply)
    }

    /// The `cancel` the broker sends for `request`.
    fn cancel(&mut self, request: &Envelope, reason: CancelReason) {
        let cancel =
            Envelope::cancel_notice(ME, request.correlation_id, request.source.clone(), reason);
        self.send(&cancel);
    }

    /// Closes stdin (EOF) and returns how long the worker took to exit.
    fn eof(&mut self, within: Duration) -> Duration {
        let closed = Instant::now();
        drop(self.stdin.take());
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "{status:?}");
                return closed.elapsed();
            }
            assert!(
                closed.elapsed() < within,
                "still running {within:?} after EOF"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Subject {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A reply's payload as JSON (nil, or no payload, is null).
fn decoded(reply: &Envelope) -> Value {
    reply.payload_as::<Value>().expect("JSON-able payload")
}

/// Polls `Active` until it reads `sleeping`, for at most `within`.
fn active_reaches(subject: &mut Subject, sleeping: u64, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let now = subject.value_of("Active", None);
        if now == json!({"sleeping": sleeping}) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "Active {now} after {within:?}, want {sleeping}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn ping_echo_fail_and_who_am_i() {
    let mut subject = Subject::start();
    assert_eq!(subject.value_of("Ping", None), json!({}));
    // Echo: the payload's bytes verbatim (a non-shortest int here), none
    // for none.
    let raw = Payload::from_msgpack(Bytes::from_static(&[0xcd, 0x00, 0x07])).expect("u16 7");
    let echo = subject.request("Echo", None).with_raw_payload(raw.clone());
    assert_eq!(subject.call(&echo).payload, Some(raw));
    let bare = subject.request("Echo", None);
    assert_eq!(subject.call(&bare).payload, None);
    // Fail: that code and message, `handler` by default.
    let fail = subject.request("Fail", Some(json!({"code": "nope", "message": "no way"})));
    let error = subject.call(&fail);
    assert_eq!(error.kind, MessageType::Error);
    assert_eq!(
        (error.code.as_deref(), error.error.as_deref()),
        (Some("nope"), Some("no way"))
    );
    let fail = subject.request("Fail", Some(json!({"message": "plain"})));
    assert_eq!(subject.call(&fail).code.as_deref(), Some("handler"));
    let who = subject.value_of("WhoAmI", None);
    assert_eq!(who, json!({"id": ME, "pid": subject.child.id()}));
    let unknown = subject.request("Nope", None);
    assert_eq!(
        subject.call(&unknown).code.as_deref(),
        Some("unknown_method")
    );
}

#[test]
fn the_handler_sees_its_deadline() {
    let mut subject = Subject::start();
    let with = subject.request("Deadline", None).with_timeout_ms(5000);
    let left = decoded(&subject.call(&with)).as_u64().expect("whole ms");
    assert!((4000..=5000).contains(&left), "{left} ms left of 5000");
    // None sent, none seen (a v1 request).
    assert_eq!(subject.value_of("Deadline", None), Value::Null);
}

#[test]
fn a_cancel_from_the_broker_stops_the_handler_and_its_reply() {
    let mut subject = Subject::start();
    let sleep = subject
        .request("Sleep", Some(json!({"ms": 10_000})))
        .with_timeout_ms(300);
    subject.send(&sleep);
    active_reaches(&mut subject, 1, Duration::from_secs(5));
    assert_eq!(subject.value_of("LastCancel", None), Value::Null);

    // The broker's deadline passed: it says so.
    subject.cancel(&sleep, CancelReason::Timeout);
    let stopped = active_reaches(&mut subject, 0, Duration::from_millis(500));
    eprintln!("Sleep stopped {stopped:?} after the cancel");
    assert_eq!(
        subject.value_of("LastCancel", None),
        json!({"correlation_id": sleep.correlation_id, "reason": "timeout"})
    );
    // And the cancelled request is not answered (the broker has answered
    // its caller): the next frame is the reply to the next request.
    assert_eq!(subject.value_of("Ping", None), json!({}));
    assert!(subject.recv(Duration::from_millis(200)).is_none());

    // Every reason reaches the handler as it was sent.
    for reason in ["cancelled", "caller_exited", "busy", "shutting_down"] {
        let sleep = subject.request("Sleep", Some(json!({"ms": 10_000})));
        subject.send(&sleep);
        active_reaches(&mut subject, 1, Duration::from_secs(5));
        subject.cancel(&sleep, CancelReason::from_wire(reason.into()));
        active_reaches(&mut subject, 0, Duration::from_millis(500));
        assert_eq!(
            subject.value_of("LastCancel", None)["reason"],
            json!(reason)
        );
    }
}

#[test]
fn a_cancel_not_from_the_broker_or_for_another_request_is_ignored() {
    let mut subject = Subject::start();
    let sleep = subject.request("Sleep", Some(json!({"ms": 300})));
    subject.send(&sleep);
    active_reaches(&mut subject, 1, Duration::from_secs(5));
    // Forged: a process's own `source`.
    let mut forged =
        Envelope::cancel_notice(ME, sleep.correlation_id, CALLER, CancelReason::Cancelled);
    forged.source = CALLER.into();
    subject.send(&forged);
    // From the broker, but for the same id of another requester, and for
    // an id nobody used.
    subject.send(&Envelope::cancel_notice(
        ME,
        sleep.correlation_id,
        "client.9",
        CancelReason::Cancelled,
    ));
    subject.send(&Envelope::cancel_notice(
        ME,
        424_242,
        CALLER,
        CancelReason::Cancelled,
    ));
    // Malformed (no payload): ignored too.
    let mut bare = Envelope::event(ME, "cancel").with_source("broker");
    bare.correlation_id = sleep.correlation_id;
    subject.send(&bare);
    let reply = subject.expect("the Sleep's reply");
    assert_eq!(reply.correlation_id, sleep.correlation_id);
    let slept = decoded(&reply);
    assert_eq!(slept["cancelled"], json!(false), "{slept}");
    assert!(slept["slept_ms"].as_u64().expect("ms") >= 290, "{slept}");
    assert_eq!(subject.value_of("LastCancel", None), Value::Null);
}

#[test]
fn count_streams_partials_in_order_only_to_a_stream_request() {
    let mut subject = Subject::start();
    let count = subject
        .request("Count", Some(json!({"n": 5, "delay_ms": 2})))
        .with_stream();
    subject.send(&count);
    for i in 0..5 {
        let partial = subject.expect("a partial reply");
        assert_eq!(
            (partial.kind, partial.more, partial.correlation_id),
            (MessageType::Response, true, count.correlation_id)
        );
        assert_eq!((&*partial.id, &*partial.target), ("Count", CALLER));
        assert_eq!(decoded(&partial), json!(i));
    }
    let last = subject.expect("the final reply");
    assert!(!last.more);
    assert_eq!(decoded(&last), json!(5));

    // Without `stream`: the final reply only.
    let plain = subject.request("Count", Some(json!({"n": 5})));
    let last = subject.call(&plain);
    assert!(!last.more);
    assert_eq!(decoded(&last), json!(5));
    assert_eq!(subject.value_of("Ping", None), json!({}));
}

#[test]
fn a_cut_stream_stops_producing() {
    let mut subject = Subject::start();
    let count = subject
        .request("Count", Some(json!({"n": 100_000, "delay_ms": 5})))
        .with_stream();
    subject.send(&count);
    for _ in 0..3 {
        assert!(subject.expect("a partial").more);
    }
    subject.cancel(&count, CancelReason::Busy);
    // What was on its way may still come; then nothing for this request.
    let quiet = Instant::now();
    while let Some(frame) = subject.recv(Duration::from_millis(200)) {
        assert!(frame.more, "no final reply after the cut: {frame:?}");
        assert!(quiet.elapsed() < Duration::from_secs(2), "still streaming");
    }
    assert_eq!(
        subject.value_of("LastCancel", None),
        json!({"correlation_id": count.correlation_id, "reason": "busy"})
    );
}

#[test]
fn eight_sleeps_run_at_once() {
    let mut subject = Subject::start();
    let sleeps: Vec<Envelope> = (0..8)
        .map(|_| subject.request("Sleep", Some(json!({"ms": 200}))))
        .collect();
    let started = Instant::now();
    for sleep in &sleeps {
        subject.send(sleep);
    }
    let mut answered = Vec::new();
    while answered.len() < 8 {
        let reply = subject.expect("a Sleep's reply");
        assert_eq!(decoded(&reply)["cancelled"], json!(false));
        answered.push(reply.correlation_id);
    }
    let took = started.elapsed();
    eprintln!("8 × Sleep 200 took {took:?}");
    assert!(took < Duration::from_millis(600), "{took:?}");
    answered.sort_unstable();
    let mut sent: Vec<u64> = sleeps.iter().map(|s| s.correlation_id).collect();
    sent.sort_unstable();
    assert_eq!(answered, sent);
}

#[test]
fn calls_out_carry_the_budget_left_and_a_cancel_is_passed_on() {
    let mut subject = Subject::start();
    // Relay with a deadline: the call out carries what is left of it.
    let relay = subject
        .request(
            "Relay",
            Some(json!({"target": "echo", "method": "Echo", "payload": "hi"})),
        )
        .with_timeout_ms(5000);
    subject.send(&relay);
    let out = subject.expect("the relayed request");
    assert_eq!(
        (out.kind, &*out.target, &*out.id),
        (MessageType::Request, "echo", "Echo")
    );
    let budget = out.timeout_ms.expect("timeout_ms on the call out");
    assert!((4000..=5000).contains(&budget), "{budget}");
    assert_eq!(out.payload_as::<String>().expect("str"), "hi");
    subject.send(&out.response(out.payload.clone()).with_source("echo.0"));
    let reply = subject.expect("the Relay's reply");
    assert_eq!(reply.correlation_id, relay.correlation_id);
    assert_eq!(decoded(&reply), json!("hi"));

    // The callee's error comes back with its code and message.
    let relay = subject.request("Relay", Some(json!({"target": "echo", "method": "Echo"})));
    subject.send(&relay);
    let out = subject.expect("the relayed request");
    assert_eq!(out.payload, None, "no payload relayed as none");
    subject.send(
        &out.error_reply("teapot", "short and stout")
            .with_source("echo.0"),
    );
    let reply = subject.expect("the Relay's error");
    assert_eq!(
        (reply.code.as_deref(), reply.error.as_deref()),
        (Some("teapot"), Some("short and stout"))
    );

    // The Relay is cancelled: its call out is dropped, which cancels it at
    // the broker (`cancel` to `broker` with the call's correlation id).
    let relay = subject.request("Relay", Some(json!({"target": "slow", "method": "Wait"})));
    subject.send(&relay);
    let out = subject.expect("the relayed request");
    subject.cancel(&relay, CancelReason::CallerExited);
    let cancel = subject.expect("the cancel of the call out");
    assert!(cancel.is_cancel(), "{cancel:?}");
    assert_eq!(
        (&*cancel.target, cancel.correlation_id),
        ("broker", out.correlation_id)
    );
    assert_eq!(cancel.payload, None);
    assert_eq!(
        subject.value_of("LastCancel", None),
        json!({"correlation_id": relay.correlation_id, "reason": "caller_exited"})
    );
    // The late reply to the call out is dropped; nothing else comes.
    subject.send(&out.response(None).with_source("slow.0"));
    assert!(subject.recv(Duration::from_millis(200)).is_none());
}

#[test]
fn events_both_ways() {
    let mut subject = Subject::start();
    assert_eq!(subject.value_of("LastNote", None), Value::Null);
    let note = Envelope::event(ME, "note")
        .with_source("client.3")
        .with_payload(&json!({"n": [1, 2]}))
        .expect("payload");
    subject.send(&note);
    assert_eq!(subject.value_of("LastNote", None), json!({"n": [1, 2]}));

    let notify = subject.request(
        "Notify",
        Some(json!({"target": "client.3", "event": "note", "payload": [true]})),
    );
    subject.send(&notify);
    let event = subject.expect("the event");
    assert_eq!(
        (event.kind, &*event.id, &*event.target),
        (MessageType::Event, "note", "client.3")
    );
    assert_eq!(event.payload_as::<Value>().expect("json"), json!([true]));
    let reply = subject.expect("Notify's reply");
    assert_eq!(reply.correlation_id, notify.correlation_id);
    assert_eq!(
        reply.payload.as_ref().map(|p| p.as_bytes().as_ref()),
        Some(Payload::NIL_BYTES),
        "replies nil"
    );
}

#[test]
fn a_request_with_a_key_is_served_like_any_other() {
    // The key is the broker's to route by; a worker just serves.
    let mut subject = Subject::start();
    let mut keyed = subject
        .request("Echo", Some(json!("k")))
        .with_key("session-1")
        .expect("key");
    assert_eq!(decoded(&subject.call(&keyed)), json!("k"));
    keyed.correlation_id += 1000;
    keyed.key = Some(RequestKey::Invalid(Payload::encode(&1u8).expect("int")));
    assert_eq!(decoded(&subject.call(&keyed)), json!("k"));
}

#[test]
fn shutdown_only_from_the_broker_then_drain_and_exit() {
    let mut subject = Subject::start();
    // From a process: ignored, the worker serves on.
    subject.send(&Envelope::event(ME, "shutdown").with_source(CALLER));
    assert_eq!(subject.value_of("Ping", None), json!({}));
    assert!(subject.child.try_wait().expect("wait").is_none());

    // From the broker: what is in flight is answered, then it exits
    // without waiting for EOF.
    let sleep = subject.request("Sleep", Some(json!({"ms": 200})));
    subject.send(&sleep);
    active_reaches(&mut subject, 1, Duration::from_secs(5));
    subject.send(&Envelope::event(ME, "shutdown").with_source("broker"));
    let reply = subject.expect("the Sleep's reply");
    assert_eq!(reply.correlation_id, sleep.correlation_id);
    let exited = Instant::now();
    loop {
        if let Some(status) = subject.child.try_wait().expect("wait") {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(
            exited.elapsed() < Duration::from_secs(2),
            "still running after draining"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn exit_within_a_second_of_eof_with_a_handler_still_running() {
    let mut subject = Subject::start();
    let sleep = subject.request("Sleep", Some(json!({"ms": 60_000})));
    subject.send(&sleep);
    active_reaches(&mut subject, 1, Duration::from_secs(5));
    let took = subject.eof(Duration::from_secs(1));
    eprintln!("exited {took:?} after EOF");
}

/// Under a broker of protocol v1 (today's router), the v1.1 SDK serves as
/// before: a stream handler gives a caller that asked no stream its final
/// reply only, calls out work, and a handler's deadline is the caller's
/// `timeout_ms` when it sent one.
#[actix::test]
async fn the_subject_serves_under_the_broker() {
    use procbroker::config::ServiceConfig;
    use procbroker::embed::ProcBroker;
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let subject = ServiceConfig::new("subject", BIN).args(["worker", "conformance"]);
    let echo = ServiceConfig::new("echo", BIN).args(["worker", "echo"]);
    broker.spawn(subject).await.expect("spawn subject");
    broker.spawn(echo).await.expect("spawn echo");
    let count: u64 = broker
        .call("subject", "Count", &json!({"n": 3}))
        .await
        .expect("Count")
        .payload_as()
        .expect("u64");
    assert_eq!(count, 3);
    let relayed: String = broker
        .call(
            "subject",
            "Relay",
            &json!({"target": "echo", "method": "Echo", "payload": "through"}),
        )
        .await
        .expect("Relay")
        .payload_as()
        .expect("str");
    assert_eq!(relayed, "through");
    let deadline = Envelope::request("subject.0", "Deadline", 0)
        .with_timeout_ms(4000)
        .with_payload(&())
        .expect("payload");
    let left: Option<u64> = broker
        .call_envelope(deadline)
        .await
        .expect("Deadline")
        .payload_as()
        .expect("ms");
    assert!(
        left.is_some_and(|ms| (3000..=4000).contains(&ms)),
        "{left:?}"
    );
    let report = broker.shutdown().await;
    assert!(report.drained, "{report:?}");
}
