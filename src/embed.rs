//! Embedding: start the actors in your own actix System and call services.
//!
//! ```no_run
//! use procbroker::embed::ProcBroker;
//! use procbroker::service::{HandlerError, Methods};
//!
//! #[actix::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let broker = ProcBroker::builder().start();
//!     let calc = Methods::new().method("Add", |(a, b): (i64, i64)| async move {
//!         a.checked_add(b).ok_or_else(|| HandlerError::new("overflow"))
//!     });
//!     broker.add_service("calc", 4, calc).await?;
//!     let sum: i64 = broker.call("calc", "Add", &(2, 3)).await?.payload_as()?;
//!     assert_eq!(sum, 5);
//!     Ok(())
//! }
//! ```
//!
//! The actors need an actix System (`#[actix::main]`, `#[actix_web::main]`,
//! `actix::System::new()`); under a plain `#[tokio::main]` starting them
//! panics. [`BrokerHandle`] is `Clone + Send`: hand it to actix-web handlers
//! with `web::Data`.

use actix::prelude::*;
use bytestring::ByteString;
use serde::Serialize;
use std::rc::Rc;
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;

use crate::actors::Handoff;
pub use crate::actors::broker::ControlError;
use crate::actors::broker::{
    Broker, GetProcesses, Reconfigure, RestartTarget, ScaleService, SpawnError, SpawnService,
    StopAll, StopError, StopTarget,
};
use crate::actors::inproc::InProcessWorker;
use crate::actors::log_store::{LogStore, ReopenLogs};
use crate::actors::messages::{
    Call, CallStream, CancelInFlight, Leave, ListNodes, PendingCount, Publish, RegisterProcess,
    RouterError, SetDraining, TrackProcess, next_call_id,
};
use crate::actors::metrics_store::{MetricsStore, fresh_stats};
use crate::actors::router::Router;
use crate::actors::same_thread::{RouterKey, call_here};
use crate::actors::sysmon::Sysmon;
pub use crate::call::{CallError, Reply};
pub use crate::call_stream::BrokerStream;
use crate::call_stream::CancelOnDrop;
use crate::config::{BrokerConfig, ServiceConfig};
use crate::names::{self, BROKER, NameError};
pub use crate::pending_call::PendingCall;
use crate::protocol::rpc::{NodeInfo, ProcessInfo, ProcessStatus, ScaleReply, SpawnedProcess};
use crate::protocol::{Envelope, MessageStats};
use crate::service::Methods;

/// Entry point of the embedding API.
pub struct ProcBroker;

impl ProcBroker {
    /// A builder with the default configuration.
    pub fn builder() -> Builder {
        Builder::default()
    }
}

/// Configures and starts the actors.
#[derive(Debug, Clone, Default)]
pub struct Builder {
    config: BrokerConfig,
}

impl Builder {
    /// Replaces the whole configuration.
    pub fn config(mut self, config: BrokerConfig) -> Self {
        self.config = config;
        self
    }

