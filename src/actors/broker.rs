//! Broker: the control plane. It is the process `broker` in the routing table
//! and answers the broker's RPCs; it keeps the process table that
//! `ListProcesses` shows and reports life-cycle changes to the MetricsStore.
//!
//! Every reply copies the request's `correlation_id` (it is built from the
//! request itself), so no RPC can lose it the way v2e's did.
//!
//! It owns the subprocess services: [`SpawnService`] (and the `Spawn` RPC)
//! starts one [`Bridge`] per worker and answers once each worker is ready or
//! its first start failed; [`StopTarget`] (and `Stop`) stops a process or a
//! whole service and answers once the children are reaped. Bridges report
//! every status change back ([`TrackProcess`]), which is what
//! `ListProcesses` shows.
//!
//! It recycles workers: a worker that reaches a limit of its service's
//! `recycle` ([`RecycleDue`]: from its bridge at `max_age_ms`, from Sysmon
//! at `max_rss_kb`, from the Router at `max_requests`) is replaced as a
//! rolling restart replaces one worker. Whose turn it is (one worker of a
//! service at a time, rolling restarts included) is decided in module
//! `recycling`.

use actix::prelude::*;
use bytestring::ByteString;
use std::collections::BTreeMap;

use futures_util::future::join_all;
use std::sync::Arc;
use tokio::sync::oneshot;

use super::bridge::{Bridge, BridgePeers};
use super::log_store::{ForgetLogs, LogStore};
use super::messages::{
    CancelInFlight, CountRecycle, Deliver, FlushMetrics, ForgetProcesses, InFlightOf, ListNodes,
    ProcessLifecycle, RecycleDue, RecycleReason, Route, SetReady, SetRecycler, SetServicePolicy,
    StopProcess, SubmitMetrics, TrackProcess,
};
use super::metrics_store::{MetricsStore, fresh_stats};
use super::recycling::{Due, Recycling, Turn};
use super::router::Router;
use super::sysmon::Sysmon;
use crate::config::{BrokerConfig, ServiceConfig};
use crate::names::{self, BROKER, CALLER, NameError, service_of};
use crate::open_files;
use crate::protocol::rpc::{
    BrokerMethod, Empty, FailedWorker, MessageCount, ProcessInfo, ProcessStatus, RestartReply,
    RestartRequest, ScaleReply, ScaleRequest, SpawnRequest, SpawnedProcess, StopReply, StopRequest,
    SubmitProcessMetrics, SubmitProcessMetricsReply,
};
use crate::protocol::{Envelope, ErrorCode, MessageType, Payload};

/// Starts a subprocess service: one child per worker. Answers once every
/// worker is ready or its first start failed (within `ready_timeout`).
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<SpawnedProcess>, SpawnError>")]
pub struct SpawnService(pub ServiceConfig);

/// Stops a process (`echo.2`) or every worker of a service (`echo`); answers
/// with the ids stopped, once their children are reaped.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<String>, StopError>")]
pub struct StopTarget(pub String);

/// The process table, as `ListProcesses` answers it, asked directly (not as
/// a request through the Router: readiness probes should not count as
/// traffic).
#[derive(Debug, Message)]
#[rtype(result = "Vec<ProcessInfo>")]
pub struct GetProcesses;

/// Stops every subprocess (`shutdown`, EOF, SIGTERM, SIGKILL) and answers
/// with the ids stopped once all are reaped. In the reverse of the start
/// order: every worker of a service has exited before any worker of a
/// service it `depends_on` gets `shutdown`; services that do not depend on
/// each other stop side by side.
#[derive(Debug, Message)]
#[rtype(result = "Vec<String>")]
pub struct StopAll;

/// Why a service was not spawned.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The service name is invalid or reserved.
    #[error(transparent)]
    Name(#[from] NameError),
    /// `workers = 0`.
    #[error("service {0:?}: workers must be at least 1")]
    NoWorkers(String),
    /// A service of that name has live processes (stop it first).
    #[error("service {0:?} is already running; stop it first")]
    Running(String),
    /// More workers than `max_workers` allows.
    #[error("service {service:?}: {workers} workers is more than broker.max_workers = {max}")]
    TooMany {
        /// The service.
        service: String,
        /// Workers asked for.
        workers: u32,
        /// The bound.
        max: u32,
    },
    /// The open-files limit cannot hold that many workers.
    #[error("service {service:?}: {error}")]
    NoRoom {
        /// The service.
        service: String,
        /// The arithmetic.
        error: open_files::NoRoom,
    },
    /// No worker could be started: the command cannot run.
    #[error("service {service:?}: cannot run {command:?} (see the log for the OS error)")]
    CannotRun {
        /// The service.
        service: String,
        /// Its command.
        command: String,
    },
    /// A setting out of range (the error names the key).
    #[error("service {service:?}: {key}: {message}")]
    Setting {
        /// The service.
        service: String,
        /// The key (`recycle.max_age_ms`).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Its `limits`, `user`, `group` or `cwd` cannot be carried out (the
    /// error names the key).
    #[error("service {service:?}: {error}")]
    RunAs {
        /// The service.
        service: String,
        /// The key and why.
        error: crate::config::run_as::RunAsError,
    },
    /// The broker is shutting down.
    #[error("the broker is not running")]
    Closed,
}

/// Why nothing was stopped.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// No subprocess or subprocess service of that name.
    #[error("no subprocess or subprocess service {0:?}")]
    Unknown(String),
}

struct Worker {
    id: String,
    bridge: Addr<Bridge>,
}

