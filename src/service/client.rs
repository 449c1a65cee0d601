//! A service's side of the broker: calls to other services, and events.

use bytestring::ByteString;
use futures_util::Stream;
use serde::Serialize;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

use super::reply_slot;
use crate::call::{CallError, Reply};
use crate::names::BROKER;
use crate::pipe::{Outbox, OutboxError};
use crate::protocol::{Envelope, ErrorCode, MessageType, RequestKey};

/// A call's deadline when the caller sets none (the broker's default too).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How much longer than its deadline a call waits for the broker's
/// `timeout` reply before giving up on its own.
const GRACE: Duration = Duration::from_secs(1);
/// How often the sweeper looks for calls past their deadline and grace.
const SWEEP: Duration = Duration::from_millis(250);

/// How many partial replies a [`ReplyStream`] holds unread before the call
/// is cut (cancelled, and ended with `busy`): the reader must keep up.
pub const STREAM_BUFFER: usize = 1000;

/// A call's deadline and routing key.
///
/// ```
/// use procbroker::service::CallOptions;
/// use std::time::Duration;
///
/// let options = CallOptions::new().timeout(Duration::from_secs(2)).key("session-42");
/// ```
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    timeout: Option<Duration>,
    key: Option<ByteString>,
}

impl CallOptions {
    /// The defaults: a deadline of [`DEFAULT_CALL_TIMEOUT`], no key.
    pub fn new() -> Self {
        Self::default()
    }

    /// The call's deadline, sent as `timeout_ms`: the broker answers
    /// `timeout` past it (and cancels the request at its worker).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The routing key (`key`, at most 256 bytes): calls to a service name
    /// with the same key reach the same worker while its set of ready
    /// workers is unchanged. A longer key fails the call at once with
    /// `bad_request`.
    pub fn key(mut self, key: impl Into<ByteString>) -> Self {
        self.key = Some(key.into());
        self
    }

    fn deadline(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_CALL_TIMEOUT)
    }
}

/// Where a call's reply goes: one reply, or a stream of partial replies
/// and a final one.
enum Slot {
    /// Boxed: from the read batch to the waiting call, a reply changes
    /// hands four times, and a box moves as one pointer.
    One(reply_slot::Sender<Result<Box<Envelope>, CallError>>),
    Stream(StreamSender),
}

impl Slot {
    /// Hands over the final reply (or the call's failure).
    fn finish(self, result: Result<Box<Envelope>, CallError>) -> bool {
        match self {
            Self::One(reply) => reply.send(result).is_ok(),
            Self::Stream(stream) => {
                stream.push(result);
                true
            }
        }
    }
}

/// A call waiting for its reply.
struct Waiting {
    reply: Slot,
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
    /// Woken after each write of the outbox, once something waits for it
    /// to drain (`watching_writes`).
    written: Rc<Notify>,
    watching_writes: Cell<bool>,
    /// A partial reply was queued for a streaming call since the serve loop
    /// last looked (it then lets the stream's reader run).
    fed_stream: Cell<bool>,
}

/// What handlers use to reach the broker: [`call`](Self::call) another
/// service, send an [`event`](Self::event). Cheap to clone; local to the
/// service's thread.
#[derive(Clone)]
pub struct Client {
    inner: Rc<Inner>,
}

/// Removes a call's pending entry however the call ends (reply, deadline,
/// or the caller dropping the future). A call dropped before its reply
/// came is cancelled: the broker gets `cancel` for it.
struct PendingGuard<'a> {
    inner: &'a Inner,
    correlation_id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.inner.abandon(self.correlation_id);
    }
}

