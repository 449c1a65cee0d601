//! A child's inbox: where the envelopes routed to it go, in front of the
//! queue to its stdin.
//!
//! The bridge makes one per incarnation and keeps it; when the Router runs
//! on the bridge's thread (the broker starts them together) the Router's
//! [`Outlet`](super::Outlet) for the child holds it too, and queues each
//! envelope with a method call ([`Inbox::queue`], then [`Inbox::settle`]
//! when the Router's input is handled). A [`Deliver`] message instead costs
//! a mailbox hop per batch: an allocation, a wake-up and a poll of the
//! bridge's context, which polls its stdout stream again for nothing; the
//! bridge's handler hands such a batch to [`Inbox::deliver`]. Either way the
//! same code below decides what is queued, bounced or dropped, so a process
//! behaves the same whichever way its envelopes come.
//!
//! [`Deliver`]: crate::actors::envelopes::Deliver

use actix::Recipient;
use bytestring::ByteString;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use crate::actors::envelopes::{Bounce, Envelopes};
use crate::actors::pacer::Pacer;
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
    /// Where what cannot be queued goes back (the Router, which answers a
    /// bounced request with an error). Always a message: a bounce happens
    /// while the Router is handing the envelope over.
    bounces: Recipient<Bounce>,
}

impl Inbox {
    pub(crate) fn new(
        id: ByteString,
        capacity: usize,
        outbox: &Rc<Outbox>,
        pacer: Arc<Pacer>,
        bounces: Recipient<Bounce>,
    ) -> Self {
        Self {
            id,
            capacity,
            outbox: Rc::downgrade(outbox),
            pacer,
            bounces,
        }
    }

    /// Queues a batch that came in a `Deliver`, bouncing what cannot be
    /// queued.
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
    /// calls [`settle`](Self::settle) when its input is handled).
    #[inline]
    pub(crate) fn queue(&self, envelope: Box<Envelope>) {
        match self.outbox.upgrade() {
            Some(outbox) => self.push(&outbox, envelope),
            None => tracing::debug!(process = %self.id, id = %envelope.id,
                "no child; envelope dropped"),
        }
    }

    /// Frames queued for the child and not yet written.
    #[inline]
    pub(crate) fn depth(&self) -> usize {
        self.outbox.upgrade().map_or(0, |outbox| outbox.depth())
    }

    /// Publishes how deep the queue now is (the process's `queue_depth`
    /// in the Router's stats).
    #[inline]
    pub(crate) fn settle(&self) {
        if let Some(outbox) = self.outbox.upgrade() {
            self.pacer.set_backlog(outbox.depth());
        }
    }

    /// Queues one envelope, or bounces it: `busy` for a request or event
    /// that finds the queue full (replies always go in), `too_large` for one
    /// that no longer fits a frame once its `source` is stamped.
    fn push(&self, outbox: &Outbox, envelope: Box<Envelope>) {
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

    fn bounce(&self, envelope: Box<Envelope>, code: ErrorCode, message: String) {
        self.bounces.do_send(Bounce {
            to: self.id.clone(),
            envelope: *envelope,
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
