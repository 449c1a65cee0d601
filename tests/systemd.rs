//! `procbroker run` under systemd's notify protocol: the test binds a real
//! unix datagram socket as systemd would, hands its path in
//! `NOTIFY_SOCKET`, and reads what the broker says and in which order:
//! `READY=1` only once `/ready` is 200, `WATCHDOG=1` every half
//! `WATCHDOG_USEC` (none for another `WATCHDOG_PID`), `RELOADING=1` with
//! `MONOTONIC_USEC` then `READY=1` around a SIGHUP, `STOPPING=1` at
//! SIGTERM, `STATUS=` with ready worker counts. A socket that does not
//! exist is said once and the broker runs on. The example unit file passes
//! `systemd-analyze verify`.

mod support;

use std::os::unix::net::UnixDatagram;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::*;

/// A notify socket bound where systemd would put one; each datagram with
/// the time it arrived, read by a thread.
struct Socket {
    path: String,
    messages: mpsc::Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
}

impl Socket {
    fn bind(dir: &std::path::Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        Self::reading(socket, path.display().to_string())
    }

    fn reading(socket: UnixDatagram, path: String) -> Self {
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if tx.send((Instant::now(), text)).is_err() {
                    return;
                }
            }
        });
        Self {
            path,
            messages,
            seen: Vec::new(),
        }
    }

    /// Waits for a datagram with a line `line`; returns the datagram.
    fn wait_for(&mut self, line: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (at, text) = self.messages.recv_timeout(left).unwrap_or_else(|_| {
                panic!("no {line:?} within {within:?}; got {:?}", self.texts())
            });
            self.seen.push((at, text.clone()));
            if text.lines().any(|l| l == line) {
                return text;
            }
        }
    }

    fn drain(&mut self, for_: Duration) {
        let deadline = Instant::now() + for_;
        while let Ok(m) = self
            .messages
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(m);
        }
    }

    fn texts(&self) -> Vec<&str> {
        self.seen.iter().map(|(_, t)| t.as_str()).collect()
    }

    /// Index of the first datagram with line `line` from `from` on.
    fn index_of(&self, line: &str, from: usize) -> usize {
        self.seen[from..]
            .iter()
            .position(|(_, t)| t.lines().any(|l| l == line))
            .map(|i| i + from)
            .unwrap_or_else(|| panic!("no {line:?} after #{from}: {:?}", self.texts()))
    }
}

/// A config of a fast service and one slow to get ready.
fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("procbroker.toml");
    std::fs::write(
        &path,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[sysmon]\ninterval_ms = 0\n\
             [[service]]\nname = \"fast\"\ncommand = \"@self\"\nargs = [\"worker\", \"echo\"]\nworkers = 2\n\
             [[service]]\nname = \"slow\"\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"sleep 0.8; exec {BIN} worker echo\"]\n"
        ),
    )
    .expect("config");
    path
}

