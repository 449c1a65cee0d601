//! MetricsStore: cumulative counters, latency histograms, process life-cycle
//! and the latest `/proc` samples; answers `GetMessageStats` (DESIGN 6.2).
//!
//! It is fed in batches: the Router ships counter deltas and histograms every
//! flush interval ([`MetricsBatch`]), the Broker reports life-cycle changes
//! ([`ProcessLifecycle`]) and Sysmon or children submit samples
//! ([`SubmitMetrics`]). Nothing here is on the per-message path.

use actix::prelude::*;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::time::{Instant, SystemTime};

use super::latency;
use super::router::{FlushMetrics, Router};
use crate::protocol::rpc::ProcessStatus;
use crate::protocol::stats::{
    FaultCounters, MessageCounters, MessageStats, ProcessMetrics, ProcessStats, TotalStats,
};

/// Per-process counters as the Router counts them: everything is about
/// envelopes **sent by** that process (or written to it, for `sent`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Envelopes delivered to the process.
    pub sent: u64,
    /// Envelopes received from the process.
    pub received: u64,
    /// Requests it sent.
    pub requests: u64,
    /// Responses it sent.
    pub responses: u64,
    /// Events it sent.
    pub events: u64,
    /// Error replies it sent.
    pub errors: u64,
    /// Invalid frames it sent.
    pub bad_frames: u64,
    /// Replies it sent that matched nothing it was asked (or were forged).
    pub unmatched_replies: u64,
    /// Replies it sent after the request had timed out.
    pub late_replies: u64,
    /// Its requests refused with `busy`.
    pub busy_rejections: u64,
    /// Its requests that timed out.
    pub timeouts: u64,
}

impl Counters {
    /// Counts one envelope received from the process.
    #[inline]
    pub fn count(&mut self, kind: crate::protocol::MessageType) {
        use crate::protocol::MessageType;
        self.received += 1;
        match kind {
            MessageType::Request => self.requests += 1,
            MessageType::Response => self.responses += 1,
            MessageType::Event => self.events += 1,
            MessageType::Error => self.errors += 1,
        }
    }

    fn add(&mut self, o: &Counters) {
        self.sent += o.sent;
        self.received += o.received;
        self.requests += o.requests;
        self.responses += o.responses;
        self.events += o.events;
        self.errors += o.errors;
        self.bad_frames += o.bad_frames;
        self.unmatched_replies += o.unmatched_replies;
        self.late_replies += o.late_replies;
        self.busy_rejections += o.busy_rejections;
        self.timeouts += o.timeouts;
    }
}

/// One process in a [`MetricsBatch`]: deltas since the last batch and gauges.
#[derive(Debug, Clone)]
pub struct ProcessSnapshot {
    /// Process id.
    pub id: String,
    /// Its service.
    pub service: String,
    /// Counter deltas.
    pub delta: Counters,
    /// First envelope in this batch.
    pub first_seen: Option<SystemTime>,
    /// Last envelope in this batch.
    pub last_seen: Option<SystemTime>,
    /// Requests in flight to it now.
    pub queue_depth: u64,
    /// Same as `queue_depth` for now (the bridge adds unwritten frames).
    pub pending: u64,
    /// Routable now.
    pub ready: bool,
    /// It left the routing table.
    pub removed: bool,
}

/// What the Router ships every flush interval.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct MetricsBatch {
    /// When the batch was cut.
    pub at: SystemTime,
    /// Every process the Router knows, plus those removed since the last batch.
    pub processes: Vec<ProcessSnapshot>,
    /// Counter deltas of embedded Rust callers (`@caller`), for the totals.
    pub caller: Counters,
    /// Latency samples per service since the last batch.
    pub latency: Vec<(String, Histogram<u64>)>,
    /// Latency samples over all services since the last batch.
    pub overall: Option<Histogram<u64>>,
    /// Requests in flight now.
    pub pending: u64,
}

/// A life-cycle change, reported by the Broker.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ProcessLifecycle {
    /// Process id.
    pub id: String,
    /// Its service.
    pub service: String,
    /// New status.
    pub status: ProcessStatus,
    /// OS pid of the current incarnation (`None` for in-process workers).
    pub pid: Option<u32>,
    /// Restarts so far.
    pub restarts: u32,
    /// Exit code of the last incarnation.
    pub exit_code: Option<i32>,
}

/// Stores `/proc` samples; returns how many were stored.
#[derive(Debug, Message)]
#[rtype(result = "u64")]
pub struct SubmitMetrics(pub Vec<ProcessMetrics>);

/// Asks for the stats reply (flush the Router first for exact counters:
/// [`fresh_stats`] does both).
#[derive(Debug, Message)]
#[rtype(result = "MessageStats")]
pub struct GetMessageStats;

/// Sum of the recorded latencies per service (and `overall`), in
/// microseconds: what a Prometheus summary needs besides the quantiles.
#[derive(Debug, Message)]
#[rtype(result = "BTreeMap<String, f64>")]
pub struct GetLatencySums;

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
}

/// The MetricsStore actor.
pub struct MetricsStore {
    started: Instant,
    processes: BTreeMap<String, ProcessRecord>,
    caller: Counters,
    caller_first: Option<SystemTime>,
    caller_last: Option<SystemTime>,
    latency: HashMap<String, Histogram<u64>>,
    overall: Histogram<u64>,
    pending: u64,
    samples: BTreeMap<String, ProcessMetrics>,
}

impl Default for MetricsStore {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            processes: BTreeMap::new(),
            caller: Counters::default(),
            caller_first: None,
            caller_last: None,
            latency: HashMap::new(),
            overall: latency::new_histogram(),
            pending: 0,
            samples: BTreeMap::new(),
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
    /// The stats reply, as DESIGN 6.2 shapes it.
    pub fn stats(&self) -> MessageStats {
        let mut total = Counters::default();
        total.add(&self.caller);
        let mut first = self.caller_first;
        let mut last = self.caller_last;
        let mut restarts_total = 0u64;
        let mut per_process = BTreeMap::new();
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
                },
            );
        }
        let mut latency_us: BTreeMap<String, _> = self
            .latency
            .iter()
            .map(|(service, h)| (service.clone(), latency::quantiles(h)))
            .collect();
        latency_us.insert("overall".into(), latency::quantiles(&self.overall));
        MessageStats {
            total: TotalStats {
                counters: message_counters(&total, first, last),
                faults: faults(&total, restarts_total),
                pending: self.pending,
            },
            per_process,
            latency_us,
            process_metrics: self.samples.clone(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
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
    }
}

impl Handler<ProcessLifecycle> for MetricsStore {
    type Result = ();

    fn handle(&mut self, msg: ProcessLifecycle, _: &mut Self::Context) {
        let record = self.processes.entry(msg.id.clone()).or_default();
        record.service = msg.service.clone();
        record.lifecycle = Some(msg);
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
