//! A deterministic simulation of the Router's core.
//!
//! A seeded random sequence of operations is played against the core and a
//! model of the processes around it: requests to services, to process ids
//! and to `broker` (in batches, and from Rust callers); replies from the
//! right worker, the wrong one, twice, and late; bad frames; workers
//! registered, made ready or not, removed, or gone without a word (their
//! actor stopped); callers that die; the clock advancing past deadlines
//! (the timer fires as the core armed it); scaling a service up and down
//! and rolling restarts; workers whose stdin is full (their inbox bounces
//! what the core delivers, and the bounce reaches the core later);
//! draining; metrics flushes. And the request lifecycle: requests that
//! ask for a stream and workers that send partial replies, callers that
//! stop reading (their streams are cut), cancels from callers (their own,
//! forged, unknown, misaddressed) and from Rust callers that drop a call,
//! keyed requests, least-pending services, recycling limits, and the drain
//! expiring. After every operation the invariants are checked:
//!
//! - every request gets exactly one final reply (a second one, or one to a
//!   request nobody asked, fails at once; at the end, after the clock has
//!   passed every deadline, every request of a live caller has had its
//!   one);
//! - a reply goes only to the process that asked, and a worker's reply
//!   only from the worker the request was delivered to;
//! - no worker holds more than `queue_capacity` requests;
//! - slots are released on every way a request ends: each worker's count
//!   in the core equals the requests the model knows it holds, and the
//!   pending table holds exactly the requests the model knows in flight;
//! - nothing stays pending once its worker is gone;
//! - among workers of a service that stayed ready (and never full) since
//!   the last change, round-robin counts differ by at most one;
//! - every input settles each port it delivered to, once;
//! - a delivered request carries its budget (`timeout_ms` of at least 1);
//! - a request that ends without its worker's reply (timeout, cancel,
//!   caller gone, stream cut) has its worker told within the same input;
//!   a worker gets at most one `cancel` per request, never for a request
//!   it was not given or already answered, and, but at the drain, never
//!   while the request still runs;
//! - partial replies reach only the caller of a live request that asked
//!   for a stream, before its final reply;
//! - a key goes to the same worker while the service's workers do not
//!   change; a least-pending pick holds no more than any other ready
//!   worker; a worker is due for recycling once, at exactly `max_requests`.
//!
//! proptest generates the sequences and shrinks a failing one, then every
//! step it still fails without is dropped; the failure names the seed
//! (`ROUTER_SIM_SEED` replays it) and prints the minimal sequence with what
//! each step did.

use bytestring::ByteString;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use super::core::Core;
use super::recorder::{self, Effect, Recorder};
use crate::actors::messages::Envelopes;
use crate::actors::nodes::Nodes;
use crate::config::BrokerConfig;
use crate::config::WorkerBalance;
use crate::protocol::{
    CancelNotice, CancelReason, Envelope, ErrorCode, MessageType, Payload, RequestKey,
    SalvagedRequest,
};

/// Requests a worker may hold.
const CAPACITY: usize = 2;
/// The default request timeout.
const TIMEOUT_MS: u64 = 100;

/// Every process the simulation knows: id, service.
const PROCESSES: [(&str, &str); 9] = [
    ("broker", "broker"),
    ("echo.0", "echo"),
    ("echo.1", "echo"),
    ("echo.2", "echo"),
    ("echo.3", "echo"),
    ("calc.0", "calc"),
    ("calc.1", "calc"),
    ("client.0", "client"),
    ("client.1", "client"),
];
/// What a request may name (services more often than the rest).
const TARGETS: [&str; 12] = [
    "echo", "echo", "echo", "calc", "calc", "echo.0", "echo.3", "calc.1", "client.0", "broker",
    "nobody", "echo.9",
];
/// What an event may name.
const EVENT_TARGETS: [&str; 6] = ["echo", "*", "client.1", "broker", "nobody", "calc.0"];
/// Per-request timeouts (`None`: the default).
const TIMEOUTS: [Option<u64>; 4] = [None, Some(1), Some(30), Some(250)];
/// What a request may carry beside its target: (stream, key). Keys `a` and
/// `b` are valid; the long one is refused.
const EXTRAS: [(bool, Option<&str>); 8] = [
    (false, None),
    (false, None),
    (false, None),
    (true, None),
    (true, None),
    (false, Some("a")),
    (true, Some("b")),
    (false, Some(LONG_KEY)),
];
/// A key one byte too long.
const LONG_KEY: &str = "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk";
/// Services that scale and roll, with their most workers.
const SERVICES: [(&str, usize); 2] = [("echo", 4), ("calc", 2)];
/// The Rust caller's id, as the core stamps it.
const CALLER: &str = "@caller";

/// How a worker answers.
#[derive(Debug, Clone, Copy)]
enum How {
    /// A response from the worker that got the request.
    Right,
    /// An error reply from it.
    Error,
    /// The same response twice in one batch.
    Twice,
    /// A response from another process.
    Wrong,
    /// A partial reply (`more`) from the worker that got the request.
    Partial,
}

