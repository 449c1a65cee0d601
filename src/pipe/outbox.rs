//! The write side of a pipe: frames queue in a buffer, one task writes.
//!
//! Why not `actix::io::FramedWrite`: in actix 0.13 it buffers without a bound
//! and does not flush what it holds when its actor stops. Here the queue is counted in frames
//! ([`Outbox::depth`]) so its owner can bound it, dropping an `Outbox` flushes
//! what is queued before the pipe closes, and coalescing needs no timer: a
//! push while a write is in progress lands in the next write, which takes
//! everything queued by then. With one request in flight every
//! frame is written at once; with many, frames share `write` calls.
//!
//! A large payload (at least [`SEPARATE_BYTES`]) is not copied into the
//! queue: its frame's bytes before the payload are, and the payload's own
//! `Bytes` (a slice of the buffer it was read into) waits next to them, to
//! go out in the same vectored `write`. A relayed 1 MiB payload is then
//! copied only by the kernel, in and out of the pipes.

use bytes::{Buf, Bytes, BytesMut};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::rc::Rc;
use std::task::{Poll, Waker};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::wire::WireCodec;
use crate::protocol::{Envelope, FrameError};

/// A buffer above this size is not kept for reuse after a write.
const KEEP_BYTES: usize = 1 << 20;

/// A payload this large is written from where it is, not copied into the
/// queue. Below it, copying costs less than a buffer of its own (the queue
/// is then split, which allocates) and one more slice in the `write`.
pub const SEPARATE_BYTES: usize = 32 * 1024;

/// Most slices one vectored `write` is given (Linux takes up to 1024).
const MAX_SLICES: usize = 64;

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
    /// What goes out before `queued`: the queue's bytes up to a large
    /// payload, then that payload, for each large payload pushed. Empty
    /// unless one was.
    segments: VecDeque<Bytes>,
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
                segments: VecDeque::new(),
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
        let State {
            codec,
            segments,
            queued,
            ..
        } = &mut *state;
        if let Some(payload) = codec.encode_split(envelope, queued, SEPARATE_BYTES)? {
            segments.push_back(queued.split().freeze());
            segments.push_back(payload);
        }
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
        state.drop_queued();
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

impl State {
    /// Closes the queue and lets go of what waits in it (nothing more will
    /// be written).
    fn drop_queued(&mut self) {
        self.closing = true;
        self.segments = VecDeque::new();
        self.queued = BytesMut::new();
        self.queued_frames = 0;
    }
}

/// What the writer takes from the queue for one write.
enum Batch {
    /// Only frames encoded whole.
    Bytes(BytesMut),
    /// Frames with large payloads among them, in order.
    Segments(VecDeque<Bytes>),
}

async fn write_loop<W: AsyncWrite + Unpin>(shared: Rc<Shared>, mut pipe: W) {
    let mut spare = BytesMut::new();
    let mut spare_segments = VecDeque::new();
    loop {
        let next = {
            let mut state = shared.state.borrow_mut();
            if !state.segments.is_empty() || !state.queued.is_empty() {
                state.writing_frames = std::mem::take(&mut state.queued_frames);
                Some(if state.segments.is_empty() {
                    Batch::Bytes(std::mem::replace(
                        &mut state.queued,
                        std::mem::take(&mut spare),
                    ))
                } else {
                    let mut segments =
                        std::mem::replace(&mut state.segments, std::mem::take(&mut spare_segments));
                    if !state.queued.is_empty() {
                        segments.push_back(state.queued.split().freeze());
                    }
                    Batch::Segments(segments)
                })
            } else if state.closing {
                break;
            } else {
                state.writer_idle = true;
                None
            }
        };
        let Some(batch) = next else {
            std::future::poll_fn(|cx| shared.idle(cx)).await;
            continue;
        };
        let written = match batch {
            Batch::Bytes(mut bytes) => {
                let written = pipe.write_all(&bytes).await;
                bytes.clear();
                if bytes.capacity() <= KEEP_BYTES {
                    spare = bytes;
                }
                written
            }
            Batch::Segments(mut segments) => {
                let written = write_segments(&mut pipe, &mut segments).await;
                // Written or abandoned: the payloads' buffers are let go.
                segments.clear();
                spare_segments = segments;
                written
            }
        };
        let depth = {
            let mut state = shared.state.borrow_mut();
            state.writing_frames = 0;
            if let Err(e) = written {
                state.drop_queued();
                state.error = Some(e);
                break;
            }
            state.queued_frames
        };
        if let Some(f) = &*shared.on_written.borrow() {
            f(depth);
        }
    }
    let _ = pipe.shutdown().await;
    drop(pipe);
    shared.done.send_replace(true);
}

