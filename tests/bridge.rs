//! Subprocess bridges with real children: services in Python and Rust under
//! the broker, round-robin over real processes, service-to-service calls,
//! restarts and `failed`, stop with escalation, 100 concurrent spawns.

mod support;

use futures_util::future::join_all;
use procbroker::actors::broker::SpawnError;
use procbroker::config::ServiceConfig;
use procbroker::embed::ProcBroker;
use procbroker::protocol::rpc::ProcessStatus;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::*;

fn python_echo(workers: u32) -> ServiceConfig {
    ServiceConfig::new("pyecho", python())
        .args([format!(
            "{}/examples/python/echo_worker.py",
            env!("CARGO_MANIFEST_DIR")
        )])
        .workers(workers)
}

#[actix::test]
async fn the_python_example_serves_under_the_broker() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let spawned = broker.spawn(python_echo(2)).await.expect("spawn");
    assert_eq!(spawned.len(), 2);
    assert!(
        spawned
            .iter()
            .all(|p| p.status == ProcessStatus::Ready && p.pid.is_some()),
        "{spawned:?}"
    );
    let reply = broker
        .call("pyecho", "Reverse", &"stressed")
        .await
        .expect("call");
    assert_eq!(reply.payload_as::<String>().expect("str"), "desserts");
    let e = broker
        .call("pyecho", "Nope", &())
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), Some("unknown_method"));
    // The RPC answers from the same table as the direct read.
    let via_rpc: Vec<procbroker::protocol::rpc::ProcessInfo> = broker
        .call("broker", "ListProcesses", &())
        .await
        .expect("ListProcesses")
        .payload_as()
        .expect("decode");
    assert_eq!(via_rpc, broker.processes().await.expect("processes"));
    assert_eq!(via_rpc.len(), 2);
    let pids: Vec<u32> = spawned.iter().filter_map(|p| p.pid).collect();
    let stopped = broker.stop("pyecho").await.expect("stop");
    assert_eq!(stopped, ["pyecho.0", "pyecho.1"]);
    let table = broker.processes().await.expect("list");
    assert!(
        table.iter().all(|p| p.status == ProcessStatus::Stopped),
        "{table:?}"
    );
    assert!(pids.iter().all(|&pid| reaped(pid)), "zombie or survivor");
}

#[actix::test]
async fn a_service_calls_another_through_the_broker() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    broker.spawn(echo("echo", 2)).await.expect("echo");
    broker.spawn(bench_client("client")).await.expect("client");
    let report = run_client(&broker, 500, 8).await;
    assert_eq!((report.ok, report.errors), (500, 0), "{report:?}");
    let stats = broker.stats().await.expect("stats");
    let p = &stats.per_process;
    // Exactly one reply per request: 500 replies and the Run request.
    assert_eq!(p["client.0"].counters.total_sent, 501);
    assert_eq!(p["client.0"].counters.request_count, 500);
    // Exact round-robin between the two workers.
    assert_eq!(p["echo.0"].counters.request_count, 0);
    assert_eq!(p["echo.0"].counters.response_count, 250);
    assert_eq!(p["echo.1"].counters.response_count, 250);
    assert_eq!(stats.latency_us["echo"].count, 500);
}

#[actix::test]
async fn round_robin_over_four_real_workers() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let spawned = broker.spawn(echo("echo", 4)).await.expect("spawn");
    let ids: Vec<&str> = spawned.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["echo.0", "echo.1", "echo.2", "echo.3"]);
    let mut served = BTreeMap::<String, u32>::new();
    for i in 0..400u32 {
        let reply = broker.call("echo", "Anything", &i).await.expect("call");
        assert_eq!(reply.payload_as::<u32>().expect("u32"), i);
        *served.entry(reply.source().to_owned()).or_default() += 1;
    }
    assert_eq!(served.values().collect::<Vec<_>>(), [&100; 4], "{served:?}");
}

