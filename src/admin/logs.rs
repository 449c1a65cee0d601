//! `GET /logs/{process}`: a process's stderr lines from its ring.
//!
//! - plain: `text/plain`, oldest first, one line each (`RFC 3339 time`,
//!   a space, the line as the child wrote it); `?n=N` gives the newest N.
//! - `?follow=1`: server-sent events, one event per line (`data:` the same
//!   format), after replaying the newest `n` when `n` is given. After the
//!   replay comes a comment `: live` (what `procbroker logs -f` waits for
//!   to merge the replays of a service's workers); a follower that falls
//!   more than [`FOLLOW_BUFFER`](crate::actors::log_store::FOLLOW_BUFFER)
//!   lines behind gets a comment saying how many it missed; a comment
//!   every 15 s keeps an idle connection open through proxies. A carriage
//!   return inside a line would end the event's field early, so in events
//!   (only) it is sent as `\r` (a backslash and an `r`).
//!
//! A process the broker does not know (not in its process table, no log)
//! is 404; a bad `n` or `follow` is 400.

use actix_web::HttpResponse;
use actix_web::web::Bytes;
use futures_util::Stream;
use std::time::Duration;
use tokio::sync::{broadcast, watch};

use crate::actors::log_store::{FollowLog, LogLine, TailLog};
use crate::embed::BrokerHandle;

/// Time between keep-alive comments of an idle follow stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Most lines sent in one chunk of a follow stream.
const CHUNK_LINES: usize = 256;

/// The query of `/logs/{process}`.
#[derive(Debug, serde::Deserialize)]
pub struct LogsQuery {
    /// The newest N lines.
    n: Option<String>,
    /// `1` (or `true`): follow as server-sent events.
    follow: Option<String>,
}

fn bad_request(message: String) -> HttpResponse {
    HttpResponse::BadRequest().body(format!("{message}\n"))
}

/// The handler of `/logs/{process}`.
pub(super) async fn logs_page(
    broker: &BrokerHandle,
    closing: watch::Receiver<bool>,
    id: String,
    query: LogsQuery,
) -> HttpResponse {
    let n = match query.n.as_deref() {
        None => None,
        Some(n) => match n.parse::<usize>() {
            Ok(n) => Some(n),
            Err(_) => return bad_request(format!("n={n:?}: expected a number of lines")),
        },
    };
    let follow = match query.follow.as_deref() {
        None | Some("0" | "false") => false,
        Some("1" | "true") => true,
        Some(other) => return bad_request(format!("follow={other:?}: expected 1 or 0")),
    };
    let lines = broker
        .logs()
        .send(TailLog {
            id: id.clone(),
            n: Some(n.unwrap_or(0)),
        })
        .await
        .ok()
        .flatten();
    let known = lines.is_some()
        || broker
            .processes()
            .await
            .is_ok_and(|table| table.iter().any(|p| p.id == id));
    if !known {
        return HttpResponse::NotFound().body(format!("no process {id:?}\n"));
    }
    if follow {
        return match broker.logs().send(FollowLog { id, n }).await {
            Ok((replay, receiver)) => HttpResponse::Ok()
                .content_type("text/event-stream")
                .insert_header(("Cache-Control", "no-cache"))
                .insert_header(("X-Accel-Buffering", "no"))
                .streaming(follow_stream(replay, receiver, closing)),
            Err(e) => HttpResponse::ServiceUnavailable().body(format!("{e}\n")),
        };
    }
    let lines = match n {
        // Asked for the newest 0 above only to learn whether it exists.
        Some(_) => lines.unwrap_or_default(),
        None => broker
            .logs()
            .send(TailLog { id, n: None })
            .await
            .ok()
            .flatten()
            .unwrap_or_default(),
    };
    let mut body = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for line in &lines {
        body.push_str(line);
        body.push('\n');
    }
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body(body)
}

/// One line as an event.
fn event(out: &mut String, line: &str) {
    out.push_str("data: ");
    if line.contains('\r') {
        out.push_str(&line.replace('\r', "\\r"));
    } else {
        out.push_str(line);
    }
    out.push_str("\n\n");
}

/// The replay, `: live`, then every new line until the log is forgotten,
/// the admin server stops, or the client goes away.
fn follow_stream(
    replay: Vec<LogLine>,
    receiver: broadcast::Receiver<LogLine>,
    closing: watch::Receiver<bool>,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> {
    let mut first = String::from(": procbroker logs\n\n");
    for line in &replay {
        event(&mut first, line);
    }
    first.push_str(": live\n\n");
    let state = (Some(first), receiver, closing);
    futures_util::stream::unfold(state, |(first, mut receiver, mut closing)| async move {
        if let Some(first) = first {
            return Some((Ok(Bytes::from(first)), (None, receiver, closing)));
        }
        let stopped = async {
            if closing.wait_for(|closed| *closed).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let mut out = String::new();
        tokio::select! {
            () = stopped => return None,
            _ = tokio::time::sleep(KEEP_ALIVE) => out.push_str(": keep-alive\n\n"),
            got = receiver.recv() => match got {
                Ok(line) => event(&mut out, &line),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    out.push_str(&format!(": {n} lines skipped (this reader fell behind)\n\n"));
                }
                // The log was forgotten (its process removed).
                Err(broadcast::error::RecvError::Closed) => return None,
            },
        }
        // Whatever else is there already goes in the same chunk.
        for _ in 0..CHUNK_LINES {
            match receiver.try_recv() {
                Ok(line) => event(&mut out, &line),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    out.push_str(&format!(
                        ": {n} lines skipped (this reader fell behind)\n\n"
                    ));
                }
                Err(_) => break,
            }
        }
        Some((Ok(Bytes::from(out)), (None, receiver, closing)))
    })
}