/// Writes every byte of `segments`, in order, in vectored writes; what is
/// written leaves the front of `segments`.
async fn write_segments<W: AsyncWrite + Unpin>(
    pipe: &mut W,
    segments: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    loop {
        while segments.front().is_some_and(Bytes::is_empty) {
            segments.pop_front();
        }
        if segments.is_empty() {
            return Ok(());
        }
        let written = {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let count = next_write(segments, &mut slices);
            let slices = &slices[..count];
            std::future::poll_fn(|cx| {
                std::pin::Pin::new(&mut *pipe).poll_write_vectored(cx, slices)
            })
            .await?
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = written;
        while left > 0 {
            let Some(front) = segments.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                segments.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
    }
}

/// The kernel's page: a pipe holds its bytes in pages of this size.
const PAGE: usize = 4096;

/// A segment at least this long is written in a `write` of its own that
/// starts at a page boundary of its memory and is a whole number of pages.
const BULK: usize = 4 * PAGE;

/// Fills `slices` with what the next `write` takes from the front of
/// `segments` (none of them empty); returns how many it filled.
///
/// The bulk of a large segment is copied by the kernel from its memory
/// into fresh pipe pages, each filled from its start (a write of whole
/// pages never tops up a page already in the pipe). Where the source sits
/// a few bytes behind its destination within a page, that copy runs at a
/// quarter of its speed on some CPUs (measured here, AMD EPYC: 400 µs
/// instead of 100 µs per MiB); from a page boundary to a page boundary it
/// never does. So the bytes before a large segment's first page boundary
/// end the write they are in, and its bulk then goes alone, in whole pages.
fn next_write<'a>(segments: &'a VecDeque<Bytes>, slices: &mut [IoSlice<'a>]) -> usize {
    let mut count = 0;
    for segment in segments {
        if count == slices.len() {
            break;
        }
        if segment.len() >= BULK {
            let to_page = (PAGE - segment.as_ptr().addr() % PAGE) % PAGE;
            if count == 0 && to_page == 0 {
                slices[0] = IoSlice::new(&segment[..segment.len() / PAGE * PAGE]);
                return 1;
            }
            if to_page > 0 {
                slices[count] = IoSlice::new(&segment[..to_page]);
                count += 1;
            }
            break;
        }
        slices[count] = IoSlice::new(segment);
        count += 1;
    }
    count
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::protocol::EnvelopeCodec;
    use tokio::io::AsyncReadExt;
    use tokio_util::codec::Encoder;

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

    /// Frames with large payloads among small ones, through a pipe too
    /// small for any of them: the reader sees every frame whole, in order,
    /// byte for byte what encoding each alone gives.
    #[test]
    fn large_payloads_go_out_in_order_and_whole() {
        run(async {
            let (tx, mut rx) = tokio::io::duplex(7 * 1024);
            let outbox = Outbox::start(tx, EnvelopeCodec::default());
            let mut expected = BytesMut::new();
            let mut codec = EnvelopeCodec::default();
            for i in 0..12u8 {
                let mut envelope = Envelope::event("x", "tick");
                let len = match i % 3 {
                    0 => SEPARATE_BYTES + usize::from(i) * 1013,
                    1 => 10,
                    _ => 3 * SEPARATE_BYTES + 5,
                };
                let text = String::from_utf8(vec![b'a' + i; len]).expect("ascii");
                envelope.payload = Some(crate::protocol::Payload::encode(&text).expect("payload"));
                codec.encode(&envelope, &mut expected).expect("encode");
                outbox.push(&envelope).expect("push");
            }
            let closed = outbox.closed();
            let reader = tokio::task::spawn_local(async move {
                let mut all = Vec::new();
                rx.read_to_end(&mut all).await.expect("read");
                all
            });
            drop(outbox);
            closed.await;
            let all = reader.await.expect("reader");
            assert_eq!(all.len(), expected.len());
            assert!(
                all == expected[..],
                "the bytes differ from the frames encoded whole"
            );
        });
    }

    /// A reader that goes away in the middle of a large payload: the write
    /// fails, the queue is dropped, and nothing more is taken.
    #[test]
    fn a_reader_gone_mid_payload_closes_the_outbox() {
        run(async {
            let (tx, mut rx) = tokio::io::duplex(4096);
            let outbox = Outbox::start(tx, EnvelopeCodec::default());
            let mut envelope = Envelope::event("x", "tick");
            let text = "a".repeat(4 * SEPARATE_BYTES);
            envelope.payload = Some(crate::protocol::Payload::encode(&text).expect("payload"));
            outbox.push(&envelope).expect("queued");
            outbox.push(&envelope).expect("queued");
            let mut some = [0u8; 1000];
            rx.read_exact(&mut some).await.expect("the frame starts");
            drop(rx);
            outbox.closed().await;
            assert!(outbox.error().is_some());
            assert_eq!(outbox.depth(), 0, "the queue is dropped");
            assert!(matches!(outbox.push(&envelope), Err(OutboxError::Closed)));
        });
    }

    #[test]
    fn a_large_segment_is_written_alone_from_a_page_boundary_in_whole_pages() {
        let page_aligned = |len: usize| {
            // A buffer with a page boundary in it, sliced to start there.
            let buf = Bytes::from(vec![7u8; len + PAGE]);
            let skip = (PAGE - buf.as_ptr().addr() % PAGE) % PAGE;
            buf.slice(skip..skip + len)
        };
        let small = Bytes::from_static(b"head");
        let bulk = page_aligned(BULK + 100);
        let unaligned = page_aligned(BULK + 300).slice(3..);
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];

        // Small segments are gathered up to a large one, which then starts
        // its own write.
        let segments = VecDeque::from([small.clone(), small.clone(), bulk.clone()]);
        assert_eq!(next_write(&segments, &mut slices), 2);

        // Aligned at the front: alone, whole pages only.
        let segments = VecDeque::from([bulk.clone(), small.clone()]);
        assert_eq!(next_write(&segments, &mut slices), 1);
        assert_eq!(slices[0].len(), BULK);

        // Unaligned: its bytes up to the next page boundary end the write.
        let segments = VecDeque::from([small.clone(), unaligned.clone()]);
        assert_eq!(next_write(&segments, &mut slices), 2);
        assert_eq!(slices[1].len(), PAGE - 3);
        assert_eq!((unaligned.as_ptr().addr() + slices[1].len()) % PAGE, 0);

        // Short segments: as many as fit.
        let segments: VecDeque<Bytes> = (0..MAX_SLICES + 5).map(|_| small.clone()).collect();
        assert_eq!(next_write(&segments, &mut slices), MAX_SLICES);
    }
}
