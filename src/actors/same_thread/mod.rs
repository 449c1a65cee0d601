//! The same-thread fast path, in one place.
//!
//! The broker starts the Router, the bridges and the in-process workers on
//! one thread. There, envelopes move between a process and the Router with
//! method calls instead of actor messages: a message costs an allocation,
//! a mailbox, a wake-up and a poll of the receiver's context (with one
//! request in flight, a fifth of the broker's instructions per call). Each
//! direction is one type, and each falls back to messages on its own:
//!
//! - **Router → process: [`Outlet`]**, the Router's handle on one process.
//!   A bridge on the Router's thread hands it its child's [`Inbox`]: the
//!   Router queues each envelope there as it routes it. Every other process
//!   has a mailbox: what one input produced for it goes in one `Deliver`.
//! - **Process → Router: [`RouterLink`]**, a process's way in. Once the
//!   Router has registered it on its own thread, the link hands it each
//!   batch with a method call ([`Intake::route`]), else in a `Route`
//!   message. The ordering rule: a process's batches reach the Router in
//!   the order sent, so while one of its `Route`s waits in the mailbox, the
//!   next goes by mail too.
//!
//! A Rust caller of the embedding API on the Router's thread finds the
//! Router in this thread's list ([`call_here`]) and hands it its `Call`
//! the same way. The inbox and the link hold `Recipient`s of the messages
//! they fall back to, never the Router's address, so nothing here imports
//! the Router: it implements [`Intake`] and gives each link a `Weak` of
//! itself. What crosses to the Router inside `RegisterProcess` (inbox and
//! link are `Rc`s) travels in a [`Handoff`], whose `unsafe impl Send` is
//! the one `unsafe` here (`on_thread.rs`).

mod handoff;
mod here;
mod inbox;
mod link;
mod on_thread;
mod outlet;

pub use handoff::Handoff;
pub(crate) use here::{Intake, RouterKey, arrive, call_here, leave};
pub(crate) use inbox::Inbox;
pub(crate) use link::RouterLink;
pub(crate) use outlet::Outlet;
