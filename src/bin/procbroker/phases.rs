//! `procbroker bench` runs made of several measured phases in one
//! invocation, through one broker and its children:
//!
//! - `--stream N`: streams of N partial replies, against the pipelined
//!   relay (its frames per second);
//! - `--key-spread K`: keyed calls against round-robin ones (CPU per call);
//! - `--worker-cmd CMD`: other programs as the echo worker, against the
//!   built-in Rust echo (throughput, the workers' CPU per call);
//! - `--mode cancel`: from a caller's deadline to its worker's handler
//!   seeing the `cancel`.

use anyhow::{Context, Result, bail};
use procbroker::config::ServiceConfig;
use procbroker::embed::BrokerHandle;
use procbroker::loadgen::worker::CancelTimes;
use procbroker::loadgen::{
    ErrorCount, KeyedSpec, Quantiles, RunReport, RunSpec, StreamReport, StreamSpec, TimeoutSpec,
    ns_histogram,
};
use procbroker::protocol::Envelope;
use serde_json::{Value, json};
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bench::{
    BenchArgs, Mode, Placement, SoFar, Worker, bench_broker, cpu_list, cpus_of, failed_runs,
    interrupted, measured_of,
};
use crate::cpu::{CpuMeter, CpuPerCall, Roles};
use crate::interrupt::Interrupt;

/// Calls in flight in the relay that streams are compared with (the
/// pipelined relay).
const RELAY_IN_FLIGHT: u64 = 64;

/// Rounds of the keyed plan: round-robin and keyed calls take turns, so
/// that the machine's drift over a run (other tenants, clock speed) falls on
/// both alike.
const KEYED_ROUNDS: u64 = 5;

/// How long the cancel bench waits, after its last call ended, for the
/// worker to have seen every cancel.
const CANCELS_SETTLE: Duration = Duration::from_secs(3);

/// What an invocation measures, when it is one of these.
pub(crate) enum Plan {
    /// Streams of `partials` partial replies against the pipelined relay.
    Stream { partials: u64 },
    /// Calls carrying one of `keys` keys against round-robin calls.
    Keyed { keys: u64 },
    /// Each program (as given, and split into words) as the echo worker,
    /// after the built-in Rust echo.
    Workers {
        commands: Vec<(String, Vec<String>)>,
    },
    /// Calls with a deadline of `timeout_ms` to a worker that waits for
    /// their `cancel`.
    Cancel { timeout_ms: u64 },
}

