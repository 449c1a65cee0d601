//! `procbroker run`: the broker as a daemon.

use anyhow::{Context, Result, bail};
use procbroker::actors::broker::SpawnError;
use procbroker::actors::log_file::prepare_dir;
use procbroker::admin::Admin;
use procbroker::config::file::Loaded;
use procbroker::embed::ProcBroker;
use procbroker::protocol::rpc::ProcessStatus;
use std::path::PathBuf;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

use crate::notify::Notifier;

/// Each child costs the broker about four descriptors (three pipes and its
/// pidfd or signal plumbing): raise the soft limit on open files to the hard
/// one, as servers do, so thousands of workers can start.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "open-files limit raised"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "open-files limit left as is"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}

/// Loads the configuration, starts the actors and the services, serves
/// until SIGTERM or SIGINT, then shuts down in order.
pub fn run(config: Option<PathBuf>, sets: &[String]) -> Result<()> {
    let loaded = Loaded::load(config.as_deref(), std::env::vars(), sets)?;
    raise_fd_limit();
    let origin = loaded.path.as_ref().map_or_else(
        || "the embedded default".to_owned(),
        |p| p.display().to_string(),
    );
    // A log directory that cannot work is a mistake to say now, not a
    // surprise at the first line (a later failure is logged and the rings
    // go on).
    if let Some(dir) = loaded.logs_config().dir {
        prepare_dir(&dir).with_context(|| {
            format!(
                "{origin}: logs.dir = {:?}: cannot create it or write a file in it",
                dir.display().to_string()
            )
        })?;
    }
    let sets = sets.to_vec();
    block_on_task(async move { serve(loaded, origin, config, &sets).await })
}

/// Runs `future` on a new actix System as a task of its own, not as the
/// root future of `block_on`.
///
/// Why: the root future is polled again whenever any task of the System
/// wakes (tokio's `LocalSet::run_until`), so a root future that waits on
/// several things (signals, a timer, a reply) would pay a poll of each of
/// them on every message the broker routes. A task is polled only when its
/// own waker fires.
pub(crate) fn block_on_task<F>(future: F) -> F::Output
where
    F: Future + 'static,
    F::Output: 'static,
{
    actix::System::new().block_on(async move {
        match actix::spawn(future).await {
            Ok(output) => output,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Nothing aborts it, and the System outlives this `block_on`.
            Err(e) => panic!("the main task was cancelled: {e}"),
        }
    })
}

