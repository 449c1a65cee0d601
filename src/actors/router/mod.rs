//! Router: the hot path.
//!
//! Every envelope a process sends reaches the Router: in a [`Route`], or
//! with a method call from a process on its own thread (module
//! `same_thread`); Rust callers send [`Call`]. The routing itself, every
//! decision and every count, is the core's (`core.rs`): plain Rust, driven
//! by method calls, with no actor, pipe or clock of its own. This file is
//! the actor around it, a thin adapter: each message becomes one input of
//! the core (with the time read here), and the core's effects are carried
//! out by `Effects`: an envelope for a process goes to its
//! `Outlet` (its inbox on this thread, or one [`Deliver`] per input), a
//! Rust caller's reply to its channel, a deadline to the timer task
//! (`deadline.rs`), the metrics batch to the MetricsStore.
//!
//! [`Deliver`]: super::messages::Deliver

mod core;
mod deadline;
mod metrics;
mod pending;
mod remote;
mod sink;
mod table;

#[cfg(test)]
mod recorder;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use actix::prelude::*;
use bytestring::ByteString;
use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};

use self::core::Core;
use self::deadline::{Deadline, Expire};
use self::sink::{Partial, Sink};
use super::messages::{
    BadFrame, Bounce, Call, CallStream, CancelCall, CancelInFlight, Envelopes, FlushMetrics,
    FromNodes, HealthFailure, InFlightOf, MetricsBatch, NodeDown, NodeFailed, NodeUp, PendingCount,
    Publish, ReadyCounts, RecycleDue, RecycleReason, RegisterProcess, RemoveProcess, Route,
    RouterError, SetDraining, SetReady, SetRecycler, SetServicePolicy,
};
use super::nodes::Nodes;
use super::pacer::Pacer;
use super::same_thread::{self, Intake, Outlet, RouterKey};
use crate::config::BrokerConfig;
use crate::protocol::Envelope;

/// The Router actor. Start it with [`Router::new`] and `Actor::start`, or let
/// the embedding builder do it.
///
/// Its state lives behind an `Rc` so that what runs on the same thread (a
/// bridge, an in-process worker, a Rust caller) can hand it envelopes with
/// a method call (`Intake`) instead of a [`Route`] or [`Call`] message;
/// every other way in is a message.
pub struct Router {
    shell: Rc<RefCell<Shell>>,
    key: RouterKey,
    /// The timer tasks, started with the actor.
    deadline: Deadline,
}

/// The core, and what the adapter needs beside it.
struct Shell {
    core: Core<Effects>,
    /// Where the metrics batches go (the MetricsStore).
    metrics: Recipient<MetricsBatch>,
    /// This shell, for the links of the processes on its thread.
    me: Weak<RefCell<Shell>>,
    /// Set once the actor has stopped: nothing more is routed.
    stopped: bool,
}

/// How the Router carries out its core's effects.
pub(crate) struct Effects {
    deadline: Deadline,
    /// Where workers due for recycling are reported (the Broker).
    recycler: Option<Recipient<RecycleDue>>,
}

/// Where a Rust caller's replies go.
pub(crate) enum Answer {
    /// One final reply ([`Call`]).
    Once(oneshot::Sender<Box<Envelope>>),
    /// Partial replies, then the final one ([`CallStream`]).
    Stream(mpsc::Sender<Box<Envelope>>),
}

impl Sink for Effects {
    type Port = Outlet;
    type Caller = Answer;

    #[inline]
    fn deliver(&mut self, port: &mut Outlet, envelope: Box<Envelope>) -> bool {
        port.put(envelope)
    }

    #[inline]
    fn settle(&mut self, port: &mut Outlet) {
        port.settle();
    }

    #[inline]
    fn answer(&mut self, caller: Answer, reply: Box<Envelope>) {
        // A caller that stopped waiting has nobody to tell. A stream's
        // final reply has room: partials stop one short of its capacity.
        match caller {
            Answer::Once(caller) => {
                let _ = caller.send(reply);
            }
            Answer::Stream(parts) => {
                let _ = parts.try_send(reply);
            }
        }
    }

    fn partial(&mut self, caller: &mut Answer, reply: Box<Envelope>) -> Partial {
        let Answer::Stream(parts) = caller else {
            return Partial::Gone;
        };
        if parts.is_closed() {
            return Partial::Gone;
        }
        if parts.capacity() <= 1 {
            return Partial::Full;
        }
        match parts.try_send(reply) {
            Ok(()) => Partial::Taken,
            Err(mpsc::error::TrySendError::Full(_)) => Partial::Full,
            Err(mpsc::error::TrySendError::Closed(_)) => Partial::Gone,
        }
    }

    fn recycle_due(&mut self, worker: &ByteString) {
        match &self.recycler {
            Some(recycler) => recycler.do_send(RecycleDue {
                id: worker.clone(),
                reason: RecycleReason::MaxRequests,
            }),
            None => tracing::debug!(process = %worker, "due for recycling; nobody recycles"),
        }
    }

    #[inline]
    fn arm(&mut self, deadline: Instant) {
        self.deadline.arm(deadline);
    }

