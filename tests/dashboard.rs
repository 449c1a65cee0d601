//! The dashboard in a real browser: four echo worker processes
//! under traffic, the page opened in headless Chromium through WebDriver
//! (`tests/python/dashboard.py`, Selenium with Debian's chromium-driver).
//! The page must show every worker with its real pid, change its numbers
//! without a reload, show a killed worker's new pid and restart count, and
//! leave the console free of errors. The screenshot lands in
//! `target/dashboard.png`.

mod support;

use procbroker::actors::messages::SampleNow;
use procbroker::admin::Admin;
use procbroker::config::BrokerConfig;
use procbroker::embed::ProcBroker;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;
use support::*;

#[actix::test]
async fn the_dashboard_shows_live_processes_in_a_real_browser() {
    let config = BrokerConfig {
        // Fresh RSS and thread figures on the page within a second.
        sysmon_interval: Some(Duration::from_secs(1)),
        ..BrokerConfig::default()
    };
    let broker = ProcBroker::builder().config(config).start();
    let spawned = broker.spawn(echo("echo", 4)).await.expect("echo");
    broker.sysmon().send(SampleNow).await.expect("sample");
    let pids: BTreeMap<String, u32> = spawned
        .iter()
        .map(|p| (p.id.clone(), p.pid.expect("a subprocess has a pid")))
        .collect();
    assert_eq!(pids.len(), 4);
    let any = "127.0.0.1:0".parse().expect("addr");
    let admin = Admin::start(broker.clone(), any, vec!["echo".into()]).expect("admin");

    // Traffic for as long as the browser looks: a call at a time, with a
    // pause, so the numbers move and the machine stays usable.
    let running = Rc::new(Cell::new(true));
    let traffic = {
        let (broker, running) = (broker.clone(), Rc::clone(&running));
        actix::spawn(async move {
            let mut calls = 0u64;
            while running.get() {
                // A killed worker fails the calls in flight to it: expected.
                let _ = broker.call("echo", "Echo", &calls).await;
                calls += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            calls
        })
    };

    let screenshot = format!("{}/dashboard.png", target_dir());
    let url = format!("http://{}/", admin.addr);
    let pids_json = serde_json::to_string(&pids).expect("json");
    let report = browser_check(&[url, pids_json, screenshot.clone()]).await;
    running.set(false);
    let calls = traffic.await.expect("traffic");
    assert!(calls > 0);

    // What the page showed is what the broker knows.
    let victim = report["killed"].as_str().expect("killed id");
    let info = ready_again(&broker, victim, 1).await;
    assert_eq!(info.pid.map(u64::from), report["new_pid"].as_u64());
    assert_ne!(report["new_pid"], report["old_pid"]);
    let png = std::fs::read(&screenshot).expect("screenshot saved");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");

    admin.stop().await;
    broker.shutdown().await;
}

/// `target/` of this build (tests run with the package root as cwd).
fn target_dir() -> String {
    std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| format!("{}/target", env!("CARGO_MANIFEST_DIR")))
}
