//! Requests in flight: `(origin, correlation_id) → {worker, deadline, start}`.
//!
//! Deadlines live in a min-heap beside the map, so the Router arms one timer
//! (for the earliest deadline) instead of one per request. A reply removes the
//! map entry and leaves its heap entry behind as stale; stale entries are
//! skipped when they surface and the heap is rebuilt when they outnumber the
//! live ones, so memory stays proportional to what is in flight.

use bytestring::ByteString;
use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::time::Instant;

use crate::actors::fast_map::FastMap;

/// Who gets the reply.
#[derive(Debug)]
pub(crate) enum ReplyTo<C> {
    /// A process (its id is the key's origin): the reply is delivered to it.
    Process,
    /// A Rust caller of the embedding API (the driver's `C`: a channel).
    Caller(C),
}

/// One request in flight.
#[derive(Debug)]
pub(crate) struct Pending<C> {
    /// The process the request was delivered to; only it may answer.
    pub(crate) worker: ByteString,
    /// The request's method name, copied into broker-generated errors.
    pub(crate) method: ByteString,
    /// When the request was read (latency starts here).
    pub(crate) start: Instant,
    /// When the origin gets `timeout`.
    pub(crate) deadline: Instant,
    /// Where the reply goes.
    pub(crate) reply_to: ReplyTo<C>,
    /// The caller takes partial replies (`stream = true`).
    pub(crate) stream: bool,
    /// Its worker was sent `cancel` (it is told at most once).
    pub(crate) cancel_sent: bool,
    /// Matches the heap entry that belongs to this request.
    seq: u64,
}

pub(crate) type Key = (ByteString, u64);

/// The pending table and its deadline heap.
#[derive(Debug)]
pub(crate) struct PendingTable<C> {
    map: FastMap<Key, Pending<C>>,
    deadlines: BinaryHeap<Reverse<(Instant, u64, Key)>>,
    next_seq: u64,
}

impl<C> Default for PendingTable<C> {
    fn default() -> Self {
        Self {
            map: FastMap::default(),
            deadlines: BinaryHeap::new(),
            next_seq: 0,
        }
    }
}

/// The key is already in flight.
#[derive(Debug)]
pub(crate) struct Duplicate;

/// Why a reply matched no request ([`PendingTable::take_answered_by`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotPending {
    /// In flight, but to another process.
    Forged,
    /// Nothing in flight under that key.
    Absent,
}

impl<C> PendingTable<C> {
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn contains(&self, key: &Key) -> bool {
        self.map.contains_key(key)
    }

