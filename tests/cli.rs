//! The `procbroker` binary's protocol tools, run as real processes.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use support::dead;

mod support;

fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_procbroker"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn procbroker");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

#[test]
fn encode_then_decode_gives_the_envelopes_back() {
    let lines = concat!(
        r#"{"type":"request","id":"Echo","correlation_id":18446744073709551615,"target":"echo","timeout_ms":5,"payload":{"a":[1,-2,2.5,null,"x"]}}"#,
        "\n\n",
        r#"{"type":"error","id":"Echo","correlation_id":3,"target":"client.0","code":"busy","error":"full","source":"broker"}"#,
        "\n",
        r#"{"type":"event","id":"ready","target":"broker"}"#,
        "\n",
    );
    let frames = run(&["encode"], lines.as_bytes());
    assert!(
        frames.status.success(),
        "{}",
        String::from_utf8_lossy(&frames.stderr)
    );
    let decoded = run(&["decode"], &frames.stdout);
    assert!(
        decoded.status.success(),
        "{}",
        String::from_utf8_lossy(&decoded.stderr)
    );
    let got: Vec<serde_json::Value> = String::from_utf8(decoded.stdout)
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let want: Vec<serde_json::Value> = lines
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn decode_reports_bad_frames_and_goes_on_then_fails_on_a_broken_stream() {
    let mut stream = vec![0, 0, 0, 1, 0xc1]; // not MessagePack
    let good = run(&["encode"], br#"{"type":"event","id":"tick","target":"*"}"#);
    stream.extend_from_slice(&good.stdout);
    stream.extend_from_slice(b"hello\n"); // a stray print: "hell" as a length
    let out = run(&["decode"], &stream);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].contains("\"invalid\":\"not MessagePack"),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains("\"id\":\"tick\""), "{}", lines[1]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("frame length 1751477356 exceeds the limit"),
        "{stderr}"
    );
}

#[test]
fn encode_rejects_an_invalid_envelope_naming_the_line() {
    let out = run(
        &["encode"],
        b"{\"type\":\"event\",\"id\":\"a\",\"target\":\"b\"}\n{\"type\":\"request\",\"id\":\"Echo\"}\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(
        stderr.contains("missing required field \"target\""),
        "{stderr}"
    );
    // The valid first line was written before the failure.
    assert_eq!(&out.stdout[..4], &[0, 0, 0, (out.stdout.len() - 4) as u8]);
}

#[test]
fn bench_prints_the_designed_json_for_every_mode() {
    for (mode, baseline, worker) in [
        ("relay", true, "echo"),
        ("direct", true, "echo"),
        ("inproc", true, "echo"),
        ("direct", false, "echo"),
        ("relay", false, "rpc-echo"),
        ("direct", true, "rpc-echo"),
        // Its baseline is a Python client calling neovim directly.
        ("direct", true, "nvim"),
    ] {
        let mut args = vec![
            "bench",
            "--mode",
            mode,
            "--worker",
            worker,
            "--workers",
            "2",
            "--concurrency",
            "4",
            "--requests",
            "300",
            "--json",
        ];
        if baseline {
            args.push("--baseline");
        }
        let v = support::bench_json(&args);
        let mut keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "baseline",
                "concurrency",
                "cpu_us_per_call",
                "cpus",
                "elapsed_s",
                "error_codes",
                "errors",
                "latency_us",
                "mode",
                "payload_bytes",
                "pin",
                "placement",
                "ratio_p50",
                "requests",
                "throughput_rps",
                "worker",
                "workers"
            ]
        );
        assert_eq!(
            (
                v["mode"].as_str(),
                v["worker"].as_str(),
                v["requests"].as_u64(),
                v["errors"].as_u64()
            ),
            (Some(mode), Some(worker), Some(300), Some(0))
        );
        assert!(
            v["latency_us"]["p50"].as_f64().is_some_and(|p| p > 0.0),
            "{v}"
        );
        // CPU per call, per process of the run: a number where the role is
        // a process of its own, null where it runs inside another.
        let roles = support::cpu_roles;
        let expected = match mode {
            "relay" => [true, true, true],
            "direct" => [true, false, true],
            _ => [true, false, false],
        };
        assert_eq!(roles(&v["cpu_us_per_call"]), expected, "{v}");
        if baseline {
            let raw = match (mode, worker) {
                ("relay", _) => [true, true, true],
                ("direct", "nvim") => [false, true, true],
                _ => [true, false, false],
            };
            assert_eq!(roles(&v["baseline"]["cpu_us_per_call"]), raw, "{v}");
            support::assert_baseline_measured(&v);
        } else {
            assert!(v["baseline"].is_null() && v["ratio_p50"].is_null(), "{v}");
        }
    }
}

