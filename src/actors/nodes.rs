//! The Router's view of the other nodes of a cluster.
//!
//! A remote node is routed like a process: it has a slot in the process
//! table under the id `@node` (so requests in flight to it live in the same
//! pending table, with the same deadlines, and a node that goes away fails
//! them `worker_exited` through the same removal path as a worker). What
//! this file adds is the choice: which node serves `service@node`, and for
//! a plain service name whether this node or which other one, with the
//! Router's own round-robin cursor per service (NATS queue groups pick at
//! random, so they are not used for it). A request with a routing key
//! picks its node by rendezvous hashing of the key with the node names
//! instead, so every broker sends one key to the same node while the nodes
//! serving the service are unchanged (and that node's broker picks the
//! same worker for it by the same rule).

use bytestring::ByteString;

use super::fast_map::FastMap;
use super::rendezvous;
use crate::config::Balance;

/// Splits `service@node` (or `service.N@node`, `proc@node`) at its last `@`.
/// `None` for a name without one, or one starting with it (the broker's own
/// ids, `@caller`, `@node`). On the request path (every service name
/// passes here): a byte search, not `str::rfind(char)`, whose char searcher
/// cost ~160 instructions per request. `@` is ASCII, so its byte position is
/// a char boundary.
#[inline]
pub(crate) fn split(target: &str) -> Option<(&str, &str)> {
    match target.as_bytes().iter().rposition(|&b| b == b'@') {
        Some(0) | None => None,
        Some(at) => Some((&target[..at], &target[at + 1..])),
    }
}

/// The table id a node is routed under.
pub(crate) fn node_id(node: &str) -> ByteString {
    ByteString::from(format!("@{node}"))
}

/// One remote node.
#[derive(Debug)]
struct Node {
    /// `@node`: the id it is routed under, made once.
    id: ByteString,
    up: bool,
    /// Its advertised services and ready workers.
    services: Vec<(ByteString, u32)>,
}

impl Node {
    fn ready(&self) -> u32 {
        self.services.iter().map(|(_, n)| *n).sum()
    }
}

/// Where a request to a plain service name goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Choice {
    /// This node's own workers.
    Local,
    /// That node (its name).
    Remote(ByteString),
}

/// The nodes that have a ready worker of one service, and its cursor.
#[derive(Debug, Default)]
struct Rotation {
    nodes: Vec<ByteString>,
    /// The rendezvous hash of each of `nodes`' names, in the same order.
    hashes: Vec<u64>,
    cursor: usize,
    /// A known node advertises it (kept or dropped at each rebuild).
    advertised: bool,
}

/// Every remote node heard from, and per service the rotation over them.
#[derive(Debug, Default)]
pub(crate) struct Nodes {
    /// This node's name (`""` without a cluster).
    this: ByteString,
    /// Its rendezvous hash.
    this_hash: u64,
    balance: Balance,
    nodes: FastMap<ByteString, Node>,
    /// Service → nodes advertising a ready worker of it. A service a known
    /// node advertises (or did before it went down) keeps its (maybe empty)
    /// entry, so a call to it while its nodes are gone is `unavailable`,
    /// not `unknown_target`; once no known node has it, the entry goes.
    services: FastMap<ByteString, Rotation>,
}

impl Nodes {
    /// The view of node `this` (`""`: no cluster, nothing remote ever).
    pub(crate) fn new(this: impl Into<ByteString>, balance: Balance) -> Self {
        let this = this.into();
        Self {
            this_hash: rendezvous::id_hash(&this),
            this,
            balance,
            ..Self::default()
        }
    }

    /// No cluster, or nobody else heard from yet: routing is local only.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// This node's name.
    pub(crate) fn this(&self) -> &str {
        &self.this
    }

    /// Node `node` advertised `services`. True if it was not up before.
    pub(crate) fn up(&mut self, node: &ByteString, services: Vec<(ByteString, u32)>) -> bool {
        let entry = self.nodes.entry(node.clone()).or_insert_with(|| Node {
            id: node_id(node),
            up: false,
            services: Vec::new(),
        });
        let joined = !entry.up;
        entry.up = true;
        entry.services = services;
        self.rebuild();
        joined
    }

    /// Node `node` is gone; it stays known (calls to it are `unavailable`)
    /// until it is forgotten.
    pub(crate) fn down(&mut self, node: &ByteString) {
        if let Some(entry) = self.nodes.get_mut(node) {
            entry.up = false;
        }
        self.rebuild();
    }

    /// Node `node` left or was forgotten: calls to it are `unknown_target`,
    /// and so are calls to services no node it leaves behind advertises.
    pub(crate) fn forget(&mut self, node: &ByteString) {
        if self.nodes.remove(node).is_some() {
            self.rebuild();
        }
    }

