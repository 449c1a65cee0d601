//! Reading a pipe in batches: every frame one read brought, decoded into one
//! `Vec`.
//!
//! A pipe read at 64 requests in flight brings dozens of frames at once;
//! handing them on as one actor message instead of one each saves a mailbox
//! hop (an allocation, a queue push, a wake-up) per frame. With one request
//! in flight a batch is one item and nothing is gained or lost.
//!
//! Why not `Batches(FramedRead)`, as before: each frame then travelled
//! through four `poll_next` layers, its 224-byte envelope copied at each
//! (callgrind: ten copies per envelope, ~600 instructions per relayed call),
//! and `FramedRead` grows its buffer by `reserve(1)`, which with frames
//! still borrowed downstream means a new 8 KiB buffer per 8 KiB read. Here
//! an envelope goes from the decoder straight into its batch, and a read
//! gets [`READ_CHUNK`] of room.

use bytes::BytesMut;
use futures_util::Stream;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::AsyncRead;
use tokio_util::codec::Decoder;

/// Room a read is given: one read syscall takes up to this much of what the
/// peer wrote. Envelopes are slices of the buffer, so a buffer lives as long
/// as the longest-lived of its envelopes' strings: whatever outlives the
/// handling of an envelope (the Router's pending method name) is copied out.
/// 16 KiB cost ~500 instructions more per relayed call than 64 (callgrind:
/// more reads and allocations, smaller batches).
pub const READ_CHUNK: usize = 64 * 1024;

/// Below this much free room the next read gets a fresh [`READ_CHUNK`].
const MIN_ROOM: usize = 4 * 1024;

/// The frames of a reader, decoded by `decoder`, as batches of at most `max`.
///
/// An item is what the decoder made of one frame (`Ok`), or the error that
/// ended the stream (`Err`, the last item: a decoder error means the byte
/// stream is out of sync, as with `FramedRead`). A read error ends the stream
/// the same way. At end of input the decoder's `decode_eof` has the last word.
pub struct Batches<R, D> {
    reader: R,
    decoder: D,
    buf: BytesMut,
    max: usize,
    /// The last batch's length: the capacity to start the next one with.
    last: usize,
    /// Whether the buffer may hold a frame the decoder has not seen: set by
    /// a read, cleared when the decoder finds no frame. A stream is polled
    /// each time its actor wakes (for a message, a timer), and most polls
    /// find nothing new: asking the decoder again would cost a frame-header
    /// check and a 224-byte move of its empty result each time (callgrind:
    /// four such calls per envelope read).
    readable: bool,
    eof: bool,
    done: bool,
}

impl<R, D> Batches<R, D> {
    /// Batches of at most `max` (at least 1) frames of `reader`.
    pub fn new(reader: R, decoder: D, max: usize) -> Self {
        Self {
            reader,
            decoder,
            buf: BytesMut::new(),
            max: max.max(1),
            last: 1,
            readable: false,
            eof: false,
            done: false,
        }
    }
}

/// One decoded frame, or the error that ended the stream.
pub type Decoded<D> = Result<<D as Decoder>::Item, <D as Decoder>::Error>;

impl<R: AsyncRead + Unpin, D: Decoder + Unpin> Batches<R, D> {
    /// Decodes what is buffered into `batch`, up to `max` items.
    fn drain_buffer(&mut self, batch: &mut Vec<Decoded<D>>) {
        while self.readable && batch.len() < self.max {
            let decoded = if self.eof {
                self.decoder.decode_eof(&mut self.buf)
            } else {
                self.decoder.decode(&mut self.buf)
            };
            match decoded {
                Ok(Some(item)) => {
                    if batch.capacity() == 0 {
                        // Sized like the last batch: under steady load one
                        // allocation, not a chain of doublings.
                        *batch = Vec::with_capacity(self.last);
                    }
                    batch.push(Ok(item));
                }
                Ok(None) => self.readable = false,
                Err(error) => {
                    batch.push(Err(error));
                    self.done = true;
                    return;
                }
            }
        }
    }
}

