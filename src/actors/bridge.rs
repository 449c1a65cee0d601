//! Bridge: one actor per child process, between its pipes and the Router.
//!
//! The bridge owns one process id (`echo.2`) for its whole life and runs the
//! child behind it, restarting it as the service's policy says. Each run of
//! the child (an *incarnation*) has:
//!
//! - **stdout**: an actix stream of envelope batches ([`EnvelopeCodec`],
//!   what one read brought: [`pipe::Batches`]) behind a [`Paced`] gate.
//!   Each batch goes to the Router through the incarnation's link (a
//!   method call once the Router has registered it on this thread, a
//!   `Route` message before that or from another thread; module
//!   `same_thread`). Each envelope
//!   gets its `source` stamped by the Router from the id registered here,
//!   so a child cannot forge one. A bad frame is
//!   counted and skipped (`bad_request` if it was a readable request); a
//!   frame error (oversize length, torn frame, stray bytes) means the stream
//!   is out of sync, so the child is killed and restarted.
//! - **stdin**: an [`Outbox`] with a bound of `queue_capacity` frames,
//!   behind the incarnation's inbox (module `same_thread`), which the Router
//!   calls directly when it runs on this thread (the broker starts them
//!   together) and this actor's [`Deliver`] handler calls otherwise. A
//!   request or event that finds it full is bounced (`busy`); replies always
//!   go in, and stdout is not read while the outbox is full, so a child that
//!   never reads cannot make the broker hold more than that.
//! - **stderr**: handed over, as a file descriptor, to the
//!   [`LogStore`], which reads it on a thread of
//!   its own (the process's ring, its file, the broker's log).
//! - **what it runs as**: the service's `limits`, `user`, `group` and `cwd`
//!   are resolved before each fork and applied in the child before exec
//!   ([`ChildSetup`]).
//! - **wire**: a service with `protocol = "msgpack-rpc"` speaks
//!   MessagePack-RPC instead of envelopes ([`WireCodec`]); the codec
//!   translates at the pipe, so everything here still sees envelopes. Such a
//!   child has no `ready`/`shutdown` handshake: it is ready when it answers
//!   `ready_probe` (or at once), and is stopped by EOF on stdin.
//! - **age**: with `recycle.max_age_ms`, each incarnation tells the Broker
//!   once, that long after its `ready`, that it is due for recycling (the
//!   Broker decides when it is replaced).
//! - **exit**: a watcher task owns the `Child`, reaps it (no zombies) and
//!   tells the bridge; the Router then fails the requests in flight to it
//!   with `worker_exited` at once.
//!
//! Why the watcher and the writer are tasks beside the actor and not futures
//! in its context: actix polls every future of a context each time the
//! context wakes, and polling `Child::wait` costs a `waitpid` system call.
//!
//! Nothing a child sends can panic this actor: a panic would kill it for good
//! (actix's `Supervisor` does not restart panicked actors).

use actix::prelude::*;
use bytestring::ByteString;
use futures_util::StreamExt;
use nix::sys::signal::Signal;
use std::process::{ExitStatus, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

use super::health::{Health, Verdict};
use super::log_limit::{BadFrameRate, LogLimit, LogLine};
use super::log_store::{AttachStderr, LogStore};
use super::messages::{
    BadFrame, Deliver, Envelopes, HealthFailure, RecycleDue, RecycleReason, RegisterProcess,
    RemoveProcess, SetReady, StopProcess, TrackProcess, Unwatch, Watch,
};
use super::pacer::{Paced, Pacer};
use super::restart_policy::{Decision, Restarts};
use super::router::Router;
use super::same_thread::{Handoff, Inbox, RouterLink};
use super::sysmon::Sysmon;
use crate::config::run_as::ChildSetup;
use crate::config::{BrokerConfig, Protocol, SELF_COMMAND, ServiceConfig};
use crate::names::{BROKER, PROCESS_ID_ENV, READY_EVENT, SERVICE_ENV, SHUTDOWN_EVENT};
use crate::pipe::{self, Batches, Incoming, Outbox, WireCodec};
use crate::protocol::msgpack_rpc::MsgpackRpcCodec;
use crate::protocol::rpc::{ProcessInfo, ProcessStatus, SpawnedProcess};
use crate::protocol::{Envelope, EnvelopeCodec, FrameError, InvalidEnvelope, MessageType};

/// What a child of the broker must not inherit: it is not the service
/// manager's main process, and must not speak for the broker to systemd.
const NOT_INHERITED: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];
/// Most envelopes handed to the Router in one message.
const READ_BATCH: usize = 64;
/// Stopping: stdin is closed once stdout has been quiet this long after the
/// `shutdown` event (or at half of `kill_timeout` at the latest).
const STOP_QUIET: Duration = Duration::from_millis(100);
/// How often a stopping bridge looks whether stdout went quiet.
const STOP_QUIET_POLL: Duration = Duration::from_millis(20);
/// The correlation id of a MessagePack-RPC child's `ready_probe` (source
/// `broker`; health checks use ids with the top bit set).
const PROBE_ID: u64 = 0;

