//! The docs say only what exists. Every `procbroker` command line shown in
//! a shell block of the README and the guides runs a real subcommand with
//! real flags (`--help` of the binary says so); every TOML block loads as a
//! config file; every key of the config schema is documented, and every
//! key documented exists; every metric name shown is one `/metrics` has,
//! and every metric `/metrics` has is documented; every relative link and
//! its anchor resolves; and no page cites an issue, a session, a design
//! document or a commit.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_procbroker");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The pages a user reads.
fn pages() -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    let mut pages: Vec<PathBuf> = [
        "README.md",
        "PROTOCOL.md",
        "ARCHITECTURE.md",
        "CHANGELOG.md",
    ]
    .iter()
    .map(|p| root.join(p))
    .collect();
    let mut guides: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    guides.sort();
    pages.extend(guides);
    pages
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn name(path: &Path) -> String {
    path.strip_prefix(ROOT)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The fenced blocks of `text` whose info string starts with `lang`.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        match &mut current {
            None => {
                if let Some(info) = trimmed.strip_prefix("```")
                    && info.split([',', ' ']).next() == Some(lang)
                {
                    current = Some(String::new());
                }
            }
            Some(block) => {
                if trimmed.starts_with("```") {
                    out.push(std::mem::take(block));
                    current = None;
                } else {
                    block.push_str(line);
                    block.push('\n');
                }
            }
        }
    }
    out
}

