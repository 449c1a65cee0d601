//! `procbroker bench`: round trips through the broker, and with
//! `--baseline` the raw limit of the same topology in the same invocation.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use bytestring::ByteString;
use procbroker::config::{ClusterConfig, ServiceConfig};
use procbroker::embed::{BrokerHandle, ProcBroker};
use procbroker::loadgen::raw::{self, RawRelay};
use procbroker::loadgen::{Failure, RunReport, RunSpec, cpus_allowed, drive};
use procbroker::protocol::{Envelope, Payload};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cpu::{CpuMeter, CpuPerCall, Roles};
use crate::interrupt::Interrupt;

/// What to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Client subprocess → broker → echo subprocess → broker → client.
    Relay,
    /// The broker's own client → Router → echo subprocess (one pipe hop).
    Direct,
    /// In-process echo handlers behind the Router (no pipes).
    Inproc,
    /// Client subprocess → broker A → NATS → broker B → echo subprocess on
    /// B, and back (needs `--nats-url`). Both brokers are
    /// started by the bench: A is this process, B a `procbroker run`.
    Cluster,
    /// Cancel latency: a client subprocess makes calls with a deadline of
    /// `--timeout-ms` to a worker that holds each until the broker cancels
    /// it; the worker times each cancel from the caller's deadline.
    Cancel,
}

/// The echo service's workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Worker {
    /// The built-in echo (Rust SDK, length-prefixed envelopes).
    Echo,
    /// The built-in MessagePack-RPC echo (`protocol = "msgpack-rpc"`).
    RpcEcho,
    /// Real `nvim --clean --embed --headless`, called with `nvim_eval("1")`
    /// (direct mode); `--baseline` is a Python client calling neovim
    /// directly, the same calls without the broker.
    Nvim,
}

/// CPU placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Pin {
    /// Wherever the kernel puts the processes.
    None,
    /// Every process of the run on CPU 0 (comparable runs).
    Same,
    /// The broker on CPU 0, the children on the other CPUs.
    Spread,
}

/// The command's arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Topology.
    #[arg(long, value_enum, default_value = "relay")]
    pub mode: Mode,
    /// Echo workers.
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    /// Requests in flight.
    #[arg(long, default_value_t = 1)]
    pub concurrency: u64,
    /// Requests in total.
    #[arg(long, default_value_t = 20_000)]
    pub requests: u64,
    /// Payload size in bytes (a MessagePack bin; the raw baseline sends the
    /// same number of bytes, at least 8).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: u64,
    /// Also run the raw limit of the same topology and print the ratio.
    #[arg(long)]
    pub baseline: bool,
    /// Print one JSON object (docs/benchmarking.md lists its fields) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// CPU placement.
    #[arg(long, value_enum, default_value = "none")]
    pub pin: Pin,
    /// What serves the calls (relay and direct modes).
    #[arg(long, value_enum, default_value = "echo")]
    pub worker: Worker,
    /// The NATS server of `--mode cluster` (e.g. nats://127.0.0.1:4222).
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Relay mode: each call asks a worker for N partial replies of
    /// `--payload-bytes` (a stream); the same invocation also runs the
    /// pipelined relay (64 in flight, as many frames) and prints partial
    /// replies per second against its frames per second.
    #[arg(long, value_name = "N")]
    pub stream: Option<u64>,
    /// Relay mode: runs the calls twice in one invocation, round-robin and
    /// then each carrying one of K keys (keyed routing), and prints the
    /// CPU per call of both.
    #[arg(long, value_name = "K")]
    pub key_spread: Option<u64>,
    /// Cancel mode: each call's deadline, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub timeout_ms: u64,
    /// Relay mode: serve the calls with this program (a command line,
    /// split as a shell would, not run by one) as the echo workers: it must
    /// do the `ready` handshake and answer `Echo` with the payload. The
    /// same invocation runs the built-in Rust echo first; each program's
    /// row follows, with its workers' CPU per call. Repeatable.
    #[arg(long = "worker-cmd", value_name = "CMD")]
    pub worker_cmd: Vec<String>,
}

