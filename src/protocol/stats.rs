//! `GetMessageStats` and `ProcessMetrics`.
//!
//! The shape is v2e's, made additive: v2e's keys keep their names and
//! meaning, and the new counters sit beside them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::process_status::ProcessStatus;

/// v2e's message counters (in total and per process).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageCounters {
    /// Frames written to children.
    pub total_sent: u64,
    /// Frames read from children.
    pub total_received: u64,
    /// Requests seen.
    pub request_count: u64,
    /// Responses seen.
    pub response_count: u64,
    /// Events seen.
    pub event_count: u64,
    /// Error replies seen.
    pub error_count: u64,
    /// RFC 3339 time of the first message; nil before any.
    pub first_message_time: Option<String>,
    /// RFC 3339 time of the latest message; nil before any.
    pub last_message_time: Option<String>,
}

/// What went wrong, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultCounters {
    /// Frames that were not valid envelopes, or broke the stream.
    pub bad_frames: u64,
    /// Replies matching no pending request, or from the wrong process.
    pub unmatched_replies: u64,
    /// Replies that arrived after their request timed out.
    pub late_replies: u64,
    /// Requests refused with `busy`.
    pub busy_rejections: u64,
    /// Requests failed with `timeout`.
    pub timeouts: u64,
    /// Process restarts.
    pub restarts: u64,
    /// Events dropped by the broker: lifecycle events (`shutdown`, `ready`)
    /// a process addressed to anyone but the broker, events to unknown
    /// targets.
    #[serde(default)]
    pub dropped_events: u64,
    /// Health checks that failed (no reply in time, or an error reply).
    #[serde(default)]
    pub health_failures: u64,
    /// `cancel` events the broker sent the process: requests delivered to
    /// it that ended without its final reply (timeout, the caller
    /// cancelled or went away, a stream cut, the drain at shutdown ran
    /// out).
    #[serde(default)]
    pub cancels: u64,
    /// Partial replies (`more = true`) the process sent.
    #[serde(default)]
    pub partial_replies: u64,
    /// Times the process was replaced by recycling (`restarts` counts
    /// crashes only).
    #[serde(default)]
    pub recycles: u64,
}

/// `total` of the stats reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TotalStats {
    /// v2e's counters.
    #[serde(flatten)]
    pub counters: MessageCounters,
    /// Fault counters.
    #[serde(flatten)]
    pub faults: FaultCounters,
    /// Requests in flight now.
    pub pending: u64,
    /// Errors the broker answered in place of a worker (`timeout`, `busy`,
    /// `worker_exited`, …), by code, since start. Every broker code is
    /// listed, 0 included.
    #[serde(default)]
    pub broker_errors: BTreeMap<String, u64>,
}

/// One entry of `per_process`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStats {
    /// v2e's counters for this process.
    #[serde(flatten)]
    pub counters: MessageCounters,
    /// Fault counters for this process.
    #[serde(flatten)]
    pub faults: FaultCounters,
    /// Life-cycle state.
    pub status: ProcessStatus,
    /// OS pid of the current incarnation.
    pub pid: Option<u32>,
    /// Frames queued for this process and not yet written.
    pub queue_depth: u64,
    /// Requests delivered to this process and not yet answered.
    pub pending: u64,
    /// Exit code of the last incarnation.
    pub exit_code: Option<i32>,
    /// Its service.
    #[serde(default)]
    pub service: String,
    /// Whole seconds since the current incarnation was started; nil while
    /// it is stopped or failed.
    #[serde(default)]
    pub uptime_s: Option<u64>,
}

/// Latency quantiles in microseconds (HdrHistogram, 3 significant digits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyQuantiles {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

