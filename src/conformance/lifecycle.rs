//! Checks through the broker of a request's life at the subject:
//! concurrent handlers, the deadline it sees, a `cancel` reaching and
//! stopping its handler, and streamed replies.

use futures_util::StreamExt;
use rmpv::Value;
use std::time::{Duration, Instant};

use super::corpus::encode;
use super::probe::{Probe, Waited, failure, ms, request, value_of};
use super::report::Verdict;
use crate::pending_call::PendingCall;

/// How soon a cancelled handler must be gone from `Active`.
pub const STOP_WITHIN: Duration = Duration::from_millis(200);
/// How soon `LastCancel` must name a cancel.
const SEEN_WITHIN: Duration = Duration::from_secs(1);

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

fn field<'a>(value: &'a Value, name: &str) -> Option<&'a Value> {
    value
        .as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(name))
        .map(|(_, v)| v)
}

/// `Sleep {ms}` to `id` with a deadline, started now.
fn sleep(probe: &Probe, id: &str, sleep_ms: u64, timeout: Duration) -> PendingCall {
    let params = map(vec![("ms", sleep_ms.into())]);
    probe
        .broker
        .start_call(request(id, "Sleep", Some(&encode(&params)), timeout))
}

/// Whether a `Sleep` reply says it slept undisturbed.
fn slept(reply: &Value) -> Result<(), String> {
    match (field(reply, "slept_ms"), field(reply, "cancelled")) {
        (Some(ms), Some(Value::Boolean(false))) if ms.as_u64().is_some() => Ok(()),
        _ => Err(format!(
            "Sleep replied {reply}, want {{slept_ms, cancelled: false}}"
        )),
    }
}

/// `concurrency`: 8 `Sleep 200` to one process all answered within 0.6 s.
pub async fn concurrency(probe: &Probe) -> Verdict {
    let id = probe.first();
    let started = Instant::now();
    let calls: Vec<PendingCall> = (0..8)
        .map(|_| sleep(probe, id, 200, Duration::from_secs(5)))
        .collect();
    let replies = futures_util::future::join_all(calls).await;
    let took = started.elapsed();
    for reply in replies {
        let reply = reply.map_err(|e| format!("a Sleep 200: {}", failure(&e)))?;
        slept(&value_of(&reply)?)?;
    }
    if took > Duration::from_millis(600) {
        return Err(format!(
            "8 Sleep 200 to {id} took {}: handlers do not run concurrently (want at most 600 ms)",
            ms(took)
        ));
    }
    Ok(format!("8 Sleep 200 to {id} answered in {}", ms(took)))
}

/// Whether `Deadline`'s reply is a budget within `[low, high]` ms.
pub fn judge_deadline(reply: &Value, low: u64, high: u64) -> Verdict {
    match reply.as_u64() {
        Some(left) if (low..=high).contains(&left) => Ok(format!(
            "the handler saw {left} ms left of a {high} ms deadline"
        )),
        Some(left) => Err(format!(
            "the handler saw {left} ms left of a {high} ms deadline (want {low}..={high})"
        )),
        None if reply.is_nil() => Err(format!(
            "Deadline replied nil: the {high} ms deadline did not reach the handler"
        )),
        None => Err(format!("Deadline replied {reply}, want whole milliseconds")),
    }
}

/// `deadline`: the handler sees the budget the broker delivered.
pub async fn deadline(probe: &Probe) -> Verdict {
    let reply = probe
        .broker
        .call_envelope(request(
            probe.first(),
            "Deadline",
            None,
            Duration::from_secs(5),
        ))
        .await
        .map_err(|e| format!("Deadline: {}", failure(&e)))?;
    judge_deadline(&value_of(&reply)?, 4000, 5000)
}

/// Waits until `Active` of `id` reads at least `n` (the handler started).
async fn running(probe: &Probe, id: &str, n: u64) -> Result<(), String> {
    match probe
        .until(Duration::from_secs(2), || probe.active(id), |&a| a >= n)
        .await?
    {
        Waited::Held(..) => Ok(()),
        Waited::Not(a) => Err(format!(
            "Active of {id} read {a} while a Sleep ran there (want {n})"
        )),
    }
}

/// Waits until `Active` of `id` reads 0 within `within`: how long it took.
async fn stopped(probe: &Probe, id: &str, within: Duration) -> Result<Duration, String> {
    match probe
        .until(within, || probe.active(id), |&a| a == 0)
        .await?
    {
        Waited::Held(_, after) => Ok(after),
        Waited::Not(a) => Err(format!(
            "Active of {id} still read {a} {} after the cancel (want 0): the handler did not stop",
            ms(within)
        )),
    }
}

