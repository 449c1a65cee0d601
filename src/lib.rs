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
//! The actor core (Router, Broker, MetricsStore, Sysmon and one Bridge actor per
//! child) is described in `DESIGN.md` and arrives in the `actors` module.
#![warn(missing_docs)]

pub mod protocol;

/// The README's examples, compiled and run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
