//! Router: the hot path (DESIGN 5.1, 5.2).
//!
//! Every envelope a process sends arrives here in a [`Route`]; Rust callers
//! send [`Call`]. A process or caller on the Router's own thread makes a
//! method call instead (module `link`, `call_here`), which spares a
//! mailbox hop and a wake-up of the Router. The Router resolves `target`
//! (process id, service name with round-robin over ready workers, `broker`,
//! `*`), hands the envelope to the process table (`table.rs`), which queues
//! it in the destination's inbox (a bridge on this thread) or holds it for
//! one [`Deliver`](super::messages::Deliver) per destination at the end of
//! the batch, and remembers each request in the pending table (`pending.rs`)
//! so that exactly one reply goes back: the worker's, or an error the
//! Router generates (`busy`, `timeout`, `worker_exited`, …). It never
//! decodes a payload.
//!
//! Read it top to bottom: the request path (`route` →
//! `route_request` → `route_reply`), then the ways a request ends without
//! its worker's reply (bounce, removal, expiry, bad frame), then the
//! control messages and metrics.
//!
//! Why counters and histograms live here and not in the MetricsStore: one
//! actor message per sample would cost more than the routing itself. The
//! Router owns them and ships a batch every `metrics_flush_interval` (and on
//! [`FlushMetrics`], which stats requests send first, so stats are exact).
//!
//! Why the queue bound is a counter: actix mailboxes do not bound memory
//! (`do_send` ignores capacity), so the Router counts the requests in flight
//! to each process and answers `busy` past `queue_capacity`.

use actix::prelude::*;
use bytestring::ByteString;
use hdrhistogram::Histogram;
use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use super::deadline::{Deadline, Expire};
use super::latency;
use super::log_limit::{LogLimit, LogLine};
use super::messages::{
    BadFrame, Bounce, Call, Counters, Envelopes, FlushMetrics, FromNodes, HealthFailure,
    InFlightOf, MetricsBatch, NodeDown, NodeFailed, NodeSnapshot, NodeUp, PendingCount,
    ProcessSnapshot, Publish, ReadyCounts, RegisterProcess, RemoveProcess, Route, RouterError,
    SetDraining, SetReady,
};
use super::nodes::{self, Choice, Nodes};
use super::pacer::Pacer;
use super::pending::{Key, NotPending, PendingTable, RecentlyExpired, ReplyTo};
use super::table::{ProcessEntry, ProcessTable};
use crate::config::BrokerConfig;
use crate::names::{self, BROKER, CALLER};
use crate::protocol::{Envelope, ErrorCode, MessageType};

/// The Router actor. Start it with [`Router::new`] and `Actor::start`, or let
/// the embedding builder do it.
///
/// Its state lives behind an `Rc` so that what runs on the same thread (a
/// bridge, an in-process worker, a Rust caller) can hand it envelopes with
/// a method call (`LocalRouter`) instead of a [`Route`] or [`Call`]
/// message; every other way in is a message.
pub struct Router {
    core: Rc<RefCell<Core>>,
    key: RouterKey,
}

/// The Router's state, and what it does with each message.
pub(crate) struct Core {
    config: BrokerConfig,
    metrics: Recipient<MetricsBatch>,
    table: ProcessTable,
    /// Other nodes of the cluster (empty on a single host).
    nodes: Nodes,
    pending: PendingTable,
    expired: RecentlyExpired,
    deadline: Deadline,
    draining: bool,
    /// Embedded Rust callers: their correlation ids and counters.
    caller_id: ByteString,
    next_call_id: u64,
    caller: Counters,
    /// Processes removed since the last metrics batch.
    retired: Vec<ProcessSnapshot>,
    /// Errors the Router answered in place of a worker since the last
    /// batch, by [`ErrorCode::index`].
    broker_errors: [u64; ErrorCode::ALL.len()],
    clock: (Instant, SystemTime),
    /// This state, for the links of the processes on its thread.
    me: Weak<RefCell<Core>>,
    /// Set once the actor has stopped: nothing more is routed.
    stopped: bool,
    /// Lines about nodes joining and leaving: nodes that come and go by
    /// the thousand must not flood the log.
    node_log: LogLimit,
}

