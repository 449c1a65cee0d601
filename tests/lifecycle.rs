//! The request lifecycle (protocol v1.1) under the real broker, with real
//! children on both sides: the Rust SDK's `procbroker worker conformance`
//! and a plain-msgpack Python worker (`tests/python/lifecycle_worker.py`),
//! which also plays the child *caller* (cancels, forged envelopes, keys,
//! a caller that never reads).
//!
//! Deadlines reach workers and health checks; every way a request ends
//! without its worker's reply sends that worker `cancel` with the reason
//! (timeout, the caller cancelled, the caller exited, the drain at shutdown
//! ran out, a stream cut); the embedding API cancels on drop and streams;
//! bad input (forged and unknown cancels, partials nobody asked for, bad
//! keys, a caller that never reads) is dropped, counted, or refused; keyed
//! routing sticks and moves only a share of the keys on scale; least-pending
//! balance steers around a slow worker. The stats reply counts it all:
//! `cancels` sent to each worker, `partial_replies` each sent,
//! `dropped_events`, `unmatched_replies` and `late_replies`.
//!
//! Every wait is bounded; a test that would hang fails instead.

mod support;

use futures_util::StreamExt;
use procbroker::config::{ServiceConfig, WorkerBalance};
use procbroker::embed::{BrokerHandle, CallError, ProcBroker};
use procbroker::protocol::{Envelope, Payload, RequestKey};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::*;

/// The Python worker and caller of these tests.
fn lifecycle_py(name: &str, workers: u32) -> ServiceConfig {
    ServiceConfig::new(name, python())
        .args([format!(
            "{}/tests/python/lifecycle_worker.py",
            env!("CARGO_MANIFEST_DIR")
        )])
        .workers(workers)
}

/// The Rust SDK's conformance subject.
fn conformance(name: &str, workers: u32) -> ServiceConfig {
    ServiceConfig::new(name, BIN)
        .args(["worker", "conformance"])
        .workers(workers)
}

/// A broker whose calls give up after 15 s at most (no test waits longer).
fn broker() -> BrokerHandle {
    ProcBroker::builder()
        .sysmon_interval(None)
        .request_timeout(Duration::from_secs(15))
        .start()
}

async fn spawn(broker: &BrokerHandle, spec: ServiceConfig) {
    let name = spec.name.clone();
    let spawned = broker.spawn(spec).await.expect("spawn");
    assert!(
        spawned.iter().all(|p| p.pid.is_some()),
        "{name}: {spawned:?}"
    );
    for p in &spawned {
        ready_again(broker, &p.id, 0).await;
    }
}

/// A request with a JSON payload.
fn request(target: &str, method: &str, payload: &Value) -> Envelope {
    Envelope::request(target, method, 0)
        .with_payload(payload)
        .expect("payload")
}

/// The reply's payload as JSON, or the error.
async fn call(broker: &BrokerHandle, request: Envelope) -> Result<Value, CallError> {
    let reply = broker.call_envelope(request).await?;
    Ok(reply.payload_as::<Value>().expect("a JSON-able payload"))
}

/// `method` of `target`, which must answer.
async fn value(broker: &BrokerHandle, target: &str, method: &str, payload: Value) -> Value {
    call(broker, request(target, method, &payload))
        .await
        .unwrap_or_else(|e| panic!("{target} {method}: {e}"))
}

/// Has Python caller `driver` make the call `params` describes (see the
/// worker's `Call`); what it saw.
async fn drive(broker: &BrokerHandle, driver: &str, params: Value) -> Value {
    value(broker, driver, "Call", params).await
}

/// Has process `driver` write `envelope` as it is.
async fn send_raw(broker: &BrokerHandle, driver: &str, envelope: Value) {
    let sent = value(broker, driver, "Send", json!({ "envelope": envelope })).await;
    assert_eq!(sent, json!("sent"));
}

/// Polls `probe` every 5 ms until it gives something, for at most `within`.
async fn until<T>(within: Duration, what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        actix::clock::sleep(Duration::from_millis(5)).await;
    }
}

/// How many `Sleep`s `worker` is running.
async fn sleeping(broker: &BrokerHandle, worker: &str) -> u64 {
    value(broker, worker, "Active", json!(null)).await["sleeping"]
        .as_u64()
        .expect("sleeping")
}

/// Waits until `worker` runs no `Sleep`; how long that took.
async fn idle_within(broker: &BrokerHandle, worker: &str, within: Duration) -> Duration {
    let started = Instant::now();
    until(within, &format!("{worker} idle"), async || {
        (sleeping(broker, worker).await == 0).then_some(())
    })
    .await;
    started.elapsed()
}

/// Waits until `worker` runs `n` `Sleep`s.
async fn sleeping_reaches(broker: &BrokerHandle, worker: &str, n: u64) {
    until(
        Duration::from_secs(5),
        &format!("{worker} sleeping {n}"),
        async || (sleeping(broker, worker).await == n).then_some(()),
    )
    .await;
}

/// The last `cancel` that reached a running request of `worker`.
async fn last_cancel(broker: &BrokerHandle, worker: &str) -> Value {
    value(broker, worker, "LastCancel", json!(null)).await
}

/// A per-process counter of the stats reply (the `GetMessageStats` RPC,
/// as a child would ask for it).
async fn counter(broker: &BrokerHandle, id: &str, name: &str) -> u64 {
    let stats = value(broker, "broker", "GetMessageStats", json!(null)).await;
    stats["per_process"][id][name]
        .as_u64()
        .unwrap_or_else(|| panic!("{id} has no {name}: {}", stats["per_process"][id]))
}

