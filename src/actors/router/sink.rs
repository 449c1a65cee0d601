//! What the Router's core asks of the world: its effects.
//!
//! The core (`core.rs`) decides; whoever drives it carries the decisions
//! out by implementing [`Sink`]: the Router actor with pipes, mailboxes,
//! channels and a timer task, the simulation test with a recorder.

use bytestring::ByteString;
use std::time::Instant;

use crate::protocol::Envelope;

/// The effects of the Router's core. Every input is a method call of the
/// core; what it causes comes out here, in order, during that call. (The
/// metrics batch is returned, by `Core::flush`.)
pub(crate) trait Sink {
    /// The driver's handle on one process: how envelopes reach it. The core
    /// keeps one per registered process and never looks inside.
    type Port;
    /// Where a Rust caller's reply goes.
    type Caller;

    /// Hands `envelope` to the process behind `port`; false if the process
    /// is gone (its actor stopped), and the envelope is dropped. May queue
    /// it at once or hold it until [`settle`](Self::settle).
    fn deliver(&mut self, port: &mut Self::Port, envelope: Box<Envelope>) -> bool;

    /// The input is handled: what was held for `port` goes out now. Called
    /// once per input for each process delivered to during it.
    fn settle(&mut self, port: &mut Self::Port);

    /// The one final reply to a Rust caller's request.
    fn answer(&mut self, caller: Self::Caller, reply: Box<Envelope>);

    /// A partial reply to a Rust caller's streaming request, in order;
    /// what became of it. Anything but [`Partial::Taken`] ends the stream.
    fn partial(&mut self, caller: &mut Self::Caller, reply: Box<Envelope>) -> Partial;

    /// Worker `worker` reached its service's `max_requests`: whoever
    /// supervises it is told, once per registration.
    fn recycle_due(&mut self, worker: &ByteString);

    /// The core must be told of the time ([`Core::expire`]) by `deadline`
    /// at the latest. An earlier call may have asked for an earlier time;
    /// the earliest wins, and an expiry pass that finds nothing due only
    /// costs the pass.
    ///
    /// [`Core::expire`]: super::core::Core::expire
    fn arm(&mut self, deadline: Instant);

    /// Frames waiting in the process's stdin backlog (0 without a pipe),
    /// for the stats.
    fn queue_depth(&self, port: &Self::Port) -> usize;
}

/// What became of a partial reply handed to a Rust caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Partial {
    /// Queued for the caller.
    Taken,
    /// The caller's buffer is full (it does not read): the stream is cut
    /// with `busy`.
    Full,
    /// The caller stopped listening: the request is cancelled.
    Gone,
}
