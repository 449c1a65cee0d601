//! Router: the hot path (DESIGN 5.1, 5.2).
//!
//! Every envelope a process sends arrives here as [`Route`]; Rust callers send
//! [`Call`]. The Router resolves `target` (process id, service name with
//! round-robin over ready workers, `broker`, `*`), delivers with [`Deliver`],
//! and remembers each request in the pending table so that exactly one reply
//! goes back: the worker's, or an error it generates (`busy`, `timeout`,
//! `worker_exited`, …). It never decodes a payload.
//!
//! Why counters and histograms live here and not in the MetricsStore: one
//! actor message per sample would cost more than the routing itself. The
//! Router owns them and ships a batch every `metrics_flush_interval` (and on
//! [`FlushMetrics`], which stats requests send first, so stats are exact).
//!
//! Why the timers run in their own task: actix polls every future spawned into
//! an actor's context each time the context wakes, so a deadline timer and a
//! flush interval inside the Router would be polled on every message. They
//! live in a local task beside it and send [`FlushMetrics`] and an expiry
//! message when due.
//!
//! Why the queue bound is a counter: actix mailboxes do not bound memory
//! (`do_send` ignores capacity), so the Router counts requests in flight per
//! process and answers `busy` past `queue_capacity`.

use actix::prelude::*;
use bytestring::ByteString;
use hdrhistogram::Histogram;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{Notify, oneshot};

use super::latency;
use super::metrics_store::{Counters, MetricsBatch, MetricsStore, ProcessSnapshot};
use super::pacer::Pacer;
use super::pending::{FastMap, Key, Pending, PendingTable, RecentlyExpired, ReplyTo};
use crate::config::BrokerConfig;
use crate::names::{BROADCAST, BROKER, CALLER};
use crate::protocol::{Envelope, ErrorCode, MessageType, SalvagedRequest};

/// An envelope for a process: a request or event addressed to it, or a reply
/// to one of its requests. Whatever backs the process (an in-process worker,
/// a subprocess bridge, the Broker) implements `Handler<Deliver>`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Deliver(pub Envelope);

/// Several envelopes for one process, in order (see [`RegisterProcess::batch`]).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct DeliverBatch(pub Vec<Envelope>);

/// An envelope sent by process `from` (its `source` is overwritten with `from`).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Route {
    /// The sending process; authoritative, whatever the envelope says.
    pub from: ByteString,
    /// What it sent.
    pub envelope: Envelope,
}

/// Several envelopes sent by process `from`, in order: what one read of its
/// pipe brought. Same as one [`Route`] each, for one mailbox hop.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RouteBatch {
    /// The sending process.
    pub from: ByteString,
    /// What it sent, oldest first.
    pub envelopes: Vec<Envelope>,
}

/// A request from a Rust caller of the embedding API. The Router assigns the
/// correlation id and answers exactly once on `reply`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Call {
    /// The request (`correlation_id` is replaced).
    pub envelope: Envelope,
    /// Where the reply (a response or an error envelope) goes.
    pub reply: oneshot::Sender<Envelope>,
}

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
    /// Where envelopes for the process may go several at a time: what routing
    /// one [`RouteBatch`] produces for it is sent as one [`DeliverBatch`]
    /// (`None`: always one [`Deliver`] each).
    pub batch: Option<Recipient<DeliverBatch>>,
}

/// A frame from process `from` that was not a valid envelope (DESIGN 5.4):
/// counted as `bad_frames`; a salvaged request gets `bad_request`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct BadFrame {
    /// The sending process.
    pub from: ByteString,
    /// What was wrong, for the error message.
    pub error: String,
    /// The request it seems to have been, if its correlation id was readable.
    pub request: Option<SalvagedRequest>,
}

/// An envelope the process `to` could not take (its outbox is full, or the
/// frame is too large for its pipe). A request is answered with `code` on its
/// worker's behalf and the worker's slot freed; an event is dropped. Both
/// count as `busy_rejections` of their sender when `code` is `busy`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Bounce {
    /// The process that could not take it.
    pub to: ByteString,
    /// The envelope as it was delivered.
    pub envelope: Envelope,
    /// Error code for the requester.
    pub code: ErrorCode,
    /// Error message for the requester.
    pub message: String,
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