#[actix::test]
async fn max_restarts_spent_means_failed() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let spec = ServiceConfig::new("dies", "false").restart(quick_restarts(2));
    let first = broker.spawn(spec).await.expect("spawn");
    // It exited before it was ready: the first start failed.
    assert_eq!(first[0].status, ProcessStatus::Restarting);
    let p = wait_for_process(&broker, "dies.0", |p| p.status == ProcessStatus::Failed).await;
    assert_eq!((p.restarts, p.exit_code), (2, Some(1)));
    let stats = broker.stats().await.expect("stats");
    assert_eq!(stats.per_process["dies.0"].faults.restarts, 2);
    assert_eq!(stats.per_process["dies.0"].status, ProcessStatus::Failed);
    let e = broker.call("dies", "X", &()).await.expect_err("no worker");
    assert_eq!(e.code(), Some("unavailable"));
}

#[actix::test]
async fn a_command_that_goes_away_spends_its_restarts_with_backoff() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let dir = std::env::temp_dir().join(format!("procbroker-gone-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let script = dir.join("fails.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 1\n").expect("write");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let policy = procbroker::protocol::rpc::RestartPolicy {
        max_restarts: 3,
        backoff_initial_ms: 100,
        backoff_max_ms: 100,
        ..procbroker::protocol::rpc::RestartPolicy::default()
    };
    let spec = ServiceConfig::new("gone", script.display().to_string()).restart(policy);
    let first = broker.spawn(spec).await.expect("it ran once");
    assert_eq!(first[0].status, ProcessStatus::Restarting);
    // From now on every restart fails to spawn.
    std::fs::remove_file(&script).expect("remove");
    let started = Instant::now();
    let p = wait_for_process(&broker, "gone.0", |p| p.status == ProcessStatus::Failed).await;
    // Each failed spawn counts as a restart and waits its backoff.
    assert_eq!(p.restarts, 3);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
}

#[actix::test]
async fn a_command_that_cannot_run_is_refused_at_once() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let err = broker
        .spawn(ServiceConfig::new("ghost", "/nonexistent/program"))
        .await
        .expect_err("cannot run");
    assert!(matches!(err, SpawnError::CannotRun { .. }), "{err}");
    let p = wait_for_process(&broker, "ghost.0", |_| true).await;
    assert_eq!((p.status, p.pid), (ProcessStatus::Failed, None));
    // Service names are checked before anything runs.
    let err = broker.spawn(echo("broker", 1)).await.expect_err("reserved");
    assert!(matches!(err, SpawnError::Name(_)), "{err}");
}

#[actix::test]
async fn no_ready_event_in_time_is_a_failed_start() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let spec = ServiceConfig::new("mute", "sleep")
        .args(["30"])
        .ready_timeout(Duration::from_millis(200))
        .restart(quick_restarts(0));
    let started = Instant::now();
    let first = broker.spawn(spec).await.expect("spawn");
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(first[0].status, ProcessStatus::Failed, "{first:?}");
    let pid = first[0].pid.expect("it ran");
    let p = wait_for_process(&broker, "mute.0", |p| p.exit_code.is_none()).await;
    assert_eq!(p.status, ProcessStatus::Failed);
    assert!(reaped(pid));
}

#[actix::test]
async fn stop_escalates_to_sigkill_and_reaps() {
    let broker = ProcBroker::builder()
        .sysmon_interval(None)
        .kill_timeout(Duration::from_millis(400))
        .start();
    // Ignores EOF and SIGTERM; speaks no protocol, so no handshake.
    let spec = ServiceConfig::new("stubborn", "sh")
        .args(["-c", "trap '' TERM; while :; do sleep 1; done"])
        .no_ready_handshake();
    let spawned = broker.spawn(spec).await.expect("spawn");
    let pid = spawned[0].pid.expect("pid");
    let started = Instant::now();
    assert_eq!(
        broker.stop("stubborn.0").await.expect("stop"),
        ["stubborn.0"]
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(reaped(pid));
    let p = wait_for_process(&broker, "stubborn.0", |_| true).await;
    assert_eq!(p.status, ProcessStatus::Stopped);
    assert!(broker.stop("nothing").await.is_err());
}

#[actix::test]
async fn a_hundred_concurrent_spawns() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let names: Vec<String> = (0..100).map(|i| format!("svc{i}")).collect();
    // 100 start-ups at once on a loaded 2-core machine can take longer
    // than the 5 s default.
    let spawned = join_all(
        names
            .iter()
            .map(|n| broker.spawn(echo(n, 1).ready_timeout(Duration::from_secs(30)))),
    )
    .await;
    let mut pids = Vec::new();
    for (name, result) in names.iter().zip(spawned) {
        let p = result.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(p[0].status, ProcessStatus::Ready, "{name}");
        pids.push(p[0].pid.expect("pid"));
    }
    let replies = join_all(names.iter().map(|n| broker.call(n, "Echo", n))).await;
    for (name, reply) in names.iter().zip(replies) {
        let reply = reply.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&reply.payload_as::<String>().expect("str"), name);
    }
    let stops = join_all(names.iter().map(|n| broker.stop(n))).await;
    assert!(stops.iter().all(Result::is_ok));
    let survivors: Vec<u32> = pids.into_iter().filter(|&pid| !reaped(pid)).collect();
    assert!(survivors.is_empty(), "not reaped: {survivors:?}");
    let table = broker.processes().await.expect("list");
    assert_eq!(
        table
            .iter()
            .filter(|p| p.status == ProcessStatus::Stopped)
            .count(),
        100
    );
}