fn set_cpus(pid: u32, cpus: &[usize]) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for &cpu in cpus {
        set.set(cpu)?;
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
    nix::sched::sched_setaffinity(pid, &set).with_context(|| format!("pinning pid {pid}"))?;
    Ok(())
}

/// The CPUs a process may run on, as the kernel says (`0` = this one).
pub(crate) fn cpus_of(pid: u32) -> Result<Vec<usize>> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
    let set = nix::sched::sched_getaffinity(pid).context("reading a CPU affinity")?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect())
}

pub(crate) fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Where the broker and its children go, decided from the CPUs this process
/// may use **before** it pins itself (after, it would see only its own CPU).
#[derive(Clone, Debug)]
pub(crate) struct Placement {
    pub(crate) pin: Pin,
    broker: Vec<usize>,
    children: Vec<usize>,
}

impl Placement {
    pub(crate) fn new(pin: Pin) -> Result<Self> {
        let allowed = cpus_of(0)?;
        let first = allowed.first().copied().unwrap_or(0);
        let (broker, children) = match pin {
            Pin::None => (allowed.clone(), allowed),
            Pin::Same => (vec![first], vec![first]),
            Pin::Spread if allowed.len() > 1 => (vec![first], allowed[1..].to_vec()),
            Pin::Spread => (vec![first], vec![first]),
        };
        Ok(Self {
            pin,
            broker,
            children,
        })
    }

    /// Pins this process (the broker).
    pub(crate) fn pin_self(&self) -> Result<()> {
        if self.pin != Pin::None {
            set_cpus(0, &self.broker)?;
        }
        Ok(())
    }

    /// Pins children as they start; remembers the mask the kernel reports
    /// for each, for `--json`.
    pub(crate) fn placer(
        &self,
    ) -> (
        impl Fn(u32) + use<>,
        std::rc::Rc<std::cell::RefCell<Vec<String>>>,
    ) {
        let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let record = std::rc::Rc::clone(&seen);
        let (pin, target) = (self.pin, self.children.clone());
        let place = move |pid| {
            if pin != Pin::None
                && let Err(e) = set_cpus(pid, &target)
            {
                tracing::warn!(error = %e, "placement not applied");
            }
            if let Ok(cpus) = cpus_of(pid) {
                record.borrow_mut().push(cpu_list(&cpus));
            }
        };
        (place, seen)
    }

    pub(crate) fn describe(&self) -> String {
        match self.pin {
            Pin::Spread if self.broker != self.children => format!(
                "broker {}, children {}",
                cpu_list(&self.broker),
                cpu_list(&self.children)
            ),
            Pin::None => cpus_allowed(),
            _ => cpu_list(&self.broker),
        }
    }
}

/// Prints progress on stderr every 2 s while a long run goes on: requests
/// answered so far (as the broker counts them), rate and time left. The task
/// ends with the System.
pub(crate) fn progress(broker: BrokerHandle, total: u64) {
    let started = Instant::now();
    actix::spawn(async move {
        loop {
            actix::clock::sleep(Duration::from_secs(2)).await;
            let done = measured(&broker).await.answered;
            let elapsed = started.elapsed().as_secs_f64();
            let rate = done as f64 / elapsed.max(f64::MIN_POSITIVE);
            let left = if rate > 0.0 {
                format!("{:.0} s left", total.saturating_sub(done) as f64 / rate)
            } else {
                "time left unknown".into()
            };
            eprintln!(
                "bench: {elapsed:.0} s, {done} of {total} requests ({:.1} %), {rate:.0}/s, {left}",
                100.0 * done as f64 / total.max(1) as f64
            );
        }
    });
}

/// Refuses counts of zero, whichever run the arguments ask for.
pub fn check(args: &BenchArgs) -> Result<()> {
    if args.requests == 0 || args.concurrency == 0 || args.workers == 0 {
        bail!("--requests, --concurrency and --workers must be at least 1");
    }
    Ok(())
}