impl Router {
    /// A Router that ships its metrics to `metrics` (the MetricsStore).
    pub fn new(config: BrokerConfig, metrics: impl Into<Recipient<MetricsBatch>>) -> Self {
        let nodes = if config.cluster.enabled() {
            Nodes::new(config.cluster.node_name(), config.cluster.balance)
        } else {
            Nodes::default()
        };
        let metrics = metrics.into();
        let core = Rc::new_cyclic(|me| {
            RefCell::new(Core {
                config,
                metrics,
                table: ProcessTable::default(),
                nodes,
                pending: PendingTable::default(),
                expired: RecentlyExpired::new(65_536),
                deadline: Deadline::default(),
                draining: false,
                caller_id: ByteString::from_static(CALLER),
                next_call_id: 0,
                caller: Counters::default(),
                retired: Vec::new(),
                broker_errors: [0; ErrorCode::ALL.len()],
                clock: (Instant::now(), SystemTime::now()),
                me: me.clone(),
                stopped: false,
                node_log: LogLimit::default(),
            })
        });
        static NEXT_KEY: AtomicU64 = AtomicU64::new(0);
        let key = RouterKey(NEXT_KEY.fetch_add(1, Ordering::Relaxed));
        Self { core, key }
    }

    /// What [`call_here`] finds this Router by, once it runs.
    pub(crate) fn key(&self) -> RouterKey {
        self.key
    }
}

impl Actor for Router {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let core = self.core.borrow();
        core.deadline
            .start(ctx.address(), core.config.metrics_flush_interval);
        let local = LocalRouter(Rc::downgrade(&self.core));
        // `try_with`: never a panic, even in a thread's teardown.
        let _ = HERE.try_with(|routers| routers.borrow_mut().push((self.key, local)));
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.core.borrow_mut().flush();
        Running::Stop
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        let mut core = self.core.borrow_mut();
        core.stopped = true;
        core.deadline.stop();
        let _ = HERE.try_with(|routers| routers.borrow_mut().retain(|(key, _)| *key != self.key));
    }
}

/// What the Router does with message `M`: the body of its handler, on the
/// state alone (no handler needs the actor's context).
trait Handles<M: Message> {
    type Result;
    fn handle(&mut self, msg: M) -> Self::Result;
}

/// The Router's handlers: each borrows the state and hands it the message.
/// The borrow cannot fail: the state is only borrowed on the Router's
/// thread, by one handler or one [`LocalRouter::route`] at a time, and
/// neither calls the other.
macro_rules! handlers {
    ($($message:ty => $result:ty,)*) => {$(
        impl Handler<$message> for Router {
            type Result = $result;

            fn handle(&mut self, msg: $message, _: &mut Self::Context) -> $result {
                self.core.borrow_mut().handle(msg)
            }
        }
    )*};
}

handlers! {
    Route => (),
    Call => (),
    Publish => usize,
    FromNodes => (),
    NodeUp => (),
    NodeDown => usize,
    NodeFailed => (),
    ReadyCounts => MessageResult<ReadyCounts>,
    Bounce => (),
    RemoveProcess => usize,
    Expire => (),
    BadFrame => (),
    RegisterProcess => Result<(), RouterError>,
    SetReady => (),
    HealthFailure => (),
    SetDraining => (),
    InFlightOf => usize,
    PendingCount => usize,
    FlushMetrics => (),
}

/// The Router, seen from a bridge on its thread: routes a batch with a
/// method call, saving the mailbox hop of a [`Route`] (an allocation, a
/// wake-up and a poll of the Router's context: with one request in flight,
/// a fifth of the broker's instructions per call).
///
/// Given to a bridge's inbox when the Router registers it, so a bridge never
/// routes this way before its registration is in the table.
pub(crate) struct LocalRouter(Weak<RefCell<Core>>);

impl LocalRouter {
    /// Runs `f` on the Router's state; false if the Router is gone or
    /// stopped (or, which cannot happen, busy with a message).
    fn with_core(&self, f: impl FnOnce(&mut Core)) -> bool {
        let Some(core) = self.0.upgrade() else {
            return false;
        };
        let Ok(mut core) = core.try_borrow_mut() else {
            return false;
        };
        if core.stopped {
            return false;
        }
        f(&mut core);
        true
    }

    /// Routes `envelopes` from `from`, as a [`Route`] would, and takes
    /// them; leaves them and returns false if the Router is gone or stopped.
    pub(crate) fn route(&self, from: &ByteString, envelopes: &mut Envelopes) -> bool {
        self.with_core(|core| {
            if let Some(slot) = core.slot_of(from) {
                core.route_batch(slot, from, std::mem::take(envelopes));
            }
        })
    }
}

/// Identifies one Router among those of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RouterKey(u64);

thread_local! {
    /// The Routers running on this thread: how a Rust caller on a Router's
    /// thread reaches it without a message (see [`call_here`]).
    static HERE: RefCell<Vec<(RouterKey, LocalRouter)>> = const { RefCell::new(Vec::new()) };
}