/// Why a control RPC did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No subprocess or subprocess service of that name.
    #[error("no subprocess or subprocess service {0:?}")]
    Unknown(String),
    /// The request does not fit (e.g. `workers = 0`, more workers than the
    /// open-files limit can hold, a command that cannot be run).
    #[error("{0}")]
    Invalid(String),
    /// A rolling restart stopped at a new worker that did not become
    /// ready; the workers after it were not touched and keep serving.
    #[error(
        "rolling restart stopped at {worker}: {reason}; restarted before it: [{}]; \
         not restarted, still serving: [{}]",
        restarted.join(", "),
        untouched.join(", ")
    )]
    RollStopped {
        /// The new worker that did not become ready (left to its restart policy).
        worker: String,
        /// Why.
        reason: String,
        /// Workers restarted before it.
        restarted: Vec<String>,
        /// Workers not restarted.
        untouched: Vec<String>,
    },
    /// Scaling up started none of the new workers.
    #[error(
        "service {service:?}: none of the new workers became ready: {}",
        describe_failed(failed)
    )]
    NoneStarted {
        /// The service.
        service: String,
        /// Each worker and why.
        failed: Vec<FailedWorker>,
    },
    /// The broker is shutting down.
    #[error("the broker is shutting down")]
    ShuttingDown,
}

impl ControlError {
    /// The broker error code a control RPC answers this with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Unknown(_) => ErrorCode::UnknownTarget,
            Self::Invalid(_) => ErrorCode::BadRequest,
            Self::RollStopped { .. } | Self::NoneStarted { .. } => ErrorCode::Unavailable,
            Self::ShuttingDown => ErrorCode::ShuttingDown,
        }
    }
}

/// `sl.1: why; sl.2: why; … and N more`: a few reasons, not thousands.
fn describe_failed(failed: &[FailedWorker]) -> String {
    const SHOWN: usize = 5;
    let mut text = failed
        .iter()
        .take(SHOWN)
        .map(|f| format!("{}: {}", f.id, f.error))
        .collect::<Vec<_>>()
        .join("; ");
    if failed.len() > SHOWN {
        text.push_str(&format!("; and {} more", failed.len() - SHOWN));
    }
    text
}

/// Takes worker `id` out of rotation and waits, up to `timeout`, until the
/// requests already delivered to it are answered.
pub(crate) async fn drain_worker(router: &Addr<Router>, id: &str, timeout: std::time::Duration) {
    let id = ByteString::from(id);
    let _ = router
        .send(SetReady {
            id: id.clone(),
            ready: false,
        })
        .await;
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        match router.send(InFlightOf(id.clone())).await {
            Ok(0) | Err(_) => return,
            Ok(_) => actix::clock::sleep(std::time::Duration::from_millis(5)).await,
        }
    }
    // Out of time: the worker is told to drop what it still has before
    // it is stopped.
    let _ = router.send(CancelInFlight { id: Some(id) }).await;
}

/// How the replacement of one worker went.
enum Replacement {
    /// Its new incarnation is ready and in rotation.
    Ready,
    /// It was not there to replace (scaled away, its service stopped).
    Gone,
    /// The new incarnation did not become ready (why); it is left to its
    /// restart policy.
    NotReady(String),
    /// The broker is stopping: nothing is started.
    ShuttingDown,
}

/// Replaces worker `id` of `service`, as a rolling restart does with each:
/// out of rotation, drained (up to `drain`), stopped, started again, ready.
async fn replace_worker(
    me: &Addr<Broker>,
    router: &Addr<Router>,
    service: &str,
    id: &str,
    drain: std::time::Duration,
) -> Replacement {
    // The worker's current bridge (it may have been restarted by its own
    // policy meanwhile).
    let Ok(Some(bridge)) = me.send(BridgeOf(id.to_owned())).await else {
        return Replacement::Gone;
    };
    drain_worker(router, id, drain).await;
    let _ = bridge.send(StopProcess).await;
    let Ok(Some(started)) = me
        .send(StartAgain {
            service: service.to_owned(),
            id: id.to_owned(),
        })
        .await
    else {
        return Replacement::ShuttingDown;
    };
    match started.await {
        Ok(p) if p.is_ready() => Replacement::Ready,
        Ok(p) => Replacement::NotReady(p.error.unwrap_or_else(|| p.status.to_string())),
        Err(_) => Replacement::NotReady("the broker stopped it".to_owned()),
    }
}

/// A rolling restart of a service asks for the service's turn (see
/// `recycling`); the receiver fires when it may go ahead, and fails if
/// the broker stops first.
#[derive(Message)]
#[rtype(result = "oneshot::Receiver<()>")]
struct TakeTurn(String);

/// The turn of a service is over: the next waiting gets it.
#[derive(Message)]
#[rtype(result = "()")]
struct TurnDone(String);

/// Holds a service's turn; gives it back when dropped, however the
/// rolling restart that took it ends.
struct TurnHeld {
    broker: Addr<Broker>,
    service: String,
}

impl Drop for TurnHeld {
    fn drop(&mut self) {
        self.broker
            .do_send(TurnDone(std::mem::take(&mut self.service)));
    }
}

/// The reply of a handler whose work was refused at once (`Err`) or goes on
/// as a future: the control operations' common shape.
fn respond<T, E: 'static>(
    work: Result<impl Future<Output = T> + 'static, E>,
) -> ResponseFuture<Result<T, E>> {
    match work {
        Ok(work) => Box::pin(async move { Ok(work.await) }),
        Err(e) => Box::pin(async move { Err(e) }),
    }
}

/// [`respond`] for work whose result is itself a `Result`.
fn respond_flat<T, E: 'static>(
    work: Result<impl Future<Output = Result<T, E>> + 'static, E>,
) -> ResponseFuture<Result<T, E>> {
    match work {
        Ok(work) => Box::pin(work),
        Err(e) => Box::pin(async move { Err(e) }),
    }
}

