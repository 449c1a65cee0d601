//! Faults from real children: bad frames, a stream out
//! of sync, forged sources and replies, `kill -9` with requests in flight, a
//! child that floods and never reads. Every request is counted and must be
//! answered exactly once.

mod support;

use futures_util::future::join_all;
use nix::sys::signal::Signal;
use procbroker::actors::messages::PendingCount;
use procbroker::embed::{BrokerHandle, ProcBroker};
use procbroker::service::Methods;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::*;

async fn chaos_broker() -> BrokerHandle {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    broker
        .spawn(chaos("chaos").restart(quick_restarts(-1)))
        .await
        .expect("spawn chaos");
    broker
}

async fn echo_ok(broker: &BrokerHandle) {
    let reply = broker
        .call("chaos", "Echo", &"still here")
        .await
        .expect("echo");
    assert_eq!(reply.payload_as::<String>().expect("str"), "still here");
}

#[actix::test]
async fn invalid_envelopes_are_dropped_counted_and_answered() {
    let broker = chaos_broker().await;
    let seen: BTreeMap<String, Option<String>> = broker
        .call("chaos", "Garbage", &())
        .await
        .expect("garbage")
        .payload_as()
        .expect("map");
    assert_eq!(seen["code"].as_deref(), Some("bad_request"));
    assert_eq!(seen["source"].as_deref(), Some("broker"));
    assert!(
        seen["error"]
            .as_deref()
            .unwrap_or_default()
            .contains("target"),
        "{seen:?}"
    );
    // The pipe stayed up: same child, no restart.
    echo_ok(&broker).await;
    let stats = broker.stats().await.expect("stats");
    let p = &stats.per_process["chaos.0"];
    assert_eq!((p.faults.bad_frames, p.faults.restarts), (2, 0));
}

#[actix::test]
async fn a_stream_out_of_sync_kills_and_restarts_the_child() {
    let broker = chaos_broker().await;
    for (round, method) in ["Oversize", "Torn", "Junk"].into_iter().enumerate() {
        let e = broker.call("chaos", method, &()).await.expect_err(method);
        assert_eq!(e.code(), Some("worker_exited"), "{method}: {e}");
        let restarts = u32::try_from(round).expect("small") + 1;
        ready_again(&broker, "chaos.0", restarts).await;
        echo_ok(&broker).await;
    }
    let stats = broker.stats().await.expect("stats");
    let p = &stats.per_process["chaos.0"];
    // Oversize and Junk are frame errors; Torn is one too (EOF inside a frame).
    assert_eq!((p.faults.bad_frames, p.faults.restarts), (3, 3));
}

#[actix::test]
async fn forged_sources_and_replies_change_nothing() {
    let broker = chaos_broker().await;
    broker
        .add_service("echo", 1, procbroker::workers::echo())
        .await
        .expect("echo");
    let answer: BTreeMap<String, String> = broker
        .call("chaos", "Forge", &())
        .await
        .expect("forge")
        .payload_as()
        .expect("map");
    // The forged request was answered to its real sender, not to "victim.0".
    assert_eq!(answer["target"], "chaos.0");
    assert_eq!(answer["payload"], "forged");
    let stats = broker.stats().await.expect("stats");
    assert_eq!(stats.per_process["chaos.0"].faults.unmatched_replies, 1);
    assert_eq!(stats.per_process["echo.0"].counters.response_count, 1);
}

