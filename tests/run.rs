//! `procbroker run`, the real binary: SIGTERM under load, and during start-up. Every
//! request in flight is answered (its reply, or `shutting_down`), the
//! children get `shutdown` and EOF and are reaped, and the exit status is 0.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;

const BIN: &str = env!("CARGO_BIN_EXE_procbroker");

/// `procbroker run --config CONFIG` with JSON logs at info; its log lines
/// arrive on the receiver as they are written (lines that are not JSON are
/// printed and skipped).
fn run_json(
    config: &std::path::Path,
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<serde_json::Value>,
) {
    let mut broker = Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env("LOG_FORMAT", "json")
        .env("LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("procbroker run");
    let stderr = broker.stderr.take().expect("stderr");
    let (lines_tx, lines) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            match serde_json::from_str(&line) {
                Ok(v) => {
                    let _ = lines_tx.send(v);
                }
                Err(_) => eprintln!("not JSON: {line}"),
            }
        }
    });
    (broker, lines)
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

#[test]
fn sigterm_under_load_answers_everything_and_reaps_every_child() {
    // Requests sent just before the `shutdown` event were the ones lost:
    // several runs at 64 in flight, each must answer every request.
    for run in 0..3 {
        sigterm_under_load(run, 64);
    }
}

fn sigterm_under_load(run: u32, in_flight: u32) {
    let dir = std::env::temp_dir().join(format!("procbroker-run-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("procbroker.toml");
    let load = format!("{}/tests/python/load_worker.py", env!("CARGO_MANIFEST_DIR"));
    std::fs::write(
        &config,
        format!(
            r#"
[admin]
listen = ""

[sysmon]
interval_ms = 0

[[service]]
name = "echo"
command = "@self"
args = ["worker", "echo"]
workers = 2

[[service]]
name = "load"
command = "{}"
args = ["{}"]
env = {{ LOAD_IN_FLIGHT = "{}" }}
"#,
            python(),
            load,
            in_flight
        ),
    )
    .expect("config");
    let (mut broker, lines) = run_json(&config);
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let message = |v: &serde_json::Value| v["fields"]["message"].as_str().unwrap_or("").to_owned();
    // Running, then let the load work for a while.
    while !log
        .iter()
        .any(|v| message(v).contains("procbroker running"))
    {
        let v = lines
            .recv_timeout(deadline - Instant::now())
            .expect("broker never ran");
        log.push(v);
    }
    std::thread::sleep(Duration::from_millis(700));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(broker.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = loop {
        if let Some(status) = broker.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "broker did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Its stderr closes when it exits: read to the end.
    while let Ok(v) = lines.recv_timeout(Duration::from_secs(10)) {
        log.push(v);
    }
    assert!(status.success(), "exit status {status:?}");

    let pids: Vec<u64> = log
        .iter()
        .filter(|v| message(v) == "child started")
        .filter_map(|v| v["fields"]["pid"].as_u64())
        .collect();
    assert_eq!(pids.len(), 3, "{log:?}");
    for pid in &pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "child {pid} survived"
        );
    }
    let tally = log
        .iter()
        .map(&message)
        .find(|m| m.starts_with("tally "))
        .unwrap_or_else(|| panic!("no tally from the load worker: {log:?}"));
    let field = |name: &str| -> u64 {
        tally
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {tally}"))
    };
    eprintln!("run {run}, {in_flight} in flight: {tally}");
    assert!(field("ok") > 100, "{tally}");
    assert_eq!(field("unanswered"), 0, "{tally}");
    assert_eq!(field("sent"), field("answered"), "{tally}");
    assert_eq!(field("other"), 0, "{tally}");
    let stopped = log
        .iter()
        .find(|v| message(v) == "procbroker stopped")
        .expect("stop report");
    assert_eq!(stopped["fields"]["drained"], true);
    assert_eq!(stopped["fields"]["stopped"], 3);
}

/// A stop signal during start-up (a worker slow to send `ready`) cancels
/// the start: what was started is stopped and the broker exits within
/// `kill_timeout_ms`, saying so, for SIGTERM and SIGINT alike.
#[test]
fn a_stop_signal_during_start_up_cancels_the_start() {
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        stop_during_start_up(signal);
    }
}

fn stop_during_start_up(signal: nix::sys::signal::Signal) {
    let dir = std::env::temp_dir().join(format!(
        "procbroker-slow-start-{}-{signal}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("procbroker.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[broker]
kill_timeout_ms = 2000

[admin]
listen = ""

[sysmon]
interval_ms = 0

[[service]]
name = "fast"
command = "@self"
args = ["worker", "echo"]

[[service]]
name = "slow"
command = "/bin/sh"
args = ["-c", "sleep 30; exec {BIN} worker echo"]
ready_timeout_ms = 600000
"#
        ),
    )
    .expect("config");
    let (mut broker, lines) = run_json(&config);
    let message = |v: &serde_json::Value| v["fields"]["message"].as_str().unwrap_or("").to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut log = Vec::new();
    // Both services' children are running; the slow one is not ready.
    while log.iter().filter(|v| message(v) == "child started").count() < 2 {
        log.push(
            lines
                .recv_timeout(deadline - Instant::now())
                .expect("children never started"),
        );
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(broker.id()).expect("pid"));
    let sent = Instant::now();
    nix::sys::signal::kill(pid, signal).expect("signal");
    let status = loop {
        if let Some(status) = broker.try_wait().expect("wait") {
            break status;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "{signal} during start-up was ignored"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = sent.elapsed();
    while let Ok(v) = lines.recv_timeout(Duration::from_secs(10)) {
        log.push(v);
    }
    eprintln!("{signal} during start-up: exited after {took:?}");
    assert!(status.success(), "exit status {status:?}");
    // Within kill_timeout_ms (2 s), with a margin for a loaded machine.
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(
        log.iter()
            .any(|v| message(v).contains("stop signal during start-up")),
        "{log:?}"
    );
    let pids: Vec<u64> = log
        .iter()
        .filter(|v| message(v) == "child started")
        .filter_map(|v| v["fields"]["pid"].as_u64())
        .collect();
    for pid in &pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "child {pid} survived"
        );
    }
}

/// SIGHUP to settings that make the program crash: the roll stops at the
/// first new worker and says so, the other worker keeps serving; a service
/// removed by the same reload leaves `/ready`, `/stats` and `/metrics`.
#[test]
fn a_reload_that_cannot_start_stops_its_roll_and_a_removed_service_leaves_ready() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("procbroker-run-roll-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let program = dir.join("api.sh");
    std::fs::write(
        &program,
        format!("#!/bin/sh\n[ -n \"$CRASH\" ] && exit 7\nexec {BIN} worker echo\n"),
    )
    .expect("script");
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let config = dir.join("procbroker.toml");
    let write = |crash: bool, with_b: bool| {
        let env = if crash { "{ CRASH = \"1\" }" } else { "{}" };
        // [cluster] cannot change while running: said, not silently ignored.
        let cluster = if crash {
            "[cluster]\nheartbeat_ms = 2000\n"
        } else {
            ""
        };
        let b = if with_b {
            "[[service]]\nname = \"b\"\ncommand = \"@self\"\nargs = [\"worker\", \"echo\"]\n"
        } else {
            ""
        };
        std::fs::write(
            &config,
            format!(
                "[admin]\nlisten = \"127.0.0.1:0\"\n[sysmon]\ninterval_ms = 0\n{cluster}\
                 [[service]]\nname = \"api\"\ncommand = \"{}\"\nworkers = 2\nenv = {env}\n\
                 restart = {{ backoff_initial_ms = 50, backoff_max_ms = 200 }}\n{b}",
                program.display()
            ),
        )
        .expect("config");
    };
    write(false, true);
    let (mut broker, lines) = run_json(&config);
    let message = |v: &serde_json::Value| v["fields"]["message"].as_str().unwrap_or("").to_owned();
    let wait_for = |text: &str| -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let v = lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("no log line with {text:?}"));
            if message(&v).contains(text) {
                return v;
            }
        }
    };
    let addr = wait_for("admin HTTP listening")["fields"]["addr"]
        .as_str()
        .expect("addr")
        .to_owned();
    wait_for("procbroker running");
    assert_eq!(support::http_get(&addr, "/ready").0, 200);

    write(true, false);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(broker.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    wait_for("[cluster] changed");
    let stopped = wait_for("rolling restart with the new settings stopped");
    let error = stopped["fields"]["error"].as_str().unwrap_or("").to_owned();
    assert!(
        error.contains("api.0") && error.contains("status 7"),
        "{stopped}"
    );
    assert!(error.contains("api.1"), "{stopped}");

    // api.1 still serves the old settings; b is gone from every surface.
    let (status, body) = support::http_get(&addr, "/ready");
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("\"b\""), "{body}");
    let (_, stats) = support::http_get(&addr, "/stats");
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats");
    assert_eq!(stats["per_process"]["api.1"]["status"], "ready", "{stats}");
    assert!(stats["per_process"].get("b.0").is_none(), "{stats}");
    let (_, metrics) = support::http_get(&addr, "/metrics");
    assert!(!metrics.contains("process=\"b.0\""), "{metrics}");

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    assert!(broker.wait().expect("wait").success());
}