/// Runs the single-phase benchmark and prints the result (the runs of
/// several phases in one invocation are `phases.rs`'s).
pub fn bench(args: BenchArgs) -> Result<()> {
    check(&args)?;
    match (args.mode, args.worker) {
        (Mode::Inproc, Worker::RpcEcho | Worker::Nvim) => {
            bail!("--worker rpc-echo and nvim are subprocesses: use --mode direct or relay")
        }
        (Mode::Relay | Mode::Cluster, Worker::Nvim) => {
            bail!("--worker nvim answers nvim_eval only: use --mode direct")
        }
        (Mode::Cluster, Worker::RpcEcho) => {
            bail!("--mode cluster runs the built-in echo worker on node b")
        }
        (Mode::Cluster, Worker::Echo) if args.nats_url.is_none() => {
            bail!("--mode cluster needs --nats-url (a running NATS server)")
        }
        (Mode::Cancel, _) => bail!("--mode cancel is measured by a plan of its own"),
        _ => {}
    }
    // Before any thread starts, so that every thread has the signals blocked.
    let interrupt = Interrupt::install().context("handling SIGINT and SIGTERM")?;
    let placement = Placement::new(args.pin)?;
    placement.pin_self()?;
    let exe = std::env::current_exe().context("locating this binary")?;
    let cpus = placement.describe();
    let broker_cpus = cpu_list(&cpus_of(0)?);
    let started = Instant::now();
    let outcome =
        crate::run::block_on_task(run(args.clone(), exe, placement, Arc::clone(&interrupt)))?;
    let (report, cpu, baseline, children_cpus) = match outcome {
        Outcome::Done {
            report,
            cpu,
            baseline,
            children_cpus,
        } => (report, cpu, baseline, children_cpus),
        Outcome::Interrupted { so_far } => {
            let signal = interrupt
                .signal()
                .unwrap_or(nix::sys::signal::Signal::SIGINT);
            interrupted(&args, signal, started.elapsed(), &so_far);
            // 128 + the signal's number, as a shell reports a killed command.
            std::process::exit(128 + signal as i32);
        }
    };
    let us = |ns: u64| ns as f64 / 1e3;
    let rate = |r: &RunReport| r.ok as f64 / (r.elapsed_ns.max(1) as f64 / 1e9);
    // Latency is of the calls answered with a response: none, none to show.
    let q = |r: &RunReport| {
        let q = &r.latency_ns;
        (r.ok > 0).then(|| json!({"p50": us(q.p50), "p90": us(q.p90), "p99": us(q.p99), "p999": us(q.p999), "max": us(q.max)}))
    };
    let codes = |r: &RunReport| {
        r.error_codes
            .iter()
            .map(|c| (c.code.clone(), json!(c.count)))
            .collect::<serde_json::Map<_, _>>()
    };
    let ratio = baseline
        .as_ref()
        .map(|(b, _)| report.latency_ns.p50 as f64 / b.latency_ns.p50.max(1) as f64);
    let pin = format!("{:?}", args.pin).to_lowercase();
    let mode = format!("{:?}", args.mode).to_lowercase();
    // The name `--worker` takes, from clap's own table.
    let worker = clap::ValueEnum::to_possible_value(&args.worker)
        .map_or_else(String::new, |v| v.get_name().to_owned());
    if args.json {
        let out = json!({
            "mode": mode,
            "worker": worker,
            "workers": args.workers,
            "concurrency": args.concurrency,
            "requests": args.requests,
            "payload_bytes": args.payload_bytes,
            "pin": pin,
            "cpus": cpus,
            "placement": {"broker": broker_cpus, "children": children_cpus},
            "elapsed_s": report.elapsed_ns as f64 / 1e9,
            "throughput_rps": rate(&report),
            "errors": report.errors,
            "error_codes": codes(&report),
            "latency_us": q(&report),
            "cpu_us_per_call": cpu.json(),
            "baseline": baseline.as_ref().map(|(b, bcpu)| json!({
                "throughput_rps": rate(b),
                "errors": b.errors,
                "error_codes": codes(b),
                "latency_us": q(b),
                "cpu_us_per_call": bcpu.json(),
            })),
            "ratio_p50": ratio,
        });
        println!("{out}");
        return failed(&report, baseline.as_ref().map(|(b, _)| b));
    }
    println!(
        "procbroker bench: {mode}, {} {worker} worker(s), {} in flight, {} requests of {} B, pin {pin} (CPUs {cpus})",
        args.workers, args.concurrency, args.requests, args.payload_bytes
    );
    println!(
        "\n{:<14} {:>12} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "", "requests/s", "elapsed s", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs", "errors"
    );
    let line = |name: &str, r: &RunReport| {
        let l = &r.latency_ns;
        let cell = |ns: u64| match r.ok {
            0 => "-".to_owned(),
            _ => format!("{:.1}", us(ns)),
        };
        println!(
            "{:<14} {:>12.0} {:>10.3} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
            name,
            rate(r),
            r.elapsed_ns as f64 / 1e9,
            cell(l.p50),
            cell(l.p90),
            cell(l.p99),
            cell(l.p999),
            cell(l.max),
            r.errors
        );
    };
    // With neovim the yardstick is a Python client calling it directly.
    let (anchor, short) = match args.worker {
        Worker::Nvim => ("python direct", "direct"),
        Worker::Echo | Worker::RpcEcho => ("raw baseline", "raw"),
    };
    line("procbroker", &report);
    if let Some((b, _)) = &baseline {
        line(anchor, b);
    }
    for (name, r) in
        std::iter::once(("procbroker", &report)).chain(baseline.as_ref().map(|(b, _)| (anchor, b)))
    {
        for c in &r.error_codes {
            println!("{name} errors: {} × {}: {}", c.count, c.code, c.message);
        }
    }
    println!("\nCPU µs per call: procbroker {}", cpu.describe());
    if let Some((b, bcpu)) = &baseline {
        println!("                 {anchor} {}", bcpu.describe());
        println!(
            "\nprocbroker / {short}: p50 {:.2}x, throughput {:.2}x",
            ratio.unwrap_or(0.0),
            rate(&report) / rate(b).max(f64::MIN_POSITIVE)
        );
    }
    failed(&report, baseline.as_ref().map(|(b, _)| b))
}