async fn serve(
    loaded: Loaded,
    origin: String,
    path: Option<PathBuf>,
    sets: &[String],
) -> Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    // SIGHUP's default action would kill the broker and every child with
    // it; operators send it expecting a reload, never a stop.
    let mut hangup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    // SIGUSR1 reopens the log files (for logrotate and the like); its
    // default action would kill the broker, so it is always handled.
    let mut usr1 = signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?;
    let broker = ProcBroker::builder().config(loaded.broker_config()).start();
    let notifier = Notifier::from_env(service_names(&loaded));
    tracing::info!(config = %origin, services = loaded.file.services.len(), "procbroker starting");
    if loaded.file.services.is_empty() {
        tracing::warn!(config = %origin, "no [[service]] configured: the broker runs with none (Spawn can add some)");
    }
    for allowed in &loaded.file.broker.control_allow {
        if !loaded.file.services.iter().any(|s| &s.name == allowed) {
            tracing::warn!(config = %origin, service = %allowed,
                "broker.control_allow names a service that is not configured (one spawned later under that name will be allowed)");
        }
    }
    let admin = match loaded.admin_listen() {
        None => None,
        Some(listen) => {
            let services = loaded
                .file
                .services
                .iter()
                .map(|s| s.name.clone())
                .collect();
            let admin = match Admin::start(broker.clone(), listen, services) {
                Ok(admin) => admin,
                Err(e) => {
                    // Stop the actors in order first: dropped unstarted
                    // with the System, they would panic before the message.
                    broker.shutdown().await;
                    return Err(e).with_context(|| format!("{origin}: admin.listen = {listen}"));
                }
            };
            tracing::info!(addr = %admin.addr, "admin HTTP listening (/metrics /stats /health /ready)");
            Some(admin)
        }
    };
    // A stop signal during start-up cancels the start: a worker slow to
    // get ready (up to its ready_timeout_ms) must not hold off Ctrl-C or
    // `systemctl stop`. What was started is stopped as at shutdown.
    let starting = start_services(&broker, &loaded, &origin);
    let started = tokio::select! {
        biased;
        signal = stop_signal(&mut terminate, &mut interrupt) => Err(signal),
        started = starting => Ok(started),
    };
    match started {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            stop_all(&broker, admin, &notifier, None, &origin).await;
            return Err(e);
        }
        Err(signal) => {
            tracing::warn!(
                signal,
                "stop signal during start-up: start cancelled, stopping what was started"
            );
            let report = stop_all(&broker, admin, &notifier, Some(&mut hangup), &origin).await;
            tracing::info!(
                signal,
                stopped = report.stopped.len(),
                took_ms = report.took.as_millis() as u64,
                "procbroker stopped during start-up"
            );
            return Ok(());
        }
    }
    tracing::info!("procbroker running; SIGTERM or SIGINT to stop");
    // READY=1 once /ready would say 200, then STATUS= and watchdog pings,
    // on this thread: the Router's.
    actix::spawn(std::rc::Rc::clone(&notifier).watch(broker.clone()));
    let mut current = loaded;
    let signal = loop {
        // Biased: signals that arrived during start-up are all pending at
        // once, and a stop must win every time, not on a coin toss.
        tokio::select! {
            biased;
            _ = terminate.recv() => break "SIGTERM",
            _ = interrupt.recv() => break "SIGINT",
            _ = usr1.recv() => {
                if !broker.reopen_logs().await {
                    tracing::info!("SIGUSR1: no [logs] dir is configured; nothing to reopen");
                }
            }
            _ = hangup.recv() => {
                tracing::info!(config = %origin, "SIGHUP: reloading the configuration");
                notifier.reloading();
                // A rolling restart may take a while; a stop signal meanwhile
                // abandons the reload and stops the broker.
                let reloading = crate::reload::reload(&broker, current, path.as_deref(), sets);
                tokio::select! {
                    biased;
                    signal = stop_signal(&mut terminate, &mut interrupt) => {
                        tracing::warn!(signal, "stop signal during a reload: the reload is abandoned");
                        break signal;
                    }
                    new = reloading => {
                        if let Some(admin) = &admin {
                            admin.set_services(service_names(&new));
                        }
                        notifier.set_services(service_names(&new));
                        notifier.reloaded(&broker).await;
                        current = new;
                    }
                }
            }
        }
    };
    tracing::info!(signal, "shutting down");
    let report = stop_all(&broker, admin, &notifier, Some(&mut hangup), &origin).await;
    tracing::info!(
        drained = report.drained,
        stopped = report.stopped.len(),
        took_ms = report.took.as_millis() as u64,
        "procbroker stopped"
    );
    Ok(())
}

/// The first of SIGTERM and SIGINT (SIGTERM wins when both are pending).
async fn stop_signal(
    terminate: &mut tokio::signal::unix::Signal,
    interrupt: &mut tokio::signal::unix::Signal,
) -> &'static str {
    tokio::select! {
        biased;
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    }
}

