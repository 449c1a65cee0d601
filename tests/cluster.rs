//! Federation over NATS with real parts only: each test starts
//! its own `nats-server` on a free loopback port, node `a` is a broker
//! embedded in the test (so it can call and look inside), nodes `b` and `c`
//! are `procbroker run` processes with real worker subprocesses. Every
//! process is stopped by pid at the end.

mod support;

use procbroker::config::ClusterConfig;
use procbroker::embed::{BrokerHandle, CallError, ProcBroker};
use procbroker::protocol::rpc::NodeInfo;
use procbroker::protocol::{Envelope, ErrorCode, Payload};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// Heartbeat of every node in these tests (3 missed: 0.6 s).
const HEARTBEAT_MS: u64 = 200;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn nats_server_bin() -> String {
    if std::path::Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server".into()
    } else {
        "nats-server".into()
    }
}

/// A `nats-server` on 127.0.0.1, killed (by pid) when dropped.
struct Nats {
    child: Option<Child>,
    port: u16,
    args: Vec<String>,
}

impl Nats {
    fn start(args: &[&str]) -> Self {
        let mut nats = Self {
            child: None,
            port: free_port(),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        nats.restart();
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// (Re)starts it on the same port; returns once it accepts connections.
    fn restart(&mut self) {
        let child = Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (scripts/test installs it)");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn worker_script() -> String {
    format!(
        "{}/tests/python/cluster_worker.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A `procbroker run` node, killed (by pid) when dropped.
struct Node {
    child: Child,
    _dir: PathBuf,
}

impl Node {
    /// Node `name` on `nats` with `who` (Python) workers and one `echo`.
    fn start(name: &str, url: &str, who: u32, extra: &str) -> Self {
        Self::start_with(name, url, who, HEARTBEAT_MS, extra)
    }

    /// [`start`](Self::start) with its own heartbeat interval.
    fn start_with(name: &str, url: &str, who: u32, heartbeat_ms: u64, extra: &str) -> Self {
        Self::start_full(name, url, who, heartbeat_ms, "", extra)
    }

    /// [`start_with`](Self::start_with), its admin endpoint on `admin`
    /// (`""`: none).
    fn start_full(
        name: &str,
        url: &str,
        who: u32,
        heartbeat_ms: u64,
        admin: &str,
        extra: &str,
    ) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "procbroker-cluster-{name}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let config = dir.join("node.toml");
        std::fs::write(
            &config,
            format!(
                "[admin]\nlisten = \"{admin}\"\n[sysmon]\ninterval_ms = 0\n\
                 [cluster]\nnats_url = \"{url}\"\nnode = \"{name}\"\nheartbeat_ms = {heartbeat_ms}\n{extra}\n\
                 [[service]]\nname = \"who\"\ncommand = \"{python}\"\nargs = [\"{script}\"]\nworkers = {who}\n\
                 [[service]]\nname = \"echo\"\ncommand = \"@self\"\nargs = [\"worker\", \"echo\"]\n",
                python = python(),
                script = worker_script(),
            ),
        )
        .expect("config");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .env("LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("procbroker run");
        Self { child, _dir: dir }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn cluster(url: &str, node: &str) -> ClusterConfig {
    ClusterConfig {
        heartbeat_ms: HEARTBEAT_MS,
        ..ClusterConfig::nats(url, node)
    }
}

/// Node `a`, embedded, with `cluster`.
fn node_a(cluster: ClusterConfig) -> BrokerHandle {
    ProcBroker::builder()
        .sysmon_interval(None)
        .request_timeout(Duration::from_secs(10))
        .cluster(cluster)
        .start()
}

/// Waits until `a` sees each of `nodes` up with `who` ready workers.
async fn joined(a: &BrokerHandle, nodes: &[(&str, u32)]) -> Vec<NodeInfo> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen = a.nodes().await.expect("nodes");
        let all = nodes.iter().all(|(name, who)| {
            seen.iter()
                .any(|n| n.node == *name && n.up && n.services.get("who") == Some(who))
        });
        if all {
            return seen;
        }
        assert!(Instant::now() < deadline, "nodes did not join: {seen:?}");
        actix::clock::sleep(Duration::from_millis(50)).await;
    }
}

async fn call(
    a: &BrokerHandle,
    target: &str,
    method: &str,
    payload: impl serde::Serialize,
) -> Envelope {
    let request = Envelope::request(target, method, 0)
        .with_payload(&payload)
        .expect("payload");
    ask(a, request).await
}

/// The one reply to `request`, an `error` envelope for an error.
async fn ask(a: &BrokerHandle, request: Envelope) -> Envelope {
    match a.call_envelope(request.clone()).await {
        Ok(reply) => reply.into_envelope(),
        Err(CallError::Remote {
            code,
            message,
            source_id,
        }) => request.error_reply(code, message).with_source(source_id),
        Err(e) => panic!("no reply: {e}"),
    }
}

fn code(reply: &Envelope) -> Option<ErrorCode> {
    reply.error_code()
}

fn who(reply: &Envelope) -> (String, String) {
    let v: serde_json::Value = reply.payload_as().expect("Who payload");
    (
        v["id"].as_str().unwrap_or_default().to_owned(),
        v["source"].as_str().unwrap_or_default().to_owned(),
    )
}

async fn node_stats(a: &BrokerHandle, node: &str) -> procbroker::protocol::NodeStats {
    let stats = a.stats().await.expect("stats");
    stats
        .cluster
        .expect("cluster in stats")
        .nodes
        .get(node)
        .cloned()
        .unwrap_or_default()
}

#[actix::test]
async fn remote_calls_route_stamp_rotate_and_fail_as_designed() {
    let nats = Nats::start(&[]);
    let _b = Node::start("b", &nats.url(), 2, "");
    let _c = Node::start("c", &nats.url(), 1, "");
    let a = node_a(cluster(&nats.url(), "a"));
    // A caller subprocess on a: its remote calls carry `caller.0@a`.
    a.spawn(procbroker::config::ServiceConfig::new("caller", python()).args([worker_script()]))
        .await
        .expect("caller");
    let nodes = joined(&a, &[("b", 2), ("c", 1)]).await;
    assert_eq!(nodes[0].node, "a");
    assert!(nodes[0].local);

    // Payload bytes cross verbatim (every byte value, as a msgpack bin).
    let bytes: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let raw = Payload::encode(&serde_bytes::Bytes::new(&bytes)).expect("encode");
    let request = Envelope::request("echo@b", "Echo", 0).with_raw_payload(raw.clone());
    let reply = ask(&a, request).await;
    assert_eq!(
        reply.payload.as_ref().map(|p| p.as_bytes()),
        Some(raw.as_bytes())
    );
    assert_eq!(&*reply.source, "echo.0@b");

    // service.N@node, and the source each side sees.
    let reply = call(&a, "who.1@b", "Who", ()).await;
    assert_eq!(who(&reply), ("who.1".into(), "@caller@a".into()));
    assert_eq!(&*reply.source, "who.1@b");
    let reply = call(
        &a,
        "caller",
        "Call",
        serde_json::json!({"target": "who.0@b", "method": "Who"}),
    )
    .await;
    let v: serde_json::Value = reply.payload_as().expect("Call payload");
    assert_eq!(v["source"], "who.0@b", "{v}");
    assert_eq!(v["payload"]["source"], "caller.0@a", "{v}");

    // A plain name: no local `who`, so round-robin over b and c, 50/50 by
    // node (a's own cursor), and over b's two workers by b's.
    let mut by_id = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..100 {
        let reply = call(&a, "who", "Who", ()).await;
        assert_eq!(code(&reply), None, "{reply:?}");
        *by_id
            .entry(who(&reply).0 + "@" + reply.source.rsplit('@').next().unwrap_or(""))
            .or_default() += 1;
    }
    let on = |node: &str| {
        by_id
            .iter()
            .filter(|(k, _)| k.ends_with(node))
            .map(|(_, n)| n)
            .sum::<u32>()
    };
    assert_eq!((on("@b"), on("@c")), (50, 50), "{by_id:?}");
    assert_eq!(by_id.get("who.0@b"), Some(&25), "{by_id:?}");

    // What fails, fails with the designed code, once.
    let reply = call(&a, "who@nowhere", "Who", ()).await;
    assert_eq!(code(&reply), Some(ErrorCode::UnknownTarget), "{reply:?}");
    assert!(
        reply
            .error
            .as_deref()
            .unwrap_or("")
            .contains("unknown node"),
        "{reply:?}"
    );
    let reply = call(&a, "who@b", "Nope", ()).await;
    assert_eq!(code(&reply), Some(ErrorCode::UnknownMethod), "{reply:?}");
    assert!(reply.source.ends_with("@b"), "{reply:?}");
    let reply = call(&a, "broker@b", "Ping", ()).await;
    assert_eq!(code(&reply), Some(ErrorCode::Forbidden), "{reply:?}");
    let reply = call(&a, "nothing", "Who", ()).await;
    assert_eq!(code(&reply), Some(ErrorCode::UnknownTarget), "{reply:?}");

    // 200 at once over both nodes: each gets exactly one reply.
    let calls = (0..200).map(|i| call(&a, "who", "Echo", i));
    let replies = futures_util::future::join_all(calls).await;
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply.payload_as::<i64>().ok(), Some(i as i64), "{reply:?}");
    }

    // ListNodes over the broker RPC, and the counts in stats.
    let listed: Vec<NodeInfo> = call(&a, "broker", "ListNodes", ())
        .await
        .payload_as()
        .expect("ListNodes");
    let names: Vec<&str> = listed.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let b = node_stats(&a, "b").await;
    assert!(b.up && b.counters.response_count >= 150, "{b:?}");
    assert_eq!(b.faults.late_replies, 0);
    assert!(b.latency_us.count >= 150, "{b:?}");
    let stats = a.stats().await.expect("stats");
    assert_eq!(stats.total.pending, 0);
    assert!(stats.cluster.expect("cluster").connected);

    // The operators' view: /stats and /metrics (promtool-checked).
    let any = "127.0.0.1:0".parse().expect("addr");
    let admin = procbroker::admin::Admin::start(a.clone(), any, vec![]).expect("admin");
    let (_, body) = get(admin.addr, "/stats").await;
    let stats: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(stats["cluster"]["node"], "a", "{body}");
    assert_eq!(
        stats["cluster"]["nodes"]["c"]["services"]["who"], 1,
        "{body}"
    );
    let (_, metrics) = get(admin.addr, "/metrics").await;
    for expected in [
        "procbroker_cluster_connected{node=\"a\"} 1",
        "procbroker_node_up{node=\"b\"} 1",
        "procbroker_node_up{node=\"c\"} 1",
        "procbroker_node_late_replies_total{node=\"b\"} 0",
        "procbroker_node_no_responders_total{node=\"c\"} 0",
        "procbroker_cluster_slow_consumer_events_total{node=\"a\"} 0",
    ] {
        assert!(metrics.contains(expected), "{expected} missing:\n{metrics}");
    }
    let (ok, report) = promtool(&["check", "metrics"], &metrics);
    assert!(ok, "promtool check metrics:\n{report}\n{metrics}");
    // `procbroker stats` lists the nodes (run off this thread: it blocks).
    let addr = admin.addr.to_string();
    let table = std::thread::spawn(move || {
        Command::new(BIN)
            .args(["stats", "--admin", &addr])
            .output()
            .expect("procbroker stats")
    });
    let table = loop {
        if table.is_finished() {
            break table.join().expect("stats thread");
        }
        actix::clock::sleep(Duration::from_millis(20)).await;
    };
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("cluster procbroker: node a connected"),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.starts_with("c "))
        .unwrap_or_default();
    assert!(row.contains("yes") && row.contains("who:1"), "{text}");
    admin.stop().await;
    a.shutdown().await;
}

#[actix::test]
async fn remote_timeouts_and_oversize_envelopes_get_one_error_each() {
    let nats = Nats::start(&[]);
    let b_admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let _b = Node::start_full("b", &nats.url(), 1, HEARTBEAT_MS, &b_admin.to_string(), "");
    let a = node_a(cluster(&nats.url(), "a"));
    joined(&a, &[("b", 1)]).await;

    // The caller's deadline rules; the budget travels; what comes late is
    // dropped and counted: the worker's reply at b (the request ended
    // there too: b timed it out, or a's cancel came first), and b's own
    // `timeout` at a if b's deadline passed before a's cancel came.
    let started = Instant::now();
    let request = Envelope::request("who@b", "Sleep", 0)
        .with_payload(&400)
        .expect("payload")
        .with_timeout_ms(100);
    let reply = ask(&a, request).await;
    assert_eq!(code(&reply), Some(ErrorCode::Timeout), "{reply:?}");
    assert!(
        started.elapsed() < Duration::from_millis(350),
        "{:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats_of(b_admin).await["per_process"]["who.0"]["late_replies"] != 1 {
        assert!(
            Instant::now() < deadline,
            "the worker's late reply not counted at b"
        );
        actix::clock::sleep(Duration::from_millis(50)).await;
    }
    assert!(node_stats(&a, "b").await.faults.late_replies <= 1);
    // b still serves (its worker finished sleeping).
    let reply = call(&a, "who@b", "Who", ()).await;
    assert_eq!(code(&reply), None, "{reply:?}");

    // 2 MiB against the server's 1 MiB max_payload: refused before
    // publishing.
    let big = vec![7u8; 2 << 20];
    let request = Envelope::request("echo@b", "Echo", 0)
        .with_payload(&serde_bytes::Bytes::new(&big))
        .expect("payload");
    let reply = ask(&a, request).await;
    assert_eq!(code(&reply), Some(ErrorCode::TooLarge), "{reply:?}");
    assert_eq!(node_stats(&a, "b").await.too_large, 1);
    // A reply too large for NATS: b answers too_large instead.
    let reply = call(&a, "who@b", "Big", 2 << 20).await;
    assert_eq!(code(&reply), Some(ErrorCode::TooLarge), "{reply:?}");
    assert_eq!(&*reply.source, "broker@b", "{reply:?}");
    let reply = call(&a, "who@b", "Big", 1000).await;
    assert_eq!(code(&reply), None, "{reply:?}");
    assert_eq!(a.stats().await.expect("stats").total.pending, 0);
    a.shutdown().await;
}

#[actix::test]
async fn a_killed_node_fails_its_requests_within_three_heartbeats() {
    let nats = Nats::start(&[]);
    let mut b = Node::start("b", &nats.url(), 1, "");
    let a = node_a(cluster(&nats.url(), "a"));
    joined(&a, &[("b", 1)]).await;
    let a2 = a.clone();
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let a = a2.clone();
            actix::spawn(async move { call(&a, "who@b", "Sleep", 10_000).await })
        })
        .collect();
    // All five delivered to b's worker (one sleeps, four wait in its pipe).
    actix::clock::sleep(Duration::from_millis(300)).await;
    assert_eq!(node_stats(&a, "b").await.counters.total_sent, 5);
    let killed = Instant::now();
    b.kill9();
    // Until the heartbeats are missed, NATS itself says nobody listens:
    // once the server has seen b's connection close (at once, unless the
    // machine is loaded), and before b's 3 heartbeats (400-600 ms) run out.
    actix::clock::sleep(Duration::from_millis(150)).await;
    let reply = call(&a, "who@b", "Who", ()).await;
    assert!(nats_noticed(&reply), "{reply:?}");
    assert_eq!(code(&reply), Some(ErrorCode::Unavailable), "{reply:?}");
    assert_eq!(node_stats(&a, "b").await.no_responders, 1);
    for handle in calls {
        let reply = handle.await.expect("task");
        assert_eq!(code(&reply), Some(ErrorCode::WorkerExited), "{reply:?}");
    }
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_millis(3 * HEARTBEAT_MS + 1000),
        "in-flight requests failed {took:?} after the kill"
    );
    let reply = call(&a, "who@b", "Who", ()).await;
    assert_eq!(code(&reply), Some(ErrorCode::Unavailable), "{reply:?}");
    let listed = a.nodes().await.expect("nodes");
    assert!(listed.iter().any(|n| n.node == "b" && !n.up), "{listed:?}");
    assert_eq!(a.stats().await.expect("stats").total.pending, 0);
    eprintln!(
        "5 in-flight requests failed worker_exited {took:?} after kill -9 of node b (pid gone)"
    );
    a.shutdown().await;
}

