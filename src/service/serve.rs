//! The serve loop of a Rust subprocess service.

use bytestring::ByteString;
use futures_util::StreamExt;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::rc::Rc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::unix::pipe;
use tokio::sync::Notify;

use super::client::Client;
use super::context::CancelToken;
use super::methods::{Methods, Started};
use crate::names::{BROKER, PROCESS_ID_ENV};
use crate::pipe::{Batches, Outbox};
use crate::protocol::{
    CancelNotice, CancelReason, Envelope, EnvelopeCodec, FrameError, MessageType,
};

/// Why a service stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Setting up the runtime or the pipes failed (stdin and stdout must be
    /// pipes: run the service under procbroker).
    #[error("cannot serve on stdin/stdout: {0}")]
    Io(#[from] std::io::Error),
    /// Stdin is not a stream of frames any more (oversize length, torn frame).
    #[error("stdin is out of sync: {0}")]
    Frame(#[from] FrameError),
}

/// Serves `methods` on this process's stdin and stdout until EOF (or
/// `shutdown`), on a current-thread runtime of its own.
///
/// `build` receives the [`Client`] for calls and events, so handlers can
/// capture it. The process id comes from `PROCBROKER_PROCESS_ID`.
///
/// Stdin and stdout are read and written as non-blocking pipes through the
/// runtime's epoll (not `tokio::io::stdin`, whose blocking thread costs
/// ~20 µs per message, measured).
pub fn run(build: impl FnOnce(Client) -> Methods) -> Result<(), ServeError> {
    let id = std::env::var(PROCESS_ID_ENV).unwrap_or_else(|_| "standalone".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let stdin = pipe::Receiver::from_owned_fd(std::io::stdin().as_fd().try_clone_to_owned()?)?;
        let stdout = pipe::Sender::from_owned_fd(std::io::stdout().as_fd().try_clone_to_owned()?)?;
        serve(stdin, stdout, id.into(), build).await
    })
}

/// The serve loop over any pipe pair; must run inside a `LocalSet` (or an
/// actix arbiter). [`run`] is this on stdin and stdout.
///
/// Protocol v1.1: a `cancel` event from `broker` cancels the handler's
/// `Context` of the request it names (`correlation_id`
/// and the payload's `source`), and that request's reply is then not sent
/// (the broker has answered its caller and would drop it). A `cancel` from
/// any other source is ignored. At EOF every running request is cancelled
/// with reason `shutting_down` before the grace period.
pub async fn serve<R, W>(
    input: R,
    output: W,
    id: ByteString,
    build: impl FnOnce(Client) -> Methods,
) -> Result<(), ServeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + 'static,
{
    let codec = EnvelopeCodec::default();
    let client = Client::new(id.clone(), Outbox::start(output, codec));
    let methods = Rc::new(build(client.clone()));
    let busy = Rc::new(Running::default());
    let _ = client.ready();
    // Whatever one read brought, decoded in one go (see `pipe::Batches`).
    let mut frames = Batches::new(input, codec, READ_BATCH);
    let mut draining = false;
    let result = 'read: loop {
        let batch = tokio::select! {
            batch = frames.next() => batch,
            () = busy.idle(), if draining => break Ok(()),
        };
        let Some(batch) = batch else {
            break Ok(());
        };
        for item in batch {
            let envelope = match item {
                Err(e) => break 'read Err(ServeError::Frame(e)),
                Ok(Err(invalid)) => {
                    tracing::warn!(process = %id, error = %invalid.error, "invalid frame skipped");
                    continue;
                }
                Ok(Ok(envelope)) => envelope,
            };
            match envelope.kind {
                MessageType::Request => match methods.answer_served(envelope, &id, &client) {
                    Started::Now(address, result) => {
                        let _ = client.send(&address.reply(result));
                    }
                    Started::Later {
                        reply,
                        request,
                        token,
                    } => {
                        let client = client.clone();
                        let guard = busy.enter(request, token);
                        tokio::task::spawn_local(async move {
                            let mut guard = guard;
                            let reply = reply.await;
                            if guard.finish() {
                                tracing::debug!(process = %client.id(), correlation_id = reply.correlation_id,
                                    "reply to a cancelled request not sent");
                            } else {
                                let _ = client.send(&reply);
                            }
                            drop(guard);
                        });
                    }
                },
                MessageType::Response | MessageType::Error => {
                    if !client.complete(envelope) {
                        tracing::debug!(process = %id, "reply to no call in flight dropped");
                    }
                }
                MessageType::Event
                    if &*envelope.id == "shutdown" && &*envelope.source == BROKER =>
                {
                    // Finish what is in flight (its calls still need stdin), make
                    // no new calls, then go.
                    client.stop_calling();
                    draining = true;
                }
                MessageType::Event if envelope.is_cancel() => cancel(&busy, &envelope, &id),
                MessageType::Event => methods.event(envelope),
            }
        }
        // Partial replies went to a streaming call's reader: let it run
        // before the next batch. One read can bring thousands of them,
        // and without a turn the reader would look `STREAM_BUFFER` behind
        // and have its stream cut, however fast it reads.
        if client.take_fed_stream() {
            tokio::task::yield_now().await;
        }
    };
    if result.is_ok() {
        // EOF means "exit now". Handlers still running get a moment to write
        // their replies (their calls fail at once: no reply can come), and
        // then the process ends whatever is still in flight: a handler that
        // loops on calls must not keep an orphan alive.
        client.fail_pending();
        busy.cancel_all(CancelReason::ShuttingDown);
        let _ = tokio::time::timeout(EOF_GRACE, busy.idle()).await;
    }
    client.outbox().close();
    client.outbox().closed().await;
    result
}

