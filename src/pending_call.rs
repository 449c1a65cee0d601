//! A call of the embedding API whose correlation id is known before its
//! reply, and that can be cancelled while its caller still waits.
//!
//! [`BrokerHandle::call_envelope`](crate::embed::BrokerHandle::call_envelope)
//! hides the correlation id, and the only way to cancel it is to drop it,
//! after which nobody sees the `cancelled` reply. A caller that must name
//! the request (to match the `cancel` its worker was sent, or a log line)
//! or that wants to see the broker's answer to its cancel uses
//! [`BrokerHandle::start_call`](crate::embed::BrokerHandle::start_call).

use actix::prelude::*;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::oneshot;

use crate::actors::messages::CancelCall;
use crate::actors::router::Router;
use crate::call::{CallError, Reply};
use crate::protocol::Envelope;

/// A request in flight through the Router. Resolves to its one reply, like
/// `call_envelope`. Dropping it before the reply cancels the request.
pub struct PendingCall {
    answer: oneshot::Receiver<Box<Envelope>>,
    router: Addr<Router>,
    correlation_id: u64,
    answered: bool,
}

impl PendingCall {
    pub(crate) fn new(
        answer: oneshot::Receiver<Box<Envelope>>,
        router: Addr<Router>,
        correlation_id: u64,
    ) -> Self {
        Self {
            answer,
            router,
            correlation_id,
            answered: false,
        }
    }

    /// The request's correlation id: the one its worker sees, and names in
    /// the `cancel` it may be sent.
    pub fn correlation_id(&self) -> u64 {
        self.correlation_id
    }

    /// Cancels the request and keeps waiting: the reply is then the error
    /// `cancelled` (from the broker), unless the worker's reply reached the
    /// broker first. Its worker is sent `cancel` with reason `cancelled`.
    pub fn cancel(&self) {
        self.router.do_send(CancelCall(self.correlation_id));
    }
}

impl Future for PendingCall {
    type Output = Result<Reply, CallError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.answer).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(answer) => {
                self.answered = true;
                Poll::Ready(Reply::from_boxed(answer.map_err(|_| CallError::Closed)?))
            }
        }
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        if !self.answered {
            self.router.do_send(CancelCall(self.correlation_id));
        }
    }
}
