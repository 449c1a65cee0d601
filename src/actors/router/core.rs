//! The Router's core: the routing state machine, without actors, pipes or a
//! clock of its own.
//!
//! Its inputs are method calls: envelopes a process sent
//! ([`Core::route_batch`]), a Rust caller's request or event
//! ([`Core::call`], [`Core::publish`]), a process registered, ready or
//! removed, the time (`now`, given with every input that needs it, and
//! [`Core::expire`] when an armed deadline is due), a control change
//! (draining), what came from other nodes. Its effects go to a [`Sink`]
//! (`sink.rs`): deliver this envelope to that process, settle the ports
//! delivered to, answer this caller, arm a deadline; the metrics batch is
//! returned ([`Core::flush`]). The Router actor (`mod.rs`) carries them out;
//! the simulation test (`sim.rs`) records and checks them.
//!
//! What it does: resolves `target` (process id, service name with
//! round-robin over ready workers, `broker`, `*`, a service of another
//! node), hands the envelope to the destination's port through the
//! process table (`table.rs`), and remembers each request in the pending
//! table (`pending.rs`) so that exactly one reply goes back: the worker's,
//! or an error the core generates (`busy`, `timeout`, `worker_exited`, …).
//! It never decodes a payload.
//!
//! Read it top to bottom: the request path (`route` → `route_request` →
//! `route_reply`), then the ways a request ends without its worker's reply
//! (bounce, removal, expiry, bad frame), then the control changes. Other
//! nodes are in `remote.rs`, the metrics batch in `metrics.rs`.
//!
//! Why counters and histograms live here and not in the MetricsStore: one
//! actor message per sample would cost more than the routing itself. The
//! Router owns them and ships a batch every `metrics_flush_interval` (and on
//! `FlushMetrics`, which stats requests send first, so stats are exact).
//!
//! Why the queue bound is a counter: actix mailboxes do not bound memory
//! (`do_send` ignores capacity), so the Router counts the requests in flight
//! to each process and answers `busy` past `queue_capacity`.

use bytestring::ByteString;
use std::time::{Duration, Instant, SystemTime};

use super::pending::{Key, NotPending, Pending, PendingTable, RecentlyExpired, ReplyTo};
use super::sink::{Partial, Sink};
use super::table::Delivered;
use super::table::ProcessTable;
use crate::actors::latency;
use crate::actors::log_limit::LogLimit;
use crate::actors::messages::{Counters, Envelopes, ProcessSnapshot, RouterError};
use crate::actors::nodes::Nodes;
use crate::config::BrokerConfig;
use crate::names::{self, BROKER, CALLER};
use crate::protocol::{CancelReason, Envelope, ErrorCode, MessageType, SalvagedRequest};

/// The Router's state, and what it does with each input.
pub(crate) struct Core<S: Sink> {
    pub(super) config: BrokerConfig,
    /// Where the effects go.
    pub(super) sink: S,
    pub(super) table: ProcessTable<S::Port>,
    /// Other nodes of the cluster (empty on a single host).
    pub(super) nodes: Nodes,
    pub(super) pending: PendingTable<S::Caller>,
    pub(super) expired: RecentlyExpired,
    pub(super) draining: bool,
    /// Embedded Rust callers: their correlation ids and counters.
    pub(super) caller_id: ByteString,
    pub(super) caller: Counters,
    /// Processes removed since the last metrics batch.
    pub(super) retired: Vec<ProcessSnapshot>,
    /// Errors the Router answered in place of a worker since the last
    /// batch, by [`ErrorCode::index`].
    pub(super) broker_errors: [u64; ErrorCode::ALL.len()],
    /// A monotonic instant and the wall-clock time it was: the metrics'
    /// timestamps are computed from it.
    pub(super) clock: (Instant, SystemTime),
    /// Lines about nodes joining and leaving: nodes that come and go by
    /// the thousand must not flood the log.
    pub(super) node_log: LogLimit,
}