    /// Requests in flight per process before `busy` (default 1000).
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.config.queue_capacity = n;
        self
    }

    /// Default request deadline (default 30 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// Sysmon's sampling interval; `None` turns it off (default 30 s).
    pub fn sysmon_interval(mut self, interval: Option<Duration>) -> Self {
        self.config.sysmon_interval = interval;
        self
    }

    /// Stopping a child: SIGTERM after half of this, SIGKILL after all of it.
    pub fn kill_timeout(mut self, timeout: Duration) -> Self {
        self.config.kill_timeout = timeout;
        self
    }

    /// Services allowed to call `Spawn` / `Stop`.
    pub fn control_allow(mut self, services: Vec<String>) -> Self {
        self.config.control_allow = services;
        self
    }

    /// Joins a cluster through NATS; the default has none.
    pub fn cluster(mut self, cluster: crate::config::ClusterConfig) -> Self {
        self.config.cluster = cluster;
        self
    }

    /// Children's stderr: files under a directory, the broker's own log
    /// (default: no files; lines to the broker's log, 100 a second per
    /// process at most).
    pub fn logs(mut self, logs: crate::config::LogsConfig) -> Self {
        self.config.logs = logs;
        self
    }

    /// Starts MetricsStore, Router, Broker and Sysmon on the current
    /// arbiter, and the LogStore on an arbiter (a thread) of its own.
    /// Panics outside an actix System (as `Actor::start` does).
    pub fn start(self) -> BrokerHandle {
        let config = self.config;
        let logs = LogStore::start_own(config.logs.clone());
        let metrics = MetricsStore::new(config.latency_window).start();
        let router = Router::new(config.clone(), metrics.clone());
        let router_key = router.key();
        let router_thread = std::thread::current().id();
        let router = router.start();
        let sysmon = Sysmon::new(config.sysmon_interval, metrics.clone()).start();
        let broker = Broker::new(
            config.clone(),
            router.clone(),
            metrics.clone(),
            sysmon.clone(),
            logs.clone(),
        )
        .start();
        // Queued before anything a caller can send, so `broker` is routable
        // from the first call on.
        router.do_send(RegisterProcess::new(
            ByteString::from_static(BROKER),
            ByteString::from_static(BROKER),
            broker.clone().recipient(),
        ));
        let cluster = start_cluster(&config, &router, &metrics);
        BrokerHandle(std::sync::Arc::new(Handles {
            router,
            router_key,
            router_thread,
            broker,
            metrics,
            sysmon,
            logs,
            cluster,
            config,
        }))
    }
}

/// Starts the Cluster actor if `cluster.nats_url` is set.
#[cfg(feature = "cluster")]
fn start_cluster(
    config: &BrokerConfig,
    router: &Addr<Router>,
    metrics: &Addr<MetricsStore>,
) -> Option<Recipient<Leave>> {
    use crate::actors::cluster::Cluster;
    config.cluster.enabled().then(|| {
        Cluster::new(config.cluster.clone(), router.clone(), metrics.clone())
            .start()
            .recipient()
    })
}

#[cfg(not(feature = "cluster"))]
fn start_cluster(
    config: &BrokerConfig,
    _: &Addr<Router>,
    _: &Addr<MetricsStore>,
) -> Option<Recipient<Leave>> {
    if config.cluster.enabled() {
        tracing::error!(
            "cluster.nats_url is set but procbroker was built without its `cluster` feature: serving this node only"
        );
    }
    None
}

/// Addresses of the running actors, and the typed call API.
///
/// Cheap to clone: one shared count. An `Addr` clone in actix allocates
/// two `Arc`s, so a handle of four addresses cloned per call (a task per
/// request, a closure per route) cost eight allocations (callgrind: ~1 000
/// instructions per clone, ~2 000 with the drop).
#[derive(Clone)]
pub struct BrokerHandle(std::sync::Arc<Handles>);

/// What a [`BrokerHandle`] shares.
struct Handles {
    router: Addr<Router>,
    /// Finds the Router when a caller runs on its thread.
    router_key: RouterKey,
    /// The thread the Router runs on (`start` starts it on the current
    /// arbiter).
    router_thread: std::thread::ThreadId,
    broker: Addr<Broker>,
    metrics: Addr<MetricsStore>,
    sysmon: Addr<Sysmon>,
    logs: Addr<LogStore>,
    /// The Cluster actor, when this broker is part of one.
    cluster: Option<Recipient<Leave>>,
    config: BrokerConfig,
}

/// What [`BrokerHandle::shutdown`] did.
#[derive(Debug, Clone)]
pub struct ShutdownReport {
    /// Every request in flight was answered before the children were stopped.
    pub drained: bool,
    /// The subprocesses stopped.
    pub stopped: Vec<String>,
    /// How long it took.
    pub took: Duration,
}

/// Why a service could not be added.
#[derive(Debug, thiserror::Error)]
pub enum AddServiceError {
    /// The name is not a valid service name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A process with one of its ids exists already.
    #[error(transparent)]
    Router(#[from] RouterError),
    /// The Router is gone.
    #[error("the broker is not running")]
    Closed,
}

impl BrokerHandle {
    /// Calls `method` of `target` (a service, a process id or `broker`) with
    /// `payload`, and waits for the one reply: the response, or an error
    /// (the callee's, or the broker's: `timeout`, `busy`, …).
    pub async fn call<P: Serialize + ?Sized>(
        &self,
        target: &str,
        method: &str,
        payload: &P,
    ) -> Result<Reply, CallError> {
        let request = Envelope::request(target, method, 0).with_payload(payload)?;
        self.call_envelope(request).await
    }

