//! Shared by the subprocess tests: real children, loopback only, bounded.
#![allow(dead_code)]

use procbroker::config::ServiceConfig;
use procbroker::embed::BrokerHandle;
use procbroker::protocol::rpc::{ProcessInfo, ProcessStatus, RestartPolicy};
use std::time::{Duration, Instant};

/// The `procbroker` binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_procbroker");

pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// `workers` children of the built-in Rust echo worker (the SDK).
pub fn echo(name: &str, workers: u32) -> ServiceConfig {
    ServiceConfig::new(name, BIN)
        .args(["worker", "echo"])
        .workers(workers)
}

/// The benchmark client (a Rust SDK service that calls others).
pub fn bench_client(name: &str) -> ServiceConfig {
    ServiceConfig::new(name, BIN).args(["worker", "bench-client"])
}

/// Asks the bench client service `client` to make `calls` calls of 64 B to
/// `echo` with `concurrency` in flight; returns its report.
pub async fn run_client(
    broker: &BrokerHandle,
    calls: u64,
    concurrency: u64,
) -> procbroker::loadgen::RunReport {
    let spec = procbroker::loadgen::RunSpec {
        target: "echo".into(),
        method: "Echo".into(),
        calls,
        concurrency,
        payload_bytes: 64,
    };
    broker
        .call("client", "Run", &spec)
        .await
        .expect("run")
        .payload_as()
        .expect("report")
}

/// The misbehaving Python worker of tests/python/chaos_worker.py.
pub fn chaos(name: &str) -> ServiceConfig {
    ServiceConfig::new(name, python()).args([format!(
        "{}/tests/python/chaos_worker.py",
        env!("CARGO_MANIFEST_DIR")
    )])
}

/// Restarts after 10 ms, at most `max` times.
pub fn quick_restarts(max: i64) -> RestartPolicy {
    RestartPolicy {
        max_restarts: max,
        backoff_initial_ms: 10,
        backoff_max_ms: 40,
        ..RestartPolicy::default()
    }
}