impl Plan {
    /// The plan `args` ask for, if any; an error for a combination that
    /// means nothing.
    pub(crate) fn of(args: &BenchArgs) -> Result<Option<Self>> {
        let asked: Vec<&str> = [
            (args.stream.is_some(), "--stream"),
            (args.key_spread.is_some(), "--key-spread"),
            (!args.worker_cmd.is_empty(), "--worker-cmd"),
            (args.mode == Mode::Cancel, "--mode cancel"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        let Some(&what) = asked.first() else {
            return Ok(None);
        };
        if asked.len() > 1 {
            bail!(
                "{} measure different things: give one of them per invocation",
                asked.join(" and ")
            );
        }
        if args.baseline {
            bail!(
                "{what} compares runs of the same invocation with each other: --baseline does not apply"
            );
        }
        if args.worker != Worker::Echo {
            bail!("{what} chooses its own workers: --worker does not apply");
        }
        if args.mode != Mode::Relay && args.mode != Mode::Cancel {
            bail!("{what} needs --mode relay");
        }
        let at_least_one = |v: u64, flag: &str| {
            if v == 0 {
                bail!("{flag} must be at least 1");
            }
            Ok(v)
        };
        let plan = if let Some(n) = args.stream {
            Self::Stream {
                partials: at_least_one(n, "--stream")?,
            }
        } else if let Some(k) = args.key_spread {
            Self::Keyed {
                keys: at_least_one(k, "--key-spread")?,
            }
        } else if args.mode == Mode::Cancel {
            Self::Cancel {
                timeout_ms: at_least_one(args.timeout_ms, "--timeout-ms")?,
            }
        } else {
            let mut commands = Vec::new();
            for command in &args.worker_cmd {
                let words = shlex::split(command)
                    .with_context(|| format!("--worker-cmd {command:?}: unbalanced quotes"))?;
                if words.is_empty() {
                    bail!("--worker-cmd is empty");
                }
                commands.push((command.clone(), words));
            }
            Self::Workers { commands }
        };
        Ok(Some(plan))
    }

    /// The services the run starts, each with `workers` workers: its name,
    /// its config and what to call it in an error.
    fn services(&self, exe: &str, workers: u32) -> Vec<(String, ServiceConfig, String)> {
        let echo = || {
            (
                "echo".to_owned(),
                ServiceConfig::new("echo", exe).args(["worker", "echo"]),
                "the built-in echo".to_owned(),
            )
        };
        let bench_worker = |name: &str| {
            (
                name.to_owned(),
                ServiceConfig::new(name, exe).args(["worker", "bench-worker"]),
                "the benchmark worker".to_owned(),
            )
        };
        let services = match self {
            Self::Stream { .. } => vec![echo(), bench_worker("streamer")],
            Self::Keyed { .. } => vec![echo()],
            Self::Cancel { .. } => vec![bench_worker("holder")],
            Self::Workers { commands } => std::iter::once(echo())
                .chain(commands.iter().enumerate().map(|(i, (command, words))| {
                    let name = format!("cmd{}", i + 1);
                    let config = ServiceConfig::new(&name, &words[0]).args(words[1..].to_vec());
                    (name, config, format!("--worker-cmd {command:?}"))
                }))
                .collect(),
        };
        services
            .into_iter()
            .map(|(name, config, what)| (name, config.workers(workers), what))
            .collect()
    }

    /// The measured phases, in order.
    fn phases(&self, args: &BenchArgs) -> Vec<Phase> {
        let run = |target: &str, method: &str, calls: u64, concurrency: u64| RunSpec {
            target: target.into(),
            method: method.into(),
            calls,
            concurrency,
            payload_bytes: args.payload_bytes,
        };
        let plain = |target: &str| run(target, "Echo", args.requests, args.concurrency);
        match self {
            Self::Stream { partials } => vec![
                Phase {
                    label: format!("relay, {RELAY_IN_FLIGHT} in flight"),
                    service: "echo".into(),
                    // As many frames through the broker as the streams
                    // move: a call is two (its request and its reply).
                    call: Call::Run(run(
                        "echo",
                        "Echo",
                        args.requests.saturating_mul(*partials).div_ceil(2),
                        RELAY_IN_FLIGHT,
                    )),
                },
                Phase {
                    label: "streams".into(),
                    service: "streamer".into(),
                    call: Call::Stream(StreamSpec {
                        run: run("streamer", "Repeat", args.requests, args.concurrency),
                        partials: *partials,
                    }),
                },
            ],
            Self::Keyed { keys } => (0..KEYED_ROUNDS)
                .filter_map(|round| {
                    // The calls shared out among the rounds.
                    let calls = args.requests / KEYED_ROUNDS
                        + u64::from(round < args.requests % KEYED_ROUNDS);
                    (calls > 0).then(|| run("echo", "Echo", calls, args.concurrency))
                })
                .flat_map(|spec| {
                    [
                        Phase {
                            label: "round-robin".into(),
                            service: "echo".into(),
                            call: Call::Run(spec.clone()),
                        },
                        Phase {
                            label: format!("keyed, {keys} keys"),
                            service: "echo".into(),
                            call: Call::Keyed(KeyedSpec {
                                run: spec,
                                keys: *keys,
                            }),
                        },
                    ]
                })
                .collect(),
            Self::Workers { commands } => std::iter::once(Phase {
                label: "built-in Rust echo".into(),
                service: "echo".into(),
                call: Call::Run(plain("echo")),
            })
            .chain(commands.iter().enumerate().map(|(i, (command, _))| {
                let service = format!("cmd{}", i + 1);
                Phase {
                    label: command.clone(),
                    call: Call::Run(plain(&service)),
                    service,
                }
            }))
            .collect(),
            Self::Cancel { timeout_ms } => vec![Phase {
                label: "timeouts".into(),
                service: "holder".into(),
                call: Call::Timeouts(TimeoutSpec {
                    run: run("holder", "Hold", args.requests, args.concurrency),
                    timeout_ms: *timeout_ms,
                }),
            }],
        }
    }
}

/// One measured run of the client.
struct Phase {
    /// Its row in the table.
    label: String,
    /// The service it calls (whose workers' CPU is measured).
    service: String,
    call: Call,
}

/// What the client is asked to do.
enum Call {
    Run(RunSpec),
    Keyed(KeyedSpec),
    Stream(StreamSpec),
    Timeouts(TimeoutSpec),
}

impl Call {
    fn calls(&self) -> u64 {
        match self {
            Self::Run(spec) => spec.calls,
            Self::Keyed(spec) => spec.run.calls,
            Self::Stream(spec) => spec.run.calls,
            Self::Timeouts(spec) => spec.run.calls,
        }
    }

    /// The same calls, a tenth of them (at most 5 000), to run unmeasured
    /// before the phase: its processes' first calls fault in memory and fill
    /// caches, which would count against whichever phase runs first. None
    /// for calls that time out (their worker counts every cancel it sees).
    fn warm_up(&self) -> Option<Self> {
        let fewer = |spec: &RunSpec| RunSpec {
            calls: (spec.calls / 10).clamp(1, 5000),
            ..spec.clone()
        };
        match self {
            Self::Run(spec) => Some(Self::Run(fewer(spec))),
            Self::Keyed(spec) => Some(Self::Keyed(KeyedSpec {
                run: fewer(&spec.run),
                keys: spec.keys,
            })),
            Self::Stream(spec) => Some(Self::Stream(StreamSpec {
                run: fewer(&spec.run),
                partials: spec.partials,
            })),
            Self::Timeouts(_) => None,
        }
    }

    /// The request to the client's method for it.
    fn request(&self) -> Result<Envelope> {
        let request = match self {
            Self::Run(spec) => Envelope::request("client", "Run", 0).with_payload(spec),
            Self::Keyed(spec) => Envelope::request("client", "RunKeyed", 0).with_payload(spec),
            Self::Stream(spec) => Envelope::request("client", "RunStream", 0).with_payload(spec),
            Self::Timeouts(spec) => {
                Envelope::request("client", "RunTimeouts", 0).with_payload(spec)
            }
        }?;
        Ok(request.with_timeout_ms(24 * 3600 * 1000))
    }
}

/// What a phase measured.
struct Measured {
    label: String,
    /// Calls asked.
    calls: u64,
    report: RunReport,
    /// Partial replies received (streams only).
    partials: Option<u64>,
    /// CPU µs per call of each process.
    cpu: CpuPerCall,
}

impl Measured {
    /// Calls answered per second.
    fn rate(&self) -> f64 {
        self.report.ok as f64 / secs(&self.report)
    }

    fn json(&self) -> Value {
        let r = &self.report;
        json!({
            "requests": r.ok + r.errors,
            "elapsed_s": r.elapsed_ns as f64 / 1e9,
            "throughput_rps": self.rate(),
            "errors": r.errors,
            "error_codes": codes(r),
            "latency_us": latency(r),
            "cpu_us_per_call": self.cpu.json(),
        })
    }
}

fn secs(r: &RunReport) -> f64 {
    r.elapsed_ns.max(1) as f64 / 1e9
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

fn quantiles_us(q: &Quantiles) -> Value {
    json!({"p50": us(q.p50), "p90": us(q.p90), "p99": us(q.p99), "p999": us(q.p999), "max": us(q.max)})
}

/// Latency of the calls answered (null when none was).
fn latency(r: &RunReport) -> Value {
    if r.ok == 0 {
        return Value::Null;
    }
    quantiles_us(&r.latency_ns)
}

fn codes(r: &RunReport) -> serde_json::Map<String, Value> {
    r.error_codes
        .iter()
        .map(|c| (c.code.clone(), json!(c.count)))
        .collect()
}

/// How the run ended.
enum Outcome {
    Done {
        phases: Vec<Measured>,
        /// The cancels the workers saw (cancel plan).
        cancels: Option<CancelTimes>,
        children_cpus: Vec<String>,
    },
    Interrupted(SoFar),
}

/// Runs the plan and prints what it measured.
pub(crate) fn bench(
    args: &BenchArgs,
    plan: Plan,
    placement: Placement,
    interrupt: Arc<Interrupt>,
) -> Result<()> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let cpus = placement.describe();
    let broker_cpus = cpu_list(&cpus_of(0)?);
    let started = Instant::now();
    let phases = plan.phases(args);
    let stream = match plan {
        Plan::Stream { partials } => Some(partials),
        _ => None,
    };
    let outcome = crate::run::block_on_task(run(
        args.clone(),
        stream,
        plan.services(&exe.display().to_string(), args.workers),
        phases,
        exe,
        placement,
        Arc::clone(&interrupt),
    ))?;
    let (phases, cancels, children_cpus) = match outcome {
        Outcome::Done {
            phases,
            cancels,
            children_cpus,
        } => (phases, cancels, children_cpus),
        Outcome::Interrupted(so_far) => {
            let signal = interrupt
                .signal()
                .unwrap_or(nix::sys::signal::Signal::SIGINT);
            interrupted(args, signal, started.elapsed(), &so_far);
            std::process::exit(128 + signal as i32);
        }
    };
    let mut phases = merged(phases);
    if let Some(times) = &cancels
        && let Some(timeouts) = phases.first_mut()
    {
        check_cancels(&mut timeouts.report, times);
    }
    let out = Out {
        args,
        plan: &plan,
        phases: &phases,
        cancels: cancels.as_ref(),
        cpus,
    };
    if args.json {
        println!("{}", out.json(&broker_cpus, &children_cpus));
    } else {
        out.print();
    }
    let named: Vec<(String, &RunReport)> = phases
        .iter()
        .map(|m| (format!("of the run \"{}\"", m.label), &m.report))
        .collect();
    let runs: Vec<(&str, &RunReport)> = named.iter().map(|(n, r)| (n.as_str(), *r)).collect();
    failed_runs(&runs)
}

/// The phases with one label (the rounds of the keyed plan) as one: calls,
/// errors and times added up, CPU per call and latency quantiles averaged
/// weighted by calls. In the order each label first came.
fn merged(phases: Vec<Measured>) -> Vec<Measured> {
    let mut out: Vec<Measured> = Vec::new();
    for m in phases {
        let Some(into) = out.iter_mut().find(|o| o.label == m.label) else {
            out.push(m);
            continue;
        };
        let (a, b) = (into.calls as f64, m.calls as f64);
        let mean = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(x), Some(y)) => Some((x * a + y * b) / (a + b).max(1.0)),
            _ => None,
        };
        into.cpu = CpuPerCall {
            broker: mean(into.cpu.broker, m.cpu.broker),
            client: mean(into.cpu.client, m.cpu.client),
            workers: mean(into.cpu.workers, m.cpu.workers),
        };
        let (r, s) = (&mut into.report, m.report);
        let (ok_a, ok_b) = (r.ok as f64, s.ok as f64);
        let q = |x: u64, y: u64| {
            ((x as f64 * ok_a + y as f64 * ok_b) / (ok_a + ok_b).max(1.0)).round() as u64
        };
        let (l, k) = (r.latency_ns, s.latency_ns);
        r.latency_ns = Quantiles {
            p50: q(l.p50, k.p50),
            p90: q(l.p90, k.p90),
            p99: q(l.p99, k.p99),
            p999: q(l.p999, k.p999),
            max: l.max.max(k.max),
        };
        r.ok += s.ok;
        r.errors += s.errors;
        r.elapsed_ns += s.elapsed_ns;
        for c in s.error_codes {
            match r.error_codes.iter_mut().find(|e| e.code == c.code) {
                Some(e) => e.count += c.count,
                None => r.error_codes.push(c),
            }
        }
        into.partials = match (into.partials, m.partials) {
            (Some(x), Some(y)) => Some(x + y),
            (x, y) => x.or(y),
        };
        into.calls += m.calls;
    }
    out
}