/// Hands `call` to Router `key` with a method call if it runs on this
/// thread (the mailbox hop and the Router's wake-up saved); gives it back
/// otherwise, to be sent as a message. Calls are independent requests, so
/// one that overtakes another still in the mailbox changes nothing a caller
/// can rely on.
pub(crate) fn call_here(key: RouterKey, call: Call) -> Option<Call> {
    let mut call = Some(call);
    let _ = HERE.try_with(|routers| {
        if let Some((_, local)) = routers.borrow().iter().find(|(k, _)| *k == key) {
            local.with_core(|core| {
                if let Some(call) = call.take() {
                    core.handle(call);
                }
            });
        }
    });
    call
}

// ---------------------------------------------------------------------------
// The request path

impl Handles<Route> for Core {
    type Result = ();

    fn handle(&mut self, Route { from, envelopes }: Route) {
        let Some(slot) = self.slot_of(&from) else {
            return;
        };
        // A bridge's mailed batch: it routes directly again once none of
        // its batches wait in the mailbox (see `LocalRouter`).
        if let Some(link) = self.table.at(slot).and_then(ProcessEntry::link) {
            link.mail_handled();
        }
        self.route_batch(slot, &from, envelopes);
    }
}

impl Core {
    /// The slot of sending process `from`. A batch comes from one process:
    /// its slot is looked up once. Routing cannot move it to another slot
    /// (only a registration reuses a slot, and that is another message); a
    /// removal mid-batch empties it, and the rest of the batch is dropped
    /// as from an unregistered process.
    fn slot_of(&self, from: &ByteString) -> Option<usize> {
        let slot = self.table.slot_of(from);
        if slot.is_none() {
            tracing::debug!(process = %from, "envelopes from an unregistered process dropped");
        }
        slot
    }

    /// What process `from` (in `slot`) sent, in order; then what was held
    /// for each destination goes out.
    fn route_batch(&mut self, slot: usize, from: &ByteString, envelopes: Envelopes) {
        let now = Instant::now();
        for envelope in envelopes {
            self.route(slot, from, envelope, now);
        }
        self.table.send_held();
    }
}

impl Handles<Call> for Core {
    type Result = ();

    fn handle(&mut self, msg: Call) {
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
        self.route_request(origin, envelope, ReplyTo::Caller(reply), false, now);
        self.table.send_held();
    }
}

impl Handles<Publish> for Core {
    type Result = usize;

    fn handle(&mut self, Publish(mut event): Publish) -> usize {
        let now = Instant::now();
        event.kind = MessageType::Event;
        event.source = self.caller_id.clone();
        self.caller.count(MessageType::Event);
        let recipients = self
            .table
            .event_recipients(&self.caller_id, &event.target)
            .unwrap_or_default();
        for id in &recipients {
            self.table.deliver(id, event.clone(), now);
        }
        self.table.send_held();
        recipients.len()
    }
}

impl Core {
    /// One envelope from process `from` (in `slot`): counted, stamped,
    /// routed by kind.
    fn route(&mut self, slot: usize, from: &ByteString, mut envelope: Envelope, now: Instant) {
        let Some(entry) = self.table.at_mut(slot) else {
            tracing::debug!(process = %from, "envelope from an unregistered process dropped");
            return;
        };
        if let Some(pacer) = &entry.pacer {
            pacer.consumed(Pacer::weight(&envelope));
        }
        entry.saw(now);
        entry.delta.count(envelope.kind);
        match envelope.kind {
            // `route_request` stamps `source` itself (it serves `Call` too):
            // stamping here as well would cost two more reference counts.
            MessageType::Request => {
                self.route_request(from.clone(), envelope, ReplyTo::Process, false, now);
            }
            MessageType::Response | MessageType::Error => {
                envelope.source = from.clone();
                self.route_reply(slot, from, envelope, now);
            }
            MessageType::Event => {
                envelope.source = from.clone();
                self.route_event(from, envelope, now);
            }
        }
    }