/// A broker the server refuses: after 4 heartbeats it still does not know
/// node b (its call is `unknown_target`) and its stats say not connected.
async fn never_joins(broker: &BrokerHandle) {
    actix::clock::sleep(Duration::from_millis(4 * HEARTBEAT_MS)).await;
    let reply = call(broker, "who@b", "Who", ()).await;
    assert_eq!(code(&reply), Some(ErrorCode::UnknownTarget), "{reply:?}");
    let stats = broker
        .stats()
        .await
        .expect("stats")
        .cluster
        .expect("cluster");
    assert!(!stats.connected, "{stats:?}");
}

/// Whether a reply is NATS's "no responders" answer (not the node being
/// out of the rotation already).
fn nats_noticed(reply: &Envelope) -> bool {
    reply
        .error
        .as_deref()
        .is_some_and(|e| e.contains("no responders"))
}

#[actix::test]
async fn nats_going_away_leaves_local_routing_alone_and_nodes_rejoin() {
    let mut nats = Nats::start(&[]);
    let _b = Node::start("b", &nats.url(), 1, "");
    let a = node_a(cluster(&nats.url(), "a"));
    a.add_service("local", 1, procbroker::workers::echo())
        .await
        .expect("local");
    joined(&a, &[("b", 1)]).await;
    assert_eq!(code(&call(&a, "who@b", "Who", ()).await), None);

    nats.kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = call(&a, "who@b", "Who", ()).await;
        if code(&reply) == Some(ErrorCode::Unavailable) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "remote calls still routed: {reply:?}"
        );
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
    let stats = a.stats().await.expect("stats").cluster.expect("cluster");
    assert!(!stats.connected);
    // Local calls are not disturbed while NATS is down.
    for i in 0..50 {
        let reply = call(&a, "local", "Echo", i).await;
        assert_eq!(reply.payload_as::<i64>().ok(), Some(i));
    }

    nats.restart();
    joined(&a, &[("b", 1)]).await;
    let reply = call(&a, "who@b", "Who", ()).await;
    assert_eq!(code(&reply), None, "{reply:?}");
    let stats = a.stats().await.expect("stats").cluster.expect("cluster");
    assert!(stats.connected && stats.reconnects >= 1, "{stats:?}");
    assert_eq!(a.stats().await.expect("stats").total.pending, 0);
    a.shutdown().await;
}