fn ms(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("not a number of ms: {v}"))
}

// ---------------------------------------------------------------------------
// Deadlines

#[actix::test]
async fn the_deadline_reaches_workers_and_health_checks() {
    let broker = broker();
    spawn(&broker, conformance("conf", 1)).await;
    let mut py = lifecycle_py("py", 1);
    py.health = Some(procbroker::config::HealthCheck {
        method: "Ping".into(),
        interval_ms: 50,
        timeout_ms: 700,
        failures: 3,
    });
    spawn(&broker, py).await;
    spawn(&broker, lifecycle_py("drv", 1)).await;

    // From a Rust caller: the SDK sees the budget left, the Python worker
    // the wire value (the whole budget: delivery is immediate).
    let timed = |target: &str| request(target, "Deadline", &json!(null)).with_timeout_ms(1500);
    let rust = ms(&call(&broker, timed("conf")).await.expect("conf"));
    assert!((1400..=1500).contains(&rust), "conf saw {rust} ms of 1500");
    let wire = ms(&call(&broker, timed("py")).await.expect("py"));
    assert_eq!(wire, 1500);
    // No timeout_ms: the broker's default (15 s here) is what is left.
    let default = ms(&value(&broker, "conf", "Deadline", json!(null)).await);
    assert!(
        (14_000..=15_000).contains(&default),
        "conf saw {default} ms"
    );
    assert_eq!(
        ms(&value(&broker, "py", "Deadline", json!(null)).await),
        15_000
    );

    // From a child caller.
    for (target, low) in [("conf", 700), ("py", 800)] {
        let seen = drive(
            &broker,
            "drv",
            json!({"target": target, "method": "Deadline", "timeout_ms": 800}),
        )
        .await;
        assert_eq!(seen["type"], "response", "{seen}");
        let got = ms(&seen["payload"]);
        assert!((low..=800).contains(&got), "{target} saw {got} ms of 800");
    }

    // A health check carries its own timeout_ms.
    let ping = until(Duration::from_secs(5), "a health check", async || {
        let seen = value(&broker, "py", "Seen", json!(null)).await;
        seen.get("Ping").cloned()
    })
    .await;
    assert_eq!(ping, json!(700));
}

// ---------------------------------------------------------------------------
// Cancellation

#[actix::test]
async fn a_timeout_cancels_the_work_at_the_worker() {
    let broker = broker();
    spawn(&broker, conformance("conf", 1)).await;
    spawn(&broker, lifecycle_py("py", 1)).await;
    for worker in ["conf", "py"] {
        let sleep = request(worker, "Sleep", &json!({"ms": 5000})).with_timeout_ms(300);
        let started = Instant::now();
        let e = call(&broker, sleep).await.expect_err("times out");
        let waited = started.elapsed();
        assert_eq!(e.code(), Some("timeout"), "{e}");
        assert!(waited < Duration::from_millis(1000), "{waited:?}");
        // The worker stops within 200 ms of the timeout.
        let stopped = idle_within(&broker, worker, Duration::from_millis(200)).await;
        let cancel = last_cancel(&broker, worker).await;
        assert_eq!(cancel["reason"], "timeout", "{worker}: {cancel}");
        eprintln!("{worker}: idle {stopped:?} after the timeout");
    }
    assert_eq!(last_cancel(&broker, "py").await["source"], "@caller");
    assert_eq!(counter(&broker, "conf.0", "cancels").await, 1);

    // A worker that answers after the cancel anyway: its reply is late.
    let sleep = request(
        "py",
        "Sleep",
        &json!({"ms": 5000, "reply_after_cancel": true}),
    )
    .with_timeout_ms(200);
    let e = call(&broker, sleep).await.expect_err("times out");
    assert_eq!(e.code(), Some("timeout"));
    let late = until(
        Duration::from_secs(2),
        "the late reply counted",
        async || {
            let n = counter(&broker, "py.0", "late_replies").await;
            (n > 0).then_some(n)
        },
    )
    .await;
    assert_eq!(late, 1);
    assert_eq!(counter(&broker, "py.0", "unmatched_replies").await, 0);
    let cancels = value(&broker, "py", "Cancels", json!(null)).await;
    assert_eq!(
        cancels.as_array().map(Vec::len),
        Some(2),
        "one each: {cancels}"
    );
    assert_eq!(counter(&broker, "py.0", "cancels").await, 2);
}