/// Ships counters and histograms to the MetricsStore now.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct FlushMetrics;

/// While draining, new requests are answered `shutting_down`; replies to
/// requests already in flight still go through.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetDraining(pub bool);

/// How many requests are in flight.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct PendingCount;

/// Registration failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    /// A process with that id is already registered.
    #[error("process {0:?} is already registered")]
    Duplicate(String),
}

struct ProcessEntry {
    service: usize,
    pacer: Option<Arc<Pacer>>,
    recipient: Recipient<Deliver>,
    batch: Option<Recipient<DeliverBatch>>,
    /// Held back while a [`RouteBatch`] is routed (only with `batch`).
    outgoing: Vec<Envelope>,
    ready: bool,
    in_flight: usize,
    delta: Counters,
    first_seen: Option<Instant>,
    last_seen: Option<Instant>,
}

impl ProcessEntry {
    /// Hands an envelope to the process and counts it. Callers check
    /// `recipient.connected()` first: they still own what to do if it is gone.
    /// While `batching`, a process that takes batches gets it at the end of
    /// the batch; returns true when this is its first envelope held back.
    #[inline]
    fn deliver(&mut self, envelope: Envelope, now: Instant, batching: bool) -> bool {
        self.delta.sent += 1;
        self.saw(now);
        if batching && self.batch.is_some() {
            self.outgoing.push(envelope);
            self.outgoing.len() == 1
        } else {
            self.recipient.do_send(Deliver(envelope));
            false
        }
    }

    /// Sends what was held back during a batch.
    fn flush(&mut self) {
        if let Some(batch) = &self.batch
            && !self.outgoing.is_empty()
        {
            batch.do_send(DeliverBatch(std::mem::take(&mut self.outgoing)));
        }
    }

    fn saw(&mut self, now: Instant) {
        self.first_seen.get_or_insert(now);
        self.last_seen = Some(now);
    }
}

struct ServiceEntry {
    name: ByteString,
    workers: Vec<ByteString>,
    cursor: usize,
    histogram: Histogram<u64>,
}

/// Shared between the Router and its timer tasks (same arbiter thread).
#[derive(Default)]
struct Timer {
    /// The deadline the task sleeps until; may be stale (answered), which only
    /// costs one spurious expiry pass.
    armed: Cell<Option<Instant>>,
    /// Wakes the task when `armed` moves earlier, or when the Router stops.
    wake: Notify,
    /// Set when the Router stops; the tasks then end.
    stopped: Cell<bool>,
}

/// Sent by the timer task when the armed deadline has passed.
#[derive(Message)]
#[rtype(result = "()")]
struct Expire;

/// Sleeps until the armed deadline and tells the Router; ends with it.
async fn deadline_task(router: Addr<Router>, timer: Rc<Timer>) {
    while !timer.stopped.get() {
        match timer.armed.get() {
            None => timer.wake.notified().await,
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {
                        timer.armed.set(None);
                        router.do_send(Expire);
                    }
                    () = timer.wake.notified() => {}
                }
            }
        }
    }
}

/// Asks the Router to ship its metrics every `every`; ends with it.
async fn flush_task(router: Addr<Router>, timer: Rc<Timer>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    while !timer.stopped.get() {
        ticks.tick().await;
        router.do_send(FlushMetrics);
    }
}

/// The Router actor. Start it with [`Router::new`] and `Actor::start`, or let
/// the embedding builder do it.
pub struct Router {
    config: BrokerConfig,
    metrics: Addr<MetricsStore>,
    processes: FastMap<ByteString, ProcessEntry>,
    services: Vec<ServiceEntry>,
    service_index: FastMap<ByteString, usize>,
    pending: PendingTable,
    expired: RecentlyExpired,
    next_call_id: u64,
    caller: Counters,
    retired: Vec<ProcessSnapshot>,
    timer: Rc<Timer>,
    draining: bool,
    clock: (Instant, SystemTime),
    caller_id: ByteString,
    /// Routing a [`RouteBatch`]: deliveries to batch-taking processes wait.
    batching: bool,
    /// Processes with envelopes held back in this batch.
    held: Vec<ByteString>,
}

