//! Who is in the cluster, as this broker sees it: the rules alone, with no
//! I/O and no clock of their own (every input comes with its `now`).
//!
//! The Cluster actor feeds the table what it hears (heartbeats, requests and
//! replies from other nodes, its own connection coming and going) and acts
//! on the [`Change`]s it gets back: NATS and the Router stay outside, so
//! each rule below is a unit test.
//!
//! - **Identity.** A node name is held by one broker instance at a time. A
//!   heartbeat carries its instance's *claim*: when it began to hold the
//!   name (`since_ms`, wall clock) and its random id. Of two live
//!   instances with one name, the earlier claim keeps it; equal claims
//!   (two brokers started in the same millisecond) go to the smaller id.
//!   Both sides compare the same two numbers, so exactly one of them stays
//!   in, however they started. The other *stands aside*: it routes nothing
//!   to or from the cluster and does not advertise, serves its own
//!   services, and watches the holder; when the holder says goodbye or is
//!   unheard for 3 of its intervals, it claims the name anew and rejoins.
//!   Other nodes follow the same rule: an instance with a later claim does
//!   not displace a live holder; a holder that missed 2 heartbeats (it
//!   probably restarted) or is gone is replaced at once.
//! - **Liveness.** A node unheard for 3 of its heartbeat intervals is down;
//!   an interval counts as at most [`MAX_HEARTBEAT`]. A stall of this
//!   broker's own thread restarts the count (see [`Liveness`]).
//! - **Forgetting.** A node that says goodbye is dropped at once; one
//!   unheard for `forget_after` is forgotten (taken down first if need
//!   be). Either way nothing of it is kept.
//! - **Bounds.** At most `max_nodes` other nodes: a new one finds room by
//!   evicting the node down the longest, else it is ignored and counted.
//!   At most [`MAX_SERVICES`] services per node (the rest ignored and
//!   counted). Heartbeats that cannot be read are counted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::config::cluster::is_token;
use crate::protocol::federation::Heartbeat;

/// Most advertised services kept per node.
pub(crate) const MAX_SERVICES: usize = 1000;
/// The longest heartbeat interval a peer is taken at: a peer advertising
/// more (up to `u64::MAX` ms) is still found gone within 3 minutes.
pub(crate) const MAX_HEARTBEAT: Duration = Duration::from_secs(60);
/// Intervals a node may stay unheard before it is gone.
const MISSED_GONE: u32 = 3;
/// Intervals a holder may stay unheard before another instance takes its
/// name without an earlier claim (it has most likely restarted).
const MISSED_REPLACED: u32 = 2;
/// The claim of a node known only from its requests: any real claim is
/// earlier.
const NO_CLAIM: u64 = u64::MAX;

/// A peer's advertised interval, as counted here.
fn interval(heartbeat_ms: u64) -> Duration {
    Duration::from_millis(heartbeat_ms.max(1)).min(MAX_HEARTBEAT)
}

/// A claim on a node name. Ordered: the smaller keeps the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Claim {
    /// When the instance began to hold the name (ms since the Unix epoch).
    pub(crate) since_ms: u64,
    /// The instance's id.
    pub(crate) instance: u64,
}

/// The table's bounds and clocks, from `[cluster]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// A node unheard this long is forgotten.
    pub(crate) forget_after: Duration,
    /// Most other nodes kept.
    pub(crate) max_nodes: usize,
    /// This broker's own interval: for nodes known only from a request,
    /// and the stall threshold of [`Liveness`].
    pub(crate) heartbeat: Duration,
}

/// Another node, as heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    /// The instance holding the name, and its claim.
    pub(crate) claim: Claim,
    /// Heard within 3 of its intervals.
    pub(crate) up: bool,
    pub(crate) last_seen: Instant,
    /// Its interval, at most [`MAX_HEARTBEAT`].
    pub(crate) heartbeat: Duration,
    /// Its exported services and ready workers (at most [`MAX_SERVICES`]).
    pub(crate) services: BTreeMap<String, u32>,
}

/// The instance holding this broker's own name while it stands aside.
#[derive(Debug, Clone, Copy)]
struct Holder {
    claim: Claim,
    last_seen: Instant,
    heartbeat: Duration,
}

/// What the table counted (all since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Heartbeats that could not be read.
    pub(crate) malformed_heartbeats: u64,
    /// Heartbeats (and requests) from new nodes ignored: the table was full.
    pub(crate) nodes_ignored: u64,
    /// Advertised services past [`MAX_SERVICES`], summed over heartbeats.
    pub(crate) services_ignored: u64,
    /// Nodes forgotten unheard, or evicted to make room.
    pub(crate) nodes_forgotten: u64,
}

