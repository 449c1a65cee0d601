//! A child's inbox: where the envelopes routed to it go, in front of the
//! queue to its stdin.
//!
//! The bridge makes one per incarnation and keeps it; when the Router runs
//! on the bridge's thread (the broker starts them together) the Router gets
//! it too, and queues each envelope with a method call. A [`Deliver`]
//! message instead costs a mailbox hop per batch: an allocation, a wake-up
//! and a poll of the bridge's context, which polls its stdout stream again
//! for nothing. Either way the same code below decides what is queued,
//! bounced or dropped, so a process behaves the same whichever way its
//! envelopes come.
//!
//! The other way, what the child writes goes to the Router through the
//! inbox's [`RouterLink`] (module `link`).
//!
//! actix messages must be `Send` and neither the inbox nor a link is (they
//! are thread-local), so they travel to the Router in a [`Handoff`], which
//! only the thread that made it can open.
//!
//! [`Deliver`]: super::messages::Deliver

use actix::Addr;
use bytestring::ByteString;
use std::mem::ManuallyDrop;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::thread::ThreadId;

use super::link::RouterLink;
use super::messages::{Bounce, Envelopes};
use super::pacer::Pacer;
use super::router::Router;
use crate::pipe::{Outbox, OutboxError};
use crate::protocol::{Envelope, ErrorCode, FrameError, MessageType};

/// The inbox of one incarnation of a child.
pub(crate) struct Inbox {
    /// The process id, for messages and bounces.
    id: ByteString,
    /// Requests and events beyond this many queued frames are bounced `busy`.
    capacity: usize,
    /// The queue to the child's stdin. Weak: the incarnation owns it, and
    /// dropping it (the child is gone) closes the pipe; envelopes routed
    /// after that are dropped (its requests get `worker_exited` when the
    /// Router removes the process).
    outbox: Weak<Outbox>,
    /// Carries the queue's depth to the Router's stats.
    pacer: Arc<Pacer>,
    /// The child's way in to the Router; bounced envelopes go there too
    /// (to be answered with an error).
    link: Rc<RouterLink>,
}

impl Inbox {
    pub(crate) fn new(
        id: ByteString,
        capacity: usize,
        outbox: &Rc<Outbox>,
        pacer: Arc<Pacer>,
        router: Addr<Router>,
    ) -> Self {
        Self {
            link: Rc::new(RouterLink::new(id.clone(), router)),
            id,
            capacity,
            outbox: Rc::downgrade(outbox),
            pacer,
        }
    }

    /// The child's way in to the Router.
    pub(crate) fn link(&self) -> &Rc<RouterLink> {
        &self.link
    }

    /// Queues a batch for the child, bouncing what cannot be queued.
    pub(crate) fn deliver(&self, envelopes: Envelopes) {
        let Some(outbox) = self.outbox.upgrade() else {
            // Between incarnations: requests were already failed at removal.
            tracing::debug!(process = %self.id, count = envelopes.len(),
                "no child; envelopes dropped");
            return;
        };
        for envelope in envelopes {
            self.push(&outbox, envelope);
        }
        self.pacer.set_backlog(outbox.depth());
    }

    /// Queues one envelope routed to the child (the Router's way in; it
    /// calls [`settle`](Self::settle) when its message is done).
    pub(crate) fn queue(&self, envelope: Envelope) {
        match self.outbox.upgrade() {
            Some(outbox) => self.push(&outbox, envelope),
            None => tracing::debug!(process = %self.id, id = %envelope.id,
                "no child; envelope dropped"),
        }
    }

    /// Publishes how deep the queue now is (the process's `queue_depth`
    /// in the Router's stats).
    pub(crate) fn settle(&self) {
        if let Some(outbox) = self.outbox.upgrade() {
            self.pacer.set_backlog(outbox.depth());
        }
    }

    /// Queues one envelope, or bounces it: `busy` for a request or event
    /// that finds the queue full (replies always go in), `too_large` for one
    /// that no longer fits a frame once its `source` is stamped.
    fn push(&self, outbox: &Outbox, envelope: Envelope) {
        let is_reply = matches!(envelope.kind, MessageType::Response | MessageType::Error);
        if !is_reply && outbox.depth() >= self.capacity {
            let message = format!(
                "{:?} has {} frames waiting to be read",
                &*self.id, self.capacity
            );
            return self.bounce(envelope, ErrorCode::Busy, message);
        }
        match outbox.push(&envelope) {
            Ok(()) => {}
            Err(OutboxError::TooLarge(e)) if is_reply => {
                // The requester still gets exactly one reply.
                let message = too_large(&envelope, &e);
                let error = Envelope::broker_error_to(
                    envelope.target,
                    envelope.id,
                    envelope.correlation_id,
                    ErrorCode::TooLarge,
                    message,
                );
                let _ = outbox.push(&error);
            }
            Err(OutboxError::TooLarge(e)) => {
                let message = too_large(&envelope, &e);
                self.bounce(envelope, ErrorCode::TooLarge, message);
            }
            // The child is going: its requests get `worker_exited` at removal.
            Err(OutboxError::Closed) => {}
        }
    }

