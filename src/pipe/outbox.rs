//! The write side of a pipe: frames queue in a buffer, one task writes.
//!
//! Why not `actix::io::FramedWrite`: in actix 0.13 it buffers without a bound
//! and does not flush what it holds when its actor stops. Here the queue is counted in frames
//! ([`Outbox::depth`]) so its owner can bound it, dropping an `Outbox` flushes
//! what is queued before the pipe closes, and coalescing needs no timer: a
//! push while a write is in progress lands in the next write, which takes
//! everything queued by then. With one request in flight every
//! frame is written at once; with many, frames share `write` calls.

use bytes::BytesMut;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::task::{Poll, Waker};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::codec::Encoder;

use super::wire::WireCodec;
use crate::protocol::{Envelope, FrameError};

/// A buffer above this size is not kept for reuse after a write.
const KEEP_BYTES: usize = 1 << 20;

/// Why a frame was not queued.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The envelope encodes to more than the frame limit.
    #[error(transparent)]
    TooLarge(#[from] FrameError),
    /// The pipe is closed (closing, discarded, or a write failed).
    #[error("the pipe is closed")]
    Closed,
}

struct State {
    codec: WireCodec,
    queued: BytesMut,
    queued_frames: usize,
    writing_frames: usize,
    writer_idle: bool,
    closing: bool,
    error: Option<std::io::Error>,
}

type OnWritten = Box<dyn Fn(usize)>;

struct Shared {
    state: RefCell<State>,
    /// The idle writer's waker. Not a `tokio::sync::Notify` (a waiter list
    /// behind a lock, for waiters on any thread): the writer and the pushers
    /// share one thread, so a cell does.
    writer: Cell<Option<Waker>>,
    on_written: RefCell<Option<OnWritten>>,
    done: watch::Sender<bool>,
}

/// Queued frames for one pipe and the task that writes them. Local to the
/// thread it was started on (an actix arbiter or a `LocalSet`).
pub struct Outbox {
    shared: Rc<Shared>,
    writer: JoinHandle<()>,
}

impl Outbox {
    /// Starts the writer task for `pipe` on the current thread's local set.
    pub fn start<W>(pipe: W, codec: impl Into<WireCodec>) -> Self
    where
        W: AsyncWrite + Unpin + 'static,
    {
        let shared = Rc::new(Shared {
            state: RefCell::new(State {
                codec: codec.into(),
                queued: BytesMut::new(),
                queued_frames: 0,
                writing_frames: 0,
                writer_idle: false,
                closing: false,
                error: None,
            }),
            writer: Cell::new(None),
            on_written: RefCell::new(None),
            done: watch::channel(false).0,
        });
        let writer = tokio::task::spawn_local(write_loop(Rc::clone(&shared), pipe));
        Self { shared, writer }
    }

    /// Encodes `envelope` onto the queue.
    pub fn push(&self, envelope: &Envelope) -> Result<(), OutboxError> {
        let mut state = self.shared.state.borrow_mut();
        if state.closing {
            return Err(OutboxError::Closed);
        }
        let State { codec, queued, .. } = &mut *state;
        codec.encode(envelope, queued)?;
        state.queued_frames += 1;
        self.shared.wake_writer(&mut state);
        Ok(())
    }

    /// Frames queued or being written.
    pub fn depth(&self) -> usize {
        let state = self.shared.state.borrow();
        state.queued_frames + state.writing_frames
    }

    /// Calls `f(depth)` after every completed write (to resume a paused
    /// reader once there is room again).
    pub fn on_written(&self, f: impl Fn(usize) + 'static) {
        *self.shared.on_written.borrow_mut() = Some(Box::new(f));
    }

    /// The write error that closed the pipe, if one did.
    pub fn error(&self) -> Option<String> {
        self.shared
            .state
            .borrow()
            .error
            .as_ref()
            .map(ToString::to_string)
    }

    /// Stops taking frames; the writer writes what is queued, then closes the
    /// pipe (the reader sees EOF).
    pub fn close(&self) {
        let mut state = self.shared.state.borrow_mut();
        state.closing = true;
        self.shared.wake_writer(&mut state);
    }

