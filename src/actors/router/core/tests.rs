//! The core on its own: plain tests, no actors, no runtime, a made-up
//! clock. Each drives inputs and reads the effects the recorder took down.

use bytestring::ByteString;
use std::time::{Duration, Instant};

use super::Core;
use crate::actors::messages::Envelopes;
use crate::actors::nodes::Nodes;
use crate::actors::router::recorder::{self, Effect, Recorder};
use crate::protocol::{
    CancelNotice, CancelReason, Envelope, ErrorCode, MessageType, SalvagedRequest,
};

/// A core with workers `echo.0` and `echo.1` (ready) and `client.0`.
fn core(t0: Instant) -> Core<Recorder> {
    let mut core = recorder::core(None, Nodes::default(), t0);
    for (id, service) in [
        ("echo.0", "echo"),
        ("echo.1", "echo"),
        ("client.0", "client"),
    ] {
        add(&mut core, id, service, t0).expect("registered");
    }
    core
}

/// Registers process `id` of `service`, ready, its port named as it is.
fn add(
    core: &mut Core<Recorder>,
    id: &str,
    service: &str,
    t0: Instant,
) -> Result<usize, crate::actors::messages::RouterError> {
    core.register(id.into(), &service.into(), true, id.into(), true, t0)
}

/// Process `from` sends `envelopes` at `now`; returns the effects.
fn send(
    core: &mut Core<Recorder>,
    from: &str,
    envelopes: Vec<Envelope>,
    now: Instant,
) -> Vec<Effect> {
    let from = ByteString::from(from);
    let slot = core.slot_of(&from).expect("registered");
    core.route_batch(slot, &from, Envelopes::from(envelopes), now);
    effects(core)
}

/// The effects so far; the input settled every port it delivered to, once.
fn effects(core: &mut Core<Recorder>) -> Vec<Effect> {
    let sink = core.sink();
    assert!(sink.unsettled.is_empty(), "unsettled: {:?}", sink.unsettled);
    assert_eq!(
        sink.idle_settles, 0,
        "a port settled with nothing delivered"
    );
    sink.take()
}

fn request(target: &str, id: u64) -> Envelope {
    Envelope::request(target, "Echo", id)
}

fn reply_to(request: &Envelope) -> Envelope {
    request.response(None)
}

/// `(to, kind, correlation id, error code)` of each delivery.
fn deliveries(effects: &[Effect]) -> Vec<(String, MessageType, u64, Option<ErrorCode>)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Deliver { to, envelope } => Some((
                to.to_string(),
                envelope.kind,
                envelope.correlation_id,
                envelope.error_code(),
            )),
            Effect::Answer { .. }
            | Effect::Refused { .. }
            | Effect::Partial { .. }
            | Effect::RecycleDue { .. } => None,
        })
        .collect()
}

/// The one envelope delivered, to whom.
fn one(effects: Vec<Effect>) -> (String, Envelope) {
    match <[Effect; 1]>::try_from(effects) {
        Ok([Effect::Deliver { to, envelope }]) => (to.to_string(), envelope),
        other => panic!("not one delivery: {other:?}"),
    }
}

/// The two envelopes delivered, in order.
fn two(effects: Vec<Effect>) -> [(String, Envelope); 2] {
    match <[Effect; 2]>::try_from(effects) {
        Ok(
            [
                Effect::Deliver { to: a, envelope: x },
                Effect::Deliver { to: b, envelope: y },
            ],
        ) => [(a.to_string(), x), (b.to_string(), y)],
        other => panic!("not two deliveries: {other:?}"),
    }
}

