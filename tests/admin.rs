//! Admin HTTP: /health, /ready, /stats and a /metrics page
//! that `promtool check metrics` accepts; the dashboard page and its
//! `/events` stream; latency quantiles over a window that follows a change
//! of load; the example alert rules pass `promtool check rules`.

mod support;

use procbroker::actors::messages::SampleNow;
use procbroker::admin::Admin;
use procbroker::config::BrokerConfig;
use procbroker::embed::ProcBroker;
use procbroker::service::Methods;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[actix::test]
async fn admin_endpoints_serve_stats_readiness_and_valid_prometheus_text() {
    let broker = ProcBroker::builder().start();
    broker.spawn(echo("echo", 2)).await.expect("echo");
    for i in 0..10u32 {
        broker.call("echo", "Echo", &i).await.expect("call");
    }
    let _ = broker.call("echo", "Echo", &"x").await;
    broker.sysmon().send(SampleNow).await.expect("sample");
    let any = "127.0.0.1:0".parse().expect("addr");

    let admin =
        Admin::start(broker.clone(), any, vec!["echo".into(), "late".into()]).expect("admin");
    assert_ne!(admin.addr.port(), 0, "the real port is reported");
    let addr = admin.addr;
    assert_eq!(get(addr, "/health").await, (200, "ok\n".into()));
    let (status, body) = get(addr, "/ready").await;
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(ready["ready_workers"]["echo"], 2);
    assert_eq!(ready["ready_workers"]["late"], 0);

    let (status, body) = get(addr, "/stats").await;
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(stats["latency_us"]["echo"]["count"], 11);
    assert_eq!(stats["per_process"]["echo.1"]["status"], "ready");

    let (status, metrics) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for expected in [
        "procbroker_request_latency_seconds{service=\"echo\",quantile=\"0.99\"}",
        "procbroker_request_latency_seconds_count{service=\"echo\"} 11",
        "procbroker_responses_total{process=\"echo.0\"}",
        "procbroker_process_up{process=\"echo.1\"} 1",
        "procbroker_process_resident_memory_bytes{process=\"broker\"}",
        "procbroker_process_threads{process=\"echo.0\"}",
        "procbroker_restarts_total{process=\"echo.0\"} 0",
    ] {
        assert!(metrics.contains(expected), "{expected} missing:\n{metrics}");
    }
    let (ok, report) = promtool(&["check", "metrics"], &metrics);
    assert!(ok, "promtool check metrics:\n{report}\n{metrics}");
    admin.stop().await;

    let admin = Admin::start(broker.clone(), any, vec!["echo".into()]).expect("admin");
    let (status, body) = get(admin.addr, "/ready").await;
    assert_eq!(status, 200, "{body}");
    admin.stop().await;
    broker.shutdown().await;
}

#[test]
fn the_example_alert_rules_are_valid() {
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/alerts.yml");
    let (ok, report) = promtool(&["check", "rules", rules.to_str().expect("utf-8")], "");
    assert!(ok, "{report}");
    assert!(report.contains("8 rules"), "{report}");
}

/// Reads server-sent events from `/events` for `period`: the response head
/// and the JSON of every `data:` line, until EOF or the period ends.
async fn read_events(
    addr: std::net::SocketAddr,
    period: Duration,
) -> (String, Vec<serde_json::Value>, bool) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET /events HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut lines = BufReader::new(stream).lines();
    let mut head = String::new();
    let mut events = Vec::new();
    let until = Instant::now() + period;
    let mut ended = false;
    let mut in_head = true;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, lines.next_line()).await {
            Err(_) => break,
            Ok(Ok(Some(line))) => {
                if in_head {
                    in_head = !line.is_empty();
                    head.push_str(&line);
                    head.push('\n');
                } else if let Some(json) = line.strip_prefix("data: ") {
                    events.push(serde_json::from_str(json).expect("each event is JSON"));
                }
            }
            Ok(_) => {
                ended = true;
                break;
            }
        }
    }
    (head, events, ended)
}

