//! Worker recycling with real children: a worker that reaches its
//! service's `recycle.max_requests`, `max_age_ms` or `max_rss_kb` is
//! replaced, one worker
//! of a service at a time (rolling restarts take turns with it), with no
//! caller error while another worker serves; `recycles` counts it (not
//! `restarts`) in `/stats` and `/metrics`, the log says why; limits that
//! would recycle in a loop are refused naming their key.

mod support;

use procbroker::config::file::Loaded;
use procbroker::config::{HealthCheck, Recycle};
use procbroker::embed::{BrokerHandle, ProcBroker};
use procbroker::protocol::rpc::ProcessStatus;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};
use support::*;

/// Watches `ListProcesses` every 2 ms: the most workers of `service` seen
/// not ready at once, and every pid each worker had.
struct Watcher {
    most_out: Rc<Cell<usize>>,
    pids: Rc<RefCell<BTreeMap<String, Vec<u32>>>>,
    running: Rc<Cell<bool>>,
}

fn watch(broker: &BrokerHandle, service: &'static str) -> Watcher {
    let most_out = Rc::new(Cell::new(0));
    let pids = Rc::new(RefCell::new(BTreeMap::<String, Vec<u32>>::new()));
    let running = Rc::new(Cell::new(true));
    let (b, m, p, r) = (
        broker.clone(),
        Rc::clone(&most_out),
        Rc::clone(&pids),
        Rc::clone(&running),
    );
    actix::spawn(async move {
        while r.get() {
            let table = b.processes().await.expect("list");
            let workers: Vec<_> = table.iter().filter(|w| w.service == service).collect();
            let out = workers
                .iter()
                .filter(|w| w.status != ProcessStatus::Ready)
                .count();
            m.set(m.get().max(out));
            for w in workers {
                if let Some(pid) = w.pid {
                    let mut seen = p.borrow_mut();
                    let list = seen.entry(w.id.clone()).or_default();
                    if list.last() != Some(&pid) {
                        list.push(pid);
                    }
                }
            }
            actix::clock::sleep(Duration::from_millis(2)).await;
        }
    });
    Watcher {
        most_out,
        pids,
        running,
    }
}

impl Watcher {
    fn stop(self) -> (usize, BTreeMap<String, Vec<u32>>) {
        self.running.set(false);
        (self.most_out.get(), self.pids.take())
    }
}

async fn stats_until(
    broker: &BrokerHandle,
    what: &str,
    done: impl Fn(&procbroker::protocol::stats::MessageStats) -> bool,
) -> procbroker::protocol::stats::MessageStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = broker.stats().await.expect("stats");
        if done(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "never {what}: {:#?}",
            stats
                .per_process
                .iter()
                .map(|(id, p)| (id, p.status, p.pid, p.faults.recycles, p.faults.restarts))
                .collect::<Vec<_>>()
        );
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
}

fn recycles(stats: &procbroker::protocol::stats::MessageStats, id: &str) -> u64 {
    stats.per_process.get(id).map_or(0, |p| p.faults.recycles)
}