    fn bounce(&self, envelope: Envelope, code: ErrorCode, message: String) {
        self.link.router().do_send(Bounce {
            to: self.id.clone(),
            envelope,
            code,
            message,
        });
    }
}

/// Why an envelope could not be written: the frame the sender wrote was
/// within the limit, but the broker re-encodes it with `source` stamped, and
/// that can add up to 9 + the length of the sender's id (PROTOCOL.md).
fn too_large(envelope: &Envelope, e: &FrameError) -> String {
    format!(
        "{} {:?} from {:?} is too large once the broker stamps its source: {e} \
         (max_frame_bytes; leave 9 + the sender's id length in bytes for the stamp)",
        envelope.kind, &*envelope.id, &*envelope.source
    )
}

/// What a process on the Router's thread gives it inside `RegisterProcess`:
/// its link (its way in) and, for a bridge's child, its inbox. Only the
/// thread that made it can take them out. On another thread it yields
/// nothing and they are leaked (a few words per registration), never
/// touched: an `Rc` must not be counted from two threads.
pub struct Handoff(OnThread<Local>);

/// What a [`Handoff`] carries.
pub(crate) struct Local {
    pub(crate) inbox: Option<Rc<Inbox>>,
    pub(crate) link: Rc<RouterLink>,
}

impl Handoff {
    /// A bridge's child: its inbox, and the inbox's link.
    pub(crate) fn new(inbox: Rc<Inbox>) -> Self {
        let link = Rc::clone(inbox.link());
        Self(OnThread::new(Local {
            inbox: Some(inbox),
            link,
        }))
    }

    /// A process without an inbox (an in-process worker): its link.
    pub(crate) fn link(link: Rc<RouterLink>) -> Self {
        Self(OnThread::new(Local { inbox: None, link }))
    }

    /// What it carries, on the thread that made the handoff; `None`
    /// elsewhere.
    pub(crate) fn take(self) -> Option<Local> {
        self.0.take()
    }
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff").finish_non_exhaustive()
    }
}

/// A value that may travel to other threads but is only ever used or
/// dropped on the one it was made on (elsewhere it is leaked).
struct OnThread<T> {
    value: ManuallyDrop<T>,
    thread: ThreadId,
}

// SAFETY: the value is moved out or dropped only on `thread` (checked in
// `take` and `drop`); on any other thread it is not touched at all.
unsafe impl<T> Send for OnThread<T> {}

impl<T> OnThread<T> {
    fn new(value: T) -> Self {
        Self {
            value: ManuallyDrop::new(value),
            thread: std::thread::current().id(),
        }
    }

    fn take(self) -> Option<T> {
        let mut this = ManuallyDrop::new(self);
        if this.thread != std::thread::current().id() {
            return None;
        }
        // SAFETY: on the owning thread, and `this` is never used or dropped
        // again (it is `ManuallyDrop`), so the value is moved out once.
        Some(unsafe { ManuallyDrop::take(&mut this.value) })
    }
}

impl<T> Drop for OnThread<T> {
    fn drop(&mut self) {
        if self.thread == std::thread::current().id() {
            // SAFETY: on the owning thread, and `drop` runs once.
            unsafe { ManuallyDrop::drop(&mut self.value) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_thread_that_made_it_takes_or_drops_the_value() {
        let value = Rc::new(());
        let here = OnThread::new(Rc::clone(&value));
        assert_eq!(Rc::strong_count(&value), 2);
        assert!(here.take().is_some_and(|v| Rc::ptr_eq(&v, &value)));
        assert_eq!(Rc::strong_count(&value), 1, "taken, then dropped here");

        drop(OnThread::new(Rc::clone(&value)));
        assert_eq!(Rc::strong_count(&value), 1, "dropped on its own thread");

        // Elsewhere it is neither taken nor dropped: its count stays.
        let (taken, dropped) = (
            OnThread::new(Rc::clone(&value)),
            OnThread::new(Rc::clone(&value)),
        );
        let taken_elsewhere = std::thread::spawn(move || {
            let taken = taken.take().is_some();
            drop(dropped);
            taken
        })
        .join()
        .expect("thread");
        assert!(!taken_elsewhere);
        assert_eq!(Rc::strong_count(&value), 3, "both leaked, neither touched");
    }
}
