//! The actors. All run on actix arbiters (tokio current-thread runtimes).
//!
//! - [`messages`]: what the actors say to each other (every message type,
//!   and the counters the Router ships to the MetricsStore).
//! - [`router`]: the hot path; resolves targets, delivers, keeps each
//!   request until its one reply. Beside it, its data: `table` (processes,
//!   services, round-robin, held deliveries), `pending` (requests in flight
//!   and their deadlines), `deadline` (its timer tasks), [`latency`],
//!   `nodes` (the other nodes of a cluster and the choice among them).
//! - [`bridge`]: one per child process; its pipes, readiness, exit, restarts.
//!   Beside it: [`health`] (its health checks), [`log_limit`] (warnings
//!   that cannot flood the log), `inbox` (what is queued for its child or
//!   bounced; the Router calls it directly when both share a thread),
//!   `link` (a process's way in to the Router: a method call when both
//!   share a thread, a `Route` message otherwise), `restart_policy`
//!   (backoff, `max_restarts`, restart intensity, as plain state).
//! - [`log_store`]: children's stderr, on a thread of its own: each
//!   process's ring of its last lines, its followers, its file (`log_file`:
//!   rotation, reopen), its bounded share of the broker's own log.
//! - [`pacer`]: bounds what a child's stdout may have queued at the Router.
//! - `cluster` (feature `cluster`): this broker's membership of a
//!   federation over NATS (DESIGN 11): heartbeats, requests and replies to
//!   and from other nodes. Beside it, `membership`: the rules of who is in
//!   the cluster (identity, liveness, forgetting, bounds), with no I/O.
//! - [`broker`]: the control plane; the broker's RPCs, services, the process table.
//! - [`metrics_store`]: cumulative counters, histograms, samples; the stats
//!   reply. Beside it: [`window`] (latency of the last minute).
//! - [`sysmon`]: `/proc/{pid}/status` sampling.
//! - [`inproc`]: workers backed by Rust handlers.

pub mod bridge;
pub mod broker;
#[cfg(feature = "cluster")]
pub mod cluster;
mod deadline;
pub mod health;
mod inbox;
pub mod inproc;
pub mod latency;
mod link;
pub mod log_file;
pub mod log_limit;
pub mod log_store;
#[cfg(feature = "cluster")]
mod membership;
pub mod messages;
pub mod metrics_store;
mod nodes;
pub mod pacer;
mod pending;
mod restart_policy;
pub mod router;
pub mod sysmon;
mod table;
pub mod window;

pub use inbox::Handoff;