#[actix::test]
async fn token_auth_admits_the_right_token_only() {
    let nats = Nats::start(&["--auth", "s3cret"]);
    let _b = Node::start("b", &nats.url(), 1, "token = \"s3cret\"");
    let a = node_a(ClusterConfig {
        token: "s3cret".into(),
        ..cluster(&nats.url(), "a")
    });
    joined(&a, &[("b", 1)]).await;
    assert_eq!(code(&call(&a, "who@b", "Who", ()).await), None);

    // The wrong token never connects: b stays unknown to it, and its
    // local routing is unaffected.
    let intruder = node_a(ClusterConfig {
        token: "wrong".into(),
        ..cluster(&nats.url(), "x")
    });
    never_joins(&intruder).await;
    let seen = a.nodes().await.expect("nodes");
    assert!(!seen.iter().any(|n| n.node == "x"), "{seen:?}");
    intruder.shutdown().await;
    a.shutdown().await;
}

#[actix::test]
async fn a_node_that_leaves_is_out_of_the_rotation_at_once() {
    let nats = Nats::start(&[]);
    // b's heartbeat is long enough that only its goodbye can take it out
    // of a's rotation within the test's 3 s.
    let b = Node::start_with("b", &nats.url(), 1, 5000, "");
    let a = node_a(cluster(&nats.url(), "a"));
    joined(&a, &[("b", 1)]).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(3);
    loop {
        // A goodbye drops the node from the table: not even listed as down.
        let listed = a.nodes().await.expect("nodes");
        if !listed.iter().any(|n| n.node == "b") {
            eprintln!(
                "b out of a's table {:?} after its SIGTERM",
                stopped.elapsed()
            );
            break;
        }
        assert!(Instant::now() < deadline, "b still up: {listed:?}");
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
    a.shutdown().await;
}

#[test]
fn bench_cluster_mode_runs_both_brokers_and_the_raw_nats_baseline() {
    let nats = Nats::start(&[]);
    let url = nats.url();
    let v = bench_json(&[
        "bench",
        "--mode",
        "cluster",
        "--nats-url",
        &url,
        "--workers",
        "2",
        "--concurrency",
        "4",
        "--requests",
        "300",
        "--baseline",
        "--json",
    ]);
    assert_eq!(v["mode"], "cluster", "{v}");
    assert_eq!(
        (v["requests"].as_u64(), v["errors"].as_u64()),
        (Some(300), Some(0)),
        "{v}"
    );
    // Broker a is the bench itself; the client is its subprocess; the
    // workers' figure is node b (its broker and echo workers). The raw
    // requester is the bench process, its responder a process of its own.
    assert_eq!(cpu_roles(&v["cpu_us_per_call"]), [true, true, true], "{v}");
    assert_eq!(
        cpu_roles(&v["baseline"]["cpu_us_per_call"]),
        [false, true, true],
        "{v}"
    );
    assert_baseline_measured(&v);

    let out = Command::new(BIN)
        .args(["bench", "--mode", "cluster"])
        .output()
        .expect("bench");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nats-url"));
}

#[actix::test]
async fn the_dashboard_shows_the_nodes_in_a_real_browser() {
    let nats = Nats::start(&[]);
    let b = Node::start("b", &nats.url(), 1, "");
    let a = node_a(cluster(&nats.url(), "a"));
    joined(&a, &[("b", 1)]).await;
    let any = "127.0.0.1:0".parse().expect("addr");
    let admin = procbroker::admin::Admin::start(a.clone(), any, vec![]).expect("admin");

    // Calls to b for as long as the browser looks (they fail once it is killed).
    let running = std::rc::Rc::new(std::cell::Cell::new(true));
    let traffic = {
        let (a, running) = (a.clone(), std::rc::Rc::clone(&running));
        actix::spawn(async move {
            while running.get() {
                let _ = a.call("echo@b", "Echo", &1).await;
                actix::clock::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let page = format!("http://{}/", admin.addr);
    let args = ["--cluster".into(), page, "b".into(), b.pid().to_string()];
    let report = browser_check(&args).await;
    running.set(false);
    let _ = traffic.await;
    assert_eq!(report["gone"], true, "{report}");
    // What the page showed is what the broker knows.
    let listed = a.nodes().await.expect("nodes");
    assert!(listed.iter().any(|n| n.node == "b" && !n.up), "{listed:?}");
    drop(b);
    admin.stop().await;
    a.shutdown().await;
}

/// A CA and a server certificate for 127.0.0.1 (openssl; scripts/test
/// installs it when missing), in `dir`: (ca.pem, server.pem, server.key).
fn tls_files(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("dir");
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    sh(&format!(
        "openssl req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=procbroker-test-ca 2>/dev/null"
    ));
    sh(&format!(
        "openssl req {ec} -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null && \
         printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext.cnf && \
         openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf 2>/dev/null"
    ));
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

#[actix::test]
async fn tls_and_user_password_are_passed_to_the_client() {
    let dir = std::env::temp_dir().join(format!("procbroker-cluster-tls-{}", std::process::id()));
    let (ca, cert, key) = tls_files(&dir);
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let nats = Nats::start(&[
        "--tls",
        "--tlscert",
        &cert,
        "--tlskey",
        &key,
        "--user",
        "pb",
        "--pass",
        "s3cret",
    ]);
    let auth = format!(
        "user = \"pb\"\npassword = \"s3cret\"\ntls_ca_file = {:?}",
        ca.display().to_string()
    );
    let _b = Node::start("b", &nats.url(), 1, &auth);
    let a = node_a(ClusterConfig {
        user: "pb".into(),
        password: "s3cret".into(),
        tls_ca_file: ca.display().to_string(),
        ..cluster(&nats.url(), "a")
    });
    joined(&a, &[("b", 1)]).await;
    let reply = call(&a, "who@b", "Who", ()).await;
    assert_eq!(who(&reply).0, "who.0", "{reply:?}");

    // The right password without the CA: the server's certificate is not
    // trusted, the broker never joins, and says so in its stats.
    let untrusting = node_a(ClusterConfig {
        user: "pb".into(),
        password: "s3cret".into(),
        ..cluster(&nats.url(), "x")
    });
    never_joins(&untrusting).await;
    untrusting.shutdown().await;
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Node identity and bounds

/// `cluster(url, node)` with `[cluster]` keys given as JSON, read the way a
/// config file is (unknown keys refused).
fn cluster_with(url: &str, node: &str, keys: serde_json::Value) -> ClusterConfig {
    let mut config = serde_json::to_value(cluster(url, node)).expect("json");
    if let (Some(config), Some(keys)) = (config.as_object_mut(), keys.as_object()) {
        config.extend(keys.clone());
    }
    serde_json::from_value(config).expect("this build knows these [cluster] keys")
}

/// `/stats` of an admin endpoint, as JSON.
async fn stats_json(admin: &procbroker::admin::Admin) -> serde_json::Value {
    let (status, body) = get(admin.addr, "/stats").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

fn admin_of(broker: &BrokerHandle) -> procbroker::admin::Admin {
    let any = "127.0.0.1:0".parse().expect("addr");
    procbroker::admin::Admin::start(broker.clone(), any, vec![]).expect("admin")
}

/// Whether a broker's stats say it stays out of the cluster for a name
/// conflict (`None`: the stats do not say).
async fn in_conflict(admin: &procbroker::admin::Admin) -> Option<bool> {
    stats_json(admin).await["cluster"]["cluster_conflict"].as_bool()
}

/// What one caller saw of its own tagged calls to `echo@b`.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    errors: u64,
    /// Replies that carried a payload this caller never sent.
    foreign: Vec<String>,
}

/// Calls `echo@b` from `broker`, 8 at a time, each payload tagged
/// `who-i-j`, until `running` is false.
async fn tagged_calls(
    broker: BrokerHandle,
    who: &'static str,
    running: std::rc::Rc<std::cell::Cell<bool>>,
    tally: std::rc::Rc<std::cell::RefCell<Tally>>,
) {
    let mut round = 0u64;
    while running.get() {
        let calls = (0..8).map(|j| {
            let tag = format!("{who}-{round}-{j}");
            let broker = broker.clone();
            async move {
                let request = Envelope::request("echo@b", "Echo", 0)
                    .with_payload(&tag)
                    .expect("payload")
                    .with_timeout_ms(2000);
                (tag, broker.call_envelope(request).await)
            }
        });
        let mut failed = false;
        for (tag, result) in futures_util::future::join_all(calls).await {
            let mut tally = tally.borrow_mut();
            match result {
                Ok(reply) => {
                    let got: String = reply.into_envelope().payload_as().unwrap_or_default();
                    if got == tag {
                        tally.ok += 1;
                    } else {
                        tally.foreign.push(format!("sent {tag}, got {got}"));
                    }
                }
                Err(_) => {
                    tally.errors += 1;
                    failed = true;
                }
            }
        }
        if failed {
            actix::clock::sleep(Duration::from_millis(10)).await;
        }
        round += 1;
    }
}

#[actix::test]
async fn two_brokers_with_one_node_name_never_get_each_others_replies() {
    let nats = Nats::start(&[]);
    let _b = Node::start("b", &nats.url(), 1, "");
    // Two brokers both named c, started together, each with a local service.
    let twins = [
        node_a(cluster(&nats.url(), "c")),
        node_a(cluster(&nats.url(), "c")),
    ];
    for twin in &twins {
        twin.add_service("local", 1, procbroker::workers::echo())
            .await
            .expect("local");
    }
    let admins = [admin_of(&twins[0]), admin_of(&twins[1])];

    // Both call echo@b from the start, concurrently, payloads tagged by caller.
    let running = std::rc::Rc::new(std::cell::Cell::new(true));
    let tallies = [
        std::rc::Rc::new(std::cell::RefCell::new(Tally::default())),
        std::rc::Rc::new(std::cell::RefCell::new(Tally::default())),
    ];
    let traffic: Vec<_> = ["one", "two"]
        .into_iter()
        .zip(&twins)
        .zip(&tallies)
        .map(|((who, twin), tally)| {
            actix::spawn(tagged_calls(
                twin.clone(),
                who,
                std::rc::Rc::clone(&running),
                std::rc::Rc::clone(tally),
            ))
        })
        .collect();

    // Exactly one of them stands aside, and says so in its stats.
    let deadline = Instant::now() + Duration::from_secs(10);
    let loser = loop {
        let seen = [in_conflict(&admins[0]).await, in_conflict(&admins[1]).await];
        match seen {
            [Some(true), Some(false)] => break 0,
            [Some(false), Some(true)] => break 1,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "no single conflict reported: {seen:?}; so far {:?} / {:?}",
            tallies[0].borrow(),
            tallies[1].borrow()
        );
        actix::clock::sleep(Duration::from_millis(50)).await;
    };
    let winner = 1 - loser;
    // It stays that way (neither both out nor both in) while traffic goes on.
    actix::clock::sleep(Duration::from_millis(5 * HEARTBEAT_MS)).await;
    let done = [tallies[0].borrow().ok, tallies[1].borrow().ok];
    actix::clock::sleep(Duration::from_millis(5 * HEARTBEAT_MS)).await;
    assert_eq!(in_conflict(&admins[loser]).await, Some(true));
    assert_eq!(in_conflict(&admins[winner]).await, Some(false));
    running.set(false);
    for task in traffic {
        task.await.expect("traffic");
    }
    for tally in &tallies {
        let tally = tally.borrow();
        assert!(
            tally.foreign.is_empty(),
            "a caller got another's payloads: {tally:?}"
        );
    }
    eprintln!(
        "winner {:?}, loser {:?}",
        tallies[winner].borrow(),
        tallies[loser].borrow()
    );
    // The winner kept working after the conflict was settled; the loser
    // served no remote call meanwhile.
    assert!(
        tallies[winner].borrow().ok > done[winner],
        "the winner's calls stopped: {:?}",
        tallies[winner].borrow()
    );
    assert_eq!(
        tallies[loser].borrow().ok,
        done[loser],
        "the loser still routes to the cluster"
    );
    // The loser serves its own services, refuses remote ones, and says
    // why in /metrics too.
    let reply = call(&twins[loser], "local", "Echo", 5).await;
    assert_eq!(reply.payload_as::<i64>().ok(), Some(5), "{reply:?}");
    let reply = call(&twins[loser], "echo@b", "Echo", 5).await;
    assert!(code(&reply).is_some(), "{reply:?}");
    for (i, admin) in admins.iter().enumerate() {
        let (_, metrics) = get(admin.addr, "/metrics").await;
        let expected = format!(
            "procbroker_cluster_conflict{{node=\"c\"}} {}",
            u8::from(i == loser)
        );
        assert!(
            metrics.contains(&expected),
            "{expected} missing:\n{metrics}"
        );
    }

    // The winner leaves: the loser takes the name and joins.
    let [first, second] = admins;
    let [a0, a1] = twins;
    let (winner_handle, loser_handle, loser_admin, winner_admin) = if loser == 0 {
        (a1, a0, first, second)
    } else {
        (a0, a1, second, first)
    };
    winner_admin.stop().await;
    winner_handle.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = call(&loser_handle, "echo@b", "Echo", 7).await;
        if reply.payload_as::<i64>().ok() == Some(7) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the loser never rejoined: {reply:?}"
        );
        actix::clock::sleep(Duration::from_millis(50)).await;
    }
    // And stays in: the winner, gone, advertises no more.
    actix::clock::sleep(Duration::from_millis(5 * HEARTBEAT_MS)).await;
    assert_eq!(in_conflict(&loser_admin).await, Some(false));
    let reply = call(&loser_handle, "echo@b", "Echo", 8).await;
    assert_eq!(reply.payload_as::<i64>().ok(), Some(8), "{reply:?}");
    loser_admin.stop().await;
    loser_handle.shutdown().await;
}

/// A raw NATS client of the test's own, to speak the heartbeat wire.
async fn raw_client(nats: &Nats) -> async_nats::Client {
    async_nats::connect(nats.url())
        .await
        .expect("raw NATS client")
}

/// Waits until `client` hears a heartbeat of `node`: that broker is then
/// subscribed (its subscriptions went to the server before its first
/// heartbeat), so what the test publishes next reaches it.
async fn heard(client: &async_nats::Client, node: &str) {
    use futures_util::StreamExt;
    let mut heartbeats = client.subscribe("procbroker.hb").await.expect("subscribe");
    let wait = async {
        while let Some(msg) = heartbeats.next().await {
            let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
            if v["node"] == node {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the broker's heartbeat");
}

fn heartbeat(node: &str, instance: u64, heartbeat_ms: u64, leaving: bool) -> serde_json::Value {
    serde_json::json!({
        "node": node,
        "instance": instance,
        "heartbeat_ms": heartbeat_ms,
        "services": {"svc": 1},
        "leaving": leaving,
    })
}

async fn publish(client: &async_nats::Client, body: &serde_json::Value) {
    let bytes = serde_json::to_vec(body).expect("json");
    client
        .publish("procbroker.hb", bytes.into())
        .await
        .expect("publish");
}

/// Resident memory of a process, in kB.
fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[actix::test]
async fn goodbyes_leave_no_trace_in_the_node_table() {
    let nats = Nats::start(&[]);
    let a = node_a(cluster(&nats.url(), "a"));
    let admin = admin_of(&a);
    // A `procbroker run` node too, to measure what the flood costs a broker.
    let port = free_port();
    let m = Node::start_full(
        "m",
        &nats.url(),
        1,
        HEARTBEAT_MS,
        &format!("127.0.0.1:{port}"),
        "",
    );
    let m_admin = SocketAddr::from(([127, 0, 0, 1], port));
    let client = raw_client(&nats).await;
    heard(&client, "a").await;
    joined_node(&a, "m").await;
    let rss_before = rss_of(m.pid());

    // 20 000 distinct nodes saying goodbye, then 1 000 that join and leave.
    let flood = Instant::now();
    for i in 0..20_000u64 {
        publish(&client, &heartbeat(&format!("gone{i}"), i + 1, 1000, true)).await;
    }
    for i in 0..1_000u64 {
        let node = format!("brief{i}");
        publish(&client, &heartbeat(&node, i + 1, 1000, false)).await;
        publish(&client, &heartbeat(&node, i + 1, 1000, true)).await;
    }
    // The last one joins and stays: once it is listed, the flood is read.
    publish(&client, &heartbeat("last", 1, 60_000, false)).await;
    client.flush().await.expect("flush");
    joined_node(&a, "last").await;
    eprintln!("flood of 22 001 heartbeats read in {:?}", flood.elapsed());

    // What the flood left in the other broker (measured before judging).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (took, body) = loop {
        let asked = Instant::now();
        let (_, body) = get(m_admin, "/stats").await;
        let took = asked.elapsed();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if v["cluster"]["nodes"].get("last").is_some() {
            break (took, body);
        }
        assert!(Instant::now() < deadline, "m never read the flood");
        actix::clock::sleep(Duration::from_millis(100)).await;
    };
    let (_, metrics) = get(m_admin, "/metrics").await;
    let rss_after = rss_of(m.pid());
    eprintln!(
        "procbroker run after the flood: RSS {rss_before} -> {rss_after} kB, /stats {} bytes ({took:?}), /metrics {} bytes",
        body.len(),
        metrics.len()
    );

    let listed = a.nodes().await.expect("nodes");
    let names: Vec<&str> = listed.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(
        names,
        ["a", "last", "m"],
        "nodes that left are still listed"
    );
    let stats = stats_json(&admin).await;
    let nodes = stats["cluster"]["nodes"].as_object().map_or(0, |n| n.len());
    assert_eq!(nodes, 2, "{:.500}", stats["cluster"]);
    // The Router forgot them too: an unknown node.
    let reply = call(&a, "svc@brief7", "Echo", ()).await;
    assert_eq!(code(&reply), Some(ErrorCode::UnknownTarget), "{reply:?}");
    assert!(body.len() < 64 << 10, "/stats is {} bytes", body.len());
    assert!(
        metrics.len() < 64 << 10,
        "/metrics is {} bytes",
        metrics.len()
    );
    admin.stop().await;
    a.shutdown().await;
}

/// Waits until `a` lists `node` as up.
async fn joined_node(a: &BrokerHandle, node: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = a.nodes().await.expect("nodes");
        if seen.iter().any(|n| n.node == node && n.up) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node} did not join: {} nodes listed",
            seen.len()
        );
        actix::clock::sleep(Duration::from_millis(50)).await;
    }
}

#[actix::test]
async fn the_node_table_and_advertised_services_are_bounded_and_bad_heartbeats_counted() {
    let nats = Nats::start(&[]);
    let a = node_a(cluster_with(
        &nats.url(),
        "a",
        serde_json::json!({"max_nodes": 50}),
    ));
    let admin = admin_of(&a);
    let client = raw_client(&nats).await;
    heard(&client, "a").await;
    // Three heartbeats nobody can read: not JSON, a bad node name, no instance.
    for bad in [
        "not json".to_owned(),
        heartbeat("bad.name", 1, 1000, false).to_string(),
        r#"{"node":"x","heartbeat_ms":1000,"services":{}}"#.to_owned(),
    ] {
        client
            .publish("procbroker.hb", bad.into())
            .await
            .expect("publish");
    }
    // One node advertising 1 500 services, then 200 more nodes.
    let many: serde_json::Map<String, serde_json::Value> = (0..1_500)
        .map(|i| (format!("s{i:04}"), serde_json::json!(1)))
        .collect();
    publish(
        &client,
        &serde_json::json!({"node": "wide", "instance": 1, "heartbeat_ms": 60_000, "services": many}),
    )
    .await;
    for i in 0..200u64 {
        publish(
            &client,
            &heartbeat(&format!("n{i:03}"), i + 1, 60_000, false),
        )
        .await;
    }
    client.flush().await.expect("flush");

    let deadline = Instant::now() + Duration::from_secs(10);
    let cluster = loop {
        let stats = stats_json(&admin).await;
        let cluster = stats["cluster"].clone();
        if cluster["nodes_ignored"].as_u64() == Some(151) {
            break cluster;
        }
        assert!(
            Instant::now() < deadline,
            "not bounded: {} nodes, {cluster:.300}",
            cluster["nodes"].as_object().map_or(0, |n| n.len())
        );
        actix::clock::sleep(Duration::from_millis(50)).await;
    };
    // 50 kept (wide and the first 49), 151 ignored.
    let nodes = cluster["nodes"].as_object().expect("nodes");
    assert_eq!(nodes.len(), 50);
    assert!(nodes.contains_key("wide") && nodes.contains_key("n048"));
    assert!(!nodes.contains_key("n049"));
    assert_eq!(
        nodes["wide"]["services"].as_object().map(|s| s.len()),
        Some(1000)
    );
    assert_eq!(cluster["services_ignored"], 500, "{cluster}");
    assert_eq!(cluster["malformed_heartbeats"], 3, "{cluster}");
    let (_, metrics) = get(admin.addr, "/metrics").await;
    for expected in [
        "procbroker_cluster_malformed_heartbeats_total{node=\"a\"} 3",
        "procbroker_cluster_nodes_ignored_total{node=\"a\"} 151",
        "procbroker_cluster_services_ignored_total{node=\"a\"} 500",
        "procbroker_cluster_conflict{node=\"a\"} 0",
    ] {
        assert!(metrics.contains(expected), "{expected} missing");
    }
    let (ok, report) = promtool(&["check", "metrics"], &metrics);
    assert!(ok, "promtool check metrics:\n{report}");
    admin.stop().await;
    a.shutdown().await;
}

#[actix::test]
async fn a_peer_advertising_an_endless_interval_is_still_forgotten() {
    let nats = Nats::start(&[]);
    let a = node_a(cluster_with(
        &nats.url(),
        "a",
        serde_json::json!({"forget_after_ms": 1000}),
    ));
    let client = raw_client(&nats).await;
    heard(&client, "a").await;
    publish(&client, &heartbeat("forever", 1, u64::MAX, false)).await;
    client.flush().await.expect("flush");
    joined_node(&a, "forever").await;
    let reply = call(&a, "svc@forever", "Echo", ()).await;
    assert_eq!(code(&reply), Some(ErrorCode::Unavailable), "{reply:?}");
    let silent = Instant::now();
    let deadline = silent + Duration::from_secs(5);
    loop {
        let listed = a.nodes().await.expect("nodes");
        if !listed.iter().any(|n| n.node == "forever") {
            break;
        }
        assert!(Instant::now() < deadline, "never forgotten: {listed:?}");
        actix::clock::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "a silent node with heartbeat_ms = u64::MAX forgotten {:?} after its heartbeat",
        silent.elapsed()
    );
    let reply = call(&a, "svc@forever", "Echo", ()).await;
    assert_eq!(code(&reply), Some(ErrorCode::UnknownTarget), "{reply:?}");
    a.shutdown().await;
}

// ---------------------------------------------------------------------------
// The request lifecycle across nodes: cancels and partial replies travel
// over NATS; keys and deadlines travel with the request. Node b runs three
// workers of the Rust SDK's conformance subject (`conf`): `Sleep` stops at
// a cancel, `Active` says how many sleep, `LastCancel` what the last cancel
// said, `Count` streams.

/// `[[service]]` of `workers` conformance subjects named `conf`, for a
/// node's `extra`.
fn conformance(workers: u32) -> String {
    format!(
        "\n[[service]]\nname = \"conf\"\ncommand = \"@self\"\nargs = [\"worker\", \"conformance\"]\nworkers = {workers}\n"
    )
}

/// Node `a`, embedded, with `queue_capacity`.
fn node_a_with(cluster: ClusterConfig, queue_capacity: usize) -> BrokerHandle {
    ProcBroker::builder()
        .sysmon_interval(None)
        .request_timeout(Duration::from_secs(10))
        .queue_capacity(queue_capacity)
        .cluster(cluster)
        .start()
}

/// Waits until `a` sees `node` up with `ready` workers of `service`.
async fn serves(a: &BrokerHandle, node: &str, service: &str, ready: u32) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen = a.nodes().await.expect("nodes");
        if seen
            .iter()
            .any(|n| n.node == node && n.up && n.services.get(service) == Some(&ready))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node} never served {ready} {service}: {seen:?}"
        );
        actix::clock::sleep(Duration::from_millis(50)).await;
    }
}