impl<S: Sink> Core<S> {
    /// A core with no process yet, whose effects go to `sink`; `nodes` is
    /// this node's view of the cluster (empty on a single host). `now` and
    /// `wall` are the same moment on the monotonic and the wall clock.
    pub(crate) fn new(
        config: BrokerConfig,
        nodes: Nodes,
        sink: S,
        now: Instant,
        wall: SystemTime,
    ) -> Self {
        Self {
            config,
            sink,
            table: ProcessTable::default(),
            nodes,
            pending: PendingTable::default(),
            expired: RecentlyExpired::new(65_536),
            draining: false,
            caller_id: ByteString::from_static(CALLER),
            caller: Counters::default(),
            retired: Vec::new(),
            broker_errors: [0; ErrorCode::ALL.len()],
            clock: (now, wall),
            node_log: LogLimit::default(),
        }
    }

    /// Where the effects go.
    pub(crate) fn sink(&mut self) -> &mut S {
        &mut self.sink
    }

    /// The slot of sending process `from`. A batch comes from one process:
    /// its slot is looked up once. Routing cannot move it to another slot
    /// (only a registration reuses a slot, and that is another input); a
    /// removal mid-batch empties it, and the rest of the batch is dropped
    /// as from an unregistered process.
    #[inline]
    pub(crate) fn slot_of(&self, from: &ByteString) -> Option<usize> {
        let slot = self.table.slot_of(from);
        if slot.is_none() {
            tracing::debug!(process = %from, "envelopes from an unregistered process dropped");
        }
        slot
    }

    /// The port of the process in `slot`.
    #[inline]
    pub(crate) fn port(&self, slot: usize) -> Option<&S::Port> {
        self.table.at(slot).map(|entry| &entry.port)
    }

    /// Requests in flight to process `id` (0 if it is unknown).
    pub(crate) fn in_flight_of(&self, id: &ByteString) -> usize {
        self.table.get(id).map_or(0, |e| e.in_flight)
    }

    /// Requests in flight.
    pub(crate) fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Ready workers of every local service (for this node's heartbeat).
    pub(crate) fn ready_counts(&self) -> Vec<(String, u32)> {
        self.table.ready_counts()
    }

    /// The end of every input: each port delivered to is settled.
    #[inline]
    pub(super) fn settle(&mut self) {
        self.table.settle(&mut self.sink);
    }
}

// ---------------------------------------------------------------------------
// The request path

impl<S: Sink> Core<S> {
    /// What process `from` (in `slot`, from [`slot_of`](Self::slot_of))
    /// sent, in order; then the ports delivered to are settled.
    #[inline]
    pub(crate) fn route_batch(
        &mut self,
        slot: usize,
        from: &ByteString,
        envelopes: Envelopes,
        now: Instant,
    ) {
        for envelope in envelopes {
            self.route(slot, from, envelope, now);
        }
        self.settle();
    }

    /// A request of a Rust caller of the embedding API, answered on
    /// `caller`: partial replies too if it has `stream`. Its correlation id
    /// is the caller's if it chose one (to cancel it by), else assigned here.
    pub(crate) fn call(
        &mut self,
        envelope: impl Into<Box<Envelope>>,
        caller: S::Caller,
        now: Instant,
    ) {
        let mut envelope = envelope.into();
        if envelope.correlation_id == 0 {
            envelope.correlation_id = crate::actors::envelopes::next_call_id();
        }
        envelope.kind = MessageType::Request;
        let origin = self.caller_id.clone();
        self.caller.count(MessageType::Request);
        self.route_request(origin, envelope, ReplyTo::Caller(caller), false, now);
        self.settle();
    }

