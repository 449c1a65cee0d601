//! A process's way in to the Router: what it sends goes through its link.
//!
//! A process on the Router's thread (a bridge's child, an in-process
//! worker) hands its envelopes over with a method call ([`LocalRouter`])
//! once the Router has registered it: no mailbox hop, no wake-up of the
//! Router's task. Before that, from another thread, or while any of its
//! batches still waits in the Router's mailbox, they go in a [`Route`]
//! message; a method call then would overtake the mailed batches, and a
//! process's envelopes must reach the Router in the order it sent them.

use actix::Addr;
use bytestring::ByteString;
use std::cell::{Cell, OnceCell};

use super::messages::{Envelopes, Route};
use super::router::{LocalRouter, Router};

/// The way in to the Router of one process (one incarnation of a child).
pub(crate) struct RouterLink {
    /// The process id: the `from` of what it routes.
    id: ByteString,
    router: Addr<Router>,
    /// The Router, once it registered this link on its own thread.
    local: OnceCell<LocalRouter>,
    /// Batches sent as [`Route`] messages and not yet handled.
    mailed: Cell<usize>,
}

impl RouterLink {
    pub(crate) fn new(id: ByteString, router: Addr<Router>) -> Self {
        Self {
            id,
            router,
            local: OnceCell::new(),
            mailed: Cell::new(0),
        }
    }

    /// The Router's address (for the messages that are not envelopes).
    pub(crate) fn router(&self) -> &Addr<Router> {
        &self.router
    }

    /// Hands what the process sent to the Router: with a method call when
    /// the Router is on this thread and none of the process's batches is
    /// still in its mailbox, in a [`Route`] message otherwise.
    pub(crate) fn route(&self, mut envelopes: Envelopes) {
        if self.mailed.get() == 0
            && let Some(local) = self.local.get()
            && local.route(&self.id, &mut envelopes)
        {
            return;
        }
        self.mailed.set(self.mailed.get() + 1);
        self.router.do_send(Route {
            from: self.id.clone(),
            envelopes,
        });
    }

    /// The Router registered this link on its own thread.
    pub(crate) fn connect(&self, local: LocalRouter) {
        let _ = self.local.set(local);
    }

    /// The Router handled one of the mailed batches.
    pub(crate) fn mail_handled(&self) {
        self.mailed.set(self.mailed.get().saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::inbox::{Handoff, Inbox};
    use crate::actors::messages::{Deliver, PendingCount, RegisterProcess};
    use crate::actors::metrics_store::MetricsStore;
    use crate::actors::pacer::Pacer;
    use crate::config::BrokerConfig;
    use crate::pipe::Outbox;
    use crate::protocol::{Envelope, EnvelopeCodec};
    use actix::Actor;
    use futures_util::StreamExt;
    use std::rc::Rc;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio_util::codec::FramedRead;

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
        let metrics = MetricsStore::new(Duration::from_secs(60)).start();
        let router = Router::new(BrokerConfig::default(), metrics.recipient()).start();
        let (stdin, b_stdin) = tokio::io::duplex(1 << 16);
        let to_b = Rc::new(Outbox::start(stdin, EnvelopeCodec::default()));
        let b = Rc::new(Inbox::new(
            "b.0".into(),
            64,
            &to_b,
            Arc::new(Pacer::default()),
            router.clone(),
        ));
        register(&router, "b.0", Handoff::new(Rc::clone(&b)));
        let a = Rc::new(RouterLink::new("a.0".into(), router.clone()));
        register(&router, "a.0", Handoff::link(Rc::clone(&a)));
        let settled = || router.send(PendingCount);

        // Not registered yet: mailed, behind the registration.
        a.route(tick(1));
        a.route(tick(2));
        assert_eq!(a.mailed.get(), 2);
        assert_eq!(to_b.depth(), 0, "not routed yet");
        settled().await.expect("router");
        assert_eq!(a.mailed.get(), 0, "both handled");
        // (The outbox's writer task has written them since.)

        // Registered, nothing in the mailbox: routed before `route` returns.
        let before = to_b.depth();
        a.route(tick(3));
        assert_eq!(to_b.depth(), before + 1, "routed with a method call");
        assert_eq!(a.mailed.get(), 0);

        // A batch still in the mailbox: mailed behind it, never routed
        // ahead of it.
        a.mailed.set(1);
        a.route(tick(4));
        assert_eq!(to_b.depth(), before + 1, "mailed");
        assert_eq!(a.mailed.get(), 2);
        settled().await.expect("router");
        assert_eq!(a.mailed.get(), 1, "one handled; the other was never sent");
        a.mailed.set(0);
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
    }
}
