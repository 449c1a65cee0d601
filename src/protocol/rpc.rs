//! The broker's own RPCs (`target = "broker"`) and their payloads.
//!
//! Request payloads reject unknown keys: a misspelt `workers` in a `Spawn`
//! must be a `bad_request`, not a silently ignored setting.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

pub use super::process_status::ProcessStatus;
use super::stats::ProcessMetrics;

/// The methods the broker answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BrokerMethod {
    /// Liveness: replies `{}`.
    Ping,
    /// Counters, latency quantiles and process metrics ([`MessageStats`](super::MessageStats)).
    GetMessageStats,
    /// `{count}`: frames sent plus received.
    GetMessageCount,
    /// Stores an array of [`ProcessMetrics`]; replies [`SubmitProcessMetricsReply`].
    SubmitProcessMetrics,
    /// Array of [`ProcessInfo`].
    ListProcesses,
    /// Control RPC: starts a service ([`SpawnRequest`]).
    Spawn,
    /// Control RPC: stops a process or a whole service ([`StopRequest`]).
    Stop,
    /// Control RPC: sets a service's number of workers ([`ScaleRequest`]).
    Scale,
    /// Control RPC: restarts a process or a service, one worker at a time
    /// ([`RestartRequest`]).
    Restart,
    /// Array of [`NodeInfo`]: the nodes of the cluster.
    ListNodes,
}

impl BrokerMethod {
    /// Every method, in the order PROTOCOL.md lists them.
    pub const ALL: [BrokerMethod; 10] = [
        Self::Ping,
        Self::GetMessageStats,
        Self::GetMessageCount,
        Self::SubmitProcessMetrics,
        Self::ListProcesses,
        Self::Spawn,
        Self::Stop,
        Self::Scale,
        Self::Restart,
        Self::ListNodes,
    ];

    /// The method name (the request's `id`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ping => "Ping",
            Self::GetMessageStats => "GetMessageStats",
            Self::GetMessageCount => "GetMessageCount",
            Self::SubmitProcessMetrics => "SubmitProcessMetrics",
            Self::ListProcesses => "ListProcesses",
            Self::Spawn => "Spawn",
            Self::Stop => "Stop",
            Self::Scale => "Scale",
            Self::Restart => "Restart",
            Self::ListNodes => "ListNodes",
        }
    }

    /// Control RPCs run commands; only services in `control_allow` may call them.
    pub const fn is_control(self) -> bool {
        matches!(self, Self::Spawn | Self::Stop | Self::Scale | Self::Restart)
    }
}

impl fmt::Display for BrokerMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Not a broker method (answered with `unknown_method`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the broker has no method {0:?}")]
pub struct UnknownMethod(pub String);

impl FromStr for BrokerMethod {
    type Err = UnknownMethod;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownMethod(s.to_owned()))
    }
}

/// `{}`: the reply of `Ping`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// Reply of `GetMessageCount`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageCount {
    /// Frames sent to children plus frames received from them.
    pub count: u64,
}

/// Payload of `SubmitProcessMetrics`.
pub type SubmitProcessMetrics = Vec<ProcessMetrics>;

/// Reply of `SubmitProcessMetrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitProcessMetricsReply {
    /// How many samples were stored.
    pub received: u64,
}

/// One row of `ListProcesses`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Process id (`service.N`).
    pub id: String,
    /// The service it is a worker of.
    pub service: String,
    /// OS pid of the current incarnation; `None` while not running.
    pub pid: Option<u32>,
    /// Life-cycle state.
    pub status: ProcessStatus,
    /// How many times it was restarted.
    pub restarts: u32,
    /// RFC 3339 time the current incarnation started.
    pub started_at: Option<String>,
    /// Exit code of the last incarnation (`None` if it has not exited or was killed by a signal).
    pub exit_code: Option<i32>,
}

/// One row of `ListNodes`: a node of the cluster as this broker sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its name.
    pub node: String,
    /// Its exported services and their ready workers, as last advertised.
    pub services: BTreeMap<String, u32>,
    /// Milliseconds since it was last heard from (0 for this node).
    pub last_seen_ms: u64,
    /// In the rotation now (false: it missed 3 heartbeats, left, or this
    /// broker lost its NATS connection).
    pub up: bool,
    /// This broker's own node.
    pub local: bool,
}