#[test]
fn run_refuses_a_bad_config_naming_key_and_file() {
    let dir = std::env::temp_dir().join(format!("procbroker-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("typo.toml");
    std::fs::write(&path, "[broker]\nqueue_capcity = 5\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_procbroker"))
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("typo.toml") && err.contains("queue_capcity") && err.contains("line 2"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn run_with_the_admin_address_in_use_says_so_in_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let out = Command::new(env!("CARGO_BIN_EXE_procbroker"))
        .args(["run", "--set", &format!("admin.listen={addr}")])
        .env("LOG_LEVEL", "error")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(&format!("admin.listen = {addr}"))
            && lines[0].contains("Address already in use"),
        "{err}"
    );
}

/// The CPUs this test may use, as the kernel says.
fn allowed_cpus() -> Vec<String> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("affinity");
    (0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .map(|c| c.to_string())
        .collect()
}

#[test]
fn bench_pins_children_where_pin_says() {
    let allowed = allowed_cpus();
    for pin in ["same", "spread"] {
        let out = Command::new(env!("CARGO_BIN_EXE_procbroker"))
            .args([
                "bench",
                "--mode",
                "relay",
                "--workers",
                "2",
                "--requests",
                "200",
                "--pin",
                pin,
                "--json",
            ])
            .output()
            .expect("bench");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        let broker = v["placement"]["broker"].as_str().expect("broker mask");
        let children: Vec<&str> = v["placement"]["children"]
            .as_array()
            .expect("children")
            .iter()
            .map(|c| c.as_str().expect("mask"))
            .collect();
        // Two echo workers and the client, each as the kernel reports it.
        assert_eq!(children.len(), 3, "{v}");
        assert_eq!(
            broker, allowed[0],
            "{pin}: the broker on the first allowed CPU"
        );
        let expected = if pin == "spread" && allowed.len() > 1 {
            allowed[1..].join(",")
        } else {
            allowed[0].clone()
        };
        for child in children {
            assert_eq!(child, expected, "{pin}: {v}");
        }
    }
}

/// Writes `envelope` as one frame to the child's stdin and hands the stdin
/// back (dropping it is the child's EOF).
fn write_envelope(
    child: &mut std::process::Child,
    envelope: &procbroker::protocol::Envelope,
) -> std::process::ChildStdin {
    use tokio_util::codec::Encoder;
    let mut frame = bytes::BytesMut::new();
    procbroker::protocol::EnvelopeCodec::default()
        .encode(envelope, &mut frame)
        .expect("encode");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&frame).expect("write");
    stdin
}

#[test]
fn an_sdk_service_exits_at_eof_even_while_a_handler_waits_on_calls() {
    use procbroker::protocol::Envelope;
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_procbroker"))
        .args(["worker", "bench-client"])
        .env("PROCBROKER_PROCESS_ID", "client.0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("bench-client");
    // A Run that would make a million calls to `echo`, which nobody answers:
    // its handler always waits on calls.
    let spec = procbroker::loadgen::RunSpec {
        target: "echo".into(),
        method: "Echo".into(),
        calls: 1_000_000,
        concurrency: 8,
        payload_bytes: 8,
    };
    let request = Envelope::request("client.0", "Run", 1)
        .with_source("@caller")
        .with_payload(&spec)
        .expect("payload");
    let stdin = write_envelope(&mut child, &request);
    // The parent stays alive reading its stdout (as a live broker would).
    let mut stdout = child.stdout.take().expect("stdout");
    let (seen_tx, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
            let _ = seen_tx.send(total);
        }
    });
    // Its calls went out: the handler is waiting on them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.recv_timeout(Duration::from_secs(5)).expect("output") < 200 {
        assert!(Instant::now() < deadline, "no calls went out");
    }
    drop(stdin); // EOF: "exit now".
    let eof = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if eof.elapsed() > Duration::from_secs(1) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running 1 s after EOF");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}");
    eprintln!("exited {:?} after EOF", eof.elapsed());
}

