//! The config file: the shape, the embedded default, environment
//! and flag overrides, and refusals that name the key and where it came from.

use procbroker::config::file::{ConfigError, Loaded};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

fn tmp(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!("procbroker-config-{}-{test}", std::process::id()))
}

fn none() -> Vec<(String, String)> {
    Vec::new()
}

#[test]
fn the_embedded_default_runs_four_echo_workers_of_this_binary() {
    let loaded = Loaded::load(None, none(), &[]).expect("default");
    let s = &loaded.file.services;
    assert_eq!(s.len(), 1);
    assert_eq!(
        (s[0].name.as_str(), s[0].command.as_str(), s[0].workers),
        ("echo", "@self", 4)
    );
    assert_eq!(s[0].args, ["worker", "echo"]);
    assert_eq!(
        loaded.admin_listen().map(|a| a.to_string()).as_deref(),
        Some("127.0.0.1:9464")
    );
    let c = loaded.broker_config();
    assert_eq!(c.sysmon_interval, Some(Duration::from_secs(30)));
    assert_eq!(
        (c.queue_capacity, c.max_frame_bytes),
        (1000, 16 * 1024 * 1024)
    );
}

#[test]
fn the_design_example_loads_exactly() {
    let path = write(
        &tmp("design"),
        "procbroker.toml",
        r#"
[broker]
max_frame_bytes = 16777216
queue_capacity = 1000          # per process
request_timeout_ms = 30000
drain_timeout_ms = 10000
kill_timeout_ms = 5000
control_allow = []             # services allowed to call Spawn / Stop

[admin]
listen = "127.0.0.1:9464"      # "" disables; port 0 = any free port, logged

[sysmon]
interval_ms = 30000            # 0 disables

[[service]]
name = "echo"
command = "procbroker"         # a path, a name on PATH, or "@self" = this binary
args = ["worker", "echo"]
workers = 4
await_ready = true
ready_timeout_ms = 5000
env = { KEY = "value" }
restart = { max_restarts = -1, backoff_initial_ms = 100, backoff_max_ms = 30000 }
"#,
    );
    let loaded = Loaded::load(Some(&path), none(), &[]).expect("design example");
    let s = &loaded.file.services[0];
    assert_eq!(s.env["KEY"], "value");
    assert_eq!((s.ready_timeout_ms, s.restart.max_restarts), (5000, -1));
    assert_eq!(s.command, "procbroker", "a bare name stays a PATH lookup");
    let c = loaded.broker_config();
    assert_eq!(c.kill_timeout, Duration::from_secs(5));
    assert_eq!(c.drain_timeout, Duration::from_secs(10));
}

#[test]
fn the_v2e_example_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/v2e.toml");
    let loaded = Loaded::load(Some(&path), none(), &[]).expect("v2e");
    let names: Vec<&str> = loaded
        .file
        .services
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["access", "local", "meta", "remote"]);
    assert_eq!(loaded.file.broker.control_allow, ["meta"]);
}

#[test]
fn the_neovim_example_loads_as_msgpack_rpc() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nvim.toml");
    let loaded = Loaded::load(Some(&path), none(), &[]).expect("nvim");
    let nvim = &loaded.file.services[0];
    assert_eq!(nvim.protocol, procbroker::config::Protocol::MsgpackRpc);
    assert_eq!(nvim.ready_probe, "nvim_get_api_info");
    assert_eq!(
        (nvim.calls_to.as_str(), nvim.events_to.as_str()),
        ("host", "editor-events")
    );
    assert!(nvim.awaits_ready());
}

