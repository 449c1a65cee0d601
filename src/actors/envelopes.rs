//! Envelopes on the move: the batch type, and the messages that carry
//! envelopes between the processes and the Router.
//!
//! Two messages carry what processes exchange: [`Route`] (a process sent
//! these, to the Router) and [`Deliver`] (these are for a process, from the
//! Router). Both hold [`Envelopes`], one or many in order, so there is one
//! path for a single message and for what one pipe read brought. A Rust
//! caller's request is a [`Call`], its event a [`Publish`]; what a child's
//! inbox cannot take goes back as a [`Bounce`].
//!
//! They live here, beneath the same-thread fast path (module
//! `same_thread`) that hands them on, and `messages.rs` re-exports them
//! with the rest of the vocabulary.

use actix::prelude::*;
use bytestring::ByteString;
use smallvec::SmallVec;
use tokio::sync::oneshot;

use crate::protocol::{Envelope, ErrorCode};

/// One or more envelopes, oldest first, each boxed: an [`Envelope`] is a
/// few hundred bytes, and on its way from a pipe through the Router to
/// another pipe it changes hands a dozen times; boxed, each hand-over moves
/// a pointer instead of the envelope. One is held inline (no allocation
/// for the batch), which is the common case of a sequential call.
#[derive(Debug, Default)]
pub struct Envelopes(SmallVec<[Box<Envelope>; 1]>);

impl Envelopes {
    /// None yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Room for `n` (more than one allocates once).
    pub fn with_capacity(n: usize) -> Self {
        Self(SmallVec::with_capacity(n))
    }

    /// Room for `n` more.
    pub fn reserve(&mut self, n: usize) {
        self.0.reserve(n);
    }

    /// Appends one.
    #[inline]
    pub fn push(&mut self, envelope: impl Into<Box<Envelope>>) {
        self.0.push(envelope.into());
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// None at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The envelopes, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Envelope> {
        self.0.iter().map(|envelope| &**envelope)
    }
}

impl From<Envelope> for Envelopes {
    fn from(envelope: Envelope) -> Self {
        let mut one = Self::new();
        one.push(envelope);
        one
    }
}

impl From<Box<Envelope>> for Envelopes {
    fn from(envelope: Box<Envelope>) -> Self {
        let mut one = Self::new();
        one.push(envelope);
        one
    }
}

impl From<Vec<Envelope>> for Envelopes {
    fn from(envelopes: Vec<Envelope>) -> Self {
        Self(envelopes.into_iter().map(Box::new).collect())
    }
}

/// The envelopes in order, still boxed (`*envelope` unboxes one).
impl IntoIterator for Envelopes {
    type Item = Box<Envelope>;
    type IntoIter = smallvec::IntoIter<[Box<Envelope>; 1]>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// Envelopes sent by process `from`, to the Router. Their `source` is
/// overwritten with `from`, whatever they say.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Route {
    /// The sending process; authoritative.
    pub from: ByteString,
    /// What it sent, oldest first (for a bridge: what one pipe read brought).
    pub envelopes: Envelopes,
}

impl Route {
    /// One envelope from `from`.
    pub fn one(from: ByteString, envelope: Envelope) -> Self {
        Self {
            from,
            envelopes: envelope.into(),
        }
    }
}

/// Envelopes for a process, from the Router: requests and events addressed
/// to it, replies to its requests. The Router sends at most one `Deliver` per
/// process for each message it handles. Whatever backs a process (a bridge,
/// an in-process worker, the Broker) handles it; a bridge on the Router's
/// thread gets its envelopes through its inbox instead
/// ([`RegisterProcess::inbox`](super::messages::RegisterProcess::inbox)).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Deliver(pub Envelopes);

/// A request from a Rust caller of the embedding API, answered exactly once
/// on `reply`. Its `correlation_id` names it in [`CancelCall`]: take one
/// from [`next_call_id`], or leave 0 and the Router assigns one.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Call {
    /// The request, boxed: it is moved from the caller to the Router and
    /// on to a worker, and a box moves as one pointer.
    pub envelope: Box<Envelope>,
    /// Where the reply (a response or an error envelope) goes, boxed as
    /// the Router holds it.
    pub reply: oneshot::Sender<Box<Envelope>>,
}

/// A streaming request from a Rust caller: its partial replies, then its
/// one final reply, go to `parts` in order. A caller that leaves the
/// channel full (all but one slot: the final reply always has room) gets
/// the stream cut with `busy`; closing it cancels the request.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CallStream {
    /// The request (`stream` is set), boxed as in [`Call`]; its
    /// `correlation_id` as for [`Call`].
    pub envelope: Box<Envelope>,
    /// Where its replies go.
    pub parts: tokio::sync::mpsc::Sender<Box<Envelope>>,
}

/// A Rust caller no longer waits for its request `0` (a [`Call`] or
/// [`CallStream`] correlation id): the request is answered `cancelled` and
/// its worker told, if it is still in flight.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CancelCall(pub u64);

/// A correlation id for a Rust caller's request, unique in this process.
pub fn next_call_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// An event from a Rust caller of the embedding API, to a process, every
/// ready worker of a service, or `*`. Returns how many it was delivered to.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct Publish(pub Envelope);

/// An envelope the process `to` could not take (its stdin backlog is full,
/// or the frame is too large for its pipe). A request is answered with `code`
/// on its worker's behalf and the worker's slot freed; an event is dropped.
/// Both count as `busy_rejections` of their sender when `code` is `busy`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Bounce {
    /// The process that could not take it.
    pub to: ByteString,
    /// The envelope as it was delivered.
    pub envelope: Envelope,
    /// Error code for the requester.
    pub code: ErrorCode,
    /// Error message for the requester.
    pub message: String,
}