#[actix::test]
async fn the_dashboard_is_served_and_events_stream_stats_every_second() {
    let broker = ProcBroker::builder().start();
    broker.spawn(echo("echo", 2)).await.expect("echo");
    broker.call("echo", "Echo", &1u32).await.expect("call");
    let any = "127.0.0.1:0".parse().expect("addr");
    let admin = Admin::start(broker.clone(), any, vec!["echo".into()]).expect("admin");
    let addr = admin.addr;

    let (status, page) = get(addr, "/").await;
    assert_eq!(status, 200);
    assert!(
        page.starts_with("<!doctype html>"),
        "{}",
        &page[..80.min(page.len())]
    );
    assert!(
        page.contains("new EventSource(\"/events\")"),
        "the page reads /events"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no CDN"
    );

    let (head, events, ended) = read_events(addr, Duration::from_secs(3)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    assert!(!ended, "the stream stays open");
    assert!(events.len() >= 2, "{} events in 3 s", events.len());
    for event in &events {
        assert_eq!(event["per_process"]["echo.1"]["status"], "ready");
        assert_eq!(event["per_process"]["echo.1"]["service"], "echo");
        assert!(event["latency_window_us"]["echo"].is_object(), "{event}");
        assert_eq!(event["total"]["broker_errors"]["timeout"], 0);
    }

    // An open stream does not hold up the server's stop: it ends.
    let watcher = actix::spawn(read_events(addr, Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    admin.stop().await;
    let (_, _, ended) = watcher.await.expect("reader");
    assert!(ended, "the stream ended when the server stopped");
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        stopping.elapsed()
    );
    broker.shutdown().await;
}

#[actix::test]
async fn windowed_quantiles_follow_a_change_of_load() {
    // A 2 s window: six slots of 333 ms. Wide, so that slow calls on a
    // loaded machine all land in it, and slow ones (100 ms) stand far
    // from fast ones (< 50 ms even when the machine stalls a thread).
    let config = BrokerConfig {
        latency_window: Duration::from_secs(2),
        sysmon_interval: None,
        ..BrokerConfig::default()
    };
    let broker = ProcBroker::builder().config(config).start();
    let methods = Methods::new().method("Wait", |ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(ms)
    });
    broker.add_service("wait", 1, methods).await.expect("add");
    for _ in 0..5 {
        broker
            .call("wait", "Wait", &100u64)
            .await
            .expect("slow call");
    }
    let stats = broker.stats().await.expect("stats");
    assert_eq!(stats.latency_window_us["wait"].count, 5);
    assert!(stats.latency_window_us["wait"].p99 >= 100_000, "{stats:?}");

    // The slow calls age out of the window (a window and two slots later);
    // only the fast ones are left.
    tokio::time::sleep(Duration::from_millis(2700)).await;
    for _ in 0..50 {
        broker.call("wait", "Wait", &0u64).await.expect("fast call");
    }
    let stats = broker.stats().await.expect("stats");
    let window = stats.latency_window_us["wait"];
    let since_start = stats.latency_us["wait"];
    assert_eq!(window.count, 50, "{window:?}");
    assert!(window.p99 < 50_000, "{window:?}");
    assert_eq!(since_start.count, 55);
    assert!(since_start.p99 >= 100_000, "{since_start:?}");

    // /metrics quantiles are the window's; count and sum since start.
    let any = "127.0.0.1:0".parse().expect("addr");
    let admin = Admin::start(broker.clone(), any, vec![]).expect("admin");
    let (_, metrics) = get(admin.addr, "/metrics").await;
    let p99: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "procbroker_request_latency_seconds{service=\"wait\",quantile=\"0.99\"} ",
            )
        })
        .expect("p99 line")
        .parse()
        .expect("a number");
    assert!(p99 < 0.050, "window p99 {p99} s:\n{metrics}");
    assert!(
        metrics.contains("procbroker_request_latency_seconds_count{service=\"wait\"} 55"),
        "{metrics}"
    );
    assert!(
        metrics.contains("procbroker_broker_errors_total{code=\"timeout\"} 0"),
        "{metrics}"
    );
    let (ok, report) = promtool(&["check", "metrics"], &metrics);
    assert!(ok, "promtool check metrics:\n{report}");

    // Once the window is empty the quantiles are NaN (no samples), and
    // promtool still accepts the page.
    tokio::time::sleep(Duration::from_millis(2700)).await;
    let (_, metrics) = get(admin.addr, "/metrics").await;
    assert!(
        metrics
            .contains("procbroker_request_latency_seconds{service=\"wait\",quantile=\"0.99\"} NaN"),
        "{metrics}"
    );
    let (ok, report) = promtool(&["check", "metrics"], &metrics);
    assert!(ok, "promtool check metrics:\n{report}");
    admin.stop().await;
    broker.shutdown().await;
}