impl Router {
    /// A Router that ships its metrics to `metrics`.
    pub fn new(config: BrokerConfig, metrics: Addr<MetricsStore>) -> Self {
        Self {
            config,
            metrics,
            processes: FastMap::default(),
            services: Vec::new(),
            service_index: FastMap::default(),
            pending: PendingTable::default(),
            expired: RecentlyExpired::new(65_536),
            next_call_id: 0,
            caller: Counters::default(),
            retired: Vec::new(),
            timer: Rc::new(Timer::default()),
            draining: false,
            clock: (Instant::now(), SystemTime::now()),
            caller_id: ByteString::from_static(CALLER),
            batching: false,
            held: Vec::new(),
        }
    }

    fn wall(&self, at: Instant) -> SystemTime {
        self.clock.1 + at.saturating_duration_since(self.clock.0)
    }

    fn service_slot(&mut self, name: &ByteString) -> usize {
        if let Some(&i) = self.service_index.get(name) {
            return i;
        }
        self.services.push(ServiceEntry {
            name: name.clone(),
            workers: Vec::new(),
            cursor: 0,
            histogram: latency::new_histogram(),
        });
        let i = self.services.len() - 1;
        self.service_index.insert(name.clone(), i);
        i
    }

    /// Counts one envelope received from `from`.
    fn count_received(&mut self, from: &ByteString, envelope: &Envelope, now: Instant) -> bool {
        let kind = envelope.kind;
        let Some(entry) = self.processes.get_mut(from) else {
            return false;
        };
        if let Some(pacer) = &entry.pacer {
            pacer.consumed(Pacer::weight(envelope));
        }
        entry.saw(now);
        entry.delta.count(kind);
        true
    }

    fn counters_of(&mut self, id: &ByteString) -> Option<&mut Counters> {
        match self.processes.get_mut(id) {
            Some(entry) => Some(&mut entry.delta),
            None if *id == self.caller_id => Some(&mut self.caller),
            None => None,
        }
    }

    /// Delivers an envelope to a process; false if it is gone.
    fn deliver(&mut self, to: &ByteString, envelope: Envelope, now: Instant) -> bool {
        match self.processes.get_mut(to) {
            Some(entry) if entry.recipient.connected() => {
                if entry.deliver(envelope, now, self.batching) {
                    self.held.push(to.clone());
                }
                true
            }
            _ => false,
        }
    }

    /// Sends a broker-generated error for `request` to its origin.
    fn reject(
        &mut self,
        request: &Envelope,
        origin: &ByteString,
        reply_to: ReplyTo,
        code: ErrorCode,
        message: String,
        now: Instant,
    ) {
        let mut error = request.broker_error(code, message);
        error.target = origin.clone();
        match reply_to {
            ReplyTo::Caller(tx) => {
                let _ = tx.send(error);
            }
            ReplyTo::Process => {
                self.deliver(origin, error, now);
            }
        }
    }