/// Polls `ListProcesses` until `id` satisfies `done` (or panics after 10 s).
pub async fn wait_for_process(
    broker: &BrokerHandle,
    id: &str,
    done: impl Fn(&ProcessInfo) -> bool,
) -> ProcessInfo {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let table = broker.processes().await.expect("ListProcesses");
        if let Some(p) = table.iter().find(|p| p.id == id)
            && done(p)
        {
            return p.clone();
        }
        assert!(Instant::now() < deadline, "{id} never got there: {table:?}");
        actix::clock::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn ready_again(broker: &BrokerHandle, id: &str, restarts: u32) -> ProcessInfo {
    wait_for_process(broker, id, |p| {
        p.status == ProcessStatus::Ready && p.restarts >= restarts
    })
    .await
}

/// Sends a signal to a child.
pub fn kill(pid: u32, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    nix::sys::signal::kill(pid, signal).expect("kill");
}

/// The process is gone and reaped (no `/proc` entry: not even a zombie).
pub fn reaped(pid: u32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The process is dead: gone, or a zombie waiting for its reaper (in a
/// container, init may never reap an orphan; it is dead all the same).
pub fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// Resident memory of this process (the broker), in kB.
pub fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// One HTTP/1.1 GET to a loopback server; returns (status code, body).
pub async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("answer within 10 s")
    .expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Runs `promtool ARGS` with `input` on stdin; panics (never skips) if
/// promtool is missing: `scripts/test` installs it.
pub fn promtool(args: &[&str], input: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool is required (Debian package prometheus; scripts/test installs it): {e}"
            )
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `procbroker ARGS` (a `bench … --json`): its one JSON object, after
/// checking it exited 0.
pub fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(BIN)
        .args(args)
        .output()
        .expect("procbroker bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// Runs `tests/python/dashboard.py ARGS` (headless Chromium) for at most
/// 120 s; its JSON report on success, else a panic with its stderr.
pub async fn browser_check(args: &[String]) -> serde_json::Value {
    let script = format!("{}/tests/python/dashboard.py", env!("CARGO_MANIFEST_DIR"));
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(python())
            .arg(&script)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser check ends within 120 s")
    .expect("python3 with selenium runs (scripts/test installs it)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "browser check failed:\n{stderr}");
    serde_json::from_slice(&output.stdout).expect("report")
}

/// Which roles of a bench `cpu_us_per_call` are processes of their own
/// (broker, client, workers): a number ≥ 0 there, null where the role runs
/// inside another process; anything else fails.
pub fn cpu_roles(cpu: &serde_json::Value) -> [bool; 3] {
    ["broker", "client", "workers"].map(|r| match &cpu[r] {
        serde_json::Value::Null => false,
        n => n.as_f64().is_some_and(|v| v >= 0.0) || panic!("{r}: {n}"),
    })
}

/// A bench `--json` with `--baseline`: the baseline ran and the ratio is
/// there.
pub fn assert_baseline_measured(v: &serde_json::Value) {
    assert!(
        v["baseline"]["throughput_rps"]
            .as_f64()
            .is_some_and(|r| r > 0.0),
        "{v}"
    );
    assert!(v["ratio_p50"].as_f64().is_some_and(|r| r > 0.0), "{v}");
}

/// A `procbroker run --config FILE` of the real binary, its log (JSON
/// lines) read by a thread; killed (SIGKILL) if still running when dropped.
pub struct Daemon {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
    /// Every log line read so far.
    pub log: Vec<serde_json::Value>,
    /// Bytes of log read so far.
    pub log_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// The `message` field of a JSON log line.
pub fn message(v: &serde_json::Value) -> String {
    v["fields"]["message"].as_str().unwrap_or("").to_owned()
}

impl Daemon {
    /// Starts `procbroker run --config config` with `env` set.
    pub fn start(config: &std::path::Path, env: &[(&str, &str)]) -> Self {
        use std::io::BufRead;
        let mut command = std::process::Command::new(BIN);
        command
            .args(["run", "--config"])
            .arg(config)
            .env("LOG_FORMAT", "json")
            .env("LOG_LEVEL", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("procbroker run");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        let log_bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = std::sync::Arc::clone(&log_bytes);
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(stderr);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        counted.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                        let v = serde_json::from_str(&line).unwrap_or_else(
                            |_| serde_json::json!({"fields": {"message": line.trim_end()}}),
                        );
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Self {
            child,
            lines,
            log: Vec::new(),
            log_bytes,
        }
    }

    /// Reads log lines until one whose message contains `text` (within
    /// `within`); returns it.
    pub fn wait_for(&mut self, text: &str, within: Duration) -> serde_json::Value {
        if let Some(v) = self.log.iter().find(|v| message(v).contains(text)) {
            return v.clone();
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.log.push(v.clone());
                    if message(&v).contains(text) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "no log line with {text:?} within {within:?}; log: {:#?}",
                    self.log.iter().map(message).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Takes in the log lines that came so far (waiting up to `for_`).
    pub fn drain(&mut self, for_: Duration) {
        let deadline = Instant::now() + for_;
        while let Ok(v) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.log.push(v);
        }
    }

    /// The admin address it logged.
    pub fn admin(&mut self) -> String {
        self.wait_for("admin HTTP listening", Duration::from_secs(15))["fields"]["addr"]
            .as_str()
            .expect("addr")
            .to_owned()
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"))
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), signal).expect("signal the broker");
    }

    /// SIGTERM, then waits (10 s at most) for its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                self.drain(Duration::from_secs(2));
                return status;
            }
            assert!(Instant::now() < deadline, "the broker did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A fresh temporary folder for one test.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("procbroker-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A plain blocking HTTP GET on loopback: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("response");
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// Callers that keep `n` requests in flight to `service`; count replies
/// and errors (`code: message`) until stopped.
pub struct Load {
    ok: std::rc::Rc<std::cell::Cell<u64>>,
    errors: std::rc::Rc<std::cell::RefCell<Vec<String>>>,
    running: std::rc::Rc<std::cell::Cell<bool>>,
}

pub fn load(broker: &BrokerHandle, service: &'static str, n: usize) -> Load {
    let ok = std::rc::Rc::new(std::cell::Cell::new(0));
    let errors = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let running = std::rc::Rc::new(std::cell::Cell::new(true));
    for _ in 0..n {
        let (broker, ok, errors, running) = (
            broker.clone(),
            std::rc::Rc::clone(&ok),
            std::rc::Rc::clone(&errors),
            std::rc::Rc::clone(&running),
        );
        actix::spawn(async move {
            while running.get() {
                match broker.call(service, "Echo", &"x").await {
                    Ok(_) => ok.set(ok.get() + 1),
                    Err(e) => errors
                        .borrow_mut()
                        .push(format!("{}: {e}", e.code().unwrap_or("-"))),
                }
            }
        });
    }
    Load {
        ok,
        errors,
        running,
    }
}

impl Load {
    pub async fn stop(self) -> (u64, Vec<String>) {
        self.running.set(false);
        // Each caller finishes the call it has in flight.
        actix::clock::sleep(Duration::from_millis(200)).await;
        (self.ok.get(), self.errors.take())
    }
}
