//! `procbroker logs PROCESS|SERVICE [-n N] [-f] [--admin ADDR]`: a
//! process's last stderr lines from a running broker's `/logs/{process}`,
//! or a service's: its workers' lines merged in time order, N in total,
//! each prefixed with its process id and a space. With `-f`, new lines as
//! they come (server-sent events), each worker's stream read by a thread
//! of its own; the workers followed are those the service has when the
//! command starts (a worker that restarts keeps its id, and its stream).

use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Write};
use std::sync::mpsc;

/// What a worker's follow stream says.
enum Event {
    Line(String),
    /// The replay is over; what follows is new.
    Live,
    /// The stream ended (the broker stopped, the process was removed).
    End(Option<String>),
}

fn url(admin: &str, path: &str) -> String {
    format!("http://{admin}{path}")
}

/// GET `path`: `Ok(None)` for a 404.
fn get(admin: &str, path: &str) -> Result<Option<String>> {
    let url = url(admin, path);
    match ureq::get(&url).call() {
        Ok(mut response) => Ok(Some(
            response
                .body_mut()
                .with_config()
                .limit(1 << 30)
                .read_to_string()
                .with_context(|| format!("reading {url}"))?,
        )),
        Err(ureq::Error::StatusCode(404)) => Ok(None),
        Err(e) => Err(e).with_context(|| {
            format!("GET {url} (is `procbroker run` up, with [admin] listen = {admin:?}?)")
        }),
    }
}

/// The processes to show: `[target]` when it is a process, else the
/// workers of the service `target` (by worker number).
fn workers(admin: &str, target: &str) -> Result<(bool, Vec<String>)> {
    if get(admin, &format!("/logs/{target}?n=0"))?.is_some() {
        return Ok((false, vec![target.to_owned()]));
    }
    let stats = get(admin, "/stats")?.unwrap_or_default();
    let stats: procbroker::protocol::MessageStats = serde_json::from_str(&stats)
        .with_context(|| format!("{} is not a stats reply", url(admin, "/stats")))?;
    let mut ids: Vec<String> = stats
        .per_process
        .iter()
        .filter(|(_, p)| p.service == target)
        .map(|(id, _)| id.clone())
        .collect();
    if ids.is_empty() {
        bail!("no process or service {target:?} at {admin}");
    }
    let number = |id: &str| {
        id.rsplit_once('.')
            .and_then(|(_, n)| n.parse::<u64>().ok())
            .unwrap_or(u64::MAX)
    };
    ids.sort_by_key(|id| number(id));
    Ok((true, ids))
}

/// The time a stored line starts with (RFC 3339, fixed width: it sorts as
/// text).
fn time_of(line: &str) -> &str {
    line.split_once(' ').map_or(line, |(t, _)| t)
}

/// The newest `n` of the workers' lines, merged in time order (a stable
/// sort: lines of one worker keep their order, ties keep worker order).
fn merge(per_worker: Vec<(String, Vec<String>)>, n: usize) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = per_worker
        .into_iter()
        .flat_map(|(id, lines)| lines.into_iter().map(move |l| (id.clone(), l)))
        .collect();
    all.sort_by(|a, b| time_of(&a.1).cmp(time_of(&b.1)));
    let skip = all.len().saturating_sub(n);
    all.split_off(skip)
}

/// Writes to stdout; false once stdout is gone (`| head`).
fn emit(out: &mut impl Write, prefix: Option<&str>, line: &str) -> bool {
    let written = match prefix {
        Some(id) => writeln!(out, "{id} {line}"),
        None => writeln!(out, "{line}"),
    };
    written.is_ok()
}

