//! In-process workers: a service backed by Rust handlers instead of a child.
//!
//! Each worker is an actor with a process id (`calc.0`) registered with the
//! Router like any subprocess, so round-robin, queue bounds, timeouts and
//! metrics treat both the same. Its replies go to the Router through a
//! `RouterLink`: a method call when both share a thread (the embedding
//! API starts them on one arbiter), a `Route` message otherwise. Requests
//! run concurrently as futures on the worker's arbiter; a handler that
//! panics yields an `internal` error reply instead of taking the worker
//! down (a panicking actix actor is never restarted).

use actix::prelude::*;
use bytestring::ByteString;
use std::rc::Rc;

use super::envelopes::Envelopes;
use super::messages::{Deliver, Route};
use super::same_thread::{Handoff, RouterLink};
use crate::protocol::{Envelope, MessageType};
use crate::service::{BoxedAnswer, Methods};

/// One in-process worker.
pub struct InProcessWorker {
    id: ByteString,
    methods: Rc<Methods>,
    link: Rc<RouterLink>,
}

impl InProcessWorker {
    /// A worker `id` serving `methods`, replying through `router` (the
    /// Router's address, or any recipient of its `Route`s).
    pub fn new(id: ByteString, methods: Rc<Methods>, router: impl Into<Recipient<Route>>) -> Self {
        Self {
            link: Rc::new(RouterLink::new(id.clone(), router.into())),
            id,
            methods,
        }
    }

    /// Its way in to the Router, for `RegisterProcess::inbox`: with it,
    /// a worker registered on the Router's thread replies with a method
    /// call instead of a message.
    pub fn handoff(&self) -> Handoff {
        Handoff::link(Rc::clone(&self.link))
    }

    fn send(&self, reply: impl Into<Envelopes>) {
        self.link.route(reply.into());
    }
}

impl Actor for InProcessWorker {
    type Context = Context<Self>;
}

impl Handler<Deliver> for InProcessWorker {
    type Result = ();

    fn handle(&mut self, Deliver(envelopes): Deliver, ctx: &mut Self::Context) {
        for envelope in envelopes {
            self.take(envelope, ctx);
        }
    }
}

impl InProcessWorker {
    fn take(&mut self, envelope: Box<Envelope>, ctx: &mut Context<Self>) {
        match envelope.kind {
            // A handler that is ready at once (most are) is answered now,
            // in the request's box; only one that waits is spawned into the
            // worker's context.
            MessageType::Request => match self.methods.answer_boxed(envelope, &self.id) {
                BoxedAnswer::Now(reply) => self.send(reply),
                BoxedAnswer::Later(future) => {
                    ctx.spawn(
                        future
                            .into_actor(self)
                            .map(|reply, worker, _| worker.send(reply)),
                    );
                }
            },
            MessageType::Event => self.methods.event(*envelope),
            // In-process workers send no requests, so they expect no replies.
            MessageType::Response | MessageType::Error => {}
        }
    }
}