/// A run with failed calls is a failed command: its figures are not those
/// of the calls asked for. Says why (each error code, its count and first
/// message) in the error that sets the exit status.
fn failed(report: &RunReport, baseline: Option<&RunReport>) -> Result<()> {
    let runs = std::iter::once(("through the broker", report));
    let runs: Vec<_> = runs
        .chain(baseline.map(|b| ("of the baseline", b)))
        .collect();
    failed_runs(&runs)
}

/// [`failed`] for any runs, each named as in "3 of 10 calls {name} failed".
pub(crate) fn failed_runs(runs: &[(&str, &RunReport)]) -> Result<()> {
    let mut why = Vec::new();
    for &(name, r) in runs {
        if r.errors > 0 {
            let codes: Vec<String> = r
                .error_codes
                .iter()
                .map(|c| format!("{} × {}: {}", c.count, c.code, c.message))
                .collect();
            why.push(format!(
                "{} of {} calls {name} failed ({})",
                r.errors,
                r.ok + r.errors,
                codes.join("; ")
            ));
        }
    }
    if why.is_empty() {
        return Ok(());
    }
    bail!("{}", why.join("; "))
}

/// How a run ended.
enum Outcome {
    /// Every request was made.
    Done {
        report: RunReport,
        /// CPU µs per call of each process of the procbroker run.
        cpu: CpuPerCall,
        /// The raw limit, and its CPU per call.
        baseline: Option<(RunReport, CpuPerCall)>,
        /// The CPU mask of each child, as the kernel reports it.
        children_cpus: Vec<String>,
    },
    /// A signal came: what was measured so far.
    Interrupted { so_far: SoFar },
}

/// What an interrupted run had measured.
#[derive(Default)]
pub(crate) struct SoFar {
    /// The procbroker run, if it had finished (the baseline was running).
    report: Option<RunReport>,
    /// Requests to `echo` answered through the broker, and their latency
    /// as the broker observed it.
    answered: u64,
    latency_us: Option<procbroker::protocol::stats::LatencyQuantiles>,
}