/// CLOCK_MONOTONIC in µs, the clock of `MONOTONIC_USEC`.
fn monotonic_usec() -> u64 {
    match sd_notify::NotifyState::monotonic_usec_now().expect("clock") {
        sd_notify::NotifyState::MonotonicUsec(usec) => u64::try_from(usec).expect("positive"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_broker_tells_systemd_ready_reloading_stopping_and_pings_the_watchdog() {
    let dir = temp_dir("systemd-notify");
    let mut socket = Socket::bind(&dir);
    let config = config(&dir);
    let mut broker = Daemon::start(
        &config,
        &[("NOTIFY_SOCKET", &socket.path), ("WATCHDOG_USEC", "400000")],
    );
    let addr = broker.admin();
    // Not ready while the slow service sleeps: no READY=1 meanwhile.
    let mut saw_503 = false;
    let ready = loop {
        if let Ok(m) = socket.messages.try_recv() {
            socket.seen.push(m.clone());
            if m.1.lines().any(|l| l == "READY=1") {
                break m;
            }
        }
        let (status, _) = http_get(&addr, "/ready");
        if status == 503 {
            saw_503 = true;
        }
        assert!(socket.seen.len() < 100, "{:?}", socket.texts());
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            broker.child.try_wait().expect("wait").is_none(),
            "the broker exited"
        );
    };
    assert!(saw_503, "/ready was 503 before READY=1");
    assert_eq!(
        http_get(&addr, "/ready").0,
        200,
        "READY=1 means /ready is 200"
    );
    assert!(
        ready.1.contains("STATUS=ready workers: fast 2/2, slow 1/1"),
        "{ready:?}"
    );
    assert!(
        socket.seen[..socket.seen.len() - 1]
            .iter()
            .all(|(_, t)| !t.contains("WATCHDOG=1")),
        "no watchdog ping before READY=1: {:?}",
        socket.texts()
    );

    // Pings every 200 ms (half of 400 ms).
    let from = socket.seen.len();
    socket.drain(Duration::from_millis(1100));
    let pings: Vec<Instant> = socket.seen[from..]
        .iter()
        .filter(|(_, t)| t.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(at, _)| *at)
        .collect();
    assert!(
        (3..=7).contains(&pings.len()),
        "{} pings in 1.1 s",
        pings.len()
    );
    for gap in pings.windows(2).map(|w| w[1] - w[0]) {
        assert!(gap < Duration::from_millis(500), "a gap of {gap:?}");
    }

    // A reload: RELOADING=1 with the monotonic clock, then READY=1.
    let before = monotonic_usec();
    broker.signal(nix::sys::signal::Signal::SIGHUP);
    let reloading = socket.wait_for("RELOADING=1", Duration::from_secs(5));
    let after = monotonic_usec();
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(
        (before..=after).contains(&usec),
        "{before} <= {usec} <= {after}"
    );
    let reloading_at = socket.seen.len() - 1;
    socket.wait_for("READY=1", Duration::from_secs(10));

    broker.signal(nix::sys::signal::Signal::SIGTERM);
    socket.wait_for("STOPPING=1", Duration::from_secs(5));
    assert!(broker.stop().success());
    // In order: READY, RELOADING, READY, STOPPING.
    let first_ready = socket.index_of("READY=1", 0);
    let reloaded = socket.index_of("READY=1", reloading_at);
    let stopping = socket.index_of("STOPPING=1", 0);
    assert!(
        first_ready < reloading_at && reloading_at < reloaded && reloaded < stopping,
        "{:?}",
        socket.texts()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_watchdog_pings_for_another_watchdog_pid_and_an_abstract_socket_works() {
    let dir = temp_dir("systemd-pid");
    let name = format!("procbroker-test-{}", std::process::id());
    let addr =
        <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            name.as_bytes(),
        )
        .expect("abstract name");
    let socket = UnixDatagram::bind_addr(&addr).expect("bind");
    let mut socket = Socket::reading(socket, format!("@{name}"));
    let config = config(&dir);
    let mut broker = Daemon::start(
        &config,
        &[
            ("NOTIFY_SOCKET", &socket.path),
            ("WATCHDOG_USEC", "200000"),
            // Another process is the one watched (pid 1 is never us).
            ("WATCHDOG_PID", "1"),
        ],
    );
    socket.wait_for("READY=1", Duration::from_secs(15));
    socket.drain(Duration::from_millis(600));
    assert!(
        socket.texts().iter().all(|t| !t.contains("WATCHDOG=1")),
        "{:?}",
        socket.texts()
    );
    assert!(broker.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_notify_socket_that_does_not_exist_is_said_once_and_the_broker_runs_on() {
    let dir = temp_dir("systemd-missing");
    let config = config(&dir);
    let missing = dir.join("no-such.sock").display().to_string();
    let mut broker = Daemon::start(
        &config,
        &[("NOTIFY_SOCKET", &missing), ("WATCHDOG_USEC", "100000")],
    );
    let addr = broker.admin();
    broker.wait_for("procbroker running", Duration::from_secs(15));
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(&addr, "/ready").0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    // READY=1, then watchdog pings every 50 ms: every one fails.
    broker.wait_for("watchdog pings on", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    broker.signal(nix::sys::signal::Signal::SIGHUP);
    broker.wait_for("SIGHUP: reloading", Duration::from_secs(5));
    assert_eq!(http_get(&addr, "/health").0, 200);
    assert!(broker.stop().success(), "runs on and stops cleanly");
    let said: Vec<String> = broker
        .log
        .iter()
        .filter(|v| message(v).contains("cannot notify the service manager"))
        .map(|v| v.to_string())
        .collect();
    assert_eq!(said.len(), 1, "said once: {said:?}");
    assert!(said[0].contains("no-such.sock"), "{said:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_example_unit_file_passes_systemd_analyze_verify() {
    let dir = temp_dir("systemd-unit");
    let unit = std::fs::read_to_string(format!(
        "{}/examples/procbroker.service",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("examples/procbroker.service");
    for needed in [
        "Type=notify",
        "KillMode=mixed",
        "Restart=on-failure",
        "LimitNOFILE=",
        "WatchdogSec=",
        "ExecReload=",
    ] {
        assert!(unit.contains(needed), "{needed}");
    }
    // verify checks that ExecStart's program exists: point it at this build.
    let path = dir.join("procbroker.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/procbroker", BIN)).expect("unit");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze is required (Debian package systemd; scripts/test installs it): {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It warns about what it ignores, with exit status 0: any word of
    // it about this unit is a mistake in it.
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("procbroker.service"))
        .collect();
    assert!(out.status.success() && about_unit.is_empty(), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