    /// `Some(up)` for a node heard from, `None` for one never heard of.
    pub(crate) fn state(&self, node: &str) -> Option<bool> {
        self.nodes.get(node).map(|n| n.up)
    }

    /// The id node `node` is routed under (`@node`), once heard from.
    pub(crate) fn id(&self, node: &str) -> Option<&ByteString> {
        self.nodes.get(node).map(|n| &n.id)
    }

    /// Ready workers node `node` advertises over all its services (0 while
    /// it is down).
    pub(crate) fn ready(&self, node: &str) -> u32 {
        self.nodes.get(node).filter(|n| n.up).map_or(0, Node::ready)
    }

    /// Whether a known node (up or down) advertises `service`.
    pub(crate) fn knows(&self, service: &str) -> bool {
        self.services.contains_key(service)
    }

    /// Where the next request to plain `service` goes, given whether this
    /// node has a ready worker of it and the request's routing `key`.
    /// `None`: nowhere remote and not local.
    pub(crate) fn choose(
        &mut self,
        service: &str,
        local_ready: bool,
        key: Option<&str>,
    ) -> Option<Choice> {
        let spread = self.balance == Balance::Spread;
        if local_ready && !spread {
            return Some(Choice::Local);
        }
        let Some(rotation) = self.services.get_mut(service) else {
            return local_ready.then_some(Choice::Local);
        };
        // Spread: this node is one more stop of the rotation, the first.
        let local = usize::from(spread && local_ready);
        let stops = rotation.nodes.len() + local;
        if stops == 0 {
            return None;
        }
        let i = match key {
            // The stop the key scores highest with, by node name (this
            // node's own under spread): the same on every broker.
            Some(key) => {
                let key = rendezvous::key_hash(key);
                let this = (local == 1).then_some(self.this_hash);
                this.into_iter()
                    .chain(rotation.hashes.iter().copied())
                    .enumerate()
                    .max_by_key(|&(_, node)| rendezvous::score(key, node))
                    .map_or(0, |(i, _)| i)
            }
            None => {
                let i = rotation.cursor % stops;
                rotation.cursor = (i + 1) % stops;
                i
            }
        };
        if i < local {
            Some(Choice::Local)
        } else {
            Some(Choice::Remote(rotation.nodes[i - local].clone()))
        }
    }

    fn rebuild(&mut self) {
        for rotation in self.services.values_mut() {
            rotation.nodes.clear();
            rotation.hashes.clear();
            rotation.advertised = false;
        }
        let mut names: Vec<&ByteString> = self.nodes.keys().collect();
        names.sort();
        for name in names {
            let node = &self.nodes[name];
            for (service, ready) in &node.services {
                let rotation = self.services.entry(service.clone()).or_default();
                rotation.advertised = true;
                if node.up && *ready > 0 {
                    rotation.nodes.push(name.clone());
                    rotation.hashes.push(rendezvous::id_hash(name));
                }
            }
        }
        // Services no known node has: bounded by what the nodes kept say.
        self.services.retain(|_, rotation| rotation.advertised);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, n: u32) -> (ByteString, u32) {
        (ByteString::from(name), n)
    }

    #[test]
    fn split_at_the_last_at() {
        assert_eq!(split("echo@b"), Some(("echo", "b")));
        assert_eq!(split("echo.1@b"), Some(("echo.1", "b")));
        assert_eq!(split("echo"), None);
        assert_eq!(split("@caller"), None);
        assert_eq!(split("echo@"), Some(("echo", "")));
        // The last `@`, found by bytes, is still a char boundary.
        assert_eq!(split("a@b@c"), Some(("a@b", "c")));
        assert_eq!(split("dienst-ü@knoten-é"), Some(("dienst-ü", "knoten-é")));
    }