    /// Sends event `id` with `payload` to `target` (a process id, every
    /// ready worker of a service, or `*`); returns how many processes it
    /// was delivered to (0 for an unknown target). Events are not answered.
    pub async fn event<P: Serialize + ?Sized>(
        &self,
        target: &str,
        id: &str,
        payload: &P,
    ) -> Result<usize, CallError> {
        let event = Envelope::event(target, id).with_payload(payload)?;
        self.0
            .router
            .send(Publish(event))
            .await
            .map_err(|_| CallError::Closed)
    }

    /// [`call`](Self::call) with a request built by hand (raw payload,
    /// `timeout_ms`, `key`). Its `correlation_id` is assigned here.
    ///
    /// Dropping the future before the reply cancels the request: the
    /// worker is sent `cancel` and its slot freed.
    pub async fn call_envelope(&self, mut request: Envelope) -> Result<Reply, CallError> {
        let (reply, answer) = oneshot::channel();
        request.correlation_id = next_call_id();
        let mut guard = CancelOnDrop::new(&self.0.router, request.correlation_id);
        let call = Call {
            envelope: Box::new(request),
            reply,
        };
        if let Some(call) = call_here(self.0.router_key, call) {
            self.0.router.do_send(call);
        }
        let envelope = answer.await;
        guard.disarm();
        Reply::from_boxed(envelope.map_err(|_| CallError::Closed)?)
    }

    /// [`call_envelope`](Self::call_envelope), with the request sent at once
    /// and its correlation id known before the reply (the one its worker
    /// sees): await the [`PendingCall`] for the reply, or
    /// [`cancel`](PendingCall::cancel) it and await the `cancelled` error.
    /// Dropping it before the reply cancels the request.
    pub fn start_call(&self, mut request: Envelope) -> PendingCall {
        let (reply, answer) = oneshot::channel();
        request.correlation_id = next_call_id();
        let correlation_id = request.correlation_id;
        let call = Call {
            envelope: Box::new(request),
            reply,
        };
        if let Some(call) = call_here(self.0.router_key, call) {
            self.0.router.do_send(call);
        }
        PendingCall::new(answer, self.0.router.clone(), correlation_id)
    }

    /// A streaming call: `request` goes out with `stream = true`, and the
    /// worker's partial replies come back in order, then the final reply
    /// (or the error that ends the call). Dropping the stream before its
    /// end cancels the request.
    ///
    /// The stream holds up to `queue_capacity` unread replies; a caller
    /// that falls further behind has the call cut: its last item is the
    /// error `busy`, and the worker is told to stop.
    pub fn call_stream(&self, mut request: Envelope) -> BrokerStream {
        request.correlation_id = next_call_id();
        let correlation_id = request.correlation_id;
        let capacity = self.0.config.queue_capacity.max(1) + 1;
        let (parts, replies) = tokio::sync::mpsc::channel(capacity);
        self.0.router.do_send(CallStream {
            envelope: Box::new(request),
            parts,
        });
        BrokerStream::new(replies, self.0.router.clone(), correlation_id)
    }

    /// A worker's way in to the Router by method call, when it is made on
    /// the Router's thread. Elsewhere none: the Router can take a handoff
    /// only on the thread that made it, and one it cannot take is leaked
    /// (its `Rc`s may be freed on that thread only), and with it the
    /// link's `Addr` that keeps the Router's mailbox open. Such a worker
    /// replies by message.
    fn handoff_here(&self, worker: &InProcessWorker) -> Option<Handoff> {
        (std::thread::current().id() == self.0.router_thread).then(|| worker.handoff())
    }

