//! Worker recycling: which worker of a service is replaced next. Plain
//! state with no clock and no I/O, so every rule has a unit test; the
//! Broker carries the decisions out.
//!
//! - A worker is *due* when it reaches one of its service's `recycle`
//!   limits (requests served, age since `ready`, resident memory); whoever
//!   watches that limit says so once per incarnation.
//! - Each service has one *turn* at a time: the replacement of one due
//!   worker (out of rotation, drained, stopped, started, ready), or a whole
//!   rolling restart, which replaces its workers one by one itself. What
//!   comes while the turn is taken waits in order, so no two replacements
//!   of one service overlap and a service of two or more workers always
//!   has one serving.
//! - A worker already due (waiting, or being replaced) is not queued
//!   twice.
//! - Each due worker is noted with the incarnation (pid) that reached the
//!   limit. When its turn comes, the Broker skips it if that incarnation
//!   is gone (it crashed and was restarted, a rolling restart replaced
//!   it, it was scaled away): its successor starts afresh.
//! - A replacement whose new worker does not become ready stops there, as
//!   a rolling restart does: the workers of that service still waiting are
//!   dropped and keep serving (the failed one is left to its restart
//!   policy). Rolling restarts waiting for the turn still run.

use std::collections::{BTreeMap, VecDeque};

use super::messages::RecycleReason;

/// A worker that reached a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The worker (`echo.1`).
    pub id: String,
    /// Which limit.
    pub reason: RecycleReason,
    /// Its incarnation when it reached it.
    pub pid: Option<u32>,
}

/// What gets a service's turn.
#[derive(Debug, PartialEq, Eq)]
pub enum Turn<R> {
    /// Replace this worker.
    Recycle(Due),
    /// A rolling restart may go ahead; `R` is how it is told.
    Roll(R),
}

/// Who holds a service's turn now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Holder {
    Recycle(String),
    Roll,
}

#[derive(Debug)]
struct Service<R> {
    holder: Holder,
    waiting: VecDeque<Turn<R>>,
}

/// The turns of every service. `R`: how a waiting rolling restart is told
/// to go ahead (a channel, in the Broker).
#[derive(Debug)]
pub struct Recycling<R> {
    /// Only services whose turn is taken.
    services: BTreeMap<String, Service<R>>,
}

impl<R> Default for Recycling<R> {
    fn default() -> Self {
        Self {
            services: BTreeMap::new(),
        }
    }
}

impl<R> Recycling<R> {
    /// Worker `due.id` of `service` reached a limit. Returns it if it is
    /// to be replaced now (the service's turn was free and is now its);
    /// `None` if it waits its turn, or was due already.
    pub fn due(&mut self, service: &str, due: Due) -> Option<Due> {
        match self.services.get_mut(service) {
            None => {
                self.services.insert(
                    service.to_owned(),
                    Service {
                        holder: Holder::Recycle(due.id.clone()),
                        waiting: VecDeque::new(),
                    },
                );
                Some(due)
            }
            Some(s) => {
                let already = s.holder == Holder::Recycle(due.id.clone())
                    || s.waiting
                        .iter()
                        .any(|t| matches!(t, Turn::Recycle(d) if d.id == due.id));
                if !already {
                    s.waiting.push_back(Turn::Recycle(due));
                }
                None
            }
        }
    }

    /// A rolling restart of `service` asks for the turn. Returns `ticket`
    /// if it may go ahead now; else it waits (and comes back from
    /// [`done`](Self::done) when its turn comes).
    pub fn roll(&mut self, service: &str, ticket: R) -> Option<R> {
        match self.services.get_mut(service) {
            None => {
                self.services.insert(
                    service.to_owned(),
                    Service {
                        holder: Holder::Roll,
                        waiting: VecDeque::new(),
                    },
                );
                Some(ticket)
            }
            Some(s) => {
                s.waiting.push_back(Turn::Roll(ticket));
                None
            }
        }
    }

    /// The turn of `service` is over (a replacement finished, or was
    /// skipped; a rolling restart ended). Returns what gets the turn next,
    /// which then holds it; `None` frees it.
    pub fn done(&mut self, service: &str) -> Option<Turn<R>> {
        let s = self.services.get_mut(service)?;
        let Some(next) = s.waiting.pop_front() else {
            self.services.remove(service);
            return None;
        };
        s.holder = match &next {
            Turn::Recycle(d) => Holder::Recycle(d.id.clone()),
            Turn::Roll(_) => Holder::Roll,
        };
        Some(next)
    }

    /// The replacement of a worker of `service` failed (its new worker did
    /// not become ready): the workers still waiting are not replaced (they
    /// keep serving); rolling restarts still wait. Returns the ids dropped.
    pub fn stop_recycling(&mut self, service: &str) -> Vec<String> {
        let Some(s) = self.services.get_mut(service) else {
            return Vec::new();
        };
        let mut dropped = Vec::new();
        s.waiting.retain(|t| match t {
            Turn::Recycle(d) => {
                dropped.push(d.id.clone());
                false
            }
            Turn::Roll(_) => true,
        });
        dropped
    }

    /// The broker is stopping: nothing waiting is replaced. Returns the
    /// rolling restarts that were waiting (to be told to give up).
    pub fn clear(&mut self) -> Vec<R> {
        let mut rolls = Vec::new();
        for s in std::mem::take(&mut self.services).into_values() {
            for t in s.waiting {
                if let Turn::Roll(r) = t {
                    rolls.push(r);
                }
            }
        }
        rolls
    }

