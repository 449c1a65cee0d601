//! `/metrics`: the stats reply as Prometheus text (names `procbroker_…`).
//!
//! Counters per process and in total, gauges for queue depth, pending
//! requests, status and the `/proc` samples, and request latency per service
//! as a summary built from the HdrHistograms (p50 … p99.9 over the latency
//! window as quantiles), and the broker's own errors by code. In a cluster,
//! the NATS connection and this broker's traffic with every other node.

use prometheus::proto::{
    Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary,
};
use std::collections::BTreeMap;

use crate::protocol::rpc::ProcessStatus;
use crate::protocol::stats::LatencyQuantiles;
use crate::protocol::stats::{
    ClusterStats, FaultCounters, MessageCounters, MessageStats, NodeStats,
};

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_owned());
    l.set_value(value.to_owned());
    l
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(format!("procbroker_{name}"));
    f.set_help(help.to_owned());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn counter(labels: Vec<LabelPair>, value: u64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value as f64);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_counter(c);
    m
}

fn gauge(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_gauge(g);
    m
}

type CounterOf = fn(&MessageCounters, &FaultCounters) -> u64;

/// The counters exported per process, with their help text.
const COUNTERS: [(&str, &str, CounterOf); 16] = [
    (
        "messages_sent_total",
        "Envelopes written to the process.",
        |c, _| c.total_sent,
    ),
    (
        "messages_received_total",
        "Envelopes read from the process.",
        |c, _| c.total_received,
    ),
    ("requests_total", "Requests the process sent.", |c, _| {
        c.request_count
    }),
    ("responses_total", "Responses the process sent.", |c, _| {
        c.response_count
    }),
    ("events_total", "Events the process sent.", |c, _| {
        c.event_count
    }),
    ("errors_total", "Error replies the process sent.", |c, _| {
        c.error_count
    }),
    (
        "bad_frames_total",
        "Frames from the process that were not valid envelopes.",
        |_, f| f.bad_frames,
    ),
    (
        "unmatched_replies_total",
        "Replies from the process that matched no request sent to it.",
        |_, f| f.unmatched_replies,
    ),
    (
        "late_replies_total",
        "Replies from the process after the request timed out.",
        |_, f| f.late_replies,
    ),
    (
        "busy_rejections_total",
        "Requests of the process refused with busy.",
        |_, f| f.busy_rejections,
    ),
    (
        "timeouts_total",
        "Requests of the process that timed out.",
        |_, f| f.timeouts,
    ),
    (
        "dropped_events_total",
        "Events of the process the broker dropped (lifecycle events not for the broker, unknown targets).",
        |_, f| f.dropped_events,
    ),
    (
        "health_failures_total",
        "Health checks of the process that failed (no reply in time, or an error).",
        |_, f| f.health_failures,
    ),
    (
        "cancels_total",
        "Cancel events the broker sent the process: requests delivered to it that ended without its final reply.",
        |_, f| f.cancels,
    ),
    (
        "partial_replies_total",
        "Partial replies (more = true) the process sent.",
        |_, f| f.partial_replies,
    ),
    (
        "recycles_total",
        "Times the process was replaced by recycling (max_requests, max_age_ms, max_rss_kb).",
        |_, f| f.recycles,
    ),
];

