//! Supervision when a change goes wrong, with real children: a rolling
//! restart or a reload to a build that cannot start stops at its first new
//! worker and the rest keep serving; `Scale` says which workers failed and
//! why; a worker that exits before `ready` is a failed start whatever its
//! status; workers removed from the configuration leave the tables.

mod support;

use procbroker::actors::broker::ControlError;
use procbroker::config::ServiceConfig;
use procbroker::embed::{BrokerHandle, ProcBroker};
use procbroker::protocol::rpc::ProcessStatus;
use std::path::PathBuf;
use std::time::Duration;
use support::*;

/// A folder of this test's own.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("procbroker-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

/// Writes an executable shell script (through a new file and a rename, as
/// a deploy would, so a running copy is never half-written).
fn script(path: &std::path::Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).expect("write");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The built-in echo worker behind a script that a test can replace.
fn echo_script(path: &std::path::Path) {
    script(path, &format!("exec {BIN} worker echo"));
}

async fn pid_of(broker: &BrokerHandle, id: &str) -> Option<u32> {
    broker
        .processes()
        .await
        .expect("list")
        .into_iter()
        .find(|p| p.id == id)
        .and_then(|p| p.pid)
}

#[actix::test]
async fn a_rolling_restart_to_a_build_that_cannot_start_stops_at_its_first_worker() {
    let dir = scratch("roll");
    let program = dir.join("api.sh");
    echo_script(&program);
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let spec = ServiceConfig::new("api", program.display().to_string())
        .workers(3)
        .restart(quick_restarts(-1));
    broker.spawn(spec.clone()).await.expect("spawn");
    let (old1, old2) = (
        pid_of(&broker, "api.1").await,
        pid_of(&broker, "api.2").await,
    );
    let callers = load(&broker, "api", 4);
    actix::clock::sleep(Duration::from_millis(100)).await;

    // The deploy replaces the program by one that cannot start.
    script(&program, "exit 3");
    let e = broker.restart("api").await.expect_err("the roll must stop");
    match &e {
        ControlError::RollStopped {
            worker,
            reason,
            restarted,
            untouched,
        } => {
            assert_eq!(worker, "api.0", "{e}");
            assert!(reason.contains("status 3"), "{e}");
            assert!(restarted.is_empty(), "{e}");
            assert_eq!(untouched, &["api.1", "api.2"], "{e}");
        }
        other => panic!("not a stopped roll: {other}"),
    }
    // The workers not reached keep serving, with the same processes.
    actix::clock::sleep(Duration::from_millis(300)).await;
    let (ok, errors) = callers.stop().await;
    eprintln!(
        "roll to a build that exits 3, 4 in flight: {ok} replies, {} errors",
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    assert!(ok > 100, "{ok} calls");
    assert_eq!(pid_of(&broker, "api.1").await, old1);
    assert_eq!(pid_of(&broker, "api.2").await, old2);
    let rows = broker.processes().await.expect("list");
    let ready = rows
        .iter()
        .filter(|p| p.service == "api" && p.status == ProcessStatus::Ready)
        .count();
    assert_eq!(ready, 2, "{rows:?}");

    // Through the RPC: an error naming the worker and why.
    let e = broker
        .call("broker", "Restart", &serde_json::json!({"id": "api"}))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Some("unavailable"), "{e}");
    assert!(e.to_string().contains("api.0"), "{e}");

    // A reload to a command that cannot run is refused before any worker
    // is stopped.
    script(&program, &format!("exec {BIN} worker echo"));
    broker.restart("api.0").await.expect("fixed");
    let before: Vec<_> = broker.processes().await.expect("list");
    let e = broker
        .reconfigure(ServiceConfig::new("api", "/nonexistent/api").workers(3))
        .await
        .expect_err("refused");
    assert!(matches!(e, ControlError::Invalid(_)), "{e}");
    assert!(e.to_string().contains("/nonexistent/api"), "{e}");
    assert_eq!(broker.processes().await.expect("list"), before);

    // A reload whose settings make the program crash stops its roll too.
    let crashing = spec.clone().env("CRASH", "1");
    script(
        &program,
        &format!("[ -n \"$CRASH\" ] && exit 7\nexec {BIN} worker echo"),
    );
    let callers = load(&broker, "api", 4);
    let e = broker.reconfigure(crashing).await.expect_err("stops");
    assert!(
        matches!(&e, ControlError::RollStopped { worker, .. } if worker == "api.0"),
        "{e}"
    );
    let (ok, errors) = callers.stop().await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(ok > 0);
    broker.shutdown().await;
}