/// A delivered `cancel`: (to, correlation id, the request's source, reason).
fn cancel_of((to, cancel): &(String, Envelope)) -> (String, u64, String, CancelReason) {
    assert!(cancel.is_cancel(), "not a cancel: {cancel:?}");
    assert_eq!(&*cancel.source, "broker");
    assert_eq!(*to, *cancel.target);
    let notice = CancelNotice::from_payload(cancel.payload.as_ref()).expect("a notice");
    (
        to.clone(),
        cancel.correlation_id,
        notice.source.to_string(),
        notice.reason,
    )
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn route_request_goes_round_robin_to_ready_workers_with_a_free_slot() {
    let t0 = Instant::now();
    let mut core = core(t0);
    let batch = (1..=5).map(|n| request("echo", n)).collect();
    let effects = send(&mut core, "client.0", batch, t0);
    let to: Vec<_> = deliveries(&effects)
        .into_iter()
        .map(|(to, kind, id, code)| (to, kind, id, code.map(|c| c.as_str())))
        .collect();
    assert_eq!(
        to,
        [
            ("echo.0".into(), MessageType::Request, 1, None),
            ("echo.1".into(), MessageType::Request, 2, None),
            ("echo.0".into(), MessageType::Request, 3, None),
            ("echo.1".into(), MessageType::Request, 4, None),
            // queue_capacity 2: both full.
            ("client.0".into(), MessageType::Error, 5, Some("busy")),
        ]
    );
    let Effect::Deliver { envelope, .. } = &effects[0] else {
        panic!("a delivery");
    };
    assert_eq!(&*envelope.source, "client.0", "source stamped");
    assert_eq!(core.in_flight_of(&"echo.0".into()), 2);
    assert_eq!(core.pending_count(), 4);
    assert_eq!(
        core.sink().armed,
        Some(t0 + ms(100)),
        "the deadline is armed"
    );
    let client = core.table.get(&"client.0".into()).expect("client");
    assert_eq!(client.delta.busy_rejections, 1);
}

#[test]
fn route_request_answers_what_it_cannot_deliver() {
    let t0 = Instant::now();
    let mut core = core(t0);
    let code = |effects: Vec<Effect>| {
        let (to, envelope) = one(effects);
        assert_eq!(to, "client.0");
        envelope.error_code()
    };
    let nobody = send(&mut core, "client.0", vec![request("nobody", 1)], t0);
    assert_eq!(code(nobody), Some(ErrorCode::UnknownTarget));

    core.set_ready(&"echo.0".into(), false);
    core.set_ready(&"echo.1".into(), false);
    let unready = send(&mut core, "client.0", vec![request("echo", 2)], t0);
    assert_eq!(code(unready), Some(ErrorCode::Unavailable));
    core.set_ready(&"echo.0".into(), true);

    // A correlation id still in flight.
    let first = send(&mut core, "client.0", vec![request("echo", 3)], t0);
    assert_eq!(one(first).0, "echo.0");
    let again = send(&mut core, "client.0", vec![request("echo", 3)], t0);
    assert_eq!(code(again), Some(ErrorCode::BadRequest));
    assert_eq!(core.pending_count(), 1, "the first one stays");

    // The worker's actor stopped without a removal: taken out at once.
    core.sink().gone.insert("echo.0".into());
    let gone = send(&mut core, "client.0", vec![request("echo", 4)], t0);
    let refused = |e: &Effect| matches!(e, Effect::Refused { to, envelope } if &**to == "echo.0" && envelope.correlation_id == 4);
    assert!(gone.iter().any(refused), "the delivery was refused");
    let codes: Vec<_> = deliveries(&gone).into_iter().map(|d| (d.2, d.3)).collect();
    assert_eq!(
        codes,
        [
            (3, Some(ErrorCode::WorkerExited)),
            (4, Some(ErrorCode::WorkerExited))
        ]
    );
    assert!(core.table.get(&"echo.0".into()).is_none(), "removed");
    assert_eq!(core.pending_count(), 0);

    core.set_draining(true);
    let draining = send(&mut core, "client.0", vec![request("echo", 5)], t0);
    assert_eq!(code(draining), Some(ErrorCode::ShuttingDown));
}

#[test]
fn route_reply_is_taken_from_the_worker_it_went_to_once() {
    let t0 = Instant::now();
    let mut core = core(t0);
    let (_, delivered) = one(send(&mut core, "client.0", vec![request("echo", 7)], t0));
    let reply = reply_to(&delivered);

    // Forged: echo.1 was not asked.
    assert!(send(&mut core, "echo.1", vec![reply.clone()], t0 + ms(1)).is_empty());
    assert_eq!(core.in_flight_of(&"echo.0".into()), 1);

    // The right one, then the same again.
    let answered = send(&mut core, "echo.0", vec![reply.clone(), reply], t0 + ms(2));
    let (to, envelope) = one(answered);
    assert_eq!(
        (to.as_str(), &*envelope.source, envelope.correlation_id),
        ("client.0", "echo.0", 7)
    );
    assert_eq!(core.in_flight_of(&"echo.0".into()), 0, "slot released");
    assert_eq!(core.pending_count(), 0);
    let unmatched = |core: &Core<Recorder>, id: &str| {
        let entry = core.table.get(&id.into()).expect("registered");
        entry.delta.unmatched_replies
    };
    assert_eq!(unmatched(&core, "echo.1"), 1, "the forgery");
    assert_eq!(unmatched(&core, "echo.0"), 1, "the second reply");
    let service = core.table.get(&"echo.0".into()).expect("echo.0").service;
    assert_eq!(core.table.services[service].histogram.len(), 1, "latency");
}

#[test]
fn a_rust_callers_reply_goes_to_its_channel() {
    let t0 = Instant::now();
    let mut core = core(t0);
    core.call(request("echo", 0), 41, t0);
    let (to, delivered) = one(effects(&mut core));
    assert_eq!((to.as_str(), &*delivered.source), ("echo.0", "@caller"));
    let answered = send(&mut core, "echo.0", vec![reply_to(&delivered)], t0);
    assert!(
        matches!(&answered[..], [Effect::Answer { caller: 41, reply }] if reply.kind == MessageType::Response)
    );
    core.call(request("nobody", 0), 42, t0);
    let refused = effects(&mut core);
    assert!(matches!(
        &refused[..],
        [Effect::Answer { caller: 42, reply }] if reply.error_code() == Some(ErrorCode::UnknownTarget)
    ));
}

#[test]
fn expire_answers_timeout_frees_the_slot_and_arms_the_next() {
    let t0 = Instant::now();
    let mut core = core(t0);
    let mut late = request("echo", 1);
    late.timeout_ms = Some(50);
    let (_, first) = one(send(&mut core, "client.0", vec![late], t0));
    let (_, second) = one(send(
        &mut core,
        "client.0",
        vec![request("echo", 2)],
        t0 + ms(10),
    ));
    assert_eq!(core.sink().armed, Some(t0 + ms(50)));

    core.sink().armed = None; // the timer fired
    core.expire(t0 + ms(49));
    assert!(effects(&mut core).is_empty(), "nothing due yet");
    assert_eq!(core.sink().armed, Some(t0 + ms(50)), "armed again");
    core.sink().armed = None;
    core.expire(t0 + ms(50));
    let [(to, timeout), cancel] = two(effects(&mut core));
    assert_eq!(
        (to.as_str(), timeout.correlation_id, timeout.error_code()),
        ("client.0", 1, Some(ErrorCode::Timeout))
    );
    assert_eq!(
        cancel_of(&cancel),
        ("echo.0".into(), 1, "client.0".into(), CancelReason::Timeout),
        "the worker is told"
    );
    assert_eq!(core.in_flight_of(&"echo.0".into()), 0, "slot released");
    assert_eq!(core.sink().armed, Some(t0 + ms(110)), "the next one");
    let client = core.table.get(&"client.0".into()).expect("client");
    assert_eq!(client.delta.timeouts, 1);

    // A reply after the deadline is late, not forged.
    assert!(send(&mut core, "echo.0", vec![reply_to(&first)], t0 + ms(60)).is_empty());
    let worker = core.table.get(&"echo.0".into()).expect("echo.0");
    assert_eq!(
        (worker.delta.late_replies, worker.delta.unmatched_replies),
        (1, 0)
    );
    // The other one still gets its worker's reply.
    let (to, _) = one(send(
        &mut core,
        "echo.1",
        vec![reply_to(&second)],
        t0 + ms(70),
    ));
    assert_eq!(to, "client.0");
}

#[test]
fn remove_process_fails_what_it_holds_and_forgets_what_it_asked() {
    let t0 = Instant::now();
    let mut core = core(t0);
    let batch = vec![request("echo", 1), request("echo", 2)];
    let asked = send(&mut core, "client.0", batch, t0);
    let Some(Effect::Deliver {
        envelope: to_echo1, ..
    }) = asked.get(1)
    else {
        panic!("two deliveries");
    };
    let to_echo1 = to_echo1.clone();

    assert_eq!(core.remove_process(&"echo.0".into(), "killed", t0), 1);
    let (to, failed) = one(effects(&mut core));
    assert_eq!(
        (to.as_str(), failed.correlation_id, failed.error_code()),
        ("client.0", 1, Some(ErrorCode::WorkerExited))
    );
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.contains("killed"))
    );

    // The caller goes: its request's slot is freed, nobody is answered,
    // the worker is told, and its reply counts as late.
    assert_eq!(core.remove_process(&"client.0".into(), "exited", t0), 0);
    let (_, cancel) = one(effects(&mut core));
    assert_eq!(
        cancel_of(&(String::from("echo.1"), cancel)),
        (
            "echo.1".into(),
            2,
            "client.0".into(),
            CancelReason::CallerExited
        )
    );
    assert_eq!(core.in_flight_of(&"echo.1".into()), 0);
    assert_eq!(core.pending_count(), 0);
    assert!(send(&mut core, "echo.1", vec![reply_to(&to_echo1)], t0).is_empty());
    let worker = core.table.get(&"echo.1".into()).expect("echo.1");
    assert_eq!(worker.delta.late_replies, 1);
    assert_eq!(core.remove_process(&"nobody".into(), "never here", t0), 0);
}