/// What the Cluster actor must do after an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// Route to this node: it joined, came back, advertises other
    /// services, or another instance now holds its name (its [`Member`]
    /// says which).
    Up(String),
    /// Stop routing to this node; its requests in flight fail now.
    /// `forget`: it left or is forgotten: nothing of it is kept.
    Down {
        node: String,
        reason: &'static str,
        forget: bool,
    },
    /// This broker's node name is held by `holder` (an earlier claim):
    /// it stands aside.
    StandAside { holder: u64 },
    /// The holder is gone: this broker claimed the name and is back in.
    Rejoin,
    /// `instance` claims this broker's name too, later: it will stand
    /// aside. Reported once per instance.
    Rival { instance: u64 },
}

/// Why a request from another node is not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// This broker stands aside: it serves nothing from the cluster.
    #[error("this broker stays out of the cluster: another broker instance holds its node name")]
    StandingAside,
    /// The sender claims this broker's own node name.
    #[error("the request claims to come from this broker's own node name")]
    OwnName,
    /// The table is full and nothing could be evicted.
    #[error("this broker's node table is full (cluster.max_nodes)")]
    TableFull,
    /// Another live instance holds the sender's node name here.
    #[error("another instance of that node name is the one routed to here")]
    NotHolder,
}

/// Why a heartbeat was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Malformed {
    /// Not the heartbeat's JSON.
    #[error("not a heartbeat: {0}")]
    Json(String),
    /// A node name unfit for subjects and `service@node`.
    #[error("node name {0:?} is not [A-Za-z0-9_-]+")]
    Node(String),
    /// Instance 0, which no broker uses.
    #[error("instance 0")]
    Instance,
}

/// The liveness checks' own clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Liveness {
    /// The last check.
    last_tick: Instant,
    /// The end of this thread's last stall: silence is counted from here
    /// at the earliest.
    resumed: Instant,
}

impl Liveness {
    fn new(now: Instant) -> Self {
        Self {
            last_tick: now,
            resumed: now,
        }
    }

    /// Checks at `now`. If the last check is more than `stall` ago, this
    /// thread was stalled (a long handler, a paused process, an overloaded
    /// host): heartbeats may sit unread in the socket, so silence proves
    /// nothing, and is counted from `now` instead.
    fn check(&mut self, now: Instant, stall: Duration) {
        if now.saturating_duration_since(self.last_tick) > stall {
            self.resumed = now;
        }
        self.last_tick = now;
    }

    /// How long a node last heard at `last_seen` has been silent.
    fn silent(&self, last_seen: Instant, now: Instant) -> Duration {
        now.saturating_duration_since(last_seen.max(self.resumed))
    }
}

/// This broker's view of the cluster.
#[derive(Debug)]
pub(crate) struct Membership {
    this: String,
    instance: u64,
    limits: Limits,
    /// This instance's claim on its name (`since_ms`): `None` before it
    /// first connects, and while it stands aside.
    claim: Option<u64>,
    /// `Some` while this broker stands aside: who holds its name.
    holder: Option<Holder>,
    connected: bool,
    nodes: BTreeMap<String, Member>,
    counts: Counts,
    liveness: Liveness,
    /// The last rival reported (each once).
    rival: Option<u64>,
}

impl Membership {
    /// Node `this`, instance `instance`, not connected yet.
    pub(crate) fn new(this: &str, instance: u64, limits: Limits, now: Instant) -> Self {
        Self {
            this: this.to_owned(),
            instance,
            limits,
            claim: None,
            holder: None,
            connected: false,
            nodes: BTreeMap::new(),
            counts: Counts::default(),
            liveness: Liveness::new(now),
            rival: None,
        }
    }

    /// This instance's claim (`since_ms`), if it holds its name.
    pub(crate) fn claim(&self) -> Option<u64> {
        self.claim
    }

    /// The instance holding this broker's name while it stands aside.
    pub(crate) fn holder(&self) -> Option<u64> {
        self.holder.map(|h| h.claim.instance)
    }

    /// What was counted.
    pub(crate) fn counts(&self) -> Counts {
        self.counts
    }

    /// Every other node kept, by name.
    pub(crate) fn nodes(&self) -> &BTreeMap<String, Member> {
        &self.nodes
    }

    /// Node `node`, if kept.
    pub(crate) fn member(&self, node: &str) -> Option<&Member> {
        self.nodes.get(node)
    }

    /// Whether requests may go to `node` now.
    pub(crate) fn routable(&self, node: &str) -> bool {
        self.holder.is_none() && self.nodes.get(node).is_some_and(|m| m.up)
    }

    /// The NATS connection is up (again) at `now` (`now_ms` on the wall
    /// clock). The first time, this instance claims its name. While it
    /// stands aside, the holder gets 3 intervals from now to be heard
    /// again: what it said meanwhile was lost with the connection.
    pub(crate) fn connected(&mut self, now: Instant, now_ms: u64) {
        self.connected = true;
        match &mut self.holder {
            Some(holder) => holder.last_seen = holder.last_seen.max(now),
            None if self.claim.is_none() => self.claim = Some(now_ms),
            None => {}
        }
    }