    /// Adds a service of `workers` in-process workers (`name.0 …`) serving
    /// `methods`, started on the current arbiter. Returns their process ids.
    ///
    /// Started on the Router's thread, the workers hand it their replies
    /// with a method call; on another thread, with a message.
    pub async fn add_service(
        &self,
        name: &str,
        workers: u32,
        methods: Methods,
    ) -> Result<Vec<String>, AddServiceError> {
        names::check_service_name(name)?;
        let methods = Rc::new(methods);
        let started = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
        let mut ids = Vec::with_capacity(workers as usize);
        for index in 0..workers {
            let id = names::process_id(name, index);
            let worker = InProcessWorker::new(
                id.clone().into(),
                Rc::clone(&methods),
                self.0.router.clone(),
            );
            let handoff = self.handoff_here(&worker);
            let worker = worker.start();
            self.0
                .router
                .send(RegisterProcess {
                    inbox: handoff,
                    ..RegisterProcess::new(id.clone().into(), name.into(), worker.recipient())
                })
                .await
                .map_err(|_| AddServiceError::Closed)??;
            self.0.broker.do_send(TrackProcess(ProcessInfo {
                id: id.clone(),
                service: name.into(),
                pid: None,
                status: ProcessStatus::Ready,
                restarts: 0,
                started_at: Some(started.clone()),
                exit_code: None,
            }));
            ids.push(id);
        }
        Ok(ids)
    }

    /// Starts a subprocess service (`spec.workers` children) and waits until
    /// each worker is ready or its first start failed.
    pub async fn spawn(&self, spec: ServiceConfig) -> Result<Vec<SpawnedProcess>, SpawnError> {
        self.0
            .broker
            .send(SpawnService(spec))
            .await
            .map_err(|_| SpawnError::Closed)?
    }

    /// Stops a subprocess (`echo.1`) or a whole subprocess service (`echo`)
    /// and waits until its children are reaped. Returns the ids stopped.
    pub async fn stop(&self, target: &str) -> Result<Vec<String>, StopError> {
        match self.0.broker.send(StopTarget(target.into())).await {
            Ok(result) => result,
            // The Broker is gone: so are its children.
            Err(_) => Ok(Vec::new()),
        }
    }

    /// Removes a subprocess service gracefully: its workers leave the
    /// rotation at once, what was delivered to them is answered (up to
    /// `drain_timeout`), then they are stopped and leave the process table
    /// and the stats. Returns the ids stopped.
    pub async fn retire(&self, service: &str) -> Result<Vec<String>, StopError> {
        let ids: Vec<String> = self
            .processes()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.service == service)
            .map(|p| p.id)
            .collect();
        let drain = self.0.config.drain_timeout;
        futures_util::future::join_all(
            ids.iter()
                .map(|id| crate::actors::broker::drain_worker(&self.0.router, id, drain)),
        )
        .await;
        let stopped = self.stop(service).await?;
        // Gone from the configuration: its rows leave the process table
        // and the stats (the totals keep what it did).
        let _ = self
            .0
            .broker
            .send(crate::actors::broker::ForgetService(service.to_owned()))
            .await;
        Ok(stopped)
    }

    /// Sets a subprocess service's number of workers: starts `name.N…`, or
    /// takes the highest-numbered out of rotation, lets what was delivered
    /// to them be answered (up to `drain_timeout`), and stops them (they
    /// leave the process table and the stats). The reply lists the new
    /// workers that did not become ready, and why; none ready is
    /// [`ControlError::NoneStarted`]. A count above `max_workers`, or one the
    /// open-files limit cannot hold, is refused before anything starts.
    pub async fn scale(&self, service: &str, workers: u32) -> Result<ScaleReply, ControlError> {
        self.0
            .broker
            .send(ScaleService {
                service: service.into(),
                workers,
            })
            .await
            .map_err(|_| ControlError::Unknown(service.into()))?
    }

    /// Restarts a process (`echo.1`) or every worker of a service, one at a
    /// time: out of rotation, drained, stopped, started, ready, then the
    /// next. With two or more workers under load no caller sees an error.
    /// Returns the ids restarted. A new worker that does not become ready
    /// stops the roll ([`ControlError::RollStopped`]): the workers after it
    /// are not touched and keep serving.
    pub async fn restart(&self, target: &str) -> Result<Vec<String>, ControlError> {
        self.0
            .broker
            .send(RestartTarget(target.into()))
            .await
            .map_err(|_| ControlError::Unknown(target.into()))?
    }

