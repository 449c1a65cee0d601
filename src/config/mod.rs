//! Broker settings that the actors read, and the config file they come from.
//! All static: nothing is re-tuned at run time.

pub mod cluster;
pub mod file;
pub mod order;
pub mod run_as;

pub use cluster::{Balance, ClusterConfig, NatsUrls};
pub use run_as::{Limits, RunAsSpec, UserRef};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

use crate::protocol::DEFAULT_MAX_FRAME_BYTES;
use crate::protocol::rpc::{RestartPolicy, SpawnRequest};

/// Settings of the Router, Broker and Sysmon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Largest frame, in bytes.
    pub max_frame_bytes: usize,
    /// Requests in flight per process before it counts as full (`busy`).
    pub queue_capacity: usize,
    /// Default deadline of a request (overridden by its `timeout_ms`).
    pub request_timeout: Duration,
    /// Services allowed to call `Spawn` and `Stop`.
    pub control_allow: Vec<String>,
    /// How often Sysmon samples `/proc`; `None` disables it.
    pub sysmon_interval: Option<Duration>,
    /// How often the Router ships counters and histograms to the MetricsStore.
    /// Stats requests also flush first, so this only bounds staleness of
    /// `/metrics`-style reads of the store.
    pub metrics_flush_interval: Duration,
    /// Record request latencies (on by default; off only to measure its cost).
    pub record_latency: bool,
    /// Stopping a child: EOF on its stdin, SIGTERM after half of this, SIGKILL
    /// after all of it.
    pub kill_timeout: Duration,
    /// At shutdown, how long in-flight requests may take to be answered.
    pub drain_timeout: Duration,
    /// A child that sends more invalid envelopes than this in one second is
    /// treated as out of sync: killed and restarted (0: no limit).
    pub max_bad_frames_per_s: u64,
    /// Events one process may send per second; past it its events are
    /// dropped and counted as its `busy_rejections` (0: no limit).
    pub max_events_per_s: u64,
    /// What the windowed latency (`latency_window_us`, `/metrics`
    /// quantiles, the dashboard) covers: the last this much.
    pub latency_window: Duration,
    /// Federation over NATS (`[cluster]`; off by default).
    pub cluster: ClusterConfig,
    /// Most workers one subprocess service may have (`Spawn`, `Scale`,
    /// the config file).
    pub max_workers: u32,
    /// Children's stderr: the ring, the files, the broker's own log
    /// (`[logs]`).
    pub logs: LogsConfig,
}

/// `[logs]`: where children's stderr lines go besides the ring of each
/// process's last [`RING_LINES`](crate::actors::log_store::RING_LINES)
/// lines, which is always kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogsConfig {
    /// Each process's lines also go to `dir/{process}.log` (`None`: no files).
    pub dir: Option<std::path::PathBuf>,
    /// A file is rotated before a line would take it past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`{process}.log.1` the newest).
    pub keep: u32,
    /// Children's lines also go to the broker's own log.
    pub to_broker_log: bool,
    /// At most this many lines a second per process go to the broker's own
    /// log; the rest are counted in one "N lines suppressed" line.
    pub broker_log_lines_per_s: u32,
}

impl Default for LogsConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_bytes: 10 * 1024 * 1024,
            keep: 5,
            to_broker_log: true,
            broker_log_lines_per_s: 100,
        }
    }
}

/// The default of [`BrokerConfig::max_workers`].
pub const DEFAULT_MAX_WORKERS: u32 = 1000;

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            queue_capacity: 1000,
            request_timeout: Duration::from_secs(30),
            control_allow: Vec::new(),
            sysmon_interval: Some(Duration::from_secs(30)),
            metrics_flush_interval: Duration::from_secs(1),
            record_latency: true,
            kill_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            max_bad_frames_per_s: 100,
            max_events_per_s: 100_000,
            latency_window: Duration::from_secs(60),
            cluster: ClusterConfig::default(),
            max_workers: DEFAULT_MAX_WORKERS,
            logs: LogsConfig::default(),
        }
    }
}

/// The program `command = "@self"` stands for: the running binary.
pub const SELF_COMMAND: &str = "@self";