/// The watcher's report: incarnation `generation` exited.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Exited {
    generation: u64,
    status: std::io::Result<ExitStatus>,
}

type StdoutItem = Result<Incoming, FrameError>;

/// One run of the child.
struct Incarnation {
    generation: u64,
    pid: u32,
    started: Instant,
    ready: bool,
    outbox: Rc<Outbox>,
    /// What the Router delivers to this incarnation goes through here.
    inbox: Rc<Inbox>,
    /// What this incarnation sends goes to the Router through here.
    link: Rc<RouterLink>,
    pacer: Arc<Pacer>,
    stdout: SpawnHandle,
    signals: mpsc::UnboundedSender<Signal>,
    ready_timer: Option<SpawnHandle>,
    /// It was killed for not sending `ready` in time.
    ready_timed_out: bool,
    /// Bad frames in the current second, against `max_bad_frames_per_s`.
    bad_rate: BadFrameRate,
    /// Its health checks, once it is ready (if the service has them).
    health: Option<Health>,
    /// The interval that sends them.
    health_timer: Option<SpawnHandle>,
    /// Fires at `recycle.max_age_ms` after `ready` (if the service has it).
    age_timer: Option<SpawnHandle>,
}

impl Incarnation {
    fn signal(&self, signal: Signal) {
        let _ = self.signals.send(signal);
    }
}

/// Where the bridge reports to.
#[derive(Clone)]
pub struct BridgePeers {
    /// The Router (envelopes, registration).
    pub router: Addr<Router>,
    /// The Broker (process table).
    pub broker: Recipient<TrackProcess>,
    /// The Broker again: a worker that reached `recycle.max_age_ms`.
    pub recycle: Recipient<RecycleDue>,
    /// Sysmon (pids to sample).
    pub sysmon: Addr<Sysmon>,
    /// The LogStore (stderr pipes).
    pub logs: Addr<LogStore>,
}

/// The bridge actor of one process id.
pub struct Bridge {
    id: ByteString,
    service: ByteString,
    spec: Arc<ServiceConfig>,
    config: BrokerConfig,
    peers: BridgePeers,
    status: ProcessStatus,
    /// Restarts so far and the policy's state (backoff, recent restarts).
    restarts: Restarts,
    exit_code: Option<i32>,
    started_at: Option<SystemTime>,
    pid: Option<u32>,
    generation: u64,
    child: Option<Incarnation>,
    restart_timer: Option<SpawnHandle>,
    first_start: Option<oneshot::Sender<SpawnedProcess>>,
    stop_waiters: Vec<oneshot::Sender<()>>,
    stopping: bool,
    /// Bad-frame warnings of this process, a few a second.
    warnings: LogLimit,
    /// While stopping: when stdout last brought something (is it quiet?).
    last_read: Instant,
    /// How the last incarnation ended (for the restart line in its log).
    last_exit: Option<String>,
}

impl Bridge {
    /// A bridge for worker `id` of `spec`. It spawns the child when started;
    /// `first_start` learns how the first start went (ready, or failed).
    pub fn new(
        id: ByteString,
        spec: Arc<ServiceConfig>,
        config: BrokerConfig,
        peers: BridgePeers,
        first_start: oneshot::Sender<SpawnedProcess>,
    ) -> Self {
        Self {
            restarts: Restarts::new(spec.restart, 0),
            service: spec.name.as_str().into(),
            id,
            spec,
            config,
            peers,
            status: ProcessStatus::Starting,
            exit_code: None,
            started_at: None,
            pid: None,
            generation: 0,
            child: None,
            restart_timer: None,
            first_start: Some(first_start),
            stop_waiters: Vec::new(),
            stopping: false,
            warnings: LogLimit::default(),
            last_read: Instant::now(),
            last_exit: None,
        }
    }

