//! Relay benchmark: a client subprocess → broker → echo
//! subprocess → broker → client, against the raw limit of the same topology
//! measured in the same run.
//!
//! - `relay/sequential_64b`, `relay/pipelined64_64b`: procbroker. The client
//!   is `procbroker worker bench-client` (Rust SDK), the echo `procbroker
//!   worker echo`; the broker is this process (Router, two bridges).
//! - `relay/raw_baseline_sequential_64b`, `relay/raw_baseline_pipelined64_64b`:
//!   the same three processes and pipes, blocking length-prefixed frames
//!   relayed by two threads, no actors, no MessagePack.
//!
//! Criterion's time is per call (the client times its calls; process start-up
//! is not in it). After the criterion groups a summary prints p50/p99 of each
//! path from the client's own histograms and the ratios to the baseline.
//!
//! Placement decides pipe latency here, so the CPUs this ran on
//! are printed; run it both ways:
//!   cargo bench --bench relay                  # wherever the kernel puts it
//!   taskset -c 0 cargo bench --bench relay     # every process on one CPU

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use procbroker::config::ServiceConfig;
use procbroker::embed::{BrokerHandle, ProcBroker};
use procbroker::loadgen::raw::RawRelay;
use procbroker::loadgen::{RunReport, RunSpec, cpus_allowed};
use std::path::Path;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_procbroker");
const PAYLOAD: u64 = 64;

struct Relay {
    system: actix::SystemRunner,
    broker: BrokerHandle,
}

impl Relay {
    fn start() -> Self {
        let system = actix::System::new();
        let broker = system.block_on(async {
            let broker = ProcBroker::builder().sysmon_interval(None).start();
            for (name, worker) in [("echo", "echo"), ("client", "bench-client")] {
                broker
                    .spawn(ServiceConfig::new(name, BIN).args(["worker", worker]))
                    .await
                    .expect("spawn");
            }
            broker
        });
        Self { system, broker }
    }

    fn run(&self, calls: u64, concurrency: u64) -> RunReport {
        let spec = RunSpec {
            target: "echo".into(),
            method: "Echo".into(),
            calls,
            concurrency,
            payload_bytes: PAYLOAD,
        };
        let request = procbroker::protocol::Envelope::request("client", "Run", 0)
            .with_payload(&spec)
            .expect("spec")
            .with_timeout_ms(600_000);
        let report: RunReport = self
            .system
            .block_on(self.broker.call_envelope(request))
            .expect("run")
            .payload_as()
            .expect("report");
        assert_eq!(report.errors, 0, "{report:?}");
        report
    }
}

/// The time `iters` calls took, from a run of `n >= iters` calls (a
/// pipelined run needs at least as many calls as it keeps in flight).
fn time_of(report: &RunReport, n: u64, iters: u64) -> Duration {
    let ns = u128::from(report.elapsed_ns) * u128::from(iters) / u128::from(n.max(1));
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

fn relay(c: &mut Criterion) {
    eprintln!("relay: processes may run on CPUs {}", cpus_allowed());
    let broker = Relay::start();
    let mut raw = RawRelay::start(Path::new(BIN)).expect("raw relay");
    let mut group = c.benchmark_group("relay");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    for (name, concurrency) in [("sequential_64b", 1), ("pipelined64_64b", 64)] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let n = iters.max(concurrency);
                time_of(&broker.run(n, concurrency), n, iters)
            })
        });
        group.bench_function(format!("raw_baseline_{name}"), |b| {
            b.iter_custom(|iters| {
                let n = iters.max(concurrency);
                let report = raw.run(n, concurrency, PAYLOAD).expect("raw run");
                assert_eq!(report.ok, n);
                time_of(&report, n, iters)
            })
        });
    }
    group.finish();
    summary(&broker, &mut raw);
}

/// p50/p99 and throughput of each path from one long run each, with ratios.
fn summary(broker: &Relay, raw: &mut RawRelay) {
    eprintln!(
        "\nrelay summary (client-measured, 64 B payload, CPUs {}):",
        cpus_allowed()
    );
    eprintln!(
        "{:<26} {:>12} {:>10} {:>10} {:>12}",
        "path", "calls", "p50 µs", "p99 µs", "calls/s"
    );
    for (label, concurrency, calls) in [("sequential", 1, 20_000u64), ("pipelined 64", 64, 200_000)]
    {
        let b = broker.run(calls, concurrency);
        let r = raw.run(calls, concurrency, PAYLOAD).expect("raw");
        let rate = |x: &RunReport| x.ok as f64 / (x.elapsed_ns as f64 / 1e9);
        for (who, x) in [("procbroker", &b), ("raw baseline", &r)] {
            eprintln!(
                "{:<26} {:>12} {:>10.1} {:>10.1} {:>12.0}",
                format!("{label}: {who}"),
                x.ok,
                x.latency_ns.p50 as f64 / 1e3,
                x.latency_ns.p99 as f64 / 1e3,
                rate(x)
            );
        }
        eprintln!(
            "{:<26} p50 ratio {:.2}x, throughput ratio {:.2}x",
            format!("{label}: procbroker/raw"),
            b.latency_ns.p50 as f64 / r.latency_ns.p50.max(1) as f64,
            rate(&b) / rate(&r)
        );
    }
}

criterion_group!(benches, relay);
criterion_main!(benches);