/// Workers removed from the configuration (scaled down, or their service
/// removed), once stopped: dropped from the process table and the stats.
#[derive(Message)]
#[rtype(result = "()")]
struct Forget(Vec<String>);

/// Removes a subprocess service, once its workers are stopped, from the
/// process table and the stats (the totals keep what it did).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ForgetService(pub String);

/// The current bridge of worker `id` (internal to a rolling restart).
#[derive(Message)]
#[rtype(result = "Option<Addr<Bridge>>")]
struct BridgeOf(String);

/// Starts worker `id` of `service` again after a rolling restart stopped it
/// (its `restarts` carried over); answers with its first-start receiver.
#[derive(Message)]
#[rtype(result = "Option<oneshot::Receiver<SpawnedProcess>>")]
struct StartAgain {
    service: String,
    id: String,
}

/// Sets a subprocess service's number of workers ([`ScaleReply`]).
#[derive(Debug, Message)]
#[rtype(result = "Result<ScaleReply, ControlError>")]
pub struct ScaleService {
    /// The service.
    pub service: String,
    /// Its workers from now on.
    pub workers: u32,
}

/// Gives a running subprocess service new settings (its number of workers
/// aside: that is a [`ScaleService`]) and restarts it, rolling, so each
/// worker runs with them; answers with the ids restarted.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<String>, ControlError>")]
pub struct Reconfigure(pub ServiceConfig);

/// Restarts a process or every worker of a service, one at a time; answers
/// with the ids restarted.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<String>, ControlError>")]
pub struct RestartTarget(pub String);

/// The Broker actor.
pub struct Broker {
    config: BrokerConfig,
    router: Addr<Router>,
    metrics: Addr<MetricsStore>,
    sysmon: Addr<Sysmon>,
    logs: Addr<LogStore>,
    processes: BTreeMap<String, ProcessInfo>,
    services: BTreeMap<String, Vec<Worker>>,
    /// How each subprocess service was started (for Scale and Restart).
    specs: BTreeMap<String, Arc<ServiceConfig>>,
    id: ByteString,
    /// Set by [`StopAll`]: nothing more is started (a roll or a scale in
    /// progress stops where it is).
    stopping: bool,
    /// Whose turn it is to be replaced, per service: a recycled worker or
    /// a rolling restart (that waits for the turn on the channel).
    recycling: Recycling<oneshot::Sender<()>>,
}

impl Broker {
    /// A Broker answering through `router`.
    pub fn new(
        config: BrokerConfig,
        router: Addr<Router>,
        metrics: Addr<MetricsStore>,
        sysmon: Addr<Sysmon>,
        logs: Addr<LogStore>,
    ) -> Self {
        Self {
            config,
            router,
            metrics,
            sysmon,
            logs,
            processes: BTreeMap::new(),
            services: BTreeMap::new(),
            specs: BTreeMap::new(),
            id: ByteString::from_static(BROKER),
            stopping: false,
            recycling: Recycling::default(),
        }
    }

    /// Tells the Router how `spec`'s service spreads its requests and
    /// after how many requests a worker is due for recycling; before its
    /// workers register, so the first request already follows it.
    fn set_policy(&self, spec: &ServiceConfig) {
        self.router.do_send(SetServicePolicy {
            service: spec.name.as_str().into(),
            balance: spec.balance,
            max_requests: spec.recycle.max_requests,
        });
    }

    /// Checks what the config file's loader checks too, for services that
    /// do not come from a file (the embedding API).
    fn check_settings(&self, spec: &ServiceConfig) -> Result<(), (String, String)> {
        spec.recycle
            .check(self.config.sysmon_interval.is_some_and(|d| !d.is_zero()))
            .map_err(|(key, message)| (format!("recycle.{key}"), message))
    }

    fn spawn_service(
        &mut self,
        spec: ServiceConfig,
        ctx: &mut Context<Self>,
    ) -> Result<impl Future<Output = Result<Vec<SpawnedProcess>, SpawnError>> + use<>, SpawnError>
    {
        names::check_service_name(&spec.name)?;
        if self.stopping {
            return Err(SpawnError::Closed);
        }
        if spec.workers == 0 {
            return Err(SpawnError::NoWorkers(spec.name));
        }
        if spec.workers > self.config.max_workers {
            return Err(SpawnError::TooMany {
                service: spec.name,
                workers: spec.workers,
                max: self.config.max_workers,
            });
        }
        if let Err(e) = open_files::check(u64::from(spec.workers)) {
            return Err(SpawnError::NoRoom {
                service: spec.name,
                error: e,
            });
        }
        if let Err((key, message)) = self.check_settings(&spec) {
            return Err(SpawnError::Setting {
                service: spec.name,
                key,
                message,
            });
        }
        if let Err(error) = crate::config::run_as::ChildSetup::resolve(&spec) {
            return Err(SpawnError::RunAs {
                service: spec.name,
                error,
            });
        }
        // In-process workers of that name (they have no bridges).
        let in_process = !self.services.contains_key(&spec.name)
            && self.processes.values().any(|p| p.service == spec.name);
        let live = self
            .services
            .get(&spec.name)
            .is_some_and(|workers| workers.iter().any(|w| w.bridge.connected()));
        if live || in_process {
            return Err(SpawnError::Running(spec.name));
        }
        self.set_policy(&spec);
        let spec = Arc::new(spec);
        let mut workers = Vec::with_capacity(spec.workers as usize);
        let mut starts = Vec::with_capacity(spec.workers as usize);
        for index in 0..spec.workers {
            let (worker, started) = self.start_worker(&spec, index, 0, ctx);
            workers.push(worker);
            starts.push(started);
        }
        self.specs.insert(spec.name.clone(), Arc::clone(&spec));
        self.services.insert(spec.name.clone(), workers);
        Ok(async move {
            let mut spawned = Vec::with_capacity(starts.len());
            for start in join_all(starts).await {
                spawned.push(start.map_err(|_| SpawnError::Closed)?);
            }
            if spawned.iter().all(|p| p.pid.is_none()) {
                return Err(SpawnError::CannotRun {
                    service: spec.name.clone(),
                    command: spec.command.clone(),
                });
            }
            Ok(spawned)
        })
    }