    /// Carries over the restart count of an earlier bridge of the same id
    /// (a rolling restart is not a crash, and does not reset the count).
    pub fn with_restarts(mut self, restarts: u32) -> Self {
        self.restarts = Restarts::new(self.spec.restart, restarts);
        self
    }

    fn info(&self) -> ProcessInfo {
        ProcessInfo {
            id: self.id.to_string(),
            service: self.service.to_string(),
            pid: self.pid,
            status: self.status,
            restarts: self.restarts.count(),
            started_at: self
                .started_at
                .map(|t| humantime::format_rfc3339_micros(t).to_string()),
            exit_code: self.exit_code,
        }
    }

    fn set_status(&mut self, status: ProcessStatus) {
        self.status = status;
        self.peers.broker.do_send(TrackProcess(self.info()));
    }

    /// Answers the Spawn that created this bridge, once: ready, or why not.
    fn settle_first_start(&mut self, error: Option<String>) {
        if let Some(tx) = self.first_start.take() {
            let error = match self.status {
                ProcessStatus::Ready => None,
                _ => Some(error.unwrap_or_else(|| format!("{}", self.status))),
            };
            let _ = tx.send(SpawnedProcess {
                id: self.id.to_string(),
                pid: self.pid,
                status: self.status,
                error,
            });
        }
    }

