//! Checks through the broker of what the subject sends on its own: calls
//! out (`Relay`) with their deadline, errors and cancellation, and events
//! both ways (`note` in, `Notify` out).

use rmpv::Value;
use std::time::{Duration, Instant};

use super::basics::expect_error;
use super::corpus::{decoded_value, encode};
use super::kit_service::KIT;
use super::probe::{Probe, Waited, failure, ms, request, value_of};
use super::report::Verdict;
use super::same_value::difference;
use crate::actors::messages::Publish;
use crate::protocol::{Envelope, Payload};

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

/// A `Relay` of `method` with `payload` (none when `None`) to `target`.
fn relay(target: &str, method: &str, payload: Option<Value>) -> Value {
    let mut entries = vec![("target", target.into()), ("method", method.into())];
    if let Some(payload) = payload {
        entries.push(("payload", payload));
    }
    map(entries)
}

/// Whether the request the kit's service got from a `Relay` came from
/// `from` with what was left of a `deadline_ms` deadline.
pub fn judge_call_out(call_out: &Envelope, from: &str, deadline_ms: u64) -> Result<u64, String> {
    if &*call_out.source != from {
        return Err(format!(
            "the call out came from {}, want {from}",
            &*call_out.source
        ));
    }
    match call_out.timeout_ms {
        Some(left) if left <= deadline_ms && left >= deadline_ms / 2 => Ok(left),
        Some(left) => Err(format!(
            "the call out carried {left} ms of deadline; the Relay had {deadline_ms} ms (want what was left of it)"
        )),
        None => Err("the call out reached the kit without a deadline".into()),
    }
}

/// `calls-out`: `Relay` calls the kit's `Echo` with what is left of its
/// deadline, and its reply comes back as the same value.
pub async fn calls_out(probe: &Probe) -> Verdict {
    let id = probe.first();
    let sent = decoded_value();
    let before = probe.seen.echoes.borrow().len();
    let params = relay(KIT, "Echo", Some(sent.clone()));
    let reply = probe
        .broker
        .call_envelope(request(
            id,
            "Relay",
            Some(&encode(&params)),
            Duration::from_secs(5),
        ))
        .await
        .map_err(|e| format!("Relay to {KIT}: {}", failure(&e)))?;
    let call_out = probe
        .seen
        .echoes
        .borrow()
        .get(before)
        .cloned()
        .ok_or("the Relay was answered, but no call reached the kit")?;
    // The deadline the broker delivered to the kit: less than what the
    // subject gave its call, which is at most what its Relay had.
    let left = judge_call_out(&call_out, id, 5000)?;
    let arrived = match &call_out.payload {
        Some(p) => rmpv::decode::read_value(&mut p.as_bytes().as_ref())
            .map_err(|e| format!("the call out's payload does not decode: {e}"))?,
        None => return Err("the call out carried no payload".into()),
    };
    if let Some(d) = difference(&sent, &arrived) {
        return Err(format!("the call out's payload changed: {d}"));
    }
    if let Some(d) = difference(&sent, &value_of(&reply)?) {
        return Err(format!("the Relay's reply is not the callee's: {d}"));
    }
    Ok(format!(
        "the call out reached {KIT} with {left} ms left of 5000 and the same value (integers beyond 2^53, bin), and its reply came back"
    ))
}

/// `calls-out-errors`: the callee's error, and the broker's, come back
/// from `Relay` with their code and message.
pub async fn calls_out_errors(probe: &Probe) -> Verdict {
    let id = probe.first();
    let fail = map(vec![
        ("code", "teapot".into()),
        ("message", "short and stout".into()),
    ]);
    let reply = probe
        .call(id, "Relay", Some(&encode(&relay(KIT, "Fail", Some(fail)))))
        .await;
    expect_error(&reply, "teapot", Some("short and stout"))
        .map_err(|e| format!("Relay of a Fail: {e}"))?;
    // What the broker answers a call to nowhere, asked by the kit itself.
    let nowhere = probe.call("nowhere", "Nothing", None).await;
    let Err(crate::call::CallError::Remote { code, message, .. }) = nowhere else {
        return Err("the broker answered a call to `nowhere` without an error".into());
    };
    let reply = probe
        .call(
            id,
            "Relay",
            Some(&encode(&relay("nowhere", "Nothing", None))),
        )
        .await;
    expect_error(&reply, &code, Some(&message)).map_err(|e| format!("Relay to nowhere: {e}"))?;
    Ok(format!(
        "Relay gave back the callee's error (teapot) and the broker's ({code}) with their messages"
    ))
}

