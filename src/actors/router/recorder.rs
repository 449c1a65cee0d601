//! A sink that records the core's effects, for its tests and the
//! simulation: each process's port is its id, each Rust caller a number.

use bytestring::ByteString;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use super::core::Core;
use super::sink::{Partial, Sink};
use crate::actors::nodes::Nodes;
use crate::config::BrokerConfig;
use crate::protocol::Envelope;

/// One effect, in the order the core caused it.
#[derive(Debug, Clone)]
pub(super) enum Effect {
    /// An envelope for process `to`.
    Deliver { to: ByteString, envelope: Envelope },
    /// The reply to Rust caller `caller`.
    Answer { caller: u64, reply: Envelope },
    /// An envelope for process `to`, whose actor was gone.
    Refused { to: ByteString, envelope: Envelope },
    /// A partial reply taken by Rust caller `caller`.
    Partial { caller: u64, reply: Envelope },
    /// Worker `worker` is due for recycling.
    RecycleDue { worker: ByteString },
}

/// Records what the core does.
#[derive(Debug, Default)]
pub(super) struct Recorder {
    /// Effects not yet taken by the test.
    pub(super) effects: Vec<Effect>,
    /// The earliest deadline asked for and not yet fired (as the Router's
    /// timer task keeps it: a later one never replaces an earlier one).
    pub(super) armed: Option<Instant>,
    /// Processes whose actor is gone: delivering to them fails.
    pub(super) gone: HashSet<ByteString>,
    /// Processes delivered to and not yet settled; empty after every input.
    pub(super) unsettled: BTreeSet<ByteString>,
    /// Settles of a process that had nothing delivered in the input.
    pub(super) idle_settles: u64,
    /// Stdin backlogs the test set (a process that does not read); 0 for
    /// the others.
    pub(super) backlog: HashMap<ByteString, usize>,
    /// Rust callers whose stream buffer is full.
    pub(super) full: HashSet<u64>,
    /// Rust callers that stopped listening.
    pub(super) deaf: HashSet<u64>,
}

impl Recorder {
    /// Takes the effects recorded so far.
    pub(super) fn take(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }
}

impl Sink for Recorder {
    type Port = ByteString;
    type Caller = u64;

    fn deliver(&mut self, port: &mut ByteString, envelope: Box<Envelope>) -> bool {
        let envelope = *envelope;
        if self.gone.contains(port) {
            self.effects.push(Effect::Refused {
                to: port.clone(),
                envelope,
            });
            return false;
        }
        self.unsettled.insert(port.clone());
        self.effects.push(Effect::Deliver {
            to: port.clone(),
            envelope,
        });
        true
    }

    fn settle(&mut self, port: &mut ByteString) {
        if !self.unsettled.remove(port) {
            self.idle_settles += 1;
        }
    }

    fn answer(&mut self, caller: u64, reply: Box<Envelope>) {
        let reply = *reply;
        self.effects.push(Effect::Answer { caller, reply });
    }

    fn partial(&mut self, caller: &mut u64, reply: Box<Envelope>) -> Partial {
        let reply = *reply;
        if self.deaf.contains(caller) {
            return Partial::Gone;
        }
        if self.full.contains(caller) {
            return Partial::Full;
        }
        self.effects.push(Effect::Partial {
            caller: *caller,
            reply,
        });
        Partial::Taken
    }

    fn recycle_due(&mut self, worker: &ByteString) {
        self.effects.push(Effect::RecycleDue {
            worker: worker.clone(),
        });
    }

    fn arm(&mut self, deadline: Instant) {
        if self.armed.is_none_or(|armed| deadline < armed) {
            self.armed = Some(deadline);
        }
    }

    fn queue_depth(&self, port: &ByteString) -> usize {
        self.backlog.get(port).copied().unwrap_or(0)
    }
}

/// A core recording its effects, at time `t0`, with `queue_capacity` 2 and
/// `request_timeout` 100 ms unless `config` says otherwise.
pub(super) fn core(config: Option<BrokerConfig>, nodes: Nodes, t0: Instant) -> Core<Recorder> {
    let config = config.unwrap_or_else(|| BrokerConfig {
        queue_capacity: 2,
        request_timeout: Duration::from_millis(100),
        ..BrokerConfig::default()
    });
    Core::new(
        config,
        nodes,
        Recorder::default(),
        t0,
        SystemTime::UNIX_EPOCH,
    )
}