/// Prints what an interrupted run measured (stdout, as a result would be).
pub(crate) fn interrupted(
    args: &BenchArgs,
    signal: nix::sys::signal::Signal,
    took: Duration,
    so_far: &SoFar,
) {
    let latency = so_far.latency_us.as_ref().map(|q| {
        json!({"count": q.count, "p50": q.p50, "p90": q.p90, "p99": q.p99, "p999": q.p999, "max": q.max})
    });
    let report = so_far.report.as_ref().map(|r| {
        json!({"requests": r.ok + r.errors, "errors": r.errors, "elapsed_s": r.elapsed_ns as f64 / 1e9})
    });
    if args.json {
        let out = json!({
            "interrupted": signal.as_str(),
            "elapsed_s": took.as_secs_f64(),
            "answered_through_broker": so_far.answered,
            "broker_latency_us": latency,
            "procbroker": report,
        });
        println!("{out}");
        return;
    }
    println!(
        "procbroker bench: interrupted by {} after {:.1} s; children stopped and reaped",
        signal.as_str(),
        took.as_secs_f64()
    );
    match &so_far.report {
        Some(r) => println!(
            "procbroker run complete ({} requests, {:.3} s); the raw baseline was cut short",
            r.ok + r.errors,
            r.elapsed_ns as f64 / 1e9
        ),
        None => match &so_far.latency_us {
            Some(q) => println!(
                "so far: {} requests answered through the broker; broker-observed p50 {} µs, p99 {} µs, max {} µs",
                so_far.answered, q.p50, q.p99, q.max
            ),
            None => println!(
                "so far: {} requests answered through the broker",
                so_far.answered
            ),
        },
    }
}

/// What the broker measured until now: its stats of the `echo` service,
/// or in a cluster run of node b (which serves `echo@b`).
pub(crate) async fn measured(broker: &BrokerHandle) -> SoFar {
    measured_of(broker, "echo").await
}

/// [`measured`] of the service `service`.
pub(crate) async fn measured_of(broker: &BrokerHandle, service: &str) -> SoFar {
    let Ok(stats) = broker.stats().await else {
        return SoFar::default();
    };
    let remote = stats
        .cluster
        .and_then(|c| c.nodes.get("b").map(|b| b.latency_us));
    let latency = stats.latency_us.get(service).cloned().or(remote);
    SoFar {
        report: None,
        answered: latency.as_ref().map_or(0, |q| q.count),
        latency_us: latency,
    }
}

/// The broker of a benchmark run, with room for `in_flight` frames queued
/// per process. A finished run has nothing in flight and an interrupted
/// one must not wait: no drain. Children exit at EOF; one run under a
/// profiler (callgrind writes its counts as it exits) needs a moment more
/// before SIGTERM. No `/proc` sampling: it is not what is measured.
pub(crate) fn bench_broker(in_flight: u64) -> procbroker::embed::Builder {
    let config = procbroker::config::BrokerConfig {
        drain_timeout: Duration::ZERO,
        kill_timeout: Duration::from_secs(4),
        ..procbroker::config::BrokerConfig::default()
    };
    ProcBroker::builder()
        .config(config)
        .sysmon_interval(None)
        .queue_capacity(usize::try_from(in_flight.max(1000)).unwrap_or(usize::MAX))
}