fn help(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .arg("--help")
        .output()
        .expect("procbroker --help");
    assert!(out.status.success(), "procbroker {args:?} --help failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The subcommands `procbroker --help` lists.
fn subcommands() -> BTreeSet<String> {
    let text = help(&[]);
    let commands = text
        .split("Commands:")
        .nth(1)
        .and_then(|s| s.split("Options:").next())
        .expect("a Commands: section");
    commands
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Each `procbroker …` invocation in a shell line, as its words.
fn invocations(line: &str) -> Vec<Vec<String>> {
    let line = line.split(" #").next().unwrap_or("");
    let line = line.trim().trim_start_matches("$ ");
    line.split(['|', '&', ';'])
        .filter_map(|segment| {
            let words: Vec<&str> = segment.split_whitespace().collect();
            let at = words
                .iter()
                .position(|w| *w == "procbroker" || w.ends_with("/procbroker"))?;
            // Only a command in its own right (not `cargo install procbroker`).
            let before = &words[..at];
            let wrapper = before.iter().all(|w| {
                w.contains('=') || matches!(*w, "taskset" | "-c" | "0" | "prlimit" | "exec")
            });
            wrapper.then(|| words[at + 1..].iter().map(|w| (*w).to_owned()).collect())
        })
        .collect()
}

#[test]
fn every_command_shown_runs_a_real_subcommand_with_real_flags() {
    let subcommands = subcommands();
    let mut helps: BTreeMap<String, String> = BTreeMap::new();
    let mut checked = 0;
    for page in pages() {
        for block in blocks(&read(&page), "sh") {
            for line in block.lines() {
                for words in invocations(line) {
                    let Some(sub) = words.first() else { continue };
                    assert!(
                        subcommands.contains(sub),
                        "{}: `{line}`: no subcommand {sub:?} (have {subcommands:?})",
                        name(&page)
                    );
                    let text = helps
                        .entry(sub.clone())
                        .or_insert_with(|| help(&[sub]))
                        .clone();
                    // After `--` the words are another program's (the
                    // subject of `procbroker conformance`).
                    let own = words.iter().take_while(|w| *w != "--");
                    for flag in own.filter(|w| w.starts_with("--")) {
                        let flag = flag.split('=').next().unwrap_or(flag);
                        assert!(
                            text.contains(flag),
                            "{}: `{line}`: `procbroker {sub}` has no {flag}",
                            name(&page)
                        );
                    }
                    if sub == "worker"
                        && let Some(worker) = words.get(1)
                        && !worker.starts_with('-')
                    {
                        assert!(
                            text.contains(&format!("- {worker}:")),
                            "{}: `{line}`: no built-in worker {worker:?}",
                            name(&page)
                        );
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} command lines found");
}

#[test]
fn every_toml_block_loads_as_a_config_file() {
    let mut checked = 0;
    for page in pages() {
        for block in blocks(&read(&page), "toml") {
            if let Err(e) = toml::from_str::<procbroker::config::file::FileConfig>(&block) {
                panic!("{}: a TOML block does not load: {e}\n{block}", name(&page));
            }
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} TOML blocks");
}

/// Dotted key paths of a TOML value (`restart.max_restarts`).
fn keys(value: &toml::Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let toml::Value::Table(table) = value {
        for (k, v) in table {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                // An empty table is a map of the user's (`env`): one key.
                toml::Value::Table(t) if !t.is_empty() => keys(v, &path, out),
                _ => {
                    out.insert(path);
                }
            }
        }
    }
}

/// The keys of a section, as the schema has them.
fn schema() -> BTreeMap<&'static str, BTreeSet<String>> {
    use procbroker::config::{HealthCheck, ServiceConfig};
    let file: procbroker::config::file::FileConfig = toml::from_str("").expect("defaults");
    let value = toml::Value::try_from(&file).expect("the default config as TOML");
    let mut out = BTreeMap::new();
    for section in ["broker", "admin", "sysmon", "logs", "cluster"] {
        let mut set = BTreeSet::new();
        keys(&value[section], "", &mut set);
        out.insert(section, set);
    }
    // Every optional key set, so that none is left out of the TOML.
    let mut service: ServiceConfig = toml::from_str(
        r#"
        name = "x"
        command = "y"
        cwd = "."
        user = "nobody"
        group = "nogroup"
        depends_on = ["z"]
        limits = { open_files = 1 }
        balance = "least_pending"
        recycle = { max_requests = 1 }
        "#,
    )
    .expect("a service with every optional key");
    service.health = Some(HealthCheck::default());
    let mut set = BTreeSet::new();
    keys(
        &toml::Value::try_from(&service).expect("a service as TOML"),
        "",
        &mut set,
    );
    // `health`, `limits` and `recycle` are documented as a whole (their
    // keys in prose and in their own guides).
    for whole in ["health", "limits", "recycle"] {
        set.retain(|k| !k.starts_with(&format!("{whole}.")));
        set.insert(whole.into());
    }
    out.insert("service", set);
    out
}

/// The first column's keys of every table under a heading naming `section`.
fn documented_keys(text: &str, heading: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with('#') {
            inside = line.contains(heading);
            continue;
        }
        if inside
            && let Some(cell) = line.strip_prefix("| `")
            && let Some(key) = cell.split('`').next()
        {
            out.insert(key.to_owned());
        }
    }
    out
}

#[test]
fn every_config_key_is_documented_and_every_documented_key_exists() {
    let schema = schema();
    let configuration = read(&Path::new(ROOT).join("docs/configuration.md"));
    let hosts = read(&Path::new(ROOT).join("docs/several-hosts.md"));
    for (section, heading, page) in [
        ("broker", "`[broker]`", &configuration),
        ("admin", "`[admin]`", &configuration),
        ("sysmon", "`[sysmon]`", &configuration),
        ("logs", "`[logs]`", &configuration),
        ("service", "`[[service]]`", &configuration),
        ("cluster", "Configuration", &hosts),
    ] {
        let documented = documented_keys(page, heading);
        let real = &schema[section];
        let missing: Vec<_> = real.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(real).collect();
        assert!(
            missing.is_empty(),
            "[{section}] keys not documented: {missing:?}"
        );
        assert!(
            unknown.is_empty(),
            "[{section}] documented keys that do not exist: {unknown:?}"
        );
    }
}

/// Every metric family `/metrics` can have: from the stats of a broker
/// with a process, a service and, for the cluster's families, a node.
fn metric_names() -> BTreeSet<String> {
    use procbroker::protocol::stats::{ClusterStats, MessageStats, NodeStats, ProcessStats};
    let mut stats = MessageStats::default();
    let process = ProcessStats {
        counters: Default::default(),
        faults: Default::default(),
        status: procbroker::protocol::rpc::ProcessStatus::Ready,
        pid: Some(1),
        queue_depth: 0,
        pending: 0,
        exit_code: None,
        service: "echo".into(),
        uptime_s: Some(1),
    };
    stats.per_process.insert("echo.0".into(), process);
    let sample: procbroker::protocol::ProcessMetrics = serde_json::from_value(serde_json::json!({
        "pid": 1, "id": "echo.0", "vmrss": 1, "vmsize": 1, "threads": 1,
        "state": "S", "timestamp": "2026-01-01T00:00:00Z"
    }))
    .expect("a sample");
    stats.process_metrics.insert("echo.0".into(), sample);
    stats
        .latency_window_us
        .insert("echo".into(), Default::default());
    stats.latency_us.insert("echo".into(), Default::default());
    stats.total.broker_errors.insert("timeout".into(), 0);
    let mut cluster = ClusterStats::default();
    cluster.nodes.insert("b".into(), NodeStats::default());
    stats.cluster = Some(cluster);
    let sums = BTreeMap::from([("echo".to_owned(), 0.0)]);
    procbroker::admin::metrics::families(&stats, &sums)
        .iter()
        .map(|f| f.name().to_owned())
        .collect()
}

#[test]
fn every_metric_shown_exists_and_every_metric_is_documented() {
    let real = metric_names();
    assert!(real.len() > 20, "{real:?}");
    let mut shown = BTreeSet::new();
    for page in pages() {
        let text = read(&page);
        for (i, _) in text.match_indices("procbroker_") {
            // Part of another word (a bench id such as `actors/procbroker_router`).
            let before = text[..i].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '/' || c == '_') {
                continue;
            }
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            // A summary's series carry suffixes of their family.
            let family = ["_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| real.contains(*f)))
                .map_or(name.clone(), str::to_owned);
            assert!(
                real.contains(&family) || name.ends_with('_'),
                "{}: {name} is not a metric /metrics has",
                name_of(&page)
            );
            shown.insert(family);
        }
    }
    let metrics_page = read(&Path::new(ROOT).join("docs/dashboard-and-metrics.md"));
    let undocumented: Vec<_> = real
        .iter()
        .filter(|m| !metrics_page.contains(&format!("`{m}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "docs/dashboard-and-metrics.md does not name {undocumented:?}"
    );
}

fn name_of(path: &Path) -> String {
    name(path)
}

/// GitHub's anchor of a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if !fenced && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut checked = 0;
    for page in pages() {
        let text = read(&page);
        let dir = page.parent().expect("folder");
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = &rest[..end];
            if target.contains("://") || target.starts_with("mailto:") || target.contains(' ') {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
            let path = if file.is_empty() {
                page.clone()
            } else {
                dir.join(file)
            };
            assert!(
                path.exists(),
                "{}: link to {target}: no such file",
                name(&page)
            );
            if !anchor.is_empty() {
                let have = anchors(&read(&path));
                assert!(
                    have.contains(anchor),
                    "{}: link to {target}: no heading with that anchor in {}",
                    name(&page),
                    name(&path)
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} links");
}

#[test]
fn no_page_cites_an_issue_a_session_a_design_document_or_a_commit() {
    for page in pages() {
        let text = read(&page);
        let lower = text.to_lowercase();
        for (needle, what) in [
            ("design.md", "the design document"),
            ("design 1", "a design section"),
            ("the design", "the design"),
            ("issue 1", "an issue"),
            ("issue 2", "an issue"),
            ("issue 3", "an issue"),
            ("this session", "a session"),
            ("earlier session", "a session"),
            ("session's", "a session"),
            ("th session", "a session"),
        ] {
            assert!(
                !lower.contains(needle),
                "{}: cites {what} ({needle:?})",
                name(&page)
            );
        }
        // A commit hash: 7 to 40 hex digits with both letters and digits.
        for word in text.split(|c: char| !c.is_ascii_alphanumeric()) {
            let hex = (7..=40).contains(&word.len())
                && word.chars().all(|c| c.is_ascii_hexdigit())
                && word.chars().any(|c| c.is_ascii_digit())
                && word.chars().any(|c| c.is_ascii_alphabetic());
            assert!(!hex, "{}: looks like a commit hash: {word}", name(&page));
        }
    }
}

/// Comments and `--help` stand on their own: no source file points at the
/// design document or its sections instead of saying the rule.
#[test]
fn no_source_file_cites_the_design_document() {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| {
                ["rs", "py", "toml", "html", "sh", "go", "mjs", "js", "ts"]
                    .contains(&e.to_str().unwrap_or(""))
            }) {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    for dir in ["src", "tests", "benches", "examples", "scripts", "sdk"] {
        walk(&Path::new(ROOT).join(dir), &mut files);
    }
    assert!(files.len() > 50, "only {} files", files.len());
    let needle = ["DESIGN", " ", "1"].concat();
    for file in files {
        if file.components().any(|c| c.as_os_str() == "node_modules") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for (n, line) in text.lines().enumerate() {
            let cites = line.contains(&["DESIGN", ".md"].concat())
                || line.contains(&["DESIGN", " §"].concat())
                || (0..10).any(|d| line.contains(&needle.replace('1', &d.to_string())));
            assert!(
                !cites,
                "{}:{}: cites the design document: {line}",
                file.display(),
                n + 1
            );
        }
    }
}

#[test]
fn the_readme_stays_a_front_page() {
    let readme = read(&Path::new(ROOT).join("README.md"));
    let lines = readme.lines().count();
    assert!(lines <= 250, "README.md has {lines} lines (at most 250)");
    // The two commands come first among the shell blocks.
    let sh = blocks(&readme, "sh");
    assert_eq!(sh[0].trim(), "cargo run --release -- run");
    assert_eq!(sh[1].trim(), "bash scripts/test");
}

/// The README's Python service really serves under the broker.
#[actix::test]
async fn the_readmes_python_service_serves_under_the_broker() {
    let readme = read(&Path::new(ROOT).join("README.md"));
    let python = blocks(&readme, "python");
    assert_eq!(python.len(), 1, "one Python block");
    let dir = std::env::temp_dir().join(format!("procbroker-docs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let script = dir.join("echo.py");
    std::fs::write(&script, &python[0]).expect("write");
    let broker = procbroker::embed::ProcBroker::builder()
        .sysmon_interval(None)
        .start();
    let python3 = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    broker
        .spawn(
            procbroker::config::ServiceConfig::new("pyecho", python3)
                .args([script.display().to_string()])
                .workers(2),
        )
        .await
        .expect("spawn");
    for i in 0..10u32 {
        let reply = broker.call("pyecho", "Echo", &i).await.expect("call");
        assert_eq!(reply.payload_as::<u32>().expect("u32"), i);
    }
    let report = broker.shutdown().await;
    assert_eq!(report.stopped.len(), 2);
}
