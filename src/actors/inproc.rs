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
use crate::protocol::{ErrorCode, MessageType};
use crate::service::{HandlerError, HandlerResult, Methods, ReplyAddress};

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

impl InProcessWorker {
    /// Sends the reply; a panic (caught) becomes an `internal` error.
    fn answer(&self, address: ReplyAddress, result: std::thread::Result<HandlerResult>) {
        let result = result.unwrap_or_else(|_| {
            tracing::error!(process = %self.id, "handler panicked");
            Err(HandlerError::broker(
                ErrorCode::Internal,
                "the handler panicked",
            ))
        });
        self.router.do_send(Route {
            from: self.id.clone(),
            envelope: address.reply(result),
        });
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
                let address = ReplyAddress::of(&envelope);
                let methods = Rc::clone(&self.methods);
                // A handler that is ready at once (most are) is answered now;
                // only one that waits is spawned into the worker's context.
                let started = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    let mut future = methods.dispatch(envelope);
                    match (&mut future).now_or_never() {
                        Some(result) => Ok(result),
                        None => Err(future),
                    }
                }));
                match started {
                    Ok(Ok(result)) => self.answer(address, Ok(result)),
                    Ok(Err(future)) => {
                        ctx.spawn(
                            AssertUnwindSafe(future)
                                .catch_unwind()
                                .into_actor(self)
                                .map(move |result, worker, _| worker.answer(address, result)),
                        );
                    }
                    Err(panic) => self.answer(address, Err(panic)),
                }
            }
            MessageType::Event => self.methods.event(envelope),
            // In-process workers send no requests, so they expect no replies.
            MessageType::Response | MessageType::Error => {}
        }
    }
}