    /// Resolves a request's target to one process, or says why not.
    fn pick(&mut self, target: &ByteString) -> Result<ByteString, (ErrorCode, String)> {
        let capacity = self.config.queue_capacity;
        if let Some(entry) = self.processes.get(target) {
            if !entry.ready {
                return Err((
                    ErrorCode::Unavailable,
                    format!("process {target:?} is not ready"),
                ));
            }
            if entry.in_flight >= capacity {
                return Err((
                    ErrorCode::Busy,
                    format!("process {target:?} has {capacity} requests in flight"),
                ));
            }
            return Ok(target.clone());
        }
        let Some(&slot) = self.service_index.get(target) else {
            return Err((
                ErrorCode::UnknownTarget,
                format!("no process or service {target:?}"),
            ));
        };
        let service = &mut self.services[slot];
        let n = service.workers.len();
        let mut any_ready = false;
        for step in 0..n {
            let i = (service.cursor + step) % n;
            let Some(entry) = self.processes.get(&service.workers[i]) else {
                continue;
            };
            if !entry.ready {
                continue;
            }
            any_ready = true;
            if entry.in_flight < capacity {
                service.cursor = (i + 1) % n;
                return Ok(service.workers[i].clone());
            }
        }
        if any_ready {
            Err((
                ErrorCode::Busy,
                format!("every worker of {target:?} has {capacity} requests in flight"),
            ))
        } else {
            Err((
                ErrorCode::Unavailable,
                format!("service {target:?} has no ready worker"),
            ))
        }
    }

    fn route_request(
        &mut self,
        origin: ByteString,
        mut envelope: Envelope,
        reply_to: ReplyTo,
        now: Instant,
    ) {
        if self.draining {
            let message = "the broker is shutting down".into();
            self.reject(
                &envelope,
                &origin,
                reply_to,
                ErrorCode::ShuttingDown,
                message,
                now,
            );
            return;
        }
        let key: Key = (origin.clone(), envelope.correlation_id);
        if self.pending.contains(&key) {
            let message = format!(
                "correlation_id {} is already in flight from {origin:?}",
                key.1
            );
            self.reject(
                &envelope,
                &origin,
                reply_to,
                ErrorCode::BadRequest,
                message,
                now,
            );
            return;
        }
        let worker = match self.pick(&envelope.target) {
            Ok(worker) => worker,
            Err((code, message)) => {
                if code == ErrorCode::Busy
                    && let Some(counters) = self.counters_of(&origin)
                {
                    counters.busy_rejections += 1;
                }
                self.reject(&envelope, &origin, reply_to, code, message, now);
                return;
            }
        };
        let timeout = envelope
            .timeout_ms
            .map_or(self.config.request_timeout, Duration::from_millis);
        let deadline = now + timeout;
        let method = envelope.id.clone();
        envelope.source = origin.clone();
        // One lookup for delivery and the in-flight count (the hot path).
        match self.processes.get_mut(&worker) {
            Some(entry) if entry.recipient.connected() => {
                if entry.deliver(envelope, now, self.batching) {
                    self.held.push(worker.clone());
                }
                entry.in_flight += 1;
            }
            _ => {
                self.remove_process(&worker, "its actor stopped", now);
                let message = format!("worker {worker:?} is gone");
                self.reject(
                    &envelope,
                    &origin,
                    reply_to,
                    ErrorCode::WorkerExited,
                    message,
                    now,
                );
                return;
            }
        }
        // Cannot collide: checked above, and nothing ran in between.
        let _ = self
            .pending
            .insert(key, worker, method, now, deadline, reply_to);
        self.arm(deadline);
    }

