//! The Router's process table: who is registered, which service each process
//! is a worker of, the round-robin cursor of every service (DESIGN 5.1), the
//! per-process counts, and the envelopes held for each process until the
//! Router finishes the message it is handling.
//!
//! Why hold envelopes: one message the Router handles (a pipe read's worth
//! of envelopes from a bridge, a call, an expiry pass) can produce several
//! envelopes for the same process. Each process gets them in one
//! [`Deliver`] at the end ([`ProcessTable::send_held`]): one mailbox hop per
//! destination, whatever the form of the input. A bridge on the Router's
//! thread needs no hop: its inbox queues each envelope as it is routed
//! (holding it would only move it twice more), and publishes its depth
//! at the end.

use actix::prelude::*;
use bytestring::ByteString;
use hdrhistogram::Histogram;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::inbox::{Handoff, Inbox};
use super::latency;
use super::link::RouterLink;
use super::messages::{Counters, Deliver, Envelopes, RegisterProcess, RouterError};
use super::nodes;
use super::pacer::Pacer;
use super::pending::FastMap;
use crate::names::{BROADCAST, BROKER};
use crate::protocol::{Envelope, ErrorCode};

/// One registered process.
pub(crate) struct ProcessEntry {
    /// Index of its service in [`ProcessTable::services`].
    pub(crate) service: usize,
    /// Its bridge's read pacing, for subprocesses.
    pub(crate) pacer: Option<Arc<Pacer>>,
    recipient: Recipient<Deliver>,
    /// Its bridge's inbox, when the bridge runs on the Router's thread:
    /// then what is routed to it is queued at once, without a [`Deliver`].
    inbox: Option<Rc<Inbox>>,
    /// Its way in, when it runs on the Router's thread.
    link: Option<Rc<RouterLink>>,
    /// Envelopes for it, sent at the end of the current message (none are
    /// held for a process with an inbox).
    outgoing: Envelopes,
    /// In [`ProcessTable::held`]: something was routed to it during the
    /// current message.
    touched: bool,
    /// How many the last [`Deliver`] carried: the size to reserve next time.
    last_held: usize,
    /// In the rotation (its `ready` came).
    pub(crate) ready: bool,
    /// Requests delivered to it and not yet answered.
    pub(crate) in_flight: usize,
    /// Counts since the last metrics batch.
    pub(crate) delta: Counters,
    pub(crate) first_seen: Option<Instant>,
    pub(crate) last_seen: Option<Instant>,
    /// Events it sent in the current second: (second's start, count).
    events: (Instant, u64),
}

impl ProcessEntry {
    /// Its way in to the Router, when it runs on the Router's thread.
    pub(crate) fn link(&self) -> Option<&Rc<RouterLink>> {
        self.link.as_ref()
    }

    /// Notes traffic from or to the process.
    #[inline]
    pub(crate) fn saw(&mut self, now: Instant) {
        self.first_seen.get_or_insert(now);
        self.last_seen = Some(now);
    }

    /// Counts one event it sends at `now`; false once it has sent more than
    /// `per_second` in the current second (0: no limit).
    #[inline]
    pub(crate) fn event_allowed(&mut self, now: Instant, per_second: u64) -> bool {
        let (start, count) = &mut self.events;
        if now.saturating_duration_since(*start) >= std::time::Duration::from_secs(1) {
            *start = now;
            *count = 0;
        }
        *count += 1;
        per_second == 0 || *count <= per_second
    }

    /// Frames waiting in its stdin backlog (0 without a pipe).
    pub(crate) fn backlog(&self) -> usize {
        self.pacer.as_ref().map_or(0, |p| p.backlog())
    }
}

/// One service: its workers in registration order (as slots of the
/// table), and its latency samples since the last metrics batch.
pub(crate) struct ServiceEntry {
    pub(crate) name: ByteString,
    workers: Vec<usize>,
    cursor: usize,
    pub(crate) histogram: Histogram<u64>,
}

/// The table. Processes live in dense slots (so the hot path, round-robin
/// and the held deliveries, indexes instead of hashing ids); the id index
/// finds a slot by name.
#[derive(Default)]
pub(crate) struct ProcessTable {
    slots: Vec<Option<(ByteString, ProcessEntry)>>,
    index: FastMap<ByteString, usize>,
    free: Vec<usize>,
    pub(crate) services: Vec<ServiceEntry>,
    service_index: FastMap<ByteString, usize>,
    /// Slots routed to during the current message (`touched`).
    held: Vec<usize>,
}

