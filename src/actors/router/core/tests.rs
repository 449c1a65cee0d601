//! The core on its own: plain tests, no actors, no runtime, a made-up
//! clock. Each drives inputs and reads the effects the recorder took down.

use bytestring::ByteString;
use std::time::{Duration, Instant};

use super::Core;
use crate::actors::messages::Envelopes;
use crate::actors::nodes::Nodes;
use crate::actors::router::recorder::{self, Effect, Recorder};
use crate::protocol::{Envelope, ErrorCode, MessageType, SalvagedRequest};

/// A core with workers `echo.0` and `echo.1` (ready) and `client.0`.
fn core(t0: Instant) -> Core<Recorder> {
    let mut core = recorder::core(None, Nodes::default(), t0);
    for (id, service) in [
        ("echo.0", "echo"),
        ("echo.1", "echo"),
        ("client.0", "client"),
    ] {
        core.register(id.into(), &service.into(), true, id.into(), t0)
            .expect("registered");
    }
    core
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
            Effect::Answer { .. } | Effect::Refused { .. } => None,
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
    let (to, timeout) = one(effects(&mut core));
    assert_eq!(
        (to.as_str(), timeout.correlation_id, timeout.error_code()),
        ("client.0", 1, Some(ErrorCode::Timeout))
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
    // and the worker's reply counts as late.
    assert_eq!(core.remove_process(&"client.0".into(), "exited", t0), 0);
    assert!(effects(&mut core).is_empty());
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
    core.register("echo.2".into(), &"echo".into(), true, "echo.2".into(), t0)
        .expect("registered");
    assert!(
        core.register("echo.2".into(), &"echo".into(), true, "echo.2".into(), t0)
            .is_err(),
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