/// One run, and the baseline if asked; stops at once on SIGINT or SIGTERM.
async fn run(
    args: BenchArgs,
    exe: PathBuf,
    placement: Placement,
    interrupt: Arc<Interrupt>,
) -> Result<Outcome> {
    let (place, placed) = placement.placer();
    // Brokers of this run federate under a cluster name of their own.
    let cluster_name = format!("bench{}", std::process::id());
    let mut builder = bench_broker(args.concurrency);
    if let (Mode::Cluster, Some(url)) = (args.mode, &args.nats_url) {
        builder = builder.cluster(ClusterConfig {
            name: cluster_name.clone(),
            heartbeat_ms: NODE_HEARTBEAT_MS,
            ..ClusterConfig::nats(url.clone(), "a")
        });
    }
    let broker = builder.start();
    // Silent for short runs: the first line comes after 2 s.
    progress(broker.clone(), args.requests);
    let work = async {
        // Set up (not measured): the workers, and the client process.
        let mut roles = Roles {
            broker: Some(std::process::id()),
            ..Roles::default()
        };
        let this = exe.display().to_string();
        let echo = match args.worker {
            Worker::Echo => ServiceConfig::new("echo", this).args(["worker", "echo"]),
            Worker::RpcEcho => ServiceConfig::new("echo", this)
                .args(["worker", "rpc-echo"])
                .msgpack_rpc(""),
            Worker::Nvim => ServiceConfig::new("echo", "nvim")
                .args(["--clean", "--embed", "--headless"])
                .msgpack_rpc("nvim_get_api_info"),
        }
        .workers(args.workers);
        // Node b of a cluster run, stopped when the run ends.
        let mut node_b = None;
        match args.mode {
            Mode::Inproc => {
                broker
                    .add_service("echo", args.workers, procbroker::workers::echo())
                    .await?;
            }
            Mode::Cluster => {
                let url = args.nats_url.clone().unwrap_or_default();
                let b = NodeB::start(&exe, &url, &cluster_name, args.workers, &placement)?;
                b.joined(&broker, args.workers).await?;
                roles.workers.push(b.pid());
                roles.workers.extend(children_of(b.pid()));
                node_b = Some(b);
            }
            Mode::Direct | Mode::Relay => {
                for pid in broker.spawn(echo).await?.into_iter().filter_map(|p| p.pid) {
                    place(pid);
                    roles.workers.push(pid);
                }
            }
            Mode::Cancel => bail!("--mode cancel is measured by a plan of its own"),
        }
        if matches!(args.mode, Mode::Relay | Mode::Cluster) {
            let client = ServiceConfig::new("client", exe.display().to_string())
                .args(["worker", "bench-client"]);
            for pid in broker
                .spawn(client)
                .await?
                .into_iter()
                .filter_map(|p| p.pid)
            {
                place(pid);
                roles.client = Some(pid);
            }
        }
        // The measured phase.
        let meter = CpuMeter::start(roles);
        let report = match args.mode {
            Mode::Inproc | Mode::Direct => lanes(&broker, &args).await?,
            Mode::Cancel => bail!("--mode cancel is measured by a plan of its own"),
            Mode::Relay | Mode::Cluster => {
                let target = match args.mode {
                    Mode::Cluster => "echo@b",
                    _ => "echo",
                };
                let spec = RunSpec {
                    target: target.into(),
                    method: "Echo".into(),
                    calls: args.requests,
                    concurrency: args.concurrency,
                    payload_bytes: args.payload_bytes,
                };
                let request = Envelope::request("client", "Run", 0)
                    .with_payload(&spec)?
                    .with_timeout_ms(24 * 3600 * 1000);
                broker.call_envelope(request).await?.payload_as()?
            }
        };
        let cpu = meter.stop(args.requests);
        if let Some(b) = node_b {
            b.stop().await;
        }
        Ok::<_, anyhow::Error>((report, cpu))
    };
    let measured_run = tokio::select! {
        run = work => run,
        () = interrupt.wake.notified() => Err(anyhow::anyhow!("interrupted")),
    };
    let (report, cpu) = match measured_run {
        Ok(run) => run,
        Err(_) if interrupt.signal().is_some() => {
            let so_far = measured(&broker).await;
            broker.shutdown().await;
            return Ok(Outcome::Interrupted { so_far });
        }
        Err(e) => {
            broker.shutdown().await;
            return Err(e);
        }
    };
    broker.shutdown().await;
    if !args.baseline {
        return Ok(Outcome::Done {
            report,
            cpu,
            baseline: None,
            children_cpus: placed.take(),
        });
    }
    // The raw peers block their threads: a signal kills them, which ends
    // their pipes and the run.
    let place_raw = |pid| {
        interrupt.kill_on_signal(pid);
        place(pid);
    };
    let me = std::process::id();
    let baseline = match args.mode {
        Mode::Direct if args.worker == Worker::Nvim => {
            let cpus = match placement.pin {
                Pin::None => "-".to_string(),
                _ => cpu_list(&placement.children),
            };
            nvim_direct(&args, &cpus)
        }
        Mode::Cancel => Err(std::io::Error::other("--mode cancel has no raw baseline")),
        Mode::Relay => RawRelay::start(&exe).and_then(|mut relay| {
            let [client, echo] = relay.pids();
            place_raw(client);
            place_raw(echo);
            let meter = CpuMeter::start(Roles {
                broker: Some(me),
                client: Some(client),
                workers: vec![echo],
            });
            let report = relay.run(args.requests, args.concurrency, args.payload_bytes)?;
            Ok((report, meter.stop(args.requests)))
        }),
        Mode::Direct => {
            // The raw client is threads of this process; its workers are
            // reaped inside the run, so only this process is measured.
            let meter = CpuMeter::start(Roles {
                broker: Some(me),
                ..Roles::default()
            });
            raw::direct(
                &exe,
                u64::from(args.workers),
                args.requests,
                args.concurrency,
                args.payload_bytes,
                &place_raw,
            )
            .map(|report| (report, meter.stop(args.requests)))
        }
        Mode::Inproc => {
            let meter = CpuMeter::start(Roles {
                broker: Some(me),
                ..Roles::default()
            });
            tokio::select! {
                report = channel_baseline(&args) => Ok((report, meter.stop(args.requests))),
                () = interrupt.wake.notified() => Err(std::io::Error::other("interrupted")),
            }
        }
        Mode::Cluster => {
            let url = args.nats_url.clone().unwrap_or_default();
            let subject = format!("{cluster_name}.raw");
            match NatsEcho::start(&exe, &url, &subject) {
                Err(e) => Err(e),
                Ok(echo) => {
                    place_raw(echo.pid());
                    // The requester is this process.
                    let meter = CpuMeter::start(Roles {
                        client: Some(me),
                        workers: vec![echo.pid()],
                        ..Roles::default()
                    });
                    let run = procbroker::loadgen::nats::request_reply(
                        &url,
                        subject,
                        args.requests,
                        args.concurrency,
                        args.payload_bytes,
                    );
                    tokio::select! {
                        report = run => report.map(|r| (r, meter.stop(args.requests))),
                        () = interrupt.wake.notified() => Err(std::io::Error::other("interrupted")),
                    }
                }
            }
        }
    };
    if interrupt.signal().is_some() {
        let so_far = SoFar {
            report: Some(report),
            ..SoFar::default()
        };
        return Ok(Outcome::Interrupted { so_far });
    }
    Ok(Outcome::Done {
        report,
        cpu,
        baseline: Some(baseline?),
        children_cpus: placed.take(),
    })
}

