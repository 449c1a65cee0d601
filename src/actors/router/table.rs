//! The Router's process table: who is registered, which service each process
//! is a worker of, the round-robin cursor of every service, the per-process
//! counts, and the processes delivered to during the current input.
//!
//! Why note who was delivered to: one input of the Router (a pipe read's
//! worth of envelopes from a bridge, a call, an expiry pass) can produce
//! several envelopes for the same process. Each process is settled once at
//! the end ([`ProcessTable::settle`]): its sink port then sends what it
//! held in one message, or publishes its queue's depth.
//!
//! Each process carries a port `P`, the driver's handle on it (see
//! `sink.rs`); the table never looks inside.

use bytestring::ByteString;
use hdrhistogram::Histogram;
use std::time::Instant;

use super::sink::Sink;
use crate::actors::fast_map::FastMap;
use crate::actors::latency;
use crate::actors::messages::{Counters, RouterError};
use crate::actors::nodes;
use crate::actors::rendezvous;
use crate::config::WorkerBalance;
use crate::names::{BROADCAST, BROKER};
use crate::protocol::{Envelope, ErrorCode};

/// What became of a request handed to a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivered {
    /// Its actor stopped: the request was dropped.
    Gone,
    /// Queued; `recycle_due` the first time the process reached its
    /// service's `max_requests`.
    Taken { recycle_due: bool },
}

/// One registered process.
pub(crate) struct ProcessEntry<P> {
    /// Index of its service in [`ProcessTable::services`].
    pub(crate) service: usize,
    /// The driver's handle on it.
    pub(crate) port: P,
    /// In [`ProcessTable::to_settle`]: something was delivered to it during
    /// the current input.
    touched: bool,
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
    /// It is told of cancelled requests (false for MessagePack-RPC
    /// programs, which have no `cancel`).
    pub(crate) takes_cancel: bool,
    /// Requests delivered to it since it registered.
    served: u64,
    /// Its [`Sink::recycle_due`] was sent (once per registration).
    recycle_due: bool,
    /// Its id hashed, for keyed routing.
    key_hash: u64,
}

impl<P> ProcessEntry<P> {
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
}

/// One service: its workers in registration order (as slots of the
/// table), and its latency samples since the last metrics batch.
pub(crate) struct ServiceEntry {
    pub(crate) name: ByteString,
    workers: Vec<usize>,
    cursor: usize,
    pub(crate) histogram: Histogram<u64>,
    /// Which ready worker a request without a key goes to.
    balance: WorkerBalance,
    /// Requests a worker serves before it is due for recycling (0: never).
    max_requests: u64,
}

/// The table. Processes live in dense slots (so the hot path, round-robin
/// and the settling at the end of an input, indexes instead of hashing
/// ids); the id index finds a slot by name.
pub(crate) struct ProcessTable<P> {
    slots: Vec<Option<(ByteString, ProcessEntry<P>)>>,
    index: FastMap<ByteString, usize>,
    free: Vec<usize>,
    pub(crate) services: Vec<ServiceEntry>,
    service_index: FastMap<ByteString, usize>,
    /// Slots delivered to during the current input (`touched`).
    to_settle: Vec<usize>,
}

impl<P> Default for ProcessTable<P> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            index: FastMap::default(),
            free: Vec::new(),
            services: Vec::new(),
            service_index: FastMap::default(),
            to_settle: Vec::new(),
        }
    }
}

impl<P> ProcessTable<P> {
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
    pub(crate) fn at(&self, slot: usize) -> Option<&ProcessEntry<P>> {
        self.slots.get(slot)?.as_ref().map(|(_, e)| e)
    }

    #[inline]
    pub(crate) fn at_mut(&mut self, slot: usize) -> Option<&mut ProcessEntry<P>> {
        self.slots.get_mut(slot)?.as_mut().map(|(_, e)| e)
    }

    pub(crate) fn get(&self, id: &ByteString) -> Option<&ProcessEntry<P>> {
        self.at(self.slot_of(id)?)
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, id: &ByteString) -> Option<&mut ProcessEntry<P>> {
        let slot = self.slot_of(id)?;
        self.at_mut(slot)
    }

