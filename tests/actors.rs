//! The actor core with real actors and in-process workers: routing,
//! round-robin, queue bounds, every broker error code that applies, deadlines,
//! forged and late replies, exact counters and the stats reply.
//!
//! Processes that will be subprocesses later (a client that sends requests
//! and receives replies) are played by `Client`, a real actor registered in
//! the routing table under a process id, that records what it is delivered.

use actix::prelude::*;
use procbroker::actors::messages::{
    Deliver, PendingCount, RegisterProcess, RemoveProcess, Route, SetDraining,
};
use procbroker::embed::{BrokerHandle, CallError, ProcBroker};
use procbroker::protocol::rpc::{Empty, MessageCount, ProcessInfo, SubmitProcessMetricsReply};
use procbroker::protocol::{Envelope, ErrorCode, MessageStats, MessageType, ProcessMetrics};
use procbroker::service::{HandlerError, Methods};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc};

/// A process stand-in: records every envelope the Router delivers to it.
struct Client {
    inbox: mpsc::UnboundedSender<Envelope>,
}

impl Actor for Client {
    type Context = Context<Self>;
}

impl Handler<Deliver> for Client {
    type Result = ();
    fn handle(&mut self, Deliver(envelopes): Deliver, _: &mut Self::Context) {
        for envelope in envelopes {
            let _ = self.inbox.send(*envelope);
        }
    }
}

/// Registers a `Client` as process `id` and returns its inbox.
async fn client(handle: &BrokerHandle, id: &str) -> mpsc::UnboundedReceiver<Envelope> {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = Client { inbox: tx }.start();
    handle
        .router()
        .send(RegisterProcess::new(
            id.into(),
            procbroker::names::service_of(id).into(),
            addr.recipient(),
        ))
        .await
        .expect("router")
        .expect("register");
    rx
}

fn route(handle: &BrokerHandle, from: &str, envelope: Envelope) {
    handle.router().do_send(Route::one(from.into(), envelope));
}

async fn next(inbox: &mut mpsc::UnboundedReceiver<Envelope>) -> Envelope {
    tokio::time::timeout(Duration::from_secs(5), inbox.recv())
        .await
        .expect("a delivery within 5 s")
        .expect("inbox open")
}

