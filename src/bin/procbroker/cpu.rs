//! CPU time per call of each process of a benchmark run: the figure that
//! says where a relay's time goes (broker, client, workers), read as user +
//! system time of each process before and after the measured phase.

use serde_json::{Value, json};

/// CPU time a process has used so far (user + system, all threads), in µs:
/// read from its CPU-time clock (nanoseconds), or where that cannot be read
/// from `/proc/<pid>/stat` (clock ticks: 10 ms apiece, too coarse to tell
/// apart two runs of a second).
fn cpu_us(pid: u32) -> Option<f64> {
    let id = nix::unistd::Pid::from_raw(i32::try_from(pid).ok()?);
    if let Ok(t) = nix::time::clock_getcpuclockid(id).and_then(nix::time::clock_gettime) {
        return Some(t.tv_sec() as f64 * 1e6 + t.tv_nsec() as f64 / 1e3);
    }
    let stat = procfs::process::Process::new(i32::try_from(pid).ok()?)
        .ok()?
        .stat()
        .ok()?;
    // sysconf, not procfs's auxv reader (which valgrind cannot run).
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as f64;
    Some((stat.utime + stat.stime) as f64 * 1e6 / ticks)
}

/// Who ran where in one phase. `None`: that role ran inside another
/// process (an in-process client is part of the broker's figure).
#[derive(Debug, Clone, Default)]
pub struct Roles {
    /// The relaying process (this one, for procbroker and the raw relay).
    pub broker: Option<u32>,
    /// The process making the calls.
    pub client: Option<u32>,
    /// The echo workers.
    pub workers: Vec<u32>,
}

/// CPU readings at the start of a phase.
pub struct CpuMeter {
    roles: Roles,
    start: Vec<Option<f64>>,
}

impl CpuMeter {
    fn read(roles: &Roles) -> Vec<Option<f64>> {
        let mut v = vec![roles.broker.and_then(cpu_us), roles.client.and_then(cpu_us)];
        v.extend(roles.workers.iter().map(|&p| cpu_us(p)));
        v
    }

    /// Starts measuring these processes (they must still be running at
    /// [`stop`](Self::stop): a reaped process has no `/proc` entry).
    pub fn start(roles: Roles) -> Self {
        let start = Self::read(&roles);
        Self { roles, start }
    }

    /// CPU µs per call of each role since [`start`](Self::start).
    pub fn stop(&self, calls: u64) -> CpuPerCall {
        let end = Self::read(&self.roles);
        let calls = calls.max(1) as f64;
        let used = |i: usize| match (
            self.start.get(i).copied().flatten(),
            end.get(i).copied().flatten(),
        ) {
            (Some(a), Some(b)) => Some((b - a).max(0.0) / calls),
            _ => None,
        };
        let workers: Option<f64> = if self.roles.workers.is_empty() {
            None
        } else {
            (2..end.len()).map(used).sum()
        };
        CpuPerCall {
            broker: used(0),
            client: used(1),
            workers,
        }
    }
}

/// CPU µs per call, per role.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
pub struct CpuPerCall {
    /// The relaying process (with an in-process client, that too).
    pub broker: Option<f64>,
    /// The client process, if it is one of its own.
    pub client: Option<f64>,
    /// All echo workers together, if they are processes of their own.
    pub workers: Option<f64>,
}

impl CpuPerCall {
    /// Each figure times `factor` (CPU per call into CPU per frame, or per
    /// partial reply).
    pub fn scaled(&self, factor: f64) -> Self {
        let by = |v: Option<f64>| v.map(|v| v * factor);
        Self {
            broker: by(self.broker),
            client: by(self.client),
            workers: by(self.workers),
        }
    }

    /// Every role together.
    pub fn total(&self) -> f64 {
        [self.broker, self.client, self.workers]
            .iter()
            .flatten()
            .sum()
    }

    /// `{broker, client, workers}` for `--json` (null: not separate).
    pub fn json(&self) -> Value {
        json!({"broker": self.broker, "client": self.client, "workers": self.workers})
    }

    /// One line for humans.
    pub fn describe(&self) -> String {
        let part = |name: &str, v: Option<f64>| v.map(|v| format!("{name} {v:.2}"));
        let parts: Vec<String> = [
            part("broker", self.broker),
            part("client", self.client),
            part("workers", self.workers),
        ]
        .into_iter()
        .flatten()
        .collect();
        format!("{} (total {:.2})", parts.join(", "), self.total())
    }
}