    /// The NATS connection is lost: every node is down (nothing can reach
    /// them). The claim is kept: it is still this instance's.
    pub(crate) fn disconnected(&mut self, out: &mut Vec<Change>) {
        self.connected = false;
        let routed = self.holder.is_none();
        for (name, member) in &mut self.nodes {
            if std::mem::take(&mut member.up) && routed {
                out.push(Change::Down {
                    node: name.clone(),
                    reason: "this broker lost its NATS connection",
                    forget: false,
                });
            }
        }
    }

    /// A heartbeat (its raw payload) arrived at `now` (`now_ms` on the
    /// wall clock).
    pub(crate) fn heartbeat(
        &mut self,
        payload: &[u8],
        now: Instant,
        now_ms: u64,
        out: &mut Vec<Change>,
    ) -> Result<(), Malformed> {
        let hb = match read_heartbeat(payload) {
            Ok(hb) => hb,
            Err(e) => {
                self.counts.malformed_heartbeats += 1;
                return Err(e);
            }
        };
        if hb.node == self.this {
            self.own_name(&hb, now, now_ms, out);
        } else {
            self.peer(hb, now, out);
        }
        Ok(())
    }

    /// A heartbeat naming this broker's own node.
    fn own_name(&mut self, hb: &Heartbeat, now: Instant, now_ms: u64, out: &mut Vec<Change>) {
        if hb.instance == self.instance {
            return; // its own, back from the server
        }
        let theirs = Claim {
            since_ms: hb.since_ms,
            instance: hb.instance,
        };
        let heard = Holder {
            claim: theirs,
            last_seen: now,
            heartbeat: interval(hb.heartbeat_ms),
        };
        if let Some(holder) = &mut self.holder {
            if holder.claim.instance == hb.instance {
                if hb.leaving {
                    self.rejoin(now_ms, out);
                } else {
                    *holder = heard;
                }
            } else if !hb.leaving && theirs < holder.claim {
                *holder = heard;
            }
            return;
        }
        if hb.leaving {
            return;
        }
        let ours = self.claim.map(|since_ms| Claim {
            since_ms,
            instance: self.instance,
        });
        if ours.is_none_or(|ours| theirs < ours) {
            self.stand_aside(heard, out);
        } else if self.rival != Some(hb.instance) {
            self.rival = Some(hb.instance);
            out.push(Change::Rival {
                instance: hb.instance,
            });
        }
    }

    fn stand_aside(&mut self, holder: Holder, out: &mut Vec<Change>) {
        self.claim = None;
        self.holder = Some(holder);
        out.push(Change::StandAside {
            holder: holder.claim.instance,
        });
        for (name, member) in &self.nodes {
            if member.up {
                out.push(Change::Down {
                    node: name.clone(),
                    reason: "this broker stands aside: another broker instance holds its node name",
                    forget: false,
                });
            }
        }
    }

    fn rejoin(&mut self, now_ms: u64, out: &mut Vec<Change>) {
        self.holder = None;
        self.claim = Some(now_ms);
        out.push(Change::Rejoin);
        for (name, member) in &self.nodes {
            if member.up {
                out.push(Change::Up(name.clone()));
            }
        }
    }

    /// A heartbeat of another node.
    fn peer(&mut self, hb: Heartbeat, now: Instant, out: &mut Vec<Change>) {
        let routed = self.holder.is_none();
        if hb.leaving {
            // Only from the instance that holds the name: a late goodbye
            // of a predecessor says nothing about its successor.
            if self
                .nodes
                .get(&hb.node)
                .is_some_and(|m| m.claim.instance == hb.instance)
            {
                self.nodes.remove(&hb.node);
                out.push(Change::Down {
                    node: hb.node,
                    reason: "it left the cluster",
                    forget: true,
                });
            }
            return;
        }
        let claim = Claim {
            since_ms: hb.since_ms,
            instance: hb.instance,
        };
        let mut services = hb.services;
        if services.len() > MAX_SERVICES {
            let excess = services.len() - MAX_SERVICES;
            self.counts.services_ignored += excess as u64;
            // Kept: the first MAX_SERVICES by name, the same every time.
            while services.len() > MAX_SERVICES {
                services.pop_last();
            }
        }
        let fresh = Member {
            claim,
            up: true,
            last_seen: now,
            heartbeat: interval(hb.heartbeat_ms),
            services,
        };
        let Some(member) = self.nodes.get_mut(&hb.node) else {
            if self.make_room(out) {
                self.nodes.insert(hb.node.clone(), fresh);
                if routed {
                    out.push(Change::Up(hb.node));
                }
            }
            return;
        };
        if member.claim.instance == hb.instance {
            let changed = !member.up || member.services != fresh.services;
            *member = fresh;
            if changed && routed {
                out.push(Change::Up(hb.node));
            }
            return;
        }
        let silent = self.liveness.silent(member.last_seen, now);
        let replaced =
            !member.up || silent > member.heartbeat * MISSED_REPLACED || claim < member.claim;
        if !replaced {
            return; // a later claim on a live holder's name: it stands aside
        }
        let was_up = member.up;
        *member = fresh;
        if routed {
            if was_up {
                out.push(Change::Down {
                    node: hb.node.clone(),
                    reason: "another instance took its name (it restarted)",
                    forget: false,
                });
            }
            out.push(Change::Up(hb.node));
        }
    }