#[actix::test]
async fn a_child_cancels_its_own_request() {
    let broker = broker();
    spawn(&broker, conformance("conf", 1)).await;
    spawn(&broker, lifecycle_py("py", 1)).await;
    spawn(&broker, lifecycle_py("drv", 1)).await;
    for worker in ["conf", "py"] {
        let seen = drive(
            &broker,
            "drv",
            json!({"target": worker, "method": "Sleep", "payload": {"ms": 5000},
                   "cancel_after_ms": 150}),
        )
        .await;
        assert_eq!(
            (&seen["type"], &seen["code"]),
            (&json!("error"), &json!("cancelled")),
            "{seen}"
        );
        assert_eq!(seen["source"], "broker");
        // Answered at once, not at the worker's leisure.
        let answered = seen["cancel_to_reply_ms"].as_f64().expect("timed");
        assert!(answered < 100.0, "cancelled answered after {answered} ms");
        idle_within(&broker, worker, Duration::from_millis(200)).await;
        let cancel = last_cancel(&broker, worker).await;
        assert_eq!(cancel["reason"], "cancelled", "{worker}: {cancel}");
    }
    assert_eq!(last_cancel(&broker, "py").await["source"], "drv.0");
    assert_eq!(counter(&broker, "conf.0", "cancels").await, 1);
    assert_eq!(counter(&broker, "py.0", "cancels").await, 1);

    // A stream cancelled midway: the partials so far, in order, then
    // `cancelled` as its one final reply, and nothing after it.
    for worker in ["conf", "py"] {
        let seen = drive(
            &broker,
            "drv",
            json!({"target": worker, "method": "Count", "payload": {"n": 10_000, "delay_ms": 10},
                   "stream": true, "cancel_after_ms": 150, "linger_ms": 200}),
        )
        .await;
        assert_eq!(seen["code"], "cancelled", "{seen}");
        assert_eq!(seen["extra"], 0, "{seen}");
        let partials = seen["partials"].as_array().expect("partials");
        let numbers: Vec<u64> = partials.iter().map(ms).collect();
        assert!(numbers.len() >= 5, "{worker}: {numbers:?}");
        assert_eq!(numbers, (0..numbers.len() as u64).collect::<Vec<_>>());
        let cancel = last_cancel(&broker, worker).await;
        assert_eq!(
            (&cancel["reason"], &cancel["correlation_id"]),
            (&json!("cancelled"), &seen["correlation_id"]),
            "{worker}: {cancel}"
        );
    }

    // The Rust SDK as the child caller: its `Relay` request is cancelled
    // (a Rust caller gives up on it), the SDK drops the call it made
    // meanwhile, which cancels that call at the broker, which tells its
    // worker.
    let relay = request(
        "conf",
        "Relay",
        &json!({"target": "py", "method": "Sleep", "payload": {"ms": 5000}}),
    );
    sleeping_reaches(&broker, "py", 0).await;
    let before = last_cancel(&broker, "conf").await;
    let gave_up =
        tokio::time::timeout(Duration::from_millis(300), broker.call_envelope(relay)).await;
    assert!(gave_up.is_err(), "no reply within 300 ms");
    idle_within(&broker, "py", Duration::from_millis(300)).await;
    let cancel = last_cancel(&broker, "py").await;
    assert_eq!(
        (&cancel["reason"], &cancel["source"]),
        (&json!("cancelled"), &json!("conf.0")),
        "{cancel}"
    );
    let relayed = last_cancel(&broker, "conf").await;
    assert_eq!(relayed["reason"], "cancelled", "{relayed}");
    assert_ne!(relayed["correlation_id"], before["correlation_id"]);
}

#[actix::test]
async fn a_caller_that_exits_has_its_work_cancelled() {
    let broker = broker();
    spawn(&broker, conformance("conf", 1)).await;
    spawn(&broker, lifecycle_py("py", 1)).await;
    spawn(&broker, lifecycle_py("drv", 1).restart(quick_restarts(5))).await;
    let mut calls = Vec::new();
    for worker in ["conf", "py"] {
        let broker = broker.clone();
        let params = json!({"target": worker, "method": "Sleep", "payload": {"ms": 10_000}});
        calls.push(actix::spawn(async move {
            call(&broker, request("drv", "Call", &params)).await
        }));
    }
    sleeping_reaches(&broker, "conf", 1).await;
    sleeping_reaches(&broker, "py", 1).await;
    let drv = wait_for_process(&broker, "drv.0", |p| p.pid.is_some()).await;
    kill(drv.pid.expect("pid"), nix::sys::signal::Signal::SIGKILL);
    for call in calls {
        let e = call.await.expect("task").expect_err("its caller died");
        assert_eq!(e.code(), Some("worker_exited"), "{e}");
    }
    for worker in ["conf", "py"] {
        idle_within(&broker, worker, Duration::from_secs(1)).await;
        let cancel = last_cancel(&broker, worker).await;
        assert_eq!(cancel["reason"], "caller_exited", "{worker}: {cancel}");
    }
    assert_eq!(last_cancel(&broker, "py").await["source"], "drv.0");

    // Stopped rather than killed: the same.
    ready_again(&broker, "drv.0", 1).await;
    let stopped = {
        let broker = broker.clone();
        let params = json!({"target": "py", "method": "Sleep", "payload": {"ms": 10_000},
                            "cid": 777});
        actix::spawn(async move { call(&broker, request("drv", "Call", &params)).await })
    };
    sleeping_reaches(&broker, "py", 1).await;
    broker.stop("drv").await.expect("stop");
    let e = stopped
        .await
        .expect("task")
        .expect_err("its caller stopped");
    assert_eq!(e.code(), Some("worker_exited"), "{e}");
    idle_within(&broker, "py", Duration::from_secs(1)).await;
    let cancel = last_cancel(&broker, "py").await;
    assert_eq!(
        (&cancel["reason"], &cancel["correlation_id"]),
        (&json!("caller_exited"), &json!(777)),
        "{cancel}"
    );
}

