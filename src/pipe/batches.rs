//! Whatever a stream has ready, as one batch.
//!
//! A pipe read at 64 requests in flight brings dozens of frames at once;
//! handing them on as one actor message instead of one each saves a mailbox
//! hop (an allocation, a queue push, a wake-up) per frame. With one request
//! in flight a batch is one item and nothing is gained or lost.

use futures_util::Stream;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Yields `Vec`s of the items `inner` has ready, at most `max` each.
pub struct Batches<S> {
    inner: S,
    max: usize,
    /// The last batch's length: the capacity to start the next one with.
    last: usize,
    done: bool,
}

impl<S> Batches<S> {
    /// Batches of at most `max` (at least 1) items.
    pub fn new(inner: S, max: usize) -> Self {
        Self {
            inner,
            max: max.max(1),
            last: 1,
            done: false,
        }
    }
}

impl<S: Stream + Unpin> Stream for Batches<S> {
    type Item = Vec<S::Item>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Vec<S::Item>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        // Sized like the last batch: under steady load one allocation, not
        // a chain of doublings that copies every item again.
        let mut batch = Vec::with_capacity(this.last);
        while batch.len() < this.max {
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(item)) => batch.push(item),
                Poll::Ready(None) => {
                    this.done = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        this.last = batch.len().max(1);
        if batch.is_empty() {
            if this.done {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        } else {
            Poll::Ready(Some(batch))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[test]
    fn takes_what_is_ready_up_to_max() {
        let mut s = Batches::new(futures_util::stream::iter(0..5), 2);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(s.poll_next_unpin(&mut cx), Poll::Ready(Some(vec![0, 1])));
        assert_eq!(s.poll_next_unpin(&mut cx), Poll::Ready(Some(vec![2, 3])));
        assert_eq!(s.poll_next_unpin(&mut cx), Poll::Ready(Some(vec![4])));
        assert_eq!(s.poll_next_unpin(&mut cx), Poll::Ready(None));
    }
}