/// Waits until the Router has `n` requests in flight (bounded: 5 s).
async fn until_pending(handle: &BrokerHandle, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while handle.router().send(PendingCount).await.expect("router") != n {
        assert!(Instant::now() < deadline, "never reached {n} pending");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn quiet() -> procbroker::embed::Builder {
    ProcBroker::builder().sysmon_interval(None)
}

/// Answers `Echo` with the request's payload, byte for byte.
fn echo() -> Methods {
    echo_into(Methods::new())
}

fn echo_into(methods: Methods) -> Methods {
    methods.raw(
        "Echo",
        |request: Envelope| async move { Ok(request.payload) },
    )
}

/// A service whose `Hold` requests wait until `gate` is notified.
fn holding(gate: Rc<Notify>) -> Methods {
    Methods::new().method("Hold", move |n: u64| {
        let gate = Rc::clone(&gate);
        async move {
            gate.notified().await;
            Ok::<_, HandlerError>(n)
        }
    })
}

fn code(result: Result<procbroker::embed::Reply, CallError>) -> (String, String) {
    match result {
        Err(CallError::Remote {
            code, source_id, ..
        }) => (code, source_id),
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[actix::test]
async fn round_robin_is_exact_over_four_workers() {
    let broker = quiet().start();
    broker.add_service("echo", 4, echo()).await.expect("add");
    let calls = (0..400u64).map(|i| {
        let broker = broker.clone();
        async move { broker.call("echo", "Echo", &i).await }
    });
    let replies = futures_util::future::join_all(calls).await;
    let mut per_worker: BTreeMap<String, u64> = BTreeMap::new();
    for (i, reply) in replies.into_iter().enumerate() {
        let reply = reply.expect("reply");
        assert_eq!(reply.payload_as::<u64>().expect("u64"), i as u64);
        *per_worker.entry(reply.source().to_owned()).or_default() += 1;
    }
    let expected: BTreeMap<String, u64> = (0..4).map(|w| (format!("echo.{w}"), 100)).collect();
    assert_eq!(per_worker, expected);
    // Sequential calls rotate too: echo.0, echo.1, echo.2, echo.3, echo.0 …
    let mut order = Vec::new();
    for i in 0..8u64 {
        order.push(
            broker
                .call("echo", "Echo", &i)
                .await
                .expect("reply")
                .source()
                .to_owned(),
        );
    }
    assert_eq!(
        order,
        [
            "echo.0", "echo.1", "echo.2", "echo.3", "echo.0", "echo.1", "echo.2", "echo.3"
        ]
    );
}

#[actix::test]
async fn a_full_worker_is_skipped_and_busy_comes_when_all_are_full() {
    let broker = quiet().queue_capacity(2).start();
    let gate = Rc::new(Notify::new());
    broker
        .add_service("hold", 2, holding(Rc::clone(&gate)))
        .await
        .expect("add");

    let spawn = |target: &'static str, n: u64| {
        let broker = broker.clone();
        actix::spawn(async move { broker.call(target, "Hold", &n).await })
    };
    // Fill hold.0 directly, then two calls to the service must both skip it.
    let direct = [spawn("hold.0", 1), spawn("hold.0", 2)];
    until_pending(&broker, 2).await;
    let via_service = [spawn("hold", 3), spawn("hold", 4)];
    until_pending(&broker, 4).await;

    // Everyone is full now.
    let (c, source) = code(broker.call("hold", "Hold", &5u64).await);
    assert_eq!((c.as_str(), source.as_str()), ("busy", "broker"));
    let (c, _) = code(broker.call("hold.1", "Hold", &6u64).await);
    assert_eq!(c, "busy");

    for _ in 0..4 {
        gate.notify_one();
    }
    for (task, worker) in direct.into_iter().zip(["hold.0", "hold.0"]) {
        assert_eq!(task.await.expect("task").expect("reply").source(), worker);
    }
    for task in via_service {
        assert_eq!(task.await.expect("task").expect("reply").source(), "hold.1");
    }
    let stats = broker.stats().await.expect("stats");
    assert_eq!(stats.total.faults.busy_rejections, 2);
    assert_eq!(stats.total.pending, 0);
}

#[actix::test]
async fn unknown_target_unknown_method_and_unavailable() {
    let broker = quiet().start();
    broker.add_service("echo", 1, echo()).await.expect("add");
    let (c, source) = code(broker.call("nosuch", "Echo", &()).await);
    assert_eq!((c.as_str(), source.as_str()), ("unknown_target", "broker"));
    let (c, source) = code(broker.call("echo", "Nope", &()).await);
    assert_eq!((c.as_str(), source.as_str()), ("unknown_method", "echo.0"));
    let (c, source) = code(broker.call("broker", "Nope", &()).await);
    assert_eq!((c.as_str(), source.as_str()), ("unknown_method", "broker"));
    broker
        .call("echo", "Echo", &"x")
        .await
        .expect("echo still serves");

    // A registered process that has not said `ready` is not routable.
    let (tx, _rx) = mpsc::unbounded_channel();
    let addr = Client { inbox: tx }.start();
    broker
        .router()
        .send(RegisterProcess {
            ready: false,
            ..RegisterProcess::new("late.0".into(), "late".into(), addr.recipient())
        })
        .await
        .expect("router")
        .expect("register");
    let (c, _) = code(broker.call("late", "X", &()).await);
    assert_eq!(c, "unavailable");
    let (c, _) = code(broker.call("late.0", "X", &()).await);
    assert_eq!(c, "unavailable");
    // A payload that does not fit the method.
    let typed = Methods::new().method("Add", |(a, b): (i64, i64)| async move {
        Ok::<_, HandlerError>(a + b)
    });
    broker.add_service("calc", 1, typed).await.expect("add");
    let (c, _) = code(broker.call("calc", "Add", &"not a pair").await);
    assert_eq!(c, "bad_request");
    assert_eq!(
        broker
            .call("calc", "Add", &(2, 3))
            .await
            .expect("sum")
            .payload_as::<i64>()
            .expect("i64"),
        5
    );
}

#[actix::test]
async fn duplicate_correlation_id_in_flight_is_a_bad_request() {
    let broker = quiet().start();
    let gate = Rc::new(Notify::new());
    broker
        .add_service("hold", 1, holding(Rc::clone(&gate)))
        .await
        .expect("add");
    let mut inbox = client(&broker, "client.0").await;
    let request = Envelope::request("hold", "Hold", 7)
        .with_payload(&1u64)
        .expect("payload");
    route(&broker, "client.0", request.clone());
    route(&broker, "client.0", request.clone());
    let error = next(&mut inbox).await;
    assert_eq!(error.kind, MessageType::Error);
    assert_eq!(error.error_code(), Some(ErrorCode::BadRequest));
    assert_eq!(error.correlation_id, 7);
    assert_eq!(error.target, "client.0");
    gate.notify_one();
    let reply = next(&mut inbox).await;
    assert_eq!(
        (reply.kind, reply.correlation_id, &*reply.source),
        (MessageType::Response, 7, "hold.0")
    );
    // Once answered, the id may be reused.
    route(&broker, "client.0", request);
    until_pending(&broker, 1).await;
    gate.notify_one();
    assert_eq!(next(&mut inbox).await.kind, MessageType::Response);
}

#[actix::test]
async fn deadline_gives_timeout_and_the_late_reply_is_never_delivered() {
    let broker = quiet().start();
    let sleepy = Methods::new().method("Sleep", |ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, HandlerError>(ms)
    });
    broker.add_service("sleepy", 1, sleepy).await.expect("add");
    let mut inbox = client(&broker, "client.0").await;

    let started = Instant::now();
    let request = Envelope::request("sleepy", "Sleep", 1)
        .with_payload(&1500u64)
        .expect("payload")
        .with_timeout_ms(50);
    route(&broker, "client.0", request);
    let error = next(&mut inbox).await;
    let waited = started.elapsed();
    assert_eq!(error.error_code(), Some(ErrorCode::Timeout));
    assert_eq!(
        (error.correlation_id, &*error.source, &*error.id),
        (1, "broker", "Sleep")
    );
    // The worker answers at 1.5 s: far enough that a loaded machine's
    // late timer still fires first.
    assert!(
        waited >= Duration::from_millis(50) && waited < Duration::from_millis(1000),
        "{waited:?}"
    );

    // The late reply is dropped and counted, not delivered.
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats = broker.stats().await.expect("stats");
        if stats.per_process["sleepy.0"].faults.late_replies > 0 {
            break stats;
        }
        assert!(Instant::now() < deadline, "the late reply never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(inbox.try_recv().is_err(), "late reply delivered");
    assert_eq!(stats.per_process["sleepy.0"].faults.late_replies, 1);
    assert_eq!(stats.per_process["client.0"].faults.timeouts, 1);
    assert_eq!(stats.total.faults.timeouts, 1);
    assert_eq!(stats.total.pending, 0);

    // The default deadline applies to Rust callers too.
    let short = quiet().request_timeout(Duration::from_millis(30)).start();
    let sleepy = Methods::new().method("Sleep", |ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, HandlerError>(ms)
    });
    short.add_service("sleepy", 1, sleepy).await.expect("add");
    let (c, _) = code(short.call("sleepy", "Sleep", &2000u64).await);
    assert_eq!(c, "timeout");
}

#[actix::test]
async fn a_forged_reply_from_another_worker_is_dropped_and_counted() {
    let broker = quiet().start();
    let gate = Rc::new(Notify::new());
    broker
        .add_service("hold", 1, holding(Rc::clone(&gate)))
        .await
        .expect("add");
    let mut inbox = client(&broker, "client.0").await;
    let _evil_inbox = client(&broker, "evil.0").await;

    let request = Envelope::request("hold", "Hold", 9)
        .with_payload(&1u64)
        .expect("payload");
    route(&broker, "client.0", request.clone());
    until_pending(&broker, 1).await;
    // evil.0 answers a request it never received, claiming to be hold.0.
    let forged = request
        .response(Some(
            procbroker::protocol::Payload::encode(&666u64).expect("p"),
        ))
        .with_source("hold.0");
    let mut forged = forged;
    forged.target = "client.0".into();
    route(&broker, "evil.0", forged.clone());
    // And a reply to nothing at all.
    forged.correlation_id = 12345;
    route(&broker, "evil.0", forged);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(inbox.try_recv().is_err(), "forged reply delivered");

    gate.notify_one();
    let reply = next(&mut inbox).await;
    assert_eq!(reply.payload_as::<u64>().expect("u64"), 1);
    assert_eq!(reply.source, "hold.0");
    let stats = broker.stats().await.expect("stats");
    assert_eq!(stats.per_process["evil.0"].faults.unmatched_replies, 2);
    assert_eq!(stats.total.faults.unmatched_replies, 2);
}

#[actix::test]
async fn worker_removed_with_requests_in_flight_answers_them_at_once() {
    let broker = quiet().start();
    let gate = Rc::new(Notify::new());
    broker
        .add_service("hold", 1, holding(Rc::clone(&gate)))
        .await
        .expect("add");
    let mut inbox = client(&broker, "client.0").await;
    for n in 1..=3 {
        route(
            &broker,
            "client.0",
            Envelope::request("hold", "Hold", n)
                .with_payload(&n)
                .expect("p"),
        );
    }
    until_pending(&broker, 3).await;
    let started = Instant::now();
    let failed = broker
        .router()
        .send(RemoveProcess {
            id: "hold.0".into(),
            reason: "killed".into(),
        })
        .await
        .expect("router");
    assert_eq!(failed, 3);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let e = next(&mut inbox).await;
        assert_eq!(e.error_code(), Some(ErrorCode::WorkerExited));
        ids.push(e.correlation_id);
    }
    ids.sort_unstable();
    assert_eq!(ids, [1, 2, 3]);
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(broker.router().send(PendingCount).await.expect("router"), 0);
    let (c, _) = code(broker.call("hold", "Hold", &1u64).await);
    assert_eq!(c, "unavailable", "no worker left");
}

#[actix::test]
async fn a_panicking_handler_gives_internal_and_the_worker_keeps_serving() {
    let broker = quiet().start();
    let methods = Methods::new()
        .method("Boom", |_: ()| async move {
            if true {
                panic!("boom");
            }
            Ok::<u8, HandlerError>(0)
        })
        .method("Fail", |_: ()| async move {
            Err::<u8, _>(HandlerError::new("nope"))
        });
    let methods = echo_into(methods);
    broker
        .add_service("fragile", 1, methods)
        .await
        .expect("add");
    let (c, source) = code(broker.call("fragile", "Boom", &()).await);
    assert_eq!((c.as_str(), source.as_str()), ("internal", "fragile.0"));
    let (c, _) = code(broker.call("fragile", "Fail", &()).await);
    assert_eq!(c, "handler");
    assert_eq!(
        broker
            .call("fragile", "Echo", &5)
            .await
            .expect("alive")
            .payload_as::<u8>()
            .expect("u8"),
        5
    );
}

#[actix::test]
async fn events_fan_out_to_a_service_and_to_everyone() {
    let broker = quiet().start();
    let seen = Rc::new(Cell::new(0u32));
    let counting = {
        let seen = Rc::clone(&seen);
        Methods::new().on_event(move |e| {
            assert_eq!(&*e.id, "tick");
            seen.set(seen.get() + 1);
        })
    };
    broker
        .add_service("listen", 3, counting)
        .await
        .expect("add");
    let mut a = client(&broker, "a.0").await;
    let mut b = client(&broker, "b.0").await;

    route(&broker, "a.0", Envelope::event("listen", "tick"));
    route(&broker, "a.0", Envelope::event("*", "tick"));
    // Drain: a Ping round trip through the Router orders everything before it.
    broker.call("broker", "Ping", &()).await.expect("ping");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(seen.get(), 6, "3 workers × (service event + broadcast)");
    let broadcast = next(&mut b).await;
    assert_eq!((&*broadcast.id, &*broadcast.source), ("tick", "a.0"));
    assert!(
        a.try_recv().is_err(),
        "the sender does not get its own broadcast"
    );
}

#[actix::test]
async fn draining_refuses_new_requests_with_shutting_down() {
    let broker = quiet().start();
    broker.add_service("echo", 1, echo()).await.expect("add");
    broker
        .router()
        .send(SetDraining(true))
        .await
        .expect("router");
    let (c, _) = code(broker.call("echo", "Echo", &1).await);
    assert_eq!(c, "shutting_down");
    broker
        .router()
        .send(SetDraining(false))
        .await
        .expect("router");
    broker.call("echo", "Echo", &1).await.expect("served again");
}

#[actix::test]
async fn counters_are_exact_after_a_known_mix_of_traffic() {
    let broker = quiet().start();
    broker.add_service("echo", 4, echo()).await.expect("add");
    let mut inbox = client(&broker, "client.0").await;
    for n in 0..5u64 {
        route(
            &broker,
            "client.0",
            Envelope::request("echo", "Echo", n)
                .with_payload(&n)
                .expect("p"),
        );
    }
    route(&broker, "client.0", Envelope::event("echo", "note"));
    route(&broker, "client.0", Envelope::event("echo", "note"));
    route(&broker, "client.0", Envelope::request("nosuch", "Echo", 99));
    for _ in 0..6 {
        next(&mut inbox).await; // 5 responses + 1 error
    }
    // 3 calls from Rust: 2 answered, 1 unknown_method from the worker.
    broker.call("echo", "Echo", &1).await.expect("reply");
    broker.call("echo", "Echo", &2).await.expect("reply");
    let _ = broker.call("echo", "Missing", &3).await;

    let stats = broker.stats().await.expect("stats");
    let c = &stats.per_process["client.0"].counters;
    assert_eq!(
        (
            c.total_received,
            c.request_count,
            c.event_count,
            c.response_count,
            c.error_count
        ),
        (8, 6, 2, 0, 0)
    );
    assert_eq!(c.total_sent, 6, "5 responses and 1 error delivered to it");
    assert!(c.first_message_time.is_some() && c.last_message_time.is_some());
    // echo.N: 5 + 3 requests round-robin over 4 workers = 2 each; 2 events each.
    for w in 0..4 {
        let e = &stats.per_process[&format!("echo.{w}")].counters;
        assert_eq!(e.total_sent, 4, "echo.{w}: 2 requests + 2 events");
        assert_eq!(e.total_received, 2, "echo.{w}: its 2 replies");
    }
    let errors: u64 = (0..4)
        .map(|w| stats.per_process[&format!("echo.{w}")].counters.error_count)
        .sum();
    assert_eq!(errors, 1, "one unknown_method reply");
    let t = &stats.total.counters;
    // Received: client 8 + workers 8 replies + Rust 3 requests.
    assert_eq!(t.total_received, 19);
    assert_eq!(t.request_count, 9);
    assert_eq!(t.response_count, 7);
    assert_eq!(t.error_count, 1);
    assert_eq!(t.event_count, 2);
    // Sent: to workers 8 requests + 8 events, to client 6.
    assert_eq!(t.total_sent, 22);
    assert_eq!(stats.latency_us["echo"].count, 8);
    assert_eq!(stats.latency_us["overall"].count, 8);
    assert!(stats.latency_us["echo"].p50 >= 1);
}

#[actix::test]
async fn broker_rpcs_answer_with_the_designed_shapes() {
    let broker = quiet().control_allow(vec!["ops".into()]).start();
    broker.add_service("echo", 2, echo()).await.expect("add");
    broker.call("echo", "Echo", &1).await.expect("reply");

    let pong = broker.call("broker", "Ping", &()).await.expect("ping");
    assert_eq!(pong.payload_as::<Empty>().expect("{}"), Empty {});
    assert_eq!(
        pong.payload().expect("payload").as_bytes().as_ref(),
        &[0x80]
    );

    let list: Vec<ProcessInfo> = broker
        .call("broker", "ListProcesses", &())
        .await
        .expect("list")
        .payload_as()
        .expect("decode");
    let ids: Vec<&str> = list.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["echo.0", "echo.1"]);
    assert!(
        list.iter()
            .all(|p| p.service == "echo" && p.pid.is_none() && p.restarts == 0)
    );

    let sample = ProcessMetrics {
        pid: 1,
        id: "ext.0".into(),
        vmrss: Some(100),
        vmsize: Some(200),
        threads: Some(2),
        state: "S".into(),
        timestamp: "2026-11-22T00:00:00Z".into(),
    };
    let stored: SubmitProcessMetricsReply = broker
        .call("broker", "SubmitProcessMetrics", &vec![sample.clone()])
        .await
        .expect("submit")
        .payload_as()
        .expect("decode");
    assert_eq!(stored.received, 1);
    let (c, _) = code(broker.call("broker", "SubmitProcessMetrics", &"junk").await);
    assert_eq!(c, "bad_request");

    let stats: MessageStats = broker
        .call("broker", "GetMessageStats", &())
        .await
        .expect("stats")
        .payload_as()
        .expect("decode");
    assert_eq!(stats.process_metrics["ext.0"], sample);
    assert_eq!(stats.version, env!("CARGO_PKG_VERSION"));
    assert!(stats.uptime_s > 0.0);
    assert!(stats.latency_us.contains_key("echo") && stats.latency_us.contains_key("overall"));
    let count: MessageCount = broker
        .call("broker", "GetMessageCount", &())
        .await
        .expect("count")
        .payload_as()
        .expect("decode");
    // Counted since that snapshot: the stats reply (received from `broker`),
    // and this request (received from the caller, delivered to `broker`).
    let before = stats.total.counters.total_sent + stats.total.counters.total_received;
    assert_eq!(count.count, before + 3);

    // Control RPCs: Rust callers are trusted (a payload that is not a Spawn
    // request is bad_request); a process of a service not in control_allow is
    // forbidden; an allowed one gets to the point that `echo` has no
    // subprocesses to stop (its workers are in-process).
    let (c, m) = code(broker.call("broker", "Spawn", &()).await);
    assert_eq!(c, "bad_request", "{m}");
    for (process, correlation_id, expected) in [
        ("client.0", 5, ErrorCode::Forbidden),
        ("ops.0", 6, ErrorCode::UnknownTarget),
    ] {
        let mut inbox = client(&broker, process).await;
        let stop = Envelope::request("broker", "Stop", correlation_id)
            .with_payload(&BTreeMap::from([("id", "echo")]))
            .expect("payload");
        route(&broker, process, stop);
        let e = next(&mut inbox).await;
        assert_eq!(
            (e.error_code(), e.correlation_id),
            (Some(expected), correlation_id),
            "{process}"
        );
    }
}