/// One `[[service]]`: a program run as `workers` child processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Service name; its workers are `name.0 … name.{workers-1}`.
    pub name: String,
    /// A path, a name on `PATH`, or `@self` (this binary).
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Number of worker processes.
    #[serde(default = "default_workers")]
    pub workers: u32,
    /// Routable only after the child's `ready` event (else at once).
    #[serde(default = "default_true")]
    pub await_ready: bool,
    /// How long a start may take to send `ready` before it counts as failed.
    #[serde(default = "default_ready_timeout_ms")]
    pub ready_timeout_ms: u64,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Restart policy.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Health check of each ready worker (none by default).
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// The wire the child speaks: procbroker's envelopes (the default) or
    /// MessagePack-RPC.
    #[serde(default)]
    pub protocol: Protocol,
    /// `msgpack-rpc`: the method called once at each start whose reply
    /// makes the worker ready (`""`: ready at once). Replaces the `ready`
    /// handshake, which such programs do not have.
    #[serde(default)]
    pub ready_probe: String,
    /// `msgpack-rpc`: where the child's own requests go (a service or
    /// process; `""`: answered with an error).
    #[serde(default)]
    pub calls_to: String,
    /// `msgpack-rpc`: where the child's notifications go as events (`""`:
    /// dropped and counted).
    #[serde(default)]
    pub events_to: String,
    /// Resource limits of each child, soft and hard (`setrlimit` before
    /// exec); none by default: the broker's own are inherited.
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    pub limits: Limits,
    /// The children's working directory (`""`: the broker's). A relative
    /// one is relative to the config file's folder.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cwd: String,
    /// Run the children as this user (a name, or a number); the broker must
    /// run as root. They get its primary group and supplementary groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserRef>,
    /// Run the children with this group (a name, or a number) as their
    /// primary group; the broker must run as root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<UserRef>,
    /// Services that must have all their workers ready before this one
    /// starts; at shutdown this one stops first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// How requests to the service name are spread over its ready workers.
    #[serde(default, skip_serializing_if = "WorkerBalance::is_default")]
    pub balance: WorkerBalance,
    /// When a worker is replaced by a fresh one (all off by default).
    #[serde(default, skip_serializing_if = "Recycle::is_off")]
    pub recycle: Recycle,
}

/// `balance = "round_robin" | "least_pending"`: which ready worker a
/// request to the service name goes to. Requests with a `key` always go
/// to the worker their key hashes to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerBalance {
    /// The next ready worker in turn.
    #[default]
    RoundRobin,
    /// The ready worker with the fewest requests in flight; ties go to the
    /// next in turn.
    LeastPending,
}

impl WorkerBalance {
    fn is_default(&self) -> bool {
        *self == Self::RoundRobin
    }
}

/// `recycle = { max_requests, max_age_ms, max_rss_kb }`: a worker that
/// reaches any of them is replaced, one worker of the service at a time,
/// as in a rolling restart. 0 (or left out) is off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Recycle {
    /// Requests served (health checks not counted).
    #[serde(deserialize_with = "recycle_limit::max_requests")]
    pub max_requests: u64,
    /// Time since its `ready`, in milliseconds.
    #[serde(deserialize_with = "recycle_limit::max_age_ms")]
    pub max_age_ms: u64,
    /// Resident memory, in KiB, checked at each system sample.
    #[serde(deserialize_with = "recycle_limit::max_rss_kb")]
    pub max_rss_kb: u64,
}

/// The `recycle` limits are read as whole numbers of at least 0; a
/// negative one is refused with the key named (serde's own message says
/// only "expected u64").
mod recycle_limit {
    use serde::Deserializer;
    use serde::de::{Error, Visitor};

    struct Limit(&'static str);

    impl Visitor<'_> for Limit {
        type Value = u64;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "recycle.{}: a whole number, 0 (off) or more", self.0)
        }

        fn visit_u64<E: Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| {
                E::custom(format!(
                    "recycle.{}: {v} is negative; must be 0 (off) or more",
                    self.0
                ))
            })
        }
    }

    pub fn max_requests<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_u64(Limit("max_requests"))
    }

    pub fn max_age_ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_u64(Limit("max_age_ms"))
    }

    pub fn max_rss_kb<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_u64(Limit("max_rss_kb"))
    }
}