#[test]
fn unknown_keys_and_bad_values_are_refused_naming_key_and_file() {
    let dir = tmp("bad");
    for (text, must_say) in [
        ("[broker]\nqueue_capcity = 5\n", "queue_capcity"),
        ("[broker]\nqueue_capacity = \"many\"\n", "queue_capacity"),
        (
            "[[service]]\nname = \"a\"\ncommand = \"x\"\nworkerz = 2\n",
            "workerz",
        ),
        ("[nonsense]\n", "nonsense"),
        (
            "[[service]]\nname = \"a\"\ncommand = \"x\"\nprotocol = \"json-rpc\"\n",
            "json-rpc",
        ),
        (
            "[[service]]\nname = \"a\"\ncommand = \"x\"\nrestart = { max_restart = 1 }\n",
            "max_restart",
        ),
    ] {
        let path = write(&dir, "bad.toml", text);
        let e = Loaded::load(Some(&path), none(), &[]).expect_err(text);
        let message = e.to_string();
        assert!(matches!(e, ConfigError::Parse { .. }), "{message}");
        assert!(
            message.contains(must_say) && message.contains("bad.toml"),
            "{message}"
        );
        assert!(message.contains("line"), "{message}");
    }
    for (text, key) in [
        ("[broker]\nqueue_capacity = 0\n", "broker.queue_capacity"),
        ("[admin]\nlisten = \"localhost:80\"\n", "admin.listen"),
        (
            "[[service]]\nname = \"a.b\"\ncommand = \"x\"\n",
            "service[0].name",
        ),
        (
            "[[service]]\nname = \"a\"\ncommand = \"x\"\n[[service]]\nname = \"a\"\ncommand = \"y\"\n",
            "service[1].name",
        ),
        (
            "[[service]]\nname = \"a\"\ncommand = \"x\"\nworkers = 0\n",
            "service[0].workers",
        ),
        (
            "[[service]]\nname = \"a\"\ncommand = \"x\"\nready_probe = \"p\"\n",
            "service[0].ready_probe",
        ),
        (
            "[[service]]\nname = \"a\"\ncommand = \"x\"\nprotocol = \"procbroker\"\ncalls_to = \"b\"\n",
            "service[0].calls_to",
        ),
    ] {
        let path = write(&dir, "invalid.toml", text);
        let e = Loaded::load(Some(&path), none(), &[]).expect_err(text);
        let message = e.to_string();
        assert!(matches!(e, ConfigError::Invalid { .. }), "{message}");
        assert!(
            message.contains(key) && message.contains("invalid.toml"),
            "{message}"
        );
    }
    let missing = Loaded::load(Some(&dir.join("absent.toml")), none(), &[]).expect_err("absent");
    assert!(matches!(missing, ConfigError::Read { .. }), "{missing}");
}

#[test]
fn environment_then_flags_override_the_file() {
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let loaded = Loaded::load(
        None,
        env(&[
            ("PROCBROKER_BROKER_QUEUE_CAPACITY", "500"),
            ("PROCBROKER_ADMIN_LISTEN", "127.0.0.1:0"),
            ("PROCBROKER_BROKER_CONTROL_ALLOW", "[\"ops\"]"),
            ("PROCBROKER_PROCESS_ID", "not.a.setting"),
            ("PATH", "/bin"),
        ]),
        &[
            "broker.queue_capacity=700".into(),
            "sysmon.interval_ms=0".into(),
        ],
    )
    .expect("overrides");
    let c = loaded.broker_config();
    assert_eq!(c.queue_capacity, 700, "the flag wins over the environment");
    assert_eq!(c.control_allow, ["ops"]);
    assert_eq!(c.sysmon_interval, None);
    assert_eq!(loaded.file.admin.listen, "127.0.0.1:0");

    let e = Loaded::load(None, env(&[("PROCBROKER_BOGUS", "1")]), &[]).expect_err("bogus");
    assert!(e.to_string().contains("PROCBROKER_BOGUS"), "{e}");
    let e = Loaded::load(
        None,
        env(&[("PROCBROKER_BROKER_QUEUE_CAPACITY", "abc")]),
        &[],
    )
    .expect_err("type");
    assert!(
        e.to_string().contains("PROCBROKER_BROKER_QUEUE_CAPACITY"),
        "{e}"
    );
    let e = Loaded::load(None, env(&[("PROCBROKER_BROKER_NOPE", "1")]), &[]).expect_err("key");
    assert!(e.to_string().contains("nope"), "{e}");
    let e = Loaded::load(None, none(), &["queue_capacity=1".into()]).expect_err("no section");
    assert!(e.to_string().contains("--set queue_capacity"), "{e}");
    let e = Loaded::load(None, none(), &["broker.queue_capacity=0".into()]).expect_err("range");
    assert!(e.to_string().contains("broker.queue_capacity"), "{e}");
}

