//! Sysmon against the kernel: its figures for this very process equal what
//! `/proc/self/status` says (read here independently), and a vanished or
//! zombie child is reported with its state and no memory figures, never 0 kB.
//! One test in its own binary, so no other test's threads change the count.

use procbroker::actors::messages::{SampleNow, Watch};
use procbroker::embed::ProcBroker;
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

/// `/proc/self/status` as `key → first word of the value`.
fn proc_self_status() -> HashMap<String, String> {
    std::fs::read_to_string("/proc/self/status")
        .expect("read /proc/self/status")
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            Some((key.to_owned(), value.split_whitespace().next()?.to_owned()))
        })
        .collect()
}

fn kb(status: &HashMap<String, String>, key: &str) -> u64 {
    status[key].parse().expect("a number of kB")
}

#[actix::test]
async fn sysmon_reports_this_process_and_vanished_or_zombie_children_truthfully() {
    let broker = ProcBroker::builder().sysmon_interval(None).start();

    // A child that exited and was reaped (its pid is gone), and one that
    // exited and was not (a zombie until we wait for it).
    let reaped = Command::new("true").spawn().expect("spawn true");
    let reaped_pid = reaped.id();
    let mut reaped = reaped;
    reaped.wait().expect("reap");
    let mut zombie = Command::new("true").spawn().expect("spawn true");
    let zombie_pid = zombie.id();
    // Let it exit: a zombie until we wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(format!("/proc/{zombie_pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    }) {
        assert!(std::time::Instant::now() < deadline, "true never exited");
        std::thread::sleep(Duration::from_millis(5));
    }
    for (id, pid) in [("gone.0", reaped_pid), ("zombie.0", zombie_pid)] {
        broker
            .sysmon()
            .send(Watch {
                id: id.into(),
                pid,
                max_rss_kb: 0,
            })
            .await
            .expect("sysmon");
    }

    let before = proc_self_status();
    let samples = broker.sysmon().send(SampleNow).await.expect("sysmon");
    let after = proc_self_status();

    let me = samples
        .iter()
        .find(|s| s.id == "broker")
        .expect("broker sample");
    assert_eq!(me.pid, std::process::id());
    // Memory moves a little between reads: the sample lies between the two.
    for (figure, key) in [(me.vmrss, "VmRSS"), (me.vmsize, "VmSize")] {
        let (lo, hi) = (
            kb(&before, key).min(kb(&after, key)),
            kb(&before, key).max(kb(&after, key)),
        );
        let value = figure.expect("a live process has memory figures");
        assert!(
            (lo..=hi).contains(&value),
            "{key}: {value} kB not in {lo}..={hi}"
        );
    }
    assert_eq!(me.threads, Some(after["Threads"].parse().expect("threads")));
    assert_eq!(
        me.threads,
        Some(before["Threads"].parse().expect("threads"))
    );
    // The state is the main thread's, which the test harness runs beside
    // the test's own: it moves between reads (R or S under load), so only
    // its being a live process's state is certain.
    assert!(
        ["R", "S", "D"].contains(&me.state.as_str()),
        "broker state {:?} (before {:?}, after {:?})",
        me.state,
        before["State"],
        after["State"]
    );
    assert!(
        humantime::parse_rfc3339(&me.timestamp).is_ok(),
        "{}",
        me.timestamp
    );

    let gone = samples
        .iter()
        .find(|s| s.id == "gone.0")
        .expect("gone sample");
    assert_eq!((gone.pid, gone.state.as_str()), (reaped_pid, "exited"));
    assert_eq!((gone.vmrss, gone.vmsize, gone.threads), (None, None, None));

    let z = samples
        .iter()
        .find(|s| s.id == "zombie.0")
        .expect("zombie sample");
    assert_eq!(z.state, "Z");
    assert_eq!(
        (z.vmrss, z.vmsize),
        (None, None),
        "a zombie has no memory, not 0 kB"
    );
    zombie.wait().expect("reap the zombie");

    // The samples reached the MetricsStore.
    let stats = broker.stats().await.expect("stats");
    assert_eq!(stats.process_metrics["zombie.0"].state, "Z");
    assert_eq!(stats.process_metrics["broker"].pid, std::process::id());
}