/// Most frames handled per read (a bound on one turn of the loop).
const READ_BATCH: usize = 64;

/// After EOF, how long running handlers may take to finish.
const EOF_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

/// A `cancel` event: from `broker`, it cancels the running request it
/// names; from anyone else, it is ignored.
fn cancel(running: &Running, event: &Envelope, id: &str) {
    if &*event.source != BROKER {
        tracing::debug!(process = %id, source = %event.source, "cancel not from the broker ignored");
        return;
    }
    match CancelNotice::from_payload(event.payload.as_ref()) {
        Ok(notice) => {
            if !running.cancel(notice.source.clone(), event.correlation_id, notice.reason) {
                tracing::debug!(process = %id, correlation_id = event.correlation_id,
                    origin = %notice.source, "cancel of no running request ignored");
            }
        }
        Err(e) => {
            tracing::warn!(process = %id, correlation_id = event.correlation_id, error = %e,
                "cancel ignored");
        }
    }
}

/// The requests whose handlers are still running: how many (to wait for
/// them), and each by (source, correlation id), so a `cancel` finds it.
#[derive(Default)]
struct Running {
    count: Cell<usize>,
    done: Notify,
    requests: RefCell<HashMap<(ByteString, u64), Entry, foldhash::fast::RandomState>>,
    /// Tells apart two entries under one name (a requester that reused a
    /// correlation id while the first was running).
    next_seq: Cell<u64>,
}

struct Entry {
    seq: u64,
    /// The handler's cancellation, if it watches one.
    token: Option<CancelToken>,
    /// The broker cancelled it: its reply is not sent.
    cancelled: bool,
}

/// A running request, until its reply is ready (or its task is dropped).
struct Entered {
    running: Rc<Running>,
    request: (ByteString, u64),
    seq: u64,
    token: Option<CancelToken>,
    finished: bool,
}

impl Running {
    fn enter(self: &Rc<Self>, request: (ByteString, u64), token: Option<CancelToken>) -> Entered {
        self.count.set(self.count.get() + 1);
        let seq = self.next_seq.get().wrapping_add(1);
        self.next_seq.set(seq);
        self.requests.borrow_mut().insert(
            request.clone(),
            Entry {
                seq,
                token: token.clone(),
                cancelled: false,
            },
        );
        Entered {
            running: Rc::clone(self),
            request,
            seq,
            token,
            finished: false,
        }
    }

    /// Cancels the request `(source, correlation_id)` if it is running;
    /// false if it is not.
    fn cancel(&self, source: ByteString, correlation_id: u64, reason: CancelReason) -> bool {
        let mut requests = self.requests.borrow_mut();
        let Some(entry) = requests.get_mut(&(source, correlation_id)) else {
            return false;
        };
        entry.cancelled = true;
        let token = entry.token.clone();
        drop(requests);
        if let Some(token) = token {
            token.cancel(reason);
        }
        true
    }

    /// Cancels every running handler that watches its token (their replies
    /// are still sent: nobody said the caller stopped waiting).
    fn cancel_all(&self, reason: CancelReason) {
        let tokens: Vec<CancelToken> = self
            .requests
            .borrow()
            .values()
            .filter_map(|entry| entry.token.clone())
            .collect();
        for token in tokens {
            token.cancel(reason.clone());
        }
    }