/// mimalloc's default madvises its arena for transparent huge pages; on a
/// host with THP in `madvise` mode every process then faults in and zeroes
/// whole 2 MiB pages (an idle echo worker: 13.6 MiB RSS instead of 8). The
/// binary builds mimalloc without that advice: no mapping of a built-in
/// worker that has served a call carries the `hg` (huge-page advised) flag.
#[test]
fn a_built_in_worker_asks_for_no_transparent_huge_pages() {
    use procbroker::protocol::{Envelope, EnvelopeCodec};
    use std::io::Read;
    use tokio_util::codec::Decoder;
    let mut child = Command::new(env!("CARGO_BIN_EXE_procbroker"))
        .args(["worker", "echo"])
        .env("PROCBROKER_PROCESS_ID", "echo.0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("echo worker");
    let request = Envelope::request("echo.0", "Echo", 1).with_source("client.0");
    let stdin = write_envelope(&mut child, &request);
    // Its reply: the serve loop, its runtime and its buffers are all up.
    // Read on a thread, so a worker that never answers fails the test
    // instead of hanging it.
    let mut stdout = child.stdout.take().expect("stdout");
    let (chunks_tx, chunks) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || chunks_tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut read = bytes::BytesMut::new();
    // (After its `ready` event.)
    let reply = loop {
        match EnvelopeCodec::default().decode(&mut read).expect("decode") {
            Some(envelope) if envelope.as_ref().is_ok_and(|e| e.correlation_id == 0) => {}
            Some(envelope) => break envelope.expect("an envelope"),
            None => read.extend_from_slice(
                &chunks
                    .recv_timeout(Duration::from_secs(10))
                    .expect("the worker's reply within 10 s"),
            ),
        }
    };
    assert_eq!(reply.kind, procbroker::protocol::MessageType::Response);
    assert_eq!(reply.correlation_id, 1);
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", child.id())).expect("smaps");
    drop(stdin);
    let _ = child.wait();
    let advised: Vec<&str> = smaps
        .lines()
        .filter(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "hg"))
        .collect();
    assert!(
        advised.is_empty(),
        "huge-page advised mappings: {advised:?}"
    );
    assert!(smaps.contains("VmFlags:"), "no VmFlags in smaps");
}

/// Pids of the processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command may hold spaces and parentheses: fields follow the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn bench_stops_at_once_on_ctrl_c_says_what_it_measured_and_reaps_its_children() {
    for (mode, signal, code) in [
        ("relay", nix::sys::signal::Signal::SIGINT, 130),
        ("direct", nix::sys::signal::Signal::SIGTERM, 143),
    ] {
        let child = Command::new(env!("CARGO_BIN_EXE_procbroker"))
            .args([
                "bench",
                "--mode",
                mode,
                "--workers",
                "2",
                "--concurrency",
                "8",
                "--requests",
                "100000000",
            ])
            .env("LOG_LEVEL", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bench");
        let pid = child.id();
        // Running: its children are up and calls go through.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut children = Vec::new();
        while children.len() < 2 {
            assert!(Instant::now() < deadline, "{mode}: no children");
            std::thread::sleep(Duration::from_millis(50));
            children = children_of(pid);
        }
        std::thread::sleep(Duration::from_millis(700));
        let sent = Instant::now();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).expect("signal");
        let out = child.wait_with_output().expect("wait");
        let took = sent.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(code), "{mode}: {stdout}");
        assert!(took < Duration::from_secs(2), "{mode}: took {took:?}");
        assert!(
            stdout.contains(&format!("interrupted by {}", signal.as_str()))
                && stdout.contains("requests answered through the broker"),
            "{mode}: {stdout}"
        );
        for child in children {
            assert!(
                !std::path::Path::new(&format!("/proc/{child}")).exists(),
                "{mode}: child {child} left behind"
            );
        }
        eprintln!("{mode}: stopped {took:?} after {signal}: {}", stdout.trim());
    }
}

/// A config file of `workers` built-in echo workers, no admin, no Sysmon.
fn echo_config(tag: &str, workers: u32) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("procbroker-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("echo.toml");
    std::fs::write(
        &path,
        format!(
            "[admin]\nlisten = \"\"\n[sysmon]\ninterval_ms = 0\n[[service]]\nname = \"echo\"\n\
             command = \"@self\"\nargs = [\"worker\", \"echo\"]\nworkers = {workers}\n"
        ),
    )
    .expect("config");
    path
}