impl ProcessTable {
    /// The slot of process `id`. A caller on another node (`proc@node`)
    /// resolves to that node's slot (`@node`): replies to it go there, and
    /// it is counted there.
    #[inline]
    pub(crate) fn slot_of(&self, id: &ByteString) -> Option<usize> {
        match self.index.get(id) {
            Some(&slot) => Some(slot),
            None => self.remote_slot_of(id),
        }
    }

    /// Every service name passes here on its way to `service_index` (a
    /// miss in the id index), so it is inlined.
    #[inline]
    fn remote_slot_of(&self, id: &str) -> Option<usize> {
        let (local, _) = nodes::split(id)?;
        // `@node`: the id the node is routed under.
        self.index.get(&id[local.len()..]).copied()
    }

    /// The slot of the process registered exactly as `id` (no `@node`
    /// resolution) and its requests in flight.
    pub(crate) fn exact(&self, id: &str) -> Option<(usize, usize)> {
        let slot = *self.index.get(id)?;
        Some((slot, self.at(slot)?.in_flight))
    }

    /// Ready workers of every service of processes (not of the broker, not
    /// of remote nodes), for this node's heartbeat.
    pub(crate) fn ready_counts(&self) -> Vec<(String, u32)> {
        self.services
            .iter()
            .filter(|s| !s.name.starts_with('@') && &*s.name != BROKER)
            .map(|s| {
                let ready = s
                    .workers
                    .iter()
                    .filter(|&&slot| self.at(slot).is_some_and(|e| e.ready))
                    .count();
                (s.name.to_string(), u32::try_from(ready).unwrap_or(u32::MAX))
            })
            .collect()
    }

    /// Whether `service` has a ready worker here.
    pub(crate) fn has_ready(&self, service: &str) -> bool {
        self.service_index.get(service).is_some_and(|&i| {
            self.services[i]
                .workers
                .iter()
                .any(|&slot| self.at(slot).is_some_and(|e| e.ready))
        })
    }

    #[inline]
    pub(crate) fn at(&self, slot: usize) -> Option<&ProcessEntry> {
        self.slots.get(slot)?.as_ref().map(|(_, e)| e)
    }

    #[inline]
    pub(crate) fn at_mut(&mut self, slot: usize) -> Option<&mut ProcessEntry> {
        self.slots.get_mut(slot)?.as_mut().map(|(_, e)| e)
    }

    pub(crate) fn get(&self, id: &ByteString) -> Option<&ProcessEntry> {
        self.at(self.slot_of(id)?)
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, id: &ByteString) -> Option<&mut ProcessEntry> {
        let slot = self.slot_of(id)?;
        self.at_mut(slot)
    }