    /// Whether a new node fits: evicts the node down the longest if the
    /// table is full (counted as forgotten); else counts it ignored.
    fn make_room(&mut self, out: &mut Vec<Change>) -> bool {
        if self.nodes.len() < self.limits.max_nodes {
            return true;
        }
        let oldest = self
            .nodes
            .iter()
            .filter(|(_, m)| !m.up)
            .min_by_key(|(_, m)| m.last_seen)
            .map(|(name, _)| name.clone());
        match oldest {
            Some(name) => {
                self.nodes.remove(&name);
                self.counts.nodes_forgotten += 1;
                out.push(Change::Down {
                    node: name,
                    reason: "forgotten to make room (cluster.max_nodes)",
                    forget: true,
                });
                true
            }
            None => {
                self.counts.nodes_ignored += 1;
                false
            }
        }
    }

    /// A request came from instance `instance` of `node`: whether it may
    /// be served. A node heard from before its first heartbeat is admitted
    /// (it is alive, and its reply must find a way back).
    pub(crate) fn request_from(
        &mut self,
        node: &str,
        instance: u64,
        now: Instant,
        out: &mut Vec<Change>,
    ) -> Result<(), Refusal> {
        if self.holder.is_some() {
            return Err(Refusal::StandingAside);
        }
        if node == self.this {
            return Err(Refusal::OwnName);
        }
        let fresh = Member {
            claim: Claim {
                since_ms: NO_CLAIM,
                instance,
            },
            up: true,
            last_seen: now,
            heartbeat: self.limits.heartbeat,
            services: BTreeMap::new(),
        };
        let Some(member) = self.nodes.get_mut(node) else {
            if !self.make_room(out) {
                return Err(Refusal::TableFull);
            }
            self.nodes.insert(node.to_owned(), fresh);
            out.push(Change::Up(node.to_owned()));
            return Ok(());
        };
        if member.claim.instance == instance {
            member.last_seen = now;
            if !member.up {
                member.up = true;
                out.push(Change::Up(node.to_owned()));
            }
            return Ok(());
        }
        // A request carries no claim: it displaces only a holder that is
        // gone or silent.
        let silent = self.liveness.silent(member.last_seen, now);
        if member.up && silent <= member.heartbeat * MISSED_REPLACED {
            return Err(Refusal::NotHolder);
        }
        let was_up = member.up;
        *member = fresh;
        if was_up {
            out.push(Change::Down {
                node: node.to_owned(),
                reason: "another instance took its name (it restarted)",
                forget: false,
            });
        }
        out.push(Change::Up(node.to_owned()));
        Ok(())
    }

    /// A reply came from instance `instance` of `node`: it is alive.
    pub(crate) fn reply_from(&mut self, node: &str, instance: u64, now: Instant) {
        if let Some(member) = self.nodes.get_mut(node)
            && member.claim.instance == instance
        {
            member.last_seen = now;
        }
    }

    /// The periodic check at `now` (`now_ms` on the wall clock): nodes
    /// unheard for 3 intervals go down, those unheard for `forget_after`
    /// are forgotten, and a holder of this broker's name that is gone
    /// gives it back.
    pub(crate) fn tick(&mut self, now: Instant, now_ms: u64, out: &mut Vec<Change>) {
        self.liveness.check(now, self.limits.heartbeat);
        let routed = self.holder.is_none();
        let liveness = self.liveness;
        let forget_after = self.limits.forget_after;
        let mut forgotten = Vec::new();
        for (name, member) in &mut self.nodes {
            let silent = liveness.silent(member.last_seen, now);
            if silent >= forget_after {
                forgotten.push(name.clone());
            } else if member.up && silent > member.heartbeat * MISSED_GONE {
                member.up = false;
                if routed {
                    out.push(Change::Down {
                        node: name.clone(),
                        reason: "missed 3 heartbeats",
                        forget: false,
                    });
                }
            }
        }
        for name in forgotten {
            self.nodes.remove(&name);
            self.counts.nodes_forgotten += 1;
            out.push(Change::Down {
                node: name,
                reason: "unheard for cluster.forget_after_ms",
                forget: true,
            });
        }
        // Only a connected broker can tell that the holder went quiet.
        if let Some(holder) = self.holder
            && self.connected
            && liveness.silent(holder.last_seen, now) > holder.heartbeat * MISSED_GONE
        {
            self.rejoin(now_ms, out);
        }
    }
}

