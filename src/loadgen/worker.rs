//! `procbroker worker bench-worker`: the benchmark worker of the request
//! lifecycle, written with the Rust SDK.
//!
//! - `Repeat [n, bin]`: to a caller that asked for a stream, `bin` (verbatim
//!   each time) as `n` partial replies, then the final reply `n`.
//! - `Hold [deadline, bin]`: waits until the broker cancels the request,
//!   then notes how long after `deadline` (the caller's deadline, in
//!   CLOCK_MONOTONIC nanoseconds) the handler saw the cancel. A request
//!   that is not cancelled within 2 s of its deadline is answered nil.
//! - `Cancels`: what `Hold` noted, as [`CancelTimes`].

use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use super::monotonic_ns;
use crate::protocol::{CancelReason, Envelope, Payload};
use crate::service::{
    Client, Context, HandlerError, HandlerResult, Methods, PartialError, Partials,
};

/// How long after its deadline `Hold` waits for a cancel before it answers.
const HOLD_PAST_DEADLINE: Duration = Duration::from_secs(2);
/// Most latencies `Hold` keeps (8 MB of them); later cancels are counted only.
const MAX_KEPT: usize = 1_000_000;

/// What `Hold` noted of the cancels it saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelTimes {
    /// Cancels seen.
    pub count: u64,
    /// Of those, how many had another reason than `timeout`.
    pub other_reasons: u64,
    /// Of those, how many came before the caller's deadline (counted as 0).
    pub early: u64,
    /// For each cancel (the first million), from the caller's deadline to
    /// the handler seeing it, in nanoseconds: several workers' lists merge.
    pub latency_ns: Vec<u64>,
}

#[derive(Default)]
struct Noted {
    count: Cell<u64>,
    other_reasons: Cell<u64>,
    early: Cell<u64>,
    latency_ns: RefCell<Vec<u64>>,
}

impl Noted {
    fn note(&self, deadline_ns: u64, seen_ns: u64, reason: &CancelReason) {
        self.count.set(self.count.get() + 1);
        if *reason != CancelReason::Timeout {
            self.other_reasons.set(self.other_reasons.get() + 1);
        }
        let late = seen_ns.checked_sub(deadline_ns).unwrap_or_else(|| {
            self.early.set(self.early.get() + 1);
            0
        });
        let mut kept = self.latency_ns.borrow_mut();
        if kept.len() < MAX_KEPT {
            kept.push(late);
        }
    }

    fn times(&self) -> CancelTimes {
        CancelTimes {
            count: self.count.get(),
            other_reasons: self.other_reasons.get(),
            early: self.early.get(),
            latency_ns: self.latency_ns.borrow().clone(),
        }
    }
}

/// The worker's methods.
pub fn methods(_client: Client) -> Methods {
    let noted = Rc::new(Noted::default());
    let holding = Rc::clone(&noted);
    Methods::new()
        .raw_stream("Repeat", repeat)
        .raw_ctx("Hold", move |request: Envelope, ctx: Context| {
            let noted = Rc::clone(&holding);
            async move { hold(&noted, &request, &ctx).await }
        })
        .raw_sync("Cancels", move |_| {
            Ok(Some(Payload::encode(&noted.times())?))
        })
}

async fn repeat(request: Envelope, _ctx: Context, out: Partials) -> HandlerResult {
    let (n, bin): (u64, serde_bytes::ByteBuf) = request.payload_as()?;
    // Encoded once: each partial reply carries the same bytes.
    let part = Payload::encode(&bin)?;
    for _ in 0..n {
        out.send_raw(Some(part.clone())).await?;
    }
    Ok(Some(Payload::encode(&n)?))
}

async fn hold(noted: &Noted, request: &Envelope, ctx: &Context) -> HandlerResult {
    let (deadline_ns, _bin): (u64, serde_bytes::ByteBuf) = request.payload_as()?;
    let wait_ns = deadline_ns
        .saturating_add(u64::try_from(HOLD_PAST_DEADLINE.as_nanos()).unwrap_or(u64::MAX))
        .saturating_sub(monotonic_ns());
    tokio::select! {
        reason = ctx.cancelled() => {
            noted.note(deadline_ns, monotonic_ns(), &reason);
            Err(HandlerError::from(PartialError::Cancelled(reason)))
        }
        () = tokio::time::sleep(Duration::from_nanos(wait_ns)) => Ok(Some(Payload::nil())),
    }
}