    /// The id of the process in `slot` (from [`pick`](Self::pick)).
    pub(crate) fn id_of(&self, slot: usize) -> Option<&ByteString> {
        self.slots.get(slot)?.as_ref().map(|(id, _)| id)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&ByteString, &ProcessEntry<P>)> {
        self.slots.iter().flatten().map(|(id, e)| (id, e))
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut ProcessEntry<P>> {
        self.slots.iter_mut().flatten().map(|(_, e)| e)
    }

    /// Adds process `id` of `service`, reached through `port`, at the end
    /// of its service's rotation; returns its slot.
    pub(crate) fn register(
        &mut self,
        id: ByteString,
        service: &ByteString,
        ready: bool,
        port: P,
        takes_cancel: bool,
        now: Instant,
    ) -> Result<usize, RouterError> {
        if self.index.contains_key(&id) {
            return Err(RouterError::Duplicate(id.to_string()));
        }
        let service = self.service_slot(service);
        let entry = ProcessEntry {
            service,
            port,
            touched: false,
            ready,
            in_flight: 0,
            delta: Counters::default(),
            first_seen: None,
            last_seen: None,
            events: (now, 0),
            takes_cancel,
            served: 0,
            recycle_due: false,
            key_hash: rendezvous::id_hash(&id),
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some((id.clone(), entry));
                slot
            }
            None => {
                self.slots.push(Some((id.clone(), entry)));
                self.slots.len() - 1
            }
        };
        self.index.insert(id, slot);
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
            balance: WorkerBalance::RoundRobin,
            max_requests: 0,
        });
        let i = self.services.len() - 1;
        self.service_index.insert(name.clone(), i);
        i
    }

    /// Takes a process out of the table and its service's rotation. What its
    /// port held is dropped with it.
    pub(crate) fn remove(&mut self, id: &ByteString) -> Option<ProcessEntry<P>> {
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

    pub(crate) fn service_name(&self, entry: &ProcessEntry<P>) -> &ByteString {
        &self.services[entry.service].name
    }

    /// Sets how `service` spreads its requests and when its workers are
    /// due for recycling (a service not yet known is created).
    pub(crate) fn set_policy(
        &mut self,
        service: &ByteString,
        balance: WorkerBalance,
        max_requests: u64,
    ) {
        let i = self.service_slot(service);
        let entry = &mut self.services[i];
        entry.balance = balance;
        entry.max_requests = max_requests;
    }

    /// Resolves a request's target to the slot of one process: the process
    /// itself, or a ready worker of the service with fewer than `capacity`
    /// requests in flight: the one `key` hashes to, else by the service's
    /// balance. Or says why not. `key` must already be valid; it is ignored
    /// for a request to a process.
    pub(crate) fn pick(
        &mut self,
        target: &ByteString,
        key: Option<&str>,
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
        if let Some(key) = key {
            return self.pick_keyed(service, key, capacity);
        }
        let picked = match self.services[service].balance {
            WorkerBalance::RoundRobin => self.pick_round_robin(service, capacity),
            WorkerBalance::LeastPending => self.pick_least_pending(service, capacity),
        };
        picked.map_err(|any_ready| self.none_picked(target, any_ready, capacity))
    }

    /// The next ready worker in turn with room; or whether any was ready.
    #[inline]
    fn pick_round_robin(&mut self, service: usize, capacity: usize) -> Result<usize, bool> {
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
        Err(any_ready)
    }

    /// The ready worker with the fewest requests in flight and room; ties
    /// go to the first in turn from the cursor.
    fn pick_least_pending(&mut self, service: usize, capacity: usize) -> Result<usize, bool> {
        let n = self.services[service].workers.len();
        let cursor = self.services[service].cursor;
        let mut any_ready = false;
        let mut best: Option<(usize, usize, usize)> = None; // (in_flight, i, slot)
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
            if entry.in_flight < capacity
                && best.is_none_or(|(least, _, _)| entry.in_flight < least)
            {
                best = Some((entry.in_flight, i, slot));
            }
        }
        match best {
            Some((_, i, slot)) => {
                self.services[service].cursor = (i + 1) % n;
                Ok(slot)
            }
            None => Err(any_ready),
        }
    }

    /// The ready worker `key` hashes highest with (rendezvous hashing): the
    /// same while the ready set is unchanged, and only the keys of a worker
    /// that leaves or joins move. A full one means `busy`: a keyed request
    /// never spills to another worker.
    fn pick_keyed(
        &self,
        service: usize,
        key: &str,
        capacity: usize,
    ) -> Result<usize, (ErrorCode, String)> {
        let key_hash = rendezvous::key_hash(key);
        let best = self.services[service]
            .workers
            .iter()
            .filter_map(|&slot| Some((slot, self.at(slot)?)))
            .filter(|(_, entry)| entry.ready)
            .max_by_key(|(_, entry)| rendezvous::score(key_hash, entry.key_hash));
        let name = &self.services[service].name;
        match best {
            None => Err((
                ErrorCode::Unavailable,
                format!("service {name:?} has no ready worker"),
            )),
            Some((slot, entry)) if entry.in_flight >= capacity => {
                let id = self.id_of(slot).map_or("?", |id| &**id);
                Err((
                    ErrorCode::Busy,
                    format!("{id:?}, the worker of key {key:?}, has {capacity} requests in flight"),
                ))
            }
            Some((slot, _)) => Ok(slot),
        }
    }

    #[cold]
    fn none_picked(
        &self,
        target: &ByteString,
        any_ready: bool,
        capacity: usize,
    ) -> (ErrorCode, String) {
        if any_ready {
            (
                ErrorCode::Busy,
                format!("every worker of {target:?} has {capacity} requests in flight"),
            )
        } else {
            (
                ErrorCode::Unavailable,
                format!("service {target:?} has no ready worker"),
            )
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

    /// Hands an envelope to process `to` through its port (settled at the
    /// end of the input), and counts it; false if the process is gone (its
    /// actor stopped).
    #[inline]
    pub(crate) fn deliver(
        &mut self,
        to: &ByteString,
        envelope: impl Into<Box<Envelope>>,
        now: Instant,
        sink: &mut impl Sink<Port = P>,
    ) -> bool {
        match self.slot_of(to) {
            Some(slot) => self.hand(slot, envelope.into(), now, sink),
            None => false,
        }
    }

    /// [`deliver`](Self::deliver) of a request to the process in `slot`
    /// (from [`pick`](Self::pick)): also takes one of its `queue_capacity`
    /// slots, and counts the request toward its service's `max_requests`.
    #[inline]
    pub(crate) fn deliver_request(
        &mut self,
        slot: usize,
        envelope: Box<Envelope>,
        now: Instant,
        sink: &mut impl Sink<Port = P>,
    ) -> Delivered {
        if !self.hand(slot, envelope, now, sink) {
            return Delivered::Gone;
        }
        let Some(entry) = self
            .slots
            .get_mut(slot)
            .and_then(|s| s.as_mut())
            .map(|(_, e)| e)
        else {
            return Delivered::Gone;
        };
        entry.in_flight += 1;
        entry.served += 1;
        let max = self.services[entry.service].max_requests;
        let recycle_due = max > 0 && entry.served >= max && !entry.recycle_due;
        entry.recycle_due |= recycle_due;
        Delivered::Taken { recycle_due }
    }

    #[inline]
    fn hand(
        &mut self,
        slot: usize,
        envelope: Box<Envelope>,
        now: Instant,
        sink: &mut impl Sink<Port = P>,
    ) -> bool {
        let Some(entry) = self
            .slots
            .get_mut(slot)
            .and_then(|s| s.as_mut())
            .map(|(_, e)| e)
        else {
            return false;
        };
        if !sink.deliver(&mut entry.port, envelope) {
            return false;
        }
        entry.delta.sent += 1;
        entry.saw(now);
        if !entry.touched {
            entry.touched = true;
            self.to_settle.push(slot);
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

    /// Ends the current input: the port of each process delivered to is
    /// settled (what it held goes out).
    #[inline]
    pub(crate) fn settle(&mut self, sink: &mut impl Sink<Port = P>) {
        for slot in self.to_settle.drain(..) {
            // A slot emptied meanwhile (the process was removed) has nothing.
            let Some(Some((_, entry))) = self.slots.get_mut(slot) else {
                continue;
            };
            entry.touched = false;
            sink.settle(&mut entry.port);
        }
    }
}
