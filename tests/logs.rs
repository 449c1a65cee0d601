//! Children's logs with real child processes: each process's ring of its
//! last stderr lines across restarts, `GET /logs/{process}` (`?n=`,
//! `?follow=1`), cut lines, the `[logs] dir` files with rotation and
//! SIGUSR1, the broker's own log kept to `broker_log_lines_per_s`, a
//! flooding child (memory, log volume, `/health`), `procbroker logs`, and
//! the dashboard's live tail in a real browser.

mod support;

use procbroker::admin::Admin;
use procbroker::config::ServiceConfig;
use procbroker::embed::{BrokerHandle, ProcBroker};
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A child that writes `lines` to stderr, then serves as the echo worker.
fn chatty(name: &str, script: &str) -> ServiceConfig {
    ServiceConfig::new(name, "/bin/sh")
        .args(["-c".to_owned(), format!("{script}\nexec {BIN} worker echo")])
        .restart(quick_restarts(-1))
}

async fn broker_with_admin() -> (BrokerHandle, Admin) {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let any = "127.0.0.1:0".parse().expect("addr");
    let admin = Admin::start(broker.clone(), any, vec![]).expect("admin");
    (broker, admin)
}

/// Polls `/logs/{id}` until its body satisfies `done` (10 s at most).
async fn logs_until(admin: &Admin, path: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(admin.addr, path).await;
        if status == 200 && done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{path}: {status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The text after the time of each stored line.
fn texts(body: &str) -> Vec<&str> {
    body.lines()
        .map(|l| l.split_once(' ').map_or("", |(_, t)| t))
        .collect()
}

#[actix::test]
async fn the_ring_keeps_lines_across_restarts_and_says_why() {
    let (broker, admin) = broker_with_admin().await;
    let spawned = broker
        .spawn(chatty(
            "talk",
            "echo \"hello from $$\" >&2; echo second >&2",
        ))
        .await
        .expect("spawn");
    let first_pid = spawned[0].pid.expect("pid");
    let body = logs_until(&admin, "/logs/talk.0", |b| b.contains("second")).await;
    assert_eq!(
        texts(&body),
        [format!("hello from {first_pid}").as_str(), "second"]
    );
    // Every line: an RFC 3339 time, a space, the line.
    for line in body.lines() {
        let (time, _) = line.split_once(' ').expect("time and line");
        humantime::parse_rfc3339(time).unwrap_or_else(|e| panic!("{time}: {e}"));
    }

    kill(first_pid, nix::sys::signal::Signal::SIGKILL);
    let again = ready_again(&broker, "talk.0", 1).await;
    let second_pid = again.pid.expect("pid");
    let body = logs_until(&admin, "/logs/talk.0", |b| b.matches("second").count() == 2).await;
    let lines = texts(&body);
    assert_eq!(lines.len(), 5, "{body}");
    assert_eq!(
        lines[..2],
        [format!("hello from {first_pid}").as_str(), "second"]
    );
    assert_eq!(
        lines[2],
        format!(
            "procbroker: talk.0 restarted (pid {second_pid}); the previous run killed by SIGKILL"
        )
    );
    assert_eq!(
        lines[3..],
        [format!("hello from {second_pid}").as_str(), "second"]
    );

    // ?n= gives the newest, in time order; a bad n is 400; unknown is 404.
    let (status, newest) = get(admin.addr, "/logs/talk.0?n=2").await;
    assert_eq!((status, texts(&newest)), (200, vec![lines[3], "second"]));
    assert_eq!(
        get(admin.addr, "/logs/talk.0?n=0").await,
        (200, String::new())
    );
    assert_eq!(get(admin.addr, "/logs/talk.0?n=lots").await.0, 400);
    assert_eq!(get(admin.addr, "/logs/talk.0?follow=yes").await.0, 400);
    assert_eq!(get(admin.addr, "/logs/nobody.0").await.0, 404);
    assert_eq!(get(admin.addr, "/logs/nobody.0?follow=1").await.0, 404);

    admin.stop().await;
    broker.shutdown().await;
}

#[actix::test]
async fn follow_replays_the_newest_n_then_streams_each_new_line() {
    let (broker, admin) = broker_with_admin().await;
    // One line now, then one every 100 ms.
    broker
        .spawn(chatty(
            "tick",
            "echo one >&2; echo two >&2; echo three >&2; \
             (i=0; while true; do i=$((i+1)); echo \"tick $i\" >&2; sleep 0.1; done) &",
        ))
        .await
        .expect("spawn");
    logs_until(&admin, "/logs/tick.0", |b| b.contains("tick 1")).await;

    let mut stream = tokio::net::TcpStream::connect(admin.addr)
        .await
        .expect("connect");
    let request = format!(
        "GET /logs/tick.0?follow=1&n=2 HTTP/1.1\r\nHost: {}\r\n\r\n",
        admin.addr
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut seen = String::new();
    let mut buf = vec![0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(10);
    // Ticks after the replay, each as its own `data:` event.
    while seen.matches("data: ").count() < 6 {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, stream.read(&mut buf))
            .await
            .expect("events within 10 s")
            .expect("read");
        assert!(n > 0, "stream closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("text/event-stream"), "{seen}");
    let events: Vec<&str> = seen
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|l| l.split_once(' ').map_or("", |(_, t)| t))
        .collect();
    // The replay: the newest 2 lines at the time, then live ticks in order.
    let live = seen.find(": live").expect("the replay ends with `: live`");
    let replayed = seen[..live].matches("data: ").count();
    assert_eq!(replayed, 2, "{seen}");
    let numbers: Vec<u64> = events
        .iter()
        .filter_map(|t| t.strip_prefix("tick ")?.parse().ok())
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "in order, none missed: {events:?}"
    );
    drop(stream);

    admin.stop().await;
    broker.shutdown().await;
}

#[actix::test]
async fn a_10_mb_line_without_newline_is_cut_and_costs_no_memory() {
    let (broker, admin) = broker_with_admin().await;
    let before = rss_kb();
    broker
        .spawn(chatty(
            "huge",
            "head -c 10000000 /dev/zero | tr '\\0' x >&2; echo >&2; echo after >&2",
        ))
        .await
        .expect("spawn");
    let body = logs_until(&admin, "/logs/huge.0", |b| b.contains("after")).await;
    let lines = texts(&body);
    let cut = format!("{}{}", "x".repeat(16 * 1024), procbroker::pipe::CUT_MARK);
    assert_eq!(lines, [cut.as_str(), "after"]);
    let grown = rss_kb().saturating_sub(before);
    eprintln!("10 MB line: broker RSS grew {grown} kB");
    assert!(grown < 20 * 1024, "RSS grew {grown} kB for a cut line");
    admin.stop().await;
    broker.shutdown().await;
}

/// A config file for `procbroker run` with an admin port of its own.
fn write_config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("procbroker.toml");
    std::fs::write(
        &path,
        format!("[admin]\nlisten = \"127.0.0.1:0\"\n[sysmon]\ninterval_ms = 0\n{body}"),
    )
    .expect("config");
    path
}

/// Lines of the broker's log that are `process`'s stderr lines, and the
/// sum of its "N lines suppressed" counts.
fn child_lines(log: &[serde_json::Value], process: &str) -> (u64, u64) {
    let mine = log
        .iter()
        .filter(|v| v["target"] == "procbroker::child" && v["fields"]["process"] == process);
    let (mut lines, mut suppressed) = (0, 0);
    for v in mine {
        match v["fields"]["suppressed"].as_u64() {
            Some(n) => suppressed += n,
            None => lines += 1,
        }
    }
    (lines, suppressed)
}

#[test]
fn every_line_reaches_the_files_and_the_broker_log_gets_its_share() {
    let dir = temp_dir("logs-files");
    let config = write_config(
        &dir,
        &format!(
            "[logs]\ndir = \"logs\"\nmax_bytes = 1048576\nkeep = 20\nbroker_log_lines_per_s = 50\n\
             [[service]]\nname = \"burst\"\ncommand = \"/bin/sh\"\n\
             args = [\"-c\", \"seq 1 100000 >&2; exec {BIN} worker echo\"]\n"
        ),
    );
    let mut broker = Daemon::start(&config, &[]);
    broker.wait_for("procbroker running", Duration::from_secs(15));
    // Every line in the files, in order, across the rotated ones.
    let logs = dir.join("logs");
    let read_all = || {
        let mut text = String::new();
        for n in (1..=20).rev() {
            text.push_str(
                &std::fs::read_to_string(logs.join(format!("burst.0.log.{n}"))).unwrap_or_default(),
            );
        }
        text.push_str(&std::fs::read_to_string(logs.join("burst.0.log")).unwrap_or_default());
        text
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !read_all().contains(" 100000\n") {
        assert!(Instant::now() < deadline, "the files never got line 100000");
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = read_all();
    let numbers: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split_once(' ')?.1.parse().ok())
        .collect();
    assert_eq!(
        numbers,
        (1..=100_000).collect::<Vec<u64>>(),
        "every line, once, in order"
    );
    let files = std::fs::read_dir(&logs).expect("dir").count();
    assert!(files >= 3, "rotated at 1 MiB: {files} files");
    for entry in std::fs::read_dir(&logs).expect("dir").flatten() {
        let len = entry.metadata().expect("meta").len();
        assert!(len <= 1_048_576, "{entry:?}: {len} bytes");
    }
    // The broker's own log: at most 50 a second, the rest counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        broker.drain(Duration::from_millis(200));
        let (lines, suppressed) = child_lines(&broker.log, "burst.0");
        if lines + suppressed == 100_000 {
            eprintln!("broker log: {lines} lines of the child, {suppressed} suppressed");
            assert!(lines <= 150, "{lines} lines in the broker's log");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{lines} logged + {suppressed} suppressed"
        );
    }
    // The ring has the newest 1000.
    let addr = broker.admin();
    let (_, body) = http_get(&addr, "/logs/burst.0");
    assert_eq!(body.lines().count(), 1000);
    assert!(body.ends_with(" 100000\n"), "{}", &body[body.len() - 40..]);

    // External rotation: move the file away, SIGUSR1, new lines go to a
    // new file by the same name.
    std::fs::rename(logs.join("burst.0.log"), logs.join("moved.log")).expect("mv");
    broker.signal(nix::sys::signal::Signal::SIGUSR1);
    broker.wait_for("log files reopened", Duration::from_secs(5));
    assert!(logs.join("burst.0.log").exists(), "reopened by name");
    assert!(broker.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_log_dir_that_cannot_be_made_fails_the_start_naming_the_key() {
    let dir = temp_dir("logs-baddir");
    std::fs::write(dir.join("file"), "not a directory").expect("file");
    let config = write_config(&dir, "[logs]\ndir = \"file/logs\"\n");
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("logs.dir") && stderr.contains("file/logs"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_log_dir_broken_later_is_said_once_and_the_ring_goes_on() {
    let dir = temp_dir("logs-broken");
    let config = write_config(
        &dir,
        &format!(
            "[logs]\ndir = \"logs\"\n[[service]]\nname = \"tick\"\ncommand = \"/bin/sh\"\n\
             args = [\"-c\", \"(i=0; while true; do i=$((i+1)); echo tick $i >&2; sleep 0.05; done) & exec {BIN} worker echo\"]\n"
        ),
    );
    let mut broker = Daemon::start(&config, &[]);
    let addr = broker.admin();
    broker.wait_for("procbroker running", Duration::from_secs(15));
    let logs = dir.join("logs");
    std::thread::sleep(Duration::from_millis(300));
    // The directory replaced by a file: no file can be opened there.
    std::fs::remove_dir_all(&logs).expect("rm");
    std::fs::write(&logs, "in the way").expect("file");
    for _ in 0..3 {
        broker.signal(nix::sys::signal::Signal::SIGUSR1);
        std::thread::sleep(Duration::from_millis(300));
    }
    broker.wait_for("cannot write the log file", Duration::from_secs(5));
    let (_, before) = http_get(&addr, "/logs/tick.0?n=1");
    std::thread::sleep(Duration::from_millis(400));
    let (_, after) = http_get(&addr, "/logs/tick.0?n=1");
    assert_ne!(before, after, "the ring keeps getting lines");
    broker.drain(Duration::from_millis(300));
    let said = broker
        .log
        .iter()
        .filter(|v| message(v).contains("cannot write the log file"))
        .count();
    assert_eq!(said, 1, "said once");
    assert!(broker.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigusr1_without_a_log_dir_changes_nothing() {
    let dir = temp_dir("logs-usr1");
    let config = write_config(
        &dir,
        "[[service]]\nname = \"echo\"\ncommand = \"@self\"\nargs = [\"worker\", \"echo\"]\n",
    );
    let mut broker = Daemon::start(&config, &[]);
    let addr = broker.admin();
    broker.wait_for("procbroker running", Duration::from_secs(15));
    broker.signal(nix::sys::signal::Signal::SIGUSR1);
    broker.wait_for("no [logs] dir is configured", Duration::from_secs(5));
    assert_eq!(http_get(&addr, "/health").0, 200, "still running");
    assert!(broker.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// VmRSS of `pid`, in kB.
fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_child_flooding_stderr_costs_bounded_memory_and_log_and_health_answers() {
    let dir = temp_dir("logs-flood");
    let config = write_config(
        &dir,
        &format!(
            "[logs]\ndir = \"logs\"\nmax_bytes = 4194304\nkeep = 2\n\
             [[service]]\nname = \"flood\"\ncommand = \"/bin/sh\"\n\
             args = [\"-c\", \"yes 'a line of a child that writes stderr without end, as fast as it can' >&2 & exec {BIN} worker echo\"]\n"
        ),
    );
    let mut broker = Daemon::start(&config, &[]);
    let addr = broker.admin();
    broker.wait_for("procbroker running", Duration::from_secs(15));
    let pid = broker.child.id();
    let log_before = broker.log_bytes.load(std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let (mut worst, mut max_rss, mut checks) = (Duration::ZERO, 0u64, 0u32);
    while started.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        assert_eq!(http_get(&addr, "/health").0, 200);
        worst = worst.max(t.elapsed());
        checks += 1;
        max_rss = max_rss.max(rss_of(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    let seconds = started.elapsed().as_secs_f64();
    let log_bytes = broker.log_bytes.load(std::sync::atomic::Ordering::Relaxed) - log_before;
    // How much the child got through: the files (rotated at 4 MiB).
    let (_, ring) = http_get(&addr, "/logs/flood.0?n=1");
    assert!(
        ring.contains("without end"),
        "the ring has the latest: {ring}"
    );
    broker.drain(Duration::from_millis(100));
    let (logged, suppressed) = child_lines(&broker.log, "flood.0");
    eprintln!(
        "stderr flood for {seconds:.1} s: broker log {log_bytes} bytes ({:.0} B/s), \
         {logged} child lines + {suppressed} counted as suppressed; broker RSS max {max_rss} kB; \
         /health worst {:.1} ms over {checks} checks",
        log_bytes as f64 / seconds,
        worst.as_secs_f64() * 1000.0
    );
    assert!(worst < Duration::from_secs(1), "/health took {worst:?}");
    assert!(max_rss < 200 * 1024, "broker RSS {max_rss} kB");
    // 100 lines a second of ~200 bytes of JSON each, and a suppressed line a
    // second: well under 100 kB a second.
    assert!(
        (log_bytes as f64) / seconds < 100_000.0,
        "{log_bytes} bytes of broker log"
    );
    assert!(
        suppressed > 10_000,
        "the flood really flooded: {suppressed}"
    );
    assert!(broker.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn procbroker_logs_shows_a_process_or_a_service_merged_and_follows() {
    let dir = temp_dir("logs-cli");
    let config = write_config(
        &dir,
        &format!(
            "[[service]]\nname = \"pair\"\nworkers = 2\ncommand = \"/bin/sh\"\n\
             args = [\"-c\", \"echo start $PROCBROKER_PROCESS_ID >&2; sleep 0.2; echo later $PROCBROKER_PROCESS_ID >&2; \
             (while true; do sleep 0.2; echo tick $PROCBROKER_PROCESS_ID >&2; done) & exec {BIN} worker echo\"]\n"
        ),
    );
    let mut broker = Daemon::start(&config, &[]);
    let addr = broker.admin();
    broker.wait_for("procbroker running", Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(400));
    let logs = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .arg("logs")
            .args(args)
            .args(["--admin", &addr])
            .output()
            .expect("procbroker logs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A process: its lines as stored.
    let (ok, out, err) = logs(&["pair.1", "-n", "2"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.lines().all(|l| !l.starts_with("pair.")),
        "no prefix for a process: {out}"
    );
    // A service: both workers, merged in time order, each line prefixed.
    let (ok, out, err) = logs(&["pair", "-n", "6"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    let times: Vec<&str> = lines
        .iter()
        .map(|l| l.split(' ').nth(1).unwrap_or(""))
        .collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "in time order: {out}");
    for l in &lines {
        let (id, rest) = l.split_once(' ').expect("prefixed");
        assert!(rest.ends_with(id), "{l}");
    }
    let (ok, all, _) = logs(&["pair"]);
    assert!(
        ok && all.contains("pair.0 ") && all.contains("pair.1 "),
        "{all}"
    );
    assert!(
        all.contains("start pair.0") && all.contains("start pair.1"),
        "{all}"
    );
    let (ok, _, err) = logs(&["nothing"]);
    assert!(
        !ok && err.contains("no process or service \"nothing\""),
        "{err}"
    );

    // -f: the newest lines, then new ones as they come.
    let mut follow = std::process::Command::new(BIN)
        .args(["logs", "pair", "-n", "1", "-f", "--admin", &addr])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("logs -f");
    let stdout = follow.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(got.iter().any(|l: &String| l.starts_with("pair.0 "))
        && got.iter().any(|l| l.starts_with("pair.1 "))
        && got.len() >= 5)
    {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => got.push(line),
            Err(_) => panic!("logs -f printed {got:?}"),
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        got[1..].iter().all(|l| l.contains(" tick pair.")),
        "{got:?}"
    );
    assert!(broker.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix::test]
async fn the_dashboard_shows_a_process_tail_live_when_its_row_is_clicked() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    broker
        .spawn(chatty(
            "ticker",
            "(i=0; while true; do i=$((i+1)); echo \"tick $i\" >&2; sleep 0.2; done) &",
        ))
        .await
        .expect("spawn");
    let any = "127.0.0.1:0".parse().expect("addr");
    let admin = Admin::start(broker.clone(), any, vec!["ticker".into()]).expect("admin");
    let target = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| format!("{}/target", env!("CARGO_MANIFEST_DIR")));
    let screenshot = format!("{target}/dashboard-logs.png");
    let report = browser_check(&[
        "--logs".into(),
        format!("http://{}/", admin.addr),
        "ticker.0".into(),
        screenshot.clone(),
    ])
    .await;
    assert_eq!(report["process"], "ticker.0");
    assert!(
        report["later"].as_u64() > report["first"].as_u64(),
        "{report}"
    );
    let png = std::fs::read(&screenshot).expect("screenshot saved");
    assert!(png.starts_with(b"\x89PNG"));
    admin.stop().await;
    broker.shutdown().await;
}