/// Waits until `LastCancel` of `id` names `correlation_id` (any when
/// `None`) with `reason`.
async fn cancel_seen(
    probe: &Probe,
    id: &str,
    correlation_id: Option<u64>,
    reason: &str,
) -> Result<Duration, String> {
    let wanted = |last: &Option<(u64, String)>| {
        last.as_ref()
            .is_some_and(|(c, r)| r == reason && correlation_id.is_none_or(|want| *c == want))
    };
    let want = match correlation_id {
        Some(c) => format!("{{correlation_id: {c}, reason: {reason}}}"),
        None => format!("{{reason: {reason}}}"),
    };
    match probe
        .until(SEEN_WITHIN, || probe.last_cancel(id), wanted)
        .await?
    {
        Waited::Held(_, after) => Ok(after),
        Waited::Not(None) => Err(format!(
            "LastCancel of {id} is nil {} after the cancel, want {want}",
            ms(SEEN_WITHIN)
        )),
        Waited::Not(Some((c, r))) => Err(format!(
            "LastCancel of {id} is {{correlation_id: {c}, reason: {r}}}, want {want}"
        )),
    }
}

/// `timeout-cancel-seen` and `timeout-cancel-stops`: a `Sleep 10000` with
/// a 300 ms deadline; the broker answers `timeout` and sends `cancel`.
pub async fn timeout_cancel(probe: &Probe) -> (Verdict, Verdict) {
    let id = probe.first().to_owned();
    let call = sleep(probe, &id, 10_000, Duration::from_millis(300));
    let correlation_id = call.correlation_id();
    let started = running(probe, &id, 1).await;
    let answered = match actix::clock::timeout(Duration::from_secs(3), call).await {
        Ok(reply) => super::basics::expect_error(&reply, "timeout", None)
            .map_err(|e| format!("Sleep 10000 with a 300 ms deadline: {e}")),
        Err(_) => Err("Sleep 10000 with a 300 ms deadline: no reply within 3 s".into()),
    };
    if let Err(e) = started.clone().and(answered.clone()) {
        return (Err(e.clone()), Err(e));
    }
    let stops = stopped(probe, &id, STOP_WITHIN).await.map(|after| {
        format!(
            "the timed-out Sleep left Active of {id} {} after the cancel",
            ms(after)
        )
    });
    let seen = cancel_seen(probe, &id, Some(correlation_id), "timeout")
        .await
        .map(|_| {
            format!("LastCancel of {id} named the request ({correlation_id}) and reason timeout")
        });
    (seen, stops)
}

/// `caller-cancel`: the caller cancels a running `Sleep`; it is answered
/// `cancelled`, and the handler sees the cancel and stops.
pub async fn caller_cancel(probe: &Probe) -> Verdict {
    let id = probe.first().to_owned();
    let call = sleep(probe, &id, 10_000, Duration::from_secs(10));
    let correlation_id = call.correlation_id();
    running(probe, &id, 1).await?;
    call.cancel();
    let reply = actix::clock::timeout(Duration::from_secs(2), call)
        .await
        .map_err(|_| "no reply within 2 s of the cancel".to_owned())?;
    super::basics::expect_error(&reply, "cancelled", None)
        .map_err(|e| format!("the cancelled Sleep: {e}"))?;
    let after = stopped(probe, &id, STOP_WITHIN).await?;
    cancel_seen(probe, &id, Some(correlation_id), "cancelled").await?;
    Ok(format!(
        "the handler saw reason cancelled for its request and stopped within {}",
        ms(after)
    ))
}

/// One item of a streaming call: a partial reply (`true`) or the final
/// one, with its value; or the error that ended the call.
pub type StreamItem = Result<(bool, Value), String>;

/// Whether `items` are `0 … n-1` as partial replies, then the final `n`.
pub fn judge_stream(n: u64, items: &[StreamItem]) -> Result<(), String> {
    for (i, item) in items.iter().enumerate() {
        let i = i as u64;
        let (partial, value) = item
            .as_ref()
            .map_err(|e| format!("item {i} of Count {n}: {e}"))?;
        let want_partial = i < n;
        if *partial != want_partial {
            let (want, got) = if want_partial {
                ("a partial reply", "the final reply")
            } else {
                ("the final reply", "a partial reply")
            };
            return Err(format!(
                "item {i} of Count {n} was {got} ({value}), want {want}"
            ));
        }
        if value.as_u64() != Some(i) {
            return Err(format!("item {i} of Count {n} was {value}, want {i}"));
        }
    }
    match items.len() as u64 {
        len if len == n + 1 => Ok(()),
        len => Err(format!(
            "Count {n} ended after {len} items, want {} (n partial replies and the final one)",
            n + 1
        )),
    }
}