    /// Starts the bridge of worker `index` of `spec` (which spawns the child);
    /// the receiver learns how its first start went.
    fn start_worker(
        &self,
        spec: &Arc<ServiceConfig>,
        index: u32,
        restarts: u32,
        ctx: &mut Context<Self>,
    ) -> (Worker, oneshot::Receiver<SpawnedProcess>) {
        let peers = BridgePeers {
            router: self.router.clone(),
            broker: ctx.address().recipient(),
            recycle: ctx.address().recipient(),
            sysmon: self.sysmon.clone(),
            logs: self.logs.clone(),
        };
        let id = names::process_id(&spec.name, index);
        let (tx, rx) = oneshot::channel();
        let bridge = Bridge::new(
            id.as_str().into(),
            Arc::clone(spec),
            self.config.clone(),
            peers,
            tx,
        )
        .with_restarts(restarts)
        .start();
        (Worker { id, bridge }, rx)
    }

    /// `Scale`: starts `name.N…` up to `workers` (and starts again any
    /// worker below that whose first start failed for good), or drains and
    /// stops the highest-numbered workers down to it. The
    /// reply says which new workers did not become ready, and why; none
    /// ready is an error.
    fn scale(
        &mut self,
        service: &str,
        workers: u32,
        ctx: &mut Context<Self>,
    ) -> Result<impl Future<Output = Result<ScaleReply, ControlError>> + use<>, ControlError> {
        if self.stopping {
            return Err(ControlError::ShuttingDown);
        }
        if workers == 0 {
            return Err(ControlError::Invalid(format!(
                "service {service:?}: workers must be at least 1 (Stop removes a service)"
            )));
        }
        if workers > self.config.max_workers {
            return Err(ControlError::Invalid(format!(
                "service {service:?}: {workers} workers is more than broker.max_workers = {}",
                self.config.max_workers
            )));
        }
        let (Some(spec), Some(current)) = (self.specs.get(service), self.services.get(service))
        else {
            return Err(ControlError::Unknown(service.to_owned()));
        };
        let spec = Arc::clone(spec);
        let have = u32::try_from(current.len()).unwrap_or(u32::MAX);
        // Workers kept whose bridge is gone: their command could not run
        // (descriptors ran out, the file was missing). Started again here.
        let gone: Vec<u32> = current
            .iter()
            .take(workers as usize)
            .enumerate()
            .filter(|(_, w)| !w.bridge.connected())
            .filter_map(|(index, _)| u32::try_from(index).ok())
            .collect();
        let new = u64::from(workers.saturating_sub(have)) + gone.len() as u64;
        if let Err(e) = open_files::check(new) {
            return Err(ControlError::Invalid(format!(
                "service {service:?}: scaling to {workers}: {e}"
            )));
        }
        let mut starts = Vec::new();
        for index in gone.into_iter().chain(have..workers.max(have)) {
            let (worker, started) = self.start_worker(&spec, index, 0, ctx);
            starts.push((worker.id.clone(), started));
            if let Some(list) = self.services.get_mut(service) {
                match list.get_mut(index as usize) {
                    Some(slot) => *slot = worker,
                    None => list.push(worker),
                }
            }
        }
        let mut retired = Vec::new();
        if workers < have
            && let Some(list) = self.services.get_mut(service)
        {
            retired = list.split_off(workers as usize);
        }
        let mut resized = (*spec).clone();
        resized.workers = workers;
        self.specs.insert(service.to_owned(), Arc::new(resized));
        let router = self.router.clone();
        let me = ctx.address();
        let drain = self.config.drain_timeout;
        let service = service.to_owned();
        Ok(async move {
            let asked = starts.len();
            let mut started = Vec::new();
            let mut failed = Vec::new();
            for (id, start) in starts {
                match start.await {
                    Ok(p) if p.is_ready() => started.push(id),
                    Ok(p) => failed.push(FailedWorker {
                        id,
                        error: p.error.unwrap_or_else(|| p.status.to_string()),
                    }),
                    Err(_) => failed.push(FailedWorker {
                        id,
                        error: "the broker stopped it".into(),
                    }),
                }
            }
            // Out of rotation at once, then stopped once what was
            // delivered to them is answered (all of them side by side).
            let stopped = join_all(retired.into_iter().map(|w| {
                let router = router.clone();
                async move {
                    drain_worker(&router, &w.id, drain).await;
                    let _ = w.bridge.send(StopProcess).await;
                    w.id
                }
            }))
            .await;
            if !stopped.is_empty() {
                // Gone from the configuration, so gone from the tables.
                me.do_send(Forget(stopped.clone()));
            }
            if asked > 0 && started.is_empty() {
                return Err(ControlError::NoneStarted { service, failed });
            }
            Ok(ScaleReply {
                service,
                workers,
                started,
                stopped,
                failed,
            })
        })
    }