    /// Gives a running subprocess service new settings (command, args, env,
    /// restart policy, health…; its number of workers is [`scale`](Self::scale)'s)
    /// and restarts it rolling so each worker runs with them.
    pub async fn reconfigure(&self, spec: ServiceConfig) -> Result<Vec<String>, ControlError> {
        let name = spec.name.clone();
        self.0
            .broker
            .send(Reconfigure(spec))
            .await
            .map_err(|_| ControlError::Unknown(name))?
    }

    /// Graceful shutdown: new requests are answered
    /// `shutting_down`; requests in flight get up to `drain_timeout` to be
    /// answered; then every child gets `shutdown`, EOF, SIGTERM and SIGKILL
    /// (as needed) and is reaped. The actors keep running (stop the System
    /// after this).
    pub async fn shutdown(&self) -> ShutdownReport {
        let started = std::time::Instant::now();
        let _ = self.0.router.send(SetDraining(true)).await;
        let deadline = started + self.0.config.drain_timeout;
        // Drained once nothing is in flight at two looks 20 ms apart (a
        // request still in a pipe at the first look is caught by the second).
        let mut quiet = 0;
        let mut in_flight = 0;
        while quiet < 2 {
            in_flight = self.0.router.send(PendingCount).await.unwrap_or(0);
            if in_flight == 0 {
                quiet += 1;
            } else {
                quiet = 0;
            }
            if std::time::Instant::now() >= deadline {
                break;
            }
            actix::clock::sleep(Duration::from_millis(20)).await;
        }
        let drained = in_flight == 0;
        if !drained {
            tracing::warn!(
                in_flight,
                "drain timeout: stopping with requests in flight (they get worker_exited)"
            );
            // Their workers are told before their stdin closes.
            let _ = self.0.router.send(CancelInFlight { id: None }).await;
        }
        // Answered what it had; now out of the other nodes' rotation at
        // once, before its workers go.
        if let Some(cluster) = &self.0.cluster {
            let _ = cluster.send(Leave).await;
        }
        let stopped = self.0.broker.send(StopAll).await.unwrap_or_default();
        ShutdownReport {
            drained,
            stopped,
            took: started.elapsed(),
        }
    }

    /// The process table (what `ListProcesses` answers), read from the
    /// Broker directly: polling it is not counted as requests.
    pub async fn processes(&self) -> Result<Vec<ProcessInfo>, CallError> {
        self.0
            .broker
            .send(GetProcesses)
            .await
            .map_err(|_| CallError::Closed)
    }

