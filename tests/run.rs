//! `procbroker run`, the real binary: SIGTERM under load (DESIGN 5.6). Every
//! request in flight is answered (its reply, or `shutting_down`), the
//! children get `shutdown` and EOF and are reaped, and the exit status is 0.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_procbroker");

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
    let mut broker = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
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
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = lines_tx.send(v);
            } else {
                eprintln!("not JSON: {line}");
            }
        }
    });
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