#[actix::test]
async fn workers_at_their_max_age_are_replaced_one_at_a_time_and_no_caller_sees_an_error() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let recycle = Recycle {
        max_age_ms: 1_000,
        ..Recycle::default()
    };
    broker
        .spawn(echo("aged", 2).recycle(recycle))
        .await
        .expect("spawn");
    let watcher = watch(&broker, "aged");
    let callers = load(&broker, "aged", 4);
    // Both workers were ready at the same moment, so both fall due
    // together: one waits for the other. A rolling restart asked for
    // meanwhile takes its turn too.
    actix::clock::sleep(Duration::from_millis(1_500)).await;
    let restarted = broker.restart("aged").await.expect("restart");
    assert_eq!(restarted, ["aged.0", "aged.1"]);
    let stats = stats_until(&broker, "three recycles of each", |s| {
        recycles(s, "aged.0") >= 3 && recycles(s, "aged.1") >= 3
    })
    .await;
    let (ok, errors) = callers.stop().await;
    let (most_out, pids) = watcher.stop();
    eprintln!(
        "max_age_ms 1000, 2 workers, 4 callers: {ok} replies, {} errors, recycles {} + {}, pids {pids:?}",
        errors.len(),
        recycles(&stats, "aged.0"),
        recycles(&stats, "aged.1"),
    );
    assert!(
        errors.is_empty(),
        "{} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    assert!(ok > 100, "{ok} replies");
    assert_eq!(most_out, 1, "never two workers out at once, and one was");
    for id in ["aged.0", "aged.1"] {
        let p = &stats.per_process[id];
        // Recycles and the restart are no crashes.
        assert_eq!(p.faults.restarts, 0, "{id}: {p:?}");
        // Each replacement is a new process: three recycles and a
        // restart, so at least four pids after the first.
        assert!(pids[id].len() >= 5, "{id}: {:?}", pids[id]);
    }
    assert_eq!(stats.total.faults.recycles, {
        recycles(&stats, "aged.0") + recycles(&stats, "aged.1")
    });
    broker.shutdown().await;
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
async fn a_worker_is_due_at_its_max_requests_and_health_checks_are_not_requests() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let recycle = Recycle {
        max_requests: 10,
        ..Recycle::default()
    };
    let health = HealthCheck {
        method: "Ping".into(),
        interval_ms: 20,
        timeout_ms: 1_000,
        failures: 3,
    };
    broker
        .spawn(echo("counted", 1).recycle(recycle).health(health))
        .await
        .expect("spawn");
    let first = pid_of(&broker, "counted.0").await;
    // About 25 health checks: none of them is a request.
    actix::clock::sleep(Duration::from_millis(500)).await;
    for i in 0..9u32 {
        broker.call("counted", "Echo", &i).await.expect("call");
    }
    actix::clock::sleep(Duration::from_millis(200)).await;
    let stats = broker.stats().await.expect("stats");
    assert_eq!(recycles(&stats, "counted.0"), 0, "9 requests of 10");
    assert_eq!(pid_of(&broker, "counted.0").await, first);
    // The tenth reaches the limit (>=); it is answered, then the worker
    // is replaced.
    broker.call("counted", "Echo", &9).await.expect("the tenth");
    let stats = stats_until(&broker, "recycled once and ready", |s| {
        let p = &s.per_process["counted.0"];
        p.faults.recycles == 1 && p.status == ProcessStatus::Ready && p.pid != first
    })
    .await;
    assert_eq!(stats.per_process["counted.0"].faults.restarts, 0);
    let second = pid_of(&broker, "counted.0").await;
    // The new process counts afresh; requests to its id count as well.
    for i in 0..9u32 {
        broker.call("counted.0", "Echo", &i).await.expect("call");
    }
    actix::clock::sleep(Duration::from_millis(200)).await;
    assert_eq!(pid_of(&broker, "counted.0").await, second);
    broker.call("counted.0", "Echo", &9).await.expect("call");
    stats_until(&broker, "recycled twice", |s| {
        let p = &s.per_process["counted.0"];
        p.faults.recycles == 2 && p.status == ProcessStatus::Ready && p.pid != second
    })
    .await;
    broker.shutdown().await;
}

#[actix::test]
async fn a_reconfigured_limit_applies_to_the_workers_the_roll_starts() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    broker.spawn(echo("later", 1)).await.expect("spawn");
    for i in 0..20u32 {
        broker.call("later", "Echo", &i).await.expect("call");
    }
    let recycle = Recycle {
        max_requests: 5,
        ..Recycle::default()
    };
    let restarted = broker
        .reconfigure(echo("later", 1).recycle(recycle))
        .await
        .expect("reconfigure");
    assert_eq!(restarted, ["later.0"]);
    let fresh = pid_of(&broker, "later.0").await;
    // The 20 requests before were the old process's; five to the new one.
    for i in 0..5u32 {
        broker.call("later", "Echo", &i).await.expect("call");
    }
    stats_until(&broker, "recycled at the new limit", |s| {
        let p = &s.per_process["later.0"];
        p.faults.recycles == 1 && p.status == ProcessStatus::Ready && p.pid != fresh
    })
    .await;
    broker.shutdown().await;
}

