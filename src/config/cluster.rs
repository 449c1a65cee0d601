//! `[cluster]`: brokers on several hosts through NATS.
//!
//! One struct serves the file and the actors: every key is what the operator
//! wrote, checked once by [`ClusterConfig::check`]. `nats_url = ""` (the
//! default) is a single host, exactly as without the section.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `nats_url`: one URL, or a list (a NATS cluster's seeds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NatsUrls {
    /// `nats_url = "nats://10.0.0.5:4222"` (`""`: no cluster).
    One(String),
    /// `nats_url = ["nats://a:4222", "nats://b:4222"]`.
    Many(Vec<String>),
}

impl Default for NatsUrls {
    fn default() -> Self {
        Self::One(String::new())
    }
}

impl NatsUrls {
    /// The non-empty URLs.
    pub fn list(&self) -> Vec<String> {
        match self {
            Self::One(url) => vec![url.clone()],
            Self::Many(urls) => urls.clone(),
        }
        .into_iter()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect()
    }
}

/// Where a request to a plain service name goes when other nodes have it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// This node's ready workers if it has any, else round-robin over the
    /// nodes that advertise one.
    #[default]
    LocalFirst,
    /// Round-robin over every node with a ready worker, this one included.
    Spread,
}

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The NATS server(s); `""` = single host.
    pub nats_url: NatsUrls,
    /// Cluster name: the subject prefix. Brokers with the same name federate.
    pub name: String,
    /// This broker's node name (`""`: the whole host name, `.` made `-`).
    pub node: String,
    /// Advertisement interval; a node unheard for 3 intervals is gone.
    pub heartbeat_ms: u64,
    /// A node unheard for this long is forgotten (dropped from the node
    /// table, stats and `/metrics`), so nodes that come and go cannot
    /// grow it without end.
    pub forget_after_ms: u64,
    /// Most other nodes kept; heartbeats from more are ignored and counted.
    pub max_nodes: u32,
    /// Local services other nodes may call (`"*"`: all); `[]` = none.
    pub export: Vec<String>,
    /// `local-first` or `spread`.
    pub balance: Balance,
    /// NATS token.
    pub token: String,
    /// NATS user (with `password`).
    pub user: String,
    /// NATS password.
    pub password: String,
    /// NATS credentials file (JWT and nkey seed).
    pub creds_file: String,
    /// CA certificate(s) to trust for the server (PEM); implies TLS.
    pub tls_ca_file: String,
    /// Client certificate (PEM), with `tls_key_file`.
    pub tls_cert_file: String,
    /// Client key (PEM).
    pub tls_key_file: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            nats_url: NatsUrls::default(),
            name: "procbroker".into(),
            node: String::new(),
            heartbeat_ms: 1000,
            forget_after_ms: 600_000,
            max_nodes: 1000,
            export: vec!["*".into()],
            balance: Balance::LocalFirst,
            token: String::new(),
            user: String::new(),
            password: String::new(),
            creds_file: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

/// The node name a host name gives: the whole name, with `.` and anything
/// else outside `[A-Za-z0-9_-]` made `-` (`web-1.dc1` → `web-1-dc1`).
/// Not the name up to its first dot: `web-1.dc1` and `web-1.dc2` would
/// then both be `web-1`.
pub fn node_name_of(host: &str) -> String {
    let name: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.is_empty() { "node".into() } else { name }
}