#[test]
fn a_bounced_request_is_answered_and_its_slot_freed_once() {
    let t0 = Instant::now();
    let mut core = core(t0);
    let (to, delivered) = one(send(&mut core, "client.0", vec![request("echo", 1)], t0));
    core.bounce(
        &to.as_str().into(),
        delivered.clone(),
        ErrorCode::Busy,
        "full".into(),
        t0,
    );
    let (back, busy) = one(effects(&mut core));
    assert_eq!(
        (back.as_str(), busy.error_code()),
        ("client.0", Some(ErrorCode::Busy))
    );
    assert_eq!(core.in_flight_of(&"echo.0".into()), 0);
    // Bounced again (it cannot be pending any more): nothing.
    core.bounce(
        &to.as_str().into(),
        delivered,
        ErrorCode::Busy,
        "full".into(),
        t0,
    );
    assert!(effects(&mut core).is_empty());
}

#[test]
fn a_salvaged_bad_frame_is_answered_bad_request() {
    let t0 = Instant::now();
    let mut core = core(t0);
    let salvaged = SalvagedRequest {
        id: Some("Echo".into()),
        correlation_id: 9,
    };
    core.bad_frame("client.0".into(), 1, "no type", Some(salvaged), t0);
    let (to, error) = one(effects(&mut core));
    assert_eq!(
        (to.as_str(), error.correlation_id, error.error_code()),
        ("client.0", 9, Some(ErrorCode::BadRequest))
    );
    core.bad_frame("client.0".into(), 3, "garbage", None, t0);
    assert!(effects(&mut core).is_empty());
    let client = core.table.get(&"client.0".into()).expect("client");
    assert_eq!(client.delta.bad_frames, 4);
}