#[actix::test]
async fn the_drain_at_shutdown_cancels_before_stdin_closes() {
    let config = procbroker::config::BrokerConfig {
        sysmon_interval: None,
        drain_timeout: Duration::from_millis(300),
        ..procbroker::config::BrokerConfig::default()
    };
    let broker = ProcBroker::builder().config(config).start();
    let dir = temp_dir("lifecycle-drain");
    let order = dir.join("order.log");
    spawn(&broker, conformance("conf", 1)).await;
    let order_env = order.to_str().expect("utf-8 path").to_owned();
    spawn(
        &broker,
        lifecycle_py("py", 1).env("LIFECYCLE_LOG", &order_env),
    )
    .await;
    let mut calls = Vec::new();
    for worker in ["conf", "py"] {
        let broker = broker.clone();
        calls.push(actix::spawn(async move {
            call(&broker, request(worker, "Sleep", &json!({"ms": 10_000}))).await
        }));
    }
    sleeping_reaches(&broker, "conf", 1).await;
    sleeping_reaches(&broker, "py", 1).await;
    let report = broker.shutdown().await;
    assert!(!report.drained, "{report:?}");
    for call in calls {
        // The workers were told, so neither answered (the SDK drops the
        // reply of a request the broker cancelled; an SDK cancelled only by
        // EOF still sends it): the callers get what the drain gives them.
        let e = call.await.expect("task").expect_err("not drained");
        assert_eq!(e.code(), Some("worker_exited"), "{e}");
    }
    let log = std::fs::read_to_string(&order).expect("the Python worker's log");
    let events: Vec<&str> = log
        .lines()
        .map(|l| l.rsplit_once(' ').map_or(l, |(what, _)| what))
        .collect();
    let position = |what: &str| {
        events
            .iter()
            .position(|e| e.contains(what))
            .unwrap_or_else(|| panic!("no {what:?} in {events:?}"))
    };
    assert!(
        events[position("cancel")].ends_with("shutting_down"),
        "{events:?}"
    );
    assert!(position("cancel") < position("shutdown"), "{events:?}");
    assert!(position("shutdown") < position("eof"), "{events:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// The embedding API

#[actix::test]
async fn the_embedding_api_cancels_on_drop_and_streams() {
    let broker = broker();
    spawn(&broker, conformance("conf", 1)).await;
    spawn(&broker, lifecycle_py("py", 1)).await;
    for worker in ["conf", "py"] {
        // A call future dropped before its reply.
        let sleep = request(worker, "Sleep", &json!({"ms": 5000}));
        let gave_up =
            tokio::time::timeout(Duration::from_millis(200), broker.call_envelope(sleep)).await;
        assert!(gave_up.is_err(), "no reply within 200 ms");
        idle_within(&broker, worker, Duration::from_millis(200)).await;
        let cancel = last_cancel(&broker, worker).await;
        assert_eq!(cancel["reason"], "cancelled", "{worker}: {cancel}");

        // A stream read to its end: the partials in order, then the final.
        let count = request(worker, "Count", &json!({"n": 20, "delay_ms": 2}));
        let replies: Vec<_> = broker.call_stream(count).collect().await;
        let (last, partials) = replies.split_last().expect("replies");
        let numbers: Vec<u64> = partials
            .iter()
            .map(|r| {
                let r = r.as_ref().expect("a partial");
                assert!(r.is_partial());
                r.payload_as().expect("u64")
            })
            .collect();
        assert_eq!(numbers, (0..20).collect::<Vec<_>>(), "{worker}");
        let last = last.as_ref().expect("the final reply");
        assert!(!last.is_partial());
        assert_eq!(last.payload_as::<u64>().expect("u64"), 20);

        // A stream's deadline runs over the whole stream.
        let count =
            request(worker, "Count", &json!({"n": 10_000, "delay_ms": 10})).with_timeout_ms(300);
        let stream = broker.call_stream(count);
        let cid = stream.correlation_id();
        let replies: Vec<_> = stream.collect().await;
        let (last, partials) = replies.split_last().expect("replies");
        assert!(partials.len() >= 5, "{worker}: {} partials", partials.len());
        assert!(
            partials
                .iter()
                .all(|r| r.as_ref().is_ok_and(|r| r.is_partial()))
        );
        let e = last.as_ref().expect_err("timed out");
        assert_eq!(e.code(), Some("timeout"), "{e}");
        let cancel = until(
            Duration::from_millis(500),
            "the stream's cancel",
            async || {
                let cancel = last_cancel(&broker, worker).await;
                (cancel["correlation_id"] == json!(cid)).then_some(cancel)
            },
        )
        .await;
        assert_eq!(cancel["reason"], "timeout", "{worker}: {cancel}");

        // A stream dropped midway: its worker is told.
        let count = request(worker, "Count", &json!({"n": 10_000, "delay_ms": 20}));
        let mut stream = broker.call_stream(count);
        let cid = stream.correlation_id();
        for i in 0..3u64 {
            let part = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .expect("a partial within 5 s")
                .expect("not ended")
                .expect("a partial");
            assert_eq!(part.payload_as::<u64>().expect("u64"), i);
        }
        drop(stream);
        let cancel = until(
            Duration::from_millis(500),
            "the stream's cancel",
            async || {
                let cancel = last_cancel(&broker, worker).await;
                (cancel["correlation_id"] == json!(cid)).then_some(cancel)
            },
        )
        .await;
        assert_eq!(cancel["reason"], "cancelled", "{worker}: {cancel}");
    }
    // A stream its Rust caller does not read is cut once `queue_capacity`
    // replies wait: what was queued, in order, then `busy`.
    let count = request("conf", "Count", &json!({"n": 100_000_000}));
    let mut stream = broker.call_stream(count);
    let cid = stream.correlation_id();
    let cancel = until(Duration::from_secs(5), "the cut", async || {
        let cancel = last_cancel(&broker, "conf").await;
        (cancel["correlation_id"] == json!(cid)).then_some(cancel)
    })
    .await;
    assert_eq!(cancel["reason"], "busy", "{cancel}");
    let mut next = 0u64;
    let end = loop {
        let item = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("within 5 s")
            .expect("not ended before its final reply");
        match item {
            Ok(part) if part.is_partial() => {
                assert_eq!(part.payload_as::<u64>().expect("u64"), next);
                next += 1;
            }
            end => break end,
        }
    };
    assert_eq!(end.expect_err("cut").code(), Some("busy"));
    assert_eq!(next, 1000, "queue_capacity partials, then the cut");
    assert!(stream.next().await.is_none());

    assert_eq!(
        value(&broker, "py", "Active", json!(null)).await,
        json!({"sleeping": 0, "streaming": 0})
    );
    assert_eq!(counter(&broker, "conf.0", "cancels").await, 4);
    // 20 read to the end, at least 5 timed out, 3 of the dropped one.
    let partials = counter(&broker, "py.0", "partial_replies").await;
    assert!(partials >= 28, "py.0 partial_replies {partials}");
}

// ---------------------------------------------------------------------------
// Bad input

#[actix::test]
async fn forged_and_unknown_cancels_are_dropped_and_counted() {
    let broker = broker();
    spawn(&broker, conformance("conf", 1)).await;
    spawn(&broker, lifecycle_py("drv", 2)).await;
    let cancel = |cid: u64, target: &str| json!({"type": "event", "id": "cancel", "target": target, "correlation_id": cid});

    // An id nothing of the sender's is in flight under.
    send_raw(&broker, "drv.1", cancel(987_654, "broker")).await;
    assert_eq!(counter(&broker, "drv.1", "dropped_events").await, 1);

    // drv.0 has request 4242 in flight to conf.0.
    let victim = {
        let broker = broker.clone();
        let params = json!({"target": "conf", "method": "Sleep", "payload": {"ms": 800},
                            "cid": 4242});
        actix::spawn(async move { drive(&broker, "drv.0", params).await })
    };
    sleeping_reaches(&broker, "conf", 1).await;
    // Another process's request, by its correlation id.
    send_raw(&broker, "drv.1", cancel(4242, "broker")).await;
    // Addressed to the worker (even claiming to be the broker's notice),
    // and to the service.
    let mut forged = cancel(4242, "conf.0");
    forged["source"] = json!("broker");
    forged["payload"] = json!({"source": "drv.0", "reason": "timeout"});
    send_raw(&broker, "drv.1", forged).await;
    send_raw(&broker, "drv.1", cancel(4242, "conf")).await;
    // The request's own caller, addressed to a process instead of broker.
    send_raw(&broker, "drv.0", cancel(4242, "conf.0")).await;

    let seen = victim.await.expect("task");
    assert_eq!(seen["type"], "response", "{seen}");
    assert_eq!(seen["payload"]["cancelled"], false, "{seen}");
    assert!(ms(&seen["payload"]["slept_ms"]) >= 790, "{seen}");
    assert_eq!(last_cancel(&broker, "conf").await, json!(null));
    assert_eq!(counter(&broker, "drv.1", "dropped_events").await, 4);
    assert_eq!(counter(&broker, "drv.0", "dropped_events").await, 1);
    assert_eq!(counter(&broker, "conf.0", "cancels").await, 0);
}

#[actix::test]
async fn partials_nobody_asked_for_are_dropped_and_counted() {
    let broker = broker();
    spawn(&broker, lifecycle_py("py", 1)).await;
    spawn(&broker, lifecycle_py("drv", 1)).await;

    // `more = true` to requests without `stream`: from a Rust caller and a
    // child caller, only the final reply arrives.
    let done = value(&broker, "py", "Partials", json!({"n": 3})).await;
    assert_eq!(done, json!("done"));
    let seen = drive(
        &broker,
        "drv",
        json!({"target": "py", "method": "Partials", "payload": {"n": 3}, "linger_ms": 100}),
    )
    .await;
    assert_eq!(
        (&seen["partials"], &seen["payload"], &seen["extra"]),
        (&json!([]), &json!("done"), &json!(0)),
        "{seen}"
    );
    assert_eq!(counter(&broker, "py.0", "unmatched_replies").await, 6);
    // With `stream`, the same partials go through.
    let seen = drive(
        &broker,
        "drv",
        json!({"target": "py", "method": "Partials", "payload": {"n": 3}, "stream": true}),
    )
    .await;
    assert_eq!(
        (&seen["partials"], &seen["payload"]),
        (&json!([0, 1, 2]), &json!("done")),
        "{seen}"
    );
    assert_eq!(counter(&broker, "py.0", "unmatched_replies").await, 6);

    // Partials after the final reply: the caller saw its one final reply
    // and nothing after it.
    let seen = drive(
        &broker,
        "drv",
        json!({"target": "py", "method": "AfterFinal", "payload": {"n": 2}, "stream": true,
               "linger_ms": 150}),
    )
    .await;
    assert_eq!(
        (&seen["partials"], &seen["payload"], &seen["extra"]),
        (&json!([]), &json!("final"), &json!(0)),
        "{seen}"
    );
    let stream = broker.call_stream(request("py", "AfterFinal", &json!({"n": 2})));
    let replies: Vec<_> = stream.collect().await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    let only = replies[0].as_ref().expect("the final reply");
    assert_eq!(
        (only.is_partial(), only.payload_as::<String>().expect("str")),
        (false, "final".into())
    );
    let dropped = until(Duration::from_secs(2), "the partials counted", async || {
        let n = counter(&broker, "py.0", "unmatched_replies").await;
        (n >= 10).then_some(n)
    })
    .await;
    assert_eq!(dropped, 10);
    // Every partial the worker sent is counted as sent, dropped or not.
    assert_eq!(counter(&broker, "py.0", "partial_replies").await, 13);
    // Dropping partials cancels nothing.
    assert_eq!(last_cancel(&broker, "py").await, json!(null));
    assert_eq!(
        value(&broker, "py", "Cancels", json!(null)).await,
        json!([])
    );
}

#[actix::test]
async fn keys_that_are_not_short_strings_are_refused() {
    let broker = broker();
    spawn(&broker, conformance("conf", 2)).await;
    spawn(&broker, lifecycle_py("drv", 1)).await;
    let long = "k".repeat(257);
    // (A nil key is no key, as nil is absent for every field.)
    for key in [json!(12345), json!(long), json!(["a"])] {
        let seen = drive(
            &broker,
            "drv",
            json!({"target": "conf", "method": "Echo", "payload": "x", "key": key}),
        )
        .await;
        assert_eq!(
            (&seen["code"], &seen["source"]),
            (&json!("bad_request"), &json!("broker")),
            "key {key}: {seen}"
        );
    }
    let fits = drive(
        &broker,
        "drv",
        json!({"target": "conf", "method": "Echo", "payload": "x", "key": "k".repeat(256)}),
    )
    .await;
    assert_eq!(
        (&fits["type"], &fits["payload"]),
        (&json!("response"), &json!("x")),
        "{fits}"
    );

    // A good key (and `stream`) reaches the worker with the request.
    let keyed = request("drv", "Key", &json!(null))
        .with_key("session-1")
        .expect("key");
    assert_eq!(
        call(&broker, keyed).await.expect("Key"),
        json!(["session-1", false])
    );
    let replies: Vec<_> = broker
        .call_stream(
            request("drv", "Key", &json!(null))
                .with_key("s")
                .expect("key"),
        )
        .collect()
        .await;
    let only = replies[0].as_ref().expect("a reply");
    assert_eq!(
        only.payload_as::<Value>().expect("JSON"),
        json!(["s", true])
    );

    // From Rust: the API refuses a long key itself; a raw one is refused by
    // the broker.
    assert!(
        request("conf", "Echo", &json!("x"))
            .with_key(long.clone())
            .is_err()
    );
    for raw in [Payload::encode(&12345u32), Payload::encode(&long)] {
        let mut keyed = request("conf", "Echo", &json!("x"));
        keyed.key = Some(RequestKey::Invalid(raw.expect("encode")));
        let e = call(&broker, keyed).await.expect_err("refused");
        assert_eq!(e.code(), Some("bad_request"), "{e}");
    }
    // None of them reached a worker.
    for id in ["conf.0", "conf.1"] {
        let stats = broker.stats().await.expect("stats");
        assert!(
            stats.per_process[id].counters.total_sent <= 1,
            "{id} was sent a refused request"
        );
    }
}

// ---------------------------------------------------------------------------
// A caller that never reads

#[actix::test]
async fn a_stream_to_a_caller_that_never_reads_is_cut_with_busy() {
    let broker = broker();
    spawn(&broker, conformance("conf", 1)).await;
    spawn(&broker, lifecycle_py("hog", 1)).await;
    let hog = {
        let broker = broker.clone();
        let params = json!({"target": "conf", "method": "Count", "payload": {"n": 100_000_000},
                            "stream": true, "stall_ms": 2000, "summary": true});
        actix::spawn(async move { drive(&broker, "hog", params).await })
    };
    // Cut while the caller still reads nothing: the worker is told.
    let cancel = until(Duration::from_millis(1800), "the cut", async || {
        let cancel = last_cancel(&broker, "conf").await;
        (!cancel.is_null()).then_some(cancel)
    })
    .await;
    assert_eq!(cancel["reason"], "busy", "{cancel}");
    // Once it reads: the partials that were queued, in order, then `busy`.
    let seen = hog.await.expect("task");
    assert_eq!(
        (&seen["code"], &seen["source"]),
        (&json!("busy"), &json!("broker")),
        "{seen}"
    );
    assert_eq!(seen["partials"]["in_order"], true, "{seen}");
    let delivered = seen["partials"]["count"].as_u64().expect("count");
    assert!(delivered >= 1000, "{seen}");
    let stats = broker.stats().await.expect("stats");
    assert_eq!(stats.total.broker_errors["busy"], 1);
    assert_eq!(stats.per_process["conf.0"].faults.cancels, 1);
}

/// Resident memory of process `pid`, in kB.
fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// `procbroker run`, its own process (so its memory is its own): a Python
/// worker streams 32 KiB partials for 3 s, ignoring the `cancel`, to a
/// Python caller that reads nothing for 4.5 s. The stream is cut once
/// `queue_capacity` (1000) frames wait for the caller; the rest are dropped
/// as late. Measured on a shared 2-vCPU VM: the broker's VmRSS went from
/// ~26 MB to a peak of ~92 MB (+66 MB) within 0.4 s, as the queue to the
/// caller's stdin (one byte buffer, grown by doubling) filled with the
/// 1000 frames (32 MB encoded); it settled at ~60 MB (+34 MB) a second
/// later and stayed there while the worker wrote 0.7 to 1.5 GB of
/// partials in all.
#[test]
fn a_caller_that_never_reads_cannot_grow_the_broker() {
    let dir = temp_dir("lifecycle-rss");
    let config = dir.join("procbroker.toml");
    let script = format!(
        "{}/tests/python/lifecycle_worker.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let hog_call = json!({"target": "py", "method": "Count",
                          "payload": {"for_ms": 3000, "size": 32768, "ignore_cancel": true},
                          "stream": true, "stall_ms": 4500, "summary": true,
                          "timeout_ms": 20_000})
    .to_string();
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[sysmon]\ninterval_ms = 0\n\
             [[service]]\nname = \"py\"\ncommand = {py:?}\nargs = [{script:?}]\n\
             [[service]]\nname = \"hog\"\ncommand = {py:?}\nargs = [{script:?}]\n\
             depends_on = [\"py\"]\nenv = {{ LIFECYCLE_CALL = {hog_call:?} }}\n",
            py = python(),
        ),
    )
    .expect("config");
    let mut daemon = Daemon::start(&config, &[]);
    let admin = daemon.admin();
    let pid = daemon.child.id();
    daemon.wait_for("procbroker running", Duration::from_secs(10));
    let baseline = rss_of(pid);
    // Sample while the stream runs and the caller stalls.
    let mut peak = baseline;
    let mut series = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(5000) {
        let now = rss_of(pid);
        peak = peak.max(now);
        series.push((started.elapsed().as_millis(), now));
        std::thread::sleep(Duration::from_millis(20));
    }
    let result = daemon.wait_for("call result", Duration::from_secs(10));
    let result: Value = serde_json::from_str(
        message(&result)
            .split_once("call result ")
            .expect("result")
            .1,
    )
    .expect("JSON");
    let streamed = daemon.wait_for("streamed", Duration::from_secs(5));
    let partials: u64 = message(&streamed)
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .expect("count");
    daemon.wait_for("cancel", Duration::from_secs(1));
    let (_, stats) = http_get(&admin, "/stats");
    let stats: Value = serde_json::from_str(&stats).expect("stats JSON");
    let (_, metrics) = http_get(&admin, "/metrics");
    daemon.stop();
    let _ = std::fs::remove_dir_all(&dir);

    let streamed_kb = partials * 32;
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "broker VmRSS {baseline} kB -> peak {peak} kB (+{growth} kB) while the worker \
         streamed {partials} partials ({streamed_kb} kB) to a caller that did not read"
    );
    assert_eq!(
        (&result["code"], &result["source"]),
        (&json!("busy"), &json!("broker")),
        "{result}"
    );
    assert_eq!(result["partials"]["in_order"], true, "{result}");
    let cancel = daemon
        .log
        .iter()
        .map(message)
        .find(|m| m.contains("cancel "))
        .expect("the worker's cancel");
    assert!(cancel.ends_with("busy hog.0"), "{cancel}");
    // Bounded by the 1000 frames of 32 KiB queued for the caller (in a
    // buffer grown by doubling), and flat once the stream is cut, however
    // much more the worker writes.
    assert!(growth < 3 * 32 * 1024, "the broker grew by {growth} kB");
    // The peak comes as the queue fills; after it, nothing more while the
    // worker goes on writing.
    let early = |(t, _): &&(u128, u64)| *t < 1500;
    let first = series.iter().filter(early).map(|&(_, kb)| kb).max();
    let then = series.iter().filter(|s| !early(s)).map(|&(_, kb)| kb).max();
    let (first, then) = (first.expect("early samples"), then.expect("late samples"));
    assert!(
        then < first + 8 * 1024,
        "still growing after the cut: {first} kB in the first 1.5 s, {then} kB after"
    );
    let settled = series.last().map_or(0, |&(_, kb)| kb);
    eprintln!(
        "settled at {settled} kB (+{} kB)",
        settled.saturating_sub(baseline)
    );
    assert!(
        streamed_kb > 2 * growth,
        "the worker wrote only {streamed_kb} kB"
    );
    assert!(
        stats["per_process"]["py.0"]["late_replies"].as_u64() > Some(0),
        "{stats}"
    );
    assert_eq!(stats["total"]["broker_errors"]["busy"], 1, "{stats}");
    let py = &stats["per_process"]["py.0"];
    assert_eq!(py["cancels"], 1, "{py}");
    assert_eq!(
        py["partial_replies"], partials,
        "every partial counted: {py}"
    );
    for line in [
        "procbroker_cancels_total{process=\"py.0\"} 1".to_owned(),
        format!("procbroker_partial_replies_total{{process=\"py.0\"}} {partials}"),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in /metrics"
        );
    }
}