#[actix::test]
async fn the_broker_itself_is_routable_from_the_first_call() {
    // No await between start and the call: registration must already be queued.
    let broker = quiet().start();
    broker.call("broker", "Ping", &()).await.expect("ping");
}

#[actix::test]
async fn a_removed_client_frees_the_queue_slots_of_its_requests() {
    let broker = quiet().queue_capacity(1).start();
    let gate = Rc::new(Notify::new());
    broker
        .add_service("hold", 1, holding(Rc::clone(&gate)))
        .await
        .expect("add");
    let _inbox = client(&broker, "client.0").await;
    route(
        &broker,
        "client.0",
        Envelope::request("hold", "Hold", 1)
            .with_payload(&1u64)
            .expect("p"),
    );
    until_pending(&broker, 1).await;
    let (c, _) = code(broker.call("hold", "Hold", &2u64).await);
    assert_eq!(c, "busy", "the one slot is taken");

    // The client dies with its request in flight: nobody will read the
    // answer, and the worker's slot must not stay taken forever.
    broker
        .router()
        .send(RemoveProcess {
            id: "client.0".into(),
            reason: "exited".into(),
        })
        .await
        .expect("router");
    assert_eq!(broker.router().send(PendingCount).await.expect("router"), 0);
    gate.notify_one(); // the worker finishes the orphaned request…
    let served = {
        let broker = broker.clone();
        actix::spawn(async move { broker.call("hold", "Hold", &3u64).await })
    };
    until_pending(&broker, 1).await;
    gate.notify_one();
    assert_eq!(
        served
            .await
            .expect("task")
            .expect("served")
            .payload_as::<u64>()
            .expect("u64"),
        3
    );
    let stats = broker.stats().await.expect("stats");
    assert_eq!(
        stats.per_process["hold.0"].faults.unmatched_replies, 0,
        "not blamed on the worker"
    );
    assert_eq!(stats.per_process["hold.0"].faults.late_replies, 1);
}