/// Node b (`procbroker run`) with three `conf` workers and its admin
/// endpoint, and node a (embedded, `queue_capacity`) once it sees them.
async fn lifecycle_nodes(nats: &Nats, queue_capacity: usize) -> (Node, SocketAddr, BrokerHandle) {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let b = Node::start_full(
        "b",
        &nats.url(),
        1,
        HEARTBEAT_MS,
        &admin.to_string(),
        &conformance(3),
    );
    let a = node_a_with(cluster(&nats.url(), "a"), queue_capacity);
    serves(&a, "b", "conf", 3).await;
    (b, admin, a)
}

/// Node b's `/stats`.
async fn stats_of(admin: SocketAddr) -> serde_json::Value {
    let (status, body) = get(admin, "/stats").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

/// The value of a call that must succeed.
async fn value_of(
    a: &BrokerHandle,
    target: &str,
    method: &str,
    payload: serde_json::Value,
) -> serde_json::Value {
    let reply = call(a, target, method, payload).await;
    assert_eq!(code(&reply), None, "{target} {method}: {reply:?}");
    reply.payload_as().expect("payload")
}

/// `Sleep` for `ms` at `target`.
fn sleep_at(target: &str, ms: u64) -> Envelope {
    Envelope::request(target, "Sleep", 0)
        .with_payload(&serde_json::json!({"ms": ms}))
        .expect("payload")
}

/// Polls `target`'s `Active` until `sleeping` handlers run there; returns
/// how long that took (at most 5 s, or the test fails).
async fn sleeping_reaches(a: &BrokerHandle, target: &str, sleeping: u64) -> Duration {
    let started = Instant::now();
    loop {
        let now = value_of(a, target, "Active", serde_json::Value::Null).await;
        if now["sleeping"] == sleeping {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{target} still has {now} sleeping, not {sleeping}"
        );
        actix::clock::sleep(Duration::from_millis(5)).await;
    }
}

/// What the last `cancel` that reached a handler of `target` said.
async fn last_cancel(a: &BrokerHandle, target: &str) -> serde_json::Value {
    value_of(a, target, "LastCancel", serde_json::Value::Null).await
}

/// Node b holds no request in flight (its worker slots are free), within 2 s.
async fn nothing_pending_at(admin: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let stats = stats_of(admin).await;
        if stats["total"]["pending"] == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still pending at b: {}",
            stats["total"]
        );
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
}