/// One operation. Numbers pick among what exists when it runs (modulo),
/// so any sequence is valid and shrinks to a smaller valid one.
#[derive(Debug, Clone)]
enum Op {
    /// Process `from` sends requests (target, timeout, extras) in one
    /// batch; `from` past the processes is a Rust caller (one call).
    Request { from: u8, batch: Vec<(u8, u8, u8)> },
    /// A process cancels a request: `forge` 0 its own in flight, 1 an id
    /// it never used, 2 its own but addressed to a process, 3 another
    /// process's.
    Cancel { from: u8, which: u8, forge: u8 },
    /// A Rust caller drops a call.
    CancelCall { which: u8 },
    /// A process stops reading its stdin (its backlog is full) or reads
    /// again.
    Stall { who: u8, stalled: bool },
    /// A Rust caller's stream buffer fills (`deaf`: it stopped listening).
    StallCall { which: u8, deaf: bool },
    /// A service's balance and recycling limit change.
    Policy {
        service: u8,
        least: bool,
        max_requests: u8,
    },
    /// The drain expires for one worker, or all (`who` past the processes).
    DrainExpired { who: u8 },
    /// A process that holds requests answers one of them.
    Reply { who: u8, which: u8, how: How },
    /// A process sends again a correlation id still in flight.
    Duplicate { from: u8, which: u8 },
    /// An event.
    Event { from: u8, target: u8 },
    /// A frame that is no envelope; `salvaged`: a readable request.
    BadFrame { from: u8, salvaged: bool },
    /// A process starts (is registered), ready at once or not.
    Start { who: u8, ready: bool },
    /// A process becomes ready, or is drained.
    SetReady { who: u8, ready: bool },
    /// A process exits (its bridge reports it).
    Kill { who: u8 },
    /// A process's actor stops without a word.
    Vanish { who: u8 },
    /// A process's stdin backlog fills (its inbox bounces) or drains.
    StdinFull { who: u8, full: bool },
    /// The bounces queued so far reach the core.
    Bounces,
    /// Time passes; the timer fires as armed.
    Advance { ms: u16 },
    /// Shutdown begins or is called off.
    Draining(bool),
    /// A service is scaled to `workers`.
    Scale { service: u8, workers: u8 },
    /// Every worker of a service is restarted, one after the other.
    Roll { service: u8 },
    /// The metrics batch is cut.
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    let n = PROCESSES.len() as u8;
    prop_oneof![
        12 => (0..=n, prop::collection::vec(
                (0..TARGETS.len() as u8, 0..TIMEOUTS.len() as u8, 0..EXTRAS.len() as u8), 1..=3))
            .prop_map(|(from, batch)| Op::Request { from, batch }),
        12 => (any::<u8>(), any::<u8>(), prop_oneof![
                4 => Just(How::Right), 1 => Just(How::Error), 1 => Just(How::Twice), 1 => Just(How::Wrong),
                3 => Just(How::Partial)
            ])
            .prop_map(|(who, which, how)| Op::Reply { who, which, how }),
        1 => (0..n, any::<u8>()).prop_map(|(from, which)| Op::Duplicate { from, which }),
        2 => (0..n, 0..EVENT_TARGETS.len() as u8).prop_map(|(from, target)| Op::Event { from, target }),
        1 => (0..n, any::<bool>()).prop_map(|(from, salvaged)| Op::BadFrame { from, salvaged }),
        3 => (0..n, any::<bool>()).prop_map(|(who, ready)| Op::Start { who, ready }),
        3 => (0..n, any::<bool>()).prop_map(|(who, ready)| Op::SetReady { who, ready }),
        2 => (0..n).prop_map(|who| Op::Kill { who }),
        1 => (0..n).prop_map(|who| Op::Vanish { who }),
        2 => (0..n, any::<bool>()).prop_map(|(who, full)| Op::StdinFull { who, full }),
        2 => Just(Op::Bounces),
        5 => (0..150u16).prop_map(|ms| Op::Advance { ms }),
        1 => prop_oneof![1 => Just(true), 3 => Just(false)].prop_map(Op::Draining),
        1 => (0..SERVICES.len() as u8, 0..=4u8).prop_map(|(service, workers)| Op::Scale { service, workers }),
        1 => (0..SERVICES.len() as u8).prop_map(|service| Op::Roll { service }),
        1 => Just(Op::Flush),
        2 => (0..n, any::<u8>(), prop_oneof![5 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)])
            .prop_map(|(from, which, forge)| Op::Cancel { from, which, forge }),
        1 => any::<u8>().prop_map(|which| Op::CancelCall { which }),
        1 => (0..n, any::<bool>()).prop_map(|(who, stalled)| Op::Stall { who, stalled }),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(which, deaf)| Op::StallCall { which, deaf }),
        1 => (0..SERVICES.len() as u8, any::<bool>(), 0..4u8)
            .prop_map(|(service, least, max_requests)| Op::Policy { service, least, max_requests }),
        1 => (0..=n).prop_map(|who| Op::DrainExpired { who }),
    ]
}

/// One process as the model sees it.
#[derive(Debug)]
struct Proc {
    id: ByteString,
    service: ByteString,
    registered: bool,
    ready: bool,
    /// Its actor stopped; the core may not know yet.
    gone: bool,
    /// Its inbox bounces requests and events.
    stdin_full: bool,
    /// Requests delivered to it that it has not answered (kept after they
    /// time out: it may answer late).
    received: Vec<Envelope>,
    /// Requests it sent that have not had their reply: correlation id →
    /// whether the reply must come in the same step (a salvaged bad frame).
    asked: BTreeMap<u64, bool>,
    /// Its next correlation id (never reused, across incarnations too).
    next_id: u64,
    /// Every request delivered to it (this incarnation).
    got: BTreeSet<Key>,
    /// The requests it gave its final reply.
    answered: BTreeSet<Key>,
    /// The requests it was sent `cancel` for.
    cancelled: BTreeSet<Key>,
    /// Its stdin backlog is full: it does not read.
    stalled: bool,
    /// Requests delivered to it (this incarnation), and whether it was
    /// reported due for recycling.
    served: u64,
    recycle_due: bool,
}

/// A request: its origin and correlation id.
type Key = (ByteString, u64);

/// The simulation: the core, the model, the clock.
struct Sim {
    core: Core<Recorder>,
    now: Instant,
    procs: Vec<Proc>,
    /// Requests in flight as the model knows them: (origin, correlation
    /// id) → worker.
    live: BTreeMap<(ByteString, u64), ByteString>,
    /// Rust calls: number → (correlation id once delivered, answered).
    calls: BTreeMap<u64, (Option<u64>, bool)>,
    next_call: u64,
    /// The call made in the current step, to match its delivery.
    calling: Option<u64>,
    /// A duplicate sent in the current step, whose refusal is expected.
    duplicate: Option<(ByteString, u64)>,
    /// Bounces the inboxes sent and the core has not had yet.
    bounces: Vec<(ByteString, Envelope)>,
    draining: bool,
    /// Per service: round-robin picks per worker since the last change.
    rotation: BTreeMap<ByteString, BTreeMap<ByteString, u64>>,
    /// What happened, step by step.
    trace: Vec<String>,
    /// Live requests that asked for a stream.
    streams: BTreeSet<Key>,
    /// Rust calls that asked for a stream, and those that stopped
    /// listening.
    stream_calls: BTreeSet<u64>,
    deaf_calls: BTreeSet<u64>,
    /// Cancels the current input must send: (worker, request).
    owed: BTreeSet<(ByteString, Key)>,
    /// The current input ends requests early: their workers are owed a
    /// cancel.
    ending_early: bool,
    /// Per (service, key): the worker its requests went to since the
    /// service last changed.
    keys: BTreeMap<(ByteString, String), ByteString>,
    /// Per service: least-pending, and `max_requests`.
    policy: BTreeMap<ByteString, (bool, u64)>,
}

type Check = Result<(), String>;

impl Sim {
    fn new() -> Self {
        let config = BrokerConfig {
            queue_capacity: CAPACITY,
            request_timeout: Duration::from_millis(TIMEOUT_MS),
            max_events_per_s: 0,
            ..BrokerConfig::default()
        };
        let now = Instant::now();
        let mut sim = Sim {
            core: recorder::core(Some(config), Nodes::default(), now),
            now,
            procs: PROCESSES
                .iter()
                .map(|&(id, service)| Proc {
                    id: id.into(),
                    service: service.into(),
                    registered: false,
                    ready: false,
                    gone: false,
                    stdin_full: false,
                    received: Vec::new(),
                    asked: BTreeMap::new(),
                    next_id: 1,
                    got: BTreeSet::new(),
                    answered: BTreeSet::new(),
                    cancelled: BTreeSet::new(),
                    stalled: false,
                    served: 0,
                    recycle_due: false,
                })
                .collect(),
            live: BTreeMap::new(),
            calls: BTreeMap::new(),
            next_call: 0,
            calling: None,
            duplicate: None,
            bounces: Vec::new(),
            draining: false,
            rotation: BTreeMap::new(),
            trace: Vec::new(),
            streams: BTreeSet::new(),
            stream_calls: BTreeSet::new(),
            deaf_calls: BTreeSet::new(),
            owed: BTreeSet::new(),
            ending_early: false,
            keys: BTreeMap::new(),
            policy: BTreeMap::new(),
        };
        // The broker, two echo workers and a client are up; calc.0 starts.
        for (who, ready) in [(0, true), (1, true), (2, true), (5, false), (7, true)] {
            sim.start(who, ready).expect("the first processes start");
        }
        sim.trace.clear();
        sim
    }

