//! procbroker: a broker that spawns subprocess services, talks to each over its
//! stdin/stdout pipes, and routes request / response / event messages between
//! them.
//!
//! It descends from a Go system whose broker spoke newline-delimited JSON; the
//! wire here is **length-prefixed MessagePack** instead, so a payload may hold
//! any byte, a peer in any language with a msgpack library can join, and the
//! broker can route a message without parsing its payload.
//!
//! # Map of the crate
//!
//! - [`protocol`]: the wire contract. Frames ([`protocol::FrameCodec`]),
//!   envelopes decoded zero-copy ([`protocol::Envelope`]), payloads carried
//!   verbatim ([`protocol::Payload`]), broker error codes, the broker's RPC
//!   payloads and the stats shapes. Everything else is built on it.
//!
//! - [`actors`]: the actor core. The [`Router`](actors::router::Router) is the
//!   hot path: it resolves targets, round-robins over a service's ready
//!   workers, keeps every request in flight until its one reply (the
//!   worker's, or an error it generates: `busy`, `timeout`,
//!   `worker_exited`…), and times it. The [`Broker`](actors::broker::Broker)
//!   is the control plane and answers the broker's own RPCs. The
//!   [`MetricsStore`](actors::metrics_store::MetricsStore) receives the
//!   Router's counters and HdrHistograms in batches (never one message per
//!   sample) and answers stats. [`Sysmon`](actors::sysmon::Sysmon) samples
//!   `/proc` for the broker and every child.
//! - [`service`]: handler tables ([`service::Methods`]) that serve a service's
//!   methods with typed payloads.
//! - [`embed`]: start the actors inside your own actix / actix-web app, add
//!   in-process services, and `call` any service from Rust.
//! - [`config`], [`names`]: settings and the naming rules of processes.
//!
//! Subprocess bridges (one actor per child, pipes in and out) are the next
//! layer; until they land, services are in-process.
#![warn(missing_docs)]

pub mod actors;
pub mod bench;
pub mod call;
pub mod config;
pub mod embed;
pub mod names;
pub mod pipe;
pub mod protocol;
pub mod service;
pub mod workers;

/// The README's examples, compiled and run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
