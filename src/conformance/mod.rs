//! The conformance kit: checks that a service SDK does everything a
//! service must, by running the SDK's *subject* (a small service written
//! with it, whose methods PROTOCOL.md lists) under a broker and on its own.
//!
//! [`run`] starts a broker on an embedded configuration with the subject
//! as service `subject` (`workers` workers) and an in-process service
//! `kit` of its own (the callee of the subject's calls out and the target
//! of its events), and runs the checks that go through the broker with
//! the embedding API as its client. Then it runs two more copies of the
//! subject directly, the kit playing the broker on their pipes, for what
//! a broker cannot show: a `shutdown` from another source, the drain at
//! `shutdown`, EOF, and the raw bytes of stdout. Every check gives a
//! one-line verdict ([`Report`]); every wait has a deadline, so a subject
//! that never answers fails checks, it does not hang the kit.
//!
//! State is per process (a `Sleep` counts in `Active` of the process that
//! runs it), so the checks address process ids where it matters.
//!
//! `procbroker conformance [--workers N] [--json] -- CMD ARGS…` runs it.

mod basics;
mod calls;
mod corpus;
mod direct;
mod direct_checks;
mod frames_only;
mod kit_service;
mod lifecycle;
mod load;
mod probe;
mod report;
mod same_value;

pub use probe::SERVICE;
pub use report::{CheckResult, Report, Verdict};

use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::config::{BrokerConfig, ServiceConfig};
use crate::embed::ProcBroker;
use crate::names;
use crate::protocol::rpc::{ProcessStatus, RestartPolicy};
use probe::Probe;

/// Every check, in the order run and reported.
pub const CHECKS: [&str; 29] = [
    "handshake",
    "ping",
    "who-am-i",
    "payload-types",
    "payload-noncanonical",
    "payload-none",
    "payload-8mib",
    "concurrency",
    "deadline",
    "timeout-cancel-seen",
    "timeout-cancel-stops",
    "caller-cancel",
    "stream",
    "stream-final-only",
    "errors",
    "unknown-method",
    "calls-out",
    "calls-out-errors",
    "calls-out-cancel",
    "events-in",
    "events-out",
    "pipelined",
    "stays-up",
    "correlation-ids",
    "deadline-absent",
    "shutdown-source",
    "drain",
    "exit-at-eof",
    "stdout-frames-only",
];

/// The checks through the broker that need a ready subject (all of them
/// but `handshake`, and `stays-up`, which reads the stats).
const NEED_READY: usize = 21;

/// How long one check through the broker may take before it fails.
const CHECK_LIMIT: Duration = Duration::from_secs(20);

/// What to check.
#[derive(Debug, Clone)]
pub struct Options {
    /// The subject's program (`@self`: this binary).
    pub command: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Workers of the subject under the broker (at least 1).
    pub workers: u32,
}

/// Runs every check against the subject and reports. Blocks; starts an
/// actix System of its own for the broker (so call it outside one).
pub fn run(options: &Options) -> Report {
    let workers = options.workers.max(1);
    let ids: Vec<String> = (0..workers)
        .map(|i| names::process_id(SERVICE, i))
        .collect();
    let options_here = options.clone();
    let ids_here = ids.clone();
    let (mut results, bad_frames) = actix::System::new().block_on(async move {
        let outcome = actix::spawn(under_broker(options_here, ids_here)).await;
        actix::System::current().stop();
        outcome.unwrap_or_else(|e| {
            let why = format!("the kit's broker phase ended early: {e}");
            let results = CHECKS[..=NEED_READY + 1]
                .iter()
                .map(|&name| CheckResult::new(name, Err(why.clone()), Duration::ZERO))
                .collect();
            (results, Vec::new())
        })
    });
    let first = names::process_id(SERVICE, workers);
    let second = names::process_id(SERVICE, workers + 1);
    let (direct, stdouts) = direct_checks::run(&options.command, &options.args, &first, &second);
    results.extend(direct);
    let started = Instant::now();
    let verdict = direct_checks::frames_only(&stdouts, &bad_frames);
    results.push(CheckResult::new(
        "stdout-frames-only",
        verdict,
        started.elapsed(),
    ));
    let mut subject = vec![options.command.clone()];
    subject.extend(options.args.iter().cloned());
    Report::new(subject, workers, results)
}

/// The broker's settings for the run: room for the pipelined check's
/// 20 000 requests on one worker, short stop timeouts, no sampling.
fn broker_config() -> BrokerConfig {
    BrokerConfig {
        queue_capacity: 25_000,
        sysmon_interval: None,
        kill_timeout: Duration::from_secs(2),
        drain_timeout: Duration::from_secs(2),
        ..BrokerConfig::default()
    }
}

/// The subject as a service: restarted quickly after a crash (which
/// `stays-up` reports), so one crash does not fail every later check.
fn subject_service(options: &Options, workers: u32) -> ServiceConfig {
    ServiceConfig::new(SERVICE, options.command.clone())
        .args(options.args.clone())
        .workers(workers)
        .ready_timeout(Duration::from_secs(10))
        .restart(RestartPolicy {
            max_restarts: 5,
            backoff_initial_ms: 50,
            backoff_max_ms: 200,
            window_ms: 0,
        })
}

/// Runs `check` with a time limit.
async fn timed(name: &'static str, check: impl Future<Output = Verdict>) -> CheckResult {
    let started = Instant::now();
    let verdict = actix::clock::timeout(CHECK_LIMIT, check)
        .await
        .unwrap_or_else(|_| Err(format!("no verdict within {} s", CHECK_LIMIT.as_secs())));
    CheckResult::new(name, verdict, started.elapsed())
}