    /// `Restart`: one worker at a time, out of rotation, drained, stopped,
    /// started again and ready before the next. A new worker
    /// that does not become ready stops the roll: the workers after it are
    /// left serving, and the answer is an error naming it and why.
    fn restart(
        &mut self,
        target: &str,
        ctx: &mut Context<Self>,
    ) -> Result<impl Future<Output = Result<Vec<String>, ControlError>> + use<>, ControlError> {
        if self.stopping {
            return Err(ControlError::ShuttingDown);
        }
        let (service, ids): (String, Vec<String>) = match self.services.get(target) {
            Some(workers) => (
                target.to_owned(),
                workers.iter().map(|w| w.id.clone()).collect(),
            ),
            None => {
                let service = service_of(target);
                let known = self
                    .services
                    .get(service)
                    .is_some_and(|workers| workers.iter().any(|w| w.id == target));
                if !known {
                    return Err(ControlError::Unknown(target.to_owned()));
                }
                (service.to_owned(), vec![target.to_owned()])
            }
        };
        let me = ctx.address();
        let router = self.router.clone();
        let drain = self.config.drain_timeout;
        Ok(async move {
            // One replacement of a service at a time: a recycle under way
            // ends first (and recycles due meanwhile wait for the roll).
            let Ok(turn) = me.send(TakeTurn(service.clone())).await else {
                return Err(ControlError::ShuttingDown);
            };
            if turn.await.is_err() {
                return Err(ControlError::ShuttingDown);
            }
            let _turn = TurnHeld {
                broker: me.clone(),
                service: service.clone(),
            };
            let mut restarted = Vec::new();
            for (i, id) in ids.iter().enumerate() {
                // Back in rotation once ready; if it is not, the roll stops
                // here and the new worker is left to its restart policy.
                let why = match replace_worker(&me, &router, &service, id, drain).await {
                    Replacement::Ready => {
                        restarted.push(id.clone());
                        continue;
                    }
                    Replacement::Gone => continue,
                    // The broker is stopping: nothing more is started.
                    Replacement::ShuttingDown => return Err(ControlError::ShuttingDown),
                    Replacement::NotReady(why) => why,
                };
                tracing::error!(process = %id, reason = %why,
                    "rolling restart stopped: the new worker did not become ready");
                return Err(ControlError::RollStopped {
                    worker: id.clone(),
                    reason: why,
                    restarted,
                    untouched: ids[i + 1..].to_vec(),
                });
            }
            Ok(restarted)
        })
    }

    /// Passes the turn of `service` on: to the next rolling restart
    /// waiting, or the next due worker still to be replaced.
    fn next_turn(&mut self, service: &str, ctx: &mut Context<Self>) {
        let mut next = self.recycling.done(service);
        while let Some(turn) = next {
            match turn {
                Turn::Roll(go) => match go.send(()) {
                    Ok(()) => return,
                    // That roll is gone (its caller went away).
                    Err(_) => next = self.recycling.done(service),
                },
                Turn::Recycle(due) => {
                    if self.recycle(service, due, ctx) {
                        return;
                    }
                    next = self.recycling.done(service);
                }
            }
        }
    }

    /// Replaces worker `due.id` of `service`, which has the service's
    /// turn; passes the turn on when done. Returns false (nothing done) if
    /// the incarnation that reached the limit is gone or not serving.
    fn recycle(&mut self, service: &str, due: Due, ctx: &mut Context<Self>) -> bool {
        let current = self
            .processes
            .get(&due.id)
            .filter(|p| p.pid == due.pid && p.status == ProcessStatus::Ready);
        let ours = self
            .services
            .get(service)
            .is_some_and(|workers| workers.iter().any(|w| w.id == due.id));
        if self.stopping || current.is_none() || !ours {
            tracing::debug!(process = %due.id, reason = %due.reason,
                "due for recycling, but replaced or stopped meanwhile; not recycled");
            return false;
        }
        let recycle = self
            .specs
            .get(service)
            .map(|s| s.recycle)
            .unwrap_or_default();
        let (key, limit) = match due.reason {
            RecycleReason::MaxRequests => ("max_requests", recycle.max_requests),
            RecycleReason::MaxAge => ("max_age_ms", recycle.max_age_ms),
            RecycleReason::MaxRss => ("max_rss_kb", recycle.max_rss_kb),
        };
        tracing::info!(process = %due.id, pid = due.pid, reason = %due.reason, limit,
            "recycling the worker: it reached recycle.{key} = {limit}");
        self.metrics.do_send(CountRecycle { id: due.id.clone() });
        let me = ctx.address();
        let router = self.router.clone();
        let drain = self.config.drain_timeout;
        let service = service.to_owned();
        ctx.spawn(
            async move {
                let outcome = replace_worker(&me, &router, &service, &due.id, drain).await;
                (service, due, outcome)
            }
            .into_actor(self)
            .map(|(service, due, outcome), broker, ctx| {
                if let Replacement::NotReady(why) = outcome {
                    let waiting = broker.recycling.stop_recycling(&service);
                    tracing::error!(process = %due.id, reason = %why,
                        not_recycled = ?waiting,
                        "recycling stopped: the new worker did not become ready; the workers still due keep serving");
                }
                broker.next_turn(&service, ctx);
            }),
        );
        true
    }

    fn stop_target(
        &mut self,
        target: &str,
    ) -> Result<impl Future<Output = Vec<String>> + use<>, StopError> {
        let bridges: Vec<(String, Addr<Bridge>)> = match self.services.get(target) {
            Some(workers) => workers
                .iter()
                .map(|w| (w.id.clone(), w.bridge.clone()))
                .collect(),
            None => self
                .services
                .get(service_of(target))
                .and_then(|workers| workers.iter().find(|w| w.id == target))
                .map(|w| vec![(w.id.clone(), w.bridge.clone())])
                .ok_or_else(|| StopError::Unknown(target.into()))?,
        };
        Ok(async move {
            let ids: Vec<String> = bridges.iter().map(|(id, _)| id.clone()).collect();
            // A bridge that is gone already (stopped, failed start) is stopped.
            join_all(bridges.iter().map(|(_, b)| b.send(StopProcess))).await;
            ids
        })
    }

