//! What a child runs as, and in which order services start and stop, with
//! real children: limits (read back from the child's /proc/self/limits),
//! cwd, user and group (`nobody`), the errors that name their key, and
//! `depends_on` at start, at shutdown and (not cascading) at a restart and
//! a reload.

mod support;

use procbroker::actors::log_store::TailLog;
use procbroker::config::file::Loaded;
use procbroker::config::{Limits, ServiceConfig};
use procbroker::embed::ProcBroker;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::*;

/// Lines of the ring of `id` (without their times) once one contains `text`.
async fn ring_until(broker: &procbroker::embed::BrokerHandle, id: &str, text: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = broker
            .logs()
            .send(TailLog {
                id: id.into(),
                n: None,
            })
            .await
            .expect("log store")
            .unwrap_or_default();
        let texts: Vec<String> = lines
            .iter()
            .map(|l| l.split_once(' ').map_or("", |(_, t)| t).to_owned())
            .collect();
        if texts.iter().any(|t| t.contains(text)) {
            return texts;
        }
        assert!(Instant::now() < deadline, "{id}: no {text:?} in {texts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `Max open files   256   256   files` → ("256", "256").
fn limit<'a>(limits: &'a [String], name: &str) -> (&'a str, &'a str) {
    let line = limits
        .iter()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name:?} in {limits:?}"));
    let mut values = line[name.len()..].split_whitespace();
    (values.next().unwrap_or(""), values.next().unwrap_or(""))
}

/// A field of /proc/{pid}/status (`Uid:`, `Groups:`).
fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

