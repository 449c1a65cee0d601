//! `procbroker stats`: a running broker's `GetMessageStats`, as a table,
//! once or (`--watch`) redrawn every second like `top`.

use anyhow::{Context, Result};
use procbroker::protocol::MessageStats;
use std::fmt::Write;
use std::io::Write as _;
use std::time::{Duration, Instant};

/// Fetches `http://ADMIN/stats` and prints it.
pub fn stats(admin: &str, json: bool) -> Result<()> {
    let body = fetch(admin)?;
    if json {
        println!("{body}");
        return Ok(());
    }
    print!("{}", table(&parse(admin, &body)?, None));
    Ok(())
}

/// Redraws the table every second until interrupted. A broker that stops
/// answering is said on screen and tried again, as `top` would.
pub fn watch(admin: &str) -> Result<()> {
    // The first fetch fails loudly: a wrong address is a usage error.
    let mut previous = (Instant::now(), parse(admin, &fetch(admin)?)?);
    redraw(&table(&previous.1, None));
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = Instant::now();
        match fetch(admin).and_then(|body| parse(admin, &body)) {
            Ok(stats) => {
                let dt = now.duration_since(previous.0).as_secs_f64();
                redraw(&table(&stats, Some((&previous.1, dt))));
                previous = (now, stats);
            }
            Err(e) => redraw(&format!("{}\n\n{e:#}\n", table(&previous.1, None))),
        }
    }
}

/// Home, clear, draw: one write, so the screen never shows half a table.
fn redraw(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "\x1b[H\x1b[2J{text}\nevery 1 s; Ctrl-C to quit\n");
    let _ = out.flush();
}

fn fetch(admin: &str) -> Result<String> {
    let url = format!("http://{admin}/stats");
    ureq::get(&url)
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
        .with_context(|| format!("reading {url}"))
}

fn parse(admin: &str, body: &str) -> Result<MessageStats> {
    serde_json::from_str(body).with_context(|| format!("http://{admin}/stats is not a stats reply"))
}

fn kb(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |kb| format!("{:.1}M", kb as f64 / 1024.0))
}

fn dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// The human view: one line per process, then latency per service. With a
/// previous snapshot and the seconds since it, messages per second too.
pub fn table(s: &MessageStats, previous: Option<(&MessageStats, f64)>) -> String {
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
        "\n{:<16} {:<10} {:>8} {:>8} {:>4} {:>4} {:>4} {:>7} {:>9} {:>9} {:>9} {:>6} {:>5} {:>6} {:>7} {:>6} {:>8}",
        "PROCESS",
        "STATUS",
        "PID",
        "RSS",
        "THR",
        "RST",
        "RCY",
        "UP",
        "SENT",
        "RECEIVED",
        "REQUESTS",
        "ERRORS",
        "BAD",
        "CANCEL",
        "PARTIAL",
        "QUEUE",
        "MSG/S"
    );
    for (id, p) in &s.per_process {
        let m = s.process_metrics.get(id);
        let rate = previous.and_then(|(before, dt)| {
            let old = before.per_process.get(id)?;
            let moved =
                |c: &procbroker::protocol::stats::MessageCounters| c.total_sent + c.total_received;
            (dt > 0.0).then(|| moved(&p.counters).saturating_sub(moved(&old.counters)) as f64 / dt)
        });
        let _ = writeln!(
            out,
            "{:<16} {:<10} {:>8} {:>8} {:>4} {:>4} {:>4} {:>7} {:>9} {:>9} {:>9} {:>6} {:>5} {:>6} {:>7} {:>6} {:>8}",
            id,
            format!("{:?}", p.status).to_lowercase(),
            dash(p.pid),
            kb(m.and_then(|m| m.vmrss)),
            dash(m.and_then(|m| m.threads)),
            p.faults.restarts,
            p.faults.recycles,
            p.uptime_s.map_or_else(|| "-".into(), |s| format!("{s}s")),
            p.counters.total_sent,
            p.counters.total_received,
            p.counters.request_count,
            p.counters.error_count,
            p.faults.bad_frames,
            p.faults.cancels,
            p.faults.partial_replies,
            p.queue_depth,
            rate.map_or_else(|| "-".into(), |r| format!("{r:.0}"))
        );
    }
    latency_table(&mut out, "LATENCY µs", &s.latency_us);
    if !s.latency_window_us.is_empty() {
        latency_table(&mut out, "WINDOW µs", &s.latency_window_us);
    }
    let errors: Vec<String> = t
        .broker_errors
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(code, n)| format!("{code} {n}"))
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(out, "\nbroker errors: {}", errors.join(", "));
    }
    if let Some(c) = &s.cluster {
        nodes_table(&mut out, c);
    }
    out
}

/// The cluster: this node's connection, then one row per other node.
fn nodes_table(out: &mut String, c: &procbroker::protocol::ClusterStats) {
    let services = |s: &std::collections::BTreeMap<String, u32>| {
        let list: Vec<String> = s.iter().map(|(k, n)| format!("{k}:{n}")).collect();
        if list.is_empty() {
            "-".into()
        } else {
            list.join(",")
        }
    };
    let _ = writeln!(
        out,
        "\ncluster {}: node {} {}, {} reconnects, {} slow-consumer events",
        c.name,
        c.node,
        match (c.connected, c.cluster_conflict) {
            (false, _) => "NOT CONNECTED",
            (true, true) => "OUT OF THE CLUSTER: another broker instance holds this node name",
            (true, false) => "connected",
        },
        c.reconnects,
        c.slow_consumers
    );
    let ignored =
        c.malformed_heartbeats + c.nodes_ignored + c.services_ignored + c.dropped_messages;
    if ignored > 0 {
        let _ = writeln!(
            out,
            "ignored: {} unreadable heartbeats, {} from nodes past max_nodes, {} services past 1000 a node, {} messages dropped",
            c.malformed_heartbeats, c.nodes_ignored, c.services_ignored, c.dropped_messages
        );
    }
    let _ = writeln!(
        out,
        "{:<16} {:<5} {:>8} {:>10} {:>9} {:>6} {:>7} {:>9}  SERVICES",
        "NODE", "UP", "SEEN MS", "REPLIES", "P50 µs", "LATE", "NO RESP", "TOO LARGE"
    );
    for (name, n) in &c.nodes {
        let _ = writeln!(
            out,
            "{:<16} {:<5} {:>8} {:>10} {:>9} {:>6} {:>7} {:>9}  {}",
            name,
            if n.up { "yes" } else { "NO" },
            n.last_seen_ms,
            n.counters.response_count + n.counters.error_count,
            n.latency_us.p50,
            n.faults.late_replies,
            n.no_responders,
            n.too_large,
            services(&n.services)
        );
    }
}

/// One latency table: a title row, then one row per service.
fn latency_table(
    out: &mut String,
    title: &str,
    rows: &std::collections::BTreeMap<String, procbroker::protocol::stats::LatencyQuantiles>,
) {
    let _ = writeln!(
        out,
        "\n{:<16} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        title, "COUNT", "P50", "P90", "P99", "P99.9", "MAX"
    );
    for (service, q) in rows {
        let _ = writeln!(
            out,
            "{:<16} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            service, q.count, q.p50, q.p90, q.p99, q.p999, q.max
        );
    }
}