    /// A request: pick a worker, deliver, remember it until its one reply.
    /// `local_only`: it came from another node, which chose this one; it is
    /// never sent on.
    fn route_request(
        &mut self,
        origin: ByteString,
        mut envelope: Envelope,
        reply_to: ReplyTo,
        local_only: bool,
        now: Instant,
    ) {
        if self.draining {
            let message = "the broker is shutting down";
            return self.reject(
                &envelope,
                origin,
                reply_to,
                ErrorCode::ShuttingDown,
                message,
            );
        }
        let key: Key = (origin, envelope.correlation_id);
        if self.pending.contains(&key) {
            let message = format!(
                "correlation_id {} is already in flight from {:?}",
                key.1, key.0
            );
            return self.reject(&envelope, key.0, reply_to, ErrorCode::BadRequest, message);
        }
        let picked = if local_only {
            self.table
                .pick(&envelope.target, self.config.queue_capacity)
        } else {
            self.pick(&mut envelope)
        };
        let slot = match picked {
            Ok(slot) => slot,
            Err((code, message)) => {
                if code == ErrorCode::Busy {
                    self.count_busy(&key.0);
                }
                return self.reject(&envelope, key.0, reply_to, code, message);
            }
        };
        let timeout = envelope
            .timeout_ms
            .map_or(self.config.request_timeout, Duration::from_millis);
        let deadline = now + timeout;
        let Some(worker) = self.table.id_of(slot).cloned() else {
            return;
        };
        // Copied, not sliced: a slice would keep the whole read buffer it
        // came in (up to `pipe::READ_CHUNK`) alive for as long as the
        // request is pending.
        let method = ByteString::from(&*envelope.id);
        envelope.source = key.0.clone();
        if worker.starts_with('@') {
            // To another node: the remaining budget travels along, so the
            // node times out too (DESIGN 11.3).
            envelope.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        }
        if !self.table.deliver_request(slot, envelope, now) {
            // Its actor stopped without a RemoveProcess: take it out now.
            self.remove_process(&worker, "its actor stopped");
            let message = format!("worker {worker:?} is gone");
            let (origin, correlation_id) = key;
            let error = Envelope::broker_error_to(
                origin,
                method,
                correlation_id,
                ErrorCode::WorkerExited,
                message,
            );
            return self.answer(error, reply_to);
        }
        // Cannot collide: checked above, and nothing ran in between.
        let _ = self
            .pending
            .insert(key, worker, method, now, deadline, reply_to);
        self.deadline.arm(deadline);
    }

    /// Resolves a request's target to the slot of one process, or of the
    /// node that will serve it (DESIGN 11.2); rewrites a plain service name
    /// sent to another node as `service@node`, the name that node needs.
    #[inline]
    fn pick(&mut self, envelope: &mut Envelope) -> Result<usize, (ErrorCode, String)> {
        let capacity = self.config.queue_capacity;
        // A byte search (memchr): `str::contains(char)` builds a char
        // searcher, ~100 instructions per request for a 10-byte name.
        if self.nodes.is_empty() && !envelope.target.as_bytes().contains(&b'@') {
            return self.table.pick(&envelope.target, capacity);
        }
        self.pick_in_cluster(envelope)
    }

    #[cold]
    fn pick_in_cluster(&mut self, envelope: &mut Envelope) -> Result<usize, (ErrorCode, String)> {
        let capacity = self.config.queue_capacity;
        if let Some((local, node)) = nodes::split(&envelope.target) {
            let (local, node) = (local.to_owned(), node.to_owned());
            if node == self.nodes.this() {
                envelope.target = local.into();
                return self.table.pick(&envelope.target, capacity);
            }
            if local == BROKER {
                return Err((
                    ErrorCode::Forbidden,
                    format!("control RPCs never cross nodes: {:?}", envelope.target),
                ));
            }
            return self.node_slot(&node);
        }
        let service = envelope.target.clone();
        let local_ready = self.table.has_ready(&service);
        match self.nodes.choose(&service, local_ready) {
            Some(Choice::Remote(node)) => {
                let slot = self.node_slot(&node)?;
                envelope.target = format!("{service}@{node}").into();
                Ok(slot)
            }
            Some(Choice::Local) => self.table.pick(&service, capacity),
            None => match self.table.pick(&service, capacity) {
                Err((ErrorCode::UnknownTarget, _)) if self.nodes.knows(&service) => Err((
                    ErrorCode::Unavailable,
                    format!("no node has a ready worker of {service:?}"),
                )),
                other => other,
            },
        }
    }

    /// The slot node `node` is routed under, if it is up and not full: it
    /// may hold `queue_capacity` requests in flight per ready worker it
    /// advertises.
    fn node_slot(&self, node: &str) -> Result<usize, (ErrorCode, String)> {
        match self.nodes.state(node) {
            None => {
                return Err((
                    ErrorCode::UnknownTarget,
                    format!("unknown node {node:?} (no heartbeat from it)"),
                ));
            }
            Some(false) => {
                return Err((
                    ErrorCode::Unavailable,
                    format!("node {node:?} is not connected"),
                ));
            }
            Some(true) => {}
        }
        let Some((slot, in_flight)) = self.nodes.id(node).and_then(|id| self.table.exact(id))
        else {
            return Err((
                ErrorCode::Unavailable,
                format!("node {node:?} is not connected"),
            ));
        };
        let limit = self
            .config
            .queue_capacity
            .saturating_mul(self.nodes.ready(node).max(1) as usize);
        if in_flight >= limit {
            return Err((
                ErrorCode::Busy,
                format!("node {node:?} has {limit} requests in flight"),
            ));
        }
        Ok(slot)
    }