    /// The nodes of the cluster (what `ListNodes` answers): this one first,
    /// then every other node heard from. Empty on a single host.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, CallError> {
        self.0
            .metrics
            .send(ListNodes)
            .await
            .map_err(|_| CallError::Closed)
    }

    /// The stats reply (flushes the Router first, so counters are exact).
    pub async fn stats(&self) -> Result<MessageStats, CallError> {
        fresh_stats(self.0.router.clone(), self.0.metrics.clone())
            .await
            .map_err(|_| CallError::Closed)
    }

    /// The Router.
    pub fn router(&self) -> &Addr<Router> {
        &self.0.router
    }

    /// The Broker.
    pub fn broker(&self) -> &Addr<Broker> {
        &self.0.broker
    }

    /// The MetricsStore.
    pub fn metrics(&self) -> &Addr<MetricsStore> {
        &self.0.metrics
    }

    /// Sysmon.
    pub fn sysmon(&self) -> &Addr<Sysmon> {
        &self.0.sysmon
    }

    /// The LogStore (children's stderr: rings, followers, files).
    pub fn logs(&self) -> &Addr<LogStore> {
        &self.0.logs
    }

    /// Reopens the log files under `[logs] dir` (what SIGUSR1 does, for an
    /// outside tool that moved them away). False when no directory is
    /// configured.
    pub async fn reopen_logs(&self) -> bool {
        self.0.logs.send(ReopenLogs).await.unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a far thread's `add_service` and calls saw: whether it was
    /// offered a handoff, and what its two calls were answered.
    type FarSide = (bool, Result<Vec<String>, String>, Vec<Result<u64, String>>);

    #[actix::test]
    async fn a_started_call_names_its_request_and_can_be_cancelled_while_awaited() {
        let broker = ProcBroker::builder().sysmon_interval(None).start();
        let methods = Methods::new()
            .method("Wait", |ms: u64| async move {
                actix::clock::sleep(Duration::from_millis(ms)).await;
                Ok(ms)
            })
            .raw_sync("Echo", |request| Ok(request.payload));
        broker
            .add_service("slow", 1, methods)
            .await
            .expect("service");

        let request = |method: &str, ms: u64| {
            Envelope::request("slow", method, 0)
                .with_payload(&ms)
                .expect("payload")
        };
        let quick = broker.start_call(request("Echo", 7));
        let later = broker.start_call(request("Echo", 8));
        assert!(quick.correlation_id() > 0);
        assert_ne!(quick.correlation_id(), later.correlation_id());
        let reply = quick.await.expect("answered");
        assert_eq!(reply.payload_as::<u64>().expect("u64"), 7);

        // Cancelled while awaited: the broker's `cancelled`, at once.
        let waiting = broker.start_call(request("Wait", 10_000));
        waiting.cancel();
        let answer = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("answered at once");
        assert_eq!(
            answer.expect_err("cancelled").broker_code(),
            Some(crate::protocol::ErrorCode::Cancelled)
        );

        // Dropped before its reply: nothing stays in flight.
        drop(broker.start_call(request("Wait", 10_000)));
        drop(later);
        let mut in_flight = usize::MAX;
        for _ in 0..100 {
            in_flight = broker.router().send(PendingCount).await.expect("router");
            if in_flight == 0 {
                break;
            }
            actix::clock::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(in_flight, 0, "a dropped call is cancelled");
    }

    #[actix::test]
    async fn a_service_added_on_another_thread_replies_by_message() {
        let broker = ProcBroker::builder().sysmon_interval(None).start();
        let near = InProcessWorker::new(
            "near.0".into(),
            Rc::new(Methods::new()),
            broker.router().clone(),
        );
        assert!(
            broker.handoff_here(&near).is_some(),
            "on the Router's thread"
        );

        let far = broker.clone();
        let arbiter = Arbiter::new();
        let (done, seen) = oneshot::channel::<FarSide>();
        // Everything of the far side is made there: `spawn_fn` moves only
        // the handle and the channel.
        arbiter.spawn_fn(move || {
            actix::spawn(async move {
                let worker = InProcessWorker::new(
                    "far.9".into(),
                    Rc::new(Methods::new()),
                    far.router().clone(),
                );
                let offered = far.handoff_here(&worker).is_some();
                let added = far
                    .add_service("far", 2, crate::workers::echo())
                    .await
                    .map_err(|e| e.to_string());
                let mut replies = Vec::new();
                for n in [1u64, 2] {
                    let reply = far.call("far", "Echo", &n).await.map_err(|e| e.to_string());
                    replies
                        .push(reply.and_then(|r| r.payload_as::<u64>().map_err(|e| e.to_string())));
                }
                let _ = done.send((offered, added, replies));
            });
        });
        let (offered, added, replies) = tokio::time::timeout(Duration::from_secs(5), seen)
            .await
            .expect("the far thread within 5 s")
            .expect("the far thread's answer");
        assert!(!offered, "no handoff the Router could only leak");
        assert_eq!(added, Ok(vec!["far.0".to_owned(), "far.1".to_owned()]));
        assert_eq!(replies, [Ok(1), Ok(2)], "answered on their own thread");

        // And from the Router's thread, through workers on the other one.
        for n in [3u64, 4] {
            let reply = broker.call("far", "Echo", &n).await.expect("a reply");
            assert_eq!(reply.payload_as::<u64>().expect("u64"), n);
        }
        arbiter.stop();
    }
}