#[test]
fn control_changes_take_effect_on_the_next_input() {
    let t0 = Instant::now();
    let mut core = core(t0);
    // Out of rotation: every request goes to echo.1.
    core.set_ready(&"echo.0".into(), false);
    let batch = vec![request("echo", 1), request("echo", 2)];
    let to: Vec<_> = deliveries(&send(&mut core, "client.0", batch, t0))
        .into_iter()
        .map(|d| d.0)
        .collect();
    assert_eq!(to, ["echo.1", "echo.1"]);
    // By its id it is not routable either; back in, it is.
    let unready = send(&mut core, "client.0", vec![request("echo.0", 3)], t0);
    assert_eq!(one(unready).1.error_code(), Some(ErrorCode::Unavailable));
    core.set_ready(&"echo.0".into(), true);
    assert_eq!(
        one(send(&mut core, "client.0", vec![request("echo.0", 4)], t0)).0,
        "echo.0"
    );

    core.health_failure(&"echo.0".into());
    let worker = core.table.get(&"echo.0".into()).expect("echo.0");
    assert_eq!(worker.delta.health_failures, 1);

    // A new worker joins the rotation at its end.
    add(&mut core, "echo.2", "echo", t0).expect("registered");
    assert!(
        add(&mut core, "echo.2", "echo", t0).is_err(),
        "a duplicate id"
    );
    core.remove_process(&"echo.1".into(), "scaled down", t0);
    effects(&mut core);
    let batch = vec![request("echo", 5), request("echo", 6)];
    let to: Vec<_> = deliveries(&send(&mut core, "client.0", batch, t0))
        .into_iter()
        .map(|d| d.0)
        .collect();
    assert_eq!(to, ["echo.0", "echo.2"]);
}

#[test]
fn events_go_to_every_ready_worker_and_lifecycle_events_only_to_the_broker() {
    let t0 = Instant::now();
    let mut core = core(t0);
    let to: Vec<_> = deliveries(&send(
        &mut core,
        "client.0",
        vec![Envelope::event("echo", "tick")],
        t0,
    ))
    .into_iter()
    .map(|d| d.0)
    .collect();
    assert_eq!(to, ["echo.0", "echo.1"]);
    let shutdown = Envelope::event("echo.0", crate::names::SHUTDOWN_EVENT);
    assert!(send(&mut core, "client.0", vec![shutdown], t0).is_empty());
    let client = core.table.get(&"client.0".into()).expect("client");
    assert_eq!(client.delta.dropped_events, 1);
    assert_eq!(core.publish(Envelope::event("*", "hello"), t0), 3);
    effects(&mut core);
}

// ---------------------------------------------------------------------------
// The request lifecycle: deadlines, cancels, streams, keys, balance, recycling

fn cancel_to_broker(correlation_id: u64) -> Envelope {
    Envelope::cancel_request(correlation_id)
}

fn partial(request: &Envelope, n: u8) -> Envelope {
    request.partial_response(Some(
        crate::protocol::Payload::encode(&n).expect("a payload"),
    ))
}

fn counters(core: &mut Core<Recorder>, id: &str) -> crate::actors::messages::Counters {
    core.table.get(&id.into()).expect("registered").delta
}

#[test]
fn a_delivered_request_carries_the_budget_left() {
    let t0 = Instant::now();
    let mut core = core(t0);
    let mut own = request("echo", 1);
    own.timeout_ms = Some(250);
    let (_, delivered) = one(send(&mut core, "client.0", vec![own], t0));
    assert_eq!(delivered.timeout_ms, Some(250));
    let (_, delivered) = one(send(&mut core, "client.0", vec![request("echo", 2)], t0));
    assert_eq!(delivered.timeout_ms, Some(100), "the default timeout");
    assert_eq!(super::budget_ms(Duration::from_micros(1)), 1, "at least 1");
    assert_eq!(
        super::budget_ms(Duration::from_micros(1500)),
        2,
        "rounded up"
    );
}