    fn send(&self, reply: Envelope) {
        self.router.do_send(Route::one(self.id.clone(), reply));
    }

    fn reply<T: serde::Serialize>(&self, request: &Envelope, value: &T) {
        let reply = match Payload::encode(value) {
            Ok(payload) => request.response(Some(payload)),
            Err(e) => request.broker_error(ErrorCode::Internal, e.to_string()),
        };
        self.send(reply);
    }

    fn fail(&self, request: &Envelope, code: ErrorCode, message: impl Into<ByteString>) {
        self.send(request.broker_error(code, message));
    }

    fn lifecycle(&self, info: &ProcessInfo) {
        self.metrics.do_send(ProcessLifecycle {
            id: info.id.clone(),
            service: info.service.clone(),
            status: info.status,
            pid: info.pid,
            restarts: info.restarts,
            exit_code: info.exit_code,
        });
    }

    fn handle_request(&mut self, request: Envelope, ctx: &mut Context<Self>) {
        let method = match request.id.parse::<BrokerMethod>() {
            Ok(method) => method,
            Err(e) => return self.fail(&request, ErrorCode::UnknownMethod, e.to_string()),
        };
        if method.is_control() && !self.may_control(&request.source) {
            let message = format!(
                "{:?} may not call {method}: its service is not in broker.control_allow",
                &*request.source
            );
            return self.fail(&request, ErrorCode::Forbidden, message);
        }
        match method {
            BrokerMethod::Ping => self.reply(&request, &Empty {}),
            BrokerMethod::ListProcesses => {
                let list: Vec<&ProcessInfo> = self.processes.values().collect();
                self.reply(&request, &list);
            }
            BrokerMethod::GetMessageStats | BrokerMethod::GetMessageCount => {
                ctx.spawn(
                    fresh_stats(self.router.clone(), self.metrics.clone())
                        .into_actor(self)
                        .map(move |stats, broker, _| match stats {
                            Err(e) => broker.fail(&request, ErrorCode::Internal, e.to_string()),
                            Ok(stats) if method == BrokerMethod::GetMessageStats => {
                                broker.reply(&request, &stats);
                            }
                            Ok(stats) => {
                                let counters = &stats.total.counters;
                                let count = counters.total_sent + counters.total_received;
                                broker.reply(&request, &MessageCount { count });
                            }
                        }),
                );
            }
            BrokerMethod::ListNodes => {
                ctx.spawn(self.metrics.send(ListNodes).into_actor(self).map(
                    move |nodes, broker, _| match nodes {
                        Ok(nodes) => broker.reply(&request, &nodes),
                        Err(e) => broker.fail(&request, ErrorCode::Internal, e.to_string()),
                    },
                ));
            }
            BrokerMethod::SubmitProcessMetrics => {
                let mut samples = match request.payload_as::<SubmitProcessMetrics>() {
                    Ok(samples) => samples,
                    Err(e) => return self.fail(&request, ErrorCode::BadRequest, e.to_string()),
                };
                // A child speaks for itself only (else it could make any
                // process look dead or huge); trusted callers for anyone.
                let source = &*request.source;
                if !self.may_control(source)
                    && let Some(other) = samples.iter().find(|s| s.id != source)
                {
                    let message = format!(
                        "{source:?} may submit metrics for itself only, not for {:?} \
                         (its service is not in broker.control_allow)",
                        other.id
                    );
                    return self.fail(&request, ErrorCode::Forbidden, message);
                }
                // From a process, only live processes have samples, so their
                // number is bounded by the process table; the rest are
                // dropped (the reply's `received` counts what was kept).
                // Rust callers of the embedding API are trusted (they may
                // report on processes the broker does not run).
                if source != CALLER {
                    samples.retain(|s| self.is_live(&s.id));
                }
                ctx.spawn(
                    self.metrics
                        .send(SubmitMetrics(samples))
                        .into_actor(self)
                        .map(move |stored, broker, _| match stored {
                            Ok(received) => {
                                broker.reply(&request, &SubmitProcessMetricsReply { received })
                            }
                            Err(e) => broker.fail(&request, ErrorCode::Internal, e.to_string()),
                        }),
                );
            }
            BrokerMethod::Spawn => {
                let spec = match request.payload_as::<SpawnRequest>() {
                    Ok(spec) => ServiceConfig::from(spec),
                    Err(e) => return self.fail(&request, ErrorCode::BadRequest, e.to_string()),
                };
                match self.spawn_service(spec, ctx) {
                    Err(e) => self.fail(&request, ErrorCode::BadRequest, e.to_string()),
                    Ok(started) => {
                        ctx.spawn(started.into_actor(self).map(
                            move |result, broker, _| match result {
                                Ok(spawned) => broker.reply(&request, &spawned),
                                Err(e) => {
                                    broker.fail(&request, ErrorCode::BadRequest, e.to_string())
                                }
                            },
                        ));
                    }
                }
            }
            BrokerMethod::Scale => {
                let scale = match request.payload_as::<ScaleRequest>() {
                    Ok(scale) => scale,
                    Err(e) => return self.fail(&request, ErrorCode::BadRequest, e.to_string()),
                };
                match self.scale(&scale.service, scale.workers, ctx) {
                    Err(e) => self.fail(&request, e.code(), e.to_string()),
                    Ok(scaling) => {
                        ctx.spawn(scaling.into_actor(self).map(
                            move |result, broker, _| match result {
                                Ok(reply) => broker.reply(&request, &reply),
                                Err(e) => broker.fail(&request, e.code(), e.to_string()),
                            },
                        ));
                    }
                }
            }
            BrokerMethod::Restart => {
                let target = match request.payload_as::<RestartRequest>() {
                    Ok(restart) => restart.id,
                    Err(e) => return self.fail(&request, ErrorCode::BadRequest, e.to_string()),
                };
                match self.restart(&target, ctx) {
                    Err(e) => self.fail(&request, e.code(), e.to_string()),
                    Ok(restarting) => {
                        ctx.spawn(restarting.into_actor(self).map(move |result, broker, _| {
                            match result {
                                Ok(restarted) => {
                                    broker.reply(&request, &RestartReply { restarted })
                                }
                                Err(e) => broker.fail(&request, e.code(), e.to_string()),
                            }
                        }));
                    }
                }
            }
            BrokerMethod::Stop => {
                let target = match request.payload_as::<StopRequest>() {
                    Ok(stop) => stop.id,
                    Err(e) => return self.fail(&request, ErrorCode::BadRequest, e.to_string()),
                };
                match self.stop_target(&target) {
                    Err(e) => self.fail(&request, ErrorCode::UnknownTarget, e.to_string()),
                    Ok(stopping) => {
                        ctx.spawn(stopping.into_actor(self).map(move |stopped, broker, _| {
                            broker.reply(&request, &StopReply { stopped });
                        }));
                    }
                }
            }
        }
    }

