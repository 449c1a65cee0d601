//! The round-trip load generator: the peers and the driver
//! shared by `benches/relay.rs` and `procbroker bench`. Behind the `loadgen`
//! feature (on by default, and needed by the binary), so an embedder who
//! turns default features off does not compile the blocking raw relays.
//!
//! - [`client`]: a service whose `Run` method makes N calls to a target with C
//!   in flight and reports how long they took: the client subprocess of the
//!   relay topology (client → broker → echo → broker → client).
//! - [`raw`]: the raw limit of the same topology: the same three processes
//!   and pipes, blocking reads and writes of length-prefixed frames, no
//!   actors, no MessagePack.
//! - `nats` (with the `cluster` feature): the raw limit of the cluster
//!   topology, plain NATS request/reply between two processes.

pub mod client;
#[cfg(feature = "cluster")]
pub mod nats;
pub mod raw;

use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};

use crate::call::CallError;
use std::rc::Rc;
use std::time::Instant;

/// What to run: `calls` requests of `payload_bytes` to `target`, with
/// `concurrency` in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Service (or process) to call.
    pub target: String,
    /// Method to call.
    pub method: String,
    /// Number of calls.
    pub calls: u64,
    /// Calls in flight at once.
    pub concurrency: u64,
    /// Payload size (a binary string of this many bytes).
    pub payload_bytes: u64,
}

/// How a run went, as the client measured it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunReport {
    /// Calls answered with a response.
    pub ok: u64,
    /// Calls answered with an error.
    pub errors: u64,
    /// Wall time from the first request to the last reply, in nanoseconds.
    pub elapsed_ns: u64,
    /// Latency quantiles of the calls answered with a response, in
    /// nanoseconds (an error's latency says how fast it failed, not how
    /// fast a call is).
    pub latency_ns: Quantiles,
    /// The failed calls by error code, so that a run with errors says why.
    #[serde(default)]
    pub error_codes: Vec<ErrorCount>,
}

/// Failed calls with one error code.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCount {
    /// The reply's error code, or what went wrong where no reply came
    /// (`no_reply`, `closed`, …).
    pub code: String,
    /// Calls that failed so.
    pub count: u64,
    /// The message of the first of them.
    pub message: String,
}

/// Why one call of a run failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Error code (see [`ErrorCount::code`]).
    pub code: String,
    /// What the error said.
    pub message: String,
}

impl Failure {
    /// A failure of `code` saying `message`.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl From<CallError> for Failure {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Remote { code, message, .. } => Self { code, message },
            CallError::NoReply(_) => Self::new("no_reply", e.to_string()),
            CallError::Payload(_) => Self::new("payload", e.to_string()),
            CallError::Closed => Self::new("closed", e.to_string()),
        }
    }
}

/// Distinct error codes a report keeps; the rest count under `other`, so a
/// callee inventing codes cannot grow the report without bound.
const MAX_ERROR_CODES: usize = 16;

impl RunReport {
    /// Counts one failed call.
    pub fn count_error(&mut self, failure: Failure) {
        self.errors += 1;
        let known = self.error_codes.iter().position(|c| c.code == failure.code);
        let slot = match known {
            Some(i) => i,
            None if self.error_codes.len() < MAX_ERROR_CODES - 1 => {
                self.error_codes.push(ErrorCount {
                    code: failure.code,
                    count: 0,
                    message: failure.message,
                });
                self.error_codes.len() - 1
            }
            None => match self.error_codes.iter().position(|c| c.code == "other") {
                Some(i) => i,
                None => {
                    self.error_codes.push(ErrorCount {
                        code: "other".into(),
                        count: 0,
                        message: failure.message,
                    });
                    self.error_codes.len() - 1
                }
            },
        };
        self.error_codes[slot].count += 1;
    }
}

/// Latency quantiles in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quantiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl Quantiles {
    /// The quantiles of a nanosecond histogram.
    pub fn of(h: &hdrhistogram::Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// A nanosecond histogram, 100 ns … 60 s, 3 significant digits.
pub fn ns_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(100, 60_000_000_000, 3)
        .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid"))
}

/// The CPUs this process may run on (`Cpus_allowed_list` of
/// `/proc/self/status`), printed with every latency result: placement
/// decides pipe latency here.
pub fn cpus_allowed() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into())
}

/// Makes `calls` calls with `concurrency` in flight, each by `call()`,
/// timing those answered with a response and counting the others by error
/// code. Runs its lanes as local tasks of the current thread (an actix
/// arbiter or a `LocalSet`).
pub async fn drive<F, Fut>(calls: u64, concurrency: u64, call: F) -> RunReport
where
    F: Fn() -> Fut + 'static,
    Fut: Future<Output = Result<(), Failure>> + 'static,
{
    let call = Rc::new(call);
    let issued = Rc::new(Cell::new(0u64));
    let report = Rc::new(RefCell::new((RunReport::default(), ns_histogram())));
    let start = Instant::now();
    let lanes: Vec<_> = (0..concurrency.clamp(1, calls.max(1)))
        .map(|_| {
            let (call, issued, report) = (Rc::clone(&call), Rc::clone(&issued), Rc::clone(&report));
            tokio::task::spawn_local(async move {
                while issued.get() < calls {
                    issued.set(issued.get() + 1);
                    let sent = Instant::now();
                    let answer = call().await;
                    let ns = u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    let mut report = report.borrow_mut();
                    match answer {
                        Ok(()) => {
                            report.0.ok += 1;
                            report.1.saturating_record(ns);
                        }
                        Err(failure) => report.0.count_error(failure),
                    }
                }
            })
        })
        .collect();
    for lane in lanes {
        // A lane ends only when the calls are made (or `call` panicked, and
        // its calls then count as neither ok nor errors).
        let _ = lane.await;
    }
    let elapsed_ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let (report, histogram) = &*report.borrow();
    RunReport {
        elapsed_ns,
        latency_ns: Quantiles::of(histogram),
        ..report.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn latency_is_of_answered_calls_and_failures_are_counted_by_code() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let n = Rc::new(Cell::new(0u64));
        let report = tokio::task::LocalSet::new().block_on(
            &rt,
            drive(10, 1, move || {
                let i = n.get();
                n.set(i + 1);
                async move {
                    if i.is_multiple_of(2) {
                        return Ok(());
                    }
                    // Failures are slow here: none of it may show as latency.
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    Err(Failure::new("busy", format!("full {i}")))
                }
            }),
        );
        assert_eq!((report.ok, report.errors), (5, 5));
        assert_eq!(
            report.error_codes,
            [ErrorCount {
                code: "busy".into(),
                count: 5,
                message: "full 1".into()
            }]
        );
        assert!(report.latency_ns.max < 30_000_000, "{report:?}");
    }

    #[test]
    fn error_codes_past_the_limit_count_as_other() {
        let mut report = RunReport::default();
        for i in 0..40 {
            report.count_error(Failure::new(format!("code{i}"), "x"));
        }
        assert_eq!(report.errors, 40);
        assert_eq!(report.error_codes.len(), MAX_ERROR_CODES);
        let other = report.error_codes.last().expect("other");
        assert_eq!((other.code.as_str(), other.count), ("other", 25));
    }
}