/// Each call whose cancel the worker did not see, or saw with another
/// reason than `timeout`, is a failed call of the cancel run.
fn check_cancels(report: &mut RunReport, times: &CancelTimes) {
    let calls = report.ok;
    let mut fail = |code: &str, count: u64, message: String| {
        let count = count.min(report.ok);
        if count == 0 {
            return;
        }
        report.ok -= count;
        report.errors += count;
        report.error_codes.push(ErrorCount {
            code: code.into(),
            count,
            message,
        });
    };
    fail(
        "no_cancel",
        calls.saturating_sub(times.count),
        format!(
            "the worker saw {} cancels for {calls} calls that timed out",
            times.count
        ),
    );
    fail(
        "other_reason",
        times.other_reasons,
        "a cancel for a timed-out call had another reason than timeout".into(),
    );
}

/// Starts the services and the client, runs the phases one after the
/// other, and stops everything; stops at once on SIGINT or SIGTERM.
async fn run(
    args: BenchArgs,
    stream: Option<u64>,
    services: Vec<(String, ServiceConfig, String)>,
    phases: Vec<Phase>,
    exe: PathBuf,
    placement: Placement,
    interrupt: Arc<Interrupt>,
) -> Result<Outcome> {
    let (place, placed) = placement.placer();
    // Room for every partial reply in flight: the broker cuts a stream
    // (`busy`) whose caller has `queue_capacity` frames waiting, and a
    // client that reads more slowly than its worker writes builds such a
    // backlog however fast it reads. The bench measures the rate, not the
    // cut.
    let in_flight = match stream {
        Some(partials) => args.concurrency.saturating_mul(partials.saturating_add(1)),
        None => args.concurrency,
    };
    let broker = bench_broker(in_flight).start();
    let total: u64 = phases
        .iter()
        .map(|p| p.call.calls() + p.call.warm_up().map_or(0, |w| w.calls()))
        .sum();
    let names: Vec<String> = services.iter().map(|(name, _, _)| name.clone()).collect();
    progress(broker.clone(), names, total);
    let current = Rc::new(RefCell::new(String::from("echo")));
    let now = Rc::clone(&current);
    let work = async {
        let mut pids: Vec<(String, Vec<u32>, Vec<String>)> = Vec::new();
        for (name, config, what) in services {
            let spawned = broker.spawn(config).await.with_context(|| what.clone())?;
            let (mut ids, mut procs) = (Vec::new(), Vec::new());
            for p in spawned {
                if !p.is_ready() {
                    bail!(
                        "{what}: {} did not become ready: {}",
                        p.id,
                        p.error.as_deref().unwrap_or("it was not ready in time")
                    );
                }
                if let Some(pid) = p.pid {
                    place(pid);
                    procs.push(pid);
                }
                ids.push(p.id);
            }
            pids.push((name, procs, ids));
        }
        let client = ServiceConfig::new("client", exe.display().to_string())
            .args(["worker", "bench-client"]);
        let mut client_pid = None;
        for p in broker.spawn(client).await? {
            if let Some(pid) = p.pid {
                place(pid);
                client_pid = Some(pid);
            }
        }
        let mut measured = Vec::new();
        let mut holders = Vec::new();
        for phase in phases {
            now.replace(phase.service.clone());
            let (workers, ids) = pids
                .iter()
                .find(|(name, _, _)| *name == phase.service)
                .map(|(_, procs, ids)| (procs.clone(), ids.clone()))
                .unwrap_or_default();
            if matches!(phase.call, Call::Timeouts(_)) {
                holders = ids;
            }
            if let Some(warm_up) = phase.call.warm_up() {
                broker.call_envelope(warm_up.request()?).await?;
            }
            let meter = CpuMeter::start(Roles {
                broker: Some(std::process::id()),
                client: client_pid,
                workers,
            });
            let reply = broker.call_envelope(phase.call.request()?).await?;
            let (report, partials) = match phase.call {
                Call::Stream(_) => {
                    let streams: StreamReport = reply.payload_as()?;
                    (streams.run, Some(streams.partials))
                }
                _ => (reply.payload_as::<RunReport>()?, None),
            };
            measured.push(Measured {
                label: phase.label,
                calls: phase.call.calls(),
                report,
                partials,
                cpu: meter.stop(phase.call.calls()),
            });
        }
        let cancels = if holders.is_empty() {
            None
        } else {
            let calls = measured.first().map_or(0, |m| m.report.ok);
            Some(cancels_seen(&broker, &holders, calls).await?)
        };
        Ok::<_, anyhow::Error>((measured, cancels))
    };
    let finished = tokio::select! {
        run = work => run,
        () = interrupt.wake.notified() => Err(anyhow::anyhow!("interrupted")),
    };
    let (phases, cancels) = match finished {
        Ok(done) => done,
        Err(_) if interrupt.signal().is_some() => {
            let service = current.borrow().clone();
            let so_far = measured_of(&broker, &service).await;
            broker.shutdown().await;
            return Ok(Outcome::Interrupted(so_far));
        }
        Err(e) => {
            broker.shutdown().await;
            return Err(e);
        }
    };
    broker.shutdown().await;
    Ok(Outcome::Done {
        phases,
        cancels,
        children_cpus: placed.take(),
    })
}