#[test]
fn a_caller_cancels_its_own_request_and_nobody_elses() {
    let t0 = Instant::now();
    let mut core = core(t0);
    let (worker, delivered) = one(send(&mut core, "client.0", vec![request("echo", 7)], t0));

    // Forged or unknown: dropped and counted, nothing else happens.
    let mut to_a_process = cancel_to_broker(7);
    to_a_process.target = "echo.0".into();
    assert!(send(&mut core, "client.0", vec![to_a_process], t0).is_empty());
    assert!(send(&mut core, "client.0", vec![cancel_to_broker(8)], t0).is_empty());
    assert!(send(&mut core, "echo.1", vec![cancel_to_broker(7)], t0).is_empty());
    assert_eq!(counters(&mut core, "client.0").dropped_events, 2);
    assert_eq!(counters(&mut core, "echo.1").dropped_events, 1);
    assert_eq!(core.pending_count(), 1);

    let [(to, cancelled), cancel] = two(send(&mut core, "client.0", vec![cancel_to_broker(7)], t0));
    assert_eq!(
        (
            to.as_str(),
            cancelled.correlation_id,
            cancelled.error_code()
        ),
        ("client.0", 7, Some(ErrorCode::Cancelled))
    );
    assert_eq!(
        cancel_of(&cancel),
        (
            worker.clone(),
            7,
            "client.0".into(),
            CancelReason::Cancelled
        )
    );
    assert_eq!(core.in_flight_of(&worker.as_str().into()), 0, "slot freed");
    assert_eq!(counters(&mut core, &worker).cancels, 1);
    // The worker's reply after the cancel is late; a second cancel is
    // unknown.
    assert!(send(&mut core, &worker, vec![reply_to(&delivered)], t0).is_empty());
    assert_eq!(counters(&mut core, &worker).late_replies, 1);
    assert!(send(&mut core, "client.0", vec![cancel_to_broker(7)], t0).is_empty());
    assert_eq!(counters(&mut core, "client.0").dropped_events, 3);
}