    fn command(&self) -> std::io::Result<Command> {
        let program = if self.spec.command == SELF_COMMAND {
            std::env::current_exe()?
        } else {
            self.spec.command.clone().into()
        };
        // Resolved here, before the fork: user-database look-ups are not
        // safe in the forked child. Checked at load already; the system
        // may have changed since (a user removed, a directory gone).
        let setup = ChildSetup::resolve(&*self.spec)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let mut command = Command::new(program);
        for name in NOT_INHERITED {
            command.env_remove(name);
        }
        if !self.spec.cwd.is_empty() {
            command.current_dir(&self.spec.cwd);
        }
        command
            .args(&self.spec.args)
            .envs(&self.spec.env)
            .env(PROCESS_ID_ENV, &*self.id)
            .env(SERVICE_ENV, &*self.service)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: a terminal's Ctrl-C reaches the broker
            // only, which then stops the children in order;
            // and signals to the group reach the child's own children.
            .process_group(0);
        let broker = nix::unistd::getpid();
        // SAFETY: runs in the forked child before exec; it only makes
        // async-signal-safe system calls (setrlimit, setgroups, setgid,
        // setuid, prctl, getppid, kill) and allocates nothing (`setup` was
        // resolved before the fork).
        unsafe {
            command.pre_exec(move || {
                // Limits, groups, group, user: before the death signal,
                // which a change of credentials clears.
                setup.apply()?;
                // No orphans: the child is killed when the broker dies,
                // however it dies (kill_on_drop cannot help on SIGKILL).
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                // The broker may have died between fork and prctl.
                if nix::unistd::getppid() != broker {
                    let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGKILL);
                }
                Ok(())
            });
        }
        Ok(command)
    }

    fn spawn_child(&mut self, ctx: &mut Context<Self>) {
        self.restart_timer = None;
        let spawned = self.command().and_then(|mut c| c.spawn());
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => return self.spawn_failed(&e, ctx),
        };
        let (Some(stdin), Some(stdout), Some(stderr), Some(pid)) = (
            child.stdin.take(),
            child.stdout.take(),
            child.stderr.take(),
            child.id(),
        ) else {
            // Cannot happen with piped stdio; treat like a failed start.
            let e = std::io::Error::other("child has no pipes");
            return self.spawn_failed(&e, ctx);
        };
        for (name, result) in [
            ("stdin", pipe::set_pipe_size(&stdin, pipe::PIPE_BYTES)),
            ("stdout", pipe::set_pipe_size(&stdout, pipe::PIPE_BYTES)),
        ] {
            if let Err(e) = result {
                tracing::debug!(process = %self.id, pipe = name, error = %e, "pipe size left as is");
            }
        }
        self.generation += 1;
        let generation = self.generation;
        let capacity = self.config.queue_capacity;
        let max = self.config.max_frame_bytes;
        let codec: WireCodec = match self.spec.protocol {
            Protocol::Procbroker => EnvelopeCodec::new(max).into(),
            Protocol::MsgpackRpc => MsgpackRpcCodec::new(
                max,
                &self.spec.calls_to,
                &self.spec.events_to,
                self.config.request_timeout,
            )
            .into(),
        };

        let outbox = Rc::new(Outbox::start(stdin, codec.clone()));
        let pacer = Arc::new(Pacer::default());
        let waker = Arc::clone(&pacer);
        outbox.on_written(move |depth| {
            waker.set_backlog(depth);
            if depth < capacity {
                waker.wake();
            }
        });
        let full = Rc::clone(&outbox);
        let frames = Paced::new(
            Batches::new(stdout, codec, READ_BATCH),
            Arc::clone(&pacer),
            move || full.depth() >= capacity,
        )
        .map(move |batch| (generation, batch));
        let stdout = ctx.add_stream(frames);

        match stderr.into_owned_fd() {
            Ok(fd) => self.peers.logs.do_send(AttachStderr {
                id: self.id.to_string(),
                pid,
                stderr: fd,
                previous: self.last_exit.take(),
            }),
            Err(e) => {
                tracing::error!(process = %self.id, error = %e, "cannot hand over the child's stderr; its lines are lost");
            }
        }
        let (signals, signal_rx) = mpsc::unbounded_channel();
        actix::spawn(watch(child, signal_rx, ctx.address(), generation));

        let router = &self.peers.router;
        let inbox = Rc::new(Inbox::new(
            self.id.clone(),
            capacity,
            &outbox,
            Arc::clone(&pacer),
            router.clone().recipient(),
        ));
        let link = Rc::new(RouterLink::new(self.id.clone(), router.clone().recipient()));
        let ready = !self.spec.awaits_ready();
        router.do_send(RegisterProcess {
            ready,
            pacer: Some(Arc::clone(&pacer)),
            inbox: Some(Handoff::child(Rc::clone(&inbox), Rc::clone(&link))),
            takes_cancel: self.spec.protocol == Protocol::Procbroker,
            ..RegisterProcess::new(
                self.id.clone(),
                self.service.clone(),
                ctx.address().recipient(),
            )
        });
        self.peers.sysmon.do_send(Watch {
            id: self.id.to_string(),
            pid,
            max_rss_kb: self.spec.recycle.max_rss_kb,
        });
        let ready_timer = (!ready).then(|| {
            let timeout = Duration::from_millis(self.spec.ready_timeout_ms);
            ctx.run_later(timeout, move |bridge, _| bridge.ready_timed_out(generation))
        });
        self.child = Some(Incarnation {
            generation,
            pid,
            started: Instant::now(),
            ready,
            outbox,
            inbox,
            link,
            pacer,
            stdout,
            signals,
            ready_timer,
            ready_timed_out: false,
            bad_rate: BadFrameRate::new(self.config.max_bad_frames_per_s),
            health: None,
            health_timer: None,
            age_timer: None,
        });
        self.pid = Some(pid);
        self.started_at = Some(SystemTime::now());
        tracing::info!(process = %self.id, pid, restarts = self.restarts.count(), "child started");
        if self.spec.protocol == Protocol::MsgpackRpc
            && !ready
            && let Some(child) = &self.child
        {
            // Its answer, whatever it is, makes the worker ready.
            let probe =
                Envelope::request(self.id.clone(), self.spec.ready_probe.as_str(), PROBE_ID)
                    .with_source(BROKER);
            let _ = child.outbox.push(&probe);
        }
        if ready {
            self.set_status(ProcessStatus::Ready);
            self.settle_first_start(None);
            self.start_health(ctx);
            self.start_age_limit(ctx);
        } else {
            self.set_status(ProcessStatus::Starting);
        }
    }

    fn spawn_failed(&mut self, e: &std::io::Error, ctx: &mut Context<Self>) {
        tracing::error!(process = %self.id, command = %self.spec.command, error = %e, "cannot start child");
        self.pid = None;
        if self.first_start.is_some() {
            // The very first start: the command itself cannot run (missing,
            // not executable). Retrying will not fix that; say so now.
            self.set_status(ProcessStatus::Failed);
            self.settle_first_start(Some(format!("cannot run {:?}: {e}", self.spec.command)));
            self.finish_stop(ctx);
            return;
        }
        // It ran before (the file went away, fds ran out…): a failed restart,
        // under the same policy as an exit.
        self.restart_or_give_up(&format!("could not be started ({e})"), Duration::ZERO, ctx);
    }

    fn ready_timed_out(&mut self, generation: u64) {
        let Some(child) = self.child.as_mut().filter(|c| c.generation == generation) else {
            return;
        };
        child.ready_timer = None;
        if child.ready {
            return;
        }
        tracing::warn!(process = %self.id, timeout_ms = self.spec.ready_timeout_ms,
            "no ready event in time; killing the child");
        child.ready_timed_out = true;
        child.signal(Signal::SIGKILL);
    }

    fn became_ready(&mut self, ctx: &mut Context<Self>) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if child.ready || self.stopping {
            return;
        }
        child.ready = true;
        if let Some(timer) = child.ready_timer.take() {
            ctx.cancel_future(timer);
        }
        self.peers.router.do_send(SetReady {
            id: self.id.clone(),
            ready: true,
        });
        self.set_status(ProcessStatus::Ready);
        self.settle_first_start(None);
        self.start_health(ctx);
        self.start_age_limit(ctx);
    }

    /// Once the current incarnation has been ready for `recycle.max_age_ms`
    /// (if the service has it), tells the Broker it is due for recycling.
    fn start_age_limit(&mut self, ctx: &mut Context<Self>) {
        let max_age = self.spec.recycle.max_age_ms;
        let Some(child) = self.child.as_mut().filter(|_| max_age > 0) else {
            return;
        };
        let generation = child.generation;
        child.age_timer = Some(
            ctx.run_later(Duration::from_millis(max_age), move |bridge, _| {
                let current = bridge.child.as_mut().filter(|c| c.generation == generation);
                if let Some(child) = current {
                    child.age_timer = None;
                    if !bridge.stopping {
                        bridge.peers.recycle.do_send(RecycleDue {
                            id: bridge.id.clone(),
                            reason: RecycleReason::MaxAge,
                        });
                    }
                }
            }),
        );
    }

    /// Starts the health checks of the current incarnation, if the service
    /// has them: one every `interval_ms` while no earlier one is waiting.
    fn start_health(&mut self, ctx: &mut Context<Self>) {
        let Some(check) = self.spec.health.clone() else {
            return;
        };
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let generation = child.generation;
        let interval = Duration::from_millis(check.interval_ms.max(1));
        child.health = Some(Health::new(check));
        child.health_timer = Some(ctx.run_interval(interval, move |bridge, ctx| {
            bridge.health_tick(generation, ctx);
        }));
    }

    fn health_tick(&mut self, generation: u64, ctx: &mut Context<Self>) {
        if self.stopping {
            return;
        }
        let Some(child) = self.child.as_mut().filter(|c| c.generation == generation) else {
            return;
        };
        let Some(health) = child.health.as_mut() else {
            return;
        };
        let Some(request) = health.start(&self.id) else {
            return;
        };
        let correlation_id = request.correlation_id;
        let timeout = Duration::from_millis(health.check().timeout_ms);
        // Into the child's stdin like any request (not through the Router).
        let _ = child.outbox.push(&request);
        ctx.run_later(timeout, move |bridge, ctx| {
            let verdict = bridge
                .child
                .as_mut()
                .filter(|c| c.generation == generation)
                .and_then(|c| c.health.as_mut())
                .and_then(|h| h.timed_out(correlation_id));
            if let Some(verdict) = verdict {
                bridge.health_verdict(verdict, ctx);
            }
        });
    }

    /// Acts on a health check's outcome: counted, logged (a few a second),
    /// and the worker killed once enough have failed in a row.
    fn health_verdict(&mut self, verdict: Verdict, ctx: &mut Context<Self>) {
        let Verdict::Failed {
            reason,
            in_a_row,
            kill,
        } = verdict
        else {
            return;
        };
        self.peers.router.do_send(HealthFailure {
            id: self.id.clone(),
        });
        if kill {
            tracing::error!(process = %self.id, in_a_row, "health check failed ({reason}); killing the worker");
            self.kill_and_stop_reading(ctx);
        } else if let LogLine::Log { suppressed } = self.warnings.check(Instant::now()) {
            tracing::warn!(process = %self.id, in_a_row, suppressed, "health check failed ({reason})");
        }
    }

    fn exited(
        &mut self,
        generation: u64,
        status: std::io::Result<ExitStatus>,
        ctx: &mut Context<Self>,
    ) {
        let Some(child) = self.child.take_if(|c| c.generation == generation) else {
            return;
        };
        ctx.cancel_future(child.stdout);
        for timer in [child.ready_timer, child.health_timer, child.age_timer]
            .into_iter()
            .flatten()
        {
            ctx.cancel_future(timer);
        }
        child.outbox.discard();
        let mut reason = match &status {
            Ok(s) => describe(s),
            Err(e) => format!("wait failed: {e}"),
        };
        if child.ready_timed_out {
            reason = format!(
                "sent no ready event within ready_timeout_ms = {} (killed)",
                self.spec.ready_timeout_ms
            );
        } else if !child.ready {
            reason.push_str(" before it was ready");
        }
        self.exit_code = status.as_ref().ok().and_then(ExitStatus::code);
        self.last_exit = Some(reason.clone());
        self.peers.router.do_send(RemoveProcess {
            id: self.id.clone(),
            reason: reason.clone(),
        });
        self.peers.sysmon.do_send(Unwatch {
            id: self.id.to_string(),
        });
        let uptime = child.started.elapsed();
        if self.stopping {
            tracing::info!(process = %self.id, pid = child.pid, "child stopped ({reason})");
            self.finish_stop(ctx);
            return;
        }
        // A clean exit of a worker that served is its own decision; one
        // before `ready`, whatever its status, is a failed start.
        if self.exit_code == Some(0) && child.ready {
            tracing::info!(process = %self.id, pid = child.pid, "child exited with status 0; not restarted");
            self.set_status(ProcessStatus::Stopped);
            self.settle_first_start(None);
            return;
        }
        self.restart_or_give_up(&reason, uptime, ctx);
    }

    /// Carries out the restart policy (module `restart_policy`) after a
    /// child that was `up` this long ended for `reason`.
    fn restart_or_give_up(&mut self, reason: &str, up: Duration, ctx: &mut Context<Self>) {
        match self.restarts.after_exit(Instant::now(), up) {
            Decision::GiveUp => {
                tracing::error!(process = %self.id, restarts = self.restarts.count(),
                    window_ms = self.restarts.policy().window_ms,
                    "child {reason}; max_restarts reached, giving up");
                self.set_status(ProcessStatus::Failed);
                self.settle_first_start(Some(reason.to_owned()));
            }
            Decision::RestartAfter(delay) => {
                tracing::warn!(process = %self.id, delay_ms = delay.as_millis() as u64,
                    "child {reason}; restarting");
                self.set_status(ProcessStatus::Restarting);
                self.settle_first_start(Some(reason.to_owned()));
                self.restart_timer = Some(ctx.run_later(delay, |bridge, ctx| {
                    bridge.restarts.restarting();
                    bridge.spawn_child(ctx);
                }));
            }
        }
    }

    /// Whether `envelope` answers this incarnation's `ready_probe`.
    fn is_probe_reply(&self, envelope: &Envelope) -> bool {
        self.spec.protocol == Protocol::MsgpackRpc
            && matches!(envelope.kind, MessageType::Response | MessageType::Error)
            && envelope.correlation_id == PROBE_ID
            && &*envelope.target == BROKER
    }

    /// Takes note of an envelope on its way to the Router.
    fn inspect(&mut self, envelope: &Envelope, ctx: &mut Context<Self>) {
        let is_ready_event = envelope.kind == MessageType::Event
            && &*envelope.target == BROKER
            && &*envelope.id == READY_EVENT;
        if is_ready_event {
            self.became_ready(ctx);
        }
        if let Some(child) = &self.child {
            child.pacer.routed(Pacer::weight(envelope));
        }
    }

    /// A frame that is not an envelope: logged (a few a second), and counted
    /// by the Router. One that looks like a request is reported at once, so
    /// its sender gets `bad_request`; the rest are reported as one count per
    /// pipe read. Returns true if it was counted here and not yet reported.
    fn invalid_envelope(&mut self, invalid: InvalidEnvelope) -> bool {
        if let LogLine::Log { suppressed } = self.warnings.check(Instant::now()) {
            tracing::warn!(process = %self.id, len = invalid.len, error = %invalid.error,
                suppressed, "invalid envelope dropped");
        }
        if invalid.request.is_none() {
            return true;
        }
        self.peers.router.do_send(BadFrame {
            from: self.id.clone(),
            count: 1,
            error: invalid.error.to_string(),
            request: invalid.request,
        });
        false
    }

    /// Not a frame at all (oversize length, torn frame, stray bytes): the
    /// stream is out of sync, so the child is killed and restarted.
    fn out_of_sync(&mut self, reason: &str, ctx: &mut Context<Self>) {
        tracing::error!(process = %self.id, "stdout is out of sync ({reason}); killing the child");
        self.peers.router.do_send(BadFrame {
            from: self.id.clone(),
            count: 1,
            error: reason.to_owned(),
            request: None,
        });
        self.kill_and_stop_reading(ctx);
    }

    /// Kills this incarnation and reads nothing more from it; the exit
    /// watcher reports the exit, which fails its requests and restarts it.
    fn kill_and_stop_reading(&mut self, ctx: &mut Context<Self>) {
        if let Some(child) = &self.child {
            child.signal(Signal::SIGKILL);
            ctx.cancel_future(child.stdout);
        }
    }
}

