//! Admin HTTP (DESIGN 6.4): /health, /ready, /stats and a /metrics page that
//! `promtool check metrics` accepts; the example alert rules pass
//! `promtool check rules`.

mod support;

use procbroker::actors::messages::SampleNow;
use procbroker::admin::Admin;
use procbroker::embed::ProcBroker;
use support::*;

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
    assert!(report.contains("7 rules"), "{report}");
}