#[actix::test]
async fn a_busy_service_recycled_by_request_count_serves_every_call() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let recycle = Recycle {
        max_requests: 300,
        ..Recycle::default()
    };
    broker
        .spawn(echo("busy", 2).recycle(recycle))
        .await
        .expect("spawn");
    let watcher = watch(&broker, "busy");
    let callers = load(&broker, "busy", 4);
    let stats = stats_until(&broker, "three recycles of each", |s| {
        recycles(s, "busy.0") >= 3 && recycles(s, "busy.1") >= 3
    })
    .await;
    let (ok, errors) = callers.stop().await;
    let (most_out, pids) = watcher.stop();
    eprintln!(
        "max_requests 300, 2 workers, 4 callers: {ok} replies, {} errors, recycles {} + {}, pids {pids:?}",
        errors.len(),
        recycles(&stats, "busy.0"),
        recycles(&stats, "busy.1"),
    );
    assert!(
        errors.is_empty(),
        "{} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    assert_eq!(most_out, 1, "never two workers out at once, and one was");
    // Each recycle came after at least 300 requests to that worker.
    let served: u64 = stats.total.counters.response_count;
    let recycled = recycles(&stats, "busy.0") + recycles(&stats, "busy.1");
    assert!(
        served >= recycled * 300,
        "{served} replies, {recycled} recycles"
    );
    broker.shutdown().await;
}

#[actix::test]
async fn a_worker_over_its_max_rss_is_replaced_and_its_successor_starts_afresh() {
    let broker = ProcBroker::builder()
        .sysmon_interval(Some(Duration::from_millis(100)))
        .start();
    let recycle = Recycle {
        max_rss_kb: 64 * 1024,
        ..Recycle::default()
    };
    let spawned = broker
        .spawn(chaos("fat").workers(2).recycle(recycle))
        .await
        .expect("spawn");
    let first: Vec<Option<u32>> = spawned.iter().map(|p| p.pid).collect();
    // A fresh Python worker is far below the limit: nobody is recycled.
    actix::clock::sleep(Duration::from_millis(500)).await;
    let stats = broker.stats().await.expect("stats");
    assert_eq!(
        stats.total.faults.recycles, 0,
        "{:?}",
        stats.process_metrics
    );

    // fat.0 grows past 64 MiB.
    let rss: u64 = broker
        .call("fat.0", "Grow", &96)
        .await
        .expect("grow")
        .payload_as()
        .expect("rss");
    assert!(rss >= 96 * 1024, "{rss} kB");
    let stats = stats_until(&broker, "fat.0 recycled and ready", |s| {
        let p = &s.per_process["fat.0"];
        p.faults.recycles == 1 && p.status == ProcessStatus::Ready && p.pid != first[0]
    })
    .await;
    assert_eq!(stats.per_process["fat.0"].faults.restarts, 0);
    // Its neighbour was not touched.
    assert_eq!(recycles(&stats, "fat.1"), 0);
    assert_eq!(stats.per_process["fat.1"].pid, first[1]);
    // The new process is small again and is not recycled at the next
    // samples (the old one's figure does not count against it).
    actix::clock::sleep(Duration::from_millis(600)).await;
    let stats = broker.stats().await.expect("stats");
    assert_eq!(recycles(&stats, "fat.0"), 1, "{:?}", stats.process_metrics);
    let sample = &stats.process_metrics["fat.0"];
    assert!(sample.vmrss.is_some_and(|kb| kb < 64 * 1024), "{sample:?}");
    // The service still answers.
    broker.call("fat", "Echo", &"x").await.expect("echo");
    broker.shutdown().await;
}

#[actix::test]
async fn with_one_worker_the_gap_is_unavailable_and_nothing_else() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let recycle = Recycle {
        max_age_ms: 1_000,
        ..Recycle::default()
    };
    broker
        .spawn(echo("solo", 1).recycle(recycle))
        .await
        .expect("spawn");
    let callers = load(&broker, "solo", 2);
    stats_until(&broker, "two recycles", |s| recycles(s, "solo.0") >= 2).await;
    let (ok, errors) = callers.stop().await;
    eprintln!(
        "one worker, max_age_ms 1000: {ok} replies, {} errors in the gaps",
        errors.len()
    );
    assert!(ok > 100, "{ok}");
    assert!(
        errors.iter().all(|e| e.starts_with("unavailable: ")),
        "{:?}",
        &errors[..errors.len().min(5)]
    );
    broker.shutdown().await;
}