/// A streaming `Count` to `id`: every item until the stream ends.
async fn count_stream(probe: &Probe, id: &str, n: u64, delay_ms: u64) -> Vec<StreamItem> {
    let params = map(vec![("n", n.into()), ("delay_ms", delay_ms.into())]);
    let mut replies = probe.broker.call_stream(request(
        id,
        "Count",
        Some(&encode(&params)),
        Duration::from_secs(5),
    ));
    let mut items = Vec::new();
    while let Some(reply) = replies.next().await {
        items.push(match reply {
            Ok(reply) => value_of(&reply).map(|v| (reply.is_partial(), v)),
            Err(e) => Err(failure(&e)),
        });
    }
    items
}

/// `stream`: `Count` with `stream` gives its partial replies in order,
/// then the final reply.
pub async fn stream(probe: &Probe) -> Verdict {
    let id = probe.first();
    for (n, delay_ms) in [(20, 2), (200, 0), (0, 0)] {
        judge_stream(n, &count_stream(probe, id, n, delay_ms).await)?;
    }
    Ok(
        "Count 20, 200 and 0 with stream: partial replies 0 … n-1 in order, then the final n"
            .into(),
    )
}

/// The partial replies `id` sent that the broker dropped: those to a
/// request that asked for no stream are counted there.
async fn unmatched(probe: &Probe, id: &str) -> Result<u64, String> {
    let stats = probe
        .broker
        .stats()
        .await
        .map_err(|e| format!("stats: {e}"))?;
    stats
        .per_process
        .get(id)
        .map(|p| p.faults.unmatched_replies)
        .ok_or_else(|| format!("no stats for {id}"))
}

/// `stream-final-only`: `Count` without `stream` sends the final reply
/// only (no partial reply reaches the broker).
pub async fn stream_final_only(probe: &Probe) -> Verdict {
    let id = probe.first();
    let before = unmatched(probe, id).await?;
    let params = map(vec![("n", 5.into()), ("delay_ms", 1.into())]);
    let reply = probe
        .call(id, "Count", Some(&encode(&params)))
        .await
        .map_err(|e| format!("Count 5 without stream: {}", failure(&e)))?;
    let value = value_of(&reply)?;
    if value.as_u64() != Some(5) {
        return Err(format!("Count 5 without stream replied {value}, want 5"));
    }
    // A partial reply written after the final one would still be on its way.
    actix::clock::sleep(Duration::from_millis(50)).await;
    let after = unmatched(probe, id).await?;
    if after != before {
        return Err(format!(
            "Count 5 without stream: {id} sent {} partial replies the caller did not ask for (the broker dropped them)",
            after - before
        ));
    }
    Ok("Count 5 without stream: the final reply 5 and no partial reply".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial(i: u64) -> StreamItem {
        Ok((true, i.into()))
    }

    #[test]
    fn a_stream_is_its_partials_in_order_then_the_final() {
        assert_eq!(
            judge_stream(2, &[partial(0), partial(1), Ok((false, 2.into()))]),
            Ok(())
        );
        assert_eq!(judge_stream(0, &[Ok((false, 0.into()))]), Ok(()));
        let swapped = [partial(1), partial(0), Ok((false, 2.into()))];
        assert_eq!(
            judge_stream(2, &swapped),
            Err("item 0 of Count 2 was 1, want 0".into())
        );
        let unstreamed = [Ok((false, 2.into()))];
        assert_eq!(
            judge_stream(2, &unstreamed),
            Err("item 0 of Count 2 was the final reply (2), want a partial reply".into())
        );
        let short = [partial(0)];
        assert!(
            judge_stream(2, &short)
                .unwrap_err()
                .contains("ended after 1 items")
        );
        let failed = [partial(0), Err("error timeout".into())];
        assert!(
            judge_stream(2, &failed)
                .unwrap_err()
                .contains("error timeout")
        );
    }

    #[test]
    fn a_deadline_must_be_whole_ms_in_range() {
        assert!(judge_deadline(&4990.into(), 4000, 5000).is_ok());
        assert!(judge_deadline(&5001.into(), 4000, 5000).is_err());
        assert!(
            judge_deadline(&Value::Nil, 4000, 5000)
                .unwrap_err()
                .contains("did not reach")
        );
        assert!(judge_deadline(&Value::F64(4990.5), 4000, 5000).is_err());
    }

    #[test]
    fn a_sleep_reply_must_say_it_was_not_cancelled() {
        let ok = map(vec![("slept_ms", 201.into()), ("cancelled", false.into())]);
        assert!(slept(&ok).is_ok());
        let cut = map(vec![("slept_ms", 20.into()), ("cancelled", true.into())]);
        assert!(slept(&cut).is_err());
        assert!(slept(&Value::Nil).is_err());
    }
}