// ---------------------------------------------------------------------------
// Keyed routing

/// The worker each key reaches (`WhoAmI` with that key).
async fn owners(broker: &BrokerHandle, keys: &[String]) -> BTreeMap<String, String> {
    let mut owners = BTreeMap::new();
    for key in keys {
        let who = request("conf", "WhoAmI", &json!(null))
            .with_key(key.as_str())
            .expect("key");
        let who = call(broker, who).await.expect("WhoAmI");
        owners.insert(key.clone(), who["id"].as_str().expect("id").to_owned());
    }
    owners
}

#[actix::test]
async fn a_key_sticks_to_its_worker_and_a_scale_moves_only_a_share() {
    let broker = broker();
    spawn(&broker, conformance("conf", 3)).await;
    let keys: Vec<String> = (0..200).map(|i| format!("session-{i}")).collect();
    let before = owners(&broker, &keys).await;
    let mut load = BTreeMap::<&str, u32>::new();
    for owner in before.values() {
        *load.entry(owner).or_default() += 1;
    }
    assert_eq!(load.len(), 3, "{load:?}");
    assert!(load.values().all(|&n| n >= 40), "{load:?}");
    // The same key, the same worker, call after call.
    assert_eq!(owners(&broker, &keys).await, before);

    let scaled = broker.scale("conf", 4).await.expect("scale up");
    assert!(scaled.failed.is_empty(), "{scaled:?}");
    ready_again(&broker, "conf.3", 0).await;
    let after = owners(&broker, &keys).await;
    let moved: Vec<_> = keys.iter().filter(|k| before[*k] != after[*k]).collect();
    // Only keys the new worker now owns moved, about a quarter of them.
    assert!(moved.iter().all(|k| after[*k] == "conf.3"), "{moved:?}");
    assert!(
        (30..=75).contains(&moved.len()),
        "{} of 200 moved",
        moved.len()
    );
    eprintln!("scale 3 -> 4: {} of 200 keys moved", moved.len());

    broker.scale("conf", 3).await.expect("scale down");
    assert_eq!(owners(&broker, &keys).await, before, "back where they were");
}