    fn log(&mut self, line: String) {
        self.trace.push(line);
    }

    /// Index of the process `id`.
    fn find(&self, id: &str) -> Option<usize> {
        self.procs.iter().position(|p| &*p.id == id)
    }

    /// A process that can act: registered, its actor running.
    fn acting(&self, who: u8) -> Option<usize> {
        let i = who as usize % self.procs.len();
        let p = &self.procs[i];
        (p.registered && !p.gone).then_some(i)
    }

    // ---- operations ------------------------------------------------------

    fn run(&mut self, op: &Op) -> Check {
        self.log(format!("{op:?}"));
        match *op {
            Op::Request { from, ref batch } => self.request(from, batch)?,
            Op::Reply { who, which, how } => self.reply(who, which, how)?,
            Op::Duplicate { from, which } => self.resend(from, which)?,
            Op::Event { from, target } => self.event(from, target)?,
            Op::BadFrame { from, salvaged } => self.bad_frame(from, salvaged)?,
            Op::Start { who, ready } => self.start(who as usize % self.procs.len(), ready)?,
            Op::SetReady { who, ready } => {
                self.set_ready(who as usize % self.procs.len(), ready)?
            }
            Op::Kill { who } => self.kill(who as usize % self.procs.len(), "killed")?,
            Op::Vanish { who } => self.vanish(who)?,
            Op::StdinFull { who, full } => {
                let i = who as usize % self.procs.len();
                self.procs[i].stdin_full = full && &*self.procs[i].id != "broker";
            }
            Op::Bounces => self.feed_bounces()?,
            Op::Advance { ms } => self.advance(Duration::from_millis(u64::from(ms)))?,
            Op::Draining(on) => {
                self.draining = on;
                self.core.set_draining(on);
            }
            Op::Scale { service, workers } => self.scale(service, workers)?,
            Op::Roll { service } => self.roll(service)?,
            Op::Flush => self.flush()?,
            Op::Cancel { from, which, forge } => self.cancel(from, which, forge)?,
            Op::CancelCall { which } => self.cancel_call(which)?,
            Op::Stall { who, stalled } => {
                let i = who as usize % self.procs.len();
                let id = self.procs[i].id.clone();
                self.procs[i].stalled = stalled;
                let backlog = &mut self.core.sink().backlog;
                if stalled {
                    backlog.insert(id, CAPACITY);
                } else {
                    backlog.remove(&id);
                }
            }
            Op::StallCall { which, deaf } => {
                let open: Vec<u64> = self.open_calls();
                if let Some(&call) = open.get(which as usize % open.len().max(1)) {
                    self.log(format!("  call #{call} stalls (deaf: {deaf})"));
                    let sink = self.core.sink();
                    if deaf {
                        sink.deaf.insert(call);
                        self.deaf_calls.insert(call);
                    } else {
                        sink.full.insert(call);
                    }
                }
            }
            Op::Policy {
                service,
                least,
                max_requests,
            } => {
                let (name, _) = SERVICES[service as usize % SERVICES.len()];
                let balance = if least {
                    WorkerBalance::LeastPending
                } else {
                    WorkerBalance::RoundRobin
                };
                let max = u64::from(max_requests) * 3;
                self.core.set_policy(&name.into(), balance, max);
                self.policy.insert(name.into(), (least, max));
                self.changed(&name.into());
            }
            Op::DrainExpired { who } => self.drain_expired(who)?,
        }
        self.check()
    }

    fn request(&mut self, from: u8, batch: &[(u8, u8, u8)]) -> Check {
        let to = |t: u8| TARGETS[t as usize % TARGETS.len()];
        let timeout = |t: u8| TIMEOUTS[t as usize % TIMEOUTS.len()];
        let build = |target: u8, t: u8, extra: u8, id: u64| {
            let (stream, key) = EXTRAS[extra as usize % EXTRAS.len()];
            let mut request = Envelope::request(to(target), "M", id);
            request.timeout_ms = timeout(t);
            request.stream = stream;
            request.key = key.map(|k| {
                RequestKey::new(k).unwrap_or_else(|_| {
                    RequestKey::Invalid(Payload::encode(k).expect("a str payload"))
                })
            });
            (request, key == Some(LONG_KEY))
        };
        if from as usize >= self.procs.len() {
            // A Rust caller: one call.
            let (target, t, extra) = batch[0];
            let (request, _) = build(target, t, extra, 0);
            let call = self.next_call;
            self.next_call += 1;
            self.calls.insert(call, (None, false));
            if request.stream {
                self.stream_calls.insert(call);
            }
            self.calling = Some(call);
            self.log(format!(
                "  call #{call} → {} (stream: {})",
                to(target),
                request.stream
            ));
            self.core.call(request, call, self.now);
            let effects = self.core.sink().take();
            self.absorb(effects)?;
            return self.answered_now();
        }
        let Some(i) = self.acting(from) else {
            return Ok(());
        };
        let mut envelopes = Vec::new();
        for &(target, t, extra) in batch {
            let p = &mut self.procs[i];
            let id = p.next_id;
            p.next_id += 1;
            let (request, bad_key) = build(target, t, extra, id);
            // A bad key is refused at once.
            p.asked.insert(id, bad_key);
            envelopes.push(request);
        }
        let ids: Vec<_> = envelopes
            .iter()
            .map(|e| {
                (
                    e.correlation_id,
                    e.target.to_string(),
                    e.stream,
                    e.key.is_some(),
                )
            })
            .collect();
        self.log(format!("  {} asks {ids:?}", self.procs[i].id));
        self.send(i, envelopes)
    }

    /// The Rust call whose correlation id is `id`.
    fn calls_by_id(&self, id: u64) -> Option<u64> {
        self.calls
            .iter()
            .find(|(_, (delivered, _))| *delivered == Some(id))
            .map(|(&call, _)| call)
    }

    /// Rust calls not yet answered.
    fn open_calls(&self) -> Vec<u64> {
        self.calls
            .iter()
            .filter(|(_, (_, answered))| !answered)
            .map(|(&call, _)| call)
            .collect()
    }