/// The checks through the broker, and each worker's bad frames.
async fn under_broker(
    options: Options,
    ids: Vec<String>,
) -> (Vec<CheckResult>, Vec<(String, u64)>) {
    let broker = ProcBroker::builder().config(broker_config()).start();
    let seen = Rc::new(kit_service::Seen::default());
    let mut results = Vec::new();
    if let Err(e) = broker
        .add_service(kit_service::KIT, 1, kit_service::methods(&seen))
        .await
    {
        let why = format!("the kit's own service did not start: {e}");
        for &name in &CHECKS[..=NEED_READY + 1] {
            results.push(CheckResult::new(name, Err(why.clone()), Duration::ZERO));
        }
        return (results, Vec::new());
    }
    let started = Instant::now();
    let spawned = broker
        .spawn(subject_service(&options, ids.len() as u32))
        .await;
    let handshake = handshake(spawned, started.elapsed());
    let ready = handshake.is_ok();
    results.push(CheckResult::new("handshake", handshake, started.elapsed()));
    let probe = Probe {
        broker: broker.clone(),
        seen,
        ids: Rc::new(ids.clone()),
    };
    if ready {
        results.extend(through_broker(&probe).await);
    } else {
        let why = "not run: the subject's workers did not all become ready".to_owned();
        for &name in &CHECKS[1..=NEED_READY] {
            results.push(CheckResult::new(name, Err(why.clone()), Duration::ZERO));
        }
    }
    let started = Instant::now();
    let (stays_up, bad_frames) = match broker.stats().await {
        Ok(stats) => {
            let bad = ids
                .iter()
                .map(|id| {
                    let n = stats.per_process.get(id).map_or(0, |p| p.faults.bad_frames);
                    (id.clone(), n)
                })
                .collect();
            (load::stays_up(&stats, &ids), bad)
        }
        Err(e) => (Err(format!("stats: {e}")), Vec::new()),
    };
    results.push(CheckResult::new("stays-up", stays_up, started.elapsed()));
    // The subject's workers get `shutdown`, EOF, then signals.
    let _ = broker.shutdown().await;
    (results, bad_frames)
}

/// `handshake`: every worker became ready.
fn handshake(
    spawned: Result<Vec<crate::protocol::rpc::SpawnedProcess>, crate::actors::broker::SpawnError>,
    took: Duration,
) -> Verdict {
    let spawned = spawned.map_err(|e| format!("the subject could not be started: {e}"))?;
    if let Some(p) = spawned.iter().find(|p| p.status != ProcessStatus::Ready) {
        return Err(format!(
            "{} is {}: {}",
            p.id,
            p.status,
            p.error.as_deref().unwrap_or("not ready")
        ));
    }
    let ids: Vec<&str> = spawned.iter().map(|p| p.id.as_str()).collect();
    Ok(format!(
        "{} sent ready, {} after start",
        ids.join(", "),
        probe::ms(took)
    ))
}

/// Every check through the broker after the handshake, in order.
async fn through_broker(probe: &Probe) -> Vec<CheckResult> {
    let mut results = vec![
        timed("ping", basics::ping(probe)).await,
        timed("who-am-i", basics::who_am_i(probe)).await,
        timed("payload-types", basics::payload_types(probe)).await,
        timed("payload-noncanonical", basics::payload_noncanonical(probe)).await,
        timed("payload-none", basics::payload_none(probe)).await,
        timed("payload-8mib", basics::payload_8mib(probe)).await,
        timed("concurrency", lifecycle::concurrency(probe)).await,
        timed("deadline", lifecycle::deadline(probe)).await,
    ];
    let started = Instant::now();
    let (seen, stops) = actix::clock::timeout(CHECK_LIMIT, lifecycle::timeout_cancel(probe))
        .await
        .unwrap_or_else(|_| {
            let why = format!("no verdict within {} s", CHECK_LIMIT.as_secs());
            (Err(why.clone()), Err(why))
        });
    results.push(CheckResult::new(
        "timeout-cancel-seen",
        seen,
        started.elapsed(),
    ));
    results.push(CheckResult::new(
        "timeout-cancel-stops",
        stops,
        started.elapsed(),
    ));
    results.extend([
        timed("caller-cancel", lifecycle::caller_cancel(probe)).await,
        timed("stream", lifecycle::stream(probe)).await,
        timed("stream-final-only", lifecycle::stream_final_only(probe)).await,
        timed("errors", basics::errors(probe)).await,
        timed("unknown-method", basics::unknown_method(probe)).await,
        timed("calls-out", calls::calls_out(probe)).await,
        timed("calls-out-errors", calls::calls_out_errors(probe)).await,
        timed("calls-out-cancel", calls::calls_out_cancel(probe)).await,
        timed("events-in", calls::events_in(probe)).await,
        timed("events-out", calls::events_out(probe)).await,
        timed("pipelined", load::pipelined(probe)).await,
    ]);
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_is_reported_in_order_even_when_the_subject_cannot_run() {
        let report = run(&Options {
            command: "/nonexistent/subject".into(),
            args: Vec::new(),
            workers: 2,
        });
        let names: Vec<&str> = report.checks.iter().map(|c| c.name).collect();
        assert_eq!(names, CHECKS);
        assert_eq!(report.passed, 0, "{:#?}", report.checks);
        assert!(
            report.checks[0].detail.contains("could not be started")
                || report.checks[0].detail.contains("subject.0"),
            "{}",
            report.checks[0].detail
        );
    }

    #[test]
    fn protocol_md_lists_every_check() {
        let protocol = include_str!("../../PROTOCOL.md");
        for name in CHECKS {
            assert!(
                protocol.contains(&format!("`{name}`")),
                "PROTOCOL.md does not list the check `{name}`"
            );
        }
    }
}