/// Stops the broker in order (systemd told first, then the actors and
/// children, then the admin server), whichever way the run ends.
///
/// With `hangup`, a pending SIGHUP is logged as not applied: reloading a
/// broker that is stopping changes nothing, but whoever sent it is told so
/// rather than left to guess. It is looked for when the stop begins and
/// again when it has ended: a SIGHUP sent just before the stop signal may
/// be handled by another thread after it, so it can still be on its way
/// at the first look.
async fn stop_all(
    broker: &procbroker::embed::BrokerHandle,
    admin: Option<Admin>,
    notifier: &Notifier,
    mut hangup: Option<&mut tokio::signal::unix::Signal>,
    origin: &str,
) -> procbroker::embed::ShutdownReport {
    let mut hangup_not_applied = || {
        if let Some(hangup) = hangup.as_deref_mut()
            && futures_util::FutureExt::now_or_never(hangup.recv()).is_some()
        {
            tracing::info!(config = %origin, "SIGHUP: not reloaded, the broker is stopping");
        }
    };
    hangup_not_applied();
    notifier.stopping();
    let report = broker.shutdown().await;
    if let Some(admin) = admin {
        admin.stop().await;
    }
    hangup_not_applied();
    report
}

/// The configured services' names.
fn service_names(loaded: &Loaded) -> Vec<String> {
    loaded
        .file
        .services
        .iter()
        .map(|s| s.name.clone())
        .collect()
}

/// Waits until every worker of each service in `depends_on` is ready. A
/// dependency with a worker that has given up (`failed`), or that exited
/// after it was ready and is not restarted (`stopped`), will never be
/// ready: that is an error naming both services.
async fn await_dependencies(
    broker: &procbroker::embed::BrokerHandle,
    service: &str,
    depends_on: &[String],
    origin: &str,
) -> Result<()> {
    let mut said = false;
    loop {
        let table = broker.processes().await.unwrap_or_default();
        let mut waiting = Vec::new();
        for dep in depends_on {
            for p in table.iter().filter(|p| &p.service == dep) {
                match p.status {
                    ProcessStatus::Ready => {}
                    ProcessStatus::Failed | ProcessStatus::Stopped => bail!(
                        "{origin}: service {service:?} depends on {dep:?}, whose worker {} is {}                          and will not become ready",
                        p.id,
                        p.status
                    ),
                    _ => waiting.push(p.id.clone()),
                }
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if !said {
            said = true;
            tracing::info!(service, waiting_for = %waiting.join(", "),
                "waiting for the workers it depends on to be ready");
        }
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts the configured services, each after every worker of what it
/// `depends_on` is ready (the file's order otherwise); a service that
/// cannot start as configured is an error (what was started is then
/// stopped by the caller, in the reverse order).
async fn start_services(
    broker: &procbroker::embed::BrokerHandle,
    loaded: &Loaded,
    origin: &str,
) -> Result<()> {
    for service in loaded.services_in_start_order() {
        let name = service.name.clone();
        await_dependencies(broker, &name, &service.depends_on, origin).await?;
        match broker.spawn(service).await {
            Ok(spawned) => {
                let started = spawned.iter().filter(|p| p.pid.is_some()).count();
                let failed = spawned
                    .iter()
                    .filter(|p| p.pid.is_none() || p.status == ProcessStatus::Failed)
                    .count();
                if failed > 0 {
                    // A half-started service is not running as configured:
                    // say so once and stop, rather than report ready.
                    bail!(
                        "{origin}: service {name:?}: {failed} of {} workers could not start \
                         (the first error is in the log above)",
                        spawned.len()
                    );
                }
                for p in spawned.iter().filter(|p| !p.is_ready()) {
                    // Restarting: its first start failed and its restart
                    // policy goes on (backoff, max_restarts).
                    tracing::warn!(process = %p.id, status = %p.status,
                        error = p.error.as_deref().unwrap_or(""), "worker not ready after its first start");
                }
                let ready = spawned.iter().filter(|p| p.is_ready()).count();
                tracing::info!(service = %name, workers = spawned.len(), started, ready, "service spawned");
            }
            // These name the service themselves.
            Err(
                e @ (SpawnError::CannotRun { .. }
                | SpawnError::TooMany { .. }
                | SpawnError::NoRoom { .. }
                | SpawnError::RunAs { .. }),
            ) => bail!("{origin}: {e}"),
            Err(e) => bail!("{origin}: service {name:?}: {e}"),
        }
    }
    Ok(())
}