#[actix::test]
async fn a_request_that_ends_at_the_callers_node_is_cancelled_at_the_workers() {
    let nats = Nats::start(&[]);
    let (_b, b_admin, a) = lifecycle_nodes(&nats, 1000).await;

    // Its deadline passes at a: b's worker is told `timeout` and its slot
    // there is free. (b times it out too, a moment later: whichever is
    // first tells the worker, once; the other's cancel finds it done.)
    let reply = ask(&a, sleep_at("conf.0@b", 10_000).with_timeout_ms(300)).await;
    assert_eq!(code(&reply), Some(ErrorCode::Timeout), "{reply:?}");
    let after_timeout = sleeping_reaches(&a, "conf.0@b", 0).await;
    assert_eq!(last_cancel(&a, "conf.0@b").await["reason"], "timeout");
    nothing_pending_at(b_admin).await;

    // The embedded caller drops its call: `cancelled` reaches b's worker.
    let dropped = tokio::time::timeout(
        Duration::from_millis(300),
        a.call_envelope(sleep_at("conf.1@b", 10_000)),
    )
    .await;
    assert!(dropped.is_err(), "the call cannot have ended: {dropped:?}");
    let after_drop = sleeping_reaches(&a, "conf.1@b", 0).await;
    assert_eq!(last_cancel(&a, "conf.1@b").await["reason"], "cancelled");
    nothing_pending_at(b_admin).await;

    // A child process on a cancels its call (`cancel` to `broker`): the
    // relay's own request is cancelled, so its SDK drops its call out.
    a.spawn(procbroker::config::ServiceConfig::new("relay", BIN).args(["worker", "conformance"]))
        .await
        .expect("relay");
    wait_for_process(&a, "relay.0", |p| {
        p.status == procbroker::protocol::rpc::ProcessStatus::Ready
    })
    .await;
    let relay = |target: &str| {
        Envelope::request("relay.0", "Relay", 0)
            .with_payload(&serde_json::json!({
                "target": target, "method": "Sleep", "payload": {"ms": 10_000}
            }))
            .expect("payload")
    };
    let a2 = a.clone();
    let request = relay("conf.2@b");
    let relayed = actix::spawn(async move { ask(&a2, request).await });
    sleeping_reaches(&a, "conf.2@b", 1).await;
    relayed.abort();
    let after_child = sleeping_reaches(&a, "conf.2@b", 0).await;
    assert_eq!(last_cancel(&a, "conf.2@b").await["reason"], "cancelled");
    assert_eq!(last_cancel(&a, "relay.0").await["reason"], "cancelled");
    nothing_pending_at(b_admin).await;

    // The calling process dies: `caller_exited`.
    let a2 = a.clone();
    let request = relay("conf.0@b");
    let orphaned = actix::spawn(async move { ask(&a2, request).await });
    sleeping_reaches(&a, "conf.0@b", 1).await;
    let pid = wait_for_process(&a, "relay.0", |p| p.pid.is_some())
        .await
        .pid
        .expect("pid");
    kill(pid, nix::sys::signal::Signal::SIGKILL);
    let reply = orphaned.await.expect("task");
    assert_eq!(code(&reply), Some(ErrorCode::WorkerExited), "{reply:?}");
    let after_exit = sleeping_reaches(&a, "conf.0@b", 0).await;
    assert_eq!(last_cancel(&a, "conf.0@b").await["reason"], "caller_exited");
    nothing_pending_at(b_admin).await;

    // Each cancel reached its worker once: none of them found nothing.
    let b = stats_of(b_admin).await;
    assert_eq!(b["cluster"]["nodes"]["a"]["dropped_events"], 0, "{b}");
    assert_eq!(b["cluster"]["dropped_messages"], 0, "{b}");
    assert_eq!(a.stats().await.expect("stats").total.pending, 0);
    eprintln!(
        "cancel seen stopped at b's worker (Active polled every 5 ms): timeout {after_timeout:?}, \
         dropped call {after_drop:?}, child's cancel {after_child:?}, caller killed {after_exit:?}"
    );
    a.shutdown().await;
}