/// How a child ended, for logs and error messages.
fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {signal}"),
        },
        _ => status.to_string(),
    }
}

/// Owns the child: sends it signals on request and reaps it when it exits.
async fn watch(
    mut child: Child,
    mut signals: mpsc::UnboundedReceiver<Signal>,
    bridge: Addr<Bridge>,
    generation: u64,
) {
    // The child leads its own process group (`process_group(0)`), so the
    // group's id is its pid; the group outlives it while its own children
    // (our grandchildren) live, and the kernel does not reuse a pid that is
    // still a group's id.
    let group = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(nix::unistd::Pid::from_raw);
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            Some(signal) = signals.recv() => {
                // Not reaped yet (wait has not returned): the group is ours.
                // The whole group, so grandchildren go too (killasgroup).
                if let Some(group) = group {
                    let _ = nix::sys::signal::killpg(group, signal);
                }
            }
        }
    };
    // Whatever the child left behind in its group goes with it: no orphans.
    if let Some(group) = group {
        let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
    }
    bridge.do_send(Exited { generation, status });
}

impl Actor for Bridge {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.spawn_child(ctx);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        // Last resort (the System is going down): kill_on_drop does the rest.
        if let Some(child) = &self.child {
            child.signal(Signal::SIGKILL);
        }
    }
}