    /// Adds a request; refuses a key that is already in flight.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn insert(
        &mut self,
        key: Key,
        worker: ByteString,
        method: ByteString,
        start: Instant,
        deadline: Instant,
        reply_to: ReplyTo<C>,
        stream: bool,
    ) -> Result<(), Duplicate> {
        let seq = self.next_seq;
        match self.map.entry(key) {
            Entry::Occupied(_) => return Err(Duplicate),
            Entry::Vacant(slot) => {
                self.deadlines
                    .push(Reverse((deadline, seq, slot.key().clone())));
                slot.insert(Pending {
                    worker,
                    method,
                    start,
                    deadline,
                    reply_to,
                    stream,
                    cancel_sent: false,
                    seq,
                });
            }
        }
        self.next_seq += 1;
        self.compact();
        Ok(())
    }

    /// Removes the request `key` if it was delivered to `worker`: only the
    /// process a request went to may answer it. `Err(Forged)` leaves a
    /// request delivered elsewhere in place; `Err(Absent)` means nothing is
    /// in flight under `key` (answered, timed out, or never sent).
    #[inline]
    pub(crate) fn take_answered_by(
        &mut self,
        key: &Key,
        worker: &ByteString,
    ) -> Result<Pending<C>, NotPending> {
        // One lookup on the hot path; the rare forgery puts its entry back
        // (its heap entry was never touched).
        match self.map.remove(key) {
            Some(pending) if pending.worker == *worker => Ok(pending),
            Some(pending) => {
                self.map.insert(key.clone(), pending);
                Err(NotPending::Forged)
            }
            None => Err(NotPending::Absent),
        }
    }

    /// The request `key` delivered to `worker`, left in place (a partial
    /// reply does not end it).
    #[inline]
    pub(crate) fn get_answered_by(
        &mut self,
        key: &Key,
        worker: &ByteString,
    ) -> Result<&mut Pending<C>, NotPending> {
        match self.map.get_mut(key) {
            Some(pending) if pending.worker == *worker => Ok(pending),
            Some(_) => Err(NotPending::Forged),
            None => Err(NotPending::Absent),
        }
    }

    /// Removes the request `key`, whoever it went to.
    pub(crate) fn take(&mut self, key: &Key) -> Option<Pending<C>> {
        self.map.remove(key)
    }

    /// Each request in flight, to mark.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&Key, &mut Pending<C>)> {
        self.map.iter_mut()
    }

    /// The earliest deadline still live, dropping stale heap entries on the way.
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((deadline, seq, key))) = self.deadlines.peek() {
            if self.map.get(key).is_some_and(|p| p.seq == *seq) {
                return Some(*deadline);
            }
            self.deadlines.pop();
        }
        None
    }

    /// Removes and returns every request whose deadline is at or before `now`.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<(Key, Pending<C>)> {
        let mut expired = Vec::new();
        while let Some(Reverse((deadline, _, _))) = self.deadlines.peek() {
            if *deadline > now {
                break;
            }
            let Some(Reverse((_, seq, key))) = self.deadlines.pop() else {
                break;
            };
            if self.map.get(&key).is_some_and(|p| p.seq == seq)
                && let Some(pending) = self.map.remove(&key)
            {
                expired.push((key, pending));
            }
        }
        expired
    }

    /// Removes every entry for which `f` says so (worker or origin gone).
    pub(crate) fn drain_where(
        &mut self,
        mut f: impl FnMut(&Key, &Pending<C>) -> bool,
    ) -> Vec<(Key, Pending<C>)> {
        let keys: Vec<Key> = self
            .map
            .iter()
            .filter(|(k, p)| f(k, p))
            .map(|(k, _)| k.clone())
            .collect();
        let drained = keys
            .into_iter()
            .filter_map(|k| self.map.remove(&k).map(|p| (k, p)))
            .collect();
        self.compact();
        drained
    }

    /// Rebuilds the heap when stale entries dominate it.
    ///
    /// In place: the heap keeps its capacity, so the requests after a
    /// rebuild push without a chain of doubling reallocations, each a copy
    /// of the whole heap (callgrind: ~120 instructions a request, one in
    /// flight). What a burst left behind is given back here too, so memory
    /// still follows what is in flight.
    #[inline]
    fn compact(&mut self) {
        if self.deadlines.len() > self.room() {
            self.rebuild();
        }
    }

    /// The heap entries allowed before a rebuild: twice what is in flight,
    /// plus 1 024.
    #[inline]
    fn room(&self) -> usize {
        2 * self.map.len() + 1024
    }

    /// Once per ~1 024 requests: kept out of the callers' code.
    #[cold]
    #[inline(never)]
    fn rebuild(&mut self) {
        let room = self.room();
        let mut heap = std::mem::take(&mut self.deadlines).into_vec();
        heap.clear();
        if heap.capacity() > 4 * room {
            heap.shrink_to(room);
        }
        heap.extend(
            self.map
                .iter()
                .map(|(k, p)| Reverse((p.deadline, p.seq, k.clone()))),
        );
        self.deadlines = BinaryHeap::from(heap);
    }

    /// Each request in flight and its worker.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Key, &ByteString)> {
        self.map.iter().map(|(key, p)| (key, &p.worker))
    }

    #[cfg(test)]
    pub(crate) fn heap_len(&self) -> usize {
        self.deadlines.len()
    }

    #[cfg(test)]
    pub(crate) fn heap_capacity(&self) -> usize {
        self.deadlines.capacity()
    }
}

