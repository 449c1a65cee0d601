//! The actors. All run on actix arbiters (tokio current-thread runtimes).
//!
//! - [`messages`]: what the actors say to each other (every message type,
//!   and the counters the Router ships to the MetricsStore).
//! - [`router`]: the hot path; resolves targets, delivers, keeps each
//!   request until its one reply. Beside it, its data: `table` (processes,
//!   services, round-robin, held deliveries), `pending` (requests in flight
//!   and their deadlines), `deadline` (its timer tasks), [`latency`].
//! - [`bridge`]: one per child process; its pipes, readiness, exit, restarts.
//!   Beside it: [`health`] (its health checks), [`log_limit`] (warnings
//!   that cannot flood the log).
//! - [`pacer`]: bounds what a child's stdout may have queued at the Router.
//! - [`broker`]: the control plane; the broker's RPCs, services, the process table.
//! - [`metrics_store`]: cumulative counters, histograms, samples; the stats
//!   reply. Beside it: [`window`] (latency of the last minute).
//! - [`sysmon`]: `/proc/{pid}/status` sampling.
//! - [`inproc`]: workers backed by Rust handlers.

pub mod bridge;
pub mod broker;
mod deadline;
pub mod health;
pub mod inproc;
pub mod latency;
pub mod log_limit;
pub mod messages;
pub mod metrics_store;
pub mod pacer;
mod pending;
pub mod router;
pub mod sysmon;
mod table;
pub mod window;
