//! The actors' vocabulary: the messages that cross from one actor to
//! another.
//!
//! Why one file: the actors talk in both directions (the Router delivers to
//! bridges, bridges route through the Router; the Broker starts bridges,
//! bridges report to the Broker), so if each message lived beside its
//! handler the actor files would import each other. Here they import this
//! file, and an actor that must reach one that imports it holds a
//! `Recipient<…>` of the message, not an `Addr` of the actor.
//!
//! Two exceptions, both below this file so that nothing imports in a
//! circle: the messages that carry envelopes ([`Route`], [`Deliver`],
//! [`Call`], [`Publish`], [`Bounce`] and their batch, [`Envelopes`]) are
//! defined in `envelopes.rs`, beneath the same-thread fast path that hands
//! them on, and re-exported here; and the control requests only the Broker
//! handles (`SpawnService`, `ScaleService`, …) are defined beside it, in
//! `broker.rs`.

use actix::prelude::*;
use bytestring::ByteString;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use super::pacer::Pacer;
use super::same_thread::Handoff;
use crate::config::WorkerBalance;
use crate::protocol::rpc::{ProcessInfo, ProcessStatus};
use crate::protocol::{Envelope, ErrorCode, MessageStats, MessageType, SalvagedRequest};

pub use super::envelopes::{
    Bounce, Call, CallStream, CancelCall, Deliver, Envelopes, Publish, Route, next_call_id,
};

// ---------------------------------------------------------------------------
// The routing table (to the Router)

/// Adds a process to the routing table.
#[derive(Message)]
#[rtype(result = "Result<(), RouterError>")]
pub struct RegisterProcess {
    /// Its id (`service.N`, or `broker`).
    pub id: ByteString,
    /// The service it is a worker of.
    pub service: ByteString,
    /// Where its envelopes go.
    pub recipient: Recipient<Deliver>,
    /// Routable at once (else after [`SetReady`]).
    pub ready: bool,
    /// A subprocess bridge's read pacing: the Router releases each envelope's
    /// weight when it takes it (`None` for in-process senders).
    pub pacer: Option<Arc<Pacer>>,
    /// What a process on the Router's thread hands it: a subprocess
    /// bridge's inbox, through which a Router on that thread queues the
    /// process's envelopes directly, not through `recipient`; and its way
    /// in, through which the process then routes with method calls
    /// ([`InProcessWorker::handoff`](super::inproc::InProcessWorker::handoff)
    /// gives an in-process worker's). `None`: every delivery is a
    /// [`Deliver`] message, and everything the process sends a [`Route`].
    pub inbox: Option<Handoff>,
    /// It is told with `cancel` when a request delivered to it ends without
    /// its reply (false for MessagePack-RPC programs, which have no cancel).
    pub takes_cancel: bool,
}

impl RegisterProcess {
    /// Process `id` of `service`, routable at once, not paced.
    pub fn new(id: ByteString, service: ByteString, recipient: Recipient<Deliver>) -> Self {
        Self {
            id,
            service,
            recipient,
            ready: true,
            pacer: None,
            inbox: None,
            takes_cancel: true,
        }
    }
}

/// Registration failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    /// A process with that id is already registered.
    #[error("process {0:?} is already registered")]
    Duplicate(String),
}

/// Marks a process routable (its `ready` event came) or not.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetReady {
    /// The process.
    pub id: ByteString,
    /// Routable or not.
    pub ready: bool,
}

/// How the Router spreads a service's requests over its ready workers, and
/// after how many requests a worker is due for recycling. Sent by the
/// Broker when it starts a service and when a reload changes either; a
/// service never told keeps round-robin and no request limit.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetServicePolicy {
    /// The service.
    pub service: ByteString,
    /// Round-robin or least-pending.
    pub balance: WorkerBalance,
    /// Requests delivered to one worker (health checks not counted) after
    /// which the Router sends [`RecycleDue`] for it, once; 0: never.
    pub max_requests: u64,
}