/// Heartbeat of the two nodes of a cluster run: b is seen within 0.2 s.
const NODE_HEARTBEAT_MS: u64 = 200;

/// Node b of `--mode cluster`: `procbroker run` with `workers` echo
/// workers, in a cluster of its own on the given server. Stopped (SIGTERM,
/// then SIGKILL after 2 s) and reaped when dropped.
struct NodeB {
    child: std::process::Child,
    dir: PathBuf,
}

impl NodeB {
    fn start(
        exe: &std::path::Path,
        url: &str,
        cluster: &str,
        workers: u32,
        placement: &Placement,
    ) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("procbroker-bench-{cluster}"));
        std::fs::create_dir_all(&dir).context("a folder for node b's config")?;
        let config = dir.join("b.toml");
        let text = format!(
            "[broker]\nqueue_capacity = 100000\n[admin]\nlisten = \"\"\n[sysmon]\ninterval_ms = 0\n\
             [cluster]\nnats_url = {url:?}\nname = {cluster:?}\nnode = \"b\"\nheartbeat_ms = {NODE_HEARTBEAT_MS}\n\
             [[service]]\nname = \"echo\"\ncommand = \"@self\"\nargs = [\"worker\", \"echo\"]\nworkers = {workers}\n"
        );
        std::fs::write(&config, text).context("writing node b's config")?;
        // Placed before it starts, so its threads and workers inherit it.
        let mut command = if placement.pin == Pin::None {
            std::process::Command::new(exe)
        } else {
            let mut taskset = std::process::Command::new("taskset");
            taskset
                .args(["-c", &cpu_list(&placement.children)])
                .arg(exe);
            taskset
        };
        let child = command
            .args(["run", "--config"])
            .arg(&config)
            .env("LOG_LEVEL", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting node b (procbroker run)")?;
        Ok(Self { child, dir })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until node a sees b with `workers` ready echo workers.
    async fn joined(&self, a: &BrokerHandle, workers: u32) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let nodes = a.nodes().await?;
            if nodes
                .iter()
                .any(|n| n.node == "b" && n.up && n.services.get("echo") == Some(&workers))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node b did not join through NATS within 20 s (is the server at --nats-url running?)"
                );
            }
            actix::clock::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then up to 2 s for it to leave the cluster and exit
    /// (without blocking this arbiter, which hears its goodbye).
    async fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && !matches!(self.child.try_wait(), Ok(Some(_))) {
            actix::clock::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for NodeB {
    /// Whatever is left of it (an interrupted or failed run): SIGKILL.
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The processes whose parent is `parent` (node b's workers).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the command (which may hold spaces): state, ppid.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(parent)
        })
        .collect()
}