#[actix::test]
async fn a_keyed_request_to_a_full_worker_is_busy() {
    let broker = ProcBroker::builder()
        .sysmon_interval(None)
        .queue_capacity(2)
        .request_timeout(Duration::from_secs(15))
        .start();
    spawn(&broker, conformance("conf", 3)).await;
    let hot = "hot".to_owned();
    let owner = owners(&broker, std::slice::from_ref(&hot)).await[&hot].clone();
    let mut sleeps = Vec::new();
    for _ in 0..2 {
        let broker = broker.clone();
        let sleep = request("conf", "Sleep", &json!({"ms": 1500}))
            .with_key("hot")
            .expect("key");
        sleeps.push(actix::spawn(async move { call(&broker, sleep).await }));
    }
    until(Duration::from_secs(5), "the owner full", async || {
        let stats = broker.stats().await.expect("stats");
        (stats.per_process[&owner].pending == 2).then_some(())
    })
    .await;
    let keyed = request("conf", "Echo", &json!("x"))
        .with_key("hot")
        .expect("key");
    let e = call(&broker, keyed).await.expect_err("full");
    assert_eq!(e.code(), Some("busy"), "{e}");
    // Without the key, another worker takes it.
    let reply = broker
        .call_envelope(request("conf", "Echo", &json!("x")))
        .await
        .expect("another worker");
    assert_ne!(reply.source(), owner);
    for sleep in sleeps {
        let slept = sleep.await.expect("task").expect("slept");
        assert_eq!(slept["cancelled"], false);
    }
    let stats = broker.stats().await.expect("stats");
    assert_eq!(stats.total.broker_errors["busy"], 1);
}

