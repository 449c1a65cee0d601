//! MetricsStore: cumulative counters, latency histograms, process life-cycle
//! and the latest `/proc` samples; answers `GetMessageStats`.
//!
//! It is fed in batches: the Router ships counter deltas and histograms every
//! flush interval ([`MetricsBatch`]), the Broker reports life-cycle changes
//! ([`ProcessLifecycle`]) and recycles ([`CountRecycle`]), and Sysmon or children submit samples
//! ([`SubmitMetrics`]). Nothing here is on the per-message path.

use actix::prelude::*;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use super::latency;
use super::messages::{
    ClusterState, CountRecycle, Counters, FlushMetrics, ForgetProcesses, GetLatencySums,
    GetMessageStats, ListNodes, MetricsBatch, ProcessLifecycle, SubmitMetrics,
};
use super::router::Router;
use super::window::LatencyWindow;
use crate::protocol::ErrorCode;
use crate::protocol::rpc::{NodeInfo, ProcessStatus};
use crate::protocol::stats::{
    ClusterStats, FaultCounters, MessageCounters, MessageStats, NodeStats, ProcessMetrics,
    ProcessStats, TotalStats,
};

/// The stats reply with every count up to now: flushes the Router, then asks
/// the store. The Router's batch reaches the store before the question does
/// (the store's mailbox is in order), so nothing counted is missing.
pub async fn fresh_stats(
    router: Addr<Router>,
    store: Addr<MetricsStore>,
) -> Result<MessageStats, MailboxError> {
    router.send(FlushMetrics).await?;
    store.send(GetMessageStats).await
}

#[derive(Default)]
struct ProcessRecord {
    service: String,
    counters: Counters,
    first: Option<SystemTime>,
    last: Option<SystemTime>,
    queue_depth: u64,
    pending: u64,
    ready: bool,
    lifecycle: Option<ProcessLifecycle>,
    /// When the current incarnation was started (its pid first seen).
    incarnation: Option<Instant>,
}

/// The totals of processes forgotten ([`ForgetProcesses`]).
#[derive(Default)]
struct Departed {
    counters: Counters,
    first: Option<SystemTime>,
    last: Option<SystemTime>,
    restarts: u64,
}

/// This broker's traffic with one other node, since start.
struct NodeRecord {
    counters: Counters,
    first: Option<SystemTime>,
    last: Option<SystemTime>,
    latency: Histogram<u64>,
}

/// The MetricsStore actor.
pub struct MetricsStore {
    started: Instant,
    processes: BTreeMap<String, ProcessRecord>,
    caller: Counters,
    caller_first: Option<SystemTime>,
    caller_last: Option<SystemTime>,
    /// What forgotten processes did, kept for the totals.
    departed: Departed,
    latency: HashMap<String, Histogram<u64>>,
    overall: Histogram<u64>,
    window: LatencyWindow,
    broker_errors: [u64; ErrorCode::ALL.len()],
    pending: u64,
    samples: BTreeMap<String, ProcessMetrics>,
    /// The Cluster's last word (`None` on a single host).
    cluster: Option<ClusterState>,
    nodes: BTreeMap<String, NodeRecord>,
}

impl Default for MetricsStore {
    /// A store whose windowed latency covers the last 60 s.
    fn default() -> Self {
        Self::new(Duration::from_secs(60))
    }
}