    /// Whether worker `id` of `service` is being replaced or waits to be.
    #[cfg(test)]
    fn is_due(&self, service: &str, id: &str) -> bool {
        self.services.get(service).is_some_and(|s| {
            s.holder == Holder::Recycle(id.to_owned())
                || s.waiting
                    .iter()
                    .any(|t| matches!(t, Turn::Recycle(d) if d.id == id))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RecycleReason::*;

    fn due(id: &str, reason: RecycleReason) -> Due {
        Due {
            id: id.into(),
            reason,
            pid: Some(100),
        }
    }

    fn recycled(turn: Option<Turn<u32>>) -> Option<String> {
        match turn {
            Some(Turn::Recycle(d)) => Some(d.id),
            Some(Turn::Roll(t)) => panic!("roll {t}, not a recycle"),
            None => None,
        }
    }

    #[test]
    fn one_worker_of_a_service_at_a_time_the_others_in_order() {
        let mut r = Recycling::<u32>::default();
        assert_eq!(r.due("a", due("a.0", MaxAge)), Some(due("a.0", MaxAge)));
        assert_eq!(r.due("a", due("a.1", MaxRequests)), None);
        assert_eq!(r.due("a", due("a.2", MaxRss)), None);
        assert!(r.is_due("a", "a.1") && r.is_due("a", "a.0"));
        // Another service has a turn of its own.
        assert_eq!(r.due("b", due("b.0", MaxAge)), Some(due("b.0", MaxAge)));
        assert_eq!(recycled(r.done("a")), Some("a.1".into()));
        assert!(!r.is_due("a", "a.0"));
        assert_eq!(recycled(r.done("a")), Some("a.2".into()));
        assert_eq!(recycled(r.done("a")), None);
        // Free again: the next due worker goes at once.
        assert_eq!(r.due("a", due("a.0", MaxAge)), Some(due("a.0", MaxAge)));
        assert_eq!(recycled(r.done("b")), None);
    }

    #[test]
    fn a_worker_already_due_is_not_queued_twice() {
        let mut r = Recycling::<u32>::default();
        assert!(r.due("a", due("a.0", MaxRss)).is_some());
        // Being replaced: a second limit reached meanwhile adds nothing.
        assert_eq!(r.due("a", due("a.0", MaxAge)), None);
        assert_eq!(r.due("a", due("a.1", MaxRss)), None);
        assert_eq!(r.due("a", due("a.1", MaxRequests)), None);
        assert_eq!(recycled(r.done("a")), Some("a.1".into()));
        assert_eq!(recycled(r.done("a")), None);
    }

    #[test]
    fn a_rolling_restart_and_recycles_take_turns() {
        let mut r = Recycling::<u32>::default();
        // A roll first: recycles wait for it to end.
        assert_eq!(r.roll("a", 7), Some(7));
        assert_eq!(r.due("a", due("a.0", MaxAge)), None);
        assert_eq!(r.roll("a", 8), None);
        assert_eq!(recycled(r.done("a")), Some("a.0".into()));
        assert_eq!(r.done("a"), Some(Turn::Roll(8)));
        // While the roll runs, the worker it is about to replace falls due.
        assert_eq!(r.due("a", due("a.1", MaxAge)), None);
        assert_eq!(recycled(r.done("a")), Some("a.1".into()));
        assert_eq!(r.done("a"), None);
        // A recycle first: the roll waits.
        assert!(r.due("b", due("b.0", MaxRss)).is_some());
        assert_eq!(r.roll("b", 9), None);
        assert_eq!(r.done("b"), Some(Turn::Roll(9)));
        assert_eq!(r.done("b"), None);
    }

    #[test]
    fn a_failed_replacement_stops_the_recycling_of_its_service_only() {
        let mut r = Recycling::<u32>::default();
        assert!(r.due("a", due("a.0", MaxAge)).is_some());
        assert_eq!(r.due("a", due("a.1", MaxAge)), None);
        assert_eq!(r.roll("a", 1), None);
        assert_eq!(r.due("a", due("a.2", MaxAge)), None);
        assert!(r.due("b", due("b.0", MaxAge)).is_some());
        assert_eq!(r.due("b", due("b.1", MaxAge)), None);
        // a.0's new worker did not become ready.
        assert_eq!(r.stop_recycling("a"), ["a.1", "a.2"]);
        // The roll still runs; b is untouched.
        assert_eq!(r.done("a"), Some(Turn::Roll(1)));
        assert_eq!(r.done("a"), None);
        assert_eq!(recycled(r.done("b")), Some("b.1".into()));
        assert!(r.stop_recycling("c").is_empty());
    }

    #[test]
    fn stopping_drops_what_waits_and_hands_back_the_rolls() {
        let mut r = Recycling::<u32>::default();
        assert!(r.due("a", due("a.0", MaxAge)).is_some());
        assert_eq!(r.due("a", due("a.1", MaxAge)), None);
        assert_eq!(r.roll("a", 3), None);
        assert_eq!(r.roll("b", 4), Some(4));
        assert_eq!(r.roll("b", 5), None);
        let mut rolls = r.clear();
        rolls.sort_unstable();
        assert_eq!(rolls, [3, 5]);
        assert!(!r.is_due("a", "a.1"));
        // The turns still running end without a successor.
        assert_eq!(r.done("a"), None);
        assert_eq!(r.done("b"), None);
    }
}