/// Loads a config file of `body`; the error's text.
fn load_error(body: &str) -> String {
    let dir = temp_dir("recycle-config");
    let path = dir.join("procbroker.toml");
    std::fs::write(&path, body).expect("config");
    let e = Loaded::load(Some(&path), std::iter::empty(), &[]).expect_err("refused");
    let _ = std::fs::remove_dir_all(&dir);
    e.to_string()
}

const SERVICE: &str =
    "[[service]]\nname = \"a\"\ncommand = \"@self\"\nargs = [\"worker\", \"echo\"]\n";

#[test]
fn recycle_limits_that_cannot_work_are_refused_naming_their_key() {
    let cases = [
        (
            "recycle = { max_age_ms = -5 }",
            "recycle.max_age_ms: -5 is negative",
        ),
        (
            "recycle = { max_requests = -1 }",
            "recycle.max_requests: -1 is negative",
        ),
        (
            "recycle = { max_rss_kb = -1024 }",
            "recycle.max_rss_kb: -1024 is negative",
        ),
        (
            "recycle = { max_age_ms = \"1h\" }",
            "recycle.max_age_ms: a whole number",
        ),
        (
            "recycle = { max_age_ms = 999 }",
            "service[0].recycle.max_age_ms: 999 would replace each worker more than once a second",
        ),
        (
            "recycle = { max_age_ms = 40000000000 }",
            "service[0].recycle.max_age_ms: 40000000000 is more than a year",
        ),
        (
            "recycle = { max_rss_kb = 100 }",
            "service[0].recycle.max_rss_kb: 100 kB is less than any program needs",
        ),
        ("recycle = { max_age = 5000 }", "unknown field `max_age`"),
        ("balance = \"spread\"", "unknown variant `spread`"),
    ];
    for (line, expected) in cases {
        let e = load_error(&format!("{SERVICE}{line}\n"));
        eprintln!("{line}\n  -> {e}");
        assert!(e.contains(expected), "{line}: {e}");
        // TOML's own errors quote the line they come from.
        assert!(e.contains("recycle") || e.contains("balance"), "{e}");
    }
    // max_rss_kb with memory sampling off would never fire.
    let e = load_error(&format!(
        "[sysmon]\ninterval_ms = 0\n{SERVICE}recycle = {{ max_rss_kb = 100000 }}\n"
    ));
    assert!(
        e.contains("service[0].recycle.max_rss_kb") && e.contains("sysmon.interval_ms = 0"),
        "{e}"
    );
    // The second service is named by its index.
    let e = load_error(&format!(
        "{SERVICE}recycle = {{ max_requests = 1000 }}\n[[service]]\nname = \"b\"\ncommand = \"@self\"\nrecycle = {{ max_age_ms = 10 }}\n"
    ));
    assert!(e.contains("service[1].recycle.max_age_ms"), "{e}");
    // The bounds themselves load.
    let dir = temp_dir("recycle-config-ok");
    let path = dir.join("procbroker.toml");
    std::fs::write(
        &path,
        format!(
            "{SERVICE}balance = \"least_pending\"\nrecycle = {{ max_requests = 1, max_age_ms = 1000, max_rss_kb = 1024 }}\n"
        ),
    )
    .expect("config");
    let loaded = Loaded::load(Some(&path), std::iter::empty(), &[]).expect("loads");
    assert_eq!(
        loaded.file.services[0].recycle,
        Recycle {
            max_requests: 1,
            max_age_ms: 1000,
            max_rss_kb: 1024
        }
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix::test]
async fn spawn_and_reconfigure_refuse_the_same_limits() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let loop_ = Recycle {
        max_age_ms: 10,
        ..Recycle::default()
    };
    let e = broker
        .spawn(echo("e", 1).recycle(loop_))
        .await
        .expect_err("refused");
    assert!(
        e.to_string()
            .contains("recycle.max_age_ms: 10 would replace"),
        "{e}"
    );
    // Sampling is off in this broker: a memory limit would never fire.
    let rss = Recycle {
        max_rss_kb: 100_000,
        ..Recycle::default()
    };
    let e = broker
        .spawn(echo("e", 1).recycle(rss))
        .await
        .expect_err("refused");
    assert!(e.to_string().contains("recycle.max_rss_kb"), "{e}");
    broker.spawn(echo("e", 1)).await.expect("spawn");
    let before = broker.processes().await.expect("list");
    let e = broker
        .reconfigure(echo("e", 1).recycle(loop_))
        .await
        .expect_err("refused");
    assert!(e.to_string().contains("recycle.max_age_ms"), "{e}");
    // Refused before anything was stopped.
    assert_eq!(broker.processes().await.expect("list"), before);
    broker.shutdown().await;
}