impl Inner {
    /// Forgets call `correlation_id`; if it was still waiting for its
    /// reply, tells the broker with `cancel` (protocol v1.1), so the
    /// worker can stop and its slot is freed.
    fn abandon(&self, correlation_id: u64) {
        let waiting = self.pending.borrow_mut().remove(&correlation_id);
        if waiting.is_some() && !self.deaf.get() {
            let _ = self.outbox.push(&Envelope::cancel_request(correlation_id));
        }
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
                written: Rc::new(Notify::new()),
                watching_writes: Cell::new(false),
                fed_stream: Cell::new(false),
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

    /// [`call`](Self::call) with options: a deadline (sent as
    /// `timeout_ms`, enforced by the broker) and a routing key.
    ///
    /// Dropping the future before the reply cancels the call: the broker
    /// gets `cancel` for it, answers it `cancelled`, and tells the worker.
    pub async fn call_with<P: Serialize + ?Sized>(
        &self,
        target: &str,
        method: &str,
        payload: &P,
        options: CallOptions,
    ) -> Result<Reply, CallError> {
        let request = self.request(target, method, payload, &options)?;
        self.call_envelope(request, options.deadline()).await
    }

    /// Calls `method` of `target` asking for partial replies (`stream =
    /// true`): the stream yields each partial reply, in order, then the
    /// final reply (or the call's error), then ends.
    ///
    /// The request is sent at once. Dropping the stream before its final
    /// reply cancels the call. A reader that falls [`STREAM_BUFFER`]
    /// partial replies behind cuts the stream: it is cancelled and ends
    /// with an error `busy`.
    pub fn call_stream<P: Serialize + ?Sized>(
        &self,
        target: &str,
        method: &str,
        payload: &P,
        options: CallOptions,
    ) -> ReplyStream {
        let shared = Rc::new(StreamShared::default());
        let submitted = self
            .request(target, method, payload, &options)
            .and_then(|request| {
                let slot = Slot::Stream(StreamSender(Rc::clone(&shared)));
                self.submit(request.with_stream(), options.deadline(), slot)
            });
        match submitted {
            Ok(correlation_id) => ReplyStream {
                client: Some(self.clone()),
                correlation_id,
                shared,
                ended: false,
            },
            Err(e) => {
                shared.queue.borrow_mut().push_back(Err(e));
                ReplyStream {
                    client: None,
                    correlation_id: 0,
                    shared,
                    ended: false,
                }
            }
        }
    }

    /// The request of a call with `options` (its key checked).
    fn request<P: Serialize + ?Sized>(
        &self,
        target: &str,
        method: &str,
        payload: &P,
        options: &CallOptions,
    ) -> Result<Envelope, CallError> {
        let mut request = Envelope::request(target, method, 0).with_payload(payload)?;
        if let Some(key) = &options.key {
            let key = RequestKey::new(key.clone()).map_err(|e| CallError::Remote {
                code: ErrorCode::BadRequest.as_str().into(),
                message: e.to_string(),
                source_id: self.inner.id.to_string(),
            })?;
            request.key = Some(key);
        }
        Ok(request)
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
    /// are set here) and waits for the reply. Dropping the future before
    /// the reply cancels the call.
    pub async fn call_envelope(
        &self,
        request: Envelope,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let (tx, reply) = reply_slot::channel();
        let _guard = match self.submit(request, timeout, Slot::One(tx)) {
            Ok(correlation_id) => PendingGuard {
                inner: &self.inner,
                correlation_id,
            },
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
            Ok(Ok(reply)) => Reply::from_boxed(reply),
            // The sweeper gave up on it (NoReply).
            Ok(Err(e)) => Err(e),
            // Stdin closed: no reply can come any more.
            Err(_) => Err(CallError::Closed),
        }
    }

    /// Queues `request` and registers it as pending, its reply to go to
    /// `reply`; returns its correlation id. Fails at once when no reply
    /// could come or the request cannot be sent (nothing is registered
    /// then). The caller unregisters it when it stops waiting.
    #[inline]
    fn submit(
        &self,
        mut request: Envelope,
        timeout: Duration,
        reply: Slot,
    ) -> Result<u64, CallError> {
        let inner = &*self.inner;
        if inner.deaf.get() || inner.stopping.get() {
            return Err(CallError::Closed);
        }
        let correlation_id = inner.next_id.get().wrapping_add(1);
        inner.next_id.set(correlation_id);
        request.correlation_id = correlation_id;
        request.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        // Queued before it is registered: a reply can only come once the
        // serve loop runs again, after this returns.
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
        let waited = timeout.saturating_add(GRACE);
        let give_up = Instant::now()
            .checked_add(waited)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
        inner.pending.borrow_mut().insert(
            correlation_id,
            Waiting {
                reply,
                give_up,
                waited,
            },
        );
        self.sweep_later();
        Ok(correlation_id)
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
                        let _ = w.reply.finish(Err(CallError::NoReply(w.waited)));
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

    /// A reply to one of our calls; false if it matches none (late, or not
    /// ours), or is a partial reply to a call that asked for no stream.
    pub(crate) fn complete(&self, reply: Envelope) -> bool {
        let inner = &*self.inner;
        let correlation_id = reply.correlation_id;
        let mut pending = inner.pending.borrow_mut();
        if !(reply.more && reply.kind == MessageType::Response) {
            // A final reply (the hot path: one lookup).
            let waiting = pending.remove(&correlation_id);
            drop(pending);
            return waiting.is_some_and(|w| w.reply.finish(Ok(Box::new(reply))));
        }
        let Some(Waiting {
            reply: Slot::Stream(stream),
            ..
        }) = pending.get(&correlation_id)
        else {
            // To no call, or to a call that asked for no stream.
            return false;
        };
        if stream.unread() < STREAM_BUFFER {
            stream.push(Ok(Box::new(reply)));
            inner.fed_stream.set(true);
            return true;
        }
        // The reader fell behind: cut the stream.
        let cut = pending.remove(&correlation_id);
        drop(pending);
        if let Some(w) = cut {
            w.reply.finish(Err(CallError::Remote {
                code: ErrorCode::Busy.as_str().into(),
                message: format!("the stream's reader fell {STREAM_BUFFER} partial replies behind"),
                source_id: inner.id.to_string(),
            }));
        }
        if !inner.deaf.get() {
            let _ = inner.outbox.push(&Envelope::cancel_request(correlation_id));
        }
        false
    }

    /// Whether a partial reply was queued for a streaming call since the
    /// last time this was asked.
    pub(crate) fn take_fed_stream(&self) -> bool {
        self.inner.fed_stream.replace(false)
    }

    /// Waits until fewer than `frames` frames are queued on stdout.
    pub(crate) async fn written_below(&self, frames: usize) {
        let inner = &*self.inner;
        if !inner.watching_writes.replace(true) {
            let written = Rc::clone(&inner.written);
            inner.outbox.on_written(move |_| written.notify_waiters());
        }
        while inner.outbox.depth() >= frames {
            inner.written.notified().await;
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

/// The partial replies and final reply of a streaming call, as they come.
#[derive(Default)]
struct StreamShared {
    queue: RefCell<VecDeque<Result<Box<Envelope>, CallError>>>,
    waker: Cell<Option<Waker>>,
    /// The sending side is gone: nothing more will come.
    closed: Cell<bool>,
}

/// The serve loop's end of a streaming call.
struct StreamSender(Rc<StreamShared>);

impl StreamSender {
    fn push(&self, item: Result<Box<Envelope>, CallError>) {
        self.0.queue.borrow_mut().push_back(item);
        if let Some(waker) = self.0.waker.take() {
            waker.wake();
        }
    }

    fn unread(&self) -> usize {
        self.0.queue.borrow().len()
    }
}

impl Drop for StreamSender {
    fn drop(&mut self) {
        self.0.closed.set(true);
        if let Some(waker) = self.0.waker.take() {
            waker.wake();
        }
    }
}

/// The replies of [`Client::call_stream`]: each partial reply
/// ([`Reply::is_partial`]), then the final reply or the call's error, then
/// the end. Dropping it before the final reply cancels the call.
pub struct ReplyStream {
    /// `None` when the call failed before it was sent.
    client: Option<Client>,
    correlation_id: u64,
    shared: Rc<StreamShared>,
    ended: bool,
}

impl ReplyStream {
    /// The call's correlation id (0 if it was never sent).
    pub fn correlation_id(&self) -> u64 {
        self.correlation_id
    }
}

impl Stream for ReplyStream {
    type Item = Result<Reply, CallError>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let next = self.shared.queue.borrow_mut().pop_front();
        match next {
            Some(Ok(reply)) if reply.more && reply.kind == MessageType::Response => {
                Poll::Ready(Some(Reply::from_boxed(reply)))
            }
            Some(last) => {
                self.ended = true;
                Poll::Ready(Some(last.and_then(Reply::from_boxed)))
            }
            // Stdin closed with the call in flight: no reply can come.
            None if self.shared.closed.get() => {
                self.ended = true;
                Poll::Ready(Some(Err(CallError::Closed)))
            }
            None => {
                self.shared.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        }
    }
}

impl Drop for ReplyStream {
    fn drop(&mut self) {
        if let Some(client) = &self.client {
            client.inner.abandon(self.correlation_id);
        }
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

    /// A client `c.0` whose frames can be read back.
    fn wired_client() -> (Client, tokio::io::DuplexStream) {
        let (tx, rx) = tokio::io::duplex(1 << 20);
        let client = Client::new("c.0".into(), Outbox::start(tx, EnvelopeCodec::default()));
        (client, rx)
    }

    /// The next frame the client wrote.
    async fn written(rx: &mut tokio::io::DuplexStream, buf: &mut bytes::BytesMut) -> Envelope {
        use tokio::io::AsyncReadExt;
        use tokio_util::codec::Decoder;
        loop {
            if let Some(item) = EnvelopeCodec::default().decode(buf).expect("in sync") {
                return item.expect("a valid envelope");
            }
            let read = tokio::time::timeout(Duration::from_secs(5), rx.read_buf(buf))
                .await
                .expect("a frame within 5 s")
                .expect("read");
            assert!(read > 0, "the client's pipe closed");
        }
    }

    #[test]
    fn call_options_set_the_deadline_and_key_and_a_long_key_fails_at_once() {
        run(async {
            let (client, mut rx) = wired_client();
            let mut buf = bytes::BytesMut::new();
            let options = CallOptions::new()
                .timeout(Duration::from_millis(1500))
                .key("user-7");
            let call = {
                let client = client.clone();
                tokio::task::spawn_local(async move {
                    client.call_with("svc", "Get", &1u8, options).await
                })
            };
            let request = written(&mut rx, &mut buf).await;
            assert_eq!(request.timeout_ms, Some(1500));
            assert_eq!(
                request.key.as_ref().map(RequestKey::as_str),
                Some(Ok("user-7"))
            );
            assert!(!request.stream);
            assert!(client.complete(request.response(None).with_source("svc.0")));
            call.await.expect("task").expect("answered");

            let long = CallOptions::new().key("k".repeat(crate::protocol::MAX_KEY_BYTES + 1));
            let error = client
                .call_with("svc", "Get", &(), long)
                .await
                .expect_err("too long");
            assert_eq!(error.broker_code(), Some(ErrorCode::BadRequest));
            assert_eq!(client.pending_calls(), 0);
        });
    }

    #[test]
    fn a_dropped_call_is_cancelled_at_the_broker_and_an_answered_one_is_not() {
        run(async {
            let (client, mut rx) = wired_client();
            let mut buf = bytes::BytesMut::new();
            // Answered: nothing more is written for it.
            let answered = {
                let client = client.clone();
                tokio::task::spawn_local(async move { client.call("svc", "M", &()).await })
            };
            let first = written(&mut rx, &mut buf).await;
            assert!(client.complete(first.response(None).with_source("svc.0")));
            answered.await.expect("task").expect("ok");
            // Dropped before its reply: `cancel` to `broker` with its id.
            let dropped = {
                let client = client.clone();
                tokio::task::spawn_local(async move { client.call("svc", "M", &()).await })
            };
            let second = written(&mut rx, &mut buf).await;
            assert_eq!(second.kind, MessageType::Request);
            dropped.abort();
            let _ = dropped.await;
            let cancel = written(&mut rx, &mut buf).await;
            assert!(cancel.is_cancel(), "{cancel:?}");
            assert_eq!(
                (&*cancel.target, cancel.correlation_id),
                (BROKER, second.correlation_id)
            );
            assert_ne!(first.correlation_id, second.correlation_id);
            assert_eq!(client.pending_calls(), 0);
            // Its late reply matches nothing.
            assert!(!client.complete(second.response(None)));
        });
    }

    #[test]
    fn a_stream_yields_partials_in_order_then_the_final_reply() {
        use futures_util::StreamExt;
        run(async {
            let (client, mut rx) = wired_client();
            let mut buf = bytes::BytesMut::new();
            let mut stream = client.call_stream("counter", "Count", &3u8, CallOptions::new());
            let request = written(&mut rx, &mut buf).await;
            assert!(request.stream);
            assert_eq!(request.correlation_id, stream.correlation_id());
            for i in 0..3u8 {
                let partial = request
                    .partial_response(Some(crate::protocol::Payload::encode(&i).expect("int")))
                    .with_source("counter.0");
                assert!(client.complete(partial));
            }
            let last = request
                .response(Some(crate::protocol::Payload::encode(&3u8).expect("int")))
                .with_source("counter.0");
            assert!(client.complete(last));
            let mut got = Vec::new();
            while let Some(item) = stream.next().await {
                let reply = item.expect("ok");
                got.push((reply.is_partial(), reply.payload_as::<u8>().expect("u8")));
            }
            assert_eq!(got, [(true, 0), (true, 1), (true, 2), (false, 3)]);
            drop(stream);
            // Finished: dropping it sends no cancel (the next frame is the
            // next call's request).
            let _next = client.call_stream("counter", "Count", &0u8, CallOptions::new());
            assert_eq!(written(&mut rx, &mut buf).await.kind, MessageType::Request);
        });
    }

    #[test]
    fn a_partial_reply_to_a_plain_call_is_dropped() {
        run(async {
            let (client, mut rx) = wired_client();
            let mut buf = bytes::BytesMut::new();
            let call = {
                let client = client.clone();
                tokio::task::spawn_local(async move { client.call("svc", "M", &()).await })
            };
            let request = written(&mut rx, &mut buf).await;
            assert!(!client.complete(request.partial_response(None)));
            assert_eq!(client.pending_calls(), 1, "still waiting for its reply");
            assert!(client.complete(request.response(None)));
            assert!(!call.await.expect("task").expect("ok").is_partial());
        });
    }

    #[test]
    fn a_stream_whose_reader_falls_behind_is_cut_with_busy_and_cancelled() {
        use futures_util::StreamExt;
        run(async {
            let (client, mut rx) = wired_client();
            let mut buf = bytes::BytesMut::new();
            let mut stream = client.call_stream("counter", "Count", &(), CallOptions::new());
            let request = written(&mut rx, &mut buf).await;
            for _ in 0..STREAM_BUFFER {
                assert!(client.complete(request.partial_response(None)));
            }
            assert!(!client.complete(request.partial_response(None)), "cut");
            let cancel = written(&mut rx, &mut buf).await;
            assert!(cancel.is_cancel());
            assert_eq!(cancel.correlation_id, request.correlation_id);
            let mut partials = 0;
            let mut last = None;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(reply) if reply.is_partial() => partials += 1,
                    other => last = Some(other),
                }
            }
            assert_eq!(partials, STREAM_BUFFER);
            let error = last.expect("an end").expect_err("busy");
            assert_eq!(error.broker_code(), Some(ErrorCode::Busy));
        });
    }

    #[test]
    fn a_stream_ends_with_closed_at_eof_and_a_dropped_one_is_cancelled() {
        use futures_util::StreamExt;
        run(async {
            let (client, mut rx) = wired_client();
            let mut buf = bytes::BytesMut::new();
            let dropped = client.call_stream("s", "M", &(), CallOptions::new());
            let request = written(&mut rx, &mut buf).await;
            drop(dropped);
            let cancel = written(&mut rx, &mut buf).await;
            assert!(cancel.is_cancel());
            assert_eq!(cancel.correlation_id, request.correlation_id);

            let mut open = client.call_stream("s", "M", &(), CallOptions::new());
            let _ = written(&mut rx, &mut buf).await;
            client.fail_pending();
            assert!(matches!(open.next().await, Some(Err(CallError::Closed))));
            assert!(open.next().await.is_none());
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