/// A heartbeat, checked: readable JSON, a node name fit for subjects, an
/// instance.
fn read_heartbeat(payload: &[u8]) -> Result<Heartbeat, Malformed> {
    let hb: Heartbeat =
        serde_json::from_slice(payload).map_err(|e| Malformed::Json(e.to_string()))?;
    if !is_token(&hb.node) {
        return Err(Malformed::Node(hb.node));
    }
    if hb.instance == 0 {
        return Err(Malformed::Instance);
    }
    Ok(hb)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    /// This broker: node `a`, instance 100, claim at wall-clock 1 000.
    const THIS: u64 = 100;

    fn limits() -> Limits {
        Limits {
            forget_after: 60_000 * MS,
            max_nodes: 3,
            heartbeat: 200 * MS,
        }
    }

    fn table(t0: Instant) -> Membership {
        table_with(t0, limits())
    }

    fn table_with(t0: Instant, limits: Limits) -> Membership {
        let mut m = Membership::new("a", THIS, limits, t0);
        m.connected(t0, 1_000);
        m
    }

    fn hb(node: &str, instance: u64, since_ms: u64, heartbeat_ms: u64, leaving: bool) -> Vec<u8> {
        serde_json::to_vec(&Heartbeat {
            node: node.into(),
            instance,
            since_ms,
            heartbeat_ms,
            services: [("echo".to_owned(), 1)].into(),
            leaving,
        })
        .expect("json")
    }

    /// Feeds one heartbeat; the changes it caused.
    fn feed(m: &mut Membership, payload: &[u8], now: Instant) -> Vec<Change> {
        let mut out = Vec::new();
        m.heartbeat(payload, now, 5_000, &mut out)
            .expect("readable");
        out
    }

    fn tick(m: &mut Membership, now: Instant) -> Vec<Change> {
        let mut out = Vec::new();
        m.tick(now, 5_000, &mut out);
        out
    }

    /// Ticks every 50 ms from `from` to `to` (inclusive); every change.
    fn ticks(m: &mut Membership, from: Instant, to: Instant) -> Vec<(u128, Change)> {
        let mut all = Vec::new();
        let mut now = from;
        while now <= to {
            for c in tick(m, now) {
                all.push(((now - from).as_millis(), c));
            }
            now += 50 * MS;
        }
        all
    }

    fn up(node: &str) -> Change {
        Change::Up(node.into())
    }

    fn down(node: &str, reason: &'static str, forget: bool) -> Change {
        Change::Down {
            node: node.into(),
            reason,
            forget,
        }
    }

    #[test]
    fn a_heartbeat_joins_and_only_a_change_is_news() {
        let t0 = Instant::now();
        let mut m = table(t0);
        assert_eq!(feed(&mut m, &hb("b", 1, 10, 200, false), t0), [up("b")]);
        assert!(m.routable("b"));
        // The same again: nothing to do.
        assert_eq!(feed(&mut m, &hb("b", 1, 10, 200, false), t0 + 200 * MS), []);
        // Other services: routed anew.
        let mut other =
            serde_json::from_slice::<Heartbeat>(&hb("b", 1, 10, 200, false)).expect("json");
        other.services.insert("more".into(), 2);
        let other = serde_json::to_vec(&other).expect("json");
        assert_eq!(feed(&mut m, &other, t0 + 400 * MS), [up("b")]);
        assert_eq!(m.member("b").map(|b| b.services.len()), Some(2));
        // Its own heartbeat, back from the server: nothing.
        assert_eq!(feed(&mut m, &hb("a", THIS, 1_000, 200, false), t0), []);
    }

    #[test]
    fn silence_takes_a_node_down_after_three_intervals_and_a_heartbeat_brings_it_back() {
        let t0 = Instant::now();
        let mut m = table(t0);
        feed(&mut m, &hb("b", 1, 10, 200, false), t0);
        // Checks every 50 ms: nothing up to 600 ms, down at 650 ms.
        let changes = ticks(&mut m, t0 + 50 * MS, t0 + 700 * MS);
        assert_eq!(changes, [(600, down("b", "missed 3 heartbeats", false))]);
        assert!(!m.routable("b"));
        assert!(m.member("b").is_some(), "down, still known");
        let back = t0 + Duration::from_secs(1);
        assert_eq!(feed(&mut m, &hb("b", 1, 10, 200, false), back), [up("b")]);
    }

    #[test]
    fn a_stall_of_this_thread_restarts_the_count() {
        let t0 = Instant::now();
        let mut m = table(t0);
        feed(&mut m, &hb("b", 1, 10, 200, false), t0);
        // This thread was away for 1 s: b's heartbeats may be unread.
        let back = t0 + Duration::from_secs(1);
        assert_eq!(tick(&mut m, back), []);
        // b still silent 3 intervals after the stall: now it is gone, and
        // its last_seen was left as it was.
        let changes = ticks(&mut m, back + 50 * MS, back + 700 * MS);
        assert_eq!(changes, [(600, down("b", "missed 3 heartbeats", false))]);
        assert_eq!(m.member("b").map(|b| b.last_seen), Some(t0));
    }

    #[test]
    fn a_goodbye_drops_the_node_and_only_its_holder_can_say_it() {
        let t0 = Instant::now();
        let mut m = table(t0);
        feed(&mut m, &hb("b", 1, 10, 200, false), t0);
        // A goodbye from another instance (a predecessor, late): ignored.
        assert_eq!(feed(&mut m, &hb("b", 9, 5, 200, true), t0), []);
        assert!(m.routable("b"));
        assert_eq!(
            feed(&mut m, &hb("b", 1, 10, 200, true), t0),
            [down("b", "it left the cluster", true)]
        );
        assert!(m.member("b").is_none(), "dropped, not kept as down");
        // Goodbyes of nodes never heard of leave nothing behind.
        for i in 0..10_000 {
            assert_eq!(
                feed(&mut m, &hb(&format!("n{i}"), i + 1, 0, 200, true), t0),
                []
            );
        }
        assert!(m.nodes().is_empty());
    }

    #[test]
    fn a_node_unheard_for_forget_after_is_forgotten() {
        let t0 = Instant::now();
        let mut m = table_with(
            t0,
            Limits {
                forget_after: 1_000 * MS,
                ..limits()
            },
        );
        feed(&mut m, &hb("b", 1, 10, 200, false), t0);
        feed(&mut m, &hb("c", 2, 10, 200, false), t0 + 500 * MS);
        let changes = ticks(&mut m, t0 + 50 * MS, t0 + 1_600 * MS);
        assert_eq!(
            changes,
            [
                (600, down("b", "missed 3 heartbeats", false)),
                (950, down("b", "unheard for cluster.forget_after_ms", true)),
                (1100, down("c", "missed 3 heartbeats", false)),
                (1450, down("c", "unheard for cluster.forget_after_ms", true)),
            ]
        );
        assert!(m.nodes().is_empty());
        assert_eq!(m.counts().nodes_forgotten, 2);
    }

    #[test]
    fn an_endless_interval_counts_as_sixty_seconds() {
        let t0 = Instant::now();
        let mut m = table_with(
            t0,
            Limits {
                forget_after: Duration::from_secs(600),
                // Ticks a minute apart are not a stall here.
                heartbeat: Duration::from_secs(120),
                ..limits()
            },
        );
        feed(&mut m, &hb("b", 1, 10, u64::MAX, false), t0);
        assert_eq!(m.member("b").map(|b| b.heartbeat), Some(MAX_HEARTBEAT));
        let s = Duration::from_secs;
        assert_eq!(tick(&mut m, t0 + s(60)), []);
        assert_eq!(tick(&mut m, t0 + s(120)), []);
        assert_eq!(tick(&mut m, t0 + s(180)), []);
        assert_eq!(
            tick(&mut m, t0 + s(181)),
            [down("b", "missed 3 heartbeats", false)]
        );
        // A zero interval counts as 1 ms, not as "never heard".
        feed(&mut m, &hb("c", 2, 10, 0, false), t0 + s(181));
        assert_eq!(m.member("c").map(|c| c.heartbeat), Some(MS));
    }

    #[test]
    fn the_table_and_each_nodes_services_are_bounded() {
        let t0 = Instant::now();
        let mut m = table(t0);
        let mut wide =
            serde_json::from_slice::<Heartbeat>(&hb("w", 1, 10, 200, false)).expect("json");
        wide.services = (0..1_500).map(|i| (format!("s{i:04}"), 1)).collect();
        let wide = serde_json::to_vec(&wide).expect("json");
        feed(&mut m, &wide, t0);
        let kept = &m.member("w").expect("w").services;
        assert_eq!(kept.len(), MAX_SERVICES);
        assert!(kept.contains_key("s0999") && !kept.contains_key("s1000"));
        assert_eq!(m.counts().services_ignored, 500);
        feed(&mut m, &hb("b", 2, 10, 200, false), t0);
        feed(&mut m, &hb("c", 3, 10, 200, false), t0);
        // Full (3) and every node up: a fourth is ignored and counted.
        assert_eq!(feed(&mut m, &hb("d", 4, 10, 200, false), t0), []);
        assert!(m.member("d").is_none());
        assert_eq!(m.counts().nodes_ignored, 1);
        let mut out = Vec::new();
        assert_eq!(
            m.request_from("d", 4, t0, &mut out),
            Err(Refusal::TableFull)
        );
        assert_eq!(m.counts().nodes_ignored, 2);
        // c goes quiet (b and w keep talking): the next newcomer takes the
        // room of the node down the longest.
        let later = t0 + 700 * MS;
        feed(&mut m, &hb("b", 2, 10, 200, false), t0 + 400 * MS);
        feed(&mut m, &wide, t0 + 400 * MS);
        ticks(&mut m, t0 + 50 * MS, later);
        assert!(!m.routable("c") && m.routable("b"));
        assert_eq!(
            feed(&mut m, &hb("d", 4, 10, 200, false), later),
            [
                down("c", "forgotten to make room (cluster.max_nodes)", true),
                up("d")
            ]
        );
        assert_eq!(m.counts().nodes_forgotten, 1);
    }

    #[test]
    fn unreadable_heartbeats_are_counted_and_change_nothing() {
        let t0 = Instant::now();
        let mut m = table(t0);
        let mut out = Vec::new();
        for bad in [
            b"not json".to_vec(),
            hb("bad.name", 1, 0, 200, false),
            hb("b", 0, 0, 200, false),
            br#"{"node":"x","heartbeat_ms":1,"services":{}}"#.to_vec(),
        ] {
            assert!(m.heartbeat(&bad, t0, 0, &mut out).is_err());
        }
        assert_eq!(out, []);
        assert!(m.nodes().is_empty());
        assert_eq!(m.counts().malformed_heartbeats, 4);
    }

    #[test]
    fn a_restart_under_the_same_name_replaces_the_old_instance() {
        let t0 = Instant::now();
        let mut m = table(t0);
        feed(&mut m, &hb("b", 1, 10, 200, false), t0);
        // Goodbye, then a new instance: dropped, then joined afresh.
        feed(&mut m, &hb("b", 1, 10, 200, true), t0 + 100 * MS);
        assert_eq!(
            feed(&mut m, &hb("b", 2, 20, 200, false), t0 + 150 * MS),
            [up("b")]
        );
        // Killed without a goodbye: the newcomer's later claim waits while
        // the old one could still be alive (under 2 intervals)...
        let killed = t0 + 200 * MS;
        feed(&mut m, &hb("b", 2, 20, 200, false), killed);
        assert_eq!(
            feed(&mut m, &hb("b", 3, 30, 200, false), killed + 300 * MS),
            []
        );
        assert_eq!(m.member("b").map(|b| b.claim.instance), Some(2));
        // ... and takes over once the old one missed 2 heartbeats.
        assert_eq!(
            feed(&mut m, &hb("b", 3, 30, 200, false), killed + 450 * MS),
            [
                down("b", "another instance took its name (it restarted)", false),
                up("b")
            ]
        );
        assert_eq!(m.member("b").map(|b| b.claim.instance), Some(3));
        // Once the old one is down, at once.
        let changes = ticks(&mut m, killed + 500 * MS, killed + 1_200 * MS);
        assert_eq!(changes, [(650, down("b", "missed 3 heartbeats", false))]);
        assert_eq!(
            feed(&mut m, &hb("b", 4, 40, 200, false), killed + 1_200 * MS),
            [up("b")]
        );
    }

    #[test]
    fn of_two_live_instances_of_one_name_the_earlier_claim_holds_it_here() {
        let t0 = Instant::now();
        let mut m = table(t0);
        // The later claim was heard first; the earlier one takes over.
        feed(&mut m, &hb("c", 7, 2_000, 200, false), t0);
        assert_eq!(
            feed(&mut m, &hb("c", 8, 1_500, 200, false), t0 + 10 * MS),
            [
                down("c", "another instance took its name (it restarted)", false),
                up("c")
            ]
        );
        // The later claim, still alive: ignored, however often it speaks.
        for i in 1..10 {
            assert_eq!(
                feed(&mut m, &hb("c", 7, 2_000, 200, false), t0 + i * 20 * MS),
                []
            );
        }
        assert_eq!(m.member("c").map(|c| c.claim.instance), Some(8));
        // Equal claims: the smaller instance.
        assert_eq!(
            feed(&mut m, &hb("c", 3, 1_500, 200, false), t0 + 300 * MS).last(),
            Some(&up("c"))
        );
        assert_eq!(m.member("c").map(|c| c.claim.instance), Some(3));
    }

    #[test]
    fn requests_admit_the_holder_or_a_newcomer_never_an_impostor() {
        let t0 = Instant::now();
        let mut m = table(t0);
        let mut out = Vec::new();
        // Before its heartbeat: admitted, and routable for the reply.
        assert_eq!(m.request_from("b", 1, t0, &mut out), Ok(()));
        assert_eq!(out, [up("b")]);
        // Its heartbeat gives the real claim; a request-only node has none.
        out.clear();
        feed(&mut m, &hb("b", 1, 10, 200, false), t0);
        assert_eq!(m.member("b").map(|b| b.claim.since_ms), Some(10));
        // Another instance while b is alive: refused.
        assert_eq!(
            m.request_from("b", 2, t0 + 100 * MS, &mut out),
            Err(Refusal::NotHolder)
        );
        assert_eq!(m.request_from("a", 5, t0, &mut out), Err(Refusal::OwnName));
        assert_eq!(out, []);
        // b silent for 2 intervals: the newcomer (b restarted) is admitted.
        assert_eq!(m.request_from("b", 2, t0 + 500 * MS, &mut out), Ok(()));
        assert_eq!(m.member("b").map(|b| b.claim.instance), Some(2));
        m.reply_from("b", 2, t0 + 600 * MS);
        assert_eq!(m.member("b").map(|b| b.last_seen), Some(t0 + 600 * MS));
    }

    #[test]
    fn the_later_claim_on_this_brokers_name_stands_aside_and_rejoins_when_it_is_free() {
        let t0 = Instant::now();
        // Claim 1 000; checks up to a second apart are not a stall here.
        let mut m = table_with(
            t0,
            Limits {
                heartbeat: 1_000 * MS,
                ..limits()
            },
        );
        feed(&mut m, &hb("b", 1, 10, 200, false), t0);
        // A later claim on "a": this broker keeps the name; said once.
        let rival = hb("a", 200, 2_000, 200, false);
        assert_eq!(feed(&mut m, &rival, t0), [Change::Rival { instance: 200 }]);
        assert_eq!(feed(&mut m, &rival, t0), []);
        assert_eq!(m.claim(), Some(1_000));
        // An earlier claim: this broker stands aside, b out of its rotation.
        let holder = hb("a", 300, 900, 200, false);
        assert_eq!(
            feed(&mut m, &holder, t0 + 10 * MS),
            [
                Change::StandAside { holder: 300 },
                down(
                    "b",
                    "this broker stands aside: another broker instance holds its node name",
                    false
                ),
            ]
        );
        assert_eq!((m.claim(), m.holder()), (None, Some(300)));
        assert!(!m.routable("b"));
        let mut out = Vec::new();
        assert_eq!(
            m.request_from("b", 1, t0, &mut out),
            Err(Refusal::StandingAside)
        );
        // b keeps being watched, but not routed while aside.
        assert_eq!(feed(&mut m, &hb("b", 1, 10, 200, false), t0 + 200 * MS), []);
        // The holder keeps talking: still aside.
        for i in 1..=5 {
            feed(&mut m, &holder, t0 + i * 150 * MS);
            feed(&mut m, &hb("b", 1, 10, 200, false), t0 + i * 150 * MS);
            assert_eq!(tick(&mut m, t0 + i * 150 * MS), []);
        }
        // The holder goes quiet for 3 intervals: the name is claimed anew.
        let quiet = t0 + 750 * MS;
        feed(&mut m, &hb("b", 1, 10, 200, false), quiet + 500 * MS);
        assert_eq!(tick(&mut m, quiet + 650 * MS), [Change::Rejoin, up("b")]);
        assert_eq!((m.claim(), m.holder()), (Some(5_000), None));
        assert!(m.routable("b"));
    }

    #[test]
    fn a_holders_goodbye_frees_the_name_at_once() {
        let t0 = Instant::now();
        let mut m = table(t0);
        feed(&mut m, &hb("a", 300, 900, 200, false), t0);
        assert_eq!(m.holder(), Some(300));
        // Another later claimant leaving: nothing.
        assert_eq!(feed(&mut m, &hb("a", 400, 950, 200, true), t0), []);
        let out = feed(&mut m, &hb("a", 300, 900, 200, true), t0 + 10 * MS);
        assert_eq!(out, [Change::Rejoin]);
        assert_eq!(m.claim(), Some(5_000));
    }

    #[test]
    fn two_brokers_starting_together_settle_on_exactly_one() {
        let t0 = Instant::now();
        // Same millisecond: the smaller instance keeps the name.
        for (x, y, since_x, since_y) in [
            (5, 9, 1_000, 1_000),
            (9, 5, 1_000, 1_000),
            (9, 5, 999, 1_000),
        ] {
            let mut one = Membership::new("c", x, limits(), t0);
            let mut two = Membership::new("c", y, limits(), t0);
            one.connected(t0, since_x);
            two.connected(t0, since_y);
            let mut out = Vec::new();
            one.heartbeat(&hb("c", y, since_y, 200, false), t0, 0, &mut out)
                .expect("hb");
            two.heartbeat(&hb("c", x, since_x, 200, false), t0, 0, &mut out)
                .expect("hb");
            let aside = [one.holder().is_some(), two.holder().is_some()];
            let expect_one_out = (since_y, y) < (since_x, x);
            assert_eq!(aside, [expect_one_out, !expect_one_out], "{x} {y}");
        }
    }

    #[test]
    fn a_lost_connection_takes_every_node_down_and_no_rejoin_while_it_lasts() {
        let t0 = Instant::now();
        let mut m = table(t0);
        feed(&mut m, &hb("b", 1, 10, 200, false), t0);
        let mut out = Vec::new();
        m.disconnected(&mut out);
        assert_eq!(
            out,
            [down("b", "this broker lost its NATS connection", false)]
        );
        // Aside and disconnected: the holder's silence proves nothing.
        // (Checks up to 2 s apart are not a stall here.)
        let mut m = table_with(
            t0,
            Limits {
                heartbeat: 2_000 * MS,
                ..limits()
            },
        );
        feed(&mut m, &hb("a", 300, 900, 200, false), t0);
        m.disconnected(&mut Vec::new());
        let s = Duration::from_secs;
        assert_eq!(tick(&mut m, t0 + s(2)), []);
        assert_eq!(m.holder(), Some(300));
        // Back: no claim while aside, and the holder has 3 intervals from
        // now to be heard again.
        m.connected(t0 + s(2), 6_000);
        assert_eq!(m.claim(), None);
        assert_eq!(tick(&mut m, t0 + s(2) + 500 * MS), []);
        assert_eq!(tick(&mut m, t0 + s(2) + 700 * MS), [Change::Rejoin]);
        assert_eq!(m.claim(), Some(5_000));
    }
}