/// Why a worker is recycled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecycleReason {
    /// It served `recycle.max_requests` requests.
    MaxRequests,
    /// It has been ready for `recycle.max_age_ms`.
    MaxAge,
    /// Its resident memory reached `recycle.max_rss_kb`.
    MaxRss,
}

impl RecycleReason {
    /// The name logged: `max_requests`, `max_age`, `max_rss`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxRequests => "max_requests",
            Self::MaxAge => "max_age",
            Self::MaxRss => "max_rss",
        }
    }
}

impl std::fmt::Display for RecycleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A worker reached a recycling limit: whoever supervises it replaces it.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RecycleDue {
    /// The worker.
    pub id: ByteString,
    /// Which limit.
    pub reason: RecycleReason,
}

/// Where the Router sends [`RecycleDue`] (the Broker, once it runs).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetRecycler(pub Recipient<RecycleDue>);

/// The drain at shutdown (or before a worker's restart) expired: every
/// request still in flight to process `id` (to every process with `None`)
/// gets a `cancel` (reason `shutting_down`) before its stdin closes. The
/// callers are answered as before, when it is removed.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CancelInFlight {
    /// The process, or all of them.
    pub id: Option<ByteString>,
}

/// Removes a process (it exited or was stopped). Requests in flight to it are
/// answered with `worker_exited` at once; requests it had sent are dropped.
/// Returns how many requests were failed.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct RemoveProcess {
    /// The process.
    pub id: ByteString,
    /// Why, for the error message.
    pub reason: String,
}

/// Frames from process `from` that were not valid envelopes:
/// counted as `bad_frames`; a salvaged request (reported alone, `count` 1)
/// gets `bad_request`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct BadFrame {
    /// The sending process.
    pub from: ByteString,
    /// How many bad frames this reports (one pipe read's worth).
    pub count: u64,
    /// What was wrong, for the error message.
    pub error: String,
    /// The request it seems to have been, if its correlation id was readable.
    pub request: Option<SalvagedRequest>,
}

/// A health check of process `id` failed (counted as its
/// `health_failures`).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct HealthFailure {
    /// The process.
    pub id: ByteString,
}

/// While draining, new requests are answered `shutting_down`; replies to
/// requests already in flight still go through.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetDraining(pub bool);

/// How many requests are in flight.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct PendingCount;

/// How many requests are in flight to one process (0 if it is unknown).
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct InFlightOf(pub ByteString);

/// Ships counters and histograms to the MetricsStore now.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct FlushMetrics;

// ---------------------------------------------------------------------------
// The control plane (Broker, Bridge)

/// A process's status changed: the Broker's table (what `ListProcesses`
/// shows) takes the new row. Sent by bridges.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct TrackProcess(pub ProcessInfo);

/// Stops a bridge's child (shutdown event, EOF, SIGTERM, SIGKILL) and then
/// the bridge; resolves once the child is reaped.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopProcess;

// ---------------------------------------------------------------------------
// Metrics (to the MetricsStore) and Sysmon

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
    /// Its events the Router dropped: lifecycle events (`shutdown`,
    /// `ready`) addressed to anyone but the broker, events to unknown
    /// targets.
    pub dropped_events: u64,
    /// Its failed health checks.
    pub health_failures: u64,
    /// `cancel` events the broker sent it (requests delivered to it that
    /// ended without its final reply).
    pub cancels: u64,
    /// Partial replies (`more = true`) it sent.
    pub partial_replies: u64,
    /// Times it was replaced by recycling (not crashes).
    pub recycles: u64,
}

impl Counters {
    /// Counts one envelope received from the process.
    #[inline]
    pub fn count(&mut self, kind: MessageType) {
        self.received += 1;
        match kind {
            MessageType::Request => self.requests += 1,
            MessageType::Response => self.responses += 1,
            MessageType::Event => self.events += 1,
            MessageType::Error => self.errors += 1,
        }
    }