    /// Makes the timer task wake by `deadline` at the latest.
    fn arm(&self, deadline: Instant) {
        if self.timer.armed.get().is_none_or(|armed| deadline < armed) {
            self.timer.armed.set(Some(deadline));
            self.timer.wake.notify_one();
        }
    }
    fn route_reply(&mut self, from: ByteString, envelope: Envelope, now: Instant) {
        let key: Key = (envelope.target.clone(), envelope.correlation_id);
        let pending = match self.pending.remove(&key) {
            Some(pending) if pending.worker == from => pending,
            other => {
                let late = other.is_none() && self.expired.take(&key);
                if let Some(pending) = other {
                    // Forged: that request went to another process.
                    self.pending.restore(key.clone(), pending);
                }
                if let Some(counters) = self.counters_of(&from) {
                    if late {
                        counters.late_replies += 1;
                    } else {
                        counters.unmatched_replies += 1;
                    }
                }
                tracing::debug!(process = %from, target = %envelope.target,
                    correlation_id = envelope.correlation_id, late, "reply dropped");
                return;
            }
        };
        self.finish(&pending, now);
        match pending.reply_to {
            ReplyTo::Caller(tx) => {
                let _ = tx.send(envelope);
            }
            ReplyTo::Process => {
                self.deliver(&key.0, envelope, now);
            }
        }
    }
    /// Bookkeeping when a request is answered by its worker.
    fn finish(&mut self, pending: &Pending, now: Instant) {
        if let Some(entry) = self.processes.get_mut(&pending.worker) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
            if self.config.record_latency {
                let elapsed = now.saturating_duration_since(pending.start);
                // One histogram per sample; `overall` is merged at flush.
                latency::record(&mut self.services[entry.service].histogram, elapsed);
            }
        }
    }

    fn route_event(&mut self, from: &ByteString, envelope: Envelope, now: Instant) {
        let target = envelope.target.clone();
        let recipients: Vec<ByteString> = if &*target == BROADCAST {
            self.processes
                .iter()
                .filter(|(id, e)| e.ready && *id != from && &***id != BROKER)
                .map(|(id, _)| id.clone())
                .collect()
        } else if self.processes.contains_key(&target) {
            vec![target]
        } else if let Some(&slot) = self.service_index.get(&target) {
            self.services[slot]
                .workers
                .iter()
                .filter(|id| self.processes.get(*id).is_some_and(|e| e.ready))
                .cloned()
                .collect()
        } else {
            tracing::warn!(process = %from, target = %envelope.target, event = %envelope.id, "event to unknown target dropped");
            return;
        };
        let Some((last, rest)) = recipients.split_last() else {
            return;
        };
        for id in rest {
            self.deliver(id, envelope.clone(), now);
        }
        self.deliver(last, envelope, now);
    }

    fn remove_process(&mut self, id: &ByteString, reason: &str, now: Instant) -> usize {
        let Some(entry) = self.processes.remove(id) else {
            return 0;
        };
        let service = &mut self.services[entry.service];
        service.workers.retain(|w| w != id);
        if service.cursor >= service.workers.len() {
            service.cursor = 0;
        }
        let snapshot = self.snapshot(id, &entry);
        self.retired.push(ProcessSnapshot {
            removed: true,
            ..snapshot
        });
        // Requests it had sent: nobody to answer. Their workers' slots are
        // freed, and a reply that still comes counts as late, not as a lie.
        for (key, orphan) in self.pending.drain_where(|key, _| key.0 == *id) {
            if let Some(worker) = self.processes.get_mut(&orphan.worker) {
                worker.in_flight = worker.in_flight.saturating_sub(1);
            }
            self.expired.insert(key);
        }
        // Requests in flight to it: answered now, not at their deadline.
        let failed = self.pending.drain_where(|_, p| p.worker == *id);
        let count = failed.len();
        for ((origin, correlation_id), pending) in failed {
            let mut request = Envelope::request(id.clone(), pending.method.clone(), correlation_id);
            request.source = origin.clone();
            let message = format!("worker {id:?} exited with the request in flight ({reason})");
            self.reject(
                &request,
                &origin,
                pending.reply_to,
                ErrorCode::WorkerExited,
                message,
                now,
            );
        }
        count
    }

    fn expire(&mut self) {
        let now = Instant::now();
        for (key, pending) in self.pending.expire(now) {
            if let Some(entry) = self.processes.get_mut(&pending.worker) {
                entry.in_flight = entry.in_flight.saturating_sub(1);
            }
            if let Some(counters) = self.counters_of(&key.0) {
                counters.timeouts += 1;
            }
            self.expired.insert(key.clone());
            let waited = pending.deadline.saturating_duration_since(pending.start);
            let mut request =
                Envelope::request(pending.worker.clone(), pending.method.clone(), key.1);
            request.source = key.0.clone();
            let message = format!(
                "no reply from {:?} within {} ms",
                pending.worker,
                waited.as_millis()
            );
            self.reject(
                &request,
                &key.0,
                pending.reply_to,
                ErrorCode::Timeout,
                message,
                now,
            );
        }
        if let Some(next) = self.pending.next_deadline() {
            self.arm(next);
        }
    }
    fn snapshot(&self, id: &ByteString, entry: &ProcessEntry) -> ProcessSnapshot {
        ProcessSnapshot {
            id: id.to_string(),
            service: self.services[entry.service].name.to_string(),
            delta: entry.delta,
            first_seen: entry.first_seen.map(|t| self.wall(t)),
            last_seen: entry.last_seen.map(|t| self.wall(t)),
            queue_depth: entry.in_flight as u64,
            pending: entry.in_flight as u64,
            ready: entry.ready,
            removed: false,
        }
    }

    fn flush(&mut self) {
        let mut processes = std::mem::take(&mut self.retired);
        processes.extend(
            self.processes
                .iter()
                .map(|(id, entry)| self.snapshot(id, entry)),
        );
        for entry in self.processes.values_mut() {
            entry.delta = Counters::default();
            entry.first_seen = None;
        }
        let mut latency = Vec::new();
        let mut overall: Option<Histogram<u64>> = None;
        for service in &mut self.services {
            if service.histogram.is_empty() {
                continue;
            }
            // Swap in a fresh histogram (a lazily zeroed allocation) rather
            // than copying 139 KB of buckets and zeroing them again.
            let shipped = std::mem::replace(&mut service.histogram, latency::new_histogram());
            match &mut overall {
                // Same bounds everywhere, so adding cannot fail.
                Some(all) => {
                    let _ = all.add(&shipped);
                }
                None => overall = Some(shipped.clone()),
            }
            latency.push((service.name.to_string(), shipped));
        }
        let caller = std::mem::take(&mut self.caller);
        self.metrics.do_send(MetricsBatch {
            at: SystemTime::now(),
            processes,
            caller,
            latency,
            overall,
            pending: self.pending.len() as u64,
        });
    }
}