/// The metric families for `stats` (and latency sums in µs per service).
pub fn families(stats: &MessageStats, sums_us: &BTreeMap<String, f64>) -> Vec<MetricFamily> {
    let mut out = Vec::new();
    for (name, help, get) in COUNTERS {
        // Per process only, so sum() is the total; embedded Rust callers are
        // not a process and appear in /stats totals only.
        let metrics: Vec<Metric> = stats
            .per_process
            .iter()
            .map(|(id, p)| counter(vec![label("process", id)], get(&p.counters, &p.faults)))
            .collect();
        out.push(family(name, help, MetricType::COUNTER, metrics));
    }
    let per = |f: &dyn Fn(&crate::protocol::stats::ProcessStats) -> Option<f64>| -> Vec<Metric> {
        stats
            .per_process
            .iter()
            .filter_map(|(id, p)| f(p).map(|v| gauge(vec![label("process", id)], v)))
            .collect()
    };
    out.push(family(
        "restarts_total",
        "Times the process was restarted.",
        MetricType::COUNTER,
        stats
            .per_process
            .iter()
            .map(|(id, p)| counter(vec![label("process", id)], p.faults.restarts))
            .collect(),
    ));
    out.push(family(
        "queue_depth",
        "Requests delivered to the process and not yet answered.",
        MetricType::GAUGE,
        per(&|p| Some(p.queue_depth as f64)),
    ));
    out.push(family(
        "process_up",
        "1 if the process is ready to serve, else 0.",
        MetricType::GAUGE,
        per(&|p| {
            Some(if p.status == ProcessStatus::Ready {
                1.0
            } else {
                0.0
            })
        }),
    ));
    out.push(family(
        "pending_requests",
        "Requests in flight in the broker.",
        MetricType::GAUGE,
        vec![gauge(Vec::new(), stats.total.pending as f64)],
    ));
    out.push(family(
        "uptime_seconds",
        "Seconds since the broker started.",
        MetricType::GAUGE,
        vec![gauge(Vec::new(), stats.uptime_s)],
    ));
    let samples = |f: &dyn Fn(&crate::protocol::ProcessMetrics) -> Option<f64>| -> Vec<Metric> {
        stats
            .process_metrics
            .iter()
            .filter_map(|(id, m)| f(m).map(|v| gauge(vec![label("process", id)], v)))
            .collect()
    };
    out.push(family(
        "process_resident_memory_bytes",
        "VmRSS of the process at the last Sysmon sample.",
        MetricType::GAUGE,
        samples(&|m| m.vmrss.map(|kb| kb as f64 * 1024.0)),
    ));
    out.push(family(
        "process_virtual_memory_bytes",
        "VmSize of the process at the last Sysmon sample.",
        MetricType::GAUGE,
        samples(&|m| m.vmsize.map(|kb| kb as f64 * 1024.0)),
    ));
    out.push(family(
        "process_threads",
        "Threads of the process at the last Sysmon sample.",
        MetricType::GAUGE,
        samples(&|m| m.threads.map(|t| t as f64)),
    ));
    out.push(family(
        "broker_errors_total",
        "Errors the broker answered in place of a worker, by code.",
        MetricType::COUNTER,
        stats
            .total
            .broker_errors
            .iter()
            .map(|(code, n)| counter(vec![label("code", code)], *n))
            .collect(),
    ));
    // Quantiles describe the latency window (the last minute), count and
    // sum the whole uptime: what Prometheus client summaries do, so an
    // alert on p99 reacts within the window. No sample in the window: NaN.
    let summaries = stats
        .latency_us
        .iter()
        .map(|(service, q)| {
            let window = stats.latency_window_us.get(service).filter(|w| w.count > 0);
            let of =
                |pick: fn(&LatencyQuantiles) -> u64| window.map_or(f64::NAN, |w| pick(w) as f64);
            let quantiles = [
                (0.5, of(|w| w.p50)),
                (0.9, of(|w| w.p90)),
                (0.99, of(|w| w.p99)),
                (0.999, of(|w| w.p999)),
            ]
            .into_iter()
            .map(|(at, us)| {
                let mut x = Quantile::default();
                x.set_quantile(at);
                x.set_value(us / 1e6);
                x
            })
            .collect();
            let mut s = Summary::default();
            s.set_quantile(quantiles);
            s.set_sample_count(q.count);
            s.set_sample_sum(sums_us.get(service).copied().unwrap_or(0.0) / 1e6);
            let mut m = Metric::default();
            m.set_label(vec![label("service", service)]);
            m.set_summary(s);
            m
        })
        .collect();
    out.push(family(
        "request_latency_seconds",
        "Broker-observed request latency (request read to reply read), per service and overall; quantiles over the latency window (60 s by default), count and sum since start.",
        MetricType::SUMMARY,
        summaries,
    ));
    if let Some(cluster) = &stats.cluster {
        cluster_families(cluster, &mut out);
    }
    // promtool frowns on families without samples.
    out.retain(|f| !f.get_metric().is_empty());
    out
}