    #[test]
    fn local_first_prefers_this_node_then_rotates_over_the_others() {
        let mut n = Nodes::new("a", Balance::LocalFirst);
        n.up(&"c".into(), vec![svc("echo", 1)]);
        n.up(&"b".into(), vec![svc("echo", 2), svc("idle", 0)]);
        assert_eq!(n.choose("echo", true, None), Some(Choice::Local));
        let picks: Vec<_> = (0..4).map(|_| n.choose("echo", false, None)).collect();
        let b = Some(Choice::Remote("b".into()));
        let c = Some(Choice::Remote("c".into()));
        assert_eq!(picks, [b.clone(), c.clone(), b, c]);
        assert_eq!(
            n.choose("idle", false, None),
            None,
            "advertised without ready workers"
        );
        assert!(n.knows("idle"));
        assert_eq!(n.choose("nothing", true, None), Some(Choice::Local));
        n.down(&"b".into());
        n.down(&"c".into());
        assert_eq!(n.choose("echo", false, None), None);
        assert!(n.knows("echo"), "a gone node's services stay known");
        assert_eq!(n.state("b"), Some(false));
        assert_eq!(n.state("z"), None);
        assert_eq!(n.id("b").map(|id| &**id), Some("@b"));
        assert_eq!(n.ready("b"), 0, "down: nothing ready");
        // Back up: its services as it last advertised them.
        n.up(&"b".into(), vec![svc("echo", 2), svc("idle", 0)]);
        assert_eq!(
            n.choose("echo", false, None),
            Some(Choice::Remote("b".into()))
        );
    }

    #[test]
    fn a_forgotten_node_takes_its_services_along() {
        let mut n = Nodes::new("a", Balance::LocalFirst);
        n.up(&"b".into(), vec![svc("echo", 1), svc("only-b", 1)]);
        n.up(&"c".into(), vec![svc("echo", 1)]);
        n.down(&"b".into());
        n.forget(&"b".into());
        assert_eq!(n.state("b"), None);
        assert!(!n.knows("only-b"), "nobody has it any more");
        assert!(n.knows("echo"));
        assert_eq!(
            n.choose("echo", false, None),
            Some(Choice::Remote("c".into()))
        );
        n.forget(&"c".into());
        assert!(n.is_empty() && !n.knows("echo"));
    }

    #[test]
    fn spread_counts_this_node_as_one_stop() {
        let mut n = Nodes::new("a", Balance::Spread);
        n.up(&"b".into(), vec![svc("echo", 1)]);
        let picks: Vec<_> = (0..4).map(|_| n.choose("echo", true, None)).collect();
        let b = Some(Choice::Remote("b".into()));
        let local = Some(Choice::Local);
        assert_eq!(picks, [local.clone(), b.clone(), local, b]);
        assert_eq!(n.ready("b"), 1);
    }

    #[test]
    fn a_key_picks_one_node_and_moves_only_when_its_node_goes() {
        let mut n = Nodes::new("a", Balance::LocalFirst);
        for node in ["b", "c", "d"] {
            n.up(&node.into(), vec![svc("echo", 1)]);
        }
        let keys: Vec<String> = (0..300).map(|k| format!("session-{k}")).collect();
        let pick = |n: &mut Nodes, key: &str, local: bool| match n.choose("echo", local, Some(key))
        {
            Some(Choice::Remote(node)) => node.to_string(),
            Some(Choice::Local) => "a".to_owned(),
            None => "-".to_owned(),
        };
        let before: Vec<String> = keys.iter().map(|k| pick(&mut n, k, false)).collect();
        // Stable: asked again (the cursor moving meanwhile), the same node.
        n.choose("echo", false, None);
        let again: Vec<String> = keys.iter().map(|k| pick(&mut n, k, false)).collect();
        assert_eq!(before, again);
        for node in ["b", "c", "d"] {
            let owned = before.iter().filter(|p| *p == node).count();
            assert!((60..=140).contains(&owned), "{node} owns {owned} of 300");
        }
        // Another broker with the same nodes picks the same ones.
        let mut other = Nodes::new("x", Balance::LocalFirst);
        for node in ["d", "c", "b"] {
            other.up(&node.into(), vec![svc("echo", 1)]);
        }
        let elsewhere: Vec<String> = keys.iter().map(|k| pick(&mut other, k, false)).collect();
        assert_eq!(before, elsewhere);
        // c goes: only c's keys move.
        n.down(&"c".into());
        let after: Vec<String> = keys.iter().map(|k| pick(&mut n, k, false)).collect();
        for (was, is) in before.iter().zip(&after) {
            if was != "c" {
                assert_eq!(was, is);
            } else {
                assert_ne!(is, "c");
            }
        }
        // Local-first with a local worker: local, key or not.
        assert_eq!(pick(&mut n, "session-1", true), "a");
        // Spread: this node is one of the candidates, by its name.
        let mut s = Nodes::new("a", Balance::Spread);
        s.up(&"b".into(), vec![svc("echo", 1)]);
        let spread: Vec<String> = keys.iter().map(|k| pick(&mut s, k, true)).collect();
        let local = spread.iter().filter(|p| *p == "a").count();
        assert!((100..=200).contains(&local), "a owns {local} of 300");
        assert_eq!(
            spread,
            keys.iter()
                .map(|k| pick(&mut s, k, true))
                .collect::<Vec<_>>()
        );
    }
}