impl MetricsStore {
    /// A store whose windowed latency covers the last `latency_window`.
    pub fn new(latency_window: Duration) -> Self {
        Self {
            started: Instant::now(),
            processes: BTreeMap::new(),
            caller: Counters::default(),
            caller_first: None,
            caller_last: None,
            departed: Departed::default(),
            latency: HashMap::new(),
            overall: latency::new_histogram(),
            window: LatencyWindow::new(latency_window),
            broker_errors: [0; ErrorCode::ALL.len()],
            pending: 0,
            samples: BTreeMap::new(),
            cluster: None,
            nodes: BTreeMap::new(),
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

fn message_counters(
    c: &Counters,
    first: Option<SystemTime>,
    last: Option<SystemTime>,
) -> MessageCounters {
    MessageCounters {
        total_sent: c.sent,
        total_received: c.received,
        request_count: c.requests,
        response_count: c.responses,
        event_count: c.events,
        error_count: c.errors,
        first_message_time: first.map(rfc3339),
        last_message_time: last.map(rfc3339),
    }
}

fn faults(c: &Counters, restarts: u64) -> FaultCounters {
    FaultCounters {
        bad_frames: c.bad_frames,
        unmatched_replies: c.unmatched_replies,
        late_replies: c.late_replies,
        busy_rejections: c.busy_rejections,
        timeouts: c.timeouts,
        restarts,
        dropped_events: c.dropped_events,
        health_failures: c.health_failures,
        cancels: c.cancels,
        partial_replies: c.partial_replies,
        recycles: c.recycles,
    }
}

fn earliest(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<SystemTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn latest(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<SystemTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

impl MetricsStore {
    /// The stats reply (`GetMessageStats`).
    pub fn stats(&self) -> MessageStats {
        let mut total = Counters::default();
        total.add(&self.caller);
        total.add(&self.departed.counters);
        let mut first = earliest(self.caller_first, self.departed.first);
        let mut last = latest(self.caller_last, self.departed.last);
        let mut restarts_total = self.departed.restarts;
        let mut per_process = BTreeMap::new();
        let now = Instant::now();
        for (id, record) in &self.processes {
            total.add(&record.counters);
            first = earliest(first, record.first);
            last = latest(last, record.last);
            let lifecycle = record.lifecycle.as_ref();
            let restarts = lifecycle.map_or(0, |l| u64::from(l.restarts));
            restarts_total += restarts;
            let status = lifecycle.map_or(
                if record.ready {
                    ProcessStatus::Ready
                } else {
                    ProcessStatus::Starting
                },
                |l| l.status,
            );
            per_process.insert(
                id.clone(),
                ProcessStats {
                    counters: message_counters(&record.counters, record.first, record.last),
                    faults: faults(&record.counters, restarts),
                    status,
                    pid: lifecycle.and_then(|l| l.pid),
                    queue_depth: record.queue_depth,
                    pending: record.pending,
                    exit_code: lifecycle.and_then(|l| l.exit_code),
                    service: record.service.clone(),
                    uptime_s: match status {
                        ProcessStatus::Stopped | ProcessStatus::Failed => None,
                        // The broker's own entry lives as long as the store.
                        _ => record
                            .incarnation
                            .or((id == crate::names::BROKER).then_some(self.started))
                            .map(|t| now.saturating_duration_since(t).as_secs()),
                    },
                },
            );
        }
        let mut latency_us: BTreeMap<String, _> = self
            .latency
            .iter()
            .map(|(service, h)| (service.clone(), latency::quantiles(h)))
            .collect();
        latency_us.insert("overall".into(), latency::quantiles(&self.overall));
        let latency_window_us = self.window.quantiles(now, self.latency.keys());
        let broker_errors = ErrorCode::ALL
            .iter()
            .map(|code| (code.as_str().to_string(), self.broker_errors[code.index()]))
            .collect();
        MessageStats {
            total: TotalStats {
                counters: message_counters(&total, first, last),
                faults: faults(&total, restarts_total),
                pending: self.pending,
                broker_errors,
            },
            per_process,
            latency_us,
            latency_window_us,
            process_metrics: self.samples.clone(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            version: env!("CARGO_PKG_VERSION").into(),
            cluster: self.cluster_stats(now),
        }
    }

    fn cluster_stats(&self, now: Instant) -> Option<ClusterStats> {
        let state = self.cluster.as_ref()?;
        let nodes = state
            .nodes
            .iter()
            .map(|n| {
                let record = self.nodes.get(&n.node);
                let counters = record.map(|r| r.counters).unwrap_or_default();
                let stats = NodeStats {
                    up: n.up,
                    services: n.services.clone(),
                    last_seen_ms: millis_since(now, n.last_seen),
                    counters: message_counters(
                        &counters,
                        record.and_then(|r| r.first),
                        record.and_then(|r| r.last),
                    ),
                    faults: faults(&counters, 0),
                    no_responders: n.no_responders,
                    too_large: n.too_large,
                    latency_us: record
                        .map(|r| latency::quantiles(&r.latency))
                        .unwrap_or_default(),
                };
                (n.node.clone(), stats)
            })
            .collect();
        Some(ClusterStats {
            name: state.name.clone(),
            node: state.node.clone(),
            instance: crate::protocol::federation::instance_token(state.instance),
            cluster_conflict: state.conflict,
            connected: state.connected,
            reconnects: state.reconnects,
            slow_consumers: state.slow_consumers,
            max_payload: state.max_payload,
            malformed_heartbeats: state.malformed_heartbeats,
            nodes_ignored: state.nodes_ignored,
            services_ignored: state.services_ignored,
            nodes_forgotten: state.nodes_forgotten,
            dropped_messages: state.dropped_messages,
            services: state.services.clone(),
            nodes,
        })
    }

    /// `ListNodes`: this node first, then the others by name.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let Some(state) = &self.cluster else {
            return Vec::new();
        };
        let now = Instant::now();
        let this = NodeInfo {
            node: state.node.clone(),
            services: state.services.clone(),
            last_seen_ms: 0,
            up: state.connected && !state.conflict,
            local: true,
        };
        std::iter::once(this)
            .chain(state.nodes.iter().map(|n| NodeInfo {
                node: n.node.clone(),
                services: n.services.clone(),
                last_seen_ms: millis_since(now, n.last_seen),
                up: n.up,
                local: false,
            }))
            .collect()
    }
}

fn millis_since(now: Instant, then: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(then).as_millis()).unwrap_or(u64::MAX)
}

impl Actor for MetricsStore {
    type Context = Context<Self>;
}

impl Handler<MetricsBatch> for MetricsStore {
    type Result = ();

    fn handle(&mut self, batch: MetricsBatch, _: &mut Self::Context) {
        for p in batch.processes {
            let record = self.processes.entry(p.id).or_default();
            record.service = p.service;
            record.counters.add(&p.delta);
            record.first = earliest(record.first, p.first_seen);
            record.last = latest(record.last, p.last_seen);
            record.queue_depth = if p.removed { 0 } else { p.queue_depth };
            record.pending = if p.removed { 0 } else { p.pending };
            record.ready = p.ready && !p.removed;
        }
        if batch.caller != Counters::default() {
            self.caller.add(&batch.caller);
            self.caller_first.get_or_insert(batch.at);
            self.caller_last = Some(batch.at);
        }
        self.window
            .add(Instant::now(), &batch.latency, batch.overall.as_ref());
        for (total, delta) in self.broker_errors.iter_mut().zip(batch.broker_errors) {
            *total += delta;
        }
        for (service, h) in batch.latency {
            let slot = self
                .latency
                .entry(service)
                .or_insert_with(latency::new_histogram);
            // Same bounds on both sides, so adding cannot fail.
            let _ = slot.add(&h);
        }
        if let Some(h) = batch.overall {
            let _ = self.overall.add(&h);
        }
        self.pending = batch.pending;
        for n in batch.nodes {
            let record = self.nodes.entry(n.node).or_insert_with(|| NodeRecord {
                counters: Counters::default(),
                first: None,
                last: None,
                latency: latency::new_histogram(),
            });
            if n.delta != Counters::default() {
                record.counters.add(&n.delta);
                record.first.get_or_insert(batch.at);
                record.last = Some(batch.at);
            }
            if let Some(h) = n.latency {
                let _ = record.latency.add(&h);
            }
        }
    }
}

impl Handler<ClusterState> for MetricsStore {
    type Result = ();

    fn handle(&mut self, state: ClusterState, _: &mut Self::Context) {
        // A node the Cluster no longer keeps (it left, or was forgotten)
        // takes its counters along: they would otherwise grow without end.
        if !self.nodes.is_empty() {
            let kept: std::collections::BTreeSet<&str> =
                state.nodes.iter().map(|n| n.node.as_str()).collect();
            self.nodes.retain(|name, _| kept.contains(name.as_str()));
        }
        self.cluster = Some(state);
    }
}

impl Handler<ListNodes> for MetricsStore {
    type Result = MessageResult<ListNodes>;

    fn handle(&mut self, _: ListNodes, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.nodes())
    }
}

impl Handler<ProcessLifecycle> for MetricsStore {
    type Result = ();

    fn handle(&mut self, msg: ProcessLifecycle, _: &mut Self::Context) {
        // A process that is gone has no current sample: it expires here.
        if matches!(msg.status, ProcessStatus::Stopped | ProcessStatus::Failed) {
            self.samples.remove(&msg.id);
        }
        let record = self.processes.entry(msg.id.clone()).or_default();
        record.service = msg.service.clone();
        let previous = record.lifecycle.as_ref();
        // A new pid is a new incarnation (a restart); in-process workers
        // have none and start once.
        if previous.is_none_or(|p| p.pid != msg.pid) {
            record.incarnation = Some(Instant::now());
        }
        record.lifecycle = Some(msg);
    }
}

impl Handler<CountRecycle> for MetricsStore {
    type Result = ();

    fn handle(&mut self, CountRecycle { id }: CountRecycle, _: &mut Self::Context) {
        self.processes.entry(id).or_default().counters.recycles += 1;
    }
}

impl Handler<ForgetProcesses> for MetricsStore {
    type Result = ();

    fn handle(&mut self, ForgetProcesses(ids): ForgetProcesses, _: &mut Self::Context) {
        for id in ids {
            let gone = self.processes.get(&id).is_some_and(|r| {
                r.lifecycle.as_ref().is_some_and(|l| {
                    matches!(l.status, ProcessStatus::Stopped | ProcessStatus::Failed)
                })
            });
            if !gone {
                continue;
            }
            let Some(record) = self.processes.remove(&id) else {
                continue;
            };
            let d = &mut self.departed;
            d.counters.add(&record.counters);
            d.first = earliest(d.first, record.first);
            d.last = latest(d.last, record.last);
            d.restarts += record.lifecycle.map_or(0, |l| u64::from(l.restarts));
            self.samples.remove(&id);
        }
    }
}

impl Handler<SubmitMetrics> for MetricsStore {
    type Result = u64;

    fn handle(&mut self, msg: SubmitMetrics, _: &mut Self::Context) -> u64 {
        let n = msg.0.len() as u64;
        for sample in msg.0 {
            self.samples.insert(sample.id.clone(), sample);
        }
        n
    }
}

impl Handler<GetMessageStats> for MetricsStore {
    type Result = MessageResult<GetMessageStats>;

    fn handle(&mut self, _: GetMessageStats, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.stats())
    }
}

impl Handler<GetLatencySums> for MetricsStore {
    type Result = MessageResult<GetLatencySums>;

    fn handle(&mut self, _: GetLatencySums, _: &mut Self::Context) -> Self::Result {
        let sum = |h: &Histogram<u64>| h.mean() * h.len() as f64;
        let mut sums: BTreeMap<String, f64> = self
            .latency
            .iter()
            .map(|(k, h)| (k.clone(), sum(h)))
            .collect();
        sums.insert("overall".into(), sum(&self.overall));
        MessageResult(sums)
    }
}