impl StreamHandler<(u64, Vec<StdoutItem>)> for Bridge {
    fn handle(&mut self, (generation, items): (u64, Vec<StdoutItem>), ctx: &mut Self::Context) {
        if self
            .child
            .as_ref()
            .is_none_or(|c| c.generation != generation)
        {
            return;
        }
        if self.stopping {
            // Only a stopping bridge asks whether stdout went quiet.
            self.last_read = Instant::now();
        }
        let mut envelopes = Envelopes::with_capacity(items.len());
        let (mut bad, mut unreported) = (0u64, 0u64);
        let mut out_of_sync = None;
        for item in items {
            match item {
                Ok(Ok(envelope)) if self.is_probe_reply(&envelope) => {
                    if envelope.kind == MessageType::Error {
                        tracing::warn!(process = %self.id, probe = %self.spec.ready_probe,
                            error = envelope.error.as_deref().unwrap_or(""),
                            "ready probe answered with an error; ready all the same");
                    }
                    self.became_ready(ctx);
                }
                Ok(Ok(envelope)) => {
                    // A health check's reply stays here.
                    let check = self
                        .child
                        .as_mut()
                        .and_then(|c| c.health.as_mut())
                        .and_then(|h| h.reply(&envelope));
                    match check {
                        Some(Some(verdict)) => self.health_verdict(verdict, ctx),
                        Some(None) => {}
                        None => {
                            self.inspect(&envelope, ctx);
                            envelopes.push(envelope);
                        }
                    }
                }
                Ok(Err(invalid)) => {
                    bad += 1;
                    unreported += u64::from(self.invalid_envelope(*invalid));
                }
                // The stream ends after a frame error.
                Err(e) => out_of_sync = Some(e.to_string()),
            }
        }
        if !envelopes.is_empty()
            && let Some(child) = &self.child
        {
            child.link.route(envelopes);
        }
        if unreported > 0 {
            self.peers.router.do_send(BadFrame {
                from: self.id.clone(),
                count: unreported,
                error: "invalid envelopes".into(),
                request: None,
            });
        }
        if let Some(reason) = out_of_sync {
            return self.out_of_sync(&reason, ctx);
        }
        let limit = self.config.max_bad_frames_per_s;
        if bad > 0
            && let Some(child) = self.child.as_mut()
            && child.bad_rate.exceeded(bad, Instant::now())
        {
            // Mostly garbage: as good as out of sync. Said once; the
            // incarnation is not read any further.
            tracing::error!(process = %self.id, limit,
                "more than {limit} invalid envelopes in one second; killing the child");
            self.kill_and_stop_reading(ctx);
        }
    }

