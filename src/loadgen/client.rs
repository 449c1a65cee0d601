//! The benchmark client service: `Run` makes the calls and times them;
//! `RunKeyed`, `RunStream` and `RunTimeouts` do the same with keyed calls,
//! streaming calls and calls meant to time out.

use bytestring::ByteString;
use futures_util::StreamExt;
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use super::{
    Failure, KeyedSpec, RunReport, RunSpec, StreamReport, StreamSpec, TimeoutSpec, drive,
    monotonic_ns,
};
use crate::call::CallError;
use crate::protocol::{Envelope, ErrorCode, Payload, RequestKey};
use crate::service::{CallOptions, Client, HandlerError, Methods};

/// The deadline of each call of a run.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The client's methods: `Run` ([`RunSpec`] → [`RunReport`]), `RunKeyed`
/// ([`KeyedSpec`] → [`RunReport`]), `RunStream` ([`StreamSpec`] →
/// [`StreamReport`]) and `RunTimeouts` ([`TimeoutSpec`] → [`RunReport`]).
pub fn methods(client: Client) -> Methods {
    let (keyed_client, stream_client, timeout_client) =
        (client.clone(), client.clone(), client.clone());
    Methods::new()
        .method("Run", move |spec: RunSpec| {
            let client = client.clone();
            async move { run(&client, spec).await }
        })
        .method("RunKeyed", move |spec: KeyedSpec| {
            let client = keyed_client.clone();
            async move { keyed(&client, spec).await }
        })
        .method("RunStream", move |spec: StreamSpec| {
            let client = stream_client.clone();
            async move { streams(&client, spec).await }
        })
        .method("RunTimeouts", move |spec: TimeoutSpec| {
            let client = timeout_client.clone();
            async move { timeouts(&client, spec).await }
        })
}

fn bad_request(message: impl Into<String>) -> HandlerError {
    HandlerError::broker(ErrorCode::BadRequest, message)
}

/// `payload_bytes` bytes as a MessagePack bin.
fn body(payload_bytes: u64) -> Vec<u8> {
    vec![0x5au8; usize::try_from(payload_bytes).unwrap_or(0)]
}

/// Makes `spec.calls` calls with `spec.concurrency` in flight.
pub async fn run(client: &Client, spec: RunSpec) -> Result<RunReport, HandlerError> {
    keyed_run(client, spec, Vec::new()).await
}

/// [`run`] with keys: call `i` carries `key-{i mod spec.keys}`, so the
/// broker routes it by rendezvous hashing instead of round-robin.
pub async fn keyed(client: &Client, spec: KeyedSpec) -> Result<RunReport, HandlerError> {
    if spec.keys == 0 {
        return Err(bad_request("keys must be at least 1"));
    }
    let keys = (0..spec.keys)
        .map(|i| RequestKey::new(format!("key-{i}")))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_request(e.to_string()))?;
    keyed_run(client, spec.run, keys).await
}

async fn keyed_run(
    client: &Client,
    spec: RunSpec,
    keys: Vec<RequestKey>,
) -> Result<RunReport, HandlerError> {
    let payload = Payload::encode(serde_bytes::Bytes::new(&body(spec.payload_bytes)))
        .map_err(|e| HandlerError::new(e.to_string()))?;
    let (client, target, method) = (
        client.clone(),
        ByteString::from(spec.target),
        ByteString::from(spec.method),
    );
    let next_key = Cell::new(0usize);
    Ok(drive(spec.calls, spec.concurrency, move || {
        let mut request =
            Envelope::request(target.clone(), method.clone(), 0).with_raw_payload(payload.clone());
        if let Some(key) = keys.get(next_key.get()) {
            request.key = Some(key.clone());
            next_key.set((next_key.get() + 1) % keys.len());
        }
        let client = client.clone();
        async move {
            match client.call_envelope(request, CALL_TIMEOUT).await {
                Ok(_) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
    })
    .await)
}

/// Makes `spec.run.calls` streaming calls, `spec.run.concurrency` in
/// flight; each asks `[partials, bin of payload_bytes]` and must get
/// exactly `partials` partial replies, then its final reply.
pub async fn streams(client: &Client, spec: StreamSpec) -> Result<StreamReport, HandlerError> {
    let partials = spec.partials;
    let (client, target, method, bin) = (
        client.clone(),
        spec.run.target,
        spec.run.method,
        Rc::new(body(spec.run.payload_bytes)),
    );
    let received = Rc::new(Cell::new(0u64));
    let counted = Rc::clone(&received);
    let run = drive(spec.run.calls, spec.run.concurrency, move || {
        let params = (partials, serde_bytes::Bytes::new(&bin));
        let mut replies = client.call_stream(&target, &method, &params, CallOptions::new());
        let received = Rc::clone(&counted);
        async move {
            let mut got = 0u64;
            let end = loop {
                match replies.next().await {
                    Some(Ok(reply)) if reply.is_partial() => got += 1,
                    Some(Ok(_)) if got == partials => break Ok(()),
                    Some(Ok(_)) => {
                        break Err(Failure::new(
                            "short_stream",
                            format!(
                                "the final reply came after {got} partial replies of {partials}"
                            ),
                        ));
                    }
                    Some(Err(e)) => break Err(e.into()),
                    None => {
                        break Err(Failure::new(
                            "no_reply",
                            "the stream ended without a final reply",
                        ));
                    }
                }
            };
            received.set(received.get() + got);
            end
        }
    })
    .await;
    Ok(StreamReport {
        run,
        partials: received.get(),
    })
}

/// Makes `spec.run.calls` calls with a deadline of `spec.timeout_ms`, each
/// carrying `[deadline, bin of payload_bytes]` where `deadline` is the
/// caller's deadline in CLOCK_MONOTONIC nanoseconds. A call answered
/// `timeout` counts as answered (its latency: until that reply); one
/// answered otherwise is a failure.
pub async fn timeouts(client: &Client, spec: TimeoutSpec) -> Result<RunReport, HandlerError> {
    if spec.timeout_ms == 0 {
        return Err(bad_request("timeout_ms must be at least 1"));
    }
    let timeout = Duration::from_millis(spec.timeout_ms);
    let (client, target, method, bin) = (
        client.clone(),
        ByteString::from(spec.run.target),
        ByteString::from(spec.run.method),
        body(spec.run.payload_bytes),
    );
    let timeout_ns = spec.timeout_ms.saturating_mul(1_000_000);
    Ok(drive(spec.run.calls, spec.run.concurrency, move || {
        let deadline = monotonic_ns().saturating_add(timeout_ns);
        let request = Envelope::request(target.clone(), method.clone(), 0)
            .with_payload(&(deadline, serde_bytes::Bytes::new(&bin)));
        let client = client.clone();
        async move {
            let request = request.map_err(|e| Failure::new("payload", e.to_string()))?;
            match client.call_envelope(request, timeout).await {
                Err(CallError::Remote { code, .. }) if code == ErrorCode::Timeout.as_str() => {
                    Ok(())
                }
                Ok(_) => Err(Failure::new(
                    "answered",
                    "the worker answered before the deadline: no cancel to time",
                )),
                Err(e) => Err(e.into()),
            }
        }
    })
    .await)
}