#[test]
fn a_relative_command_is_relative_to_the_file() {
    let dir = tmp("relative");
    let path = write(
        &dir,
        "p.toml",
        "[[service]]\nname = \"w\"\ncommand = \"bin/worker\"\n[[service]]\nname = \"s\"\ncommand = \"@self\"\n",
    );
    let loaded = Loaded::load(Some(&path), none(), &[]).expect("load");
    assert_eq!(
        Path::new(&loaded.file.services[0].command),
        dir.join("bin/worker")
    );
    assert_eq!(loaded.file.services[1].command, "@self");
}

#[test]
fn a_relative_script_argument_is_relative_to_the_file() {
    let dir = tmp("relative-args");
    write(&dir, "worker.py", "print('hi')\n");
    let path = write(
        &dir,
        "p.toml",
        "[[service]]\nname = \"py\"\ncommand = \"python3\"\n\
         args = [\"worker.py\", \"-u\", \"worker\", \"missing.py\", \"--level=info\"]\n",
    );
    let loaded = Loaded::load(Some(&path), none(), &[]).expect("load");
    let args = &loaded.file.services[0].args;
    assert_eq!(Path::new(&args[0]), dir.join("worker.py"));
    // Flags, words and files that are not there stay as written.
    assert_eq!(args[1..], ["-u", "worker", "missing.py", "--level=info"]);
}

#[test]
fn the_cluster_section_loads_with_overrides_and_refuses_bad_values() {
    use procbroker::config::{Balance, NatsUrls};
    // Absent: a single host, exactly as before.
    let single = Loaded::load(None, none(), &[]).expect("default");
    assert!(!single.broker_config().cluster.enabled());

    let path = write(
        &tmp("cluster"),
        "procbroker.toml",
        r#"
[cluster]
nats_url = ["nats://10.0.0.5:4222", "nats://10.0.0.6:4222"]
name = "prod"
node = "web-1"
heartbeat_ms = 500
export = ["echo"]
balance = "spread"
"#,
    );
    let loaded = Loaded::load(Some(&path), none(), &[]).expect("cluster");
    let c = loaded.broker_config().cluster;
    assert_eq!(
        c.nats_url.list(),
        ["nats://10.0.0.5:4222", "nats://10.0.0.6:4222"]
    );
    assert_eq!(
        (c.name.as_str(), c.node_name(), c.heartbeat_ms),
        ("prod", "web-1".into(), 500)
    );
    assert_eq!(c.balance, Balance::Spread);
    assert!(c.exports("echo") && !c.exports("admin"));

    // Environment, then --set, like every section; secrets stay out of files.
    let env = vec![
        ("PROCBROKER_CLUSTER_TOKEN".to_owned(), "s3cret".to_owned()),
        (
            "PROCBROKER_CLUSTER_NATS_URL".to_owned(),
            "nats://127.0.0.1:4222".to_owned(),
        ),
    ];
    let loaded = Loaded::load(Some(&path), env, &["cluster.node=web-2".into()]).expect("overrides");
    let c = loaded.broker_config().cluster;
    assert_eq!(c.nats_url, NatsUrls::One("nats://127.0.0.1:4222".into()));
    assert_eq!((c.token.as_str(), c.node.as_str()), ("s3cret", "web-2"));

    for (set, key) in [
        ("cluster.node=a.b", "cluster.node"),
        ("cluster.heartbeat_ms=0", "cluster.heartbeat_ms"),
        ("cluster.export=[\"x y\"]", "cluster.export"),
        ("cluster.user=u", "cluster.user"),
    ] {
        match Loaded::load(Some(&path), none(), &[set.into()]) {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{set}"),
            other => panic!("{set}: {other:?}"),
        }
    }
    let err = Loaded::load(Some(&path), none(), &["cluster.balance=random".into()])
        .expect_err("unknown balance");
    assert!(err.to_string().contains("balance"), "{err}");
}