#[test]
fn run_raises_the_open_files_limit_and_fails_a_half_started_service() {
    // Hard limit too low for 120 workers (four descriptors each): the
    // start is refused up front with one line naming the service and the
    // arithmetic, instead of running half of it and reporting ready.
    let config = echo_config("fds", 120);
    let out = Command::new("prlimit")
        .arg("--nofile=200:200")
        .arg(env!("CARGO_BIN_EXE_procbroker"))
        .args(["run", "--config"])
        .arg(&config)
        .env("LOG_LEVEL", "off")
        .output()
        .expect("prlimit");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("service \"echo\"")
            && err.contains("120 new workers need 480 more open files")
            && err.contains("open-files limit is 200"),
        "{err}"
    );
    // The same with a low soft limit but room below the hard one: raised,
    // and every worker starts.
    let mut broker = Command::new("prlimit")
        .arg("--nofile=200:4096")
        .arg(env!("CARGO_BIN_EXE_procbroker"))
        .args(["run", "--config"])
        .arg(&config)
        .env("LOG_LEVEL", "info")
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit");
    let stderr = broker.stderr.take().expect("stderr");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok);
    let mut spawned = None;
    for line in lines.by_ref() {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["fields"]["message"] == "service spawned" {
            spawned = Some(v);
            break;
        }
        assert!(!line.contains("could not start"), "{line}");
    }
    // Keep reading its log until it exits.
    let drain = std::thread::spawn(move || lines.count());
    send(&broker, nix::sys::signal::Signal::SIGTERM);
    let status = broker.wait().expect("wait");
    let _ = drain.join();
    let spawned = spawned.expect("service spawned");
    assert_eq!(spawned["fields"]["started"], 120, "{spawned}");
    assert!(status.success(), "{status:?}");
}

/// `procbroker run --config config` with JSON logs; every log line arrives
/// parsed on the receiver (which ends when the broker's stderr does).
fn run_json(config: &std::path::Path) -> (std::process::Child, Receiver<serde_json::Value>) {
    let mut broker = Command::new(env!("CARGO_BIN_EXE_procbroker"))
        .args(["run", "--config"])
        .arg(config)
        .env("LOG_LEVEL", "info")
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("procbroker run");
    let stderr = broker.stderr.take().expect("stderr");
    let (tx, log) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            let _ = tx.send(serde_json::from_str(&line).unwrap_or_default());
        }
    });
    (broker, log)
}

/// A JSON log line's message.
fn message(v: &serde_json::Value) -> String {
    v["fields"]["message"].as_str().unwrap_or("").to_owned()
}

/// [`run_json`], returned once `children` children have started, with
/// their pids.
fn run_broker(
    config: &std::path::Path,
    children: usize,
) -> (std::process::Child, Vec<u32>, Receiver<serde_json::Value>) {
    let (broker, log) = run_json(config);
    let mut pids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.len() < children {
        let v = log
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("children started");
        if message(&v) == "child started" {
            pids.push(v["fields"]["pid"].as_u64().expect("pid") as u32);
        }
    }
    (broker, pids, log)
}

