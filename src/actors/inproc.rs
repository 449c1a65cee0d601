//! In-process workers: a service backed by Rust handlers instead of a child.
//!
//! Each worker is an actor with a process id (`calc.0`) registered with the
//! Router like any subprocess, so round-robin, queue bounds, timeouts and
//! metrics treat both the same. Requests run concurrently as futures on the
//! worker's arbiter; a handler that panics yields an `internal` error reply
//! instead of taking the worker down (a panicking actix actor is never
//! restarted).

use actix::prelude::*;
use bytestring::ByteString;
use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;

use super::router::{Deliver, Route, Router};
use crate::protocol::{Envelope, ErrorCode, MessageType};
use crate::service::{HandlerError, Methods, reply_for};

/// One in-process worker.
pub struct InProcessWorker {
    id: ByteString,
    methods: Rc<Methods>,
    router: Addr<Router>,
}

impl InProcessWorker {
    /// A worker `id` serving `methods`, replying through `router`.
    pub fn new(id: ByteString, methods: Rc<Methods>, router: Addr<Router>) -> Self {
        Self {
            id,
            methods,
            router,
        }
    }
}

impl Actor for InProcessWorker {
    type Context = Context<Self>;
}

impl Handler<Deliver> for InProcessWorker {
    type Result = ();

    fn handle(&mut self, Deliver(envelope): Deliver, ctx: &mut Self::Context) {
        match envelope.kind {
            MessageType::Request => {
                // Only what the reply needs is kept; the payload goes to the handler.
                let address = Envelope {
                    payload: None,
                    ..envelope.clone()
                };
                let methods = Rc::clone(&self.methods);
                let started =
                    std::panic::catch_unwind(AssertUnwindSafe(|| methods.dispatch(envelope)));
                let router = self.router.clone();
                let id = self.id.clone();
                ctx.spawn(
                    async move {
                        let result = match started {
                            Ok(future) => AssertUnwindSafe(future).catch_unwind().await,
                            Err(panic) => Err(panic),
                        };
                        let result = result.unwrap_or_else(|_| {
                            tracing::error!(process = %id, method = %address.id, "handler panicked");
                            Err(HandlerError::broker(ErrorCode::Internal, "the handler panicked"))
                        });
                        router.do_send(Route {
                            from: id,
                            envelope: reply_for(&address, result),
                        });
                    }
                    .into_actor(self),
                );
            }
            MessageType::Event => self.methods.event(envelope),
            // In-process workers send no requests, so they expect no replies.
            MessageType::Response | MessageType::Error => {}
        }
    }
}