    /// Resolves once the pipe is closed (after [`close`](Self::close), a
    /// failed write, or [`discard`](Self::discard)).
    pub fn closed(&self) -> impl Future<Output = ()> + 'static {
        let mut done = self.shared.done.subscribe();
        async move {
            let _ = done.wait_for(|done| *done).await;
        }
    }

    /// Drops everything queued and closes the pipe now (the reader is gone).
    pub fn discard(&self) {
        self.writer.abort();
        let mut state = self.shared.state.borrow_mut();
        state.closing = true;
        state.queued = BytesMut::new();
        state.queued_frames = 0;
        state.writing_frames = 0;
        self.shared.done.send_replace(true);
    }
}

impl Shared {
    /// Wakes the writer if it is idle: there is something for it to do.
    fn wake_writer(&self, state: &mut State) {
        if state.writer_idle {
            state.writer_idle = false;
            if let Some(waker) = self.writer.take() {
                waker.wake();
            }
        }
    }

    /// The idle writer's wait: ready once a push or `close` cleared
    /// `writer_idle`.
    fn idle(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if !self.state.borrow().writer_idle {
            return Poll::Ready(());
        }
        let waker = match self.writer.take() {
            Some(waker) if waker.will_wake(cx.waker()) => waker,
            _ => cx.waker().clone(),
        };
        self.writer.set(Some(waker));
        Poll::Pending
    }
}

impl Drop for Outbox {
    /// Flushes what is queued, then closes the pipe.
    fn drop(&mut self) {
        self.close();
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(shared: Rc<Shared>, mut pipe: W) {
    let mut spare = BytesMut::new();
    loop {
        let next = {
            let mut state = shared.state.borrow_mut();
            if !state.queued.is_empty() {
                state.writing_frames = state.queued_frames;
                state.queued_frames = 0;
                Some(std::mem::replace(
                    &mut state.queued,
                    std::mem::take(&mut spare),
                ))
            } else if state.closing {
                break;
            } else {
                state.writer_idle = true;
                None
            }
        };
        let Some(mut batch) = next else {
            std::future::poll_fn(|cx| shared.idle(cx)).await;
            continue;
        };
        let written = pipe.write_all(&batch).await;
        let depth = {
            let mut state = shared.state.borrow_mut();
            state.writing_frames = 0;
            if let Err(e) = written {
                state.closing = true;
                state.queued = BytesMut::new();
                state.queued_frames = 0;
                state.error = Some(e);
                break;
            }
            state.queued_frames
        };
        batch.clear();
        if batch.capacity() <= KEEP_BYTES {
            spare = batch;
        }
        if let Some(f) = &*shared.on_written.borrow() {
            f(depth);
        }
    }
    let _ = pipe.shutdown().await;
    drop(pipe);
    shared.done.send_replace(true);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::protocol::EnvelopeCodec;
    use tokio::io::AsyncReadExt;

    /// Runs `f` on a current-thread runtime inside a `LocalSet`, as the
    /// bridge and the SDK run (also used by the SDK client's tests).
    pub(crate) fn run<F: Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        tokio::task::LocalSet::new().block_on(&rt, f)
    }

    #[test]
    fn coalesces_queued_frames_and_flushes_on_drop() {
        run(async {
            let (tx, mut rx) = tokio::io::duplex(1 << 16);
            let outbox = Outbox::start(tx, EnvelopeCodec::default());
            let writes = Rc::new(std::cell::Cell::new(0));
            let seen = Rc::clone(&writes);
            outbox.on_written(move |_| seen.set(seen.get() + 1));
            let one = Envelope::event("x", "tick");
            for _ in 0..100 {
                outbox.push(&one).expect("push");
            }
            assert_eq!(outbox.depth(), 100);
            let closed = outbox.closed();
            drop(outbox);
            closed.await;
            let mut all = Vec::new();
            rx.read_to_end(&mut all).await.expect("read");
            assert_eq!(all.len(), 100 * (4 + one.encoded_len()));
            // Queued before the writer ran: one write for all of them.
            assert_eq!(writes.get(), 1);
        });
    }

    #[test]
    fn a_closed_reader_closes_the_outbox() {
        run(async {
            let (tx, rx) = tokio::io::duplex(64);
            drop(rx);
            let outbox = Outbox::start(tx, EnvelopeCodec::default());
            outbox.push(&Envelope::event("x", "tick")).expect("queued");
            outbox.closed().await;
            assert!(outbox.error().is_some());
            assert!(matches!(
                outbox.push(&Envelope::event("x", "tick")),
                Err(OutboxError::Closed)
            ));
        });
    }
}
