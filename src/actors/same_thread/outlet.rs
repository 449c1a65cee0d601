//! Router → process: where the Router puts what is routed to one process.
//!
//! A bridge on the Router's thread gave the Router its child's inbox: each
//! envelope is queued there as it is routed ([`Inbox::queue`]), and the
//! inbox publishes its depth when the Router's input is handled. Any other
//! process (an in-process worker, the Broker, a bridge on another thread,
//! another node) has a mailbox: what one input of the Router produced for
//! it is held and goes in one [`Deliver`] at the end, one mailbox hop per
//! destination whatever the form of the input. Holding for an inbox would
//! only move each envelope twice more (and a batch of them spilled its
//! `SmallVec` to the heap): queueing as routed took 2.6 % of the broker's
//! instructions per call with one request in flight.

use actix::Recipient;
use std::rc::Rc;
use std::sync::Arc;

use super::handoff::Handoff;
use super::inbox::Inbox;
use super::link::RouterLink;
use crate::actors::envelopes::{Deliver, Envelopes};
use crate::actors::pacer::Pacer;
use crate::protocol::Envelope;

/// The Router's handle on one process: the way to it, and what else the
/// Router keeps of it (its link, its bridge's pacer).
pub(crate) struct Outlet {
    /// Where a [`Deliver`] goes; also tells whether the process's actor
    /// still runs.
    recipient: Recipient<Deliver>,
    /// Its child's inbox, when its bridge runs on the Router's thread: then
    /// what is routed to it is queued at once, and nothing is held.
    inbox: Option<Rc<Inbox>>,
    /// Envelopes for it, sent when the Router's input is handled (without
    /// an inbox).
    held: Envelopes,
    /// How many the last [`Deliver`] carried: the size to reserve next time.
    last_held: usize,
    /// Its way in, when it runs on the Router's thread.
    link: Option<Rc<RouterLink>>,
    /// Its bridge's read pacing and stdin backlog, for subprocesses.
    pacer: Option<Arc<Pacer>>,
}

impl Outlet {
    /// The outlet of a process reached through `recipient`, with what it
    /// handed over if it runs on this thread.
    pub(crate) fn new(
        recipient: Recipient<Deliver>,
        pacer: Option<Arc<Pacer>>,
        handoff: Option<Handoff>,
    ) -> Self {
        let (inbox, link) = match handoff.and_then(Handoff::take) {
            Some(local) => (local.inbox, Some(local.link)),
            None => (None, None),
        };
        Self {
            recipient,
            inbox,
            held: Envelopes::new(),
            last_held: 0,
            link,
            pacer,
        }
    }

    /// A process reached by mailbox only (another node, a process on
    /// another thread).
    pub(crate) fn mailbox(recipient: Recipient<Deliver>) -> Self {
        Self::new(recipient, None, None)
    }

    /// Queues `envelope` in the inbox, or holds it for the input's
    /// [`Deliver`]; false if the process is gone (its actor stopped).
    #[inline]
    pub(crate) fn put(&mut self, envelope: Box<Envelope>) -> bool {
        if !self.recipient.connected() {
            return false;
        }
        match &self.inbox {
            Some(inbox) => inbox.queue(envelope),
            None => {
                if self.held.is_empty() {
                    // Last time's count is the best guess of this time's: one
                    // allocation instead of a chain of doublings (each a copy).
                    self.held.reserve(self.last_held);
                }
                self.held.push(envelope);
            }
        }
        true
    }

    /// The Router's input is handled: an inbox publishes its new depth
    /// for the stats; a mailbox gets what was held in one [`Deliver`].
    #[inline]
    pub(crate) fn settle(&mut self) {
        if let Some(inbox) = &self.inbox {
            inbox.settle();
        } else if !self.held.is_empty() {
            let envelopes = std::mem::take(&mut self.held);
            self.last_held = envelopes.len();
            self.recipient.do_send(Deliver(envelopes));
        }
    }

    /// Frames waiting in its stdin backlog (0 without a pipe).
    ///
    /// Exact for an inbox on this thread (what is queued in it now); for a
    /// mailbox, what its bridge last published plus what this input holds
    /// for it. A stream to a caller that does not read is cut by it.
    pub(crate) fn queue_depth(&self) -> usize {
        match &self.inbox {
            Some(inbox) => inbox.depth(),
            None => self.pacer.as_ref().map_or(0, |p| p.backlog()) + self.held.len(),
        }
    }