/// The smallest `recycle.max_age_ms` (other than 0): a worker replaced
/// sooner spends more of its life starting than serving.
pub const MIN_RECYCLE_AGE_MS: u64 = 1_000;
/// The largest `recycle.max_age_ms`: a year. Longer is as good as off, and
/// more likely a slip of a few zeros than a wish.
pub const MAX_RECYCLE_AGE_MS: u64 = 365 * 24 * 3_600_000;
/// The smallest `recycle.max_rss_kb` (other than 0): 1 MiB. Every program
/// is that large once it has started, so a smaller limit would recycle its
/// workers at every memory sample, in a loop.
pub const MIN_RECYCLE_RSS_KB: u64 = 1_024;

impl Recycle {
    /// No limit set.
    pub fn is_off(&self) -> bool {
        *self == Self::default()
    }

    /// Checks the limits against the bounds above, and `max_rss_kb`
    /// against the memory sampling (`sampled`: Sysmon runs). On error: the
    /// key under `recycle` (`max_age_ms`) and what is wrong.
    pub fn check(&self, sampled: bool) -> Result<(), (&'static str, String)> {
        let age = self.max_age_ms;
        if age != 0 && age < MIN_RECYCLE_AGE_MS {
            return Err((
                "max_age_ms",
                format!(
                    "{age} would replace each worker more than once a second; \
                     must be 0 (off) or {MIN_RECYCLE_AGE_MS} … {MAX_RECYCLE_AGE_MS}"
                ),
            ));
        }
        if age > MAX_RECYCLE_AGE_MS {
            return Err((
                "max_age_ms",
                format!(
                    "{age} is more than a year; must be 0 (off) or \
                     {MIN_RECYCLE_AGE_MS} … {MAX_RECYCLE_AGE_MS}"
                ),
            ));
        }
        let rss = self.max_rss_kb;
        if rss != 0 && rss < MIN_RECYCLE_RSS_KB {
            return Err((
                "max_rss_kb",
                format!(
                    "{rss} kB is less than any program needs to run, so every worker \
                     would be recycled at every memory sample; must be 0 (off) or at \
                     least {MIN_RECYCLE_RSS_KB}"
                ),
            ));
        }
        if rss != 0 && !sampled {
            return Err((
                "max_rss_kb",
                "is read at each memory sample, and sampling is off \
                 (sysmon.interval_ms = 0): set an interval or leave max_rss_kb out"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// `protocol = "procbroker" | "msgpack-rpc"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Length-prefixed envelopes, `ready` and `shutdown` events.
    #[default]
    Procbroker,
    /// MessagePack-RPC values on stdio, no handshake.
    MsgpackRpc,
}

/// `health = { method, interval_ms, timeout_ms, failures }`: every
/// `interval_ms` the broker calls `method` on each ready worker; after
/// `failures` consecutive checks without a good reply within `timeout_ms`
/// the worker is killed and restarted as after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheck {
    /// The method called (the SDK and the Python example answer `Ping`).
    pub method: String,
    /// Time between checks.
    pub interval_ms: u64,
    /// How long a check may wait for its reply.
    pub timeout_ms: u64,
    /// Consecutive failed checks that get the worker killed.
    pub failures: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            method: "Ping".into(),
            interval_ms: 5000,
            timeout_ms: 1000,
            failures: 3,
        }
    }
}

fn default_workers() -> u32 {
    1
}

fn default_true() -> bool {
    true
}

fn default_ready_timeout_ms() -> u64 {
    5000
}

impl ServiceConfig {
    /// A service of one worker running `command args…`, defaults elsewhere.
    pub fn new(name: impl Into<String>, command: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            command: command.into(),
            args: Vec::new(),
            workers: default_workers(),
            await_ready: true,
            ready_timeout_ms: default_ready_timeout_ms(),
            env: BTreeMap::new(),
            restart: RestartPolicy::default(),
            health: None,
            protocol: Protocol::Procbroker,
            ready_probe: String::new(),
            calls_to: String::new(),
            events_to: String::new(),
            limits: Limits::default(),
            cwd: String::new(),
            user: None,
            group: None,
            depends_on: Vec::new(),
            balance: WorkerBalance::RoundRobin,
            recycle: Recycle::default(),
        }
    }

