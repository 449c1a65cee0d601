//! The config file: TOML, then `PROCBROKER_…` environment
//! variables, then command-line settings, each on top of the one before.
//!
//! Every key is checked: an unknown key, a value of the wrong type or out of
//! range is an error naming the key and where it came from (the file with
//! line and column, the environment variable, or the flag), never a panic
//! and never a silently ignored typo.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::run_as::ChildSetup;
use super::{BrokerConfig, ClusterConfig, LogsConfig, SELF_COMMAND, ServiceConfig};
use crate::names;
use crate::protocol::DEFAULT_MAX_FRAME_BYTES;

/// The embedded default configuration (`procbroker run` with no file).
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// Environment variables that are not settings (a broker run as a child of
/// another broker sees its own process id and service).
const NOT_SETTINGS: [&str; 2] = ["PROCBROKER_PROCESS_ID", "PROCBROKER_SERVICE"];

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `[broker]`.
    #[serde(default)]
    pub broker: BrokerSection,
    /// `[admin]`.
    #[serde(default)]
    pub admin: AdminSection,
    /// `[sysmon]`.
    #[serde(default)]
    pub sysmon: SysmonSection,
    /// `[cluster]`.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// `[logs]`: children's stderr.
    #[serde(default)]
    pub logs: LogsSection,
    /// `[[service]]`, in order.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

/// `[broker]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSection {
    /// Largest frame, in bytes.
    pub max_frame_bytes: u64,
    /// Requests in flight (and frames queued) per process.
    pub queue_capacity: u64,
    /// Default request deadline.
    pub request_timeout_ms: u64,
    /// At shutdown, how long in-flight requests may take.
    pub drain_timeout_ms: u64,
    /// Stopping a child: SIGTERM at half of this, SIGKILL at all of it.
    pub kill_timeout_ms: u64,
    /// Services allowed to call `Spawn` / `Stop`.
    pub control_allow: Vec<String>,
    /// Invalid envelopes a second past which a child is killed and restarted.
    pub max_bad_frames_per_s: u64,
    /// Events a second one process may send.
    pub max_events_per_s: u64,
    /// The windowed latency covers the last this many milliseconds.
    pub latency_window_ms: u64,
    /// Most workers one service may have.
    pub max_workers: u32,
}