    /// A process that is running or about to (not stopped, not failed).
    fn is_live(&self, id: &str) -> bool {
        self.processes
            .get(id)
            .is_some_and(|p| !matches!(p.status, ProcessStatus::Stopped | ProcessStatus::Failed))
    }

    /// Rust callers are trusted; processes only if their service is allowed.
    fn may_control(&self, source: &str) -> bool {
        source == CALLER
            || self
                .config
                .control_allow
                .iter()
                .any(|s| s == service_of(source))
    }

    fn handle_event(&mut self, event: Envelope) {
        // `ready` is acted on by the sender's bridge, which sees it first.
        if &*event.id != "ready" {
            tracing::debug!(process = %event.source, event = %event.id, "event to the broker ignored");
        }
    }
}

impl Actor for Broker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Workers at their `recycle.max_requests` (counted by the Router)
        // and over their `max_rss_kb` (sampled by Sysmon) are reported here.
        self.router.do_send(SetRecycler(ctx.address().recipient()));
        self.sysmon.do_send(SetRecycler(ctx.address().recipient()));
    }
}

impl Handler<RecycleDue> for Broker {
    type Result = ();

    /// A worker reached a `recycle` limit: replaced now if its service's
    /// turn is free, else when the turn comes (if it still serves then).
    fn handle(&mut self, RecycleDue { id, reason }: RecycleDue, ctx: &mut Self::Context) {
        let service = service_of(&id).to_owned();
        let Some(info) = self.processes.get(&*id) else {
            return;
        };
        let ours = self
            .services
            .get(&service)
            .is_some_and(|workers| workers.iter().any(|w| w.id == *id));
        if self.stopping || !ours || info.status != ProcessStatus::Ready {
            tracing::debug!(process = %id, %reason, status = %info.status,
                "due for recycling but not serving; not recycled");
            return;
        }
        let due = Due {
            id: id.to_string(),
            reason,
            pid: info.pid,
        };
        match self.recycling.due(&service, due) {
            Some(due) => {
                if !self.recycle(&service, due, ctx) {
                    self.next_turn(&service, ctx);
                }
            }
            None => {
                tracing::debug!(process = %id, %reason,
                    "due for recycling; waits its turn (one worker of a service at a time)");
            }
        }
    }
}

impl Handler<TakeTurn> for Broker {
    type Result = MessageResult<TakeTurn>;

    fn handle(&mut self, TakeTurn(service): TakeTurn, _: &mut Self::Context) -> Self::Result {
        let (go, turn) = oneshot::channel();
        if !self.stopping
            && let Some(go) = self.recycling.roll(&service, go)
        {
            let _ = go.send(());
        }
        // Stopping: `go` is dropped, and the roll gives up.
        MessageResult(turn)
    }
}

impl Handler<TurnDone> for Broker {
    type Result = ();

    fn handle(&mut self, TurnDone(service): TurnDone, ctx: &mut Self::Context) {
        self.next_turn(&service, ctx);
    }
}

impl Handler<Deliver> for Broker {
    type Result = ();

    fn handle(&mut self, Deliver(envelopes): Deliver, ctx: &mut Self::Context) {
        for envelope in envelopes {
            match envelope.kind {
                MessageType::Request => self.handle_request(*envelope, ctx),
                MessageType::Event => self.handle_event(*envelope),
                // The broker sends no requests of its own yet.
                MessageType::Response | MessageType::Error => {}
            }
        }
    }
}

impl Handler<TrackProcess> for Broker {
    type Result = ();

    fn handle(&mut self, TrackProcess(info): TrackProcess, _: &mut Self::Context) {
        self.lifecycle(&info);
        self.processes.insert(info.id.clone(), info);
    }
}

impl Handler<SpawnService> for Broker {
    type Result = ResponseFuture<Result<Vec<SpawnedProcess>, SpawnError>>;

