//! `procbroker run`: the broker as a daemon.

use anyhow::{Context, Result, bail};
use procbroker::actors::broker::SpawnError;
use procbroker::admin::Admin;
use procbroker::config::file::Loaded;
use procbroker::embed::ProcBroker;
use std::path::PathBuf;
use tokio::signal::unix::{SignalKind, signal};

/// Loads the configuration, starts the actors and the services, serves
/// until SIGTERM or SIGINT, then shuts down in order (DESIGN 5.6).
pub fn run(config: Option<PathBuf>, sets: &[String]) -> Result<()> {
    let loaded = Loaded::load(config.as_deref(), std::env::vars(), sets)?;
    let origin = loaded.path.as_ref().map_or_else(
        || "the embedded default".to_owned(),
        |p| p.display().to_string(),
    );
    actix::System::new().block_on(serve(loaded, origin))
}

async fn serve(loaded: Loaded, origin: String) -> Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let broker = ProcBroker::builder().config(loaded.broker_config()).start();
    tracing::info!(config = %origin, services = loaded.file.services.len(), "procbroker starting");
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
    for service in loaded.file.services.clone() {
        let name = service.name.clone();
        match broker.spawn(service).await {
            Ok(spawned) => {
                let ready = spawned.iter().filter(|p| p.pid.is_some()).count();
                tracing::info!(service = %name, workers = spawned.len(), started = ready, "service spawned");
            }
            Err(e @ SpawnError::CannotRun { .. }) => {
                broker.shutdown().await;
                bail!("{origin}: {e}");
            }
            Err(e) => {
                broker.shutdown().await;
                bail!("{origin}: service {name:?}: {e}");
            }
        }
    }
    tracing::info!("procbroker running; SIGTERM or SIGINT to stop");
    let signal = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    tracing::info!(signal, "shutting down");
    let report = broker.shutdown().await;
    if let Some(admin) = admin {
        admin.stop().await;
    }
    tracing::info!(
        drained = report.drained,
        stopped = report.stopped.len(),
        took_ms = report.took.as_millis() as u64,
        "procbroker stopped"
    );
    Ok(())
}