    /// End of stdout: the exit watcher reports the exit; nothing to do here
    /// (the default would stop the actor).
    fn finished(&mut self, _: &mut Self::Context) {}
}

impl Handler<Deliver> for Bridge {
    type Result = ();

    /// Envelopes routed by a Router on another thread (one on this thread
    /// queues them through the inbox itself).
    fn handle(&mut self, Deliver(envelopes): Deliver, _: &mut Self::Context) {
        match &self.child {
            Some(child) => child.inbox.deliver(envelopes),
            // Between incarnations: requests were already failed at removal.
            None => tracing::debug!(process = %self.id, count = envelopes.len(),
                "no child; envelopes dropped"),
        }
    }
}

impl Handler<Exited> for Bridge {
    type Result = ();

    fn handle(&mut self, msg: Exited, ctx: &mut Self::Context) {
        self.exited(msg.generation, msg.status, ctx);
    }
}

/// Stopping, the whole sequence in one place:
///
/// 1. out of rotation at once (`SetReady false`), no restart pending;
/// 2. the `shutdown` event down stdin (a MessagePack-RPC program has none);
/// 3. EOF once stdout has been quiet for [`STOP_QUIET`], so whatever the
///    child sent before it read `shutdown` is answered first;
/// 4. SIGTERM to its process group at half of `kill_timeout`, SIGKILL at
///    all of it (EOF forced with each);
/// 5. once the exit watcher reports the exit: `stopped`, the waiters
///    answered, the actor stopped.
impl Bridge {
    /// Steps 1 to 4 (once; a second `StopProcess` only waits).
    fn begin_stop(&mut self, ctx: &mut Context<Self>) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        if let Some(timer) = self.restart_timer.take() {
            ctx.cancel_future(timer);
        }
        match &self.child {
            None => self.finish_stop(ctx),
            Some(child) => {
                self.peers.router.do_send(SetReady {
                    id: self.id.clone(),
                    ready: false,
                });
                // A MessagePack-RPC program has no `shutdown`: EOF is its stop.
                if self.spec.protocol == Protocol::Procbroker {
                    let _ = child.outbox.push(
                        &Envelope::event(self.id.clone(), SHUTDOWN_EVENT).with_source(BROKER),
                    );
                }
                // Not EOF yet: what the child sent before it read
                // `shutdown` is still answered (`shutting_down` while the
                // broker drains) on this stdin. EOF once it is quiet.
                let generation = child.generation;
                self.last_read = Instant::now();
                self.close_when_quiet(generation, ctx);
                let kill = self.config.kill_timeout;
                let signal_later = |signal| {
                    move |bridge: &mut Bridge, _: &mut Context<Bridge>| {
                        if let Some(child) =
                            bridge.child.as_ref().filter(|c| c.generation == generation)
                        {
                            tracing::warn!(process = %bridge.id, %signal, "child still running; signalling");
                            child.outbox.close();
                            child.signal(signal);
                        }
                    }
                };
                ctx.run_later(kill / 2, signal_later(Signal::SIGTERM));
                ctx.run_later(kill, signal_later(Signal::SIGKILL));
                self.set_status(ProcessStatus::Stopping);
            }
        }
    }

    /// Closes the stopping child's stdin (EOF: "exit now") once its stdout
    /// has been quiet for [`STOP_QUIET`], so every request it wrote before it
    /// read `shutdown` has its reply written before EOF.
    fn close_when_quiet(&mut self, generation: u64, ctx: &mut Context<Self>) {
        ctx.run_later(STOP_QUIET_POLL, move |bridge, ctx| {
            let Some(child) = bridge.child.as_ref().filter(|c| c.generation == generation) else {
                return;
            };
            if bridge.last_read.elapsed() >= STOP_QUIET {
                child.outbox.close();
            } else {
                bridge.close_when_quiet(generation, ctx);
            }
        });
    }

    /// Step 5, also reached without a child (stopped between incarnations,
    /// or a first start that could not run).
    fn finish_stop(&mut self, ctx: &mut Context<Self>) {
        if self.status != ProcessStatus::Failed || self.stopping {
            self.set_status(ProcessStatus::Stopped);
        }
        self.settle_first_start(Some("stopped before it was ready".to_owned()));
        for waiter in self.stop_waiters.drain(..) {
            let _ = waiter.send(());
        }
        ctx.stop();
    }
}

impl Handler<StopProcess> for Bridge {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: StopProcess, ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.stop_waiters.push(tx);
        self.begin_stop(ctx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}