/// `calls-out-cancel`: a cancelled `Relay` gives up its call out, which
/// cancels it at the broker: the callee's handler is told and stops.
pub async fn calls_out_cancel(probe: &Probe) -> Verdict {
    let (id, callee) = (probe.first(), probe.second().to_owned());
    let sleep = map(vec![("ms", 10_000.into())]);
    let params = relay(&callee, "Sleep", Some(sleep));
    let call = probe.broker.start_call(request(
        id,
        "Relay",
        Some(&encode(&params)),
        Duration::from_secs(10),
    ));
    match probe
        .until(
            Duration::from_secs(2),
            || probe.active(&callee),
            |&a| a >= 1,
        )
        .await?
    {
        Waited::Held(..) => {}
        Waited::Not(a) => {
            return Err(format!(
                "the Relay's call out of Sleep to {callee} did not start there (Active {a})"
            ));
        }
    }
    call.cancel();
    let cancelled = Instant::now();
    let reply = actix::clock::timeout(Duration::from_secs(2), call)
        .await
        .map_err(|_| "no reply within 2 s of cancelling the Relay".to_owned())?;
    expect_error(&reply, "cancelled", None).map_err(|e| format!("the cancelled Relay: {e}"))?;
    let within = Duration::from_millis(500);
    match probe
        .until(within, || probe.active(&callee), |&a| a == 0)
        .await?
    {
        Waited::Held(..) => {}
        Waited::Not(a) => {
            return Err(format!(
                "the Relay was cancelled, but the Sleep it called on {callee} still ran {} later (Active {a}): the call out was not cancelled",
                ms(within)
            ));
        }
    }
    let stopped = cancelled.elapsed();
    match probe.last_cancel(&callee).await? {
        Some((_, reason)) if reason == "cancelled" => Ok(format!(
            "cancelling the Relay cancelled its call out: the Sleep on {callee} stopped {} later (reason cancelled)",
            ms(stopped)
        )),
        other => Err(format!(
            "the Sleep on {callee} stopped, but its LastCancel is {other:?}, want reason cancelled"
        )),
    }
}

/// `events-in`: a `note` to the service reaches every worker
/// (`LastNote`).
pub async fn events_in(probe: &Probe) -> Verdict {
    let sent = decoded_value();
    let event = Envelope::event(super::probe::SERVICE, "note")
        .with_raw_payload(Payload::from_msgpack(encode(&sent)).map_err(|e| e.to_string())?);
    let delivered = probe
        .broker
        .router()
        .send(Publish(event))
        .await
        .map_err(|_| "the broker is gone".to_owned())?;
    if delivered != probe.ids.len() {
        return Err(format!(
            "the note reached {delivered} workers of {}",
            probe.ids.len()
        ));
    }
    for id in probe.ids.iter() {
        let ask = || probe.value(id, "LastNote", None);
        match probe
            .until(Duration::from_secs(1), ask, |v| {
                difference(&sent, v).is_none()
            })
            .await?
        {
            Waited::Held(..) => {}
            Waited::Not(v) if v.is_nil() => {
                return Err(format!("LastNote of {id} is nil 1 s after the note"));
            }
            Waited::Not(v) => {
                let d = difference(&sent, &v).unwrap_or_default();
                return Err(format!("LastNote of {id} is not the note's payload: {d}"));
            }
        }
    }
    Ok(format!(
        "the note's payload came back from LastNote of {} as the same value",
        probe.ids.join(", ")
    ))
}

/// `events-out`: `Notify` sends the event (the broker stamps its source)
/// and replies nil.
pub async fn events_out(probe: &Probe) -> Verdict {
    let id = probe.first();
    let sent = decoded_value();
    let before = probe.seen.events.borrow().len();
    let target = format!("{KIT}.0");
    let params = map(vec![
        ("target", target.as_str().into()),
        ("event", "note".into()),
        ("payload", sent.clone()),
    ]);
    let reply = probe
        .call(id, "Notify", Some(&encode(&params)))
        .await
        .map_err(|e| format!("Notify: {}", failure(&e)))?;
    match reply.payload().map(|p| p.as_bytes().as_ref()) {
        Some(Payload::NIL_BYTES) => {}
        Some(other) => {
            return Err(format!(
                "Notify replied {}, want nil",
                super::corpus::hex_prefix(other, 12)
            ));
        }
        None => return Err("Notify replied without a payload, want nil".into()),
    }
    let started = Instant::now();
    let event = loop {
        if let Some(event) = probe.seen.events.borrow().get(before).cloned() {
            break event;
        }
        if started.elapsed() > Duration::from_secs(1) {
            return Err(format!(
                "no event reached {target} within 1 s of Notify's reply"
            ));
        }
        actix::clock::sleep(Duration::from_millis(5)).await;
    };
    if (&*event.id, &*event.source) != ("note", id) {
        return Err(format!(
            "{target} got event {:?} from {}, want note from {id}",
            &*event.id, &*event.source
        ));
    }
    let got = match &event.payload {
        Some(p) => rmpv::decode::read_value(&mut p.as_bytes().as_ref())
            .map_err(|e| format!("the event's payload does not decode: {e}"))?,
        None => Value::Nil,
    };
    if let Some(d) = difference(&sent, &got) {
        return Err(format!("the event's payload changed: {d}"));
    }
    Ok(format!(
        "Notify sent note from {id} to {target} with the same value, and replied nil"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_out_carries_what_is_left_of_the_deadline() {
        let mut call = Envelope::request("kit", "Echo", 1)
            .with_source("subject.0")
            .with_timeout_ms(4990);
        assert_eq!(judge_call_out(&call, "subject.0", 5000), Ok(4990));
        assert!(judge_call_out(&call, "subject.1", 5000).is_err());
        call.timeout_ms = Some(30_000);
        assert!(
            judge_call_out(&call, "subject.0", 5000)
                .unwrap_err()
                .contains("30000 ms")
        );
        call.timeout_ms = None;
        assert!(judge_call_out(&call, "subject.0", 5000).is_err());
    }
}