#[test]
fn a_broker_killed_with_sigkill_leaves_no_child_running() {
    let dir = std::env::temp_dir().join(format!("procbroker-cli-orphan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("stubborn.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"\"\n[sysmon]\ninterval_ms = 0\n[[service]]\nname = \"stubborn\"\n\
             command = \"python3\"\nargs = [\"{}/tests/python/chaos_worker.py\"]\nworkers = 2\n\
             env = {{ STUBBORN = \"1\" }}\n",
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .expect("config");
    let (mut broker, pids, _log) = run_broker(&config, 2);
    // Ignores SIGTERM, never reads stdin: only the kernel can help.
    broker.kill().expect("SIGKILL");
    broker.wait().expect("reap the broker");
    let killed = Instant::now();
    for pid in pids {
        while !dead(pid) {
            assert!(
                killed.elapsed() < Duration::from_secs(1),
                "child {pid} outlived the broker by 1 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Waits up to 10 s for a log line whose message contains `text`; returns
/// the messages seen on the way, that one last.
fn wait_for(log: &Receiver<serde_json::Value>, text: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        match log.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(v) => {
                seen.push(message(&v));
                if message(&v).contains(text) {
                    return seen;
                }
            }
            Err(_) => panic!("no log line with {text:?} in 10 s: {seen:?}"),
        }
    }
}

/// Signals the broker process.
fn send(broker: &std::process::Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(broker.id() as i32), signal)
        .expect("signal the broker");
}

#[test]
fn sighup_does_not_stop_the_broker() {
    use nix::sys::signal::Signal::{SIGHUP, SIGTERM};
    let config = echo_config("hup", 1);
    let (mut broker, pids, log) = run_broker(&config, 1);
    wait_for(&log, "procbroker running");
    send(&broker, SIGHUP);
    wait_for(&log, "SIGHUP: reloading");
    assert!(
        broker.try_wait().expect("wait").is_none(),
        "SIGHUP stopped the broker"
    );
    assert!(!dead(pids[0]), "its child is still there");
    send(&broker, SIGTERM);
    assert!(broker.wait().expect("wait").success());
    let rest: Vec<String> = log.iter().map(|v| message(&v)).collect();
    assert!(
        rest.iter().any(|l| l.contains("procbroker stopped")),
        "{rest:?}"
    );
}

#[test]
fn a_sighup_that_meets_a_stop_is_never_lost_silently() {
    use nix::sys::signal::Signal::{SIGHUP, SIGTERM};
    // Sent while the broker may still be starting: both can be pending at
    // once. The stop wins; the SIGHUP is either applied first or logged as
    // not applied, never dropped without a word.
    let config = echo_config("hup-term", 1);
    let (mut broker, _pids, log) = run_broker(&config, 1);
    send(&broker, SIGHUP);
    send(&broker, SIGTERM);
    assert!(broker.wait().expect("wait").success());
    let log: Vec<String> = log.iter().map(|v| message(&v)).collect();
    assert!(
        log.iter()
            .any(|l| l.contains("SIGHUP: reloading") || l.contains("SIGHUP: not reloaded")),
        "{log:?}"
    );
    assert!(
        log.iter().any(|l| l.contains("procbroker stopped")),
        "{log:?}"
    );
}

/// What a test waits for: children started (process, pid) and log lines seen.
type Until<'a> = dyn Fn(&[(String, u64)], &[String]) -> bool + 'a;

#[test]
fn sighup_reloads_the_config_file() {
    let dir = std::env::temp_dir().join(format!("procbroker-cli-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("reload.toml");
    let service = |name: &str, workers: u32, x: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\ncommand = \"@self\"\nargs = [\"worker\", \"echo\"]\n\
             workers = {workers}\nenv = {{ X = \"{x}\" }}\n"
        )
    };
    let head = "[admin]\nlisten = \"\"\n[sysmon]\ninterval_ms = 0\n";
    std::fs::write(
        &config,
        format!("{head}{}{}", service("a", 1, "1"), service("b", 2, "1")),
    )
    .expect("v1");
    let (mut broker, log) = run_json(&config);
    // Collects "child started" (process -> pid) until `until` holds.
    let mut started: Vec<(String, u64)> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut wait = |started: &mut Vec<(String, u64)>, until: &Until<'_>| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !until(started, &seen) {
            let v = log
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("timed out; started {started:?}"));
            if message(&v) == "child started" {
                let id = v["fields"]["process"].as_str().unwrap_or("").to_owned();
                started.push((id, v["fields"]["pid"].as_u64().unwrap_or(0)));
            }
            seen.push(format!("{} {}", message(&v), v["fields"]));
        }
    };
    let count = |s: &[(String, u64)], id: &str| s.iter().filter(|(p, _)| p == id).count();
    wait(&mut started, &|s, _| s.len() == 3);
    // a: 1 -> 2 workers (a Scale: a.0 untouched); b: new env (a rolling
    // restart of b only); c: new.
    std::fs::write(
        &config,
        format!(
            "{head}{}{}{}",
            service("a", 2, "1"),
            service("b", 2, "2"),
            service("c", 1, "1")
        ),
    )
    .expect("v2");
    send(&broker, nix::sys::signal::Signal::SIGHUP);
    wait(&mut started, &|s, _| {
        count(s, "a.1") == 1 && count(s, "c.0") == 1 && count(s, "b.0") == 2 && count(s, "b.1") == 2
    });
    assert_eq!(
        count(&started, "a.0"),
        1,
        "a.0 was not restarted: {started:?}"
    );
    // A broken file changes nothing and says where it is broken.
    std::fs::write(
        &config,
        format!("{head}[[service]]\nname = \"a\"\nworkers = \"many\"\n"),
    )
    .expect("broken");
    send(&broker, nix::sys::signal::Signal::SIGHUP);
    wait(&mut started, &|_, seen| {
        seen.iter()
            .any(|l| l.contains("did not load") && l.contains("line 7"))
    });
    std::thread::sleep(Duration::from_millis(300));
    while let Ok(v) = log.try_recv() {
        assert_ne!(
            message(&v),
            "child started",
            "a broken file changed something"
        );
        if message(&v).contains("did not load") {
            break;
        }
    }
    send(&broker, nix::sys::signal::Signal::SIGTERM);
    assert!(broker.wait().expect("wait").success());
}

