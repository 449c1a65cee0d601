//! The actors. All run on actix arbiters (tokio current-thread runtimes).
//!
//! - [`router`]: the hot path; routing table, round-robin, pending requests,
//!   deadlines, queue bounds, latency recording.
//! - [`bridge`]: one per child process; its pipes, readiness, exit, restarts.
//! - [`broker`]: the control plane; the broker's RPCs, services, the process table.
//! - [`pacer`]: bounds what a child's stdout may have queued at the Router.
//! - [`metrics_store`]: cumulative counters, histograms, samples; the stats reply.
//! - [`sysmon`]: `/proc/{pid}/status` sampling.
//! - [`inproc`]: workers backed by Rust handlers.
//! - `pending`, `latency`: the Router's data structures.

pub mod bridge;
pub mod broker;
pub mod inproc;
pub mod latency;
pub mod metrics_store;
pub mod pacer;
mod pending;
pub mod router;
pub mod sysmon;