/// The responder of the raw NATS baseline (`procbroker worker nats-echo`),
/// stopped by closing its stdin when dropped.
struct NatsEcho {
    child: std::process::Child,
}

impl NatsEcho {
    fn start(exe: &std::path::Path, url: &str, subject: &str) -> std::io::Result<Self> {
        use procbroker::loadgen::nats::{SUBJECT_ENV, URL_ENV};
        use std::io::BufRead;
        let mut child = std::process::Command::new(exe)
            .args(["worker", "nats-echo"])
            .env(URL_ENV, url)
            .env(SUBJECT_ENV, subject)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            std::io::BufReader::new(out).read_line(&mut line)?;
        }
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(
                "the raw NATS responder did not start",
            ));
        }
        Ok(Self { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NatsEcho {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// `concurrency` tasks in this process calling `echo` through the Router.
async fn lanes(broker: &BrokerHandle, args: &BenchArgs) -> Result<RunReport> {
    let (method, payload) = match args.worker {
        Worker::Nvim => ("nvim_eval", Payload::encode(&("1",))?),
        Worker::Echo | Worker::RpcEcho => {
            let body = vec![0x5au8; usize::try_from(args.payload_bytes)?];
            ("Echo", Payload::encode(serde_bytes::Bytes::new(&body))?)
        }
    };
    // Made once: a request built per call would copy its two names into
    // fresh strings each time, work the measured broker does not do.
    let request = Envelope::request(
        ByteString::from_static("echo"),
        ByteString::from_static(method),
        0,
    )
    .with_raw_payload(payload);
    let broker = broker.clone();
    Ok(drive(args.requests, args.concurrency, move || {
        let (broker, request) = (broker.clone(), request.clone());
        async move {
            match broker.call_envelope(request).await {
                Ok(_) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
    })
    .await)
}

/// The in-process limit: tasks and one echo task over tokio channels (no
/// actors, no envelopes).
async fn channel_baseline(args: &BenchArgs) -> RunReport {
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<(Bytes, tokio::sync::oneshot::Sender<Bytes>)>();
    actix::spawn(async move {
        while let Some((payload, reply)) = rx.recv().await {
            let _ = reply.send(payload);
        }
    });
    let body = Bytes::from(vec![
        0x5au8;
        usize::try_from(args.payload_bytes).unwrap_or(0)
    ]);
    drive(args.requests, args.concurrency, move || {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = tx.send((body.clone(), reply)).is_ok();
        async move {
            if sent && answer.await.is_ok() {
                Ok(())
            } else {
                Err(Failure::new("closed", "the echo task is gone"))
            }
        }
    })
    .await
}

/// The anchor of `--worker nvim`: a Python client calling `nvim_eval("1")`
/// on a neovim of its own, no broker (`nvim_direct.py`, run with
/// `python3 -c`), pinned to `cpus` ("-": unpinned).
fn nvim_direct(args: &BenchArgs, cpus: &str) -> std::io::Result<(RunReport, CpuPerCall)> {
    #[derive(serde::Deserialize)]
    struct Direct {
        #[serde(flatten)]
        report: RunReport,
        cpu_us_per_call: CpuPerCall,
    }
    let out = std::process::Command::new("python3")
        .args(["-c", include_str!("nvim_direct.py")])
        .args([
            args.requests.to_string(),
            args.concurrency.to_string(),
            cpus.into(),
        ])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "the direct Python client failed ({}); it needs python3 with msgpack, and nvim",
            out.status
        )));
    }
    let direct: Direct = serde_json::from_slice(&out.stdout).map_err(std::io::Error::other)?;
    Ok((direct.report, direct.cpu_us_per_call))
}