/// The cancels the `holders` saw, merged, once they have seen `calls` of
/// them (or [`CANCELS_SETTLE`] passed: the cancel of the last call may
/// reach its handler a moment after the caller's `timeout`).
async fn cancels_seen(
    broker: &BrokerHandle,
    holders: &[String],
    calls: u64,
) -> Result<CancelTimes> {
    let give_up = Instant::now() + CANCELS_SETTLE;
    loop {
        let mut merged = CancelTimes::default();
        for id in holders {
            let seen: CancelTimes = broker.call(id, "Cancels", &()).await?.payload_as()?;
            merged.count += seen.count;
            merged.other_reasons += seen.other_reasons;
            merged.early += seen.early;
            merged.latency_ns.extend(seen.latency_ns);
        }
        if merged.count >= calls || Instant::now() >= give_up {
            return Ok(merged);
        }
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
}

/// Progress on stderr every 2 s while a long run goes on: calls answered
/// so far by the run's services (as the broker counts them).
fn progress(broker: BrokerHandle, services: Vec<String>, total: u64) {
    let started = Instant::now();
    actix::spawn(async move {
        loop {
            actix::clock::sleep(Duration::from_secs(2)).await;
            let Ok(stats) = broker.stats().await else {
                continue;
            };
            let done: u64 = services
                .iter()
                .filter_map(|s| stats.latency_us.get(s.as_str()))
                .map(|q| q.count)
                .sum();
            let elapsed = started.elapsed().as_secs_f64();
            eprintln!(
                "bench: {elapsed:.0} s, {done} of {total} calls ({:.1} %), {:.0}/s",
                100.0 * done as f64 / total.max(1) as f64,
                done as f64 / elapsed.max(f64::MIN_POSITIVE)
            );
        }
    });
}

/// The merged cancel latencies' quantiles, in nanoseconds.
fn cancel_quantiles(times: &CancelTimes) -> Option<Quantiles> {
    if times.latency_ns.is_empty() {
        return None;
    }
    let mut h = ns_histogram();
    for &ns in &times.latency_ns {
        h.saturating_record(ns);
    }
    Some(Quantiles::of(&h))
}

/// What is printed.
struct Out<'a> {
    args: &'a BenchArgs,
    plan: &'a Plan,
    phases: &'a [Measured],
    cancels: Option<&'a CancelTimes>,
    cpus: String,
}