#[actix::test]
async fn a_worker_that_exits_zero_before_ready_is_a_failed_start() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let spawned = broker
        .spawn(ServiceConfig::new("quits", "true").restart(quick_restarts(2)))
        .await
        .expect("spawn");
    assert_eq!(spawned[0].status, ProcessStatus::Restarting, "{spawned:?}");
    let error = spawned[0].error.as_deref().unwrap_or("");
    assert!(error.contains("status 0 before it was ready"), "{error}");
    let p = wait_for_process(&broker, "quits.0", |p| p.status == ProcessStatus::Failed).await;
    assert_eq!((p.restarts, p.exit_code), (2, Some(0)));
    broker.shutdown().await;
}

#[actix::test]
async fn scale_says_which_workers_failed_and_starts_them_again_later() {
    let dir = scratch("scale");
    let program = dir.join("sl.sh");
    echo_script(&program);
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let spec = ServiceConfig::new("sl", program.display().to_string()).restart(quick_restarts(0));
    broker.spawn(spec).await.expect("spawn");

    // The program is gone: none of the new workers can start.
    std::fs::remove_file(&program).expect("rm");
    let e = broker.scale("sl", 3).await.expect_err("none started");
    match &e {
        ControlError::NoneStarted { service, failed } => {
            assert_eq!(service, "sl");
            let ids: Vec<&str> = failed.iter().map(|f| f.id.as_str()).collect();
            assert_eq!(ids, ["sl.1", "sl.2"], "{e}");
            assert!(failed.iter().all(|f| f.error.contains("sl.sh")), "{e}");
        }
        other => panic!("{other}"),
    }
    // Back in place: the same Scale starts the two that failed.
    echo_script(&program);
    let up = broker.scale("sl", 3).await.expect("scale");
    assert_eq!(up.started, ["sl.1", "sl.2"], "{up:?}");
    assert!(up.failed.is_empty(), "{up:?}");

    // Some start, some do not: the reply says which and why.
    script(
        &program,
        &format!("[ \"$PROCBROKER_PROCESS_ID\" = sl.4 ] && exit 9\nexec {BIN} worker echo"),
    );
    let up = broker.scale("sl", 5).await.expect("partly");
    assert_eq!(up.started, ["sl.3"], "{up:?}");
    assert_eq!(up.failed.len(), 1, "{up:?}");
    assert_eq!(up.failed[0].id, "sl.4");
    assert!(up.failed[0].error.contains("status 9"), "{up:?}");
    // Over the RPC, `failed` is part of the reply.
    let reply: serde_json::Value = broker
        .call(
            "broker",
            "Scale",
            &serde_json::json!({"service": "sl", "workers": 5}),
        )
        .await
        .expect("scale rpc")
        .payload_as()
        .expect("json");
    assert!(reply["failed"].is_array(), "{reply}");

    // More than max_workers: refused before anything starts.
    let e = broker.scale("sl", 100_000).await.expect_err("bound");
    assert!(e.to_string().contains("max_workers"), "{e}");
    broker.shutdown().await;
}

#[actix::test]
async fn workers_removed_from_the_configuration_leave_the_tables() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    broker.spawn(echo("echo", 3)).await.expect("spawn");
    broker.spawn(echo("gone", 1)).await.expect("spawn");
    for i in 0..30u32 {
        broker.call("echo", "Echo", &i).await.expect("call");
        broker.call("gone", "Echo", &i).await.expect("call");
    }
    let down = broker.scale("echo", 1).await.expect("down");
    assert_eq!(down.stopped, ["echo.1", "echo.2"]);
    broker.retire("gone").await.expect("retire");
    let stats = wait_for_stats(&broker, |s| {
        !s.per_process.contains_key("echo.1") && !s.per_process.contains_key("gone.0")
    })
    .await;
    let ids: Vec<&String> = stats.per_process.keys().collect();
    assert!(!ids.iter().any(|id| *id == "echo.2"), "{ids:?}");
    // What they did stays in the totals.
    assert_eq!(stats.total.counters.response_count, 60, "{:?}", stats.total);
    let rows = broker.processes().await.expect("list");
    let ids: Vec<&str> = rows.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["echo.0"], "{rows:?}");
    // Scaled up again, the same ids are back.
    broker.scale("echo", 2).await.expect("up");
    let stats = broker.stats().await.expect("stats");
    assert!(stats.per_process.contains_key("echo.1"));
    broker.shutdown().await;
}

async fn wait_for_stats(
    broker: &BrokerHandle,
    done: impl Fn(&procbroker::protocol::stats::MessageStats) -> bool,
) -> procbroker::protocol::stats::MessageStats {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = broker.stats().await.expect("stats");
        if done(&stats) {
            return stats;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never: {:?}",
            stats.per_process.keys().collect::<Vec<_>>()
        );
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
}
