//! Where one call's reply is left for the task waiting on it.
//!
//! A service's client lives on one thread, so the hand-over needs no
//! atomics: an `Rc` with a cell for the value and one for the waker. tokio's
//! `oneshot` (an `Arc`, a state word changed by compare-and-swap at send,
//! poll and both drops) was ~700 instructions of the ~4 800 a pipelined call
//! cost the calling process (callgrind, `bench --mode relay`).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

struct Shared<T> {
    value: Cell<Option<T>>,
    waker: Cell<Option<Waker>>,
    /// The sender was dropped without sending.
    closed: Cell<bool>,
}

/// The reader's end: [`send`](Self::send) once, or drop to say no value
/// will come.
pub(crate) struct Sender<T>(Rc<Shared<T>>);

/// The waiting end: resolves to the value, or to `Err(Closed)` when the
/// sender went away without one.
pub(crate) struct Receiver<T>(Rc<Shared<T>>);

/// The sender was dropped without sending.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Closed;

pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Rc::new(Shared {
        value: Cell::new(None),
        waker: Cell::new(None),
        closed: Cell::new(false),
    });
    (Sender(Rc::clone(&shared)), Receiver(shared))
}

impl<T> Sender<T> {
    /// Leaves `value` for the receiver; gives it back if the receiver is
    /// gone (its call was dropped).
    pub(crate) fn send(self, value: T) -> Result<(), T> {
        if Rc::strong_count(&self.0) == 1 {
            return Err(value);
        }
        self.0.value.set(Some(value));
        if let Some(waker) = self.0.waker.take() {
            waker.wake();
        }
        Ok(())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        // After a send the receiver finds the value first; the flag matters
        // only when nothing was sent.
        self.0.closed.set(true);
        if let Some(waker) = self.0.waker.take() {
            waker.wake();
        }
    }
}

impl<T> Future for Receiver<T> {
    type Output = Result<T, Closed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let shared = &self.0;
        if let Some(value) = shared.value.take() {
            return Poll::Ready(Ok(value));
        }
        if shared.closed.get() {
            return Poll::Ready(Err(Closed));
        }
        let waker = match shared.waker.take() {
            Some(waker) if waker.will_wake(cx.waker()) => waker,
            _ => cx.waker().clone(),
        };
        shared.waker.set(Some(waker));
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn a_sent_value_arrives_once() {
        let (tx, rx) = channel();
        assert_eq!(tx.send(7), Ok(()));
        assert_eq!(rx.now_or_never(), Some(Ok(7)));
    }

    #[test]
    fn a_dropped_sender_closes_and_wakes_the_waiting_receiver() {
        let (tx, mut rx) = channel::<u8>();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(Pin::new(&mut rx).poll(&mut cx), Poll::Pending);
        drop(tx);
        assert_eq!(Pin::new(&mut rx).poll(&mut cx), Poll::Ready(Err(Closed)));
    }

    #[test]
    fn sending_to_a_dropped_receiver_gives_the_value_back() {
        let (tx, rx) = channel();
        drop(rx);
        assert_eq!(tx.send("late"), Err("late"));
    }

    #[tokio::test]
    async fn a_value_sent_later_wakes_the_task() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let (tx, rx) = channel();
                tokio::task::spawn_local(async move {
                    tokio::task::yield_now().await;
                    let _ = tx.send(42u32);
                });
                assert_eq!(rx.await, Ok(42));
            })
            .await;
    }
}