#[test]
fn the_daemon_logs_each_recycle_with_its_reason_and_exports_the_counters() {
    let dir = temp_dir("recycle-daemon");
    let config = dir.join("procbroker.toml");
    std::fs::write(
        &config,
        "[admin]\nlisten = \"127.0.0.1:0\"\n[sysmon]\ninterval_ms = 0\n\
         [[service]]\nname = \"old\"\ncommand = \"@self\"\nargs = [\"worker\", \"echo\"]\nworkers = 2\n\
         recycle = { max_age_ms = 1000 }\n",
    )
    .expect("config");
    let mut daemon = Daemon::start(&config, &[]);
    let admin = daemon.admin();
    let line = daemon.wait_for("recycling the worker", Duration::from_secs(10));
    assert_eq!(line["fields"]["reason"], "max_age", "{line}");
    assert_eq!(line["fields"]["limit"], 1000, "{line}");
    assert!(
        message(&line).contains("recycle.max_age_ms = 1000"),
        "{line}"
    );
    let process = line["fields"]["process"].as_str().expect("process");
    assert!(process.starts_with("old."), "{line}");
    // Both workers, one after the other.
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let (status, body) = http_get(&admin, "/stats");
        assert_eq!(status, 200);
        let stats: serde_json::Value = serde_json::from_str(&body).expect("stats");
        let n = |id: &str| stats["per_process"][id]["recycles"].as_u64().unwrap_or(0);
        if n("old.0") >= 1 && n("old.1") >= 1 {
            break stats;
        }
        assert!(Instant::now() < deadline, "{stats}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for key in ["recycles", "cancels", "partial_replies"] {
        assert!(stats["total"][key].is_u64(), "total lacks {key}: {stats}");
        assert!(
            stats["per_process"]["old.0"][key].is_u64(),
            "old.0 lacks {key}"
        );
    }
    assert_eq!(stats["per_process"]["old.0"]["restarts"], 0, "{stats}");
    let (status, metrics) = http_get(&admin, "/metrics");
    assert_eq!(status, 200);
    let value = |name: &str, process: &str| -> Option<u64> {
        let prefix = format!("procbroker_{name}{{process=\"{process}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.parse().ok())
    };
    for id in ["old.0", "old.1"] {
        assert!(
            value("recycles_total", id).is_some_and(|n| n >= 1),
            "{id}:\n{metrics}"
        );
        assert_eq!(value("cancels_total", id), Some(0), "{metrics}");
        assert_eq!(value("partial_replies_total", id), Some(0), "{metrics}");
        assert_eq!(value("restarts_total", id), Some(0), "{metrics}");
    }
    let (ok, text) = promtool(&["check", "metrics"], &metrics);
    assert!(ok, "{text}");
    // `procbroker stats` shows the column.
    let out = std::process::Command::new(BIN)
        .args(["stats", "--admin", &admin])
        .output()
        .expect("procbroker stats");
    let table = String::from_utf8_lossy(&out.stdout);
    let header = table
        .lines()
        .find(|l| l.starts_with("PROCESS"))
        .expect("header");
    let column = header
        .split_whitespace()
        .position(|c| c == "RCY")
        .expect("RCY column");
    let row = table
        .lines()
        .find(|l| l.starts_with("old.0"))
        .expect("old.0 row");
    let shown: u64 = row
        .split_whitespace()
        .nth(column)
        .and_then(|v| v.parse().ok())
        .expect("a number under RCY");
    assert!(shown >= 1, "{table}");
    assert!(daemon.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}