    fn queue_depth(&self, port: &Outlet) -> usize {
        port.queue_depth()
    }
}

impl Router {
    /// A Router that ships its metrics to `metrics` (the MetricsStore).
    pub fn new(config: BrokerConfig, metrics: impl Into<Recipient<MetricsBatch>>) -> Self {
        let nodes = if config.cluster.enabled() {
            Nodes::new(config.cluster.node_name(), config.cluster.balance)
        } else {
            Nodes::default()
        };
        let deadline = Deadline::default();
        let effects = Effects {
            deadline: deadline.clone(),
            recycler: None,
        };
        let core = Core::new(config, nodes, effects, Instant::now(), SystemTime::now());
        let metrics = metrics.into();
        let shell = Rc::new_cyclic(|me| {
            RefCell::new(Shell {
                core,
                metrics,
                me: me.clone(),
                stopped: false,
            })
        });
        static NEXT_KEY: AtomicU64 = AtomicU64::new(0);
        let key = RouterKey(NEXT_KEY.fetch_add(1, Ordering::Relaxed));
        Self {
            shell,
            key,
            deadline,
        }
    }

    /// What [`call_here`](same_thread::call_here) finds this Router by,
    /// once it runs.
    pub(crate) fn key(&self) -> RouterKey {
        self.key
    }
}

impl Actor for Router {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let every = self.shell.borrow().core.config.metrics_flush_interval;
        self.deadline.start(ctx.address(), every);
        let here: Weak<RefCell<Shell>> = Rc::downgrade(&self.shell);
        same_thread::arrive(self.key, here);
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.shell.borrow_mut().flush();
        Running::Stop
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.shell.borrow_mut().stopped = true;
        self.deadline.stop();
        same_thread::leave(self.key);
    }
}

/// The Router, called on its own thread by a link or a Rust caller.
impl Intake for RefCell<Shell> {
    #[inline]
    fn route(&self, from: &ByteString, envelopes: &mut Envelopes) -> bool {
        let Ok(mut shell) = self.try_borrow_mut() else {
            return false;
        };
        if shell.stopped {
            return false;
        }
        if let Some(slot) = shell.core.slot_of(from) {
            shell.take(slot, from, std::mem::take(envelopes));
        }
        true
    }

    fn call(&self, call: &mut Option<Call>) {
        let Ok(mut shell) = self.try_borrow_mut() else {
            return;
        };
        if !shell.stopped
            && let Some(call) = call.take()
        {
            shell.handle(call);
        }
    }
}

impl Shell {
    /// Routes a batch of process `from` (in `slot`): its bridge may read on
    /// once the Router took it, then the core routes it.
    #[inline]
    fn take(&mut self, slot: usize, from: &ByteString, envelopes: Envelopes) {
        if let Some(pacer) = self.core.port(slot).and_then(Outlet::pacer) {
            pacer.consumed(envelopes.iter().map(Pacer::weight).sum());
        }
        self.core.route_batch(slot, from, envelopes, Instant::now());
    }

    /// Ships the metrics since the last batch.
    fn flush(&mut self) {
        let batch = self.core.flush(SystemTime::now());
        self.metrics.do_send(batch);
    }
}

/// What the Router does with message `M`: one input of its core.
trait Handles<M: Message> {
    type Result;
    fn handle(&mut self, msg: M) -> Self::Result;
}

/// The Router's handlers: each borrows the shell and hands it the message.
/// The borrow cannot fail: the shell is only borrowed on the Router's
/// thread, by one handler or one [`Intake`] call at a time, and neither
/// calls the other.
macro_rules! handlers {
    ($($message:ty => $result:ty,)*) => {$(
        impl Handler<$message> for Router {
            type Result = $result;

            fn handle(&mut self, msg: $message, _: &mut Self::Context) -> $result {
                self.shell.borrow_mut().handle(msg)
            }
        }
    )*};
}