impl Default for BrokerSection {
    fn default() -> Self {
        let d = BrokerConfig::default();
        Self {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES as u64,
            queue_capacity: d.queue_capacity as u64,
            request_timeout_ms: millis(d.request_timeout),
            drain_timeout_ms: millis(d.drain_timeout),
            kill_timeout_ms: millis(d.kill_timeout),
            control_allow: Vec::new(),
            max_bad_frames_per_s: d.max_bad_frames_per_s,
            max_events_per_s: d.max_events_per_s,
            latency_window_ms: millis(d.latency_window),
            max_workers: d.max_workers,
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// `host:port`; `""` disables; port 0 = any free port.
    pub listen: String,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// `[sysmon]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SysmonSection {
    /// Sampling interval; 0 disables Sysmon.
    pub interval_ms: u64,
}

impl Default for SysmonSection {
    fn default() -> Self {
        Self {
            interval_ms: 30_000,
        }
    }
}

/// `[logs]`: children's stderr lines, besides each process's ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogsSection {
    /// `""`: no files; else each process's lines also go to
    /// `dir/{process}.log` (relative to the config file's folder).
    pub dir: String,
    /// Rotate before a line would take a file past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept per process.
    pub keep: u32,
    /// Children's lines also go to the broker's own log.
    pub to_broker_log: bool,
    /// Per process, at most this many of them a second.
    pub broker_log_lines_per_s: u32,
}

impl Default for LogsSection {
    fn default() -> Self {
        let d = LogsConfig::default();
        Self {
            dir: String::new(),
            max_bytes: d.max_bytes,
            keep: d.keep,
            to_broker_log: d.to_broker_log,
            broker_log_lines_per_s: d.broker_log_lines_per_s,
        }
    }
}

/// The smallest `[logs] max_bytes`.
pub const MIN_LOG_FILE_BYTES: u64 = 1024;
/// The most rotated files `[logs] keep` may ask for.
pub const MAX_LOG_FILES_KEPT: u32 = 1000;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A configuration that was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (in the message, not a separate cause: said once).
        error: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the shape (the message
    /// names the key, with line and column).
    #[error("{origin}: {message}")]
    Parse {
        /// The file, or `the embedded default`.
        origin: String,
        /// The parser's message.
        message: String,
    },
    /// An environment variable or flag that is not a setting, or a value
    /// that does not fit it.
    #[error("{origin}: {message}")]
    Override {
        /// `environment variable NAME` or `--set KEY`.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A value out of range, or services that do not fit together.
    #[error("{origin}: {key}: {message}")]
    Invalid {
        /// Where the configuration came from.
        origin: String,
        /// The key (`broker.queue_capacity`, `service[1].name`).
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// A loaded, checked configuration and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The settings.
    pub file: FileConfig,
    /// The file (`None`: the embedded default).
    pub path: Option<PathBuf>,
}

impl Loaded {
    /// Reads `path` (or the embedded default), applies `env` (name, value)
    /// pairs whose names start with `PROCBROKER_`, then `sets` (`key=value`,
    /// e.g. `broker.queue_capacity=500`), and checks everything.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[String],
    ) -> Result<Self, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|error| ConfigError::Read {
                    path: p.to_owned(),
                    error,
                })?,
                p.display().to_string(),
            ),
            None => (DEFAULT_TOML.to_owned(), "the embedded default".to_owned()),
        };
        let mut file: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            origin: origin.clone(),
            message: e.to_string(),
        })?;
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("PROCBROKER_") && !NOT_SETTINGS.contains(&k.as_str()))
            .collect();
        env.sort();
        let overridden = !env.is_empty() || !sets.is_empty();
        for (name, value) in env {
            let key = env_key(&name).ok_or_else(|| ConfigError::Override {
                origin: format!("environment variable {name}"),
                message: "not a setting (PROCBROKER_BROKER_…, PROCBROKER_ADMIN_LISTEN, PROCBROKER_SYSMON_INTERVAL_MS, PROCBROKER_CLUSTER_…, PROCBROKER_LOGS_…)".into(),
            })?;
            file = apply(file, &key, &value, &format!("environment variable {name}"))?;
        }
        for set in sets {
            let (key, value) = set.split_once('=').ok_or_else(|| ConfigError::Override {
                origin: format!("--set {set}"),
                message: "expected KEY=VALUE, e.g. broker.queue_capacity=500".into(),
            })?;
            file = apply(file, key.trim(), value, &format!("--set {key}"))?;
        }
        let mut loaded = Self {
            file,
            path: path.map(Path::to_owned),
        };
        if overridden {
            loaded.check(&format!(
                "{origin} with its environment and --set overrides"
            ))?;
        } else {
            loaded.check(&origin)?;
        }
        loaded.resolve_commands();
        Ok(loaded)
    }

    fn check(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: String, message: &str| ConfigError::Invalid {
            origin: origin.to_owned(),
            key,
            message: message.to_owned(),
        };
        let b = &self.file.broker;
        if b.max_frame_bytes == 0 || b.max_frame_bytes > u64::from(u32::MAX) {
            return Err(invalid(
                "broker.max_frame_bytes".into(),
                "must be 1 … 4294967295",
            ));
        }
        if b.queue_capacity == 0 {
            return Err(invalid(
                "broker.queue_capacity".into(),
                "must be at least 1",
            ));
        }
        if b.max_workers == 0 {
            return Err(invalid("broker.max_workers".into(), "must be at least 1"));
        }
        if b.request_timeout_ms == 0 {
            return Err(invalid(
                "broker.request_timeout_ms".into(),
                "must be at least 1",
            ));
        }
        let listen = &self.file.admin.listen;
        if !listen.is_empty() && listen.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "admin.listen".into(),
                "must be host:port with a numeric host (\"127.0.0.1:9464\", \"[::1]:0\"), or \"\" to disable",
            ));
        }
        if let Err((key, message)) = self.file.cluster.check() {
            return Err(invalid(key.into(), &message));
        }
        let logs = &self.file.logs;
        if logs.max_bytes < MIN_LOG_FILE_BYTES {
            return Err(invalid(
                "logs.max_bytes".into(),
                &format!("must be at least {MIN_LOG_FILE_BYTES}"),
            ));
        }
        if logs.keep > MAX_LOG_FILES_KEPT {
            return Err(invalid(
                "logs.keep".into(),
                &format!("must be 0 … {MAX_LOG_FILES_KEPT}"),
            ));
        }
        if logs.broker_log_lines_per_s == 0 {
            return Err(invalid(
                "logs.broker_log_lines_per_s".into(),
                "must be at least 1 (to_broker_log = false keeps children's lines out of the broker's log)",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in self.file.services.iter().enumerate() {
            if let Err(e) = names::check_service_name(&s.name) {
                return Err(invalid(format!("service[{i}].name"), &e.to_string()));
            }
            if !seen.insert(s.name.as_str()) {
                return Err(invalid(
                    format!("service[{i}].name"),
                    &format!("{:?} appears twice", s.name),
                ));
            }
            if s.command.is_empty() {
                return Err(invalid(
                    format!("service[{i}].command"),
                    "must not be empty",
                ));
            }
            if s.workers == 0 {
                return Err(invalid(
                    format!("service[{i}].workers"),
                    "must be at least 1",
                ));
            }
            if s.workers > b.max_workers {
                return Err(invalid(
                    format!("service[{i}].workers"),
                    &format!(
                        "{} is more than broker.max_workers = {}",
                        s.workers, b.max_workers
                    ),
                ));
            }
            if s.protocol == super::Protocol::Procbroker
                && let Some(key) = [
                    ("ready_probe", &s.ready_probe),
                    ("calls_to", &s.calls_to),
                    ("events_to", &s.events_to),
                ]
                .iter()
                .find_map(|(key, v)| (!v.is_empty()).then_some(key))
            {
                return Err(invalid(
                    format!("service[{i}].{key}"),
                    "applies to protocol = \"msgpack-rpc\" only",
                ));
            }
            if s.restart.max_restarts < -1 {
                return Err(invalid(
                    format!("service[{i}].restart.max_restarts"),
                    "must be -1 (unlimited) or more",
                ));
            }
            if s.restart.backoff_initial_ms == 0
                || s.restart.backoff_max_ms < s.restart.backoff_initial_ms
            {
                return Err(invalid(
                    format!("service[{i}].restart"),
                    "need 1 <= backoff_initial_ms <= backoff_max_ms",
                ));
            }
            if let Some(h) = &s.health
                && (h.method.is_empty()
                    || h.interval_ms == 0
                    || h.timeout_ms == 0
                    || h.failures == 0)
            {
                return Err(invalid(
                    format!("service[{i}].health"),
                    "need a method and interval_ms, timeout_ms, failures of at least 1",
                ));
            }
            if let Err((key, message)) = s.recycle.check(self.file.sysmon.interval_ms > 0) {
                return Err(invalid(format!("service[{i}].recycle.{key}"), &message));
            }
            // Limits against the broker's own, user and group (root
            // only), cwd: checked here so a start or a reload is refused
            // before anything runs.
            if let Err(e) = ChildSetup::resolve(&self.resolved(s)) {
                return Err(invalid(format!("service[{i}].{}", e.key), &e.message));
            }
        }
        if let Err(e) = self.start_order() {
            return Err(invalid(self.depends_on_key(&e), &e.to_string()));
        }
        Ok(())
    }

    /// The key an ordering error is reported under: the `depends_on` of
    /// the (first) service involved.
    fn depends_on_key(&self, e: &super::order::OrderError) -> String {
        let name = match e {
            super::order::OrderError::Unknown { service, .. } => Some(service),
            super::order::OrderError::Cycle { cycle } => cycle.first(),
        };
        let index = name.and_then(|n| self.file.services.iter().position(|s| &s.name == n));
        match index {
            Some(i) => format!("service[{i}].depends_on"),
            None => "depends_on".into(),
        }
    }

    /// The configured services, as indices into `file.services`, in the
    /// order they start (each after what it `depends_on`).
    pub fn start_order(&self) -> Result<Vec<usize>, super::order::OrderError> {
        let view: Vec<(&str, &[String])> = self
            .file
            .services
            .iter()
            .map(|s| (s.name.as_str(), s.depends_on.as_slice()))
            .collect();
        super::order::start_order(&view)
    }

    /// The configured services in the order they start.
    pub fn services_in_start_order(&self) -> Vec<ServiceConfig> {
        match self.start_order() {
            Ok(order) => order
                .into_iter()
                .filter_map(|i| self.file.services.get(i).cloned())
                .collect(),
            // A loaded configuration was checked; keep the file's order.
            Err(_) => self.file.services.clone(),
        }
    }

    /// `s` with its `cwd` as it will be used (relative to the file's folder).
    fn resolved(&self, s: &ServiceConfig) -> ServiceConfig {
        let mut s = s.clone();
        if let Some(dir) = self.path.as_deref().and_then(Path::parent)
            && !s.cwd.is_empty()
            && Path::new(&s.cwd).is_relative()
        {
            s.cwd = dir.join(&s.cwd).display().to_string();
        }
        s
    }

    /// A relative `command` with a `/` is relative to the file's folder, and
    /// so is a relative argument that looks like a file (it has a `/` or a
    /// `.`, and no leading `-`) and is a file there: `args = ["worker.py"]`
    /// beside the config runs that script from any working directory.
    /// Other arguments are left as written.
    fn resolve_commands(&mut self) {
        let Some(dir) = self.path.as_deref().and_then(Path::parent) else {
            return;
        };
        // `cwd` and `[logs] dir` too; with the embedded default they stay
        // relative to the broker's working directory.
        let logs = &mut self.file.logs.dir;
        if !logs.is_empty() && Path::new(logs.as_str()).is_relative() {
            *logs = dir.join(&*logs).display().to_string();
        }
        for s in &mut self.file.services {
            if !s.cwd.is_empty() && Path::new(&s.cwd).is_relative() {
                s.cwd = dir.join(&s.cwd).display().to_string();
            }
            let p = Path::new(&s.command);
            if s.command != SELF_COMMAND && p.is_relative() && s.command.contains('/') {
                s.command = dir.join(p).display().to_string();
            }
            for arg in &mut s.args {
                let looks_like_a_file =
                    !arg.starts_with('-') && (arg.contains('/') || arg.contains('.'));
                let there = dir.join(&*arg);
                if looks_like_a_file && Path::new(arg).is_relative() && there.is_file() {
                    *arg = there.display().to_string();
                }
            }
        }
    }

    /// The actors' settings.
    pub fn broker_config(&self) -> BrokerConfig {
        let b = &self.file.broker;
        let interval = self.file.sysmon.interval_ms;
        BrokerConfig {
            max_frame_bytes: usize::try_from(b.max_frame_bytes).unwrap_or(usize::MAX),
            queue_capacity: usize::try_from(b.queue_capacity).unwrap_or(usize::MAX),
            request_timeout: Duration::from_millis(b.request_timeout_ms),
            control_allow: b.control_allow.clone(),
            sysmon_interval: (interval > 0).then(|| Duration::from_millis(interval)),
            kill_timeout: Duration::from_millis(b.kill_timeout_ms),
            drain_timeout: Duration::from_millis(b.drain_timeout_ms),
            max_bad_frames_per_s: b.max_bad_frames_per_s,
            max_events_per_s: b.max_events_per_s,
            latency_window: Duration::from_millis(b.latency_window_ms.max(1)),
            cluster: self.file.cluster.clone(),
            max_workers: b.max_workers,
            logs: self.logs_config(),
            ..BrokerConfig::default()
        }
    }

    /// The `[logs]` settings for the actors.
    pub fn logs_config(&self) -> LogsConfig {
        let l = &self.file.logs;
        LogsConfig {
            dir: (!l.dir.is_empty()).then(|| PathBuf::from(&l.dir)),
            max_bytes: l.max_bytes,
            keep: l.keep,
            to_broker_log: l.to_broker_log,
            broker_log_lines_per_s: l.broker_log_lines_per_s,
        }
    }

    /// The admin listen address, if enabled.
    pub fn admin_listen(&self) -> Option<SocketAddr> {
        self.file.admin.listen.parse().ok()
    }
}

/// `PROCBROKER_BROKER_QUEUE_CAPACITY` → `broker.queue_capacity`.
fn env_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix("PROCBROKER_")?.to_ascii_lowercase();
    ["broker", "admin", "sysmon", "cluster", "logs"]
        .into_iter()
        .find_map(|section| {
            rest.strip_prefix(section)
                .and_then(|k| k.strip_prefix('_'))
                .filter(|k| !k.is_empty())
                .map(|k| format!("{section}.{k}"))
        })
}

/// Sets `section.key` to `value` (read as a TOML value, else as a string).
fn apply(
    file: FileConfig,
    key: &str,
    value: &str,
    origin: &str,
) -> Result<FileConfig, ConfigError> {
    let fail = |message: String| ConfigError::Override {
        origin: origin.to_owned(),
        message,
    };
    let Some((section, name)) = key.split_once('.') else {
        return Err(fail(format!("{key:?} is not section.key")));
    };
    if !matches!(section, "broker" | "admin" | "sysmon" | "cluster" | "logs") {
        return Err(fail(format!(
            "no section [{section}] to set (services are set in the file)"
        )));
    }
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    let mut table = toml::Table::try_from(&file).map_err(|e| fail(e.to_string()))?;
    let slot = table
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(slot) = slot.as_table_mut() else {
        return Err(fail(format!("[{section}] is not a table")));
    };
    slot.insert(name.to_owned(), parsed);
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| fail(format!("{key}: {}", e.message())))
}