    fn cancel(&mut self, from: u8, which: u8, forge: u8) -> Check {
        let Some(i) = self.acting(from) else {
            return Ok(());
        };
        let id = self.procs[i].id.clone();
        let own: Vec<u64> = self.procs[i]
            .asked
            .keys()
            .copied()
            .filter(|n| self.live.contains_key(&(id.clone(), *n)))
            .collect();
        let others: Vec<Key> = self
            .live
            .keys()
            .filter(|(origin, _)| *origin != id)
            .cloned()
            .collect();
        let (cancel, valid) = match forge {
            0 if !own.is_empty() => {
                let n = own[which as usize % own.len()];
                (Envelope::cancel_request(n), true)
            }
            1 | 0 => (
                Envelope::cancel_request(self.procs[i].next_id + 1000),
                false,
            ),
            2 if !own.is_empty() => {
                let mut cancel = Envelope::cancel_request(own[which as usize % own.len()]);
                cancel.target = "echo.0".into();
                (cancel, false)
            }
            _ if !others.is_empty() => {
                let (_, n) = &others[which as usize % others.len()];
                (Envelope::cancel_request(*n), false)
            }
            _ => return Ok(()),
        };
        let key = (id.clone(), cancel.correlation_id);
        // A forged cancel may name an id of its own by chance: it must
        // still be addressed to the broker to count.
        let valid = valid || (&*cancel.target == "broker" && self.live.contains_key(&key));
        self.log(format!(
            "  {id} cancels {} to {} (valid: {valid})",
            cancel.correlation_id, cancel.target
        ));
        let before = self.live.len();
        if valid {
            self.procs[i].asked.insert(key.1, true);
        }
        self.ending_early = true;
        let sent = self.send(i, vec![cancel]);
        self.ending_early = false;
        sent?;
        if !valid && self.live.len() != before {
            return Err(format!("a forged cancel from {id} ended a request"));
        }
        Ok(())
    }

    fn cancel_call(&mut self, which: u8) -> Check {
        let open: Vec<u64> = self
            .open_calls()
            .into_iter()
            .filter(|call| self.calls[call].0.is_some())
            .collect();
        let Some(&call) = open.get(which as usize % open.len().max(1)) else {
            return Ok(());
        };
        let Some(id) = self.calls[&call].0 else {
            return Ok(());
        };
        self.log(format!("  call #{call} is dropped"));
        self.ending_early = true;
        self.core.cancel_call(id, self.now);
        let effects = self.core.sink().take();
        let absorbed = self.absorb(effects);
        self.ending_early = false;
        absorbed?;
        if self.calls.get(&call).is_some_and(|c| !c.1)
            && self.live.contains_key(&(CALLER.into(), id))
        {
            return Err(format!("dropped call #{call} is still in flight"));
        }
        Ok(())
    }

    fn drain_expired(&mut self, who: u8) -> Check {
        let worker = (who as usize) < self.procs.len();
        let id = worker.then(|| self.procs[who as usize].id.clone());
        self.log(format!("  the drain expires for {id:?}"));
        for (key, w) in &self.live {
            if id.as_ref().is_none_or(|id| id == w) {
                let p = &self.procs[self.find(w).expect("a live worker is known")];
                if !p.cancelled.contains(key) {
                    self.owed.insert((w.clone(), key.clone()));
                }
            }
        }
        let before = self.live.len();
        self.core.cancel_in_flight(id.as_ref(), self.now);
        let effects = self.core.sink().take();
        self.absorb(effects)?;
        if self.live.len() != before {
            return Err("the drain expiring ended requests".into());
        }
        Ok(())
    }

    /// Process `i` sends `envelopes` in one batch.
    fn send(&mut self, i: usize, envelopes: Vec<Envelope>) -> Check {
        let from = self.procs[i].id.clone();
        let slot = self
            .core
            .slot_of(&from)
            .ok_or_else(|| format!("{from} is registered in the model, not in the core"))?;
        self.core
            .route_batch(slot, &from, Envelopes::from(envelopes), self.now);
        let effects = self.core.sink().take();
        self.absorb(effects)?;
        self.answered_now()
    }

    fn reply(&mut self, who: u8, which: u8, how: How) -> Check {
        let holders: Vec<usize> = (0..self.procs.len())
            .filter(|&i| {
                let p = &self.procs[i];
                p.registered && !p.gone && !p.received.is_empty()
            })
            .collect();
        if holders.is_empty() {
            return Ok(());
        }
        let i = holders[who as usize % holders.len()];
        let k = which as usize % self.procs[i].received.len();
        let request = self.procs[i].received[k].clone();
        let mut reply = request.response(None);
        if let How::Error = how {
            reply = request.error_reply("handler", "no");
        }
        let key = (request.source.to_string(), request.correlation_id);
        if let How::Partial = how {
            let live_key: Key = (request.source.clone(), request.correlation_id);
            let partial = request.partial_response(None);
            let streaming = self.live.get(&live_key) == Some(&self.procs[i].id)
                && self.streams.contains(&live_key);
            // A caller that does not read has its stream cut.
            let cut = streaming
                && match self.find(&request.source) {
                    Some(o) => self.procs[o].stalled,
                    None => self.calls_by_id(request.correlation_id).is_some_and(|c| {
                        self.core.sink().full.contains(&c) || self.deaf_calls.contains(&c)
                    }),
                };
            self.log(format!(
                "  {} sends a partial of {key:?} (streaming: {streaming}, cut: {cut})",
                self.procs[i].id
            ));
            // A deaf caller's request ends with no answer; its worker is
            // told unless the drain told it already, and then nothing marks
            // the end but this.
            let silent_end = cut
                && self.procs[i].cancelled.contains(&live_key)
                && self
                    .calls_by_id(live_key.1)
                    .is_some_and(|c| self.deaf_calls.contains(&c))
                && &*live_key.0 == CALLER;
            self.ending_early = cut;
            let sent = self.send(i, vec![partial]);
            self.ending_early = false;
            if silent_end {
                self.live.remove(&live_key);
                if let Some(call) = self.calls_by_id(live_key.1)
                    && let Some(state) = self.calls.get_mut(&call)
                {
                    state.1 = true;
                }
            }
            return sent;
        }
        match how {
            How::Wrong => {
                // Someone else, who was not asked, answers it.
                let Some(j) = (1..self.procs.len())
                    .map(|d| (i + d) % self.procs.len())
                    .find(|&j| self.procs[j].registered && !self.procs[j].gone)
                else {
                    return Ok(());
                };
                self.log(format!(
                    "  {} answers {key:?} for {}",
                    self.procs[j].id, self.procs[i].id
                ));
                let before = self.live.len();
                self.send(j, vec![reply])?;
                if self.live.len() != before {
                    return Err(format!("a forged reply to {key:?} ended it"));
                }
                Ok(())
            }
            How::Partial => Ok(()),
            How::Twice => {
                self.procs[i].received.remove(k);
                self.procs[i]
                    .answered
                    .insert((request.source.clone(), request.correlation_id));
                self.log(format!("  {} answers {key:?} twice", self.procs[i].id));
                self.send(i, vec![reply.clone(), reply])
            }
            How::Right | How::Error => {
                self.procs[i].received.remove(k);
                self.procs[i]
                    .answered
                    .insert((request.source.clone(), request.correlation_id));
                self.log(format!("  {} answers {key:?} ({how:?})", self.procs[i].id));
                self.send(i, vec![reply])
            }
        }
    }

    fn resend(&mut self, from: u8, which: u8) -> Check {
        let Some(i) = self.acting(from) else {
            return Ok(());
        };
        let outstanding: Vec<u64> = self.procs[i].asked.keys().copied().collect();
        if outstanding.is_empty() {
            return Ok(());
        }
        let id = outstanding[which as usize % outstanding.len()];
        self.log(format!("  {} sends {id} again", self.procs[i].id));
        self.duplicate = Some((self.procs[i].id.clone(), id));
        self.send(i, vec![Envelope::request("echo", "M", id)])?;
        match self.duplicate.take() {
            Some(key) => Err(format!("the duplicate {key:?} was not refused")),
            None => Ok(()),
        }
    }