impl<R: AsyncRead + Unpin, D: Decoder + Unpin> Stream for Batches<R, D> {
    type Item = Vec<Decoded<D>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut batch = Vec::new();
        loop {
            if this.done {
                return Poll::Ready((!batch.is_empty()).then_some(batch));
            }
            this.drain_buffer(&mut batch);
            if !batch.is_empty() {
                this.last = batch.len();
                return Poll::Ready(Some(batch));
            }
            if this.eof {
                // `decode_eof` had nothing more to give.
                this.done = true;
                continue;
            }
            if this.buf.capacity() - this.buf.len() < MIN_ROOM {
                this.buf.reserve(READ_CHUNK);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.reader), cx, &mut this.buf) {
                Poll::Pending => return Poll::Pending,
                // `decode_eof` gets its say even on an empty buffer.
                Poll::Ready(Ok(0)) => (this.eof, this.readable) = (true, true),
                Poll::Ready(Ok(_)) => this.readable = true,
                Poll::Ready(Err(error)) => {
                    batch.push(Err(error.into()));
                    this.done = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Envelope, EnvelopeCodec, FrameError};
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::Encoder;

    fn frames(n: u64) -> Vec<u8> {
        let mut codec = EnvelopeCodec::new(1 << 20);
        let mut buf = BytesMut::new();
        for i in 0..n {
            let request = Envelope::request("echo", "m", i);
            codec.encode(&request, &mut buf).expect("encodes");
        }
        buf.to_vec()
    }

    fn ids(batch: &[Decoded<EnvelopeCodec>]) -> Vec<u64> {
        batch
            .iter()
            .map(|item| match item {
                Ok(Ok(envelope)) => envelope.correlation_id,
                other => panic!("not an envelope: {other:?}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn takes_what_one_read_brought_up_to_max() {
        let bytes = frames(5);
        let mut batches = Batches::new(&bytes[..], EnvelopeCodec::new(1 << 20), 2);
        assert_eq!(ids(&batches.next().await.expect("batch")), [0, 1]);
        assert_eq!(ids(&batches.next().await.expect("batch")), [2, 3]);
        assert_eq!(ids(&batches.next().await.expect("batch")), [4]);
        assert!(batches.next().await.is_none());
    }

    #[tokio::test]
    async fn frames_split_across_reads_arrive_whole() {
        let bytes = frames(3);
        let (mut tx, rx) = tokio::io::duplex(7);
        let writer = tokio::spawn(async move {
            for chunk in bytes.chunks(5) {
                tx.write_all(chunk).await.expect("writes");
            }
        });
        let mut batches = Batches::new(rx, EnvelopeCodec::new(1 << 20), 64);
        let mut seen = Vec::new();
        while let Some(batch) = batches.next().await {
            seen.extend(ids(&batch));
        }
        writer.await.expect("writer");
        assert_eq!(seen, [0, 1, 2]);
    }

    #[tokio::test]
    async fn a_frame_cut_by_the_end_is_the_last_item() {
        let mut bytes = frames(2);
        bytes.truncate(bytes.len() - 3);
        let mut batches = Batches::new(&bytes[..], EnvelopeCodec::new(1 << 20), 64);
        // The whole frame before the cut comes before the end is known.
        assert_eq!(ids(&batches.next().await.expect("batch")), [0]);
        let last = batches.next().await.expect("batch");
        assert!(matches!(last[..], [Err(FrameError::Truncated { .. })]));
        assert!(batches.next().await.is_none());
    }

    #[tokio::test]
    async fn an_oversized_prefix_ends_the_stream_after_the_frames_before_it() {
        let mut bytes = frames(1);
        bytes.extend_from_slice(b"hello, world");
        let mut batches = Batches::new(&bytes[..], EnvelopeCodec::new(1 << 20), 64);
        let batch = batches.next().await.expect("batch");
        assert!(matches!(batch[0], Ok(Ok(_))));
        assert!(matches!(batch[1], Err(FrameError::TooLarge { .. })));
        assert!(batches.next().await.is_none());
    }

    /// Counts the decoder's calls.
    struct Counting(EnvelopeCodec, std::rc::Rc<std::cell::Cell<u32>>);

    impl Decoder for Counting {
        type Item = <EnvelopeCodec as Decoder>::Item;
        type Error = FrameError;

        fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
            self.1.set(self.1.get() + 1);
            self.0.decode(src)
        }
    }

    #[tokio::test]
    async fn polls_that_read_nothing_new_do_not_ask_the_decoder() {
        let calls = std::rc::Rc::new(std::cell::Cell::new(0));
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut batches =
            Batches::new(rx, Counting(EnvelopeCodec::new(1 << 20), calls.clone()), 64);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..5 {
            assert!(batches.poll_next_unpin(&mut cx).is_pending());
        }
        assert_eq!(calls.get(), 0, "nothing was read");

        tx.write_all(&frames(2)).await.expect("writes");
        let Poll::Ready(Some(batch)) = batches.poll_next_unpin(&mut cx) else {
            panic!("the two frames are buffered");
        };
        assert_eq!(ids(&batch), [0, 1]);
        // Two frames, then the call that found the buffer empty.
        assert_eq!(calls.get(), 3);
        for _ in 0..5 {
            assert!(batches.poll_next_unpin(&mut cx).is_pending());
        }
        assert_eq!(calls.get(), 3, "nothing new was read");

        // Half a frame is read (one call finds it incomplete), then the rest.
        let frame = frames(1);
        tx.write_all(&frame[..3]).await.expect("writes");
        assert!(batches.poll_next_unpin(&mut cx).is_pending());
        assert!(batches.poll_next_unpin(&mut cx).is_pending());
        assert_eq!(calls.get(), 4);
        tx.write_all(&frame[3..]).await.expect("writes");
        assert!(matches!(
            batches.poll_next_unpin(&mut cx),
            Poll::Ready(Some(_))
        ));
        assert_eq!(calls.get(), 6);
    }
}