    /// Whether `command` names a program that can be run: `@self`, a path
    /// to an executable file, or a name found as one on the `PATH` the
    /// child will have (its `env` may set one). Checked before a rolling
    /// restart replaces any worker with one that could never start.
    pub fn check_command(&self) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        if self.command == SELF_COMMAND {
            return Ok(());
        }
        let executable = |path: &std::path::Path| {
            std::fs::metadata(path)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        };
        if self.command.contains('/') {
            return if executable(std::path::Path::new(&self.command)) {
                Ok(())
            } else {
                Err(format!(
                    "command {:?} is not an executable file",
                    self.command
                ))
            };
        }
        let path = self
            .env
            .get("PATH")
            .cloned()
            .or_else(|| std::env::var("PATH").ok())
            .unwrap_or_default();
        if std::env::split_paths(&path).any(|dir| executable(&dir.join(&self.command))) {
            Ok(())
        } else {
            Err(format!(
                "command {:?} is not an executable found on PATH",
                self.command
            ))
        }
    }

    /// Speaks MessagePack-RPC; `ready_probe` is called at each
    /// start and its reply makes the worker ready (`""`: ready at once).
    pub fn msgpack_rpc(mut self, ready_probe: impl Into<String>) -> Self {
        self.protocol = Protocol::MsgpackRpc;
        self.ready_probe = ready_probe.into();
        self
    }

    /// Where a MessagePack-RPC child's requests go.
    pub fn calls_to(mut self, target: impl Into<String>) -> Self {
        self.calls_to = target.into();
        self
    }

    /// Where a MessagePack-RPC child's notifications go.
    pub fn events_to(mut self, target: impl Into<String>) -> Self {
        self.events_to = target.into();
        self
    }

    /// Whether the worker waits for something before it is routable: the
    /// `ready` event, or the reply to `ready_probe`.
    pub fn awaits_ready(&self) -> bool {
        match self.protocol {
            Protocol::Procbroker => self.await_ready,
            Protocol::MsgpackRpc => !self.ready_probe.is_empty(),
        }
    }

    /// Sets the arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the number of workers.
    pub fn workers(mut self, n: u32) -> Self {
        self.workers = n;
        self
    }

    /// Sets one environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Routable at once, without the `ready` handshake.
    pub fn no_ready_handshake(mut self) -> Self {
        self.await_ready = false;
        self
    }

    /// Checks each ready worker's health.
    pub fn health(mut self, check: HealthCheck) -> Self {
        self.health = Some(check);
        self
    }

    /// Sets the restart policy.
    pub fn restart(mut self, policy: RestartPolicy) -> Self {
        self.restart = policy;
        self
    }

    /// Sets the resource limits of each child.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets the children's working directory.
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = dir.into();
        self
    }

    /// Runs the children as `user` (the broker must run as root).
    pub fn user(mut self, user: impl Into<UserRef>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Runs the children with `group` as their primary group.
    pub fn group(mut self, group: impl Into<UserRef>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Sets how requests to the service name are spread over its workers.
    pub fn balance(mut self, balance: WorkerBalance) -> Self {
        self.balance = balance;
        self
    }

    /// Sets when a worker is replaced by a fresh one.
    pub fn recycle(mut self, recycle: Recycle) -> Self {
        self.recycle = recycle;
        self
    }

    /// Starts only once every worker of each of `services` is ready, and
    /// stops before them.
    pub fn depends_on<I: IntoIterator<Item = S>, S: Into<String>>(mut self, services: I) -> Self {
        self.depends_on = services.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the ready timeout.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self
    }
}

impl From<SpawnRequest> for ServiceConfig {
    fn from(r: SpawnRequest) -> Self {
        Self {
            name: r.service,
            command: r.command,
            args: r.args,
            workers: r.workers,
            await_ready: r.await_ready.unwrap_or(true),
            ready_timeout_ms: r.ready_timeout_ms.unwrap_or_else(default_ready_timeout_ms),
            env: r.env,
            restart: r.restart,
            ..Self::new(String::new(), String::new())
        }
    }
}

impl RunAsSpec for ServiceConfig {
    fn run_limits(&self) -> &Limits {
        &self.limits
    }
    fn run_cwd(&self) -> &str {
        &self.cwd
    }
    fn run_user(&self) -> Option<&UserRef> {
        self.user.as_ref()
    }
    fn run_group(&self) -> Option<&UserRef> {
        self.group.as_ref()
    }
}