impl Actor for Router {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let every = self.config.metrics_flush_interval;
        actix::spawn(deadline_task(ctx.address(), Rc::clone(&self.timer)));
        actix::spawn(flush_task(ctx.address(), Rc::clone(&self.timer), every));
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.flush();
        Running::Stop
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.timer.stopped.set(true);
        self.timer.wake.notify_one();
    }
}

impl Handler<Expire> for Router {
    type Result = ();

    fn handle(&mut self, _: Expire, _: &mut Self::Context) {
        self.expire();
    }
}

impl Router {
    fn route(&mut self, from: &ByteString, mut envelope: Envelope, now: Instant) {
        if !self.count_received(from, &envelope, now) {
            tracing::debug!(process = %from, "envelope from an unregistered process dropped");
            return;
        }
        envelope.source = from.clone();
        match envelope.kind {
            MessageType::Request => {
                self.route_request(from.clone(), envelope, ReplyTo::Process, now);
            }
            MessageType::Response | MessageType::Error => {
                self.route_reply(from.clone(), envelope, now);
            }
            MessageType::Event => self.route_event(from, envelope, now),
        }
    }
}

impl Handler<Route> for Router {
    type Result = ();

    fn handle(&mut self, msg: Route, _: &mut Self::Context) {
        self.route(&msg.from, msg.envelope, Instant::now());
    }
}

impl Handler<RouteBatch> for Router {
    type Result = ();

    fn handle(&mut self, msg: RouteBatch, _: &mut Self::Context) {
        let now = Instant::now();
        self.batching = true;
        for envelope in msg.envelopes {
            self.route(&msg.from, envelope, now);
        }
        self.batching = false;
        for id in std::mem::take(&mut self.held) {
            if let Some(entry) = self.processes.get_mut(&id) {
                entry.flush();
            }
        }
    }
}

impl Handler<Call> for Router {
    type Result = ();

