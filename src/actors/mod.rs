//! The actors. All run on actix arbiters (tokio current-thread runtimes).
//!
//! - [`router`]: the hot path; routing table, round-robin, pending requests,
//!   deadlines, queue bounds, latency recording.
//! - [`broker`]: the control plane; the broker's RPCs and the process table.
//! - [`metrics_store`]: cumulative counters, histograms, samples; the stats reply.
//! - [`sysmon`]: `/proc/{pid}/status` sampling.
//! - [`inproc`]: workers backed by Rust handlers.
//! - `pending`, `latency`: the Router's data structures.

pub mod broker;
pub mod inproc;
pub mod latency;
pub mod metrics_store;
mod pending;
pub mod router;
pub mod sysmon;
