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
//! - [`actors`]: the actor core, which speaks the messages of
//!   [`actors::messages`]. The [`Router`](actors::router::Router) is the
//!   hot path: it resolves targets, round-robins over a service's ready
//!   workers, keeps every request in flight until its one reply (the
//!   worker's, or an error it generates: `busy`, `timeout`,
//!   `worker_exited`…), and times it. The [`Broker`](actors::broker::Broker)
//!   is the control plane and answers the broker's own RPCs. The
//!   [`MetricsStore`](actors::metrics_store::MetricsStore) receives the
//!   Router's counters and HdrHistograms in batches (never one message per
//!   sample) and answers stats, since start and over the last minute (a
//!   ring of histograms, so alerts react in minutes). [`Sysmon`](actors::sysmon::Sysmon) samples
//!   `/proc` for the broker and every child. A
//!   [`Bridge`](actors::bridge::Bridge) per child process hands its stdout
//!   frames to the Router and writes what the Router delivers to its
//!   stdin, both through the child's inbox: on the Router's thread the
//!   inbox and the Router call each other directly, a mailbox hop fewer
//!   per batch each way; it also
//!   restarts the child and reaps it. With `[cluster]`, the
//!   `Cluster` actor (feature `cluster`) joins brokers on other hosts
//!   through NATS: each other node is routed as a process named `@node`,
//!   so its requests share the pending table, deadlines and failure paths
//!   of local workers.
//! - [`pipe`]: what both ends of a pipe share: the coalescing, bounded
//!   [`Outbox`](pipe::Outbox) writer, stderr line splitting, 1 MiB pipes.
//! - [`service`]: writing a service. Handler tables ([`service::Methods`])
//!   with typed payloads serve in-process workers and Rust subprocesses alike;
//!   [`service::run`] is the whole serve loop of a subprocess, and
//!   [`service::Client`] its way to call other services.
//! - [`embed`]: start the actors inside your own actix / actix-web app,
//!   spawn subprocess services or add in-process ones, and `call` any service
//!   from Rust; [`call`] holds the result types shared with the SDK.
//! - [`workers`]: the built-in workers of `procbroker worker`.
//! - `conformance` (feature `conformance`, on by default): the kit that
//!   checks a service SDK against the protocol through its subject.
//! - `loadgen` (feature `loadgen`, on by default): the round-trip
//!   benchmark's peers (the load client, the raw baseline) and its driver.
//! - [`admin`]: the operators' HTTP surface (`/metrics`, `/stats`,
//!   `/health`, `/ready`, children's stderr at `/logs/{process}`, and the
//!   live dashboard `/` fed by `/events`) in the broker's own actix System.
//! - [`config`], [`names`]: settings (and the config file) and the naming
//!   rules of processes.
//!
//! `ARCHITECTURE.md` in the repository follows one request through these
//! modules hop by hop, with the file and function of each.
//!
//! # Features
//!
//! - `cli` (default): the `procbroker` binary and its dependencies.
//! - `loadgen` (default, implied by `cli`): the benchmark's peers.
//! - `conformance` (default, implied by `cli`): the conformance kit of
//!   `procbroker conformance`.
//! - `cluster` (default, implied by `cli`): federation over NATS
//!   (async-nats). Built without it, a broker given a `nats_url` logs an
//!   error and serves its own node only.
//!
//! An embedder that wants the actors alone sets `default-features = false`.
#![warn(missing_docs)]

pub mod actors;
pub mod admin;
pub mod call;
pub mod call_stream;
pub mod config;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod embed;
#[cfg(feature = "loadgen")]
pub mod loadgen;
pub mod names;
pub mod open_files;
pub mod pending_call;
pub mod pipe;
pub mod protocol;
pub mod service;
pub mod workers;

/// The README's examples, compiled and run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The guides' Rust examples, compiled as doctests so they stay true.
#[cfg(doctest)]
mod guides {
    #[doc = include_str!("../docs/embedding.md")]
    pub struct Embedding;
    #[doc = include_str!("../docs/writing-services.md")]
    pub struct WritingServices;
}