    fn handle(
        &mut self,
        SpawnService(spec): SpawnService,
        ctx: &mut Self::Context,
    ) -> Self::Result {
        match self.spawn_service(spec, ctx) {
            Ok(started) => Box::pin(started),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

impl Handler<StopTarget> for Broker {
    type Result = ResponseFuture<Result<Vec<String>, StopError>>;

    fn handle(&mut self, StopTarget(target): StopTarget, _: &mut Self::Context) -> Self::Result {
        respond(self.stop_target(&target))
    }
}

impl Handler<StopAll> for Broker {
    type Result = ResponseFuture<Vec<String>>;

    fn handle(&mut self, _: StopAll, _: &mut Self::Context) -> Self::Result {
        self.stopping = true;
        // Nothing waiting is replaced; rolling restarts waiting for their
        // turn give up (their senders dropped here).
        drop(self.recycling.clear());
        let names: Vec<(String, Vec<String>)> = self
            .services
            .keys()
            .map(|name| {
                let deps = self
                    .specs
                    .get(name)
                    .map(|s| s.depends_on.clone())
                    .unwrap_or_default();
                (name.clone(), deps)
            })
            .collect();
        let view: Vec<(&str, &[String])> = names
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        // Each wave's stops are built now (nothing is sent before they are
        // awaited) and awaited one wave after the other.
        let waves: Vec<Vec<_>> = crate::config::order::stop_waves(&view)
            .iter()
            .map(|wave| {
                wave.iter()
                    .filter_map(|name| self.stop_target(name).ok())
                    .collect()
            })
            .collect();
        Box::pin(async move {
            let mut stopped = Vec::new();
            for wave in waves {
                stopped.extend(join_all(wave).await.into_iter().flatten());
            }
            stopped
        })
    }
}

impl Handler<ScaleService> for Broker {
    type Result = ResponseFuture<Result<ScaleReply, ControlError>>;

    fn handle(&mut self, msg: ScaleService, ctx: &mut Self::Context) -> Self::Result {
        respond_flat(self.scale(&msg.service, msg.workers, ctx))
    }
}

impl Handler<RestartTarget> for Broker {
    type Result = ResponseFuture<Result<Vec<String>, ControlError>>;

    fn handle(
        &mut self,
        RestartTarget(target): RestartTarget,
        ctx: &mut Self::Context,
    ) -> Self::Result {
        respond_flat(self.restart(&target, ctx))
    }
}

impl Handler<Reconfigure> for Broker {
    type Result = ResponseFuture<Result<Vec<String>, ControlError>>;

    fn handle(
        &mut self,
        Reconfigure(mut spec): Reconfigure,
        ctx: &mut Self::Context,
    ) -> Self::Result {
        let Some(workers) = self.services.get(&spec.name).map(Vec::len) else {
            return Box::pin(async move { Err(ControlError::Unknown(spec.name)) });
        };
        // Refused before any worker is stopped: a roll to a program that
        // cannot run would stop at its first worker, one worker short.
        if let Err(e) = spec.check_command() {
            let e = ControlError::Invalid(format!("service {:?}: {e}", spec.name));
            return Box::pin(async move { Err(e) });
        }
        if let Err((key, message)) = self.check_settings(&spec) {
            let e = ControlError::Invalid(format!("service {:?}: {key}: {message}", spec.name));
            return Box::pin(async move { Err(e) });
        }
        spec.workers = u32::try_from(workers).unwrap_or(u32::MAX);
        // Both apply at once; each worker the roll replaces counts its
        // requests afresh.
        self.set_policy(&spec);
        let name = spec.name.clone();
        self.specs.insert(name.clone(), Arc::new(spec));
        respond_flat(self.restart(&name, ctx))
    }
}

impl Handler<BridgeOf> for Broker {
    type Result = Option<Addr<Bridge>>;

    fn handle(&mut self, BridgeOf(id): BridgeOf, _: &mut Self::Context) -> Self::Result {
        self.services
            .get(service_of(&id))?
            .iter()
            .find(|w| w.id == id)
            .map(|w| w.bridge.clone())
    }
}

impl Handler<StartAgain> for Broker {
    type Result = Option<oneshot::Receiver<SpawnedProcess>>;

    fn handle(&mut self, msg: StartAgain, ctx: &mut Self::Context) -> Self::Result {
        if self.stopping {
            return None;
        }
        let spec = Arc::clone(self.specs.get(&msg.service)?);
        let index = self
            .services
            .get(&msg.service)?
            .iter()
            .position(|w| w.id == msg.id)?;
        let restarts = self.processes.get(&msg.id).map_or(0, |p| p.restarts);
        let (worker, started) = self.start_worker(&spec, u32::try_from(index).ok()?, restarts, ctx);
        if let Some(list) = self.services.get_mut(&msg.service) {
            list[index] = worker;
        }
        Some(started)
    }
}

impl Handler<Forget> for Broker {
    type Result = ();

    fn handle(&mut self, Forget(ids): Forget, ctx: &mut Self::Context) {
        // Live again meanwhile (scaled back up): not forgotten.
        let ids: Vec<String> = ids.into_iter().filter(|id| !self.is_live(id)).collect();
        for id in &ids {
            self.processes.remove(id);
        }
        self.logs.do_send(ForgetLogs(ids.clone()));
        // The Router ships its last counters of them first (its batch
        // reaches the store before the word to forget them).
        let (router, metrics) = (self.router.clone(), self.metrics.clone());
        ctx.spawn(
            async move {
                let _ = router.send(FlushMetrics).await;
                metrics.do_send(ForgetProcesses(ids));
            }
            .into_actor(self),
        );
    }
}

impl Handler<ForgetService> for Broker {
    type Result = ();

    fn handle(&mut self, ForgetService(service): ForgetService, ctx: &mut Self::Context) {
        let live = self
            .services
            .get(&service)
            .is_some_and(|workers| workers.iter().any(|w| w.bridge.connected()));
        if live {
            return;
        }
        self.services.remove(&service);
        self.specs.remove(&service);
        let ids = self
            .processes
            .values()
            .filter(|p| p.service == service)
            .map(|p| p.id.clone())
            .collect();
        <Self as Handler<Forget>>::handle(self, Forget(ids), ctx);
    }
}

impl Handler<GetProcesses> for Broker {
    type Result = MessageResult<GetProcesses>;

    fn handle(&mut self, _: GetProcesses, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.processes.values().cloned().collect())
    }
}