/// The command.
pub fn logs(admin: &str, target: &str, n: usize, follow: bool) -> Result<()> {
    let (prefixed, ids) = workers(admin, target)?;
    let mut out = std::io::stdout().lock();
    if !follow {
        let mut per_worker = Vec::new();
        for id in &ids {
            let body = get(admin, &format!("/logs/{id}?n={n}"))?.unwrap_or_default();
            per_worker.push((id.clone(), body.lines().map(str::to_owned).collect()));
        }
        for (id, line) in merge(per_worker, n) {
            if !emit(&mut out, prefixed.then_some(id.as_str()), &line) {
                return Ok(());
            }
        }
        let _ = out.flush();
        return Ok(());
    }
    let (tx, rx) = mpsc::channel::<(usize, Event)>();
    for (i, id) in ids.iter().enumerate() {
        let (tx, url) = (
            tx.clone(),
            url(admin, &format!("/logs/{id}?follow=1&n={n}")),
        );
        std::thread::spawn(move || {
            let end = read_events(&url, |e| tx.send((i, e)).is_ok());
            let _ = tx.send((i, Event::End(end.err().map(|e| format!("{e:#}")))));
        });
    }
    drop(tx);
    // The replays first, merged; then every line as it comes.
    let mut replays: Vec<(String, Vec<String>)> =
        ids.iter().map(|id| (id.clone(), Vec::new())).collect();
    let mut waiting = ids.len();
    let mut live = vec![false; ids.len()];
    let mut ended = 0;
    let mut errors = Vec::new();
    while waiting > 0 {
        let Ok((i, event)) = rx.recv() else { break };
        match event {
            Event::Line(line) => replays[i].1.push(line),
            Event::Live => {
                live[i] = true;
                waiting -= 1;
            }
            Event::End(error) => {
                ended += 1;
                if !live[i] {
                    waiting -= 1;
                }
                errors.extend(error.map(|e| format!("{}: {e}", ids[i])));
            }
        }
    }
    for (id, line) in merge(replays, n) {
        if !emit(&mut out, prefixed.then_some(id.as_str()), &line) {
            return Ok(());
        }
    }
    let _ = out.flush();
    while ended < ids.len() {
        let Ok((i, event)) = rx.recv() else { break };
        match event {
            Event::Line(line) => {
                if !emit(&mut out, prefixed.then_some(ids[i].as_str()), &line)
                    || out.flush().is_err()
                {
                    return Ok(());
                }
            }
            Event::Live => {}
            Event::End(error) => {
                ended += 1;
                errors.extend(error.map(|e| format!("{}: {e}", ids[i])));
            }
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    eprintln!(
        "procbroker logs: the broker closed the stream (stopped, or the process was removed)"
    );
    Ok(())
}

/// Reads one follow stream: each `data:` line is a log line, the `: live`
/// comment ends the replay. Stops when `each` returns false.
fn read_events(url: &str, mut each: impl FnMut(Event) -> bool) -> Result<()> {
    let response = ureq::get(url)
        .call()
        .with_context(|| format!("GET {url}"))?;
    let mut reader = BufReader::new(response.into_body().into_reader());
    let mut line = String::new();
    loop {
        line.clear();
        if reader
            .read_line(&mut line)
            .with_context(|| format!("reading {url}"))?
            == 0
        {
            return Ok(());
        }
        let text = line.trim_end_matches(['\n', '\r']);
        let event = if let Some(data) = text.strip_prefix("data:") {
            Event::Line(data.strip_prefix(' ').unwrap_or(data).to_owned())
        } else if text == ": live" {
            Event::Live
        } else {
            continue;
        };
        if !each(event) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_workers_in_time_order_and_keeps_the_newest_n() {
        let a = (
            "w.0".to_owned(),
            vec![
                "2026-01-01T00:00:01.000000Z a1".to_owned(),
                "2026-01-01T00:00:03.000000Z a3".into(),
            ],
        );
        let b = (
            "w.1".to_owned(),
            vec![
                "2026-01-01T00:00:02.000000Z b2".to_owned(),
                "2026-01-01T00:00:03.000000Z b3".into(),
            ],
        );
        let merged = merge(vec![a.clone(), b.clone()], 10);
        let order: Vec<&str> = merged.iter().map(|(_, l)| &l[28..]).collect();
        assert_eq!(order, ["a1", "b2", "a3", "b3"]);
        let newest = merge(vec![a, b], 2);
        assert_eq!(
            newest[0],
            (
                "w.0".to_owned(),
                "2026-01-01T00:00:03.000000Z a3".to_owned()
            )
        );
        assert_eq!(newest.len(), 2);
    }
}
