//! Pacing a child's stdout: how much of what it sent still sits in the
//! Router's mailbox, and a gate that stops reading while that is too much.
//!
//! actix mailboxes have no bound (`do_send` ignores capacity), so a child that
//! writes faster than the Router routes would grow the broker's memory without
//! limit (measured: +1.2 GiB in 2 s). Waiting on each `send` would bound
//! it but costs a reply channel per frame and stalls the bridge's mailbox
//! (`ctx.wait`). Instead the bridge adds each envelope's weight here before
//! handing it on, the Router subtracts it when it takes the envelope, and the
//! bridge's stdout stream ([`Paced`]) is not polled while the total is over
//! budget or the child's own outbox is full. The child then blocks on its
//! full pipe: the kernel holds the backlog, not the broker.

use futures_util::Stream;
use futures_util::task::AtomicWaker;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use crate::protocol::Envelope;

/// Bytes (approximately) a child may have in the Router's mailbox.
pub const ROUTER_BUDGET: usize = 1 << 20;

/// Shared by one bridge (adds) and the Router (subtracts). It also carries
/// the bridge's stdin backlog to the Router's stats.
#[derive(Debug, Default)]
pub struct Pacer {
    in_router: AtomicUsize,
    backlog: AtomicUsize,
    parked: AtomicBool,
    waker: AtomicWaker,
}

impl Pacer {
    /// What an envelope counts for: its payload plus a fixed overhead for the
    /// envelope itself (both sides compute it from the same envelope).
    #[inline]
    pub fn weight(envelope: &Envelope) -> usize {
        256 + envelope.payload.as_ref().map_or(0, |p| p.len())
    }

    /// The bridge hands an envelope of `weight` to the Router.
    #[inline]
    pub fn routed(&self, weight: usize) {
        self.in_router.fetch_add(weight, Ordering::Relaxed);
    }

    /// The Router took an envelope of `weight`.
    #[inline]
    pub fn consumed(&self, weight: usize) {
        self.in_router.fetch_sub(weight, Ordering::Relaxed);
        self.wake();
    }

    /// The bridge's stdin backlog: frames not yet written to the child.
    #[inline]
    pub fn set_backlog(&self, frames: usize) {
        self.backlog.store(frames, Ordering::Relaxed);
    }

    /// Frames waiting to be written to the child (stats' `queue_depth`).
    pub fn backlog(&self) -> usize {
        self.backlog.load(Ordering::Relaxed)
    }

    /// Over budget: the reader should wait.
    #[inline]
    pub fn over_budget(&self) -> bool {
        self.in_router.load(Ordering::Relaxed) >= ROUTER_BUDGET
    }

    /// Resumes a parked reader (cheap when none is parked).
    #[inline]
    pub fn wake(&self) {
        if self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    fn park(&self, cx: &Context<'_>) {
        self.waker.register(cx.waker());
        self.parked.store(true, Ordering::Release);
    }
}

/// A stream that is not polled while `closed()` says so. Whoever makes room
/// calls [`Pacer::wake`].
pub struct Paced<S, F> {
    inner: S,
    pacer: Arc<Pacer>,
    closed: F,
}

impl<S, F: Fn() -> bool> Paced<S, F> {
    /// Paces `inner` with `pacer` and an extra condition (`closed() == true`
    /// means wait).
    pub fn new(inner: S, pacer: Arc<Pacer>, closed: F) -> Self {
        Self {
            inner,
            pacer,
            closed,
        }
    }

    fn gated(&self) -> bool {
        self.pacer.over_budget() || (self.closed)()
    }
}

impl<S: Stream + Unpin, F: Fn() -> bool + Unpin> Stream for Paced<S, F> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.get_mut();
        if this.gated() {
            this.pacer.park(cx);
            // Re-check: room may have been made between the test and parking.
            if this.gated() {
                return Poll::Pending;
            }
            this.pacer.parked.store(false, Ordering::Release);
        }
        Pin::new(&mut this.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn waits_while_over_budget_and_resumes_when_consumed() {
        let pacer = Arc::new(Pacer::default());
        let full = Rc::new(Cell::new(false));
        let gate = Rc::clone(&full);
        let mut stream = Paced::new(
            futures_util::stream::iter(0..3),
            Arc::clone(&pacer),
            move || gate.get(),
        );
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(stream.poll_next_unpin(&mut cx), Poll::Ready(Some(0)));
        pacer.routed(ROUTER_BUDGET);
        assert_eq!(stream.poll_next_unpin(&mut cx), Poll::Pending);
        pacer.consumed(ROUTER_BUDGET);
        assert_eq!(stream.poll_next_unpin(&mut cx), Poll::Ready(Some(1)));
        full.set(true);
        assert_eq!(stream.poll_next_unpin(&mut cx), Poll::Pending);
        full.set(false);
        assert_eq!(stream.poll_next_unpin(&mut cx), Poll::Ready(Some(2)));
    }
}