    /// Adds another set of counts (deltas into totals).
    pub fn add(&mut self, o: &Counters) {
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
        self.dropped_events += o.dropped_events;
        self.health_failures += o.health_failures;
        self.cancels += o.cancels;
        self.partial_replies += o.partial_replies;
        self.recycles += o.recycles;
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
    /// Frames waiting in its stdin backlog, not yet written to the pipe (0
    /// for processes without a pipe).
    pub queue_depth: u64,
    /// Requests delivered to it and not yet answered (what `queue_capacity`
    /// bounds).
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
    /// Errors the Router answered in place of a worker since the last
    /// batch, by [`ErrorCode::index`].
    pub broker_errors: [u64; ErrorCode::ALL.len()],
    /// Requests in flight now.
    pub pending: u64,
    /// Remote nodes as the Router routes to them: counter deltas (what was
    /// sent to the node, what came from it) and the latency of the
    /// requests it served, since the last batch.
    pub nodes: Vec<NodeSnapshot>,
}

/// One remote node in a [`MetricsBatch`].
#[derive(Debug, Clone)]
pub struct NodeSnapshot {
    /// The node's name.
    pub node: String,
    /// Counter deltas, as for a process: `sent` = envelopes published to
    /// it, `requests` = its callers' requests, `responses`/`errors` = the
    /// replies it sent, `late_replies` … as for a worker.
    pub delta: Counters,
    /// Round trips of requests this node served, since the last batch.
    pub latency: Option<Histogram<u64>>,
}

// ---------------------------------------------------------------------------
// Federation: the Cluster actor and the Router

/// A remote node is up (its heartbeat came): routable as `@node`, with
/// the services it advertises. Sent on every advertisement; the first one
/// registers it.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct NodeUp {
    /// The node's name.
    pub node: ByteString,
    /// Its exported services and their ready workers.
    pub services: Vec<(ByteString, u32)>,
    /// Where envelopes for the node go (the Cluster actor publishes them).
    pub link: Recipient<Deliver>,
}

/// A remote node is gone (3 heartbeats missed, it left, the NATS
/// connection was lost): its requests in flight are answered
/// `worker_exited` now and it leaves the rotation. Returns how many.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct NodeDown {
    /// The node's name.
    pub node: ByteString,
    /// Why, for the error message.
    pub reason: String,
    /// The broker instance that sent this node's requests is gone (it
    /// left, restarted, or another instance now holds the name): what its
    /// callers have in flight here is dropped (their replies count as
    /// late), so none can reach the next instance's callers.
    pub callers_gone: bool,
    /// Forget the node altogether (it left, or was unheard for
    /// `forget_after_ms`): a call to it is then `unknown_target`.
    pub forget: bool,
}

/// Envelopes that came over NATS, each with the node it came from
/// (`@node`, as the Router knows it). Requests carry `source = id@node`,
/// replies `source = worker@node`: the Cluster stamped both.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct FromNodes(pub Vec<(ByteString, Envelope)>);

/// A request published to a node cannot be answered by it (NATS said no
/// responders, it was too large to publish): the Router answers `code`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct NodeFailed {
    /// The node (`@node`).
    pub node: ByteString,
    /// The caller (a local process id, or `@caller`).
    pub origin: ByteString,
    /// The caller's correlation id.
    pub correlation_id: u64,
    /// `unavailable`, `too_large`, …
    pub code: ErrorCode,
    /// The error's message.
    pub message: String,
}

/// The nodes of the cluster, this one first (`ListNodes`); empty on a
/// single host. Answered by the MetricsStore from the last [`ClusterState`].
#[derive(Debug, Message)]
#[rtype(result = "Vec<crate::protocol::rpc::NodeInfo>")]
pub struct ListNodes;

/// The broker is stopping: the Cluster tells the other nodes it leaves.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Leave;

