//! The serve loop of a Rust subprocess service.

use bytestring::ByteString;
use futures_util::StreamExt;
use std::cell::Cell;
use std::os::fd::AsFd;
use std::rc::Rc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::unix::pipe;
use tokio::sync::Notify;

use super::client::Client;
use super::methods::{Answer, Methods};
use crate::names::{BROKER, PROCESS_ID_ENV};
use crate::pipe::{Batches, Outbox};
use crate::protocol::{EnvelopeCodec, FrameError, MessageType};

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
/// ~20 µs per message: DESIGN 8.1).
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
    let busy = Rc::new(InFlight::default());
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
                MessageType::Request => match methods.answer(envelope, &id) {
                    Answer::Now(reply) => {
                        let _ = client.send(&reply);
                    }
                    Answer::Later(future) => {
                        let client = client.clone();
                        let guard = busy.enter();
                        tokio::task::spawn_local(async move {
                            let reply = future.await;
                            let _ = client.send(&reply);
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
                MessageType::Event => methods.event(envelope),
            }
        }
    };
    if result.is_ok() {
        // EOF means "exit now". Handlers still running get a moment to write
        // their replies (their calls fail at once: no reply can come), and
        // then the process ends whatever is still in flight: a handler that
        // loops on calls must not keep an orphan alive.
        client.fail_pending();
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

/// Counts handlers still running.
#[derive(Default)]
struct InFlight {
    count: Cell<usize>,
    done: Notify,
}

struct Entered(Rc<InFlight>);

impl InFlight {
    fn enter(self: &Rc<Self>) -> Entered {
        self.count.set(self.count.get() + 1);
        Entered(Rc::clone(self))
    }

    async fn idle(&self) {
        while self.count.get() > 0 {
            self.done.notified().await;
        }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let count = self.0.count.get() - 1;
        self.0.count.set(count);
        if count == 0 {
            self.0.done.notify_waiters();
        }
    }
}