#[actix::test]
async fn broker_errors_are_counted_by_code() {
    let broker = ProcBroker::builder().start();
    let unknown = broker.call("nowhere", "Echo", &1u32).await;
    assert!(unknown.is_err());
    let stats = broker.stats().await.expect("stats");
    assert_eq!(stats.total.broker_errors["unknown_target"], 1);
    assert_eq!(stats.total.broker_errors["timeout"], 0);
    assert_eq!(
        stats.total.broker_errors.len(),
        procbroker::protocol::ErrorCode::ALL.len(),
        "every code is listed"
    );
    assert_eq!(stats.total.broker_errors["cancelled"], 0);
    broker.shutdown().await;
}

#[actix::test]
async fn stats_watch_redraws_every_second_with_rates() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    broker.spawn(echo("echo", 1)).await.expect("echo");
    let any = "127.0.0.1:0".parse().expect("addr");
    let admin = Admin::start(broker.clone(), any, vec![]).expect("admin");
    let mut watch = tokio::process::Command::new(BIN)
        .args(["stats", "--watch", "--admin", &admin.addr.to_string()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("procbroker stats --watch");
    // Traffic while it watches: 2.6 s, so at least three screens.
    let until = Instant::now() + Duration::from_millis(2600);
    let mut calls = 0u32;
    while Instant::now() < until {
        broker.call("echo", "Echo", &calls).await.expect("call");
        calls += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    watch.start_kill().expect("stop the watcher");
    let out = watch.wait_with_output().await.expect("its output");
    let text = String::from_utf8_lossy(&out.stdout);
    let screens: Vec<&str> = text.split("\x1b[H\x1b[2J").skip(1).collect();
    assert!(screens.len() >= 2, "{} screens:\n{text}", screens.len());
    // From the second screen on, the echo worker has a message rate.
    let last = screens[screens.len() - 1];
    let row = last
        .lines()
        .find(|l| l.starts_with("echo.0"))
        .unwrap_or_else(|| panic!("no echo.0 row:\n{last}"));
    let rate: f64 = row
        .split_whitespace()
        .last()
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no MSG/S figure: {row}"));
    assert!(rate > 0.0, "{row}");
    assert!(
        last.contains("WINDOW µs") && last.contains("Ctrl-C"),
        "{last}"
    );
    admin.stop().await;
    broker.shutdown().await;
}

#[actix::test]
async fn events_keep_flowing_when_the_admin_value_is_dropped_without_stop() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let any = "127.0.0.1:0".parse().expect("addr");
    let admin = Admin::start(broker.clone(), any, vec![]).expect("admin");
    let addr = admin.addr;
    // Dropping the value does not stop the server (only `stop` does), so
    // its event streams must not end either.
    drop(admin);
    let (head, events, ended) = read_events(addr, Duration::from_millis(2500)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!ended, "the stream ended without a stop");
    assert!(events.len() >= 2, "{} events in 2.5 s", events.len());
    broker.shutdown().await;
}
