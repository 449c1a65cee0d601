//! MessagePack-RPC services with real programs: two
//! `nvim --clean --embed --headless` workers under the broker, called from
//! Rust through the broker: results, neovim's own errors, round-robin,
//! neovim calling another service (`vim.rpcrequest`) and notifying one
//! (`vim.rpcnotify`), an event delivered to neovim as a notification,
//! pipelining, a timeout with the late reply dropped, neovim dying with a
//! request in flight; and a fake MessagePack-RPC child
//! (`tests/python/rpc_fake.py`) that sends garbage, a wrong array and an
//! oversize value: a bad value is counted, a stream out of sync restarts
//! the child.

mod support;

use procbroker::config::{BrokerConfig, ServiceConfig};
use procbroker::embed::{BrokerHandle, ProcBroker};
use procbroker::protocol::{Envelope, ErrorCode};
use procbroker::service::Methods;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::time::Duration;
use support::*;

/// `workers` neovims; their requests go to `host`, notifications to `sink`.
fn nvim(workers: u32) -> ServiceConfig {
    ServiceConfig::new("nvim", "nvim")
        .args(["--clean", "--embed", "--headless"])
        .workers(workers)
        .msgpack_rpc("nvim_get_api_info")
        .calls_to("host")
        .events_to("sink")
        .restart(quick_restarts(5))
}

type Seen = Rc<RefCell<Vec<(String, serde_json::Value)>>>;

/// A broker with `host` (answers `Lookup(x)` with `2x`; params are an
/// array, as MessagePack-RPC sends them) and `sink` (keeps
/// every event it gets), both in-process.
async fn broker() -> (BrokerHandle, Seen) {
    let broker = ProcBroker::builder()
        .request_timeout(Duration::from_secs(10))
        .sysmon_interval(None)
        .start();
    let host = Methods::new().method("Lookup", |(x,): (i64,)| async move { Ok(x * 2) });
    broker.add_service("host", 1, host).await.expect("host");
    let seen: Seen = Rc::default();
    let sink = {
        let seen = Rc::clone(&seen);
        Methods::new().on_event(move |event: Envelope| {
            let payload = event.payload_as().unwrap_or(serde_json::Value::Null);
            seen.borrow_mut().push((event.id.to_string(), payload));
        })
    };
    broker.add_service("sink", 1, sink).await.expect("sink");
    (broker, seen)
}

/// Runs `code` as Lua in one of the neovims (`nvim_exec_lua`), returning its result.
async fn lua<T: serde::de::DeserializeOwned>(broker: &BrokerHandle, code: &str) -> T {
    broker
        .call("nvim", "nvim_exec_lua", &(code, [(); 0]))
        .await
        .unwrap_or_else(|e| panic!("{code}: {e}"))
        .payload_as()
        .unwrap_or_else(|e| panic!("{code}: {e}"))
}

async fn eval(broker: &BrokerHandle, target: &str, expr: &str) -> serde_json::Value {
    broker
        .call(target, "nvim_eval", &(expr,))
        .await
        .unwrap_or_else(|e| panic!("nvim_eval({expr}): {e}"))
        .payload_as()
        .expect("a value")
}

#[actix::test]
async fn neovim_serves_calls_makes_calls_and_notifies_through_the_broker() {
    let (broker, seen) = broker().await;
    let spawned = broker.spawn(nvim(2)).await.expect("nvim");
    let pids: BTreeSet<u32> = spawned.iter().filter_map(|p| p.pid).collect();
    assert_eq!(pids.len(), 2, "{spawned:?}");

    // Results, verbatim.
    assert_eq!(eval(&broker, "nvim", "1+1").await, 2);
    assert_eq!(eval(&broker, "nvim", "'abc' . 'def'").await, "abcdef");
    assert_eq!(
        eval(&broker, "nvim", "[1, {'a': 2}]").await,
        serde_json::json!([1, {"a": 2}])
    );

    // neovim's own error: an `error` envelope, code `handler`.
    let error = broker
        .call("nvim", "nvim_eval", &("undefined_x",))
        .await
        .expect_err("E121");
    assert_eq!(error.code(), Some("handler"), "{error}");
    assert!(error.to_string().contains("E121"), "{error}");

    // Round-robin over both workers, in turn.
    let mut order = Vec::new();
    for _ in 0..4 {
        let pid: u32 = broker
            .call("nvim", "nvim_call_function", &("getpid", [(); 0]))
            .await
            .expect("getpid")
            .payload_as()
            .expect("pid");
        order.push(pid);
    }
    assert_eq!(order.iter().copied().collect::<BTreeSet<_>>(), pids);
    assert_ne!(order[0], order[1]);
    assert_eq!(order[0], order[2]);
    assert_eq!(order[1], order[3]);

    // neovim calls another service while answering us.
    let looked_up: i64 = lua(&broker, "return vim.rpcrequest(1, 'Lookup', 21)").await;
    assert_eq!(looked_up, 42);
    // …and gets an error (the broker's `unknown_method`, sent as
    // `[code, message]`) when the method does not exist.
    let (ok, _): (bool, serde_json::Value) =
        lua(&broker, "return {pcall(vim.rpcrequest, 1, 'Nope', 1)}").await;
    assert!(!ok, "the failed call raised an error in neovim");

    // neovim notifies: an event to `sink`.
    let () = lua(&broker, "vim.rpcnotify(1, 'changed', 'a', 1)").await;
    for _ in 0..100 {
        if !seen.borrow().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        seen.borrow().as_slice(),
        [("changed".to_string(), serde_json::json!(["a", 1]))]
    );

    // An event to neovim arrives as a notification (an API call).
    let delivered = broker
        .event("nvim.0", "nvim_set_var", &("from_broker", 7))
        .await
        .expect("event");
    assert_eq!(delivered, 1);
    let var: i64 = broker
        .call("nvim.0", "nvim_get_var", &("from_broker",))
        .await
        .expect("the notification ran before this request")
        .payload_as()
        .expect("number");
    assert_eq!(var, 7);

    // Eight in flight at once, each answered with its own result.
    let calls = (0..8).map(|i| {
        let broker = broker.clone();
        async move { (i, eval(&broker, "nvim", &format!("{i} * 3")).await) }
    });
    for (i, result) in futures_util::future::join_all(calls).await {
        assert_eq!(result, i * 3);
    }

    let stats = broker.stats().await.expect("stats");
    let nvim_requests: u64 = ["nvim.0", "nvim.1"]
        .iter()
        .map(|id| stats.per_process[*id].counters.request_count)
        .sum();
    // rpcrequest from neovim counts as its requests too.
    assert!(nvim_requests >= 2, "{nvim_requests}");
    assert!(
        stats.latency_us["nvim"].count >= 19,
        "{:?}",
        stats.latency_us
    );
    assert_eq!(stats.total.faults.bad_frames, 0);
    broker.shutdown().await;
    for pid in pids {
        assert!(reaped(pid), "nvim {pid} stopped by EOF and reaped");
    }
}

