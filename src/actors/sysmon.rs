//! Sysmon: samples `/proc/{pid}/status` of the broker and every watched child
//! on a fixed interval and submits the samples to the MetricsStore.
//!
//! It watches the real pids the Broker hands it ([`Watch`]); v2e guessed pids
//! by matching command lines, which picked up unrelated processes.
//!
//! A watched worker whose service has `recycle.max_rss_kb` is checked at
//! each sample: the first sample of an incarnation at or above the limit
//! tells the recycler ([`SetRecycler`]) that the worker is due, once.

use actix::prelude::*;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::messages::{
    RecycleDue, RecycleReason, SampleNow, SetRecycler, SubmitMetrics, Unwatch, Watch,
};
use super::metrics_store::MetricsStore;
use crate::names::BROKER;
use crate::protocol::ProcessMetrics;

/// Reads one process's `/proc/{pid}/status`.
///
/// A pid that no longer exists is reported with state `exited` and no memory
/// figures; a zombie keeps its `Z` and has none either (the kernel prints no
/// `VmRSS` for it). Never 0 kB for a process that is not there.
pub fn sample(id: &str, pid: u32) -> ProcessMetrics {
    let timestamp = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    let status = i32::try_from(pid)
        .map_err(|_| procfs::ProcError::NotFound(None))
        .and_then(procfs::process::Process::new)
        .and_then(|p| p.status());
    match status {
        Ok(s) => ProcessMetrics {
            pid,
            id: id.into(),
            vmrss: s.vmrss,
            vmsize: s.vmsize,
            threads: Some(s.threads),
            state: s.state.chars().next().map(String::from).unwrap_or_default(),
            timestamp,
        },
        Err(e) => {
            let state = match e {
                procfs::ProcError::NotFound(_) => "exited".to_string(),
                other => {
                    tracing::warn!(process = id, pid, error = %other, "cannot read /proc status");
                    "unknown".to_string()
                }
            };
            ProcessMetrics {
                pid,
                id: id.into(),
                vmrss: None,
                vmsize: None,
                threads: None,
                state,
                timestamp,
            }
        }
    }
}

/// A watched process.
struct Watched {
    pid: u32,
    /// `recycle.max_rss_kb` (0: none).
    max_rss_kb: u64,
    /// This pid was reported as due already.
    reported: bool,
}

/// The Sysmon actor.
pub struct Sysmon {
    interval: Option<Duration>,
    metrics: Addr<MetricsStore>,
    watched: BTreeMap<String, Watched>,
    /// Where workers over their `max_rss_kb` are reported (the Broker).
    recycler: Option<Recipient<RecycleDue>>,
    /// Started since the last sample: sampled once soon, so stats show a
    /// new child's memory without waiting a whole interval.
    fresh: Vec<(String, u32)>,
}

/// How long after a child starts its first sample is taken (it has loaded
/// by then; at once it would show the forked broker's pages).
const FIRST_SAMPLE_AFTER: Duration = Duration::from_secs(1);

impl Sysmon {
    /// Samples every `interval` (`None`: only on [`SampleNow`]).
    pub fn new(interval: Option<Duration>, metrics: Addr<MetricsStore>) -> Self {
        Self {
            interval,
            metrics,
            watched: BTreeMap::new(),
            recycler: None,
            fresh: Vec::new(),
        }
    }

    fn sample_all(&mut self) -> Vec<ProcessMetrics> {
        let mut samples = Vec::with_capacity(self.watched.len() + 1);
        samples.push(sample(BROKER, std::process::id()));
        samples.extend(self.watched.iter().map(|(id, w)| sample(id, w.pid)));
        self.check_rss(&samples);
        self.metrics.do_send(SubmitMetrics(samples.clone()));
        samples
    }

    /// Reports each worker whose sample reached its `max_rss_kb` (once per
    /// pid).
    fn check_rss(&mut self, samples: &[ProcessMetrics]) {
        let Some(recycler) = &self.recycler else {
            return;
        };
        for s in samples {
            let Some(w) = self.watched.get_mut(&s.id) else {
                continue;
            };
            if w.pid == s.pid && !w.reported && rss_reached(w.max_rss_kb, s.vmrss) {
                w.reported = true;
                tracing::debug!(process = %s.id, vmrss_kb = s.vmrss, max_rss_kb = w.max_rss_kb,
                    "resident memory reached recycle.max_rss_kb");
                recycler.do_send(RecycleDue {
                    id: s.id.as_str().into(),
                    reason: RecycleReason::MaxRss,
                });
            }
        }
    }
}

/// A sample of `vmrss` kB reaches a limit of `max_rss_kb` (0: no limit; a
/// sample without a figure, of a process gone or a zombie, reaches none).
pub fn rss_reached(max_rss_kb: u64, vmrss: Option<u64>) -> bool {
    max_rss_kb > 0 && vmrss.is_some_and(|kb| kb >= max_rss_kb)
}

impl Actor for Sysmon {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(interval) = self.interval.filter(|d| !d.is_zero()) {
            // One sample at start, so stats have the broker's figures at once.
            self.sample_all();
            ctx.run_interval(interval, |sysmon, _| {
                sysmon.sample_all();
            });
        }
    }
}

impl Handler<Watch> for Sysmon {
    type Result = ();

    fn handle(&mut self, msg: Watch, ctx: &mut Self::Context) {
        self.watched.insert(
            msg.id.clone(),
            Watched {
                pid: msg.pid,
                max_rss_kb: msg.max_rss_kb,
                reported: false,
            },
        );
        let Some(interval) = self.interval.filter(|d| !d.is_zero()) else {
            return;
        };
        if self.fresh.is_empty() {
            // One timer for everything started meanwhile (a service of 1000
            // workers is one sample pass, not 1000 timers).
            ctx.run_later(FIRST_SAMPLE_AFTER.min(interval), |sysmon, _| {
                let fresh = std::mem::take(&mut sysmon.fresh);
                let samples: Vec<ProcessMetrics> = fresh
                    .iter()
                    .filter(|(id, pid)| sysmon.watched.get(id).is_some_and(|w| w.pid == *pid))
                    .map(|(id, pid)| sample(id, *pid))
                    .collect();
                sysmon.check_rss(&samples);
                if !samples.is_empty() {
                    sysmon.metrics.do_send(SubmitMetrics(samples));
                }
            });
        }
        self.fresh.push((msg.id, msg.pid));
    }
}

impl Handler<Unwatch> for Sysmon {
    type Result = ();

    fn handle(&mut self, msg: Unwatch, _: &mut Self::Context) {
        self.watched.remove(&msg.id);
    }
}

impl Handler<SetRecycler> for Sysmon {
    type Result = ();

    fn handle(&mut self, SetRecycler(recycler): SetRecycler, _: &mut Self::Context) {
        self.recycler = Some(recycler);
    }
}

impl Handler<SampleNow> for Sysmon {
    type Result = MessageResult<SampleNow>;

    fn handle(&mut self, _: SampleNow, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.sample_all())
    }
}

#[cfg(test)]
mod tests {
    use super::rss_reached;

    #[test]
    fn a_limit_is_reached_at_or_above_it_and_never_without_a_figure() {
        assert!(rss_reached(1024, Some(1024)));
        assert!(rss_reached(1024, Some(5000)));
        assert!(!rss_reached(1024, Some(1023)));
        assert!(!rss_reached(1024, None));
        assert!(!rss_reached(0, Some(u64::MAX)));
    }
}