/// Ready workers per local service (for this node's heartbeat).
#[derive(Debug, Message)]
#[rtype(result = "Vec<(String, u32)>")]
pub struct ReadyCounts;

/// The Cluster's view, pushed to the MetricsStore when it changes and at
/// every heartbeat: stats, `/metrics` and `ListNodes` read it.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ClusterState {
    /// The cluster's name.
    pub name: String,
    /// This node.
    pub node: String,
    /// What this node advertises.
    pub services: BTreeMap<String, u32>,
    /// Connected to a NATS server now.
    pub connected: bool,
    /// Connections established after the first.
    pub reconnects: u64,
    /// Slow-consumer events the NATS client reported (messages it dropped).
    pub slow_consumers: u64,
    /// The server's `max_payload` (0 before the first connection).
    pub max_payload: u64,
    /// Every node kept (at most `max_nodes`).
    pub nodes: Vec<NodeState>,
    /// This broker instance's id.
    pub instance: u64,
    /// Another instance holds this node's name: this broker stays out.
    pub conflict: bool,
    /// Heartbeats that could not be read.
    pub malformed_heartbeats: u64,
    /// Heartbeats (and requests) from new nodes ignored: the table was full.
    pub nodes_ignored: u64,
    /// Advertised services ignored past 1 000 per node.
    pub services_ignored: u64,
    /// Nodes forgotten (unheard for `forget_after_ms`, or evicted to make
    /// room).
    pub nodes_forgotten: u64,
    /// Requests, cancels and replies from other nodes dropped unread: they
    /// could not be read, or a reply or cancel came from an instance other
    /// than the one routed to under its node name.
    pub dropped_messages: u64,
}

/// One remote node in [`ClusterState`].
#[derive(Debug, Clone)]
pub struct NodeState {
    /// Its name.
    pub node: String,
    /// In the rotation now.
    pub up: bool,
    /// Its exported services and ready workers, as last advertised.
    pub services: BTreeMap<String, u32>,
    /// When it was last heard from.
    pub last_seen: std::time::Instant,
    /// Requests to it that NATS answered "no responders".
    pub no_responders: u64,
    /// Requests to it refused as larger than the server's `max_payload`.
    pub too_large: u64,
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

/// Processes that are gone from the configuration (scaled down, or their
/// service removed): their rows leave the stats and `/metrics`, and what
/// they did stays in the totals. A process live again meanwhile is kept.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ForgetProcesses(pub Vec<String>);

/// Worker `id` was replaced by recycling: counted as its `recycles`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CountRecycle {
    /// The worker.
    pub id: String,
}

/// Stores `/proc` samples; returns how many were stored.
#[derive(Debug, Message)]
#[rtype(result = "u64")]
pub struct SubmitMetrics(pub Vec<crate::protocol::ProcessMetrics>);

/// Asks for the stats reply (flush the Router first for exact counters:
/// [`fresh_stats`](super::metrics_store::fresh_stats) does both).
#[derive(Debug, Message)]
#[rtype(result = "MessageStats")]
pub struct GetMessageStats;

/// Sum of the recorded latencies per service (and `overall`), in
/// microseconds: what a Prometheus summary needs besides the quantiles.
#[derive(Debug, Message)]
#[rtype(result = "BTreeMap<String, f64>")]
pub struct GetLatencySums;

/// Starts sampling `pid` under process id `id` (replacing an earlier pid).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Watch {
    /// Process id (`echo.0`).
    pub id: String,
    /// Its OS pid.
    pub pid: u32,
    /// Its service's `recycle.max_rss_kb`: the first sample of this pid
    /// at or above it sends [`RecycleDue`] (once; 0: never).
    pub max_rss_kb: u64,
}

/// Stops sampling `id`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Unwatch {
    /// Process id.
    pub id: String,
}

/// Samples now (as the interval would), submits, and returns the samples.
#[derive(Debug, Message)]
#[rtype(result = "Vec<crate::protocol::ProcessMetrics>")]
pub struct SampleNow;
