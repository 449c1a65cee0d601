//! A Rust caller's side of a request in flight through the Router: the
//! guard that cancels it when the caller stops waiting, and the stream of
//! a streaming call's replies.
//!
//! Why a guard: a future dropped before its reply (a `select!` that took
//! another branch, a task aborted, a timeout of the caller's own) would
//! otherwise leave its request running at the worker, holding the
//! worker's slot, with nobody waiting. Dropping the guard before the
//! final reply sends [`CancelCall`]: the worker gets `cancel`.

use actix::prelude::*;
use futures_util::Stream;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

use crate::actors::messages::CancelCall;
use crate::actors::router::Router;
use crate::call::{CallError, Reply};
use crate::protocol::{Envelope, MessageType};

/// Cancels request `correlation_id` at the Router when dropped, unless
/// [`disarm`](Self::disarm)ed first (its final reply came).
pub(crate) struct CancelOnDrop<'a> {
    router: &'a Addr<Router>,
    correlation_id: u64,
    armed: bool,
}

impl<'a> CancelOnDrop<'a> {
    pub(crate) fn new(router: &'a Addr<Router>, correlation_id: u64) -> Self {
        Self {
            router,
            correlation_id,
            armed: true,
        }
    }

    /// The final reply came: nothing to cancel.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.router.do_send(CancelCall(self.correlation_id));
        }
    }
}

/// The replies of a streaming call of the embedding API
/// ([`BrokerHandle::call_stream`](crate::embed::BrokerHandle::call_stream)):
/// each partial reply (`Ok` with [`Reply::is_partial`]), then the final
/// reply or the error that ends it; then `None`. Dropping it before the end
/// cancels the request. Read it promptly: a caller that leaves
/// `queue_capacity` replies unread has its stream cut (`busy`).
pub struct BrokerStream {
    parts: mpsc::Receiver<Box<Envelope>>,
    router: Addr<Router>,
    correlation_id: u64,
    ended: bool,
}

impl BrokerStream {
    pub(crate) fn new(
        parts: mpsc::Receiver<Box<Envelope>>,
        router: Addr<Router>,
        correlation_id: u64,
    ) -> Self {
        Self {
            parts,
            router,
            correlation_id,
            ended: false,
        }
    }

    /// The request's correlation id.
    pub fn correlation_id(&self) -> u64 {
        self.correlation_id
    }
}

impl Stream for BrokerStream {
    type Item = Result<Reply, CallError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.parts.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(Some(Err(CallError::Closed)))
            }
            Poll::Ready(Some(reply)) => {
                let partial = reply.more && reply.kind == MessageType::Response;
                if !partial {
                    self.ended = true;
                }
                Poll::Ready(Some(Reply::from_boxed(reply)))
            }
        }
    }
}

impl Drop for BrokerStream {
    fn drop(&mut self) {
        if !self.ended {
            self.router.do_send(CancelCall(self.correlation_id));
        }
    }
}