#[actix::test]
async fn kill_9_fails_requests_in_flight_at_once_and_the_worker_comes_back() {
    let broker = chaos_broker().await;
    let pid = broker.processes().await.expect("list")[0].pid.expect("pid");
    let held: Vec<_> = (0..10)
        .map(|_| {
            let broker = broker.clone();
            actix::spawn(async move {
                let result = broker.call("chaos", "Hold", &()).await;
                (result, Instant::now())
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while broker.router().send(PendingCount).await.expect("router") < 10 {
        assert!(Instant::now() < deadline, "requests never got in flight");
        actix::clock::sleep(Duration::from_millis(2)).await;
    }
    let killed = Instant::now();
    kill(pid, Signal::SIGKILL);
    for outcome in join_all(held).await {
        let (result, at) = outcome.expect("task");
        let e = result.expect_err("held requests cannot succeed");
        assert_eq!(e.code(), Some("worker_exited"), "{e}");
        let after = at.duration_since(killed);
        // At once, not at the 30 s request timeout; 1 s leaves room for a
        // loaded machine to schedule the exit, the EOF and this task.
        assert!(
            after < Duration::from_secs(1),
            "answered {after:?} after the kill"
        );
    }
    let p = ready_again(&broker, "chaos.0", 1).await;
    assert_ne!(p.pid, Some(pid));
    assert!(reaped(pid));
    echo_ok(&broker).await;
    assert_eq!(broker.router().send(PendingCount).await.expect("router"), 0);
}

#[actix::test]
async fn every_request_is_answered_exactly_once_while_workers_are_killed() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    broker
        .spawn(echo("echo", 4).restart(quick_restarts(-1)))
        .await
        .expect("echo");
    broker.spawn(bench_client("client")).await.expect("client");
    let killer = {
        let broker = broker.clone();
        actix::spawn(async move {
            let mut kills = 0;
            for round in 0..8 {
                actix::clock::sleep(Duration::from_millis(40)).await;
                let id = format!("echo.{}", round % 4);
                let table = broker.processes().await.expect("list");
                if let Some(pid) = table.iter().find(|p| p.id == id).and_then(|p| p.pid) {
                    kill(pid, Signal::SIGKILL);
                    kills += 1;
                }
            }
            kills
        })
    };
    let calls = 20_000;
    let report = run_client(&broker, calls, 16).await;
    let kills = killer.await.expect("killer");
    assert!(kills >= 1);
    assert_eq!(report.ok + report.errors, calls, "{report:?}");
    let stats = broker.stats().await.expect("stats");
    let client = &stats.per_process["client.0"];
    // Delivered to the client: one reply per request, plus the Run request.
    assert_eq!(client.counters.request_count, calls);
    assert_eq!(client.counters.total_sent, calls + 1);
    assert_eq!(
        client.faults.unmatched_replies + client.faults.late_replies,
        0
    );
    assert_eq!(stats.total.pending, 0);
    eprintln!(
        "exactly-once under kill -9: {calls} calls, {} ok, {} worker_exited/unavailable, {kills} kills",
        report.ok, report.errors
    );
}

#[actix::test]
async fn a_flooding_child_that_never_reads_cannot_grow_the_broker() {
    let capacity = 100;
    let broker = ProcBroker::builder()
        .sysmon_interval(None)
        .queue_capacity(capacity)
        .start();
    broker
        .add_service(
            "echo",
            1,
            Methods::new().fallback(|r| async move { Ok(r.payload) }),
        )
        .await
        .expect("echo");
    let before = rss_kb();
    broker
        .spawn(chaos("flood").env("FLOOD", "1"))
        .await
        .expect("flood");
    let mut peak = before;
    let mut received = Vec::new();
    for _ in 0..20 {
        actix::clock::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_kb());
        let stats = broker.stats().await.expect("stats");
        received.push(stats.per_process["flood.0"].counters.total_received);
    }
    // It stalled: the broker stopped reading once its replies piled up.
    let last = received[received.len() - 1];
    assert_eq!(
        received[received.len() - 5],
        last,
        "still reading: {received:?}"
    );
    // Callers of the flooder get `busy` once its queue is full, and every
    // call is answered.
    let calls = join_all((0..capacity + 50).map(|_| {
        broker.call_envelope(
            procbroker::protocol::Envelope::request("flood", "Echo", 0).with_timeout_ms(300),
        )
    }))
    .await;
    let mut codes = BTreeMap::<String, usize>::new();
    for result in calls {
        let code = result
            .expect_err("it never answers")
            .code()
            .unwrap_or("?")
            .to_owned();
        *codes.entry(code).or_default() += 1;
    }
    assert!(codes.get("busy").copied().unwrap_or(0) >= 50, "{codes:?}");
    assert_eq!(codes.values().sum::<usize>(), capacity + 50);
    let growth_kb = peak.saturating_sub(before);
    eprintln!(
        "flood: {last} frames read from the flooder, then it stalled; broker RSS {before} kB -> peak {peak} kB (+{growth_kb} kB); calls to it: {codes:?}"
    );
    assert!(growth_kb < 32 * 1024, "broker grew by {growth_kb} kB");
    broker.stop("flood").await.expect("stop");
}

#[actix::test]
async fn a_child_cannot_stop_or_ready_other_processes() {
    let broker = chaos_broker().await;
    let spawned = broker
        .spawn(
            procbroker::config::ServiceConfig::new("pyecho", python())
                .args([format!(
                    "{}/examples/python/echo_worker.py",
                    env!("CARGO_MANIFEST_DIR")
                )])
                .restart(quick_restarts(-1)),
        )
        .await
        .expect("spawn pyecho");
    let pid = spawned[0].pid.expect("pid");
    let sent = broker
        .call("chaos", "Lifecycle", &"pyecho")
        .await
        .expect("lifecycle");
    assert_eq!(sent.payload_as::<String>().expect("str"), "sent");
    // Had any `shutdown` reached it, the Python worker would have exited 0
    // and never come back. Give it the time it would take.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply = broker
        .call("pyecho", "Echo", &"alive")
        .await
        .expect("pyecho still serves");
    assert_eq!(reply.payload_as::<String>().expect("str"), "alive");
    let processes = broker.processes().await.expect("processes");
    let row = processes
        .iter()
        .find(|p| p.id == "pyecho.0")
        .expect("pyecho.0");
    assert_eq!((row.pid, row.restarts), (Some(pid), 0));
    let stats = broker.stats().await.expect("stats");
    assert_eq!(stats.per_process["chaos.0"].faults.dropped_events, 3);
    assert_eq!(stats.total.faults.dropped_events, 3);
    echo_ok(&broker).await;
}

/// Median of `n` sequential calls to `echo`.
async fn echo_p50(broker: &BrokerHandle, n: usize) -> Duration {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        broker.call("echo", "Echo", &"x").await.expect("echo");
        times.push(t.elapsed());
    }
    times.sort_unstable();
    times[n / 2]
}

#[actix::test]
async fn a_garbage_flood_is_cut_off_and_does_not_stall_a_healthy_service() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    broker.spawn(echo("echo", 1)).await.expect("spawn echo");
    echo_p50(&broker, 100).await; // warm up
    let quiet = echo_p50(&broker, 400).await;
    // The default restart policy (100 ms doubling): what an operator runs.
    broker
        .spawn(chaos("garbage").env("GARBAGE", "1"))
        .await
        .expect("spawn garbage");
    // It floods, passes max_bad_frames_per_s, is killed and restarted.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let processes = broker.processes().await.expect("processes");
        let row = processes.iter().find(|p| p.id == "garbage.0").expect("row");
        if row.restarts >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the flooder was never restarted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let flooded = echo_p50(&broker, 400).await;
    let stats = broker.stats().await.expect("stats");
    let p = &stats.per_process["garbage.0"];
    // Every incarnation was cut off just past the limit (100 a second), and
    // every frame read was counted.
    assert!(p.faults.restarts >= 1, "{p:?}");
    assert!(p.faults.bad_frames > 100, "{p:?}");
    assert_eq!(stats.per_process["echo.0"].faults.restarts, 0);
    eprintln!(
        "echo p50 without flood {quiet:?}, under it {flooded:?}; flooder: {} bad frames, {} restarts",
        p.faults.bad_frames, p.faults.restarts
    );
    // A stall shows as milliseconds; the 2 ms margin keeps a loaded
    // machine's jitter on a ~0.1 ms median from failing the ratio.
    assert!(
        flooded <= quiet * 3 + Duration::from_millis(2),
        "healthy p50 {flooded:?} under the flood against {quiet:?} without"
    );
    broker.shutdown().await;
}