    /// A reply: only the worker its request went to may answer, once.
    fn route_reply(&mut self, slot: usize, from: &ByteString, envelope: Envelope, now: Instant) {
        let key: Key = (envelope.target.clone(), envelope.correlation_id);
        let pending = match self.pending.take_answered_by(&key, from) {
            Ok(pending) => pending,
            Err(why) => {
                let late = why == NotPending::Absent && self.expired.take(&key);
                if let Some(counters) = self.counters_of(from) {
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
        self.table.release_slot(slot);
        if self.config.record_latency
            && let Some(entry) = self.table.at(slot)
        {
            let elapsed = now.saturating_duration_since(pending.start);
            // One histogram per sample; `overall` is merged at flush.
            let service = entry.service;
            latency::record(&mut self.table.services[service].histogram, elapsed);
        }
        match pending.reply_to {
            ReplyTo::Caller(tx) => {
                let _ = tx.send(envelope);
            }
            ReplyTo::Process => {
                self.table.deliver(&key.0, envelope, now);
            }
        }
    }

    /// An event: to a process, every ready worker of a service, or `*`.
    /// Lifecycle events are the broker's to send: a process may address
    /// `ready` (or any event) to the broker, but `shutdown` and `ready` to
    /// another process would stop or confuse it, so they are dropped.
    fn route_event(&mut self, from: &ByteString, envelope: Envelope, now: Instant) {
        // A budget per sender: one process broadcasting as fast as it can
        // must not bury everyone's replies behind its events.
        let budget = self.config.max_events_per_s;
        if let Some(entry) = self.table.get_mut(from)
            && !entry.event_allowed(now, budget)
        {
            entry.delta.busy_rejections += 1;
            return;
        }
        let lifecycle = matches!(&*envelope.id, names::SHUTDOWN_EVENT | names::READY_EVENT);
        let recipients = if lifecycle && &*envelope.target != BROKER {
            None
        } else {
            self.table.event_recipients(from, &envelope.target)
        };
        let Some(recipients) = recipients else {
            if let Some(counters) = self.counters_of(from) {
                counters.dropped_events += 1;
            }
            tracing::debug!(process = %from, target = %envelope.target, event = %envelope.id,
                lifecycle, "event dropped");
            return;
        };
        let Some((last, rest)) = recipients.split_last() else {
            return;
        };
        for id in rest {
            self.table.deliver(id, envelope.clone(), now);
        }
        self.table.deliver(last, envelope, now);
    }

    /// Answers `request` of `origin` with a broker error instead of a worker.
    fn reject(
        &mut self,
        request: &Envelope,
        origin: ByteString,
        reply_to: ReplyTo,
        code: ErrorCode,
        message: impl Into<ByteString>,
    ) {
        let error = Envelope::broker_error_to(
            origin,
            request.id.clone(),
            request.correlation_id,
            code,
            message,
        );
        self.answer(error, reply_to);
    }

    /// Sends a broker-generated reply to whoever waits for it.
    fn answer(&mut self, error: Envelope, reply_to: ReplyTo) {
        if let Some(code) = error.error_code() {
            self.broker_errors[code.index()] += 1;
        }
        match reply_to {
            ReplyTo::Caller(tx) => {
                let _ = tx.send(error);
            }
            ReplyTo::Process => {
                let origin = error.target.clone();
                self.table.deliver(&origin, error, Instant::now());
            }
        }
    }

    fn counters_of(&mut self, id: &ByteString) -> Option<&mut Counters> {
        match self.table.get_mut(id) {
            Some(entry) => Some(&mut entry.delta),
            None if *id == self.caller_id => Some(&mut self.caller),
            None => None,
        }
    }

    fn count_busy(&mut self, origin: &ByteString) {
        if let Some(counters) = self.counters_of(origin) {
            counters.busy_rejections += 1;
        }
    }
}

// ---------------------------------------------------------------------------
// Other nodes (DESIGN 11): they are routed as processes named `@node`

impl Handles<FromNodes> for Core {
    type Result = ();

    fn handle(&mut self, FromNodes(envelopes): FromNodes) {
        let now = Instant::now();
        for (node, envelope) in envelopes {
            let Some((slot, entry)) = self
                .table
                .slot_of(&node)
                .and_then(|slot| Some((slot, self.table.at_mut(slot)?)))
            else {
                tracing::debug!(%node, "envelope from a node that is gone dropped");
                continue;
            };
            entry.saw(now);
            entry.delta.count(envelope.kind);
            match envelope.kind {
                MessageType::Request => self.route_remote_request(envelope, now),
                MessageType::Response | MessageType::Error => {
                    self.route_reply(slot, &node, envelope, now);
                }
                // Events do not cross nodes; the Cluster never sends one.
                MessageType::Event => {}
            }
        }
        self.table.send_held();
    }
}

impl Core {
    /// A request another node sent here (its `source` is `proc@node`): to
    /// an exported local service or process, never to the broker, never on
    /// to a third node.
    fn route_remote_request(&mut self, mut envelope: Envelope, now: Instant) {
        let origin = envelope.source.clone();
        match self.admit_remote(&mut envelope) {
            Ok(()) => self.route_request(origin, envelope, ReplyTo::Process, true, now),
            Err((code, message)) => {
                self.reject(&envelope, origin, ReplyTo::Process, code, message);
            }
        }
    }

    /// Whether this node serves a request another node sent it (its target
    /// made local: `echo@this` → `echo`), or why not.
    fn admit_remote(&self, envelope: &mut Envelope) -> Result<(), (ErrorCode, String)> {
        if let Some((local, node)) = nodes::split(&envelope.target) {
            if node != self.nodes.this() {
                let message = format!(
                    "node {:?} does not forward to {:?}",
                    self.nodes.this(),
                    envelope.target
                );
                return Err((ErrorCode::UnknownTarget, message));
            }
            envelope.target = local.to_owned().into();
        }
        let service = names::service_of(&envelope.target);
        if service == BROKER || &*envelope.target == names::BROADCAST {
            let message = format!("control RPCs never cross nodes: {:?}", envelope.target);
            return Err((ErrorCode::Forbidden, message));
        }
        if !self.config.cluster.exports(service) {
            let message = format!("node {:?} does not export {service:?}", self.nodes.this());
            return Err((ErrorCode::UnknownTarget, message));
        }
        Ok(())
    }
}

impl Handles<NodeUp> for Core {
    type Result = ();

    fn handle(&mut self, msg: NodeUp) {
        if self.nodes.up(&msg.node, msg.services)
            && let LogLine::Log { suppressed } = self.node_log.check(Instant::now())
        {
            tracing::info!(node = %msg.node, suppressed, "node joined");
        }
        let Some(id) = self.nodes.id(&msg.node).cloned() else {
            return;
        };
        if self.table.exact(&id).is_none() {
            let mut register = RegisterProcess::new(id.clone(), id, msg.link);
            // Never a target of its own: not in `*`, not picked by name.
            register.ready = false;
            let _ = self.table.register(register);
        }
    }
}

impl Handles<NodeDown> for Core {
    type Result = usize;

    fn handle(&mut self, msg: NodeDown) -> usize {
        let known = self.nodes.state(&msg.node) == Some(true);
        self.nodes.down(&msg.node);
        let id = self.nodes.id(&msg.node).cloned();
        let failed = id.map_or(0, |id| self.remove_process(&id, &msg.reason));
        let dropped = if msg.callers_gone {
            self.drop_callers_of(&msg.node)
        } else {
            0
        };
        if msg.forget {
            self.nodes.forget(&msg.node);
        }
        self.table.send_held();
        if (known || failed > 0)
            && let LogLine::Log { suppressed } = self.node_log.check(Instant::now())
        {
            tracing::warn!(node = %msg.node, reason = %msg.reason, failed, dropped, suppressed,
                "node left");
        }
        failed
    }
}

impl Handles<NodeFailed> for Core {
    type Result = ();

    fn handle(&mut self, msg: NodeFailed) {
        let key: Key = (msg.origin, msg.correlation_id);
        if let Ok(pending) = self.pending.take_answered_by(&key, &msg.node) {
            self.table.release(&msg.node);
            let error =
                Envelope::broker_error_to(key.0, pending.method, key.1, msg.code, msg.message);
            self.answer(error, pending.reply_to);
            self.table.send_held();
        }
    }
}

impl Handles<ReadyCounts> for Core {
    type Result = MessageResult<ReadyCounts>;

    fn handle(&mut self, _: ReadyCounts) -> Self::Result {
        MessageResult(self.table.ready_counts())
    }
}

// ---------------------------------------------------------------------------
// Requests that end without their worker's reply

impl Handles<Bounce> for Core {
    type Result = ();

    /// The worker's bridge could not take a request or event.
    fn handle(&mut self, msg: Bounce) {
        let Bounce {
            to,
            envelope,
            code,
            message,
        } = msg;
        let origin = envelope.source.clone();
        if code == ErrorCode::Busy {
            self.count_busy(&origin);
        }
        if envelope.kind != MessageType::Request {
            tracing::debug!(process = %to, from = %origin, id = %envelope.id, %code, "envelope dropped: {message}");
            return;
        }
        let key: Key = (origin, envelope.correlation_id);
        // Not pending any more: already answered (timed out, worker removed).
        if let Ok(pending) = self.pending.take_answered_by(&key, &to) {
            self.table.release(&to);
            self.reject(&envelope, key.0, pending.reply_to, code, message);
            self.table.send_held();
        }
    }
}

impl Handles<RemoveProcess> for Core {
    type Result = usize;

    fn handle(&mut self, msg: RemoveProcess) -> usize {
        let failed = self.remove_process(&msg.id, &msg.reason);
        self.table.send_held();
        failed
    }
}

impl Handles<Expire> for Core {
    type Result = ();

    fn handle(&mut self, _: Expire) {
        self.expire();
        self.table.send_held();
    }
}

impl Handles<BadFrame> for Core {
    type Result = ();

    fn handle(&mut self, msg: BadFrame) {
        let Some(entry) = self.table.get_mut(&msg.from) else {
            return;
        };
        entry.delta.bad_frames += msg.count;
        entry.saw(Instant::now());
        if let Some(salvaged) = msg.request {
            let error = Envelope::broker_error_to(
                msg.from,
                salvaged.id.unwrap_or_default(),
                salvaged.correlation_id,
                ErrorCode::BadRequest,
                format!("invalid envelope: {}", msg.error),
            );
            self.answer(error, ReplyTo::Process);
            self.table.send_held();
        }
    }
}

impl Core {
    /// Takes process `id` out of routing. Requests in flight to it are
    /// answered `worker_exited` now, not at their deadline; requests it had
    /// sent have nobody to answer. Returns how many requests were failed.
    fn remove_process(&mut self, id: &ByteString, reason: &str) -> usize {
        let Some(entry) = self.table.remove(id) else {
            return 0;
        };
        let snapshot = self.snapshot(id, &entry);
        self.retired.push(ProcessSnapshot {
            removed: true,
            ..snapshot
        });
        // Its own requests: their workers' slots are freed, and a reply that
        // still comes counts as late, not as a lie.
        for (key, orphan) in self.pending.drain_where(|key, _| key.0 == *id) {
            self.table.release(&orphan.worker);
            self.expired.insert(key);
        }
        let failed = self.pending.drain_where(|_, p| p.worker == *id);
        let count = failed.len();
        for ((origin, correlation_id), pending) in failed {
            let message = match id.strip_prefix('@') {
                Some(node) => format!("node {node:?} left with the request in flight ({reason})"),
                None => format!("worker {id:?} exited with the request in flight ({reason})"),
            };
            let error = Envelope::broker_error_to(
                origin,
                pending.method,
                correlation_id,
                ErrorCode::WorkerExited,
                message,
            );
            self.answer(error, pending.reply_to);
        }
        count
    }

    /// Drops the requests that callers on `node` have in flight here: the
    /// instance that sent them is gone. Their workers' slots are freed; a
    /// reply that still comes counts as late and goes nowhere. Returns how
    /// many.
    fn drop_callers_of(&mut self, node: &str) -> usize {
        let dropped = self
            .pending
            .drain_where(|key, _| nodes::split(&key.0).is_some_and(|(_, n)| n == node));
        let count = dropped.len();
        for (key, pending) in dropped {
            self.table.release(&pending.worker);
            self.expired.insert(key);
        }
        count
    }

    /// Answers `timeout` for every request past its deadline, then arms the
    /// timer for the next one.
    fn expire(&mut self) {
        for (key, pending) in self.pending.expire(Instant::now()) {
            self.table.release(&pending.worker);
            if let Some(counters) = self.counters_of(&key.0) {
                counters.timeouts += 1;
            }
            self.expired.insert(key.clone());
            let waited = pending.deadline.saturating_duration_since(pending.start);
            let message = format!(
                "no reply from {:?} within {} ms",
                pending.worker,
                waited.as_millis()
            );
            let error = Envelope::broker_error_to(
                key.0,
                pending.method,
                key.1,
                ErrorCode::Timeout,
                message,
            );
            self.answer(error, pending.reply_to);
        }
        if let Some(next) = self.pending.next_deadline() {
            self.deadline.arm(next);
        }
    }
}

// ---------------------------------------------------------------------------
// The table and the broker's control

impl Handles<RegisterProcess> for Core {
    type Result = Result<(), RouterError>;

    fn handle(&mut self, msg: RegisterProcess) -> Self::Result {
        let slot = self.table.register(msg)?;
        // A process on this thread may route with method calls from now on.
        if let Some(link) = self.table.at(slot).and_then(ProcessEntry::link) {
            link.connect(LocalRouter(self.me.clone()));
        }
        Ok(())
    }
}

impl Handles<SetReady> for Core {
    type Result = ();

    fn handle(&mut self, msg: SetReady) {
        if let Some(entry) = self.table.get_mut(&msg.id) {
            entry.ready = msg.ready;
        }
    }
}

impl Handles<HealthFailure> for Core {
    type Result = ();

    fn handle(&mut self, msg: HealthFailure) {
        if let Some(entry) = self.table.get_mut(&msg.id) {
            entry.delta.health_failures += 1;
        }
    }
}

impl Handles<SetDraining> for Core {
    type Result = ();

    fn handle(&mut self, msg: SetDraining) {
        self.draining = msg.0;
    }
}

impl Handles<InFlightOf> for Core {
    type Result = usize;

    fn handle(&mut self, InFlightOf(id): InFlightOf) -> usize {
        self.table.get(&id).map_or(0, |e| e.in_flight)
    }
}

impl Handles<PendingCount> for Core {
    type Result = usize;

    fn handle(&mut self, _: PendingCount) -> usize {
        self.pending.len()
    }
}

// ---------------------------------------------------------------------------
// Metrics

impl Handles<FlushMetrics> for Core {
    type Result = ();

    fn handle(&mut self, _: FlushMetrics) {
        self.flush();
    }
}

impl Core {
    fn wall(&self, at: Instant) -> SystemTime {
        self.clock.1 + at.saturating_duration_since(self.clock.0)
    }

    fn snapshot(&self, id: &ByteString, entry: &ProcessEntry) -> ProcessSnapshot {
        ProcessSnapshot {
            id: id.to_string(),
            service: self.table.service_name(entry).to_string(),
            delta: entry.delta,
            first_seen: entry.first_seen.map(|t| self.wall(t)),
            last_seen: entry.last_seen.map(|t| self.wall(t)),
            queue_depth: entry.backlog() as u64,
            pending: entry.in_flight as u64,
            ready: entry.ready,
            removed: false,
        }
    }

    /// Ships counter deltas and the histograms since the last batch.
    /// Remote nodes (`@node` in the table) go out as nodes, not processes.
    fn flush(&mut self) {
        let mut processes = std::mem::take(&mut self.retired);
        processes.extend(
            self.table
                .iter()
                .map(|(id, entry)| self.snapshot(id, entry)),
        );
        for entry in self.table.values_mut() {
            entry.delta = Counters::default();
            entry.first_seen = None;
        }
        let (remote, processes): (Vec<_>, Vec<_>) =
            processes.into_iter().partition(|p| p.id.starts_with('@'));
        let mut nodes: Vec<NodeSnapshot> = remote
            .into_iter()
            .map(|p| NodeSnapshot {
                node: p.id[1..].to_owned(),
                delta: p.delta,
                latency: None,
            })
            .collect();
        let mut latency = Vec::new();
        let mut overall: Option<Histogram<u64>> = None;
        for service in &mut self.table.services {
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
            match service.name.strip_prefix('@') {
                Some(node) => {
                    if let Some(n) = nodes.iter_mut().find(|n| n.node == node) {
                        n.latency = Some(shipped);
                    }
                }
                None => latency.push((service.name.to_string(), shipped)),
            }
        }
        let caller = std::mem::take(&mut self.caller);
        self.metrics.do_send(MetricsBatch {
            at: SystemTime::now(),
            processes,
            caller,
            latency,
            overall,
            broker_errors: std::mem::take(&mut self.broker_errors),
            pending: self.pending.len() as u64,
            nodes,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::metrics_store::MetricsStore;

    fn call(target: &str) -> (Call, tokio::sync::oneshot::Receiver<Envelope>) {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let envelope = Envelope::request(target, "Echo", 0);
        (Call { envelope, reply }, answer)
    }

    #[actix::test]
    async fn a_caller_on_the_routers_thread_is_answered_without_a_message() {
        let metrics = MetricsStore::new(Duration::from_secs(60)).start();
        let router = Router::new(BrokerConfig::default(), metrics.recipient());
        let key = router.key();
        let (early, _) = call("nobody");
        assert!(call_here(key, early).is_some(), "not started: a message");
        let addr = router.start();
        addr.send(PendingCount).await.expect("started");

        // Routed before `call_here` returns: the reply is already there.
        let (here, mut answer) = call("nobody");
        assert!(call_here(key, here).is_none(), "taken");
        let reply = answer.try_recv().expect("answered at once");
        assert_eq!(reply.error_code(), Some(ErrorCode::UnknownTarget));

        // Another Router, or another thread: given back, to be mailed.
        let (other, _) = call("nobody");
        assert!(call_here(RouterKey(u64::MAX), other).is_some());
        let (elsewhere, _) = call("nobody");
        let back = std::thread::spawn(move || call_here(key, elsewhere).is_some())
            .join()
            .expect("thread");
        assert!(back, "another thread");
    }
}