/// Reply of `GetMessageStats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MessageStats {
    /// Totals over every process.
    pub total: TotalStats,
    /// Per process id.
    pub per_process: BTreeMap<String, ProcessStats>,
    /// `overall` and one entry per service: broker-observed request latency
    /// since start.
    pub latency_us: BTreeMap<String, LatencyQuantiles>,
    /// The same over the last `broker.latency_window_ms` (60 s by default):
    /// what `/metrics` quantiles and the dashboard show.
    #[serde(default)]
    pub latency_window_us: BTreeMap<String, LatencyQuantiles>,
    /// Latest sample per process id (the broker's own under `broker`).
    pub process_metrics: BTreeMap<String, ProcessMetrics>,
    /// Seconds since the broker started.
    pub uptime_s: f64,
    /// procbroker's version.
    pub version: String,
    /// The cluster; absent on a single host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStats>,
}

/// `cluster` of the stats reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterStats {
    /// The cluster's name (its subject prefix).
    pub name: String,
    /// This node.
    pub node: String,
    /// This broker instance (random per start, 16 hex digits): what
    /// requests and replies between brokers are addressed to.
    #[serde(default)]
    pub instance: String,
    /// Another broker instance holds this node's name: this one stays out
    /// of the cluster (its own services keep serving) until that one is
    /// gone.
    #[serde(default)]
    pub cluster_conflict: bool,
    /// Connected to a NATS server now.
    pub connected: bool,
    /// Connections made after the first (the client reconnects by itself).
    pub reconnects: u64,
    /// Slow-consumer events of the NATS client (it dropped messages).
    pub slow_consumers: u64,
    /// The server's `max_payload` in bytes (0 before the first connection).
    pub max_payload: u64,
    /// Heartbeats that could not be read (not JSON, a bad node name, …).
    #[serde(default)]
    pub malformed_heartbeats: u64,
    /// Heartbeats and requests from new nodes ignored because the node
    /// table was full (`max_nodes`).
    #[serde(default)]
    pub nodes_ignored: u64,
    /// Advertised services ignored past 1 000 per node (summed over
    /// heartbeats).
    #[serde(default)]
    pub services_ignored: u64,
    /// Nodes forgotten: unheard for `forget_after_ms`, or evicted (down
    /// the longest) to make room for a new one.
    #[serde(default)]
    pub nodes_forgotten: u64,
    /// Requests, cancels and replies from other nodes dropped unread: they
    /// could not be read (no or bad node and instance headers, not an
    /// envelope, a kind that does not belong on their subject, a cancel
    /// without its reason), or a reply or cancel came from an instance
    /// other than the one routed to under its node name (a predecessor, an
    /// impostor).
    #[serde(default)]
    pub dropped_messages: u64,
    /// What this node advertises: exported services and ready workers.
    pub services: BTreeMap<String, u32>,
    /// The other nodes kept, by name: at most `max_nodes`; one that left
    /// or was forgotten is not listed.
    pub nodes: BTreeMap<String, NodeStats>,
}

/// One other node in [`ClusterStats`]. Its counters are this broker's
/// traffic with it, named as for a process: `total_sent` envelopes
/// published to it, `request_count` requests its callers sent here,
/// `response_count` + `error_count` its replies; `late_replies`,
/// `unmatched_replies` as for a worker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    /// In the rotation now.
    pub up: bool,
    /// Its exported services and ready workers, as last advertised.
    pub services: BTreeMap<String, u32>,
    /// Milliseconds since it was last heard from.
    pub last_seen_ms: u64,
    /// Message counters.
    #[serde(flatten)]
    pub counters: MessageCounters,
    /// Fault counters.
    #[serde(flatten)]
    pub faults: FaultCounters,
    /// Requests to it that NATS answered "no responders" (`unavailable`).
    pub no_responders: u64,
    /// Requests to it refused before publishing as larger than the
    /// server's `max_payload` (`too_large`).
    pub too_large: u64,
    /// Round trips of the requests it served, as timed here, since start.
    pub latency_us: LatencyQuantiles,
}

