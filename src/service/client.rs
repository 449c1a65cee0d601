//! A service's side of the broker: calls to other services, and events.

use bytestring::ByteString;
use serde::Serialize;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use super::reply_slot;
use crate::call::{CallError, Reply};
use crate::names::BROKER;
use crate::pipe::{Outbox, OutboxError};
use crate::protocol::{Envelope, ErrorCode};

/// A call's deadline when the caller sets none (the broker's default too).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How much longer than its deadline a call waits for the broker's
/// `timeout` reply before giving up on its own.
const GRACE: Duration = Duration::from_secs(1);
/// How often the sweeper looks for calls past their deadline and grace.
const SWEEP: Duration = Duration::from_millis(250);

/// A call waiting for its reply.
struct Waiting {
    reply: reply_slot::Sender<Result<Envelope, CallError>>,
    /// Past this, the call gives up on its own with `NoReply`.
    give_up: Instant,
    /// Its deadline plus the grace, for the error.
    waited: Duration,
}

struct Inner {
    id: ByteString,
    outbox: Outbox,
    pending: RefCell<HashMap<u64, Waiting, foldhash::fast::RandomState>>,
    /// The sweeper task runs (while calls are pending).
    sweeping: Cell<bool>,
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
                sweeping: Cell::new(false),
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
        request: Envelope,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let (reply, _guard) = match self.submit(request, timeout) {
            Ok(sent) => sent,
            Err(e) => {
                // A call that fails at once still spends the task's budget, so
                // a handler looping on calls yields now and then: after EOF the
                // serve loop must get its turn to end the process (its grace
                // period is a timer), not wait for a million failed calls.
                tokio::task::consume_budget().await;
                return Err(e);
            }
        };
        match reply.await {
            Ok(Ok(reply)) => Reply::from_envelope(reply),
            // The sweeper gave up on it (NoReply).
            Ok(Err(e)) => Err(e),
            // Stdin closed: no reply can come any more.
            Err(_) => Err(CallError::Closed),
        }
    }

    /// Registers `request` as pending and queues it: the slot its reply
    /// will arrive in, and the guard that unregisters it (on any exit, a
    /// cancelled call included). Fails at once when no reply could come or
    /// the request cannot be sent.
    #[inline]
    fn submit(
        &self,
        mut request: Envelope,
        timeout: Duration,
    ) -> Result<
        (
            reply_slot::Receiver<Result<Envelope, CallError>>,
            PendingGuard<'_>,
        ),
        CallError,
    > {
        let inner = &*self.inner;
        if inner.deaf.get() || inner.stopping.get() {
            return Err(CallError::Closed);
        }
        let correlation_id = inner.next_id.get().wrapping_add(1);
        inner.next_id.set(correlation_id);
        request.correlation_id = correlation_id;
        request.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        let (tx, rx) = reply_slot::channel();
        let waited = timeout.saturating_add(GRACE);
        let give_up = Instant::now()
            .checked_add(waited)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
        inner.pending.borrow_mut().insert(
            correlation_id,
            Waiting {
                reply: tx,
                give_up,
                waited,
            },
        );
        self.sweep_later();
        let guard = PendingGuard {
            inner,
            correlation_id,
        };
        match inner.outbox.push(&request) {
            Ok(()) => Ok((rx, guard)),
            Err(OutboxError::Closed) => Err(CallError::Closed),
            Err(OutboxError::TooLarge(e)) => Err(CallError::Remote {
                code: ErrorCode::TooLarge.as_str().into(),
                message: e.to_string(),
                source_id: inner.id.to_string(),
            }),
        }
    }

    /// Starts the sweeper unless it runs: one task for every call's last
    /// resort deadline, instead of a timer per call (a timer wheel entry
    /// set and cleared per call was ~15 % of a calling service's CPU). It
    /// ends when no call is pending, or when the client is gone.
    fn sweep_later(&self) {
        if self.inner.sweeping.replace(true) {
            return;
        }
        let inner: Weak<Inner> = Rc::downgrade(&self.inner);
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(SWEEP).await;
                let Some(inner) = inner.upgrade() else { return };
                let now = Instant::now();
                let mut pending = inner.pending.borrow_mut();
                let late: Vec<u64> = pending
                    .iter()
                    .filter(|(_, w)| w.give_up <= now)
                    .map(|(&id, _)| id)
                    .collect();
                for id in late {
                    if let Some(w) = pending.remove(&id) {
                        let _ = w.reply.send(Err(CallError::NoReply(w.waited)));
                    }
                }
                if pending.is_empty() {
                    inner.sweeping.set(false);
                    return;
                }
            }
        });
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
            Some(w) => w.reply.send(Ok(reply)).is_ok(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipe::outbox_tests::run;
    use crate::protocol::EnvelopeCodec;

    /// A client `c.0` whose frames go nowhere.
    fn sink_client() -> Client {
        Client::new(
            "c.0".into(),
            Outbox::start(tokio::io::sink(), EnvelopeCodec::default()),
        )
    }

    #[test]
    fn an_unanswered_call_gives_up_after_its_deadline_and_grace() {
        run(async {
            let client = sink_client();
            let started = Instant::now();
            let error = client
                .call_with_timeout("nowhere", "M", &(), Duration::from_millis(10))
                .await
                .expect_err("nobody answers");
            let waited = Duration::from_millis(10) + GRACE;
            assert!(
                matches!(error, CallError::NoReply(d) if d == waited),
                "{error}"
            );
            assert!(started.elapsed() >= waited);
            assert_eq!(client.pending_calls(), 0);
            // The sweeper stopped with nothing left to watch.
            tokio::time::sleep(SWEEP * 2).await;
            assert!(!client.inner.sweeping.get());
        });
    }

    #[test]
    fn a_reply_completes_its_call_and_only_its_call() {
        run(async {
            let client = sink_client();
            let calls = (0..2).map(|_| {
                let client = client.clone();
                tokio::task::spawn_local(async move { client.call("s", "M", &()).await })
            });
            let calls: Vec<_> = calls.collect();
            tokio::task::yield_now().await;
            assert_eq!(client.pending_calls(), 2);
            let reply = Envelope::request("c.0", "M", 2)
                .with_source("s.0")
                .response(None);
            assert!(client.complete(reply.clone()));
            assert!(!client.complete(reply), "a second reply matches nothing");
            client.fail_pending();
            let mut results = Vec::new();
            for call in calls {
                results.push(call.await.expect("task"));
            }
            assert!(matches!(results[0], Err(CallError::Closed)));
            assert!(results[1].is_ok());
        });
    }

    #[test]
    fn calls_that_fail_at_once_still_let_other_tasks_run() {
        run(async {
            let client = sink_client();
            client.fail_pending();
            // A handler that loops on calls after EOF (as the bench client's
            // lanes do): each call fails at once.
            const CALLS: u32 = 100_000;
            let made = Rc::new(std::cell::Cell::new(0u32));
            let lane = {
                let (client, made) = (client.clone(), Rc::clone(&made));
                tokio::task::spawn_local(async move {
                    for _ in 0..CALLS {
                        let result = client.call("s", "M", &()).await;
                        assert!(matches!(result, Err(CallError::Closed)));
                        made.set(made.get() + 1);
                    }
                })
            };
            tokio::task::yield_now().await;
            // This task ran again long before the loop was done.
            let seen = made.get();
            assert!(seen > 0 && seen < CALLS, "{seen} calls before a yield");
            lane.await.expect("lane");
            assert_eq!(made.get(), CALLS);
        });
    }
}
