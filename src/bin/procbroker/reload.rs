//! SIGHUP: reload the config file. The file is read again with
//! the environment and `--set` flags applied as at start; a file that does
//! not load changes nothing. New services start, removed ones are drained
//! and stopped, a changed `workers` is a Scale, any other change to a
//! service a rolling Restart with its new settings. `[broker]`, `[admin]`,
//! `[sysmon]`, `[cluster]` and `[logs]` cannot change live: a change there
//! is logged as ignored.

use procbroker::actors::broker::ControlError;
use procbroker::config::ServiceConfig;
use procbroker::config::file::Loaded;
use procbroker::embed::BrokerHandle;
use std::path::Path;

/// Reloads and applies; returns the configuration now in force.
pub async fn reload(
    broker: &BrokerHandle,
    current: Loaded,
    path: Option<&Path>,
    sets: &[String],
) -> Loaded {
    let new = match Loaded::load(path, std::env::vars(), sets) {
        Ok(new) => new,
        Err(e) => {
            // The message names the file, the key, and its line and column.
            tracing::error!("SIGHUP: the configuration did not load, nothing changed: {e}");
            return current;
        }
    };
    let (old, next) = (&current.file, &new.file);
    for (section, same) in [
        ("broker", old.broker == next.broker),
        ("admin", old.admin == next.admin),
        ("sysmon", old.sysmon == next.sysmon),
        ("cluster", old.cluster == next.cluster),
        ("logs", old.logs == next.logs),
    ] {
        if !same {
            tracing::warn!(
                section,
                "SIGHUP: [{section}] changed; it cannot change while running, ignored (restart the broker to apply it)"
            );
        }
    }
    let find = |list: &[ServiceConfig], name: &str| list.iter().find(|s| s.name == name).cloned();
    for gone in old
        .services
        .iter()
        .filter(|s| find(&next.services, &s.name).is_none())
    {
        match broker.retire(&gone.name).await {
            Ok(stopped) => {
                tracing::info!(service = %gone.name, stopped = stopped.len(), "SIGHUP: service removed")
            }
            Err(e) => {
                tracing::error!(service = %gone.name, error = %e, "SIGHUP: could not stop a removed service")
            }
        }
    }
    // New services start after what they depend on; a changed service
    // restarts alone: nothing cascades to what depends on it.
    for spec in &new.services_in_start_order() {
        match find(&old.services, &spec.name) {
            None => match broker.spawn(spec.clone()).await {
                Ok(spawned) => {
                    tracing::info!(service = %spec.name, workers = spawned.len(), "SIGHUP: service added")
                }
                Err(e) => {
                    tracing::error!(service = %spec.name, error = %e, "SIGHUP: could not start a new service")
                }
            },
            Some(before) if before == *spec => {}
            Some(before) => {
                let mut same_but_workers = before.clone();
                same_but_workers.workers = spec.workers;
                if same_but_workers != *spec {
                    match broker.reconfigure(spec.clone()).await {
                        Ok(restarted) => {
                            tracing::info!(service = %spec.name, restarted = restarted.len(), "SIGHUP: service restarted with its new settings")
                        }
                        Err(e @ ControlError::RollStopped { .. }) => {
                            tracing::error!(service = %spec.name, error = %e, "SIGHUP: the rolling restart with the new settings stopped; the workers not restarted keep serving the old ones")
                        }
                        Err(e) => {
                            tracing::error!(service = %spec.name, error = %e, "SIGHUP: new settings not applied")
                        }
                    }
                }
                if before.workers != spec.workers {
                    match broker.scale(&spec.name, spec.workers).await {
                        Ok(scaled) => {
                            tracing::info!(service = %spec.name, workers = scaled.workers,
                            started = scaled.started.len(), stopped = scaled.stopped.len(), "SIGHUP: service scaled")
                        }
                        Err(e) => {
                            tracing::error!(service = %spec.name, error = %e, "SIGHUP: could not scale")
                        }
                    }
                }
            }
        }
    }
    new
}