#[test]
fn a_garbage_flood_logs_at_a_limited_rate_and_counts_every_frame() {
    let dir = std::env::temp_dir().join(format!("procbroker-cli-garbage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("garbage.toml");
    // No bad-frame limit, so the flood goes on and the log must cope.
    std::fs::write(
        &config,
        format!(
            "[broker]\nmax_bad_frames_per_s = 0\nkill_timeout_ms = 1000\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[sysmon]\ninterval_ms = 0\n\
             [[service]]\nname = \"garbage\"\ncommand = \"python3\"\n\
             args = [\"{}/tests/python/chaos_worker.py\"]\nenv = {{ GARBAGE = \"1\" }}\n",
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .expect("config");
    let (mut broker, log) = run_json(&config);
    let mut addr = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = log
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("running");
        if message(&v).starts_with("admin HTTP listening") {
            addr = v["fields"]["addr"].as_str().map(str::to_owned);
        }
        if message(&v).contains("procbroker running") {
            break;
        }
    }
    let addr = addr.expect("admin address");
    // Two seconds of flood.
    let flood = Instant::now();
    let (mut warnings, mut suppressed) = (0u64, 0u64);
    while flood.elapsed() < Duration::from_secs(2) {
        if let Ok(v) = log.recv_timeout(Duration::from_millis(50))
            && message(&v) == "invalid envelope dropped"
        {
            warnings += 1;
            suppressed += v["fields"]["suppressed"].as_u64().unwrap_or(0);
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_procbroker"))
        .args(["stats", "--admin", &addr, "--json"])
        .output()
        .expect("stats");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    let bad = stats["per_process"]["garbage.0"]["bad_frames"]
        .as_u64()
        .expect("bad_frames");
    send(&broker, nix::sys::signal::Signal::SIGTERM);
    assert!(broker.wait().expect("wait").success());
    eprintln!(
        "in 2 s: {bad} bad frames counted, {warnings} warning lines ({suppressed} suppressed)"
    );
    // At most 5 a second (3 windows may overlap 2 s), every frame counted.
    assert!(warnings <= 15, "{warnings} warning lines in 2 s");
    assert!(bad > 10_000, "{bad}");
    assert!(suppressed > 1000, "{suppressed}");
}

#[test]
fn the_broker_outlives_whoever_reads_its_log() {
    let config = echo_config("lostlog", 1);
    let mut broker = Command::new(env!("CARGO_BIN_EXE_procbroker"))
        .args(["run", "--config"])
        .arg(&config)
        .env("LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("procbroker run");
    let mut stderr = std::io::BufReader::new(broker.stderr.take().expect("stderr"));
    let mut line = String::new();
    while !line.contains("procbroker running") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).expect("log");
        assert!(n > 0, "log ended before the broker ran");
    }
    // The log's reader goes away; every line from now on hits EPIPE.
    drop(stderr);
    send(&broker, nix::sys::signal::Signal::SIGTERM);
    let status = broker.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn bench_with_failed_calls_says_why_and_exits_non_zero() {
    // Over the default 16 MiB frame limit: every call fails.
    let args = ["bench", "--payload-bytes", "20000000", "--requests", "2"];
    let out = Command::new(env!("CARGO_BIN_EXE_procbroker"))
        .args(args)
        .arg("--json")
        .output()
        .expect("bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("2 of 2 calls through the broker failed (2 × too_large: frame length"),
        "{stderr}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["errors"], 2, "{v}");
    assert_eq!(v["error_codes"], serde_json::json!({"too_large": 2}), "{v}");
    // No call succeeded: no latency to show, none made of the errors'.
    assert!(v["latency_us"].is_null(), "{v}");
    assert_eq!(v["throughput_rps"], 0.0, "{v}");

    let out = Command::new(env!("CARGO_BIN_EXE_procbroker"))
        .args(args)
        .output()
        .expect("bench");
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("procbroker errors: 2 × too_large: frame length 20000077 exceeds"),
        "{stdout}"
    );
}

#[test]
fn bench_raw_baseline_with_more_in_flight_than_the_pipes_hold_completes() {
    // 4 × 1 MiB in flight each way: more than the pipes between the raw
    // peers hold, so a peer that blocks writing while its peer does too
    // never finishes.
    for mode in ["relay", "direct"] {
        let (code, stdout, stderr) = bench_bounded(&[
            "--mode",
            mode,
            "--workers",
            "1",
            "--concurrency",
            "4",
            "--requests",
            "40",
            "--payload-bytes",
            "1048576",
            "--baseline",
            "--pin",
            "same",
            "--json",
        ]);
        assert_eq!(code, Some(0), "{mode}: {stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
        assert_eq!(
            (v["errors"].as_u64(), v["baseline"]["errors"].as_u64()),
            (Some(0), Some(0)),
            "{v}"
        );
        support::assert_baseline_measured(&v);
    }
}

/// `procbroker bench ARGS`, stopped (with its children) if it has not
/// ended within 120 s: its exit status, stdout and stderr.
fn bench_bounded(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_procbroker"))
        .arg("bench")
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bench");
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            for pid in children_of(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("bench {args:?} did not end within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A bench `--json` that succeeded: its object.
fn bench_ok(args: &[&str]) -> serde_json::Value {
    let (code, stdout, stderr) = bench_bounded(args);
    assert_eq!(code, Some(0), "{args:?}: {stderr}");
    serde_json::from_str(&stdout).expect("one JSON object")
}

/// The fields every `--json` has, plus `extra`.
fn assert_keys(v: &serde_json::Value, extra: &[&str]) {
    let mut keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    let mut want = vec![
        "baseline",
        "concurrency",
        "cpu_us_per_call",
        "cpus",
        "elapsed_s",
        "error_codes",
        "errors",
        "latency_us",
        "mode",
        "payload_bytes",
        "pin",
        "placement",
        "ratio_p50",
        "requests",
        "throughput_rps",
        "worker",
        "workers",
    ];
    want.extend_from_slice(extra);
    want.sort_unstable();
    assert_eq!(keys, want, "{v}");
    assert!(v["baseline"].is_null() && v["ratio_p50"].is_null(), "{v}");
}

#[test]
fn bench_stream_counts_every_partial_reply_against_the_relay_of_the_same_run() {
    let v = bench_ok(&[
        "--mode",
        "relay",
        "--stream",
        "50",
        "--requests",
        "4",
        "--concurrency",
        "2",
        "--json",
    ]);
    assert_keys(
        &v,
        &[
            "stream",
            "partials",
            "partials_per_s",
            "cpu_us_per_partial",
            "relay",
            "ratio_partials_to_relay_frames",
        ],
    );
    assert_eq!(
        (
            v["worker"].as_str(),
            v["stream"].as_u64(),
            v["requests"].as_u64(),
            v["partials"].as_u64(),
            v["errors"].as_u64()
        ),
        (Some("bench-worker"), Some(50), Some(4), Some(200), Some(0)),
        "{v}"
    );
    // The relay of the same run: 64 in flight, as many frames (2 a call).
    let relay = &v["relay"];
    assert_eq!(
        (
            relay["concurrency"].as_u64(),
            relay["requests"].as_u64(),
            relay["errors"].as_u64()
        ),
        (Some(64), Some(100), Some(0)),
        "{v}"
    );
    let frames = relay["frames_per_s"].as_f64().expect("frames/s");
    let partials = v["partials_per_s"].as_f64().expect("partials/s");
    let ratio = v["ratio_partials_to_relay_frames"].as_f64().expect("ratio");
    assert!(frames > 0.0 && partials > 0.0, "{v}");
    assert!(
        (ratio - partials / frames).abs() < 1e-6 * ratio.max(1.0),
        "{v}"
    );
    assert_eq!(
        support::cpu_roles(&v["cpu_us_per_partial"]),
        [true, true, true],
        "{v}"
    );
    assert_eq!(
        support::cpu_roles(&relay["cpu_us_per_frame"]),
        [true, true, true],
        "{v}"
    );
}

#[test]
fn bench_key_spread_runs_round_robin_then_keyed_in_one_invocation() {
    let v = bench_ok(&[
        "--key-spread",
        "10",
        "--workers",
        "2",
        "--concurrency",
        "4",
        "--requests",
        "300",
        "--json",
    ]);
    assert_keys(&v, &["key_spread", "keyed", "ratio_broker_cpu_keyed"]);
    assert_eq!(
        (
            v["key_spread"].as_u64(),
            v["requests"].as_u64(),
            v["errors"].as_u64(),
            v["keyed"]["requests"].as_u64(),
            v["keyed"]["errors"].as_u64()
        ),
        (Some(10), Some(300), Some(0), Some(300), Some(0)),
        "{v}"
    );
    for run in [&v, &v["keyed"]] {
        assert_eq!(
            support::cpu_roles(&run["cpu_us_per_call"]),
            [true, true, true],
            "{v}"
        );
        assert!(
            run["latency_us"]["p50"].as_f64().is_some_and(|p| p > 0.0),
            "{v}"
        );
    }
    // A number, or null when the round-robin run's broker used no
    // measurable CPU (the clock counts in ticks).
    assert!(
        v["ratio_broker_cpu_keyed"].is_number() || v["ratio_broker_cpu_keyed"].is_null(),
        "{v}"
    );
}

#[test]
fn bench_cancel_times_every_cancel_from_the_callers_deadline() {
    let v = bench_ok(&[
        "--mode",
        "cancel",
        "--requests",
        "20",
        "--concurrency",
        "4",
        "--timeout-ms",
        "2",
        "--json",
    ]);
    assert_keys(&v, &["timeout_ms", "cancels", "cancel_latency_us"]);
    assert_eq!(
        (
            v["mode"].as_str(),
            v["timeout_ms"].as_u64(),
            v["errors"].as_u64(),
            v["cancels"]["count"].as_u64(),
            v["cancels"]["other_reasons"].as_u64()
        ),
        (Some("cancel"), Some(2), Some(0), Some(20), Some(0)),
        "{v}"
    );
    let q = &v["cancel_latency_us"];
    let (p50, max) = (
        q["p50"].as_f64().expect("p50"),
        q["max"].as_f64().expect("max"),
    );
    assert!(0.0 <= p50 && p50 <= max, "{v}");
    // The caller's latency is until its `timeout` reply: past its deadline.
    assert!(
        v["latency_us"]["p50"].as_f64().is_some_and(|p| p >= 2000.0),
        "{v}"
    );

    let (code, stdout, stderr) =
        bench_bounded(&["--mode", "cancel", "--requests", "5", "--timeout-ms", "1"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("cancels seen by the worker: 5 (0 with another reason")
            && stdout.contains("cancel latency, from the caller's deadline"),
        "{stdout}"
    );
}

#[test]
fn bench_worker_cmd_runs_any_program_beside_the_rust_echo() {
    let rust = format!("{} worker conformance", env!("CARGO_BIN_EXE_procbroker"));
    let python = format!(
        "{} '{}/examples/python/echo_worker.py'",
        support::python(),
        env!("CARGO_MANIFEST_DIR")
    );
    let v = bench_ok(&[
        "--worker-cmd",
        &rust,
        "--worker-cmd",
        &python,
        "--concurrency",
        "4",
        "--requests",
        "300",
        "--json",
    ]);
    assert_keys(&v, &["worker_cmds"]);
    assert_eq!(v["worker"], "echo", "{v}");
    let cmds = v["worker_cmds"].as_array().expect("array");
    assert_eq!(cmds.len(), 2, "{v}");
    for (cmd, command) in cmds.iter().zip([&rust, &python]) {
        assert_eq!(cmd["command"].as_str(), Some(command.as_str()), "{v}");
        assert_eq!(
            (cmd["requests"].as_u64(), cmd["errors"].as_u64()),
            (Some(300), Some(0)),
            "{v}"
        );
        assert_eq!(
            support::cpu_roles(&cmd["cpu_us_per_call"]),
            [true, true, true],
            "{v}"
        );
        assert!(
            cmd["ratio_throughput"].as_f64().is_some_and(|r| r > 0.0),
            "{v}"
        );
    }
}

#[test]
fn bench_lifecycle_runs_that_fail_say_why_and_exit_non_zero() {
    let too_large = ["--payload-bytes", "20000000", "--requests", "2"];
    for (flags, why) in [
        (&["--stream", "2"][..], "of the run \"streams\" failed"),
        (
            &["--key-spread", "3"][..],
            "of the run \"keyed, 3 keys\" failed",
        ),
        (&["--mode", "cancel"][..], "of the run \"timeouts\" failed"),
    ] {
        let args: Vec<&str> = flags.iter().chain(&too_large).copied().collect();
        let (code, _, stderr) = bench_bounded(&args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(why) && stderr.contains("too_large"),
            "{args:?}: {stderr}"
        );
    }
    // A program that does the handshake but has no `Echo`.
    let no_echo = format!("{} worker bench-worker", env!("CARGO_BIN_EXE_procbroker"));
    let (code, stdout, stderr) =
        bench_bounded(&["--worker-cmd", &no_echo, "--requests", "3", "--json"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("3 × unknown_method"), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(v["worker_cmds"][0]["errors"], 3, "{v}");
    // A program that cannot run, one that exits before it is ready: named,
    // at once.
    for (command, why) in [
        ("/nonexistent/worker --flag", "cannot run"),
        ("false", "did not become ready"),
    ] {
        let (code, _, stderr) = bench_bounded(&["--worker-cmd", command]);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("--worker-cmd {command:?}")) && stderr.contains(why),
            "{stderr}"
        );
    }
    // Combinations that mean nothing.
    for (args, why) in [
        (
            &["--stream", "5", "--key-spread", "3"][..],
            "give one of them",
        ),
        (
            &["--stream", "5", "--baseline"][..],
            "--baseline does not apply",
        ),
        (
            &["--mode", "direct", "--key-spread", "3"][..],
            "needs --mode relay",
        ),
        (&["--stream", "0"][..], "--stream must be at least 1"),
        (&["--worker-cmd", "a 'b"][..], "unbalanced quotes"),
    ] {
        let (code, _, stderr) = bench_bounded(args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
}