// ---------------------------------------------------------------------------
// Least-pending balance

/// Sends `n` requests to `service` one after the other; who answered how
/// many.
async fn spread(broker: &BrokerHandle, service: &str, n: u32) -> BTreeMap<String, u32> {
    let mut served = BTreeMap::new();
    for i in 0..n {
        let reply = broker
            .call_envelope(request(service, "Echo", &json!(i)))
            .await
            .expect("echo");
        *served.entry(reply.source().to_owned()).or_default() += 1;
    }
    served
}

#[actix::test]
async fn least_pending_steers_around_a_slow_worker() {
    let broker = broker();
    // Set at start.
    spawn(
        &broker,
        conformance("conf", 3).balance(WorkerBalance::LeastPending),
    )
    .await;
    // Round-robin first, then reconfigured.
    spawn(&broker, lifecycle_py("py", 2)).await;
    let slow = |worker: &'static str, n: usize, ms: u64| {
        (0..n)
            .map(|_| {
                let broker = broker.clone();
                actix::spawn(async move {
                    call(&broker, request(worker, "Sleep", &json!({"ms": ms}))).await
                })
            })
            .collect::<Vec<_>>()
    };

    // Round-robin ignores a slow worker: it gets its turn.
    let sleeps = slow("py.0", 1, 600);
    sleeping_reaches(&broker, "py.0", 1).await;
    let served = spread(&broker, "py", 10).await;
    assert_eq!((served["py.0"], served["py.1"]), (5, 5), "{served:?}");
    for s in sleeps {
        s.await.expect("task").expect("slept");
    }
    let spec = lifecycle_py("py", 2).balance(WorkerBalance::LeastPending);
    broker.reconfigure(spec).await.expect("reconfigure");

    let sleeps: Vec<_> = [slow("conf.0", 2, 2500), slow("py.0", 1, 2500)]
        .into_iter()
        .flatten()
        .collect();
    sleeping_reaches(&broker, "conf.0", 2).await;
    sleeping_reaches(&broker, "py.0", 1).await;
    let mut served = spread(&broker, "conf", 30).await;
    served.extend(spread(&broker, "py", 10).await);
    assert_eq!(served.get("conf.0"), None, "{served:?}");
    assert_eq!(served.get("py.0"), None, "{served:?}");
    assert_eq!(served["py.1"], 10, "{served:?}");
    // Ties between the idle ones go round.
    assert_eq!((served["conf.1"], served["conf.2"]), (15, 15), "{served:?}");
    for s in sleeps {
        s.await.expect("task").expect("slept");
    }
}

// ---------------------------------------------------------------------------
// MessagePack-RPC services have no cancel

#[actix::test]
async fn a_msgpack_rpc_service_is_sent_no_cancel() {
    let broker = broker();
    let rpc = lifecycle_py("rpc", 1)
        .env("LIFECYCLE_RPC", "1")
        .msgpack_rpc("");
    spawn(&broker, rpc).await;
    // Timed out, and given up by its caller: both would cancel it at a
    // worker that speaks the procbroker protocol.
    let held = request("rpc", "hold", &json!([])).with_timeout_ms(200);
    let e = call(&broker, held).await.expect_err("never answered");
    assert_eq!(e.code(), Some("timeout"));
    let held = request("rpc", "hold", &json!([]));
    let gave_up =
        tokio::time::timeout(Duration::from_millis(200), broker.call_envelope(held)).await;
    assert!(gave_up.is_err());
    // An event does reach it, as a notification, after anything sent before.
    assert_eq!(
        broker
            .event("rpc", "note", &json!([7]))
            .await
            .expect("event"),
        1
    );
    let seen = value(&broker, "rpc", "notifications", json!([])).await;
    assert_eq!(seen, json!([["note", [7]]]));
}