/// A name fit for a NATS subject token and a `service@node` suffix (node
/// and cluster names; also what a node's messages must claim to be).
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ClusterConfig {
    /// A cluster through `url` (builder style, for embedders and tests).
    pub fn nats(url: impl Into<String>, node: impl Into<String>) -> Self {
        Self {
            nats_url: NatsUrls::One(url.into()),
            node: node.into(),
            ..Self::default()
        }
    }

    /// Whether this broker joins a cluster at all.
    pub fn enabled(&self) -> bool {
        !self.nats_url.list().is_empty()
    }

    /// The heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.max(1))
    }

    /// How long a node may stay unheard before it is forgotten.
    pub fn forget_after(&self) -> Duration {
        Duration::from_millis(self.forget_after_ms)
    }

    /// This node's name: `node`, or the host name (see [`node_name_of`]).
    pub fn node_name(&self) -> String {
        if !self.node.is_empty() {
            return self.node.clone();
        }
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        node_name_of(&host)
    }

    /// Whether local service `service` may be called from other nodes.
    pub fn exports(&self, service: &str) -> bool {
        self.export.iter().any(|e| e == "*" || e == service)
    }

    /// Checks the section: `(key, message)` of the first problem.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !is_token(&self.name) {
            return Err(("cluster.name", "must be [A-Za-z0-9_-]+".into()));
        }
        if !self.node.is_empty() && !is_token(&self.node) {
            return Err((
                "cluster.node",
                "must be [A-Za-z0-9_-]+ (or \"\" for the host name)".into(),
            ));
        }
        if self.heartbeat_ms == 0 {
            return Err(("cluster.heartbeat_ms", "must be at least 1".into()));
        }
        if self.forget_after_ms < self.heartbeat_ms.saturating_mul(3) {
            return Err((
                "cluster.forget_after_ms",
                format!(
                    "must be at least 3 × heartbeat_ms ({} ms): a node is forgotten only after it is found gone",
                    self.heartbeat_ms.saturating_mul(3)
                ),
            ));
        }
        if self.max_nodes == 0 {
            return Err(("cluster.max_nodes", "must be at least 1".into()));
        }
        for url in self.nats_url.list() {
            let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
            if rest.is_empty() || url.contains(char::is_whitespace) {
                return Err(("cluster.nats_url", format!("{url:?} is not a NATS URL")));
            }
        }
        if let Some(bad) = self.export.iter().find(|e| *e != "*" && !is_token(e)) {
            return Err((
                "cluster.export",
                format!("{bad:?} is not a service name (or \"*\")"),
            ));
        }
        if self.user.is_empty() != self.password.is_empty() {
            return Err(("cluster.user", "user and password go together".into()));
        }
        let ways = [
            !self.token.is_empty(),
            !self.user.is_empty(),
            !self.creds_file.is_empty(),
        ];
        if ways.iter().filter(|w| **w).count() > 1 {
            return Err((
                "cluster.token",
                "use one of token, user/password, creds_file".into(),
            ));
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            return Err((
                "cluster.tls_cert_file",
                "tls_cert_file and tls_key_file go together".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_a_single_host() {
        let c = ClusterConfig::default();
        assert!(!c.enabled());
        assert!(c.check().is_ok());
        assert!(c.exports("anything"));
        assert!(is_token(&c.node_name()), "{}", c.node_name());
    }

    #[test]
    fn checks_name_the_key() {
        let bad = |f: fn(&mut ClusterConfig)| {
            let mut c = ClusterConfig::nats("nats://127.0.0.1:4222", "a");
            f(&mut c);
            c.check().expect_err("refused").0
        };
        assert_eq!(bad(|c| c.node = "a.b".into()), "cluster.node");
        assert_eq!(bad(|c| c.name = "x y".into()), "cluster.name");
        assert_eq!(bad(|c| c.heartbeat_ms = 0), "cluster.heartbeat_ms");
        assert_eq!(bad(|c| c.forget_after_ms = 2999), "cluster.forget_after_ms");
        assert_eq!(bad(|c| c.max_nodes = 0), "cluster.max_nodes");
        assert_eq!(bad(|c| c.user = "u".into()), "cluster.user");
        assert_eq!(
            bad(|c| {
                c.token = "t".into();
                c.creds_file = "f".into();
            }),
            "cluster.token"
        );
        assert_eq!(bad(|c| c.export = vec!["a.b".into()]), "cluster.export");
        assert_eq!(
            bad(|c| c.tls_key_file = "k".into()),
            "cluster.tls_cert_file"
        );
    }

    #[test]
    fn the_default_node_name_is_the_whole_host_name() {
        assert_eq!(node_name_of("web-1.dc1"), "web-1-dc1");
        assert_eq!(node_name_of("web-1.dc2"), "web-1-dc2");
        assert_eq!(node_name_of("box_2"), "box_2");
        assert_eq!(node_name_of("höst.x"), "h-st-x");
        assert_eq!(node_name_of(""), "node");
        let c = ClusterConfig::default();
        assert_eq!(c.forget_after(), Duration::from_secs(600));
        assert_eq!(c.max_nodes, 1000);
    }

    #[test]
    fn urls_one_or_many() {
        assert!(NatsUrls::One(" ".into()).list().is_empty());
        let many = NatsUrls::Many(vec!["nats://a:1".into(), "".into(), "nats://b:2".into()]);
        assert_eq!(many.list(), ["nats://a:1", "nats://b:2"]);
    }
}