/// Keys of requests that timed out recently, to tell a late reply from an
/// unmatched one. Bounded: the oldest are forgotten first.
#[derive(Debug)]
pub(crate) struct RecentlyExpired {
    set: HashSet<Key, foldhash::fast::RandomState>,
    order: VecDeque<Key>,
    capacity: usize,
}

impl RecentlyExpired {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            set: HashSet::default(),
            order: VecDeque::new(),
            capacity,
        }
    }

    pub(crate) fn insert(&mut self, key: Key) {
        if self.capacity == 0 || !self.set.insert(key.clone()) {
            return;
        }
        self.order.push_back(key);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
    }

    /// True if `key` ended recently without its worker's reply (left in
    /// place: a stream's later partials are late too).
    pub(crate) fn contains(&self, key: &Key) -> bool {
        self.set.contains(key)
    }

    /// True (once) if `key` timed out recently.
    pub(crate) fn take(&mut self, key: &Key) -> bool {
        self.set.remove(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(n: u64) -> Key {
        (ByteString::from_static("client.0"), n)
    }

    fn add(t: &mut PendingTable<()>, n: u64, deadline: Instant) -> Result<(), Duplicate> {
        t.insert(
            key(n),
            "w.0".into(),
            "M".into(),
            deadline,
            deadline,
            ReplyTo::Process,
            false,
        )
    }

    #[test]
    fn duplicates_are_refused_and_deadlines_expire_in_order() {
        let t0 = Instant::now();
        let mut t = PendingTable::default();
        add(&mut t, 1, t0 + Duration::from_millis(30)).expect("new");
        add(&mut t, 2, t0 + Duration::from_millis(10)).expect("new");
        assert!(add(&mut t, 1, t0).is_err());
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_millis(10)));
        let expired = t.expire(t0 + Duration::from_millis(20));
        assert_eq!(expired.iter().map(|(k, _)| k.1).collect::<Vec<_>>(), [2]);
        assert!(t.take(&key(1)).is_some());
        assert_eq!(t.next_deadline(), None, "stale entry skipped");
    }

    #[test]
    fn stale_heap_entries_are_compacted() {
        let t0 = Instant::now();
        let mut t = PendingTable::default();
        for n in 0..10_000 {
            add(&mut t, n, t0).expect("new");
            t.take(&key(n));
        }
        assert!(t.heap_len() <= 1024 + 2, "heap holds {}", t.heap_len());
    }

    #[test]
    fn a_rebuilt_heap_keeps_its_room_and_gives_back_a_burst() {
        let t0 = Instant::now();
        let mut t = PendingTable::default();
        // Steady state, one in flight: rebuilds keep the room they grew.
        for n in 0..1100 {
            add(&mut t, n, t0).expect("new");
            t.take(&key(n));
        }
        let room = t.heap_capacity();
        assert!(room > 1024, "grew to {room}");
        for n in 1100..10_000 {
            add(&mut t, n, t0).expect("new");
            t.take(&key(n));
            assert_eq!(t.heap_capacity(), room, "after request {n}");
        }
        // A burst of 100 000 in flight, then all answered: the next rebuild
        // shrinks the heap back to what is in flight.
        for n in 10_000..110_000 {
            add(&mut t, n, t0).expect("new");
        }
        for n in 10_000..110_000 {
            t.take(&key(n));
        }
        assert!(t.heap_capacity() >= 100_000);
        add(&mut t, 0, t0).expect("new");
        assert!(t.heap_len() <= 1024 + 2, "heap holds {}", t.heap_len());
        assert!(
            t.heap_capacity() <= 1026, // twice the one in flight, + 1 024
            "kept {} after the burst",
            t.heap_capacity()
        );
    }

    #[test]
    fn recently_expired_is_bounded_and_answers_once() {
        let mut r = RecentlyExpired::new(2);
        r.insert(key(1));
        r.insert(key(2));
        r.insert(key(3));
        assert!(!r.take(&key(1)), "evicted");
        assert!(r.take(&key(3)));
        assert!(!r.take(&key(3)), "only once");
    }
}
