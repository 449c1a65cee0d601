//! A service's side of the broker: calls to other services, and events.

use bytestring::ByteString;
use serde::Serialize;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::oneshot;

use crate::call::{CallError, Reply};
use crate::names::BROKER;
use crate::pipe::{Outbox, OutboxError};
use crate::protocol::{Envelope, ErrorCode};

/// A call's deadline when the caller sets none (the broker's default too).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How much longer than its deadline a call waits for the broker's
/// `timeout` reply before giving up on its own.
const GRACE: Duration = Duration::from_secs(1);

struct Inner {
    id: ByteString,
    outbox: Outbox,
    pending: RefCell<HashMap<u64, oneshot::Sender<Envelope>, foldhash::fast::RandomState>>,
    next_id: Cell<u64>,
    /// Stdin is closed: no reply can come, so no call is made any more.
    deaf: Cell<bool>,
    /// The broker said `shutdown`: calls in flight finish, no new ones.
    stopping: Cell<bool>,
}

/// What handlers use to reach the broker: [`call`](Self::call) another
/// service, send an [`event`](Self::event). Cheap to clone; local to the
/// service's thread.
#[derive(Clone)]
pub struct Client {
    inner: Rc<Inner>,
}

/// Removes a call's pending entry however the call ends (reply, deadline,
/// or the caller dropping the future).
struct PendingGuard<'a> {
    inner: &'a Inner,
    correlation_id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.inner.pending.borrow_mut().remove(&self.correlation_id);
    }
}

impl Client {
    pub(crate) fn new(id: ByteString, outbox: Outbox) -> Self {
        Self {
            inner: Rc::new(Inner {
                id,
                outbox,
                pending: RefCell::default(),
                next_id: Cell::new(0),
                deaf: Cell::new(false),
                stopping: Cell::new(false),
            }),
        }
    }

    /// This process's id (`PROCBROKER_PROCESS_ID`).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Calls `method` of `target` (a service, a process id, or `broker`) and
    /// waits for its one reply, with the default deadline (30 s).
    pub async fn call<P: Serialize + ?Sized>(
        &self,
        target: &str,
        method: &str,
        payload: &P,
    ) -> Result<Reply, CallError> {
        self.call_with_timeout(target, method, payload, DEFAULT_CALL_TIMEOUT)
            .await
    }

    /// [`call`](Self::call) with a deadline, which the broker enforces
    /// (`timeout_ms`): past it the reply is an error with code `timeout`.
    pub async fn call_with_timeout<P: Serialize + ?Sized>(
        &self,
        target: &str,
        method: &str,
        payload: &P,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let request = Envelope::request(target, method, 0).with_payload(payload)?;
        self.call_envelope(request, timeout).await
    }

    /// Sends a request built by hand (its `correlation_id` and `timeout_ms`
    /// are set here) and waits for the reply.
    pub async fn call_envelope(
        &self,
        mut request: Envelope,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let inner = &*self.inner;
        if inner.deaf.get() || inner.stopping.get() {
            return Err(CallError::Closed);
        }
        let correlation_id = inner.next_id.get().wrapping_add(1);
        inner.next_id.set(correlation_id);
        request.correlation_id = correlation_id;
        request.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        let (tx, rx) = oneshot::channel();
        inner.pending.borrow_mut().insert(correlation_id, tx);
        let _guard = PendingGuard {
            inner,
            correlation_id,
        };
        match inner.outbox.push(&request) {
            Ok(()) => {}
            Err(OutboxError::Closed) => return Err(CallError::Closed),
            Err(OutboxError::TooLarge(e)) => {
                return Err(CallError::Remote {
                    code: ErrorCode::TooLarge.as_str().into(),
                    message: e.to_string(),
                    source_id: inner.id.to_string(),
                });
            }
        }
        match tokio::time::timeout(timeout.saturating_add(GRACE), rx).await {
            Ok(Ok(reply)) => Reply::from_envelope(reply),
            // Stdin closed: no reply can come any more.
            Ok(Err(_)) => Err(CallError::Closed),
            Err(_) => Err(CallError::NoReply(timeout.saturating_add(GRACE))),
        }
    }

    /// Sends event `name` to `target` (a process, a service: all its workers,
    /// or `*`: every process).
    pub fn event<P: Serialize + ?Sized>(
        &self,
        target: &str,
        name: &str,
        payload: &P,
    ) -> Result<(), CallError> {
        let event = Envelope::event(target, name).with_payload(payload)?;
        self.send(&event)
    }

    /// Calls in flight (waiting for their reply).
    pub fn pending_calls(&self) -> usize {
        self.inner.pending.borrow().len()
    }

    pub(crate) fn send(&self, envelope: &Envelope) -> Result<(), CallError> {
        self.inner.outbox.push(envelope).map_err(|e| match e {
            OutboxError::Closed => CallError::Closed,
            OutboxError::TooLarge(e) => CallError::Remote {
                code: ErrorCode::TooLarge.as_str().into(),
                message: e.to_string(),
                source_id: self.inner.id.to_string(),
            },
        })
    }

    pub(crate) fn ready(&self) -> Result<(), CallError> {
        self.send(&Envelope::event(BROKER, "ready"))
    }

    /// A reply to one of our calls; false if it matches none (late, or not ours).
    pub(crate) fn complete(&self, reply: Envelope) -> bool {
        let waiter = self
            .inner
            .pending
            .borrow_mut()
            .remove(&reply.correlation_id);
        match waiter {
            Some(tx) => tx.send(reply).is_ok(),
            None => false,
        }
    }

    /// The broker sent `shutdown`: calls in flight may still be answered,
    /// new ones fail with `Closed` at once (PROTOCOL.md: no new requests
    /// after `shutdown`).
    pub(crate) fn stop_calling(&self) {
        self.inner.stopping.set(true);
    }

    /// Stdin is closed: every call in flight fails with `Closed`, and so
    /// does every call made from now on (no reply could reach it).
    pub(crate) fn fail_pending(&self) {
        self.inner.deaf.set(true);
        self.inner.pending.borrow_mut().clear();
    }

    pub(crate) fn outbox(&self) -> &Outbox {
        &self.inner.outbox
    }
}
