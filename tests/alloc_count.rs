//! Heap allocations on the hot path (the codec, the echo worker, the
//! embedding handle), counted exactly.
//!
//! A counting global allocator (this test binary only) tallies `alloc`,
//! `alloc_zeroed` and `realloc` calls made by the current thread between
//! `count(|| ..)`'s start and end. The numbers asserted here are the contract:
//! a change that adds an allocation to decode or encode fails this test.

use bytes::{BufMut, Bytes, BytesMut};
use procbroker::pipe::WireCodec;
use procbroker::protocol::{Envelope, EnvelopeCodec, Payload};
use serde::{Deserialize, Serialize};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use tokio_util::codec::{Decoder, Encoder};

struct Counting;

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

fn bump() {
    // `try_with`: the allocator may run while thread-locals are torn down.
    let _ = ENABLED.try_with(|on| {
        if on.get() {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counters are const-initialised thread-locals that never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the number of allocations it made.
fn count<T>(f: impl FnOnce() -> T) -> (T, usize) {
    COUNT.with(|c| c.set(0));
    ENABLED.with(|on| on.set(true));
    let out = std::hint::black_box(f());
    ENABLED.with(|on| on.set(false));
    (out, COUNT.with(Cell::get))
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Params {
    name: String,
    value: i64,
}

/// v2e's small message: a request with payload `{name: "test", value: 123}`.
fn small_request() -> Envelope {
    Envelope::request("echo", "Echo", 42)
        .with_source("client.0")
        .with_payload(&Params {
            name: "test".into(),
            value: 123,
        })
        .expect("payload")
}

fn framed(envelopes: &[Envelope]) -> BytesMut {
    let mut buf = BytesMut::new();
    let mut codec = EnvelopeCodec::default();
    for e in envelopes {
        codec.encode(e, &mut buf).expect("encode");
    }
    buf
}

#[test]
fn decoding_a_frame_body_allocates_nothing() {
    // A frame as the codec hands it over: shared storage, so every string and
    // the payload are reference-counted slices.
    let mut buf = framed(&[small_request(), small_request()]);
    let first = EnvelopeCodec::default()
        .decode(&mut buf)
        .expect("in sync")
        .expect("whole")
        .expect("valid");
    let body = first.to_bytes();
    let mut shared = BytesMut::with_capacity(body.len() + 1);
    shared.put_slice(&body);
    let _ = shared.split_to(0); // make the storage shared, as a read buffer's is
    let frame: Bytes = shared.freeze();

    let (decoded, allocs) = count(|| Envelope::decode(&frame));
    assert_eq!(decoded.expect("valid"), small_request());
    assert_eq!(allocs, 0, "Envelope::decode of a small envelope");
}

#[test]
fn decoding_a_v1_1_request_allocates_nothing() {
    // `stream` and `key` (a slice of the frame, like the other strings).
    let request = small_request()
        .with_stream()
        .with_key("session-42")
        .expect("a short key");
    let body = request.to_bytes();
    let mut shared = BytesMut::with_capacity(body.len() + 1);
    shared.put_slice(&body);
    let _ = shared.split_to(0);
    let frame: Bytes = shared.freeze();
    let (decoded, allocs) = count(|| Envelope::decode(&frame));
    assert_eq!(decoded.expect("valid"), request);
    assert_eq!(
        allocs, 0,
        "Envelope::decode of a request with stream and key"
    );
}

#[test]
fn decoding_from_a_read_buffer_allocates_once_per_buffer_not_per_frame() {
    let mut buf = framed(&[small_request(), small_request(), small_request()]);
    let mut codec = EnvelopeCodec::default();
    // First frame: `BytesMut` moves its vector into shared storage (one small
    // allocation); the frames after it are slices of that storage.
    let (first, allocs) = count(|| codec.decode(&mut buf));
    assert!(first.expect("in sync").expect("whole").is_ok());
    assert_eq!(allocs, 1, "first frame of a read buffer");
    for _ in 0..2 {
        let (next, allocs) = count(|| codec.decode(&mut buf));
        assert!(next.expect("in sync").expect("whole").is_ok());
        assert_eq!(allocs, 0, "later frames of the same buffer");
    }
}

#[test]
fn a_child_frame_costs_one_allocation_the_box_it_travels_in() {
    // What a bridge reads from a child: the envelope boxed, so the batch,
    // the Router and the recipient's inbox hand on a pointer.
    let mut buf = framed(&[small_request(), small_request()]);
    let mut codec = WireCodec::from(EnvelopeCodec::default());
    let _ = codec.decode(&mut buf); // the read buffer is shared from now on
    let (next, allocs) = count(|| codec.decode(&mut buf));
    let envelope = next.expect("in sync").expect("whole").expect("valid");
    assert_eq!(envelope.correlation_id, small_request().correlation_id);
    assert_eq!(allocs, 1, "a frame from a child's pipe");
}

#[test]
fn encoding_into_a_reused_buffer_allocates_nothing() {
    let envelope = small_request();
    let mut codec = EnvelopeCodec::default();
    let mut buf = BytesMut::with_capacity(4096);
    for _ in 0..3 {
        buf.clear();
        let (result, allocs) = count(|| codec.encode(&envelope, &mut buf));
        result.expect("encode");
        assert_eq!(allocs, 0, "encode of a small envelope into a reused buffer");
    }
}

#[test]
fn relaying_allocates_nothing() {
    // What the broker does per hop: decode, stamp source, re-encode.
    let incoming = framed(&[small_request(), small_request()]);
    let mut codec = EnvelopeCodec::default();
    let mut read_buf = incoming.clone();
    let _ = codec.decode(&mut read_buf); // the read buffer is shared from now on
    let stamp = bytestring::ByteString::from_static("client.7");
    let mut out = BytesMut::with_capacity(4096);
    let (result, allocs) = count(|| {
        let mut envelope = codec.decode(&mut read_buf)?.expect("whole").expect("valid");
        envelope.source = stamp.clone();
        codec.encode(&envelope, &mut out)
    });
    result.expect("relay");
    assert_eq!(allocs, 0, "relay of one small envelope");
}

#[test]
fn typed_payload_costs_are_what_serde_needs() {
    let envelope = small_request();
    // Reading {name, value} into a struct: one allocation, the `String`.
    let (params, allocs) = count(|| envelope.payload_as::<Params>());
    assert_eq!(params.expect("typed").name, "test");
    assert_eq!(allocs, 1, "payload_as::<Params>");
    // Building it: the exact-size copy out of the thread's scratch buffer,
    // plus the `String` that goes into the struct. (Warm the scratch first.)
    let _ = Payload::encode(&0u8);
    let (payload, allocs) = count(|| {
        Payload::encode(&Params {
            name: "test".into(),
            value: 123,
        })
    });
    assert_eq!(payload.expect("encode").len(), 18);
    assert_eq!(allocs, 2, "Payload::encode of {{name, value}}");
}

#[test]
fn the_echo_worker_answers_without_allocating() {
    use procbroker::service::{Answer, Methods};
    let reply_of = |methods: &Methods| {
        // As a worker gets it: decoded from its read buffer (a slice of a
        // shared buffer; cloning a field is a reference count, never a copy).
        let mut read_buf = framed(&[small_request()]);
        let request = EnvelopeCodec::default()
            .decode(&mut read_buf)
            .expect("whole")
            .expect("frame")
            .expect("valid");
        let payload = request.payload.clone();
        let (answer, allocs) = count(|| methods.answer(request, "echo.1"));
        let Answer::Now(reply) = answer else {
            panic!("an echo answers at once");
        };
        assert_eq!(reply.payload, payload, "the payload comes back verbatim");
        allocs
    };
    // A handler that answers at once: nothing boxed, nothing allocated.
    assert_eq!(reply_of(&procbroker::workers::echo()), 0, "echo (sync)");
    // The same handler as a future: the boxed future is the one allocation.
    let boxed = Methods::new().fallback(|request| async move { Ok(request.payload) });
    assert_eq!(reply_of(&boxed), 1, "echo (async)");
    // A handler that takes its request's context (deadline, cancellation),
    // where no cancel can reach it (`answer`, as in-process workers run
    // it): the context costs nothing more.
    let with_context =
        Methods::new().raw_ctx("Echo", |request, _ctx| async move { Ok(request.payload) });
    assert_eq!(reply_of(&with_context), 1, "echo (async, with context)");
}

#[test]
fn cloning_a_broker_handle_allocates_nothing() {
    // Embedders clone the handle per request or task. Four actor addresses
    // cloned one by one cost two allocations each (actix's sender state).
    actix::System::new().block_on(async {
        let broker = procbroker::embed::ProcBroker::builder()
            .sysmon_interval(None)
            .start();
        let (copy, allocs) = count(|| broker.clone());
        assert_eq!(allocs, 0, "a BrokerHandle clone");
        drop(copy);
        let report = broker.shutdown().await;
        assert!(report.drained, "nothing was in flight");
    });
}

/// Allocations the serve loop of a subprocess service makes to answer
/// `calls` requests to method `Echo` of `methods`, written at once to an
/// in-memory pipe; counted on a second round, after a warm-up round of the
/// same size (the `ready` event, buffers and maps grown).
fn served_allocations(methods: fn() -> procbroker::service::Methods, calls: usize) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tokio::task::LocalSet::new().block_on(&rt, async {
        let (mut to_worker, worker_in) = tokio::io::duplex(1 << 22);
        let (worker_out, mut from_worker) = tokio::io::duplex(1 << 22);
        tokio::task::spawn_local(procbroker::service::serve(
            worker_in,
            worker_out,
            "svc.0".into(),
            move |_| methods(),
        ));
        let requests: Vec<Envelope> = (0..calls)
            .map(|i| {
                let mut r = small_request().with_timeout_ms(5000);
                r.correlation_id = i as u64 + 1;
                r
            })
            .collect();
        let frames = framed(&requests);
        let mut read = BytesMut::with_capacity(1 << 22);
        let mut codec = EnvelopeCodec::default();
        let mut counted = 0;
        for round in 0..2 {
            if round == 1 {
                COUNT.with(|c| c.set(0));
                ENABLED.with(|on| on.set(true));
            }
            to_worker.write_all(&frames).await.expect("write");
            let mut replies = 0;
            while replies < calls {
                match codec.decode(&mut read).expect("in sync") {
                    Some(item) => {
                        if item.expect("valid").kind != procbroker::protocol::MessageType::Event {
                            replies += 1;
                        }
                    }
                    None => {
                        from_worker.read_buf(&mut read).await.expect("read");
                    }
                }
            }
            if round == 1 {
                ENABLED.with(|on| on.set(false));
                counted = COUNT.with(Cell::get);
            }
        }
        counted
    })
}

/// The serve loop of a subprocess service: a sync handler (the echo
/// worker) costs allocations per read of its stdin, not per call; a
/// handler that waits costs the same as before the request lifecycle
/// existed (its boxed future, its task); one that takes a `Context` costs
/// one more per call: its cancellation token.
#[test]
fn the_serve_loop_allocates_per_read_for_sync_handlers_and_one_token_per_context() {
    fn waits() -> procbroker::service::Methods {
        procbroker::service::Methods::new().raw("Echo", |r| async move {
            tokio::task::yield_now().await;
            Ok(r.payload)
        })
    }
    fn waits_with_context() -> procbroker::service::Methods {
        procbroker::service::Methods::new().raw_ctx("Echo", |r, _ctx| async move {
            tokio::task::yield_now().await;
            Ok(r.payload)
        })
    }
    for calls in [64, 256] {
        let sync = served_allocations(procbroker::workers::echo, calls);
        let waiting = served_allocations(waits, calls);
        let with_context = served_allocations(waits_with_context, calls);
        eprintln!("{calls} calls: sync {sync}, async {waiting}, async with context {with_context}");
        assert!(
            sync < calls / 4,
            "sync: {sync} allocations for {calls} calls"
        );
        assert!(
            with_context >= waiting + calls && with_context <= waiting + calls + calls / 16,
            "the context's token: {with_context} against {waiting} for {calls} calls"
        );
    }
}
