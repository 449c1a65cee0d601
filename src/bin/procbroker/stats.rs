//! `procbroker stats`: a running broker's `GetMessageStats`, as a table.

use anyhow::{Context, Result};
use procbroker::protocol::MessageStats;
use std::fmt::Write;

/// Fetches `http://ADMIN/stats` and prints it.
pub fn stats(admin: &str, json: bool) -> Result<()> {
    let url = format!("http://{admin}/stats");
    let body = ureq::get(&url)
        .call()
        .with_context(|| {
            format!("GET {url} (is `procbroker run` up, with [admin] listen = {admin:?}?)")
        })?
        .body_mut()
        // A broker with thousands of processes answers more than ureq's
        // default 10 MB; stats are worth reading whole.
        .with_config()
        .limit(1 << 30)
        .read_to_string()
        .with_context(|| format!("reading {url}"))?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let stats: MessageStats =
        serde_json::from_str(&body).with_context(|| format!("{url} is not a stats reply"))?;
    print!("{}", table(&stats));
    Ok(())
}

fn kb(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |kb| format!("{:.1}M", kb as f64 / 1024.0))
}

/// The human view: one line per process, then latency per service.
pub fn table(s: &MessageStats) -> String {
    let mut out = String::new();
    let t = &s.total;
    let _ = writeln!(
        out,
        "procbroker {}  up {:.0}s  requests {}  responses {}  errors {}  events {}  pending {}",
        s.version,
        s.uptime_s,
        t.counters.request_count,
        t.counters.response_count,
        t.counters.error_count,
        t.counters.event_count,
        t.pending
    );
    let _ = writeln!(
        out,
        "\n{:<16} {:<10} {:>8} {:>8} {:>4} {:>4} {:>9} {:>9} {:>9} {:>6} {:>5} {:>6}",
        "PROCESS",
        "STATUS",
        "PID",
        "RSS",
        "THR",
        "RST",
        "SENT",
        "RECEIVED",
        "REQUESTS",
        "ERRORS",
        "BAD",
        "QUEUE"
    );
    for (id, p) in &s.per_process {
        let m = s.process_metrics.get(id);
        let _ = writeln!(
            out,
            "{:<16} {:<10} {:>8} {:>8} {:>4} {:>4} {:>9} {:>9} {:>9} {:>6} {:>5} {:>6}",
            id,
            format!("{:?}", p.status).to_lowercase(),
            p.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            kb(m.and_then(|m| m.vmrss)),
            m.and_then(|m| m.threads)
                .map_or_else(|| "-".into(), |t| t.to_string()),
            p.faults.restarts,
            p.counters.total_sent,
            p.counters.total_received,
            p.counters.request_count,
            p.counters.error_count,
            p.faults.bad_frames,
            p.queue_depth
        );
    }
    let _ = writeln!(
        out,
        "\n{:<16} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "LATENCY µs", "COUNT", "P50", "P90", "P99", "P99.9", "MAX"
    );
    for (service, q) in &s.latency_us {
        let _ = writeln!(
            out,
            "{:<16} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            service, q.count, q.p50, q.p90, q.p99, q.p999, q.max
        );
    }
    out
}