    /// The id of the process in `slot` (from [`pick`](Self::pick)).
    pub(crate) fn id_of(&self, slot: usize) -> Option<&ByteString> {
        self.slots.get(slot)?.as_ref().map(|(id, _)| id)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&ByteString, &ProcessEntry)> {
        self.slots.iter().flatten().map(|(id, e)| (id, e))
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut ProcessEntry> {
        self.slots.iter_mut().flatten().map(|(_, e)| e)
    }

    /// Adds a process at the end of its service's rotation; returns its
    /// slot.
    pub(crate) fn register(&mut self, msg: RegisterProcess) -> Result<usize, RouterError> {
        if self.index.contains_key(&msg.id) {
            return Err(RouterError::Duplicate(msg.id.to_string()));
        }
        let service = self.service_slot(&msg.service);
        let (inbox, link) = match msg.inbox.and_then(Handoff::take) {
            Some(local) => (local.inbox, Some(local.link)),
            None => (None, None),
        };
        let entry = ProcessEntry {
            service,
            pacer: msg.pacer,
            recipient: msg.recipient,
            inbox,
            link,
            outgoing: Envelopes::new(),
            touched: false,
            last_held: 0,
            ready: msg.ready,
            in_flight: 0,
            delta: Counters::default(),
            first_seen: None,
            last_seen: None,
            events: (Instant::now(), 0),
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some((msg.id.clone(), entry));
                slot
            }
            None => {
                self.slots.push(Some((msg.id.clone(), entry)));
                self.slots.len() - 1
            }
        };
        self.index.insert(msg.id, slot);
        self.services[service].workers.push(slot);
        Ok(slot)
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

    /// Takes a process out of the table and its service's rotation. What was
    /// held for it is dropped with it.
    pub(crate) fn remove(&mut self, id: &ByteString) -> Option<ProcessEntry> {
        let slot = self.index.remove(id)?;
        let (_, entry) = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        let service = &mut self.services[entry.service];
        service.workers.retain(|&w| w != slot);
        if service.cursor >= service.workers.len() {
            service.cursor = 0;
        }
        Some(entry)
    }

    pub(crate) fn service_name(&self, entry: &ProcessEntry) -> &ByteString {
        &self.services[entry.service].name
    }

    /// Resolves a request's target to the slot of one process: the process
    /// itself, or the next ready worker of the service (round-robin) with
    /// fewer than `capacity` requests in flight. Or says why not.
    pub(crate) fn pick(
        &mut self,
        target: &ByteString,
        capacity: usize,
    ) -> Result<usize, (ErrorCode, String)> {
        if let Some(slot) = self.slot_of(target)
            && let Some(entry) = self.at(slot)
        {
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
            return Ok(slot);
        }
        let Some(&service) = self.service_index.get(target) else {
            return Err((
                ErrorCode::UnknownTarget,
                format!("no process or service {target:?}"),
            ));
        };
        let n = self.services[service].workers.len();
        let cursor = self.services[service].cursor;
        let mut any_ready = false;
        for step in 0..n {
            let i = (cursor + step) % n;
            let slot = self.services[service].workers[i];
            let Some(entry) = self.at(slot) else {
                continue;
            };
            if !entry.ready {
                continue;
            }
            any_ready = true;
            if entry.in_flight < capacity {
                self.services[service].cursor = (i + 1) % n;
                return Ok(slot);
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

    /// Every process an event to `target` from `from` goes to: all ready
    /// processes but the sender and the broker for `*`, the process itself,
    /// or every ready worker of a service. `None` for an unknown target.
    pub(crate) fn event_recipients(
        &self,
        from: &ByteString,
        target: &ByteString,
    ) -> Option<Vec<ByteString>> {
        if &**target == BROADCAST {
            Some(
                self.iter()
                    .filter(|(id, e)| e.ready && *id != from && &***id != BROKER)
                    .map(|(id, _)| id.clone())
                    .collect(),
            )
        } else if self.index.contains_key(target) {
            Some(vec![target.clone()])
        } else {
            let &service = self.service_index.get(target)?;
            Some(
                self.services[service]
                    .workers
                    .iter()
                    .filter_map(|&slot| self.slots.get(slot)?.as_ref())
                    .filter(|(_, e)| e.ready)
                    .map(|(id, _)| id.clone())
                    .collect(),
            )
        }
    }

    /// Holds an envelope for process `to` until [`send_held`](Self::send_held)
    /// (or queues it in its inbox), and counts it; false if the process is
    /// gone (its actor stopped).
    #[inline]
    pub(crate) fn deliver(&mut self, to: &ByteString, envelope: Envelope, now: Instant) -> bool {
        match self.slot_of(to) {
            Some(slot) => self.hold(slot, envelope, now),
            None => false,
        }
    }

    /// [`deliver`](Self::deliver) of a request to the process in `slot`
    /// (from [`pick`](Self::pick)): also takes one of its `queue_capacity`
    /// slots.
    #[inline]
    pub(crate) fn deliver_request(
        &mut self,
        slot: usize,
        envelope: Envelope,
        now: Instant,
    ) -> bool {
        let held = self.hold(slot, envelope, now);
        if held && let Some(entry) = self.at_mut(slot) {
            entry.in_flight += 1;
        }
        held
    }

    #[inline]
    fn hold(&mut self, slot: usize, envelope: Envelope, now: Instant) -> bool {
        let Some(entry) = self
            .slots
            .get_mut(slot)
            .and_then(|s| s.as_mut())
            .map(|(_, e)| e)
        else {
            return false;
        };
        if !entry.recipient.connected() {
            return false;
        }
        entry.delta.sent += 1;
        entry.saw(now);
        if !entry.touched {
            entry.touched = true;
            self.held.push(slot);
            if entry.inbox.is_none() {
                // Last time's count is the best guess of this time's: one
                // allocation instead of a chain of doublings (each a copy).
                entry.outgoing.reserve(entry.last_held);
            }
        }
        match &entry.inbox {
            Some(inbox) => inbox.queue(envelope),
            None => entry.outgoing.push(envelope),
        }
        true
    }

    /// Gives back a slot taken by [`deliver_request`](Self::deliver_request):
    /// its request was answered, bounced, timed out or orphaned.
    #[inline]
    pub(crate) fn release(&mut self, worker: &ByteString) {
        if let Some(slot) = self.slot_of(worker) {
            self.release_slot(slot);
        }
    }

    /// [`release`](Self::release) by slot.
    #[inline]
    pub(crate) fn release_slot(&mut self, slot: usize) {
        if let Some(entry) = self.at_mut(slot) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
    }

    /// Ends the current message: each process routed to gets what was held
    /// for it in one [`Deliver`]; an inbox, which queued as it went,
    /// publishes its new depth for the stats.
    #[inline]
    pub(crate) fn send_held(&mut self) {
        for slot in self.held.drain(..) {
            // A slot emptied meanwhile (the process was removed) has nothing.
            let Some(Some((_, entry))) = self.slots.get_mut(slot) else {
                continue;
            };
            entry.touched = false;
            if let Some(inbox) = &entry.inbox {
                inbox.settle();
            } else if !entry.outgoing.is_empty() {
                let envelopes = std::mem::take(&mut entry.outgoing);
                entry.last_held = envelopes.len();
                entry.recipient.do_send(Deliver(envelopes));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::metrics_store::MetricsStore;
    use crate::actors::router::Router;
    use crate::config::BrokerConfig;
    use crate::pipe::Outbox;
    use crate::protocol::EnvelopeCodec;
    use std::cell::Cell;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    /// Counts the envelopes that reach it in `Deliver` messages.
    struct Counter(Rc<Cell<usize>>);

    impl Actor for Counter {
        type Context = Context<Self>;
    }

    impl Handler<Deliver> for Counter {
        type Result = ();

        fn handle(&mut self, Deliver(envelopes): Deliver, _: &mut Self::Context) {
            self.0.set(self.0.get() + envelopes.len());
        }
    }

    /// A table with `echo.0` registered; with an inbox on this thread if
    /// `local`. Returns the table, the child's outbox and pacer, the count
    /// of what came in `Deliver`s, and the child's end of its stdin.
    fn table(
        local: bool,
    ) -> (
        ProcessTable,
        Rc<Outbox>,
        Arc<Pacer>,
        Rc<Cell<usize>>,
        tokio::io::DuplexStream,
    ) {
        let (stdin, child) = tokio::io::duplex(1 << 16);
        let outbox = Rc::new(Outbox::start(stdin, EnvelopeCodec::default()));
        let metrics = MetricsStore::new(Duration::from_secs(60)).start();
        let router = Router::new(BrokerConfig::default(), metrics.recipient()).start();
        let pacer = Arc::new(Pacer::default());
        let inbox = Rc::new(Inbox::new(
            "echo.0".into(),
            8,
            &outbox,
            Arc::clone(&pacer),
            router,
        ));
        let delivered = Rc::new(Cell::new(0));
        let recipient = Counter(Rc::clone(&delivered)).start().recipient();
        let mut table = ProcessTable::default();
        let registration = RegisterProcess::new("echo.0".into(), "echo".into(), recipient);
        table
            .register(RegisterProcess {
                inbox: local.then(|| Handoff::new(inbox)),
                ..registration
            })
            .expect("registered");
        (table, outbox, pacer, delivered, child)
    }

    #[actix::test]
    async fn a_local_inbox_is_queued_to_without_a_message() {
        let (mut table, outbox, pacer, delivered, mut child) = table(true);
        let event = Envelope::event("echo.0", "tick");
        for _ in 0..2 {
            assert!(table.deliver(&"echo.0".into(), event.clone(), Instant::now()));
        }
        assert_eq!(outbox.depth(), 2, "queued as routed: nothing is held");
        assert_eq!(
            pacer.backlog(),
            0,
            "the backlog is set when the message ends"
        );
        table.send_held();
        assert_eq!(pacer.backlog(), 2);
        let mut frame = vec![0; 2 * (4 + event.encoded_len())];
        child
            .read_exact(&mut frame)
            .await
            .expect("the child reads it");
        actix::clock::sleep(Duration::from_millis(10)).await;
        assert_eq!(delivered.get(), 0, "no Deliver message");
    }

    #[actix::test]
    async fn without_an_inbox_envelopes_go_in_a_deliver_message() {
        let (mut table, outbox, _, delivered, _child) = table(false);
        assert!(table.deliver(
            &"echo.0".into(),
            Envelope::event("echo.0", "tick"),
            Instant::now()
        ));
        table.send_held();
        actix::clock::sleep(Duration::from_millis(10)).await;
        assert_eq!(delivered.get(), 1);
        assert_eq!(outbox.depth(), 0);
    }
}
