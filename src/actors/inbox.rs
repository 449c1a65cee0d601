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
//! inbox too ([`Inbox::route`]): once the Router has registered the inbox,
//! with a method call ([`LocalRouter`]) instead of a [`Route`] message.
//!
//! actix messages must be `Send` and the inbox is not (the queue is
//! thread-local), so it travels to the Router in a [`Handoff`], which only
//! the thread that made it can open.
//!
//! [`Deliver`]: super::messages::Deliver

use actix::Addr;
use bytestring::ByteString;
use std::cell::{Cell, OnceCell};
use std::mem::ManuallyDrop;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::thread::ThreadId;

use super::messages::{Bounce, Envelopes, Route};
use super::pacer::Pacer;
use super::router::{LocalRouter, Router};
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
    /// Where bounced envelopes go (to be answered with an error), and the
    /// child's envelopes while there is no `local` Router.
    router: Addr<Router>,
    /// The Router, once it registered this inbox on its own thread.
    local: OnceCell<LocalRouter>,
    /// The child's batches sent as [`Route`] messages and not yet handled.
    /// While there are any, later batches are mailed too: a method call
    /// would overtake them.
    mailed: Cell<usize>,
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
            id,
            capacity,
            outbox: Rc::downgrade(outbox),
            pacer,
            router,
            local: OnceCell::new(),
            mailed: Cell::new(0),
        }
    }

    /// Hands what the child sent to the Router: with a method call when the
    /// Router is on this thread and none of the child's batches is still in
    /// its mailbox, in a [`Route`] message otherwise. Either way the Router
    /// sees the child's envelopes in the order it wrote them.
    pub(crate) fn route(&self, mut envelopes: Envelopes) {
        if self.mailed.get() == 0
            && let Some(local) = self.local.get()
            && local.route(&self.id, &mut envelopes)
        {
            return;
        }
        self.mailed.set(self.mailed.get() + 1);
        self.router.do_send(Route {
            from: self.id.clone(),
            envelopes,
        });
    }

    /// The Router registered this inbox on its own thread.
    pub(crate) fn link(&self, local: LocalRouter) {
        let _ = self.local.set(local);
    }

    /// The Router handled one of the child's mailed batches.
    pub(crate) fn mail_handled(&self) {
        self.mailed.set(self.mailed.get().saturating_sub(1));
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
        self.router.do_send(Bounce {
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

/// A bridge's inbox on its way to the Router inside `RegisterProcess`: only
/// the thread that made it can take the inbox out. On another thread it
/// yields nothing and the inbox is leaked (a few words per registration),
/// never touched: an `Rc` must not be counted from two threads.
pub struct Handoff(OnThread<Rc<Inbox>>);

impl Handoff {
    pub(crate) fn new(inbox: Rc<Inbox>) -> Self {
        Self(OnThread::new(inbox))
    }

    /// The inbox, on the thread that made the handoff; `None` elsewhere.
    pub(crate) fn take(self) -> Option<Rc<Inbox>> {
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
    use crate::actors::messages::{Deliver, PendingCount, RegisterProcess};
    use crate::actors::metrics_store::MetricsStore;
    use crate::config::BrokerConfig;
    use crate::protocol::EnvelopeCodec;
    use actix::Actor;
    use futures_util::StreamExt;
    use std::time::Duration;
    use tokio::io::DuplexStream;
    use tokio_util::codec::FramedRead;

    /// Never called: processes with an inbox get nothing in `Deliver`s.
    struct NoDeliver;

    impl Actor for NoDeliver {
        type Context = actix::Context<Self>;
    }

    impl actix::Handler<Deliver> for NoDeliver {
        type Result = ();

        fn handle(&mut self, _: Deliver, _: &mut Self::Context) {
            panic!("a process with an inbox got a Deliver");
        }
    }

    /// Registers `id` with an inbox on this thread (the registration is
    /// queued, not awaited); returns the inbox and its child's end of stdin.
    fn register(router: &Addr<Router>, id: &str) -> (Rc<Inbox>, Rc<Outbox>, DuplexStream) {
        let (stdin, child) = tokio::io::duplex(1 << 16);
        let outbox = Rc::new(Outbox::start(stdin, EnvelopeCodec::default()));
        let inbox = Rc::new(Inbox::new(
            id.into(),
            64,
            &outbox,
            Arc::new(Pacer::default()),
            router.clone(),
        ));
        let service = id.split('.').next().unwrap_or(id);
        router.do_send(RegisterProcess {
            ready: true,
            inbox: Some(Handoff::new(Rc::clone(&inbox))),
            ..RegisterProcess::new(id.into(), service.into(), NoDeliver.start().recipient())
        });
        (inbox, outbox, child)
    }

    fn tick(n: u64) -> Envelopes {
        Envelope::event("b.0", format!("t{n}")).into()
    }

    #[actix::test]
    async fn a_registered_inbox_routes_with_a_method_call_and_keeps_the_order() {
        let metrics = MetricsStore::new(Duration::from_secs(60)).start();
        let router = Router::new(BrokerConfig::default(), metrics.recipient()).start();
        let (_b, to_b, b_stdin) = register(&router, "b.0");
        let (a, _to_a, _a_stdin) = register(&router, "a.0");
        let settled = || router.send(PendingCount);

        // Not registered yet: mailed, behind the registration.
        a.route(tick(1));
        a.route(tick(2));
        assert_eq!(a.mailed.get(), 2);
        assert_eq!(to_b.depth(), 0, "not routed yet");
        settled().await.expect("router");
        assert_eq!(a.mailed.get(), 0, "both handled");
        // (The outbox's writer task has written them since.)

        // Registered, nothing in the mailbox: routed before `route` returns.
        let before = to_b.depth();
        a.route(tick(3));
        assert_eq!(to_b.depth(), before + 1, "routed with a method call");
        assert_eq!(a.mailed.get(), 0);

        // A batch of the child's still in the mailbox: mailed behind it,
        // never routed ahead of it.
        a.mailed.set(1);
        a.route(tick(4));
        assert_eq!(to_b.depth(), before + 1, "mailed");
        assert_eq!(a.mailed.get(), 2);
        settled().await.expect("router");
        assert_eq!(a.mailed.get(), 1, "one handled; the other was never sent");
        a.mailed.set(0);
        let before = to_b.depth();
        a.route(tick(5));
        assert_eq!(to_b.depth(), before + 1, "routed with a method call again");

        drop(to_b);
        let frames = FramedRead::new(b_stdin, EnvelopeCodec::default());
        let seen: Vec<String> = frames
            .map(|frame| match frame {
                Ok(Ok(envelope)) => envelope.id.to_string(),
                other => panic!("not an envelope: {other:?}"),
            })
            .collect()
            .await;
        assert_eq!(
            seen,
            ["t1", "t2", "t3", "t4", "t5"],
            "in the order the child wrote them"
        );
    }

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