#[actix::test]
async fn a_new_child_is_sampled_soon_not_after_a_whole_interval() {
    // Sysmon every 60 s: a child started now gets its first sample about a
    // second after it starts, not at the next tick.
    let broker = ProcBroker::builder()
        .sysmon_interval(Some(Duration::from_secs(60)))
        .start();
    let spawned = broker.spawn(echo("echo", 2)).await.expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = broker.stats().await.expect("stats");
        let sampled: Vec<_> = spawned
            .iter()
            .filter_map(|p| stats.process_metrics.get(&p.id))
            .filter(|m| m.vmrss.is_some_and(|kb| kb > 0))
            .collect();
        if sampled.len() == spawned.len() {
            for (m, p) in sampled.iter().zip(&spawned) {
                assert_eq!(Some(m.pid), p.pid);
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not sampled within 5 s: {:?}",
            stats.process_metrics
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.shutdown().await;
}

/// A Python child that exits with status 1 after `after_s` seconds.
fn crashes_after(name: &str, after_s: &str, max_restarts: i64, window_ms: u64) -> ServiceConfig {
    ServiceConfig::new(name, python())
        .args([
            "-c".to_owned(),
            format!("import time, sys; time.sleep({after_s}); sys.exit(1)"),
        ])
        .no_ready_handshake()
        .restart(procbroker::protocol::rpc::RestartPolicy {
            max_restarts,
            backoff_initial_ms: 10,
            backoff_max_ms: 10,
            window_ms,
        })
}

async fn row(
    broker: &procbroker::embed::BrokerHandle,
    id: &str,
) -> procbroker::protocol::rpc::ProcessInfo {
    broker
        .processes()
        .await
        .expect("processes")
        .into_iter()
        .find(|p| p.id == id)
        .expect("row")
}

#[actix::test]
async fn restart_intensity_counts_only_the_restarts_inside_the_window() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    // Exits at once: a fourth exit inside 10 s with max_restarts = 3.
    broker
        .spawn(crashes_after("fast", "0", 3, 10_000))
        .await
        .expect("spawn fast");
    // Exits every 0.45 s with a 0.3 s window and max_restarts = 1: never
    // two restarts inside one window, so it keeps being restarted (v1's
    // lifetime count would have failed it at its second exit).
    broker
        .spawn(crashes_after("slow", "0.45", 1, 300))
        .await
        .expect("spawn slow");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let fast = row(&broker, "fast.0").await;
        if fast.status == ProcessStatus::Failed {
            assert_eq!(fast.restarts, 3);
            break;
        }
        assert!(Instant::now() < deadline, "fast.0 never failed: {fast:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Three restarts take ~1.4 s plus three Python start-ups; it must never
    // be failed on the way.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let slow = row(&broker, "slow.0").await;
        assert_ne!(slow.status, ProcessStatus::Failed, "{slow:?}");
        if slow.restarts >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slow.0 restarted too few times: {slow:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.shutdown().await;
}

#[actix::test]
async fn the_sdk_and_the_python_example_answer_health_checks() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let check = procbroker::config::HealthCheck {
        method: "Ping".into(),
        interval_ms: 100,
        // A healthy reply is ~0.1 ms; 2 s is never missed under load.
        timeout_ms: 2000,
        failures: 1,
    };
    broker
        .spawn(echo("echo", 1).health(check.clone()))
        .await
        .expect("spawn echo");
    broker
        .spawn(
            ServiceConfig::new("pyecho", python())
                .args([format!(
                    "{}/examples/python/echo_worker.py",
                    env!("CARGO_MANIFEST_DIR")
                )])
                .health(check),
        )
        .await
        .expect("spawn pyecho");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let stats = broker.stats().await.expect("stats");
    for id in ["echo.0", "pyecho.0"] {
        let p = &stats.per_process[id];
        assert_eq!(
            (p.faults.health_failures, p.faults.restarts),
            (0, 0),
            "{id}"
        );
        // Checks are not traffic: nothing was routed to or from them.
        assert_eq!(p.counters.total_sent, 0, "{id}");
    }
    broker.shutdown().await;
}

#[actix::test]
async fn scale_and_a_rolling_restart_under_load_cost_no_caller_an_error() {
    use std::cell::Cell;
    use std::rc::Rc;
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    broker.spawn(echo("echo", 2)).await.expect("spawn");
    // Eight callers keep a request in flight each, all along.
    let running = Rc::new(Cell::new(true));
    let (ok, failed) = (
        Rc::new(Cell::new(0u64)),
        Rc::new(Cell::new(Vec::<String>::new())),
    );
    let mut callers = Vec::new();
    for _ in 0..8 {
        let (broker, running, ok, failed) = (
            broker.clone(),
            Rc::clone(&running),
            Rc::clone(&ok),
            Rc::clone(&failed),
        );
        callers.push(actix::spawn(async move {
            while running.get() {
                match broker.call("echo", "Echo", &"x").await {
                    Ok(_) => ok.set(ok.get() + 1),
                    Err(e) => {
                        let mut seen = failed.take();
                        seen.push(e.to_string());
                        failed.set(seen);
                    }
                }
            }
        }));
    }
    let pids =
        |list: Vec<procbroker::protocol::rpc::ProcessInfo>| -> BTreeMap<String, Option<u32>> {
            list.into_iter()
                .filter(|p| p.service == "echo" && p.status == ProcessStatus::Ready)
                .map(|p| (p.id, p.pid))
                .collect()
        };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let up = broker.scale("echo", 4).await.expect("scale up");
    assert_eq!(
        (up.workers, up.started, up.stopped.len()),
        (4, vec!["echo.2".to_owned(), "echo.3".to_owned()], 0)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let down = broker.scale("echo", 1).await.expect("scale down");
    assert_eq!(down.stopped, ["echo.1", "echo.2", "echo.3"]);
    assert!(down.started.is_empty());
    tokio::time::sleep(Duration::from_millis(100)).await;
    broker.scale("echo", 3).await.expect("scale up again");
    let before = pids(broker.processes().await.expect("list"));
    assert_eq!(before.len(), 3, "{before:?}");
    let t = Instant::now();
    let restarted = broker.restart("echo").await.expect("rolling restart");
    eprintln!("rolling restart of 3 workers under load: {:?}", t.elapsed());
    assert_eq!(restarted, ["echo.0", "echo.1", "echo.2"]);
    let after = pids(broker.processes().await.expect("list"));
    for (id, pid) in &before {
        assert_ne!(after.get(id), Some(pid), "{id} has a new pid");
    }
    let rows = broker.processes().await.expect("list");
    assert!(
        rows.iter()
            .filter(|p| p.service == "echo")
            .all(|p| p.restarts == 0),
        "{rows:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    running.set(false);
    join_all(callers).await;
    let failed = failed.take();
    assert!(
        failed.is_empty(),
        "{} errors: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok.get() > 100, "{} calls", ok.get());
    // The RPCs' bad payloads change nothing.
    for (payload, code) in [
        (
            serde_json::json!({"service": "nope", "workers": 2}),
            "unknown_target",
        ),
        (
            serde_json::json!({"service": "echo", "workers": -1}),
            "bad_request",
        ),
        (serde_json::json!({"service": "echo"}), "bad_request"),
        (
            serde_json::json!({"service": "echo", "workers": 0}),
            "bad_request",
        ),
    ] {
        let e = broker
            .call("broker", "Scale", &payload)
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Some(code), "{payload}: {e}");
    }
    let e = broker
        .call("broker", "Restart", &serde_json::json!({"id": "echo.9"}))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Some("unknown_target"));
    assert_eq!(pids(broker.processes().await.expect("list")).len(), 3);
    broker.shutdown().await;
}
