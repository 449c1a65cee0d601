//! The core and the other nodes of a cluster: they are routed as processes
//! named `@node` (one slot each in the process table, so requests in flight
//! to a node share the pending table, the deadlines and the removal path of
//! a worker). Here: which node serves a request, and what comes from them.

use bytestring::ByteString;
use std::time::Instant;

use super::core::Core;
use super::pending::{Key, ReplyTo};
use super::sink::Sink;
use crate::actors::log_limit::LogLine;
use crate::actors::nodes::{self, Choice};
use crate::names::{self, BROKER};
use crate::protocol::{CancelNotice, CancelReason, Envelope, ErrorCode, MessageType};

impl<S: Sink> Core<S> {
    /// Envelopes that came from other nodes, each with the node it came
    /// from (`@node`): requests (`source` stamped `proc@node`) and replies
    /// (`source` stamped `worker@node`).
    pub(crate) fn route_from_nodes(
        &mut self,
        envelopes: Vec<(ByteString, Envelope)>,
        now: Instant,
    ) {
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
                    self.route_reply(slot, &node, envelope.into(), now);
                }
                // The only event that crosses nodes: a caller's broker
                // cancels a request it sent here.
                MessageType::Event if envelope.is_cancel() => {
                    self.remote_cancel(&node, &envelope, now)
                }
                MessageType::Event => {}
            }
        }
        self.settle();
    }

    /// A request another node sent here (its `source` is `proc@node`): to
    /// an exported local service or process, never to the broker, never on
    /// to a third node.
    fn route_remote_request(&mut self, mut envelope: Envelope, now: Instant) {
        let origin = envelope.source.clone();
        match self.admit_remote(&mut envelope) {
            Ok(()) => self.route_request(origin, envelope.into(), ReplyTo::Process, true, now),
            Err((code, message)) => {
                self.reject(&envelope, origin, ReplyTo::Process, code, message, now);
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

    /// Node `node` advertised `services` (its heartbeat came); the first
    /// time, it is registered as process `@node`, reached through `port`.
    pub(crate) fn node_up(
        &mut self,
        node: &ByteString,
        services: Vec<(ByteString, u32)>,
        port: S::Port,
        now: Instant,
    ) {
        if self.nodes.up(node, services)
            && let LogLine::Log { suppressed } = self.node_log.check(now)
        {
            tracing::info!(%node, suppressed, "node joined");
        }
        let Some(id) = self.nodes.id(node).cloned() else {
            return;
        };
        if self.table.exact(&id).is_none() {
            // Never a target of its own: not in `*`, not picked by name.
            // Cancels of requests sent to it go on to its broker.
            let _ = self.table.register(id.clone(), &id, false, port, true, now);
        }
    }

    /// Node `node` is gone: its requests in flight are answered
    /// `worker_exited` now and it leaves the rotation. With `callers_gone`
    /// (the instance behind the name changed), what its callers had in
    /// flight here is dropped, never answered to the new instance; with
    /// `forget`, the node is forgotten altogether. Returns how many
    /// requests were answered.
    pub(crate) fn node_down(
        &mut self,
        node: &ByteString,
        reason: &str,
        callers_gone: bool,
        forget: bool,
        now: Instant,
    ) -> usize {
        let known = self.nodes.state(node) == Some(true);
        self.nodes.down(node);
        let id = self.nodes.id(node).cloned();
        let failed = id.map_or(0, |id| self.remove(&id, reason, now));
        let dropped = if callers_gone {
            self.drop_callers_of(node, now)
        } else {
            0
        };
        if forget {
            self.nodes.forget(node);
        }
        self.settle();
        if (known || failed > 0)
            && let LogLine::Log { suppressed } = self.node_log.check(now)
        {
            tracing::warn!(%node, reason = %reason, failed, dropped, suppressed, "node left");
        }
        failed
    }

    /// Drops the requests that callers on `node` have in flight here: the
    /// instance that sent them is gone. Their workers' slots are freed; a
    /// reply that still comes counts as late and goes nowhere. Returns how
    /// many.
    fn drop_callers_of(&mut self, node: &str, now: Instant) -> usize {
        let dropped = self
            .pending
            .drain_where(|key, _| nodes::split(&key.0).is_some_and(|(_, n)| n == node));
        let count = dropped.len();
        for (key, pending) in dropped {
            self.finish_early(key, pending, CancelReason::CallerExited, None, now);
        }
        count
    }

    /// The broker of node `node` ended a request it had sent here (its
    /// deadline passed there, its caller cancelled or left, its stream was
    /// cut): the worker here is told, with the reason given. That broker
    /// has answered its caller already, so nothing is answered here; a
    /// reply that still comes is late. A cancel of a request this node
    /// does not hold from `node` (answered already, or never sent by a
    /// caller of that node) is dropped and counted as the node's
    /// `dropped_events`, as a process's would be; unless this node ended
    /// that request early itself a moment ago (both brokers time a request
    /// out, so their deadlines pass together): then the two crossed, and
    /// the worker was told already.
    fn remote_cancel(&mut self, node: &ByteString, cancel: &Envelope, now: Instant) {
        let key: Key = (cancel.source.clone(), cancel.correlation_id);
        let from_node =
            nodes::split(&key.0).is_some_and(|(_, n)| node.strip_prefix('@') == Some(n));
        let reason = CancelNotice::from_payload(cancel.payload.as_ref())
            .map_or(CancelReason::Cancelled, |notice| notice.reason);
        if !from_node || !self.pending.contains(&key) {
            let crossed = from_node && self.expired.contains(&key);
            if !crossed && let Some(entry) = self.table.get_mut(node) {
                entry.delta.dropped_events += 1;
            }
            tracing::debug!(%node, source = %key.0, correlation_id = key.1, "cancel from a node dropped");
            return;
        }
        self.end_early(key, reason, None, now);
    }

    /// A request published to node `node` (`@node`) cannot be answered by
    /// it (no responders, too large to publish): the caller gets `code`.
    pub(crate) fn node_failed(
        &mut self,
        node: &ByteString,
        key: Key,
        code: ErrorCode,
        message: String,
        now: Instant,
    ) {
        if let Ok(pending) = self.pending.take_answered_by(&key, node) {
            self.table.release(node);
            let error = Envelope::broker_error_to(key.0, pending.method, key.1, code, message);
            self.answer(error, pending.reply_to, now);
            self.settle();
        }
    }

    /// [`pick`](Core::pick) when other nodes are known or the target names
    /// one.
    #[cold]
    pub(super) fn pick_in_cluster(
        &mut self,
        envelope: &mut Envelope,
    ) -> Result<usize, (ErrorCode, String)> {
        let capacity = self.config.queue_capacity;
        let key = envelope.key.as_ref().and_then(|k| k.as_str().ok());
        if let Some((local, node)) = nodes::split(&envelope.target) {
            let (local, node) = (local.to_owned(), node.to_owned());
            if node == self.nodes.this() {
                envelope.target = local.into();
                return self.table.pick(&envelope.target, key, capacity);
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
        match self.nodes.choose(&service, local_ready, key) {
            Some(Choice::Remote(node)) => {
                let slot = self.node_slot(&node)?;
                envelope.target = format!("{service}@{node}").into();
                Ok(slot)
            }
            Some(Choice::Local) => self.table.pick(&service, key, capacity),
            None => match self.table.pick(&service, key, capacity) {
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
}