#[actix::test]
async fn a_timed_out_neovim_call_gets_timeout_and_its_late_reply_is_dropped() {
    let (broker, _) = broker().await;
    broker.spawn(nvim(1)).await.expect("nvim");
    let slow = Envelope::request("nvim", "nvim_command", 0)
        .with_payload(&("sleep 400m",))
        .expect("payload")
        .with_timeout_ms(100);
    let error = broker.call_envelope(slow).await.expect_err("timeout");
    assert_eq!(error.broker_code(), Some(ErrorCode::Timeout), "{error}");
    // The late reply comes and is dropped, counted; neovim serves on.
    let mut late = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        late = broker.stats().await.expect("stats").per_process["nvim.0"]
            .faults
            .late_replies;
        if late > 0 {
            break;
        }
    }
    assert_eq!(late, 1);
    assert_eq!(eval(&broker, "nvim", "40+2").await, 42);
    broker.shutdown().await;
}

#[actix::test]
async fn neovim_dying_mid_request_fails_it_and_comes_back_through_the_probe() {
    let (broker, _) = broker().await;
    let spawned = broker.spawn(nvim(1)).await.expect("nvim");
    let pid = spawned[0].pid.expect("pid");
    let in_flight = {
        let broker = broker.clone();
        actix::spawn(async move { broker.call("nvim", "nvim_command", &("sleep 5",)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(pid, nix::sys::signal::Signal::SIGKILL);
    let error = in_flight.await.expect("task").expect_err("worker_exited");
    assert_eq!(
        error.broker_code(),
        Some(ErrorCode::WorkerExited),
        "{error}"
    );
    let again = ready_again(&broker, "nvim.0", 1).await;
    assert_ne!(again.pid, Some(pid));
    assert_eq!(eval(&broker, "nvim", "6*7").await, 42);
    broker.shutdown().await;
}

/// The fake child of tests/python/rpc_fake.py, with values of at most
/// 4 KiB.
fn fake() -> ServiceConfig {
    ServiceConfig::new("fake", python())
        .args([format!(
            "{}/tests/python/rpc_fake.py",
            env!("CARGO_MANIFEST_DIR")
        )])
        .env("PROCBROKER_TEST_HUGE", "10000")
        .msgpack_rpc("")
        .restart(quick_restarts(10))
}

#[actix::test]
async fn bad_values_from_a_msgpack_rpc_child_put_it_out_of_sync() {
    let config = BrokerConfig {
        max_frame_bytes: 4096,
        sysmon_interval: None,
        ..BrokerConfig::default()
    };
    let broker = ProcBroker::builder().config(config).start();
    broker.spawn(fake()).await.expect("fake");
    let echoed: (String, u32) = broker
        .call("fake", "echo", &("x", 1))
        .await
        .expect("echo")
        .payload_as()
        .expect("params back");
    assert_eq!(echoed, ("x".to_string(), 1));

    // A reply under a msgid nobody used is dropped and counted; the real
    // one still reaches its caller.
    let answer: String = broker
        .call("fake", "stray", &())
        .await
        .expect("the right reply")
        .payload_as()
        .expect("str");
    assert_eq!(answer, "ok");
    let stats = broker.stats().await.expect("stats");
    assert_eq!(stats.per_process["fake.0"].faults.unmatched_replies, 1);
    assert_eq!(stats.per_process["fake.0"].faults.bad_frames, 0);

    for (round, method) in ["garbage", "wrong_type", "huge"].into_iter().enumerate() {
        let error = broker
            .call("fake", method, &())
            .await
            .expect_err("the stream broke");
        assert_eq!(
            error.broker_code(),
            Some(ErrorCode::WorkerExited),
            "{method}: {error}"
        );
        let restarts = round as u32 + 1;
        ready_again(&broker, "fake.0", restarts).await;
        let stats = broker.stats().await.expect("stats");
        let fake = &stats.per_process["fake.0"];
        assert_eq!(fake.faults.bad_frames, u64::from(restarts), "{method}");
        assert_eq!(fake.faults.restarts, u64::from(restarts), "{method}");
        // And it serves again.
        broker
            .call("fake", "echo", &(round,))
            .await
            .expect("echo after");
    }
    // A request too large for the limit never reaches it: `too_large`.
    let big = "y".repeat(5000);
    let error = broker
        .call("fake", "echo", &(big,))
        .await
        .expect_err("too large");
    assert_eq!(error.broker_code(), Some(ErrorCode::TooLarge), "{error}");
    broker.shutdown().await;
}