    fn handle(&mut self, msg: Call, _: &mut Self::Context) {
        let now = Instant::now();
        let Call {
            mut envelope,
            reply,
        } = msg;
        self.next_call_id += 1;
        envelope.correlation_id = self.next_call_id;
        envelope.kind = MessageType::Request;
        let origin = self.caller_id.clone();
        self.caller.count(MessageType::Request);
        self.route_request(origin, envelope, ReplyTo::Caller(reply), now);
    }
}

impl Handler<RegisterProcess> for Router {
    type Result = Result<(), RouterError>;

    fn handle(&mut self, msg: RegisterProcess, _: &mut Self::Context) -> Self::Result {
        if self.processes.contains_key(&msg.id) {
            return Err(RouterError::Duplicate(msg.id.to_string()));
        }
        let service = self.service_slot(&msg.service);
        self.services[service].workers.push(msg.id.clone());
        self.processes.insert(
            msg.id,
            ProcessEntry {
                service,
                pacer: msg.pacer,
                recipient: msg.recipient,
                batch: msg.batch,
                outgoing: Vec::new(),
                ready: msg.ready,
                in_flight: 0,
                delta: Counters::default(),
                first_seen: None,
                last_seen: None,
            },
        );
        Ok(())
    }
}

impl Handler<SetReady> for Router {
    type Result = ();

    fn handle(&mut self, msg: SetReady, _: &mut Self::Context) {
        if let Some(entry) = self.processes.get_mut(&msg.id) {
            entry.ready = msg.ready;
        }
    }
}

impl Handler<RemoveProcess> for Router {
    type Result = usize;

    fn handle(&mut self, msg: RemoveProcess, _: &mut Self::Context) -> usize {
        self.remove_process(&msg.id, &msg.reason, Instant::now())
    }
}

impl Handler<FlushMetrics> for Router {
    type Result = ();

    fn handle(&mut self, _: FlushMetrics, _: &mut Self::Context) {
        self.flush();
    }
}

impl Handler<SetDraining> for Router {
    type Result = ();

    fn handle(&mut self, msg: SetDraining, _: &mut Self::Context) {
        self.draining = msg.0;
    }
}

impl Handler<PendingCount> for Router {
    type Result = usize;

    fn handle(&mut self, _: PendingCount, _: &mut Self::Context) -> usize {
        self.pending.len()
    }
}

impl Handler<BadFrame> for Router {
    type Result = ();

    fn handle(&mut self, msg: BadFrame, _: &mut Self::Context) {
        let now = Instant::now();
        let Some(entry) = self.processes.get_mut(&msg.from) else {
            return;
        };
        entry.delta.bad_frames += 1;
        entry.saw(now);
        if let Some(salvaged) = msg.request {
            let method = salvaged.id.unwrap_or_default();
            let mut request = Envelope::request(msg.from.clone(), method, salvaged.correlation_id);
            request.source = msg.from.clone();
            let message = format!("invalid envelope: {}", msg.error);
            self.reject(
                &request,
                &msg.from,
                ReplyTo::Process,
                ErrorCode::BadRequest,
                message,
                now,
            );
        }
    }
}

impl Handler<Bounce> for Router {
    type Result = ();

    fn handle(&mut self, msg: Bounce, _: &mut Self::Context) {
        let now = Instant::now();
        let Bounce {
            to,
            envelope,
            code,
            message,
        } = msg;
        let origin = envelope.source.clone();
        if code == ErrorCode::Busy
            && let Some(counters) = self.counters_of(&origin)
        {
            counters.busy_rejections += 1;
        }
        if envelope.kind != MessageType::Request {
            tracing::debug!(process = %to, from = %origin, id = %envelope.id, %code, "envelope dropped: {message}");
            return;
        }
        let key: Key = (origin.clone(), envelope.correlation_id);
        let pending = match self.pending.remove(&key) {
            Some(pending) if pending.worker == to => pending,
            other => {
                // Already answered (timed out, or the worker was removed).
                if let Some(pending) = other {
                    self.pending.restore(key, pending);
                }
                return;
            }
        };
        if let Some(entry) = self.processes.get_mut(&to) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
        self.reject(&envelope, &origin, pending.reply_to, code, message, now);
    }
}