    async fn idle(&self) {
        while self.count.get() > 0 {
            self.done.notified().await;
        }
    }
}

impl Entered {
    /// The handler is done: forgets the request. True if the broker
    /// cancelled it (its reply must not be sent).
    fn finish(&mut self) -> bool {
        self.finished = true;
        if let Some(token) = &self.token {
            token.finish();
        }
        self.forget()
    }

    fn forget(&self) -> bool {
        let mut requests = self.running.requests.borrow_mut();
        match requests.get(&self.request) {
            Some(entry) if entry.seq == self.seq => {
                requests.remove(&self.request).is_some_and(|e| e.cancelled)
            }
            _ => false,
        }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        if !self.finished {
            // The task was dropped with the runtime: forget it all the same.
            self.forget();
        }
        let count = self.running.count.get() - 1;
        self.running.count.set(count);
        if count == 0 {
            self.running.done.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Payload;
    use crate::service::client::{CallOptions, STREAM_BUFFER};
    use crate::service::reply::HandlerError;
    use bytes::BytesMut;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_util::codec::{Decoder, Encoder};

    /// The next frame from the service, within 5 s.
    async fn next_frame(from: &mut DuplexStream, buf: &mut BytesMut) -> Envelope {
        loop {
            if let Some(item) = EnvelopeCodec::default().decode(buf).expect("in sync") {
                return item.expect("a valid envelope");
            }
            let read = tokio::time::timeout(Duration::from_secs(5), from.read_buf(buf))
                .await
                .expect("a frame within 5 s")
                .expect("read");
            assert!(read > 0, "the service's stdout closed");
        }
    }

    #[test]
    fn a_stream_read_as_fast_as_it_comes_is_not_cut_however_many_partials_one_read_brings() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        tokio::task::LocalSet::new().block_on(&runtime, async {
            let (mut to_service, stdin) = tokio::io::duplex(1 << 24);
            let (stdout, mut from_service) = tokio::io::duplex(1 << 24);
            // `Pull n`: a streaming call to `counter`, counting its
            // partial replies as they come (a reader that keeps up).
            let service = tokio::task::spawn_local(serve(stdin, stdout, "c.0".into(), |client| {
                Methods::new().method("Pull", move |n: u64| {
                    let client = client.clone();
                    async move {
                        let mut replies =
                            client.call_stream("counter", "Count", &n, CallOptions::new());
                        let mut partials = 0u64;
                        while let Some(reply) = replies.next().await {
                            match reply {
                                Ok(reply) if reply.is_partial() => partials += 1,
                                Ok(_) => return Ok(partials),
                                Err(e) => return Err(HandlerError::new(e.to_string())),
                            }
                        }
                        Err(HandlerError::new("the stream ended without a final reply"))
                    }
                })
            }));
            let mut buf = BytesMut::new();
            let ready = next_frame(&mut from_service, &mut buf).await;
            assert_eq!(&*ready.id, "ready");
            let n = 5 * STREAM_BUFFER as u64;
            let pull = Envelope::request("c.0", "Pull", 7)
                .with_source("broker")
                .with_payload(&n)
                .expect("payload");
            let mut frames = BytesMut::new();
            let mut codec = EnvelopeCodec::default();
            codec.encode(&pull, &mut frames).expect("encode");
            to_service.write_all(&frames).await.expect("write");
            let call = next_frame(&mut from_service, &mut buf).await;
            assert!(call.stream, "{call:?}");
            // Every partial reply and the final one in one write: the
            // service finds them all in its pipe at once.
            frames.clear();
            let part = Payload::encode(&0u8).expect("int");
            for _ in 0..n {
                let partial = call
                    .partial_response(Some(part.clone()))
                    .with_source("counter.0");
                codec.encode(&partial, &mut frames).expect("encode");
            }
            let last = call.response(None).with_source("counter.0");
            codec.encode(&last, &mut frames).expect("encode");
            to_service.write_all(&frames).await.expect("write");
            let reply = next_frame(&mut from_service, &mut buf).await;
            assert_eq!(reply.correlation_id, 7);
            assert_eq!(
                (reply.kind, reply.payload_as::<u64>().ok()),
                (MessageType::Response, Some(n)),
                "{reply:?}"
            );
            drop(to_service);
            let _ = service.await;
        });
    }
}
