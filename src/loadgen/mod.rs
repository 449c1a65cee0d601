//! The round-trip load generator (DESIGN 7.1): the peers and the driver
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
    /// Per-call latency quantiles, in nanoseconds.
    pub latency_ns: Quantiles,
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
/// decides pipe latency here (DESIGN 8.1).
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

/// Makes `calls` calls with `concurrency` in flight, each by `call()` (true
/// when answered with a response), timing each one. Runs its lanes as local
/// tasks of the current thread (an actix arbiter or a `LocalSet`).
pub async fn drive<F, Fut>(calls: u64, concurrency: u64, call: F) -> RunReport
where
    F: Fn() -> Fut + 'static,
    Fut: Future<Output = bool> + 'static,
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
                    let ok = call().await;
                    let ns = u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    let mut report = report.borrow_mut();
                    report.1.saturating_record(ns);
                    if ok {
                        report.0.ok += 1;
                    } else {
                        report.0.errors += 1;
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