/// One `/proc/{pid}/status` sample (as v2e).
///
/// A process that vanished or is a zombie keeps its `state` (`Z`, or
/// `exited` when the pid is gone) and has no memory figures: absent, never 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessMetrics {
    /// OS pid.
    pub pid: u32,
    /// Process id (`echo.0`, or `broker`).
    pub id: String,
    /// Resident set size, kB as the kernel prints it.
    pub vmrss: Option<u64>,
    /// Virtual size, kB.
    pub vmsize: Option<u64>,
    /// Thread count.
    pub threads: Option<u64>,
    /// Single-letter kernel state (`R`, `S`, `Z`, …) or `exited`.
    pub state: String,
    /// RFC 3339 time of the sample.
    pub timestamp: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::payload::Payload;
    use rmpv::Value;

    fn keys(v: &Value) -> Vec<&str> {
        v.as_map()
            .expect("map")
            .iter()
            .map(|(k, _)| k.as_str().expect("str key"))
            .collect()
    }

    #[test]
    fn stats_reply_has_the_designed_shape_and_round_trips() {
        let mut stats = MessageStats {
            uptime_s: 1.5,
            version: "0.1.0".into(),
            ..Default::default()
        };
        stats.total.counters.total_sent = 3;
        stats.per_process.insert(
            "echo.0".into(),
            ProcessStats {
                counters: MessageCounters::default(),
                faults: FaultCounters {
                    bad_frames: 2,
                    ..Default::default()
                },
                status: ProcessStatus::Ready,
                pid: Some(42),
                queue_depth: 0,
                pending: 1,
                exit_code: None,
                service: "echo".into(),
                uptime_s: Some(2),
            },
        );
        stats
            .latency_us
            .insert("overall".into(), LatencyQuantiles::default());
        stats
            .latency_window_us
            .insert("overall".into(), LatencyQuantiles::default());
        stats.process_metrics.insert(
            "broker".into(),
            ProcessMetrics {
                pid: 1,
                id: "broker".into(),
                vmrss: Some(10),
                vmsize: Some(20),
                threads: Some(3),
                state: "S".into(),
                timestamp: "2026-11-22T00:00:00Z".into(),
            },
        );
        let payload = Payload::encode(&stats).expect("encode");
        let value = rmpv::decode::read_value(&mut payload.as_bytes().as_ref()).expect("msgpack");
        assert_eq!(
            keys(&value),
            [
                "total",
                "per_process",
                "latency_us",
                "latency_window_us",
                "process_metrics",
                "uptime_s",
                "version"
            ]
        );
        let total = &value["total"];
        for key in [
            "total_sent",
            "total_received",
            "request_count",
            "response_count",
            "event_count",
            "error_count",
            "first_message_time",
            "last_message_time",
            "bad_frames",
            "pending",
            "broker_errors",
            "cancels",
            "partial_replies",
            "recycles",
        ] {
            assert!(keys(total).contains(&key), "total lacks {key}");
        }
        let echo = &value["per_process"]["echo.0"];
        for key in [
            "total_sent",
            "status",
            "pid",
            "restarts",
            "queue_depth",
            "bad_frames",
            "service",
            "uptime_s",
            "cancels",
            "partial_replies",
            "recycles",
        ] {
            assert!(keys(echo).contains(&key), "per_process lacks {key}");
        }
        assert_eq!(echo["status"].as_str(), Some("ready"));
        assert_eq!(echo["bad_frames"].as_u64(), Some(2));
        assert_eq!(
            keys(&value["latency_us"]["overall"]),
            ["count", "p50", "p90", "p99", "p999", "max"]
        );
        assert_eq!(
            keys(&value["process_metrics"]["broker"]),
            [
                "pid",
                "id",
                "vmrss",
                "vmsize",
                "threads",
                "state",
                "timestamp"
            ]
        );
        let back: MessageStats = payload.decode().expect("decode");
        assert_eq!(back, stats);
    }
}
