//! `/events`: the stats reply once a second as server-sent events.
//!
//! Each event is one `data:` line of JSON (the `/stats` body), so a browser's
//! `EventSource` or `curl -N` reads it as is. The stream starts with a
//! `retry:` hint (reconnect after 2 s) and a first snapshot at once; when a
//! snapshot cannot be had (the broker is busy stopping) a comment keeps the
//! connection alive instead. It ends when the admin server stops or the
//! broker is gone, so an open dashboard never holds up shutdown.

use actix_web::web::Bytes;
use futures_util::Stream;
use std::time::Duration;
use tokio::sync::watch;

use crate::embed::BrokerHandle;

/// Time between snapshots.
pub const PERIOD: Duration = Duration::from_secs(1);

/// What the browser waits before reconnecting, in ms.
const RETRY_MS: u64 = 2000;

/// The event stream for one client: snapshots until `closing` turns true.
pub fn stream(
    broker: BrokerHandle,
    closing: watch::Receiver<bool>,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> {
    let hello = Bytes::from(format!("retry: {RETRY_MS}\n: procbroker stats\n\n"));
    let state = (broker, closing, None::<tokio::time::Interval>, Some(hello));
    futures_util::stream::unfold(state, |(broker, mut closing, ticks, hello)| async move {
        if let Some(hello) = hello {
            return Some((Ok(hello), (broker, closing, ticks, None)));
        }
        let mut ticks = match ticks {
            Some(ticks) => ticks,
            // The first snapshot goes out at once.
            None => tokio::time::interval(PERIOD),
        };
        // Only a stop ends the stream: an `Admin` dropped without `stop`
        // leaves its server running, and its streams with it.
        let stopped = async {
            if closing.wait_for(|closed| *closed).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = ticks.tick() => {}
            () = stopped => return None,
        }
        if *closing.borrow() {
            return None;
        }
        let chunk = match broker.stats().await {
            Ok(stats) => match serde_json::to_string(&stats) {
                Ok(json) => format!("data: {json}\n\n"),
                Err(e) => format!(": stats not encodable: {e}\n\n"),
            },
            // Stopped for good: end the stream; the browser retries
            // and finds the next broker, or nothing.
            Err(_) if !broker.metrics().connected() => return None,
            Err(e) => format!(": stats unavailable: {e}\n\n"),
        };
        Some((Ok(Bytes::from(chunk)), (broker, closing, Some(ticks), None)))
    })
}