type NodeValue = fn(&NodeStats) -> f64;

/// Per other node: this broker's traffic with it.
const NODE_GAUGES: [(&str, &str, MetricType, NodeValue); 8] = [
    (
        "node_up",
        "1 if the node is in the rotation (heartbeats arrive), else 0.",
        MetricType::GAUGE,
        |n| f64::from(u8::from(n.up)),
    ),
    (
        "node_last_seen_seconds",
        "Seconds since the node was last heard from.",
        MetricType::GAUGE,
        |n| n.last_seen_ms as f64 / 1000.0,
    ),
    (
        "node_messages_sent_total",
        "Envelopes published to the node (requests to it, replies to its callers).",
        MetricType::COUNTER,
        |n| n.counters.total_sent as f64,
    ),
    (
        "node_requests_received_total",
        "Requests the node's callers sent to this broker.",
        MetricType::COUNTER,
        |n| n.counters.request_count as f64,
    ),
    (
        "node_replies_received_total",
        "Replies from the node to this broker's requests (responses and errors).",
        MetricType::COUNTER,
        |n| (n.counters.response_count + n.counters.error_count) as f64,
    ),
    (
        "node_late_replies_total",
        "Replies from the node after the request had timed out here.",
        MetricType::COUNTER,
        |n| n.faults.late_replies as f64,
    ),
    (
        "node_no_responders_total",
        "Requests to the node that NATS answered with no responders.",
        MetricType::COUNTER,
        |n| n.no_responders as f64,
    ),
    (
        "node_too_large_total",
        "Requests to the node refused as larger than the NATS max_payload.",
        MetricType::COUNTER,
        |n| n.too_large as f64,
    ),
];

fn cluster_families(cluster: &ClusterStats, out: &mut Vec<MetricFamily>) {
    let this = || vec![label("node", &cluster.node)];
    out.push(family(
        "cluster_connected",
        "1 if this broker is connected to a NATS server, else 0.",
        MetricType::GAUGE,
        vec![gauge(this(), f64::from(u8::from(cluster.connected)))],
    ));
    out.push(family(
        "cluster_reconnects_total",
        "NATS connections made after the first.",
        MetricType::COUNTER,
        vec![counter(this(), cluster.reconnects)],
    ));
    out.push(family(
        "cluster_slow_consumer_events_total",
        "Slow-consumer events of the NATS client (messages it dropped).",
        MetricType::COUNTER,
        vec![counter(this(), cluster.slow_consumers)],
    ));
    out.push(family(
        "cluster_conflict",
        "1 while another broker instance holds this node's name and this one stays out of the cluster, else 0.",
        MetricType::GAUGE,
        vec![gauge(this(), f64::from(u8::from(cluster.cluster_conflict)))],
    ));
    for (name, help, value) in [
        (
            "cluster_malformed_heartbeats_total",
            "Heartbeats from other nodes that could not be read.",
            cluster.malformed_heartbeats,
        ),
        (
            "cluster_nodes_ignored_total",
            "Heartbeats and requests from new nodes ignored: the node table was full (max_nodes).",
            cluster.nodes_ignored,
        ),
        (
            "cluster_services_ignored_total",
            "Advertised services ignored past 1000 per node.",
            cluster.services_ignored,
        ),
        (
            "cluster_nodes_forgotten_total",
            "Nodes forgotten: unheard for forget_after_ms, or evicted to make room.",
            cluster.nodes_forgotten,
        ),
        (
            "cluster_dropped_messages_total",
            "Requests, cancels and replies from other nodes dropped: unreadable, or from an instance not routed to.",
            cluster.dropped_messages,
        ),
    ] {
        out.push(family(
            name,
            help,
            MetricType::COUNTER,
            vec![counter(this(), value)],
        ));
    }
    for (name, help, kind, get) in NODE_GAUGES {
        let metrics = cluster
            .nodes
            .iter()
            .map(|(node, n)| {
                let labels = vec![label("node", node)];
                match kind {
                    MetricType::COUNTER => counter(labels, get(n) as u64),
                    _ => gauge(labels, get(n)),
                }
            })
            .collect();
        out.push(family(name, help, kind, metrics));
    }
}
