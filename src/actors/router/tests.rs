//! The Router actor with the same-thread fast path: a link and a Rust
//! caller on its thread reach it with method calls, in order.

use actix::prelude::*;
use futures_util::StreamExt;
use std::rc::Rc;
use std::sync::Arc;
use tokio_util::codec::FramedRead;

use super::*;
use crate::actors::messages::Deliver;
use crate::actors::same_thread::{Handoff, Inbox, RouterLink, call_here};
use crate::pipe::Outbox;
use crate::protocol::{EnvelopeCodec, ErrorCode};

/// Takes the Router's metrics batches and drops them.
struct NoMetrics;

impl Actor for NoMetrics {
    type Context = Context<Self>;
}

impl Handler<MetricsBatch> for NoMetrics {
    type Result = ();

    fn handle(&mut self, _: MetricsBatch, _: &mut Self::Context) {}
}

fn router() -> Router {
    Router::new(BrokerConfig::default(), NoMetrics.start().recipient())
}

fn call(target: &str) -> (Call, tokio::sync::oneshot::Receiver<Box<Envelope>>) {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let envelope = Box::new(Envelope::request(target, "Echo", 0));
    (Call { envelope, reply }, answer)
}

#[actix::test]
async fn a_caller_on_the_routers_thread_is_answered_without_a_message() {
    let router = router();
    let key = router.key();
    let (early, _) = call("nobody");
    assert!(call_here(key, early).is_some(), "not started: a message");
    let addr = router.start();
    addr.send(PendingCount).await.expect("started");

    // Routed before `call_here` returns: the reply is already there.
    let (here, mut answer) = call("nobody");
    assert!(call_here(key, here).is_none(), "taken");
    let reply = answer.try_recv().expect("answered at once");
    assert_eq!(reply.error_code(), Some(ErrorCode::UnknownTarget));

    // Another Router, or another thread: given back, to be mailed.
    let (other, _) = call("nobody");
    assert!(call_here(RouterKey(u64::MAX), other).is_some());
    let (elsewhere, _) = call("nobody");
    let back = std::thread::spawn(move || call_here(key, elsewhere).is_some())
        .join()
        .expect("thread");
    assert!(back, "another thread");
}

/// Never called: processes with an inbox get nothing in `Deliver`s.
struct NoDeliver;

impl Actor for NoDeliver {
    type Context = actix::Context<Self>;
}

impl actix::Handler<Deliver> for NoDeliver {
    type Result = ();

    fn handle(&mut self, _: Deliver, _: &mut Self::Context) {
        panic!("a process with an inbox got a Deliver");
    }
}

fn register(router: &Addr<Router>, id: &str, handoff: Handoff) {
    let service = id.split('.').next().unwrap_or(id);
    router.do_send(RegisterProcess {
        ready: true,
        inbox: Some(handoff),
        ..RegisterProcess::new(id.into(), service.into(), NoDeliver.start().recipient())
    });
}

fn tick(n: u64) -> Envelopes {
    Envelope::event("b.0", format!("t{n}")).into()
}

/// `a.0` (a link alone, as an in-process worker has) sends events to
/// `b.0` (a child's inbox, whose stdin the test reads).
#[actix::test]
async fn a_registered_link_routes_with_a_method_call_and_keeps_the_order() {
    let router = router().start();
    let (stdin, b_stdin) = tokio::io::duplex(1 << 16);
    let to_b = Rc::new(Outbox::start(stdin, EnvelopeCodec::default()));
    let b = Rc::new(Inbox::new(
        "b.0".into(),
        64,
        &to_b,
        Arc::new(Pacer::default()),
        router.clone().recipient(),
    ));
    let b_link = Rc::new(RouterLink::new("b.0".into(), router.clone().recipient()));
    register(&router, "b.0", Handoff::child(Rc::clone(&b), b_link));
    let a = Rc::new(RouterLink::new("a.0".into(), router.clone().recipient()));
    register(&router, "a.0", Handoff::link(Rc::clone(&a)));
    let settled = || router.send(PendingCount);

    // Not registered yet: mailed, behind the registration.
    a.route(tick(1));
    a.route(tick(2));
    assert_eq!(a.mailed().get(), 2);
    assert_eq!(to_b.depth(), 0, "not routed yet");
    settled().await.expect("router");
    assert_eq!(a.mailed().get(), 0, "both handled");
    // (The outbox's writer task has written them since.)

    // Registered, nothing in the mailbox: routed before `route` returns.
    let before = to_b.depth();
    a.route(tick(3));
    assert_eq!(to_b.depth(), before + 1, "routed with a method call");
    assert_eq!(a.mailed().get(), 0);

    // A batch still in the mailbox: mailed behind it, never routed
    // ahead of it.
    a.mailed().set(1);
    a.route(tick(4));
    assert_eq!(to_b.depth(), before + 1, "mailed");
    assert_eq!(a.mailed().get(), 2);
    settled().await.expect("router");
    assert_eq!(a.mailed().get(), 1, "one handled; the other was never sent");
    a.mailed().set(0);
    let before = to_b.depth();
    a.route(tick(5));
    assert_eq!(to_b.depth(), before + 1, "routed with a method call again");

    drop(to_b);
    let frames = FramedRead::new(b_stdin, EnvelopeCodec::default());
    let seen: Vec<String> = frames
        .map(|frame| match frame {
            Ok(Ok(envelope)) => envelope.id.to_string(),
            other => panic!("not an envelope: {other:?}"),
        })
        .collect()
        .await;
    assert_eq!(
        seen,
        ["t1", "t2", "t3", "t4", "t5"],
        "in the order they were sent"
    );
    drop(b);
}