/// Restart policy of a service (config `restart = {…}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestartPolicy {
    /// Restarts allowed before the process is `failed`; -1 = unlimited.
    pub max_restarts: i64,
    /// First backoff delay.
    pub backoff_initial_ms: u64,
    /// Backoff ceiling (the delay doubles up to here).
    pub backoff_max_ms: u64,
    /// Restart intensity: when > 0, more than `max_restarts` restarts
    /// inside any window of this many milliseconds make the process
    /// `failed` (a process up longer than the window starts afresh). 0:
    /// `max_restarts` counts over the process's whole life.
    pub window_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: -1,
            backoff_initial_ms: 100,
            backoff_max_ms: 30_000,
            window_ms: 0,
        }
    }
}

fn one() -> u32 {
    1
}

/// Payload of `Spawn`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    /// Service name (workers become `service.0 …`).
    pub service: String,
    /// Program to run.
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Number of worker processes (default 1).
    #[serde(default = "one")]
    pub workers: u32,
    /// Restart policy (defaults as in the config).
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Wait for the `ready` event (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub await_ready: Option<bool>,
    /// How long to wait for it (default 5000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_ms: Option<u64>,
}

/// One element of the `Spawn` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnedProcess {
    /// Process id.
    pub id: String,
    /// OS pid, if it started.
    pub pid: Option<u32>,
    /// Its status right after spawning.
    pub status: ProcessStatus,
    /// Why it is not ready, when it is not: it could not be run, it exited
    /// before it was ready, or it was not ready within `ready_timeout_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SpawnedProcess {
    /// Whether it started and became ready.
    pub fn is_ready(&self) -> bool {
        self.status == ProcessStatus::Ready
    }
}

/// A worker that a `Scale` could not start, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedWorker {
    /// Process id.
    pub id: String,
    /// Why it is not serving.
    pub error: String,
}

/// Payload of `Stop`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// A process id (`echo.2`) or a service name (`echo`: all its workers).
    pub id: String,
}

/// Reply of `Stop`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StopReply {
    /// The process ids that were stopped.
    pub stopped: Vec<String>,
}

/// Payload of `Scale`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    /// A running subprocess service.
    pub service: String,
    /// Its number of workers from now on (at least 1; `Stop` removes a
    /// service).
    pub workers: u32,
}

/// Reply of `Scale`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ScaleReply {
    /// The service.
    pub service: String,
    /// Its number of workers now.
    pub workers: u32,
    /// Workers started and ready (scaling up).
    pub started: Vec<String>,
    /// Workers drained and stopped (scaling down: the highest-numbered).
    pub stopped: Vec<String>,
    /// Workers that did not become ready (scaling up), with the reason;
    /// each is left to its restart policy.
    #[serde(default)]
    pub failed: Vec<FailedWorker>,
}

/// Payload of `Restart`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartRequest {
    /// A process id (`echo.2`) or a service name (`echo`: all its workers,
    /// one at a time).
    pub id: String,
}

/// Reply of `Restart`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RestartReply {
    /// The process ids restarted, in order.
    pub restarted: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Payload;

    #[test]
    fn method_names_round_trip() {
        for m in BrokerMethod::ALL {
            assert_eq!(m.as_str().parse::<BrokerMethod>(), Ok(m));
        }
        assert!("ping".parse::<BrokerMethod>().is_err());
        assert!(BrokerMethod::Spawn.is_control() && !BrokerMethod::Ping.is_control());
    }

    #[test]
    fn spawn_request_takes_defaults_and_rejects_typos() {
        let minimal = Payload::encode(&serde_json_like_map(&[("service", "x"), ("command", "y")]))
            .expect("encode");
        let req: SpawnRequest = minimal.decode().expect("decode");
        assert_eq!(req.workers, 1);
        assert_eq!(req.restart, RestartPolicy::default());
        assert!(req.args.is_empty() && req.env.is_empty());

        let typo = Payload::encode(&serde_json_like_map(&[
            ("service", "x"),
            ("command", "y"),
            ("worker", "4"),
        ]))
        .expect("encode");
        let err = typo.decode::<SpawnRequest>().expect_err("typo must fail");
        assert!(err.to_string().contains("worker"), "{err}");
    }

    #[test]
    fn ping_reply_is_an_empty_map() {
        assert_eq!(
            Payload::encode(&Empty {})
                .expect("encode")
                .as_bytes()
                .as_ref(),
            &[0x80]
        );
    }

    fn serde_json_like_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}