    fn event(&mut self, from: u8, target: u8) -> Check {
        let Some(i) = self.acting(from) else {
            return Ok(());
        };
        let target = EVENT_TARGETS[target as usize % EVENT_TARGETS.len()];
        let ready = |p: &Proc| p.registered && p.ready && !p.gone;
        let expected: BTreeSet<ByteString> = match target {
            "*" => self
                .procs
                .iter()
                .enumerate()
                .filter(|&(j, p)| j != i && ready(p) && &*p.id != "broker")
                .map(|(_, p)| p.id.clone())
                .collect(),
            _ => self
                .procs
                .iter()
                .filter(|p| {
                    (&*p.id == target && p.registered && !p.gone)
                        || (&*p.service == target && ready(p) && !target.contains('.'))
                })
                .map(|p| p.id.clone())
                .collect(),
        };
        let from = self.procs[i].id.clone();
        let slot = self.core.slot_of(&from).ok_or("not in the core")?;
        let event = Envelope::event(target, "tick");
        self.core
            .route_batch(slot, &from, Envelopes::from(event), self.now);
        let effects = self.core.sink().take();
        let reached: BTreeSet<ByteString> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Deliver { to, envelope } if envelope.kind == MessageType::Event => {
                    Some(to.clone())
                }
                _ => None,
            })
            .collect();
        self.log(format!(
            "  event from {from} to {target} reached {reached:?}"
        ));
        if reached != expected {
            return Err(format!(
                "an event from {from} to {target} reached {reached:?}, not {expected:?}"
            ));
        }
        self.absorb(effects)
    }

    fn bad_frame(&mut self, from: u8, salvaged: bool) -> Check {
        let Some(i) = self.acting(from) else {
            return Ok(());
        };
        let p = &mut self.procs[i];
        let request = salvaged.then(|| {
            let id = p.next_id;
            p.next_id += 1;
            p.asked.insert(id, true);
            SalvagedRequest {
                correlation_id: id,
                id: Some("M".into()),
            }
        });
        let from = p.id.clone();
        self.core
            .bad_frame(from, 1, "not an envelope", request, self.now);
        let effects = self.core.sink().take();
        self.absorb(effects)?;
        self.answered_now()
    }

    fn start(&mut self, i: usize, ready: bool) -> Check {
        let id = self.procs[i].id.clone();
        let service = self.procs[i].service.clone();
        let result = self
            .core
            .register(id.clone(), &service, ready, id.clone(), true, self.now);
        match (result.is_ok(), self.procs[i].registered) {
            (true, false) => {
                let p = &mut self.procs[i];
                p.registered = true;
                p.ready = ready;
                p.gone = false;
                p.got.clear();
                p.answered.clear();
                p.cancelled.clear();
                p.served = 0;
                p.recycle_due = false;
                self.core.sink().gone.remove(&id);
                self.log(format!("  {id} registered (ready: {ready})"));
                self.changed(&service);
                Ok(())
            }
            (false, true) => Ok(()),
            (ok, _) => Err(format!("registering {id}: the core said {ok}")),
        }
    }

    fn set_ready(&mut self, i: usize, ready: bool) -> Check {
        let p = &mut self.procs[i];
        if &*p.id == "broker" {
            return Ok(());
        }
        self.core.set_ready(&p.id, ready);
        if p.registered {
            p.ready = ready;
            let service = p.service.clone();
            self.changed(&service);
        }
        Ok(())
    }

    fn kill(&mut self, i: usize, reason: &str) -> Check {
        if &*self.procs[i].id == "broker" {
            return Ok(());
        }
        let id = self.procs[i].id.clone();
        let failed = self.core.remove_process(&id, reason, self.now);
        let effects = self.core.sink().take();
        // What it asked itself is forgotten with it, not failed.
        let holding = self
            .live
            .iter()
            .filter(|((origin, _), w)| **w == id && *origin != id)
            .count();
        if failed != holding {
            return Err(format!(
                "removing {id} failed {failed} requests; it held {holding}"
            ));
        }
        self.log(format!("  {id} removed, {failed} failed"));
        self.orphans_owed(&id);
        self.forget(i);
        self.absorb(effects)
    }

    /// Process `id` left the core: the workers of what it asked are owed a
    /// cancel.
    fn orphans_owed(&mut self, id: &ByteString) {
        let orphans: Vec<(ByteString, Key)> = self
            .live
            .iter()
            .filter(|((origin, _), w)| origin == id && *w != id)
            .map(|(key, w)| (w.clone(), key.clone()))
            .collect();
        for (worker, key) in orphans {
            if let Some(w) = self.find(&worker)
                && self.procs[w].registered
                && !self.procs[w].cancelled.contains(&key)
            {
                self.owed.insert((worker, key));
            }
        }
    }

    /// Process `i` is out of the core: the model forgets it and what it
    /// asked (nobody is answered for it).
    fn forget(&mut self, i: usize) {
        let p = &mut self.procs[i];
        if !p.registered {
            return;
        }
        p.registered = false;
        p.ready = false;
        p.received.clear();
        p.asked.clear();
        let (id, service) = (p.id.clone(), p.service.clone());
        self.live.retain(|(origin, _), _| *origin != id);
        self.changed(&service);
    }

    fn vanish(&mut self, who: u8) -> Check {
        let Some(i) = self.acting(who) else {
            return Ok(());
        };
        if &*self.procs[i].id == "broker" {
            return Ok(());
        }
        self.procs[i].gone = true;
        let id = self.procs[i].id.clone();
        self.log(format!("  {id}'s actor stops"));
        self.core.sink().gone.insert(id);
        Ok(())
    }

    fn feed_bounces(&mut self) -> Check {
        for (to, envelope) in std::mem::take(&mut self.bounces) {
            self.log(format!(
                "  {to} bounces {} {:?} of {}",
                envelope.kind, envelope.correlation_id, envelope.source
            ));
            self.core
                .bounce(&to, envelope, ErrorCode::Busy, "full".into(), self.now);
            let effects = self.core.sink().take();
            self.absorb(effects)?;
        }
        Ok(())
    }

    /// Time passes by `by`; the timer fires at each armed deadline on the
    /// way.
    fn advance(&mut self, by: Duration) -> Check {
        let until = self.now + by;
        while let Some(at) = self.core.sink().armed.filter(|&at| at <= until) {
            self.core.sink().armed = None;
            self.now = self.now.max(at);
            self.core.expire(self.now);
            let effects = self.core.sink().take();
            if !effects.is_empty() {
                self.log(format!("  at +{} ms: {} expired", self.ms(), effects.len()));
            }
            self.ending_early = true;
            let absorbed = self.absorb(effects);
            self.ending_early = false;
            absorbed?;
            self.check()?;
        }
        self.now = until;
        Ok(())
    }

    fn ms(&self) -> u128 {
        self.now
            .saturating_duration_since(self.core.clock.0)
            .as_millis()
    }

    fn scale(&mut self, service: u8, workers: u8) -> Check {
        let (name, most) = SERVICES[service as usize % SERVICES.len()];
        let workers = (workers as usize).min(most);
        self.log(format!("  {name} scaled to {workers}"));
        for n in 0..most {
            let Some(i) = self.find(&format!("{name}.{n}")) else {
                continue;
            };
            if n < workers && !self.procs[i].registered {
                self.start(i, false)?;
                self.set_ready(i, true)?;
            } else if n >= workers && self.procs[i].registered {
                self.set_ready(i, false)?;
                self.kill(i, "scaled down")?;
            }
        }
        Ok(())
    }

    fn roll(&mut self, service: u8) -> Check {
        let (name, most) = SERVICES[service as usize % SERVICES.len()];
        self.log(format!("  {name} rolls"));
        for n in 0..most {
            let Some(i) = self.find(&format!("{name}.{n}")) else {
                continue;
            };
            if self.procs[i].registered {
                self.set_ready(i, false)?;
                self.kill(i, "restarted")?;
                self.start(i, false)?;
                self.set_ready(i, true)?;
                self.check()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Check {
        let batch = self.core.flush(SystemTime::UNIX_EPOCH);
        if batch.pending != self.live.len() as u64 {
            return Err(format!(
                "the batch says {} pending, the model {}",
                batch.pending,
                self.live.len()
            ));
        }
        for p in &batch.processes {
            let holding = self.live.values().filter(|w| **w == *p.id).count() as u64;
            if !p.removed && p.pending != holding {
                return Err(format!(
                    "the batch says {} holds {}, not {holding}",
                    p.id, p.pending
                ));
            }
        }
        Ok(())
    }

    // ---- effects ---------------------------------------------------------

    /// Takes in what the core did, in order, checking each delivery.
    fn absorb(&mut self, effects: Vec<Effect>) -> Check {
        for effect in effects {
            match effect {
                Effect::Deliver { to, envelope } => self.delivered(to, envelope)?,
                Effect::Answer { caller, reply } => self.caller_answered(caller, &reply)?,
                Effect::Refused { to, envelope } => self.refused(&to, &envelope)?,
                Effect::Partial { caller, reply } => self.caller_partial(caller, &reply)?,
                Effect::RecycleDue { worker } => self.recycle_due(&worker)?,
            }
        }
        self.sync()
    }

    fn delivered(&mut self, to: ByteString, envelope: Envelope) -> Check {
        let i = self
            .find(&to)
            .filter(|&i| self.procs[i].registered)
            .ok_or_else(|| format!("{envelope:?} delivered to {to}, which is not registered"))?;
        match envelope.kind {
            MessageType::Request => {
                let key = (envelope.source.clone(), envelope.correlation_id);
                if &*key.0 == CALLER
                    && let Some(call) = self.calling.take()
                    && let Some(state) = self.calls.get_mut(&call)
                {
                    state.0 = Some(key.1);
                }
                if envelope.timeout_ms.is_none_or(|ms| ms < 1) {
                    return Err(format!(
                        "{key:?} delivered without its budget: {envelope:?}"
                    ));
                }
                self.pick(&to, &envelope)?;
                if let Some(worker) = self.live.insert(key.clone(), to.clone()) {
                    return Err(format!(
                        "{key:?} delivered to {to} while in flight to {worker}"
                    ));
                }
                if envelope.stream {
                    self.streams.insert(key.clone());
                }
                let p = &mut self.procs[i];
                p.got.insert(key.clone());
                p.served += 1;
                if let Some(&(_, max)) = self.policy.get(&p.service)
                    && max > 0
                    && p.served >= max
                    && !p.recycle_due
                {
                    p.recycle_due = true;
                    self.log(format!("  {to} is due for recycling"));
                    self.owed
                        .insert((to.clone(), (ByteString::from_static("recycle"), 0)));
                }
                if self.procs[i].stdin_full {
                    self.bounces.push((to, envelope));
                } else {
                    self.procs[i].received.push(envelope);
                }
            }
            MessageType::Response if envelope.more => self.partial_delivered(i, &envelope)?,
            MessageType::Response | MessageType::Error => self.replied(i, &envelope)?,
            MessageType::Event if envelope.is_cancel() => self.cancel_delivered(i, &envelope)?,
            MessageType::Event => {
                if self.procs[i].stdin_full {
                    self.bounces.push((to, envelope));
                }
            }
        }
        Ok(())
    }

    /// An envelope for a process whose actor is gone. A request was never
    /// taken (the core removes the process and answers it); a reply still
    /// ended its request.
    fn refused(&mut self, to: &ByteString, envelope: &Envelope) -> Check {
        let i = self
            .find(to)
            .filter(|&i| self.procs[i].gone)
            .ok_or_else(|| format!("{envelope:?} refused by {to}, which is not gone"))?;
        self.log(format!(
            "  {to} is gone: {} {} refused",
            envelope.kind, envelope.correlation_id
        ));
        // The envelope was sent while the process was known: a reply ends
        // one of its requests before the process is forgotten.
        let checked = match envelope.kind {
            MessageType::Response if envelope.more => Ok(()),
            MessageType::Response | MessageType::Error => self.replied(i, envelope),
            MessageType::Event if envelope.is_cancel() => self.cancel_delivered(i, envelope),
            MessageType::Request | MessageType::Event => Ok(()),
        };
        // The core removed it on the spot: what follows in this input
        // comes after.
        if self.procs[i].registered && self.core.table.get(to).is_none() {
            self.orphans_owed(to);
            self.forget(i);
        }
        checked
    }

    /// A partial reply delivered to process `i`: for a live request of its
    /// that asked for a stream, from that request's worker.
    fn partial_delivered(&mut self, i: usize, reply: &Envelope) -> Check {
        let key: Key = (self.procs[i].id.clone(), reply.correlation_id);
        self.partial_ok(&key, reply)
    }

    fn caller_partial(&mut self, call: u64, reply: &Envelope) -> Check {
        if !self.stream_calls.contains(&call) {
            return Err(format!("call #{call} did not ask for a stream: {reply:?}"));
        }
        let key: Key = (CALLER.into(), reply.correlation_id);
        if self.calls.get(&call).and_then(|c| c.0) != Some(reply.correlation_id) {
            return Err(format!("call #{call} got a partial of another: {reply:?}"));
        }
        self.partial_ok(&key, reply)
    }

    fn partial_ok(&self, key: &Key, reply: &Envelope) -> Check {
        match self.live.get(key) {
            None => Err(format!("a partial of {key:?}, not in flight: {reply:?}")),
            Some(worker) if *worker != reply.source => Err(format!(
                "a partial of {key:?} from {}, not its worker {worker}",
                reply.source
            )),
            Some(_) if !self.streams.contains(key) => Err(format!(
                "a partial of {key:?}, which did not ask for a stream"
            )),
            Some(_) => Ok(()),
        }
    }

    /// A `cancel` delivered to worker `i`: for a request it was given and
    /// has not answered, once, and (but at the drain) ended already.
    fn cancel_delivered(&mut self, i: usize, cancel: &Envelope) -> Check {
        let notice = CancelNotice::from_payload(cancel.payload.as_ref())
            .map_err(|e| format!("a cancel without its notice: {e}"))?;
        let key: Key = (notice.source.clone(), cancel.correlation_id);
        let p = &mut self.procs[i];
        if &*cancel.source != "broker" {
            return Err(format!("a cancel to {} from {}", p.id, cancel.source));
        }
        if !p.got.contains(&key) {
            return Err(format!("{} told to cancel {key:?}, never given", p.id));
        }
        if p.answered.contains(&key) {
            return Err(format!(
                "{} told to cancel {key:?}, which it answered",
                p.id
            ));
        }
        if !p.cancelled.insert(key.clone()) {
            return Err(format!("{} told twice to cancel {key:?}", p.id));
        }
        // A Rust caller that stopped listening is never answered: its
        // request ends with the cancel.
        let me = p.id.clone();
        if &*key.0 == CALLER
            && notice.reason == CancelReason::Cancelled
            && let Some(call) = self.calls_by_id(key.1)
            && self.deaf_calls.contains(&call)
            && self.live.get(&key) == Some(&me)
        {
            self.live.remove(&key);
            if let Some(state) = self.calls.get_mut(&call) {
                state.1 = true;
            }
        }
        let draining = notice.reason == CancelReason::ShuttingDown;
        if self.live.contains_key(&key) != draining {
            return Err(format!(
                "{me} told to cancel {key:?} ({}), in flight: {}",
                notice.reason,
                self.live.contains_key(&key)
            ));
        }
        self.log(format!("  {me} told to cancel {key:?} ({})", notice.reason));
        self.owed.remove(&(me, key));
        Ok(())
    }

    fn recycle_due(&mut self, worker: &ByteString) -> Check {
        if !self
            .owed
            .remove(&(worker.clone(), (ByteString::from_static("recycle"), 0)))
        {
            return Err(format!("{worker} reported due for recycling out of turn"));
        }
        Ok(())
    }

    /// A reply delivered to process `i`.
    fn replied(&mut self, i: usize, reply: &Envelope) -> Check {
        let p = &mut self.procs[i];
        if reply.target != p.id {
            return Err(format!("a reply for {} went to {}", reply.target, p.id));
        }
        let id = reply.correlation_id;
        if let Some(duplicate) = &self.duplicate
            && *duplicate == (p.id.clone(), id)
            && reply.kind == MessageType::Error
        {
            self.duplicate = None;
            return Ok(());
        }
        if p.asked.remove(&id).is_none() {
            return Err(format!(
                "{} got a reply to {id}, which it did not ask or had its reply: {reply:?}",
                p.id
            ));
        }
        let key = (p.id.clone(), id);
        self.ended(&key, reply)
    }

    fn caller_answered(&mut self, call: u64, reply: &Envelope) -> Check {
        let Some(state) = self.calls.get_mut(&call) else {
            return Err(format!("an answer to call #{call}, never made"));
        };
        if state.1 {
            return Err(format!("a second answer to call #{call}: {reply:?}"));
        }
        state.1 = true;
        if self.calling == Some(call) {
            self.calling = None;
        }
        if let Some(id) = state.0 {
            if reply.correlation_id != id {
                return Err(format!("call #{call} (id {id}) answered with {reply:?}"));
            }
            return self.ended(&(CALLER.into(), id), reply);
        }
        Ok(())
    }

    /// Request `key` had its final reply.
    fn ended(&mut self, key: &(ByteString, u64), reply: &Envelope) -> Check {
        let worker = self.live.remove(key);
        let from_broker = &*reply.source == "broker";
        let early = matches!(
            reply.error_code(),
            Some(ErrorCode::Timeout | ErrorCode::Cancelled | ErrorCode::Busy)
        );
        if from_broker
            && early
            && self.ending_early
            && let Some(worker) = &worker
            && let Some(w) = self.find(worker)
            && self.procs[w].registered
            && !self.procs[w].cancelled.contains(key)
        {
            self.owed.insert((worker.clone(), key.clone()));
        }
        match worker {
            Some(worker) if !from_broker && reply.source != worker => Err(format!(
                "{key:?} went to {worker}, and {} answered it",
                reply.source
            )),
            None if !from_broker => Err(format!(
                "{key:?} was never delivered, and {} answered it",
                reply.source
            )),
            _ => Ok(()),
        }
    }

    /// A pick of a request to a service: by its key, the least loaded, or
    /// in turn.
    fn pick(&mut self, to: &ByteString, request: &Envelope) -> Check {
        let service = request.target.clone();
        if !SERVICES.iter().any(|(name, _)| *name == &*service) {
            return Ok(());
        }
        if let Some(key) = request.key.as_ref().and_then(|k| k.as_str().ok()) {
            let owner = self
                .keys
                .entry((service.clone(), key.to_owned()))
                .or_insert_with(|| to.clone());
            if owner != to {
                return Err(format!(
                    "key {key:?} of {service} went to {to}, before to {owner}"
                ));
            }
            return Ok(());
        }
        if self.policy.get(&service).is_some_and(|&(least, _)| least) {
            let load = |id: &ByteString| self.live.values().filter(|w| *w == id).count();
            let mine = load(to);
            if let Some(other) = self.procs.iter().find(|p| {
                p.service == service && p.registered && p.ready && !p.gone && load(&p.id) < mine
            }) {
                return Err(format!(
                    "least-pending {service} picked {to} ({mine} in flight) over {} ({})",
                    other.id,
                    load(&other.id)
                ));
            }
            return Ok(());
        }
        // A ready worker at capacity was skipped: not a fair turn.
        let full = self.procs.iter().any(|p| {
            p.service == service
                && p.registered
                && p.ready
                && self.live.values().filter(|w| **w == p.id).count() >= CAPACITY
        });
        let gone = self.procs.iter().any(|p| p.service == service && p.gone);
        if full || gone {
            self.changed(&service);
            return Ok(());
        }
        *self
            .rotation
            .entry(service)
            .or_default()
            .entry(to.clone())
            .or_default() += 1;
        Ok(())
    }

    /// The workers of `service` changed: round-robin starts over.
    fn changed(&mut self, service: &ByteString) {
        self.rotation.remove(service);
        self.keys.retain(|(s, _), _| s != service);
    }

    /// Processes the core removed on its own (a delivery to a gone one
    /// failed) leave the model too.
    fn sync(&mut self) -> Check {
        for i in 0..self.procs.len() {
            let p = &self.procs[i];
            if p.registered && self.core.table.get(&p.id).is_none() {
                if !p.gone {
                    return Err(format!("{} left the core on its own", p.id));
                }
                self.log(format!("  {} found gone and removed", p.id));
                self.forget(i);
            }
        }
        Ok(())
    }

    /// What had to be answered within the step was.
    fn answered_now(&mut self) -> Check {
        for p in &mut self.procs {
            if p.asked.values().any(|&now| now) {
                return Err(format!("{} is still waiting for an immediate reply", p.id));
            }
        }
        if let Some(call) = self.calling.take()
            && self.calls.get(&call).is_some_and(|c| c.0.is_none() && !c.1)
        {
            return Err(format!("call #{call} was neither delivered nor answered"));
        }
        Ok(())
    }

    // ---- invariants ------------------------------------------------------

    fn check(&mut self) -> Check {
        if let Some((worker, key)) = self.owed.iter().next() {
            return Err(format!(
                "{worker} was not told to cancel {key:?} (or of recycling)"
            ));
        }
        let sink = self.core.sink();
        if !sink.unsettled.is_empty() || sink.idle_settles > 0 {
            return Err(format!(
                "ports not settled once: {:?}, {} idle",
                sink.unsettled, sink.idle_settles
            ));
        }
        for p in &self.procs {
            let entry = self.core.table.get(&p.id);
            if entry.is_some() != p.registered {
                return Err(format!(
                    "{}: registered in the core {}",
                    p.id,
                    entry.is_some()
                ));
            }
            let Some(entry) = entry else { continue };
            if entry.ready != p.ready {
                return Err(format!("{}: ready in the core {}", p.id, entry.ready));
            }
            let holding = self.live.values().filter(|w| **w == p.id).count();
            if entry.in_flight != holding {
                return Err(format!(
                    "{} holds {} requests in the core, {holding} in flight",
                    p.id, entry.in_flight
                ));
            }
            if entry.in_flight > CAPACITY && &*p.id != "broker" {
                return Err(format!("{} holds {}", p.id, entry.in_flight));
            }
        }
        if self.core.pending_count() != self.live.len() {
            return Err(format!(
                "{} pending in the core, {} in flight in the model",
                self.core.pending_count(),
                self.live.len()
            ));
        }
        for (key, worker) in self.core.pending.iter() {
            if self.core.table.get(worker).is_none() {
                return Err(format!("{key:?} pending for {worker}, which is gone"));
            }
        }
        for (service, counts) in &self.rotation {
            let turns: Vec<u64> = self
                .procs
                .iter()
                .filter(|p| p.service == *service && p.registered && p.ready)
                .map(|p| counts.get(&p.id).copied().unwrap_or(0))
                .collect();
            if let (Some(most), Some(least)) = (turns.iter().max(), turns.iter().min())
                && most - least > 1
            {
                return Err(format!("round-robin of {service} is uneven: {counts:?}"));
            }
        }
        Ok(())
    }

    /// The end: the bounces arrive, the gone are reported, the clock passes
    /// every deadline; then every request of a live caller has had its one
    /// reply, and nothing is in flight.
    fn finish(&mut self) -> Check {
        self.log("end".into());
        self.feed_bounces()?;
        for i in 0..self.procs.len() {
            if self.procs[i].gone {
                self.kill(i, "gone")?;
            }
        }
        self.check()?;
        self.advance(Duration::from_secs(10))?;
        self.check()?;
        for p in &self.procs {
            if let Some(id) = p.asked.keys().next() {
                return Err(format!("{}'s request {id} never had a reply", p.id));
            }
        }
        if let Some((call, _)) = self.calls.iter().find(|(_, c)| !c.1) {
            return Err(format!("call #{call} never had a reply"));
        }
        if self.core.pending_count() != 0 {
            return Err(format!("{} still pending", self.core.pending_count()));
        }
        Ok(())
    }
}

/// Plays `ops`; the error names the broken invariant, then the steps.
fn play(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut sim = Sim::new();
    let result = ops
        .iter()
        .try_for_each(|op| sim.run(op))
        .and_then(|()| sim.finish());
    result.map_err(|broken| {
        TestCaseError::fail(format!(
            "{broken}\n  steps:\n    {}",
            sim.trace.join("\n    ")
        ))
    })
}

/// The seed: `ROUTER_SIM_SEED` if set, else a new one.
fn seed() -> u64 {
    std::env::var("ROUTER_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ u64::from(std::process::id()).rotate_left(32)
        })
}

/// Runs `cases` sequences of up to `steps` operations from `seed`; each
/// test has its own `salt`, so one seed gives each its own sequences, and
/// the seed a failure names replays it.
fn simulate(seed: u64, salt: u64, cases: u32, steps: usize) {
    let mixed = seed.wrapping_add(salt);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&mixed.to_le_bytes());
    bytes[8..].copy_from_slice(&(!mixed).to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        // Shrinking a long sequence takes many steps.
        max_shrink_iters: 20_000,
        ..Config::default()
    };
    // XorShift: ChaCha took half the run time of a debug build.
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::XorShift, &bytes));
    let strategy = prop::collection::vec(op(), 1..=steps);
    match runner.run(&strategy, |ops| play(&ops)) {
        Ok(()) => {}
        Err(TestError::Fail(reason, ops)) => {
            let ops = without_needless_steps(ops);
            // Played once more, so that the steps shown are this sequence's
            // (proptest keeps the reason of the last failure it saw).
            let reason = match play(&ops) {
                Err(replayed) => replayed.to_string(),
                Ok(()) => reason.to_string(),
            };
            panic!(
                "router simulation failed (seed {seed}; rerun with ROUTER_SIM_SEED={seed}).\n\
                 Minimal failing sequence, {} operations:\n{}\n{reason}",
                ops.len(),
                ops.iter()
                    .map(|op| format!("  {op:?}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        }
        Err(TestError::Abort(reason)) => {
            panic!("router simulation aborted (seed {seed}): {reason}")
        }
    }
}

/// `ops` (failing) without every step it still fails without: proptest's
/// shrinking can stop at a sequence from which single steps still go.
fn without_needless_steps(mut ops: Vec<Op>) -> Vec<Op> {
    let mut i = 0;
    while i < ops.len() && ops.len() > 1 {
        let mut fewer = ops.clone();
        fewer.remove(i);
        if play(&fewer).is_err() {
            ops = fewer;
            i = 0;
        } else {
            i += 1;
        }
    }
    ops
}

/// Cases to run: `ROUTER_SIM_CASES`, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("ROUTER_SIM_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn ten_thousand_random_sequences_keep_every_invariant() {
    simulate(seed(), 0, cases(10_000), 60);
}

#[test]
fn long_runs_keep_every_invariant() {
    simulate(seed(), 1, cases(10_000) / 500, 3_000);
}

/// A caller that is itself gone when the worker holding its request is
/// found gone: the error the core then sends it is refused too, and the
/// core forgets the caller on the spot. The model checks that reply
/// against the caller's requests before it forgets them.
#[test]
fn a_gone_callers_reply_from_a_gone_worker_is_checked_before_the_caller_is_forgotten() {
    let ops = [
        Op::Scale {
            service: 0,
            workers: 4,
        },
        Op::Request {
            from: 4,
            batch: vec![(0, 0, 0)],
        },
        Op::Request {
            from: 0,
            batch: vec![(0, 0, 0), (0, 0, 0)],
        },
        Op::Vanish { who: 1 },
        Op::Vanish { who: 4 },
        Op::Kill { who: 2 },
        Op::Request {
            from: 0,
            batch: vec![(0, 0, 0), (0, 0, 0)],
        },
    ];
    if let Err(broken) = play(&ops) {
        panic!("{broken}");
    }
}