#[test]
fn partial_replies_reach_a_stream_caller_in_order_then_the_final() {
    let t0 = Instant::now();
    let mut core = core(t0);
    let (worker, delivered) = one(send(
        &mut core,
        "client.0",
        vec![request("echo", 1).with_stream()],
        t0,
    ));
    assert!(
        delivered.stream,
        "the worker learns the caller takes a stream"
    );
    let parts = vec![
        partial(&delivered, 0),
        partial(&delivered, 1),
        reply_to(&delivered),
    ];
    let got = send(&mut core, &worker, parts, t0);
    let got: Vec<_> = got
        .iter()
        .map(|e| match e {
            Effect::Deliver { to, envelope } => (to.to_string(), envelope.more),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        [
            ("client.0".into(), true),
            ("client.0".into(), true),
            ("client.0".into(), false)
        ]
    );
    assert_eq!(counters(&mut core, &worker).partial_replies, 2);
    assert_eq!(core.pending_count(), 0);

    // Partials to a request without `stream`: dropped, counted; the final
    // still goes through.
    let (worker, plain) = one(send(&mut core, "client.0", vec![request("echo", 2)], t0));
    assert!(send(&mut core, &worker, vec![partial(&plain, 0)], t0).is_empty());
    assert_eq!(counters(&mut core, &worker).unmatched_replies, 1);
    let (to, _) = one(send(&mut core, &worker, vec![reply_to(&plain)], t0));
    assert_eq!(to, "client.0");
    // A partial after the final reply: unmatched too.
    assert!(send(&mut core, &worker, vec![partial(&plain, 1)], t0).is_empty());
    assert_eq!(counters(&mut core, &worker).unmatched_replies, 2);
}

#[test]
fn a_stream_to_a_caller_that_does_not_read_is_cut_with_busy() {
    let t0 = Instant::now();
    let mut core = core(t0);
    let (worker, delivered) = one(send(
        &mut core,
        "client.0",
        vec![request("echo", 1).with_stream()],
        t0,
    ));
    let (to, _) = one(send(&mut core, &worker, vec![partial(&delivered, 0)], t0));
    assert_eq!(to, "client.0");
    // The caller's stdin backlog holds `queue_capacity` (2) frames.
    core.sink().backlog.insert("client.0".into(), 2);
    let [(to, busy), cancel] = two(send(&mut core, &worker, vec![partial(&delivered, 1)], t0));
    assert_eq!(
        (to.as_str(), busy.error_code(), busy.more),
        ("client.0", Some(ErrorCode::Busy), false)
    );
    assert_eq!(
        cancel_of(&cancel),
        (worker.clone(), 1, "client.0".into(), CancelReason::Busy)
    );
    assert_eq!(core.in_flight_of(&worker.as_str().into()), 0);
    // What the worker still sends is late.
    let rest = vec![partial(&delivered, 2), reply_to(&delivered)];
    assert!(send(&mut core, &worker, rest, t0).is_empty());
    assert_eq!(counters(&mut core, &worker).late_replies, 2);
}

#[test]
fn a_rust_callers_stream_is_fed_cut_when_full_and_cancelled_when_dropped() {
    let t0 = Instant::now();
    let mut core = core(t0);
    core.call(request("echo", 0).with_stream(), 1, t0);
    let (worker, delivered) = one(effects(&mut core));
    let got = send(&mut core, &worker, vec![partial(&delivered, 0)], t0);
    assert!(matches!(&got[..], [Effect::Partial { caller: 1, reply }] if reply.more));
    core.sink().full.insert(1);
    let got = send(&mut core, &worker, vec![partial(&delivered, 1)], t0);
    match &got[..] {
        [
            Effect::Answer { caller: 1, reply },
            Effect::Deliver { to, envelope },
        ] => {
            assert_eq!(reply.error_code(), Some(ErrorCode::Busy));
            assert_eq!(
                cancel_of(&(to.to_string(), envelope.clone())).3,
                CancelReason::Busy
            );
        }
        other => panic!("{other:?}"),
    }

    core.call(request("echo", 0).with_stream(), 2, t0);
    let (worker, delivered) = one(effects(&mut core));
    core.sink().deaf.insert(2);
    let got = send(&mut core, &worker, vec![partial(&delivered, 0)], t0);
    match &got[..] {
        [Effect::Deliver { to, envelope }] => {
            assert_eq!(
                cancel_of(&(to.to_string(), envelope.clone())).3,
                CancelReason::Cancelled
            );
        }
        other => panic!("{other:?}"),
    }
    // Dropped before any partial: cancelled through `cancel_call`.
    core.call(request("echo", 0), 3, t0);
    let (worker, delivered) = one(effects(&mut core));
    core.cancel_call(delivered.correlation_id, t0);
    match &effects(&mut core)[..] {
        [
            Effect::Answer { caller: 3, reply },
            Effect::Deliver { to, .. },
        ] => {
            assert_eq!(reply.error_code(), Some(ErrorCode::Cancelled));
            assert_eq!(**to, *worker);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(core.pending_count(), 0);
}

#[test]
fn a_key_pins_requests_to_one_worker_and_never_spills() {
    let t0 = Instant::now();
    let mut core = core(t0);
    add(&mut core, "echo.2", "echo", t0).expect("registered");
    let keyed = |id: u64, key: &str| request("echo", id).with_key(key).expect("a key");
    let mut owner = std::collections::BTreeMap::new();
    for (n, key) in ["a", "b", "c", "d", "e", "f"].into_iter().enumerate() {
        let (worker, delivered) = one(send(&mut core, "client.0", vec![keyed(n as u64, key)], t0));
        assert_eq!(
            delivered.key.as_ref().and_then(|k| k.as_str().ok()),
            Some(key)
        );
        owner.insert(key, worker.clone());
        let (_, _) = one(send(&mut core, &worker, vec![reply_to(&delivered)], t0));
    }
    for (n, key) in ["a", "b", "c", "d", "e", "f"].into_iter().enumerate() {
        let (worker, delivered) = one(send(
            &mut core,
            "client.0",
            vec![keyed(100 + n as u64, key)],
            t0,
        ));
        assert_eq!(worker, owner[key], "key {key} moved");
        one(send(&mut core, &worker, vec![reply_to(&delivered)], t0));
    }
    // Its worker full (2 in flight): `busy`, not another worker.
    let a = &owner["a"];
    one(send(&mut core, "client.0", vec![keyed(200, "a")], t0));
    one(send(&mut core, "client.0", vec![keyed(201, "a")], t0));
    let (to, busy) = one(send(&mut core, "client.0", vec![keyed(202, "a")], t0));
    assert_eq!(
        (to.as_str(), busy.error_code()),
        ("client.0", Some(ErrorCode::Busy))
    );
    assert!(
        busy.error
            .as_deref()
            .is_some_and(|e| e.contains(a.as_str()))
    );
    // A bad key: `bad_request`.
    let mut long = request("echo", 300);
    long.key = Some(crate::protocol::RequestKey::Invalid(
        crate::protocol::Payload::encode(&"k".repeat(257)).expect("payload"),
    ));
    let mut integer = request("echo", 301);
    integer.key = Some(crate::protocol::RequestKey::Invalid(
        crate::protocol::Payload::encode(&7u8).expect("payload"),
    ));
    for bad in [long, integer] {
        let (to, refused) = one(send(&mut core, "client.0", vec![bad], t0));
        assert_eq!(
            (to.as_str(), refused.error_code()),
            ("client.0", Some(ErrorCode::BadRequest))
        );
    }
    // A key on a request to a process is ignored.
    let other = ["echo.0", "echo.1", "echo.2"]
        .into_iter()
        .find(|w| *w != a.as_str())
        .expect("another worker");
    let direct = request(other, 400).with_key("a").expect("a key");
    let (to, _) = one(send(&mut core, "client.0", vec![direct], t0));
    assert_eq!(to, other);
}

#[test]
fn rendezvous_moves_only_the_keys_of_a_worker_that_leaves() {
    let t0 = Instant::now();
    let mut core = recorder::core(None, Nodes::default(), t0);
    for n in 0..4 {
        add(&mut core, &format!("w.{n}"), "w", t0).expect("registered");
    }
    let owners = |core: &mut Core<Recorder>| -> Vec<usize> {
        (0..2000)
            .map(|k| {
                let key = format!("session-{k}");
                core.table
                    .pick(&"w".into(), Some(&key), usize::MAX)
                    .expect("picked")
            })
            .collect()
    };
    let before = owners(&mut core);
    let gone = core.table.slot_of(&"w.1".into()).expect("w.1");
    core.set_ready(&"w.1".into(), false);
    let after = owners(&mut core);
    let mut per_worker = std::collections::BTreeMap::new();
    for (b, a) in before.iter().zip(&after) {
        *per_worker.entry(*b).or_insert(0) += 1;
        assert!(b == a || *b == gone, "a key of a staying worker moved");
        assert_ne!(*a, gone);
    }
    // Spread: each of 4 workers owns roughly a quarter.
    for (slot, n) in per_worker {
        assert!(
            (350..650).contains(&n),
            "worker {slot} owned {n} of 2000 keys"
        );
    }
}

#[test]
fn least_pending_picks_the_worker_with_the_fewest_in_flight() {
    let t0 = Instant::now();
    let mut core = core(t0);
    core.set_policy(
        &"echo".into(),
        crate::config::WorkerBalance::LeastPending,
        0,
    );
    let (first, r1) = one(send(&mut core, "client.0", vec![request("echo", 1)], t0));
    let (second, _) = one(send(&mut core, "client.0", vec![request("echo", 2)], t0));
    assert_ne!(first, second, "the idle one");
    one(send(&mut core, &first, vec![reply_to(&r1)], t0));
    // `first` has 0 in flight, `second` 1: `first` twice in a row.
    let (third, _) = one(send(&mut core, "client.0", vec![request("echo", 3)], t0));
    assert_eq!(third, first);
    // Ties (1 and 1) go to the next in turn.
    let (fourth, _) = one(send(&mut core, "client.0", vec![request("echo", 4)], t0));
    assert_eq!(fourth, second);
}

#[test]
fn a_worker_is_due_for_recycling_once_at_max_requests() {
    let t0 = Instant::now();
    let mut core = core(t0);
    core.set_policy(&"echo".into(), crate::config::WorkerBalance::RoundRobin, 2);
    let mut due = Vec::new();
    for id in 1..=6 {
        for effect in send(&mut core, "client.0", vec![request("echo.0", id)], t0) {
            match effect {
                Effect::RecycleDue { worker } => due.push((id, worker.to_string())),
                Effect::Deliver { to, envelope } => {
                    one(send(&mut core, &to, vec![reply_to(&envelope)], t0));
                }
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(due, [(2, "echo.0".to_string())]);
}

#[test]
fn the_drain_expiring_cancels_in_flight_work_once_and_callers_wait_for_removal() {
    let t0 = Instant::now();
    let mut core = core(t0);
    let (worker, _) = one(send(&mut core, "client.0", vec![request("echo", 1)], t0));
    core.cancel_in_flight(None, t0);
    let (_, cancel) = one(effects(&mut core));
    assert_eq!(
        cancel_of(&(worker.clone(), cancel)).3,
        CancelReason::ShuttingDown
    );
    assert_eq!(core.pending_count(), 1, "the caller still waits");
    core.cancel_in_flight(None, t0);
    assert!(effects(&mut core).is_empty(), "told once");
    core.expire(t0 + ms(100));
    let (to, timeout) = one(effects(&mut core));
    assert_eq!(
        (to.as_str(), timeout.error_code()),
        ("client.0", Some(ErrorCode::Timeout)),
        "no second cancel at the deadline"
    );
}

/// A core of node `this` with `echo.0` and `client.0`, and node `other` up
/// with one `echo` (routed as `@other`, its port named the same).
fn node_core(this: &str, other: &str, t0: Instant) -> Core<Recorder> {
    let nodes = Nodes::new(this, crate::config::Balance::default());
    let mut core = recorder::core(None, nodes, t0);
    for (id, service) in [("echo.0", "echo"), ("client.0", "client")] {
        add(&mut core, id, service, t0).expect("registered");
    }
    let port = ByteString::from(format!("@{other}"));
    core.node_up(&other.into(), vec![("echo".into(), 1)], port, t0);
    core
}

/// What node `from` hands the core, and the effects.
fn from_node(
    core: &mut Core<Recorder>,
    from: &str,
    envelope: Envelope,
    now: Instant,
) -> Vec<Effect> {
    core.route_from_nodes(vec![(ByteString::from(from), envelope)], now);
    effects(core)
}

/// A cancel as another node's broker sends it: the caller's own cancel,
/// `source` stamped `proc@node` on arrival, with the reason.
fn remote_cancel(source: &str, correlation_id: u64, reason: CancelReason) -> Envelope {
    let origin = source.split('@').next().unwrap_or_default().to_owned();
    let mut cancel = Envelope::cancel_notice("broker", correlation_id, origin, reason);
    cancel.source = source.into();
    cancel
}

#[test]
fn a_cancel_from_a_node_stops_its_callers_request_only() {
    let t0 = Instant::now();
    let mut core = node_core("b", "a", t0);
    let mut asked = request("echo", 7);
    asked.source = "client.0@a".into();
    let (worker, delivered) = one(from_node(&mut core, "@a", asked, t0));
    assert_eq!(
        (worker.as_str(), &*delivered.source),
        ("echo.0", "client.0@a")
    );

    // Another node's caller, an unknown id: dropped, counted as the node's.
    let forged = remote_cancel("client.0@c", 7, CancelReason::Cancelled);
    assert!(from_node(&mut core, "@a", forged, t0).is_empty());
    let unknown = remote_cancel("client.0@a", 8, CancelReason::Cancelled);
    assert!(from_node(&mut core, "@a", unknown, t0).is_empty());
    assert_eq!(counters(&mut core, "@a").dropped_events, 2);
    assert_eq!(core.pending_count(), 1);

    // The caller's broker timed it out: the worker is told why, its slot
    // freed, and nothing goes back (that broker answered already).
    let cancel = remote_cancel("client.0@a", 7, CancelReason::Timeout);
    let told = one(from_node(&mut core, "@a", cancel, t0));
    assert_eq!(
        cancel_of(&told),
        (
            "echo.0".into(),
            7,
            "client.0@a".into(),
            CancelReason::Timeout
        )
    );
    assert_eq!(core.in_flight_of(&"echo.0".into()), 0, "slot freed");
    assert!(send(&mut core, "echo.0", vec![reply_to(&delivered)], t0).is_empty());
    assert_eq!(counters(&mut core, "echo.0").late_replies, 1);
    let again = remote_cancel("client.0@a", 7, CancelReason::Timeout);
    assert!(
        from_node(&mut core, "@a", again, t0).is_empty(),
        "told once"
    );
    assert_eq!(
        counters(&mut core, "@a").dropped_events,
        3,
        "a repeat finds nothing"
    );

    // Both brokers time a request out: whichever is first tells the
    // worker; the other's cancel crosses it and is not counted as dropped.
    let mut asked = request("echo", 9);
    asked.source = "client.0@a".into();
    asked.timeout_ms = Some(50);
    one(from_node(&mut core, "@a", asked, t0));
    core.expire(t0 + ms(50));
    let effects = effects(&mut core);
    let told = effects
        .iter()
        .find_map(|e| match e {
            Effect::Deliver { to, envelope } if envelope.is_cancel() => {
                Some((to.to_string(), envelope.clone()))
            }
            _ => None,
        })
        .expect("the worker told");
    assert_eq!(cancel_of(&told).3, CancelReason::Timeout);
    let crossing = remote_cancel("client.0@a", 9, CancelReason::Timeout);
    assert!(from_node(&mut core, "@a", crossing, t0 + ms(51)).is_empty());
    assert_eq!(
        counters(&mut core, "@a").dropped_events,
        3,
        "crossed, not dropped"
    );
}

#[test]
fn a_request_to_a_node_that_ends_early_is_cancelled_there() {
    let t0 = Instant::now();
    let mut core = node_core("a", "b", t0);
    let (to, sent) = one(send(&mut core, "client.0", vec![request("echo@b", 3)], t0));
    assert_eq!((to.as_str(), &*sent.target), ("@b", "echo@b"));

    // Its deadline passes here: `timeout` to the caller, `cancel` to b.
    core.expire(t0 + ms(100));
    let [(to, timeout), cancel] = two(effects(&mut core));
    assert_eq!(
        (to.as_str(), timeout.error_code()),
        ("client.0", Some(ErrorCode::Timeout))
    );
    assert_eq!(
        cancel_of(&cancel),
        ("@b".into(), 3, "client.0".into(), CancelReason::Timeout)
    );
    assert_eq!(counters(&mut core, "@b").cancels, 1);

    // The caller cancels: `cancelled` to it, `cancel` to b; b's reply
    // after it is late.
    let (_, sent) = one(send(&mut core, "client.0", vec![request("echo@b", 4)], t0));
    let [(to, cancelled), cancel] = two(send(&mut core, "client.0", vec![cancel_to_broker(4)], t0));
    assert_eq!(
        (to.as_str(), cancelled.error_code()),
        ("client.0", Some(ErrorCode::Cancelled))
    );
    assert_eq!(
        cancel_of(&cancel),
        ("@b".into(), 4, "client.0".into(), CancelReason::Cancelled)
    );
    let mut late = reply_to(&sent);
    late.source = "echo.0@b".into();
    assert!(from_node(&mut core, "@b", late, t0).is_empty());
    assert_eq!(counters(&mut core, "@b").late_replies, 1);
    assert_eq!(core.pending_count(), 0);
}