/// The payloads of a streaming call's replies, as `(partial, value)`.
async fn stream_values(
    stream: procbroker::embed::BrokerStream,
) -> Vec<(bool, Result<i64, ErrorCode>, Instant)> {
    use futures_util::StreamExt;
    let collect = stream
        .map(|item| {
            let at = Instant::now();
            match item {
                Ok(reply) => (
                    reply.is_partial(),
                    Ok(reply.into_envelope().payload_as().expect("a number")),
                    at,
                ),
                Err(e @ CallError::Remote { .. }) => {
                    (false, Err(e.broker_code().expect("a broker code")), at)
                }
                Err(e) => panic!("the stream ended with {e}"),
            }
        })
        .collect::<Vec<_>>();
    tokio::time::timeout(Duration::from_secs(10), collect)
        .await
        .expect("the stream ends")
}

#[actix::test]
async fn partial_replies_cross_nodes_in_order_before_the_final_and_a_cut_stream_stops_there() {
    let nats = Nats::start(&[]);
    let (_b, b_admin, a) = lifecycle_nodes(&nats, 1000).await;
    let count = |target: &str, n: u64, delay_ms: u64| {
        Envelope::request(target, "Count", 0)
            .with_payload(&serde_json::json!({"n": n, "delay_ms": delay_ms}))
            .expect("payload")
    };

    // 500 partials as fast as b's worker makes them: all, in order, then
    // the final; nothing after it.
    let replies = stream_values(a.call_stream(count("conf@b", 500, 0))).await;
    let expected: Vec<_> = (0..500)
        .map(|i| (true, Ok(i)))
        .chain([(false, Ok(500))])
        .collect();
    let got: Vec<_> = replies.iter().map(|(p, v, _)| (*p, *v)).collect();
    assert_eq!(got, expected);

    // They stream: the first arrives long before the final.
    let replies = stream_values(a.call_stream(count("conf@b", 8, 100))).await;
    assert_eq!(replies.len(), 9, "{replies:?}");
    let (first, last) = (replies[0].2, replies[8].2);
    assert!(
        last - first >= Duration::from_millis(600),
        "partials held back: {:?}",
        last - first
    );

    // Without `stream`, only the final reply comes.
    let reply = call(&a, "conf@b", "Count", serde_json::json!({"n": 5})).await;
    assert_eq!(reply.payload_as::<i64>().ok(), Some(5), "{reply:?}");
    assert!(!reply.more);

    // A caller that does not read has its stream cut at a (`busy`), and
    // b's worker is told `busy`.
    let slow = node_a_with(cluster(&nats.url(), "slow"), 4);
    serves(&slow, "b", "conf", 3).await;
    let stream = slow.call_stream(count("conf.1@b", 100_000, 2));
    actix::clock::sleep(Duration::from_millis(500)).await;
    let replies = stream_values(stream).await;
    let (cut, partials) = replies.split_last().expect("replies");
    assert_eq!(cut.1, Err(ErrorCode::Busy), "{replies:?}");
    let values: Vec<_> = partials.iter().map(|(p, v, _)| (*p, *v)).collect();
    let in_order: Vec<_> = (0..partials.len() as i64).map(|i| (true, Ok(i))).collect();
    assert_eq!(values, in_order);
    assert!(
        partials.len() <= 5,
        "more than the caller's buffer: {}",
        partials.len()
    );
    sleeping_reaches(&slow, "conf.1@b", 0).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while last_cancel(&slow, "conf.1@b").await["reason"] != "busy" {
        assert!(Instant::now() < deadline, "b's worker was not told busy");
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
    nothing_pending_at(b_admin).await;
    let b = stats_of(b_admin).await;
    assert_eq!(b["per_process"]["conf.0"]["unmatched_replies"], 0, "{b}");
    slow.shutdown().await;
    a.shutdown().await;
}

#[actix::test]
async fn keys_and_deadlines_travel_and_the_serving_node_hashes_over_its_workers() {
    let nats = Nats::start(&[]);
    let (_b, _b_admin, a) = lifecycle_nodes(&nats, 1000).await;
    let _c = Node::start("c", &nats.url(), 1, &conformance(2));
    serves(&a, "c", "conf", 2).await;
    // Who served a keyed `WhoAmI`: `conf.N@node`.
    let who = |target: &str, key: &str| {
        let request = Envelope::request(target, "WhoAmI", 0)
            .with_key(key)
            .expect("a key");
        let a = a.clone();
        async move {
            let reply = ask(&a, request).await;
            assert_eq!(code(&reply), None, "{reply:?}");
            let v: serde_json::Value = reply.payload_as().expect("WhoAmI");
            let node = reply.source.rsplit('@').next().unwrap_or_default();
            format!("{}@{node}", v["id"].as_str().unwrap_or_default())
        }
    };
    let mut on_b = std::collections::BTreeMap::<String, u32>::new();
    let mut by_name = std::collections::BTreeMap::<String, u32>::new();
    for k in 0..24 {
        let key = format!("session-{k}");
        // To b: b hashes the key over its own workers.
        let owner = who("conf@b", &key).await;
        // By plain name (a has no `conf`): a hashes the key over the nodes
        // that serve it, then that node over its workers.
        let anywhere = who("conf", &key).await;
        for _ in 0..3 {
            assert_eq!(who("conf@b", &key).await, owner, "{key} moved on b");
            assert_eq!(who("conf", &key).await, anywhere, "{key} moved");
        }
        if anywhere.ends_with("@b") {
            assert_eq!(anywhere, owner, "{key}: b's worker differs by the route");
        }
        *on_b.entry(owner).or_default() += 1;
        let node = anywhere.rsplit('@').next().unwrap_or_default().to_owned();
        *by_name.entry(node).or_default() += 1;
    }
    assert!(on_b.len() >= 2, "24 keys on one worker of b: {on_b:?}");
    assert!(
        by_name.len() == 2 && by_name.keys().all(|n| n == "b" || n == "c"),
        "24 keys not spread over b and c: {by_name:?}"
    );
    // On a process id the key is ignored.
    assert_eq!(who("conf.2@b", "session-0").await, "conf.2@b");
    // A key that is not a str: refused before it leaves a.
    let mut bad = Envelope::request("conf@b", "WhoAmI", 0);
    bad.key = Some(procbroker::protocol::RequestKey::Invalid(
        Payload::encode(&7).expect("payload"),
    ));
    let reply = ask(&a, bad).await;
    assert_eq!(code(&reply), Some(ErrorCode::BadRequest), "{reply:?}");

    // The deadline travels: the worker at b sees what is left of a's.
    let request = Envelope::request("conf@b", "Deadline", 0).with_timeout_ms(2000);
    let reply = ask(&a, request).await;
    let left: u64 = reply.payload_as().expect("remaining ms");
    assert!((1000..=2000).contains(&left), "{left} ms left at b");
    a.shutdown().await;
}

#[actix::test]
async fn forged_and_malformed_cancels_are_dropped_and_counted() {
    let nats = Nats::start(&[]);
    let (_b, b_admin, a) = lifecycle_nodes(&nats, 1000).await;
    let client = raw_client(&nats).await;
    let stream = a.call_stream(sleep_at("conf.0@b", 10_000));
    let correlation_id = stream.correlation_id();
    sleeping_reaches(&a, "conf.0@b", 1).await;

    let b = stats_of(b_admin).await;
    let subject = format!(
        "procbroker.b.{}.req",
        b["cluster"]["instance"].as_str().expect("b's instance")
    );
    let a_instance = a
        .stats()
        .await
        .expect("stats")
        .cluster
        .expect("cluster")
        .instance;
    let headers = |node: &str, instance: &str| {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Procbroker-Node", node);
        h.insert("Procbroker-Instance", instance);
        h
    };
    let cancel = |source: &str, correlation_id: u64| {
        let mut c = Envelope::cancel_notice(
            "broker",
            correlation_id,
            source,
            procbroker::protocol::CancelReason::Cancelled,
        );
        c.source = source.into();
        c.to_bytes()
    };
    let genuine = cancel("@caller", correlation_id);
    let sends = [
        // No headers.
        (None, genuine.clone()),
        // Another instance of a's name, an unknown node.
        (Some(headers("a", "0000000000000001")), genuine.clone()),
        (Some(headers("c", "00000000000000c1")), genuine.clone()),
        // a's own headers, but no reason; an event that never crosses.
        (
            Some(headers("a", &a_instance)),
            Envelope::cancel_request(correlation_id).to_bytes(),
        ),
        (
            Some(headers("a", &a_instance)),
            Envelope::event("broker", "note").to_bytes(),
        ),
    ];
    for (headers, body) in sends {
        match headers {
            Some(h) => client.publish_with_headers(subject.clone(), h, body).await,
            None => client.publish(subject.clone(), body).await,
        }
        .expect("publish");
    }
    // From a's instance, but for nothing a's callers have in flight there:
    // through to b's Router, which drops them (the node's dropped_events).
    for body in [
        cancel("someone", correlation_id),
        cancel("@caller", correlation_id + 1),
    ] {
        client
            .publish_with_headers(subject.clone(), headers("a", &a_instance), body)
            .await
            .expect("publish");
    }
    client.flush().await.expect("flush");
    let deadline = Instant::now() + Duration::from_secs(5);
    let b = loop {
        let b = stats_of(b_admin).await;
        if b["cluster"]["dropped_messages"] == 5
            && b["cluster"]["nodes"]["a"]["dropped_events"] == 2
        {
            break b;
        }
        assert!(Instant::now() < deadline, "not counted: {}", b["cluster"]);
        actix::clock::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(b["per_process"]["conf.0"]["pending"], 1, "{b}");
    assert_eq!(
        value_of(&a, "conf.0@b", "Active", serde_json::Value::Null).await["sleeping"],
        1,
        "a forged cancel stopped the worker"
    );
    let (_, metrics) = get(b_admin, "/metrics").await;
    assert!(
        metrics.contains("procbroker_cluster_dropped_messages_total{node=\"b\"} 5"),
        "{metrics}"
    );

    // The real one still works.
    drop(stream);
    sleeping_reaches(&a, "conf.0@b", 0).await;
    let last = last_cancel(&a, "conf.0@b").await;
    assert_eq!(
        (&last["reason"], &last["correlation_id"]),
        (
            &serde_json::json!("cancelled"),
            &serde_json::json!(correlation_id)
        )
    );
    nothing_pending_at(b_admin).await;
    a.shutdown().await;
}