handlers! {
    Route => (),
    Call => (),
    CallStream => (),
    CancelCall => (),
    SetServicePolicy => (),
    SetRecycler => (),
    CancelInFlight => (),
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

impl Handles<Route> for Shell {
    type Result = ();

    fn handle(&mut self, Route { from, envelopes }: Route) {
        let Some(slot) = self.core.slot_of(&from) else {
            return;
        };
        // A mailed batch: its process routes with method calls again once
        // none of its batches waits in the mailbox.
        if let Some(link) = self.core.port(slot).and_then(Outlet::link) {
            link.mail_handled();
        }
        self.take(slot, &from, envelopes);
    }
}

impl Handles<Call> for Shell {
    type Result = ();

    fn handle(
        &mut self,
        Call {
            mut envelope,
            reply,
        }: Call,
    ) {
        // One reply, so no partials: a `stream` flag has nothing to feed.
        envelope.stream = false;
        self.core
            .call(envelope, Answer::Once(reply), Instant::now());
    }
}

impl Handles<CallStream> for Shell {
    type Result = ();

    fn handle(
        &mut self,
        CallStream {
            mut envelope,
            parts,
        }: CallStream,
    ) {
        envelope.stream = true;
        self.core
            .call(envelope, Answer::Stream(parts), Instant::now());
    }
}

impl Handles<CancelCall> for Shell {
    type Result = ();

    fn handle(&mut self, CancelCall(correlation_id): CancelCall) {
        self.core.cancel_call(correlation_id, Instant::now());
    }
}

impl Handles<SetServicePolicy> for Shell {
    type Result = ();

    fn handle(&mut self, msg: SetServicePolicy) {
        self.core
            .set_policy(&msg.service, msg.balance, msg.max_requests);
    }
}

impl Handles<SetRecycler> for Shell {
    type Result = ();

    fn handle(&mut self, SetRecycler(recycler): SetRecycler) {
        self.core.sink().recycler = Some(recycler);
    }
}

impl Handles<CancelInFlight> for Shell {
    type Result = ();

    fn handle(&mut self, CancelInFlight { id }: CancelInFlight) {
        self.core.cancel_in_flight(id.as_ref(), Instant::now());
    }
}

impl Handles<Publish> for Shell {
    type Result = usize;

    fn handle(&mut self, Publish(event): Publish) -> usize {
        self.core.publish(event, Instant::now())
    }
}

impl Handles<FromNodes> for Shell {
    type Result = ();

    fn handle(&mut self, FromNodes(envelopes): FromNodes) {
        self.core.route_from_nodes(envelopes, Instant::now());
    }
}

impl Handles<NodeUp> for Shell {
    type Result = ();

    fn handle(&mut self, msg: NodeUp) {
        let port = Outlet::mailbox(msg.link);
        self.core
            .node_up(&msg.node, msg.services, port, Instant::now());
    }
}

impl Handles<NodeDown> for Shell {
    type Result = usize;

    fn handle(&mut self, msg: NodeDown) -> usize {
        self.core.node_down(
            &msg.node,
            &msg.reason,
            msg.callers_gone,
            msg.forget,
            Instant::now(),
        )
    }
}

impl Handles<NodeFailed> for Shell {
    type Result = ();

    fn handle(&mut self, msg: NodeFailed) {
        let key = (msg.origin, msg.correlation_id);
        self.core
            .node_failed(&msg.node, key, msg.code, msg.message, Instant::now());
    }
}

impl Handles<ReadyCounts> for Shell {
    type Result = MessageResult<ReadyCounts>;

    fn handle(&mut self, _: ReadyCounts) -> Self::Result {
        MessageResult(self.core.ready_counts())
    }
}

impl Handles<Bounce> for Shell {
    type Result = ();

    fn handle(&mut self, msg: Bounce) {
        self.core
            .bounce(&msg.to, msg.envelope, msg.code, msg.message, Instant::now());
    }
}

impl Handles<RemoveProcess> for Shell {
    type Result = usize;

    fn handle(&mut self, msg: RemoveProcess) -> usize {
        self.core
            .remove_process(&msg.id, &msg.reason, Instant::now())
    }
}

impl Handles<Expire> for Shell {
    type Result = ();

    fn handle(&mut self, _: Expire) {
        self.core.expire(Instant::now());
    }
}

impl Handles<BadFrame> for Shell {
    type Result = ();

    fn handle(&mut self, msg: BadFrame) {
        self.core
            .bad_frame(msg.from, msg.count, &msg.error, msg.request, Instant::now());
    }
}

impl Handles<RegisterProcess> for Shell {
    type Result = Result<(), RouterError>;

    fn handle(&mut self, msg: RegisterProcess) -> Self::Result {
        let port = Outlet::new(msg.recipient, msg.pacer, msg.inbox);
        let slot = self.core.register(
            msg.id,
            &msg.service,
            msg.ready,
            port,
            msg.takes_cancel,
            Instant::now(),
        )?;
        // A process on this thread may route with method calls from now on.
        if let Some(link) = self.core.port(slot).and_then(Outlet::link) {
            let here: Weak<dyn Intake> = self.me.clone();
            link.connect(here);
        }
        Ok(())
    }
}

impl Handles<SetReady> for Shell {
    type Result = ();

    fn handle(&mut self, msg: SetReady) {
        self.core.set_ready(&msg.id, msg.ready);
    }
}

impl Handles<HealthFailure> for Shell {
    type Result = ();

    fn handle(&mut self, msg: HealthFailure) {
        self.core.health_failure(&msg.id);
    }
}

impl Handles<SetDraining> for Shell {
    type Result = ();

    fn handle(&mut self, SetDraining(draining): SetDraining) {
        self.core.set_draining(draining);
    }
}

impl Handles<InFlightOf> for Shell {
    type Result = usize;

    fn handle(&mut self, InFlightOf(id): InFlightOf) -> usize {
        self.core.in_flight_of(&id)
    }
}

impl Handles<PendingCount> for Shell {
    type Result = usize;

    fn handle(&mut self, _: PendingCount) -> usize {
        self.core.pending_count()
    }
}

impl Handles<FlushMetrics> for Shell {
    type Result = ();

    fn handle(&mut self, _: FlushMetrics) {
        self.flush();
    }
}