    /// Its bridge's pacer, for subprocesses.
    #[inline]
    pub(crate) fn pacer(&self) -> Option<&Pacer> {
        self.pacer.as_deref()
    }

    /// Its way in to the Router, when it runs on the Router's thread.
    #[inline]
    pub(crate) fn link(&self) -> Option<&Rc<RouterLink>> {
        self.link.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::envelopes::{Bounce, Route};
    use crate::pipe::Outbox;
    use crate::protocol::EnvelopeCodec;
    use actix::{Actor, Context, Handler};
    use std::cell::Cell;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    /// Counts the envelopes that reach it in `Deliver` messages.
    struct Counter(Rc<Cell<usize>>);

    impl Actor for Counter {
        type Context = Context<Self>;
    }

    impl Handler<Deliver> for Counter {
        type Result = ();

        fn handle(&mut self, Deliver(envelopes): Deliver, _: &mut Self::Context) {
            self.0.set(self.0.get() + envelopes.len());
        }
    }

    /// Takes bounces (none come here).
    struct Bounces;

    impl Actor for Bounces {
        type Context = Context<Self>;
    }

    impl Handler<Bounce> for Bounces {
        type Result = ();

        fn handle(&mut self, _: Bounce, _: &mut Self::Context) {}
    }

    /// Takes `Route`s and does nothing with them.
    struct NoRouter;

    impl Actor for NoRouter {
        type Context = Context<Self>;
    }

    impl Handler<Route> for NoRouter {
        type Result = ();

        fn handle(&mut self, _: Route, _: &mut Self::Context) {}
    }

    /// The outlet of `echo.0`; with an inbox on this thread if `local`.
    /// Returns it, the child's outbox and pacer, the count of what came in
    /// `Deliver`s, and the child's end of its stdin.
    fn outlet(
        local: bool,
    ) -> (
        Outlet,
        Rc<Outbox>,
        Arc<Pacer>,
        Rc<Cell<usize>>,
        tokio::io::DuplexStream,
    ) {
        let (stdin, child) = tokio::io::duplex(1 << 16);
        let outbox = Rc::new(Outbox::start(stdin, EnvelopeCodec::default()));
        let pacer = Arc::new(Pacer::default());
        let inbox = Rc::new(Inbox::new(
            "echo.0".into(),
            8,
            &outbox,
            Arc::clone(&pacer),
            Bounces.start().recipient(),
        ));
        let delivered = Rc::new(Cell::new(0));
        let recipient = Counter(Rc::clone(&delivered)).start().recipient();
        let link = Rc::new(RouterLink::new(
            "echo.0".into(),
            NoRouter.start().recipient(),
        ));
        let outlet = Outlet::new(recipient, None, local.then(|| Handoff::child(inbox, link)));
        (outlet, outbox, pacer, delivered, child)
    }

    #[actix::test]
    async fn a_local_inbox_is_queued_to_without_a_message() {
        let (mut outlet, outbox, pacer, delivered, mut child) = outlet(true);
        let event = Envelope::event("echo.0", "tick");
        for _ in 0..2 {
            assert!(outlet.put(event.clone().into()));
        }
        assert_eq!(outbox.depth(), 2, "queued as routed: nothing is held");
        assert_eq!(
            pacer.backlog(),
            0,
            "the backlog is set when the message ends"
        );
        outlet.settle();
        assert_eq!(pacer.backlog(), 2);
        let mut frame = vec![0; 2 * (4 + event.encoded_len())];
        child
            .read_exact(&mut frame)
            .await
            .expect("the child reads it");
        actix::clock::sleep(Duration::from_millis(10)).await;
        assert_eq!(delivered.get(), 0, "no Deliver message");
    }

    #[actix::test]
    async fn without_an_inbox_envelopes_go_in_a_deliver_message() {
        let (mut outlet, outbox, _, delivered, _child) = outlet(false);
        assert!(outlet.put(Envelope::event("echo.0", "tick").into()));
        outlet.settle();
        actix::clock::sleep(Duration::from_millis(10)).await;
        assert_eq!(delivered.get(), 1);
        assert_eq!(outbox.depth(), 0);
    }
}
