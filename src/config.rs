//! Broker settings that the actors read (the `[broker]` and `[sysmon]` tables
//! of the config file). All static: nothing is re-tuned at run time.

use std::time::Duration;

use crate::protocol::DEFAULT_MAX_FRAME_BYTES;

/// Settings of the Router, Broker and Sysmon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Largest frame, in bytes (DESIGN 3.1).
    pub max_frame_bytes: usize,
    /// Requests in flight per process before it counts as full (`busy`).
    pub queue_capacity: usize,
    /// Default deadline of a request (overridden by its `timeout_ms`).
    pub request_timeout: Duration,
    /// Services allowed to call `Spawn` and `Stop`.
    pub control_allow: Vec<String>,
    /// How often Sysmon samples `/proc`; `None` disables it.
    pub sysmon_interval: Option<Duration>,
    /// How often the Router ships counters and histograms to the MetricsStore.
    /// Stats requests also flush first, so this only bounds staleness of
    /// `/metrics`-style reads of the store.
    pub metrics_flush_interval: Duration,
    /// Record request latencies (on by default; off only to measure its cost).
    pub record_latency: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            queue_capacity: 1000,
            request_timeout: Duration::from_secs(30),
            control_allow: Vec::new(),
            sysmon_interval: Some(Duration::from_secs(30)),
            metrics_flush_interval: Duration::from_secs(1),
            record_latency: true,
        }
    }
}