#[actix::test]
async fn a_child_cannot_forge_or_invent_process_metrics() {
    let broker = chaos_broker().await;
    broker.spawn(echo("echo", 1)).await.expect("spawn echo");
    let answers: Vec<serde_json::Value> = broker
        .call("chaos", "Metrics", &"echo.0")
        .await
        .expect("metrics")
        .payload_as()
        .expect("list");
    // Another process's sample: refused. Its own: stored. Invented ids:
    // not allowed either (they are not its own).
    assert_eq!(
        answers,
        [
            serde_json::json!("forbidden"),
            serde_json::json!(1),
            serde_json::json!("forbidden")
        ]
    );
    let stats = broker.stats().await.expect("stats");
    assert!(!stats.process_metrics.contains_key("echo.0"), "{stats:?}");
    assert!(stats.process_metrics.contains_key("chaos.0"));
    assert_eq!(stats.process_metrics.len(), 1, "no ghosts");
    // A child whose service is in control_allow may speak for others, but
    // only for live processes: the ghosts are dropped, the bound holds.
    let broker = ProcBroker::builder()
        .sysmon_interval(None)
        .control_allow(vec!["chaos".into()])
        .start();
    broker
        .spawn(chaos("chaos").restart(quick_restarts(-1)))
        .await
        .expect("spawn chaos");
    broker.spawn(echo("echo", 1)).await.expect("spawn echo");
    let answers: Vec<serde_json::Value> = broker
        .call("chaos", "Metrics", &"echo.0")
        .await
        .expect("metrics")
        .payload_as()
        .expect("list");
    assert_eq!(
        answers,
        [
            serde_json::json!(1),
            serde_json::json!(1),
            serde_json::json!(0)
        ]
    );
    let stats = broker.stats().await.expect("stats");
    assert_eq!(
        stats.process_metrics.len(),
        2,
        "{:?}",
        stats.process_metrics.keys()
    );
    // A sample of a process that is stopped expires with it.
    broker.stop("echo").await.expect("stop");
    let deadline = Instant::now() + Duration::from_secs(2);
    while broker
        .stats()
        .await
        .expect("stats")
        .process_metrics
        .contains_key("echo.0")
    {
        assert!(
            Instant::now() < deadline,
            "the stopped process's sample stayed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[actix::test]
async fn a_frame_too_large_once_stamped_gets_too_large_saying_why() {
    let config = procbroker::config::BrokerConfig {
        max_frame_bytes: 4096,
        ..procbroker::config::BrokerConfig::default()
    };
    let broker = ProcBroker::builder()
        .config(config)
        .sysmon_interval(None)
        .start();
    broker
        .spawn(chaos("chaos").restart(quick_restarts(-1)))
        .await
        .expect("spawn chaos");
    broker.spawn(echo("echo", 1)).await.expect("spawn echo");
    // Within the limit as written; 16 bytes more once `source = "chaos.0"`
    // (7 bytes) is stamped: 9 + 7.
    let limit: u64 = 4096;
    let answer: BTreeMap<String, serde_json::Value> = broker
        .call("chaos", "Big", &(limit - 15))
        .await
        .expect("big")
        .payload_as()
        .expect("map");
    assert_eq!(answer["len"], serde_json::json!(limit - 15));
    assert_eq!(answer["code"], serde_json::json!("too_large"), "{answer:?}");
    let error = answer["error"].as_str().expect("error");
    assert!(
        error.contains("once the broker stamps its source") && !error.contains("out of sync"),
        "{error}"
    );
    // Nothing was out of sync: no bad frame, no restart, the pipe is up.
    let stats = broker.stats().await.expect("stats");
    let p = &stats.per_process["chaos.0"];
    assert_eq!((p.faults.bad_frames, p.faults.restarts), (0, 0));
    echo_ok(&broker).await;
}

#[actix::test]
async fn a_broadcasting_child_is_held_to_its_event_budget() {
    let config = procbroker::config::BrokerConfig {
        max_events_per_s: 1000,
        ..procbroker::config::BrokerConfig::default()
    };
    let broker = ProcBroker::builder()
        .config(config)
        .sysmon_interval(None)
        .start();
    broker
        .spawn(
            procbroker::config::ServiceConfig::new("pyecho", python()).args([format!(
                "{}/examples/python/echo_worker.py",
                env!("CARGO_MANIFEST_DIR")
            )]),
        )
        .await
        .expect("spawn pyecho");
    let started = Instant::now();
    broker
        .spawn(chaos("caster").env("EVENTS", "1"))
        .await
        .expect("spawn caster");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The receiver is not buried: a call goes through at once.
    let t = Instant::now();
    let reply = broker
        .call("pyecho", "Echo", &"through")
        .await
        .expect("pyecho answers");
    assert_eq!(reply.payload_as::<String>().expect("str"), "through");
    let waited = t.elapsed();
    let stats = broker.stats().await.expect("stats");
    let elapsed = started.elapsed().as_secs_f64();
    let caster = &stats.per_process["caster.0"];
    let delivered = stats.per_process["pyecho.0"].counters.total_sent;
    eprintln!(
        "in {elapsed:.2} s: caster sent {} events, {} dropped; pyecho got {delivered}; a call waited {waited:?}",
        caster.counters.event_count, caster.faults.busy_rejections
    );
    assert!(caster.faults.busy_rejections > 0, "{caster:?}");
    // At most 1000 a second got through (the window restarts each second).
    let bound = 1000.0 * (elapsed.ceil() + 1.0) + 1.0;
    assert!((delivered as f64) <= bound, "{delivered} > {bound}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    broker.shutdown().await;
}

#[actix::test]
async fn a_request_with_an_integer_id_is_answered_bad_request() {
    let broker = chaos_broker().await;
    let answer: BTreeMap<String, Option<String>> = broker
        .call("chaos", "IntId", &())
        .await
        .expect("int id")
        .payload_as()
        .expect("map");
    assert_eq!(answer["code"].as_deref(), Some("bad_request"), "{answer:?}");
    assert_eq!(answer["source"].as_deref(), Some("broker"));
    let stats = broker.stats().await.expect("stats");
    let p = &stats.per_process["chaos.0"];
    assert_eq!((p.faults.bad_frames, p.faults.restarts), (1, 0));
}

#[actix::test]
async fn stopping_a_child_takes_its_own_children_with_it() {
    let broker = chaos_broker().await;
    let grandchild: u32 = broker
        .call("chaos", "Grandchild", &())
        .await
        .expect("grandchild")
        .payload_as()
        .expect("pid");
    assert!(!dead(grandchild), "sleep {grandchild} is running");
    broker.stop("chaos").await.expect("stop");
    let deadline = Instant::now() + Duration::from_secs(1);
    while !dead(grandchild) {
        assert!(
            Instant::now() < deadline,
            "grandchild {grandchild} outlived the stop by 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[actix::test]
async fn a_stuck_worker_is_killed_by_its_health_check_and_its_request_answered() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let check = procbroker::config::HealthCheck {
        method: "Ping".into(),
        interval_ms: 200,
        // Long enough that a healthy reply on a loaded machine never misses
        // it; the stuck worker misses it by far.
        timeout_ms: 1000,
        failures: 2,
    };
    let spawned = broker
        .spawn(chaos("chaos").restart(quick_restarts(-1)).health(check))
        .await
        .expect("spawn chaos");
    let pid = spawned[0].pid.expect("pid");
    // Healthy: checks pass while it serves.
    tokio::time::sleep(Duration::from_millis(700)).await;
    echo_ok(&broker).await;
    let stats = broker.stats().await.expect("stats");
    assert_eq!(stats.per_process["chaos.0"].faults.health_failures, 0);
    // Stuck: its main loop blocks. Two failed checks (2 x 200 ms + 1 000 ms,
    // plus up to one interval of phase) and it is killed.
    let t = Instant::now();
    let e = broker.call("chaos", "Block", &()).await.expect_err("stuck");
    let detected = t.elapsed();
    assert_eq!(e.code(), Some("worker_exited"), "{e}");
    assert!(detected < Duration::from_secs(6), "{detected:?}");
    let again = ready_again(&broker, "chaos.0", 1).await;
    assert_ne!(again.pid, Some(pid), "a new incarnation");
    echo_ok(&broker).await;
    let stats = broker.stats().await.expect("stats");
    assert_eq!(stats.per_process["chaos.0"].faults.health_failures, 2);
    eprintln!("stuck worker detected and killed after {detected:?}");
    broker.shutdown().await;
}