#[actix::test]
async fn a_child_runs_with_its_limits_its_cwd_and_as_nobody() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests run as root (as CI does): they start children as nobody"
    );
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let cwd = temp_dir("ops-cwd");
    // World-readable: nobody must be able to enter it.
    std::fs::set_permissions(&cwd, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let limits = Limits {
        open_files: Some(256),
        processes: Some(500),
        cpu_seconds: Some(3600),
        address_space_bytes: Some(64 << 30),
        core_bytes: Some(0),
    };
    let spec = ServiceConfig::new("jail", "/bin/sh")
        .args([
            "-c".to_owned(),
            format!(
                "cat /proc/self/limits >&2; id >&2; echo \"cwd $(pwd)\" >&2; exec {BIN} worker echo"
            ),
        ])
        .limits(limits)
        .cwd(cwd.display().to_string())
        .user("nobody");
    let spawned = broker.spawn(spec).await.expect("spawn");
    assert!(spawned[0].is_ready(), "{spawned:?}");
    let pid = spawned[0].pid.expect("pid");
    let lines = ring_until(&broker, "jail.0", "cwd ").await;
    eprintln!("{}", lines.join("\n"));
    // Soft and hard, as the child itself sees them.
    assert_eq!(limit(&lines, "Max open files"), ("256", "256"));
    assert_eq!(limit(&lines, "Max processes"), ("500", "500"));
    assert_eq!(limit(&lines, "Max cpu time"), ("3600", "3600"));
    assert_eq!(
        limit(&lines, "Max address space"),
        ("68719476736", "68719476736")
    );
    assert_eq!(limit(&lines, "Max core file size"), ("0", "0"));
    // Its user's group and groups, none of root's.
    let id = lines.iter().find(|l| l.starts_with("uid=")).expect("id");
    assert!(id.starts_with("uid=65534(nobody) gid=65534"), "{id}");
    assert!(id.ends_with("groups=65534(nogroup)"), "{id}");
    assert!(
        lines.contains(&format!("cwd {}", cwd.display())),
        "{lines:?}"
    );
    // The worker it exec'd: the same, and it serves.
    assert_eq!(status_field(pid, "Uid:"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(pid, "Gid:"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(pid, "Groups:"), "65534");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let limits: Vec<String> = limits.lines().map(str::to_owned).collect();
    assert_eq!(limit(&limits, "Max open files"), ("256", "256"));
    let reply = broker.call("jail", "Echo", &"hi").await.expect("echo");
    assert_eq!(reply.payload_as::<String>().expect("str"), "hi");
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(&cwd);
}

#[actix::test]
async fn group_alone_keeps_the_user_and_drops_roots_groups() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    let spec = ServiceConfig::new("grouped", "/bin/sh")
        .args(["-c".to_owned(), format!("id >&2; exec {BIN} worker echo")])
        .group(65534u32);
    broker.spawn(spec).await.expect("spawn");
    let lines = ring_until(&broker, "grouped.0", "uid=").await;
    let id = lines.iter().find(|l| l.starts_with("uid=")).expect("id");
    assert!(id.starts_with("uid=0(root) gid=65534(nogroup)"), "{id}");
    assert!(id.ends_with("groups=65534(nogroup)"), "{id}");
    broker.shutdown().await;
}

/// Loads a config file of `body`; the error's text.
fn load_error(name: &str, body: &str) -> String {
    let dir = temp_dir(name);
    let path = dir.join("procbroker.toml");
    std::fs::write(&path, body).expect("config");
    let e = Loaded::load(Some(&path), std::iter::empty(), &[]).expect_err("refused");
    let _ = std::fs::remove_dir_all(&dir);
    e.to_string()
}

const ECHO: &str = "command = \"@self\"\nargs = [\"worker\", \"echo\"]\n";

#[test]
fn bad_settings_fail_the_load_naming_their_key() {
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    let e = load_error(
        "ops-hard",
        &format!(
            "[[service]]\nname = \"a\"\n{ECHO}limits = {{ open_files = {} }}\n",
            hard + 1
        ),
    );
    assert!(
        e.contains("service[0].limits.open_files") && e.contains("hard limit"),
        "{e}"
    );
    let e = load_error(
        "ops-unknown-limit",
        &format!("[[service]]\nname = \"a\"\n{ECHO}limits = {{ files = 10 }}\n"),
    );
    assert!(e.contains("unknown field") && e.contains("files"), "{e}");
    let e = load_error(
        "ops-user",
        &format!("[[service]]\nname = \"a\"\n{ECHO}user = \"no-such-user-here\"\n"),
    );
    assert!(
        e.contains("service[0].user") && e.contains("no user \"no-such-user-here\""),
        "{e}"
    );
    let e = load_error(
        "ops-group",
        &format!("[[service]]\nname = \"a\"\n{ECHO}group = \"no-such-group\"\n"),
    );
    assert!(
        e.contains("service[0].group") && e.contains("no group"),
        "{e}"
    );
    let e = load_error(
        "ops-cwd",
        &format!("[[service]]\nname = \"a\"\n{ECHO}cwd = \"not/here\"\n"),
    );
    assert!(
        e.contains("service[0].cwd") && e.contains("not/here"),
        "{e}"
    );
    let e = load_error(
        "ops-self",
        &format!("[[service]]\nname = \"a\"\n{ECHO}depends_on = [\"a\"]\n"),
    );
    assert!(
        e.contains("service[0].depends_on: service \"a\" depends on itself"),
        "{e}"
    );
    let e = load_error(
        "ops-missing",
        &format!(
            "[[service]]\nname = \"a\"\n{ECHO}\n[[service]]\nname = \"b\"\n{ECHO}depends_on = [\"a\", \"dbb\"]\n"
        ),
    );
    assert!(
        e.contains("service[1].depends_on") && e.contains("\"b\" depends on \"dbb\""),
        "{e}"
    );
    let e = load_error(
        "ops-cycle",
        &format!(
            "[[service]]\nname = \"ok\"\n{ECHO}\n[[service]]\nname = \"x\"\n{ECHO}depends_on = [\"y\"]\n\
             [[service]]\nname = \"y\"\n{ECHO}depends_on = [\"z\"]\n[[service]]\nname = \"z\"\n{ECHO}depends_on = [\"x\", \"ok\"]\n"
        ),
    );
    assert!(
        e.contains("\"x\"") && e.contains("\"y\"") && e.contains("\"z\"") && e.contains("cycle"),
        "{e}"
    );
    assert!(
        !e.contains("\"ok\","),
        "only the services of the cycle: {e}"
    );
}

#[test]
fn a_broker_not_running_as_root_refuses_user_naming_the_key() {
    let dir = temp_dir("ops-notroot");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let config = dir.join("procbroker.toml");
    std::fs::write(
        &config,
        format!("[admin]\nlisten = \"\"\n[[service]]\nname = \"a\"\n{ECHO}user = \"nobody\"\n"),
    )
    .expect("config");
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("procbroker run as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("service[0].user") && stderr.contains("root"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

use std::os::unix::process::CommandExt;

#[test]
fn a_limit_above_the_hard_limit_fails_the_start() {
    let dir = temp_dir("ops-hardrun");
    let config = dir.join("procbroker.toml");
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    std::fs::write(
        &config,
        format!("[admin]\nlisten = \"\"\n[[service]]\nname = \"a\"\n{ECHO}limits = {{ open_files = {} }}\n", hard + 1),
    )
    .expect("config");
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("procbroker run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("service[0].limits.open_files"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The order worker: records `ready`, `shutdown`, `exit` with the time.
fn order_service(name: &str, workers: u32, deps: &[&str], ready_delay: &str) -> String {
    let script = format!(
        "{}/tests/python/order_worker.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let deps: Vec<String> = deps.iter().map(|d| format!("\"{d}\"")).collect();
    format!(
        "[[service]]\nname = \"{name}\"\ncommand = \"{}\"\nargs = [\"{script}\"]\nworkers = {workers}\n\
         depends_on = [{}]\nenv = {{ READY_DELAY = \"{ready_delay}\" }}\n",
        python(),
        deps.join(", ")
    )
}

/// (process, event) → time, from the order log.
fn events(log: &std::path::Path) -> BTreeMap<(String, String), u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let (id, what, ns) = (parts.next()?, parts.next()?, parts.next()?.parse().ok()?);
            Some(((id.to_owned(), what.to_owned()), ns))
        })
        .collect()
}

fn times(events: &BTreeMap<(String, String), u64>, service: &str, what: &str) -> Vec<u64> {
    events
        .iter()
        .filter(|((id, w), _)| id.starts_with(&format!("{service}.")) && w == what)
        .map(|(_, t)| *t)
        .collect()
}

#[test]
fn services_start_after_what_they_depend_on_and_stop_before_it() {
    let dir = temp_dir("ops-order");
    let order_log = dir.join("order.log");
    let config = dir.join("procbroker.toml");
    let write = |db_env: &str| {
        // The file lists them out of order on purpose.
        let body = format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[sysmon]\ninterval_ms = 0\n{}{}{}{}",
            order_service("web", 2, &["api"], "0"),
            order_service("api", 2, &["db"], "0"),
            order_service("db", 2, &[], db_env),
            order_service("lone", 1, &[], "0"),
        );
        std::fs::write(&config, body).expect("config");
    };
    write("0.4");
    let mut broker = Daemon::start(
        &config,
        &[("ORDER_LOG", order_log.to_str().expect("utf-8"))],
    );
    broker.wait_for("procbroker running", Duration::from_secs(20));
    let started = events(&order_log);
    let max = |v: Vec<u64>| v.into_iter().max().expect("some");
    let min = |v: Vec<u64>| v.into_iter().min().expect("some");
    assert_eq!(times(&started, "db", "ready").len(), 2);
    assert!(
        min(times(&started, "api", "ready")) > max(times(&started, "db", "ready")),
        "{started:?}"
    );
    assert!(
        min(times(&started, "web", "ready")) > max(times(&started, "api", "ready")),
        "{started:?}"
    );

    // A reload that restarts db (its env changed) restarts db alone.
    let pids = |broker: &Daemon, service: &str| -> Vec<u64> {
        broker
            .log
            .iter()
            .filter(|v| message(v) == "child started")
            .filter(|v| {
                v["fields"]["process"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(&format!("{service}.")))
            })
            .filter_map(|v| v["fields"]["pid"].as_u64())
            .collect()
    };
    let (api_before, web_before) = (pids(&broker, "api"), pids(&broker, "web"));
    write("0.1");
    broker.signal(nix::sys::signal::Signal::SIGHUP);
    broker.wait_for(
        "SIGHUP: service restarted with its new settings",
        Duration::from_secs(20),
    );
    broker.drain(Duration::from_millis(300));
    assert_eq!(pids(&broker, "db").len(), 4, "db restarted");
    assert_eq!(
        (pids(&broker, "api"), pids(&broker, "web")),
        (api_before, web_before),
        "no cascade"
    );

    std::fs::write(&order_log, "").expect("clear");
    assert!(broker.stop().success());
    let stopped = events(&order_log);
    eprintln!("{stopped:?}");
    for service in ["web", "api", "db", "lone"] {
        assert!(
            !times(&stopped, service, "shutdown").is_empty(),
            "{service} got shutdown: {stopped:?}"
        );
    }
    // Every worker of a dependent exited before its dependency got shutdown.
    assert!(
        max(times(&stopped, "web", "exit")) < min(times(&stopped, "api", "shutdown")),
        "{stopped:?}"
    );
    assert!(
        max(times(&stopped, "api", "exit")) < min(times(&stopped, "db", "shutdown")),
        "{stopped:?}"
    );
    // Independent services stop side by side: lone with the first wave.
    assert!(
        min(times(&stopped, "lone", "shutdown")) < min(times(&stopped, "api", "shutdown")),
        "{stopped:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix::test]
async fn a_restart_or_a_scale_of_a_dependency_does_not_cascade() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();
    broker.spawn(echo("db", 2)).await.expect("db");
    let api = broker
        .spawn(echo("api", 2).depends_on(["db"]))
        .await
        .expect("api");
    let before: Vec<Option<u32>> = api.iter().map(|p| p.pid).collect();
    broker.restart("db").await.expect("restart db");
    broker.scale("db", 3).await.expect("scale db");
    let table = broker.processes().await.expect("table");
    let after: Vec<Option<u32>> = table
        .iter()
        .filter(|p| p.service == "api")
        .map(|p| p.pid)
        .collect();
    assert_eq!(after, before, "api untouched");
    broker.shutdown().await;
}