impl Out<'_> {
    fn phase(&self, i: usize) -> Option<&Measured> {
        self.phases.get(i)
    }

    /// Partial replies per second of the streams, frames per second of the
    /// relay, and their ratio.
    fn stream_rates(&self) -> Option<(f64, f64, f64)> {
        let (relay, streams) = (self.phase(0)?, self.phase(1)?);
        let partials = streams.partials? as f64 / secs(&streams.report);
        let frames = 2.0 * relay.rate();
        Some((partials, frames, partials / frames.max(f64::MIN_POSITIVE)))
    }

    fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
        match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        }
    }

    fn json(&self, broker_cpus: &str, children_cpus: &[String]) -> Value {
        let args = self.args;
        let (mode, worker) = match self.plan {
            Plan::Cancel { .. } => ("cancel", "bench-worker"),
            Plan::Stream { .. } => ("relay", "bench-worker"),
            _ => ("relay", "echo"),
        };
        // The row the common fields describe: the streams, the round-robin
        // run, the built-in echo, the timeouts.
        let main = match self.plan {
            Plan::Stream { .. } => self.phase(1),
            _ => self.phase(0),
        };
        let mut out = json!({
            "mode": mode,
            "worker": worker,
            "workers": args.workers,
            "concurrency": args.concurrency,
            "requests": args.requests,
            "payload_bytes": args.payload_bytes,
            "pin": format!("{:?}", args.pin).to_lowercase(),
            "cpus": self.cpus,
            "placement": {"broker": broker_cpus, "children": children_cpus},
            "baseline": null,
            "ratio_p50": null,
        });
        if let (Some(main), Some(obj)) = (main, out.as_object_mut())
            && let Value::Object(fields) = main.json()
        {
            for (k, v) in fields {
                if k != "requests" {
                    obj.insert(k, v);
                }
            }
        }
        let extra = match self.plan {
            Plan::Stream { partials } => {
                let relay = self.phase(0).map(|relay| {
                    let mut v = relay.json();
                    v["concurrency"] = json!(RELAY_IN_FLIGHT);
                    v["frames_per_s"] = json!(2.0 * relay.rate());
                    v["cpu_us_per_frame"] = relay.cpu.scaled(0.5).json();
                    v
                });
                let rates = self.stream_rates();
                let streams = self.phase(1);
                json!({
                    "stream": partials,
                    "partials": streams.and_then(|s| s.partials),
                    "partials_per_s": rates.map(|r| r.0),
                    "cpu_us_per_partial": streams.map(|s| s.cpu.scaled(1.0 / *partials as f64).json()),
                    "relay": relay,
                    "ratio_partials_to_relay_frames": rates.map(|r| r.2),
                })
            }
            Plan::Keyed { keys } => {
                let keyed = self.phase(1);
                json!({
                    "key_spread": keys,
                    "keyed": keyed.map(Measured::json),
                    "ratio_broker_cpu_keyed": Self::ratio(
                        keyed.and_then(|k| k.cpu.broker),
                        self.phase(0).and_then(|r| r.cpu.broker),
                    ),
                })
            }
            Plan::Workers { .. } => {
                let rust = self.phase(0);
                let cmds: Vec<Value> = self
                    .phases
                    .iter()
                    .skip(1)
                    .map(|m| {
                        let mut v = m.json();
                        v["command"] = json!(m.label);
                        v["ratio_worker_cpu"] =
                            json!(Self::ratio(m.cpu.workers, rust.and_then(|r| r.cpu.workers)));
                        v["ratio_throughput"] =
                            json!(Self::ratio(Some(m.rate()), rust.map(Measured::rate)));
                        v
                    })
                    .collect();
                json!({ "worker_cmds": cmds })
            }
            Plan::Cancel { timeout_ms } => json!({
                "timeout_ms": timeout_ms,
                "cancels": self.cancels.map(|c| json!({
                    "count": c.count,
                    "other_reasons": c.other_reasons,
                    "early": c.early,
                })),
                "cancel_latency_us": self.cancels.and_then(cancel_quantiles).map(|q| quantiles_us(&q)),
            }),
        };
        if let (Some(obj), Value::Object(extra)) = (out.as_object_mut(), extra) {
            obj.extend(extra);
        }
        out
    }

    fn print(&self) {
        let args = self.args;
        let pin = format!("{:?}", args.pin).to_lowercase();
        let what = match self.plan {
            Plan::Stream { partials } => format!(
                "relay, streams of {partials} partial replies of {} B, {} worker(s), {} stream(s) in flight, {} streams; \
                 against the relay of {RELAY_IN_FLIGHT} calls in flight moving as many frames",
                args.payload_bytes, args.workers, args.concurrency, args.requests
            ),
            Plan::Keyed { keys } => format!(
                "relay, round-robin and keyed ({keys} keys) in {KEYED_ROUNDS} rounds each, {} echo worker(s), \
                 {} in flight, {} requests of {} B each",
                args.workers, args.concurrency, args.requests, args.payload_bytes
            ),
            Plan::Workers { .. } => format!(
                "relay, each program as the echo worker, {} worker(s), {} in flight, {} requests of {} B each",
                args.workers, args.concurrency, args.requests, args.payload_bytes
            ),
            Plan::Cancel { timeout_ms } => format!(
                "cancel, {} worker(s), {} in flight, {} requests with a deadline of {timeout_ms} ms",
                args.workers, args.concurrency, args.requests
            ),
        };
        println!("procbroker bench: {what}, pin {pin} (CPUs {})", self.cpus);
        let width = self
            .phases
            .iter()
            .map(|m| m.label.chars().count())
            .max()
            .unwrap_or(0)
            .max(10);
        println!(
            "\n{:<width$} {:>12} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
            "",
            "calls/s",
            "elapsed s",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "p99.9 µs",
            "max µs",
            "errors"
        );
        for m in self.phases {
            let r = &m.report;
            let cell = |ns: u64| match r.ok {
                0 => "-".to_owned(),
                _ => format!("{:.1}", us(ns)),
            };
            let l = &r.latency_ns;
            println!(
                "{:<width$} {:>12.0} {:>10.3} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
                m.label,
                m.rate(),
                r.elapsed_ns as f64 / 1e9,
                cell(l.p50),
                cell(l.p90),
                cell(l.p99),
                cell(l.p999),
                cell(l.max),
                r.errors
            );
        }
        for m in self.phases {
            for c in &m.report.error_codes {
                println!(
                    "{} errors: {} × {}: {}",
                    m.label, c.count, c.code, c.message
                );
            }
        }
        println!();
        match self.plan {
            Plan::Stream { partials } => {
                if let (Some(relay), Some(streams)) = (self.phase(0), self.phase(1)) {
                    println!(
                        "CPU µs per frame:   relay   {}",
                        relay.cpu.scaled(0.5).describe()
                    );
                    println!(
                        "CPU µs per partial: streams {}",
                        streams.cpu.scaled(1.0 / *partials as f64).describe()
                    );
                }
                if let Some((partials, frames, ratio)) = self.stream_rates() {
                    println!(
                        "\npartial replies/s {partials:.0}; relay frames/s {frames:.0} (a call is 2: request and reply)"
                    );
                    println!("partial replies / relay frames: {ratio:.2}x");
                }
            }
            Plan::Keyed { .. } => {
                for m in self.phases {
                    println!("CPU µs per call: {:<width$} {}", m.label, m.cpu.describe());
                }
                if let (Some(rr), Some(keyed)) = (self.phase(0), self.phase(1))
                    && let Some(ratio) = Self::ratio(keyed.cpu.broker, rr.cpu.broker)
                {
                    println!("\nbroker CPU per call, keyed / round-robin: {ratio:.2}x");
                }
            }
            Plan::Workers { .. } => {
                for m in self.phases {
                    println!("CPU µs per call: {:<width$} {}", m.label, m.cpu.describe());
                }
                if let Some(rust) = self.phase(0) {
                    println!();
                    for m in self.phases.iter().skip(1) {
                        println!(
                            "{} / built-in Rust echo: workers' CPU per call {}, throughput {}",
                            m.label,
                            Self::ratio(m.cpu.workers, rust.cpu.workers)
                                .map_or("-".into(), |r| format!("{r:.2}x")),
                            Self::ratio(Some(m.rate()), Some(rust.rate()))
                                .map_or("-".into(), |r| format!("{r:.2}x")),
                        );
                    }
                }
            }
            Plan::Cancel { .. } => {
                for m in self.phases {
                    println!("CPU µs per call: {}", m.cpu.describe());
                }
                if let Some(c) = self.cancels {
                    println!(
                        "\ncancels seen by the worker: {} ({} with another reason than timeout, {} before the deadline)",
                        c.count, c.other_reasons, c.early
                    );
                    if let Some(q) = cancel_quantiles(c) {
                        println!(
                            "cancel latency, from the caller's deadline to the handler seeing cancel: \
                             p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs",
                            us(q.p50),
                            us(q.p90),
                            us(q.p99),
                            us(q.p999),
                            us(q.max)
                        );
                    }
                }
            }
        }
    }
}
