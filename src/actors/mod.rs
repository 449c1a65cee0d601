//! The actors. All run on actix arbiters (tokio current-thread runtimes).
//!
//! - [`messages`]: what the actors say to each other (every message type,
//!   and the counters the Router ships to the MetricsStore).
//! - [`router`]: the hot path; resolves targets, delivers, keeps each
//!   request until its one reply. Its decisions are a core of plain Rust
//!   (`router/core.rs`, with its process table, pending table and
//!   effects), the actor a thin adapter around it. Beside it: [`latency`]
//!   (histograms), `nodes` (the other nodes of a cluster and the choice
//!   among them), `fast_map` (the hot path's hash map).
//! - `same_thread`: the same-thread fast path, one type per direction:
//!   `Outlet` (Router → process: a child's inbox on this thread, or a
//!   mailbox) and `RouterLink` (process → Router: a method call, or a
//!   `Route` message, in order).
//! - `envelopes`: the messages that carry envelopes (re-exported by
//!   [`messages`]).
//! - [`bridge`]: one per child process; its pipes, readiness, exit, restarts.
//!   Beside it: [`health`] (its health checks), [`log_limit`] (warnings
//!   that cannot flood the log), `restart_policy` (backoff,
//!   `max_restarts`, restart intensity, as plain state).
//! - [`log_store`]: children's stderr, on a thread of its own: each
//!   process's ring of its last lines, its followers, its file (`log_file`:
//!   rotation, reopen), its bounded share of the broker's own log.
//! - [`pacer`]: bounds what a child's stdout may have queued at the Router.
//! - `cluster` (feature `cluster`): this broker's membership of a
//!   federation over NATS: heartbeats, requests and replies to
//!   and from other nodes. Beside it, `membership`: the rules of who is in
//!   the cluster (identity, liveness, forgetting, bounds), with no I/O.
//! - [`broker`]: the control plane; the broker's RPCs, services, the process table.
//!   Beside it, `recycling`: whose turn it is to be replaced when workers
//!   reach their `recycle` limits, one worker of a service at a time.
//! - [`metrics_store`]: cumulative counters, histograms, samples; the stats
//!   reply. Beside it: [`window`] (latency of the last minute).
//! - [`sysmon`]: `/proc/{pid}/status` sampling.
//! - [`inproc`]: workers backed by Rust handlers.

pub mod bridge;
pub mod broker;
#[cfg(feature = "cluster")]
pub mod cluster;
mod envelopes;
mod fast_map;
pub mod health;
pub mod inproc;
pub mod latency;
pub mod log_file;
pub mod log_limit;
pub mod log_store;
#[cfg(feature = "cluster")]
mod membership;
pub mod messages;
pub mod metrics_store;
mod nodes;
pub mod pacer;
mod recycling;
mod rendezvous;
mod restart_policy;
pub mod router;
pub(crate) mod same_thread;
pub mod sysmon;
pub mod window;

pub use same_thread::Handoff;
