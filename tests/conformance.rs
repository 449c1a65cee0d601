//! `procbroker conformance` run as a user runs it: against the Rust SDK's
//! subject every check passes, and against a subject with deliberate
//! faults (tests/python/broken_subject.py: it ignores `cancel`, and prints
//! a line on stdout at EOF) exactly those checks fail, with details that
//! say what was seen.

mod support;

use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::{BIN, python};

/// Every check, in the order reported (PROTOCOL.md lists them).
const CHECKS: [&str; 29] = [
    "handshake",
    "ping",
    "who-am-i",
    "payload-types",
    "payload-noncanonical",
    "payload-none",
    "payload-8mib",
    "concurrency",
    "deadline",
    "timeout-cancel-seen",
    "timeout-cancel-stops",
    "caller-cancel",
    "stream",
    "stream-final-only",
    "errors",
    "unknown-method",
    "calls-out",
    "calls-out-errors",
    "calls-out-cancel",
    "events-in",
    "events-out",
    "pipelined",
    "stays-up",
    "correlation-ids",
    "deadline-absent",
    "shutdown-source",
    "drain",
    "exit-at-eof",
    "stdout-frames-only",
];

/// One kit at a time: its checks have time bounds (8 `Sleep 200` within
/// 600 ms), which two kits at once on a small machine would only test the
/// machine with.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs the kit against `subject`; its output and how long it took.
fn kit(extra: &[&str], subject: &[&str]) -> (Output, Duration) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let output = Command::new(BIN)
        .arg("conformance")
        .args(extra)
        .arg("--")
        .args(subject)
        .output()
        .expect("procbroker conformance");
    (output, started.elapsed())
}

/// The verdict lines: (`PASS`|`FAIL`, name, detail).
fn verdicts(stdout: &str) -> Vec<(String, String, String)> {
    stdout
        .lines()
        .filter(|l| l.starts_with("PASS ") || l.starts_with("FAIL "))
        .map(|l| {
            let mut words = l.splitn(3, ' ');
            let mark = words.next().unwrap_or_default().to_owned();
            let rest = words.collect::<Vec<_>>().join(" ");
            let rest = rest.trim_start();
            let (name, detail) = rest.split_once(' ').unwrap_or((rest, ""));
            (mark, name.to_owned(), detail.trim().to_owned())
        })
        .collect()
}

#[test]
fn the_rust_subject_passes_every_check() {
    let (output, took) = kit(&[], &[BIN, "worker", "conformance"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}\n(took {took:?})");
    let verdicts = verdicts(&stdout);
    let names: Vec<&str> = verdicts.iter().map(|(_, n, _)| n.as_str()).collect();
    assert_eq!(names, CHECKS, "{stdout}");
    for (mark, name, detail) in &verdicts {
        assert_eq!(mark, "PASS", "{name}: {detail}");
        assert!(!detail.is_empty(), "{name} says nothing");
    }
    assert_eq!(
        stdout.lines().last(),
        Some("conformance: 29/29 checks passed")
    );
    assert!(output.status.success(), "{:?}", output.status);
    assert!(took < Duration::from_secs(30), "the kit took {took:?}");
}

#[test]
fn at_self_and_one_worker_pass_and_json_reports_every_check() {
    let (output, _) = kit(
        &["--workers", "1", "--json"],
        &["@self", "worker", "conformance"],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON object");
    assert_eq!(report["workers"], 1);
    assert_eq!(
        report["subject"],
        serde_json::json!(["@self", "worker", "conformance"])
    );
    assert_eq!(
        (report["passed"].as_u64(), report["total"].as_u64()),
        (Some(29), Some(29))
    );
    let checks = report["checks"].as_array().expect("checks");
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, CHECKS);
    assert!(
        checks
            .iter()
            .all(|c| c["passed"] == true && c["ms"].is_u64())
    );
}

#[test]
fn a_broken_subject_fails_the_checks_it_breaks() {
    let script = format!(
        "{}/tests/python/broken_subject.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let python = python();
    let (output, took) = kit(&[], &[&python, &script]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}\n(took {took:?})");
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    let verdicts = verdicts(&stdout);
    let verdict = |name: &str| {
        verdicts
            .iter()
            .find(|(_, n, _)| n == name)
            .map(|(mark, _, detail)| (mark.as_str(), detail.as_str()))
            .unwrap_or_else(|| panic!("no verdict for {name}:\n{stdout}"))
    };
    // What it does right passes.
    for name in [
        "handshake",
        "ping",
        "payload-none",
        "concurrency",
        "deadline",
        "pipelined",
        "correlation-ids",
        "deadline-absent",
        "exit-at-eof",
    ] {
        assert_eq!(verdict(name).0, "PASS", "{name}: {}", verdict(name).1);
    }
    // It ignores cancel: the handler never sees one, and never stops.
    let (mark, detail) = verdict("timeout-cancel-seen");
    assert_eq!(mark, "FAIL");
    assert!(
        detail.contains("LastCancel of subject.0 is nil"),
        "{detail}"
    );
    let (mark, detail) = verdict("timeout-cancel-stops");
    assert_eq!(mark, "FAIL");
    assert!(detail.contains("the handler did not stop"), "{detail}");
    let (mark, detail) = verdict("caller-cancel");
    assert_eq!(mark, "FAIL");
    assert!(detail.contains("the handler did not stop"), "{detail}");
    // Its stray line, shown where it starts.
    let (mark, detail) = verdict("stdout-frames-only");
    assert_eq!(mark, "FAIL");
    assert!(detail.contains("\"exiting\\n\""), "{detail}");
    // Methods it lacks fail too, saying so.
    let (mark, detail) = verdict("stream");
    assert_eq!(mark, "FAIL");
    assert!(detail.contains("unknown_method"), "{detail}");
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("conformance: ") && summary.ends_with("/29 checks passed"),
        "{summary}"
    );
    assert!(!summary.starts_with("conformance: 29/"), "{summary}");
    assert!(took < Duration::from_secs(60), "the kit took {took:?}");
}