    /// An event of a Rust caller, to a process, every ready worker of a
    /// service, or `*`. Returns how many processes it was delivered to.
    pub(crate) fn publish(&mut self, mut event: Envelope, now: Instant) -> usize {
        event.kind = MessageType::Event;
        event.source = self.caller_id.clone();
        self.caller.count(MessageType::Event);
        let recipients = self
            .table
            .event_recipients(&self.caller_id, &event.target)
            .unwrap_or_default();
        for id in &recipients {
            self.table.deliver(id, event.clone(), now, &mut self.sink);
        }
        self.settle();
        recipients.len()
    }

    /// One envelope from process `from` (in `slot`): counted, stamped,
    /// routed by kind.
    #[inline]
    fn route(&mut self, slot: usize, from: &ByteString, mut envelope: Box<Envelope>, now: Instant) {
        let Some(entry) = self.table.at_mut(slot) else {
            tracing::debug!(process = %from, "envelope from an unregistered process dropped");
            return;
        };
        entry.saw(now);
        entry.delta.count(envelope.kind);
        match envelope.kind {
            // `route_request` stamps `source` itself (it serves `call` too):
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
    pub(super) fn route_request(
        &mut self,
        origin: ByteString,
        mut envelope: Box<Envelope>,
        reply_to: ReplyTo<S::Caller>,
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
                now,
            );
        }
        let key: Key = (origin, envelope.correlation_id);
        if self.pending.contains(&key) {
            let message = format!(
                "correlation_id {} is already in flight from {:?}",
                key.1, key.0
            );
            return self.reject(
                &envelope,
                key.0,
                reply_to,
                ErrorCode::BadRequest,
                message,
                now,
            );
        }
        let picked = match Self::routing_key(&envelope) {
            Err(message) => Err((ErrorCode::BadRequest, message)),
            Ok(_) if local_only => {
                let key = envelope.key.as_ref().and_then(|k| k.as_str().ok());
                self.table
                    .pick(&envelope.target, key, self.config.queue_capacity)
            }
            Ok(_) => self.pick(&mut envelope),
        };
        let slot = match picked {
            Ok(slot) => slot,
            Err((code, message)) => {
                if code == ErrorCode::Busy {
                    self.count_busy(&key.0);
                }
                return self.reject(&envelope, key.0, reply_to, code, message, now);
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
        let stream = envelope.stream;
        envelope.source = key.0.clone();
        // The worker learns its budget (another node too, which then times
        // out as well): whole milliseconds, rounded up, at least 1.
        envelope.timeout_ms = Some(budget_ms(timeout));
        let delivered = self
            .table
            .deliver_request(slot, envelope, now, &mut self.sink);
        let Delivered::Taken { recycle_due } = delivered else {
            // Its actor stopped without a removal: take it out now.
            self.remove(&worker, "its actor stopped", now);
            let message = format!("worker {worker:?} is gone");
            let (origin, correlation_id) = key;
            let error = Envelope::broker_error_to(
                origin,
                method,
                correlation_id,
                ErrorCode::WorkerExited,
                message,
            );
            return self.answer(error, reply_to, now);
        };
        if recycle_due {
            self.sink.recycle_due(&worker);
        }
        // Cannot collide: checked above, and nothing ran in between.
        let _ = self
            .pending
            .insert(key, worker, method, now, deadline, reply_to, stream);
        self.sink.arm(deadline);
    }

    /// The key a request routes by, if it has one; a key that is not a
    /// str of at most 256 bytes is refused (with why).
    #[inline]
    fn routing_key(envelope: &Envelope) -> Result<Option<&str>, String> {
        match &envelope.key {
            None => Ok(None),
            Some(key) => key
                .as_str()
                .map(Some)
                .map_err(|e| format!("invalid key: {e}")),
        }
    }

    /// Resolves a request's target to the slot of one process, or of the
    /// node that will serve it; rewrites a plain service name sent to
    /// another node as `service@node`, the name that node needs.
    #[inline]
    pub(super) fn pick(&mut self, envelope: &mut Envelope) -> Result<usize, (ErrorCode, String)> {
        let capacity = self.config.queue_capacity;
        // A byte search (memchr): `str::contains(char)` builds a char
        // searcher, ~100 instructions per request for a 10-byte name.
        if self.nodes.is_empty() && !envelope.target.as_bytes().contains(&b'@') {
            let key = envelope.key.as_ref().and_then(|k| k.as_str().ok());
            return self.table.pick(&envelope.target, key, capacity);
        }
        self.pick_in_cluster(envelope)
    }

    /// A reply: only the worker its request went to may answer, once; a
    /// partial reply (`more`) goes on to a caller that asked for a stream.
    pub(super) fn route_reply(
        &mut self,
        slot: usize,
        from: &ByteString,
        envelope: Box<Envelope>,
        now: Instant,
    ) {
        if envelope.more && envelope.kind == MessageType::Response {
            return self.route_partial(from, envelope, now);
        }
        let key: Key = (envelope.target.clone(), envelope.correlation_id);
        let pending = match self.pending.take_answered_by(&key, from) {
            Ok(pending) => pending,
            Err(why) => {
                let late = why == NotPending::Absent && self.expired.take(&key);
                self.count_dropped_reply(from, &envelope, late);
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
            ReplyTo::Caller(caller) => self.sink.answer(caller, envelope),
            ReplyTo::Process => {
                self.table.deliver(&key.0, envelope, now, &mut self.sink);
            }
        }
    }

    /// A reply that matched nothing in flight: `late` if its request ended
    /// without it recently, else unmatched (or forged).
    fn count_dropped_reply(&mut self, from: &ByteString, envelope: &Envelope, late: bool) {
        if let Some(counters) = self.counters_of(from) {
            if late {
                counters.late_replies += 1;
            } else {
                counters.unmatched_replies += 1;
            }
        }
        tracing::debug!(process = %from, target = %envelope.target,
            correlation_id = envelope.correlation_id, more = envelope.more, late, "reply dropped");
    }

    /// A partial reply: to the caller, in order, if its request asked for
    /// a stream and the caller keeps up. A caller whose stdin backlog
    /// already holds `queue_capacity` frames (or whose buffer is full)
    /// gets the stream cut: this partial is dropped, `busy` is its final
    /// reply, and the worker is told to stop.
    fn route_partial(&mut self, from: &ByteString, envelope: Box<Envelope>, now: Instant) {
        if let Some(entry) = self.table.get_mut(from) {
            entry.delta.partial_replies += 1;
        }
        let key: Key = (envelope.target.clone(), envelope.correlation_id);
        let capacity = self.config.queue_capacity;
        let pending = match self.pending.get_answered_by(&key, from) {
            Ok(pending) if pending.stream => pending,
            Ok(_) => return self.count_dropped_reply(from, &envelope, false),
            Err(why) => {
                let late = why == NotPending::Absent && self.expired.contains(&key);
                return self.count_dropped_reply(from, &envelope, late);
            }
        };
        let outcome = match &mut pending.reply_to {
            ReplyTo::Caller(caller) => self.sink.partial(caller, envelope),
            ReplyTo::Process => match self.table.get(&key.0) {
                Some(origin) if self.sink.queue_depth(&origin.port) >= capacity => Partial::Full,
                Some(_) => {
                    self.table.deliver(&key.0, envelope, now, &mut self.sink);
                    Partial::Taken
                }
                None => Partial::Gone,
            },
        };
        match outcome {
            Partial::Taken => {}
            Partial::Full => {
                let message = format!(
                    "the stream was cut: the caller did not read its partial replies \
                     ({capacity} frames waiting)"
                );
                let reason = CancelReason::Busy;
                self.end_early(key, reason, Some((ErrorCode::Busy, message)), now);
            }
            Partial::Gone => self.end_early(key, CancelReason::Cancelled, None, now),
        }
    }

    /// An event: to a process, every ready worker of a service, or `*`.
    /// Lifecycle events are the broker's to send: a process may address
    /// `ready` (or any event) to the broker, but `shutdown` and `ready` to
    /// another process would stop or confuse it, so they are dropped.
    fn route_event(&mut self, from: &ByteString, envelope: Box<Envelope>, now: Instant) {
        if envelope.is_cancel() {
            return self.caller_cancel(from, &envelope, now);
        }
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
            self.table
                .deliver(id, envelope.clone(), now, &mut self.sink);
        }
        self.table.deliver(last, envelope, now, &mut self.sink);
    }

    /// Answers `request` of `origin` with a broker error instead of a worker.
    pub(super) fn reject(
        &mut self,
        request: &Envelope,
        origin: ByteString,
        reply_to: ReplyTo<S::Caller>,
        code: ErrorCode,
        message: impl Into<ByteString>,
        now: Instant,
    ) {
        let error = Envelope::broker_error_to(
            origin,
            request.id.clone(),
            request.correlation_id,
            code,
            message,
        );
        self.answer(error, reply_to, now);
    }

    /// Sends a broker-generated reply to whoever waits for it.
    pub(super) fn answer(
        &mut self,
        error: impl Into<Box<Envelope>>,
        reply_to: ReplyTo<S::Caller>,
        now: Instant,
    ) {
        let error = error.into();
        if let Some(code) = error.error_code() {
            self.broker_errors[code.index()] += 1;
        }
        match reply_to {
            ReplyTo::Caller(caller) => self.sink.answer(caller, error),
            ReplyTo::Process => {
                let origin = error.target.clone();
                self.table.deliver(&origin, error, now, &mut self.sink);
            }
        }
    }

    pub(super) fn counters_of(&mut self, id: &ByteString) -> Option<&mut Counters> {
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
// Requests that end without their worker's reply

impl<S: Sink> Core<S> {
    /// Process `to` could not take `envelope` (its stdin backlog was full,
    /// or the frame too large): a request still pending is answered `code`
    /// on its worker's behalf and the worker's slot freed; an event is
    /// dropped.
    pub(crate) fn bounce(
        &mut self,
        to: &ByteString,
        envelope: Envelope,
        code: ErrorCode,
        message: String,
        now: Instant,
    ) {
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
        if let Ok(pending) = self.pending.take_answered_by(&key, to) {
            self.table.release(to);
            self.reject(&envelope, key.0, pending.reply_to, code, message, now);
            self.settle();
        }
    }

    /// Takes process `id` out of routing (it exited or was stopped; a node
    /// left). Requests in flight to it are answered `worker_exited` now,
    /// not at their deadline; requests it had sent have nobody to answer.
    /// Returns how many requests were failed.
    pub(crate) fn remove_process(&mut self, id: &ByteString, reason: &str, now: Instant) -> usize {
        let failed = self.remove(id, reason, now);
        self.settle();
        failed
    }

    /// [`remove_process`](Self::remove_process) within an input.
    pub(super) fn remove(&mut self, id: &ByteString, reason: &str, now: Instant) -> usize {
        let Some(entry) = self.table.remove(id) else {
            return 0;
        };
        let snapshot = self.snapshot(id, &entry);
        self.retired.push(ProcessSnapshot {
            removed: true,
            ..snapshot
        });
        // Its own requests: their workers are told and their slots freed,
        // and a reply that still comes counts as late, not as a lie.
        for (key, orphan) in self.pending.drain_where(|key, _| key.0 == *id) {
            // Nobody is left to answer.
            self.finish_early(key, orphan, CancelReason::CallerExited, None, now);
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
            self.answer(error, pending.reply_to, now);
        }
        count
    }

    /// The time is `now` (an armed deadline is due): answers `timeout` for
    /// every request past its deadline, then arms the next one.
    pub(crate) fn expire(&mut self, now: Instant) {
        for (key, pending) in self.pending.expire(now) {
            if let Some(counters) = self.counters_of(&key.0) {
                counters.timeouts += 1;
            }
            let waited = pending.deadline.saturating_duration_since(pending.start);
            let message = format!(
                "no reply from {:?} within {} ms",
                pending.worker,
                waited.as_millis()
            );
            let answer = Some((ErrorCode::Timeout, message));
            self.finish_early(key, pending, CancelReason::Timeout, answer, now);
        }
        if let Some(next) = self.pending.next_deadline() {
            self.sink.arm(next);
        }
        self.settle();
    }

    /// Process `from` cancels its request: `cancel` addressed to `broker`
    /// with that request's correlation id. The request is answered
    /// `cancelled` at once and its worker told. Anything else (another
    /// target, nothing of `from`'s in flight under that id) is dropped and
    /// counted: no process can cancel another's request.
    fn caller_cancel(&mut self, from: &ByteString, cancel: &Envelope, now: Instant) {
        let key: Key = (from.clone(), cancel.correlation_id);
        if &*cancel.target != BROKER || !self.pending.contains(&key) {
            if let Some(counters) = self.counters_of(from) {
                counters.dropped_events += 1;
            }
            tracing::debug!(process = %from, target = %cancel.target,
                correlation_id = cancel.correlation_id, "cancel dropped");
            return;
        }
        self.cancel_own(key, now);
    }

    /// Ends request `key` at its caller's wish: answered `cancelled`, its
    /// worker told.
    fn cancel_own(&mut self, key: Key, now: Instant) {
        let answer = (
            ErrorCode::Cancelled,
            "the caller cancelled the request".to_owned(),
        );
        self.end_early(key, CancelReason::Cancelled, Some(answer), now);
    }

    /// A Rust caller dropped its call (or stream) before the final reply:
    /// the request is cancelled like a process's.
    pub(crate) fn cancel_call(&mut self, correlation_id: u64, now: Instant) {
        let key: Key = (self.caller_id.clone(), correlation_id);
        if self.pending.contains(&key) {
            self.cancel_own(key, now);
            self.settle();
        }
    }

    /// The drain at shutdown expired for process `id` (every process with
    /// `None`): each request still in flight to it is cancelled at the
    /// worker (`shutting_down`). The requests stay pending: their callers
    /// are answered when the worker is removed, as they always were.
    pub(crate) fn cancel_in_flight(&mut self, id: Option<&ByteString>, now: Instant) {
        let mut notices = Vec::new();
        for (key, pending) in self.pending.iter_mut() {
            if !pending.cancel_sent && id.is_none_or(|id| pending.worker == *id) {
                pending.cancel_sent = true;
                notices.push((pending.worker.clone(), key.clone()));
            }
        }
        for (worker, (origin, correlation_id)) in notices {
            if self.table.get(&worker).is_some_and(|e| e.takes_cancel) {
                let reason = CancelReason::ShuttingDown;
                self.tell_worker(&worker, origin, correlation_id, reason, now);
            }
        }
        self.settle();
    }

    /// Ends request `key` before its worker's final reply, for `reason`:
    /// see [`finish_early`](Self::finish_early).
    pub(super) fn end_early(
        &mut self,
        key: Key,
        reason: CancelReason,
        answer: Option<(ErrorCode, String)>,
        now: Instant,
    ) {
        if let Some(pending) = self.pending.take(&key) {
            self.finish_early(key, pending, reason, answer, now);
        }
    }

    /// A request taken out of the pending table before its worker's final
    /// reply: its worker's slot is freed and the worker told why (a reply
    /// it still sends is late); the caller gets `answer`, if any (none when
    /// nobody waits).
    pub(super) fn finish_early(
        &mut self,
        key: Key,
        pending: Pending<S::Caller>,
        reason: CancelReason,
        answer: Option<(ErrorCode, String)>,
        now: Instant,
    ) {
        let Pending {
            worker,
            method,
            reply_to,
            cancel_sent,
            ..
        } = pending;
        self.table.release(&worker);
        self.expired.insert(key.clone());
        let (origin, correlation_id) = key;
        if let Some((code, message)) = answer {
            let error =
                Envelope::broker_error_to(origin.clone(), method, correlation_id, code, message);
            self.answer(error, reply_to, now);
        }
        if !cancel_sent && self.table.get(&worker).is_some_and(|e| e.takes_cancel) {
            self.tell_worker(&worker, origin, correlation_id, reason, now);
        }
    }

    /// Sends `worker` the `cancel` of the request `correlation_id` of
    /// `origin`, and counts it. To another node (`@node`), the cancel goes
    /// on to that node's broker, which tells its worker.
    fn tell_worker(
        &mut self,
        worker: &ByteString,
        origin: ByteString,
        correlation_id: u64,
        reason: CancelReason,
        now: Instant,
    ) {
        let notice = Envelope::cancel_notice(worker.clone(), correlation_id, origin, reason);
        if self.table.deliver(worker, notice, now, &mut self.sink)
            && let Some(entry) = self.table.get_mut(worker)
        {
            entry.delta.cancels += 1;
        }
    }

    /// `count` frames from process `from` were not valid envelopes: counted
    /// as its `bad_frames`; a salvaged request gets `bad_request`.
    pub(crate) fn bad_frame(
        &mut self,
        from: ByteString,
        count: u64,
        error: &str,
        request: Option<SalvagedRequest>,
        now: Instant,
    ) {
        let Some(entry) = self.table.get_mut(&from) else {
            return;
        };
        entry.delta.bad_frames += count;
        entry.saw(now);
        if let Some(salvaged) = request {
            let error = Envelope::broker_error_to(
                from,
                salvaged.id.unwrap_or_default(),
                salvaged.correlation_id,
                ErrorCode::BadRequest,
                format!("invalid envelope: {error}"),
            );
            self.answer(error, ReplyTo::Process, now);
            self.settle();
        }
    }
}

// ---------------------------------------------------------------------------
// The table and the broker's control

impl<S: Sink> Core<S> {
    /// Adds process `id` of `service`, reached through `port`; routable at
    /// once if `ready`. Returns its slot.
    pub(crate) fn register(
        &mut self,
        id: ByteString,
        service: &ByteString,
        ready: bool,
        port: S::Port,
        takes_cancel: bool,
        now: Instant,
    ) -> Result<usize, RouterError> {
        self.table
            .register(id, service, ready, port, takes_cancel, now)
    }

    /// How `service` spreads its requests over its workers, and after how
    /// many requests a worker is due for recycling (0: never).
    pub(crate) fn set_policy(
        &mut self,
        service: &ByteString,
        balance: crate::config::WorkerBalance,
        max_requests: u64,
    ) {
        self.table.set_policy(service, balance, max_requests);
    }

    /// Process `id` is routable (its `ready` came) or not (it is drained).
    pub(crate) fn set_ready(&mut self, id: &ByteString, ready: bool) {
        if let Some(entry) = self.table.get_mut(id) {
            entry.ready = ready;
        }
    }

    /// A health check of process `id` failed.
    pub(crate) fn health_failure(&mut self, id: &ByteString) {
        if let Some(entry) = self.table.get_mut(id) {
            entry.delta.health_failures += 1;
        }
    }

    /// While draining, new requests are answered `shutting_down`; replies
    /// to requests already in flight still go through.
    pub(crate) fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }
}

/// A request's budget as `timeout_ms`: whole milliseconds, rounded up,
/// at least 1.
#[inline]
fn budget_ms(timeout: Duration) -> u64 {
    let ms = timeout.as_nanos().div_ceil(1_000_000).max(1);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
