//! The benchmark client service: `Run` makes the calls and times them.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::{Quantiles, RunReport, RunSpec, ns_histogram};
use crate::protocol::Payload;
use crate::service::{Client, HandlerError, Methods};

/// The deadline of each call of a run.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The client's methods: `Run` ([`RunSpec`] → [`RunReport`]).
pub fn methods(client: Client) -> Methods {
    Methods::new().method("Run", move |spec: RunSpec| {
        let client = client.clone();
        async move { run(&client, spec).await }
    })
}

/// Makes `spec.calls` calls with `spec.concurrency` in flight.
pub async fn run(client: &Client, spec: RunSpec) -> Result<RunReport, HandlerError> {
    let body = vec![0x5au8; usize::try_from(spec.payload_bytes).unwrap_or(0)];
    let payload = Payload::encode(serde_bytes::Bytes::new(&body))
        .map_err(|e| HandlerError::new(e.to_string()))?;
    let spec = Rc::new(spec);
    let issued = Rc::new(std::cell::Cell::new(0u64));
    let report = Rc::new(RefCell::new((RunReport::default(), ns_histogram())));
    let lanes = spec.concurrency.clamp(1, spec.calls.max(1));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..lanes {
        let (client, spec, issued, report, payload) = (
            client.clone(),
            Rc::clone(&spec),
            Rc::clone(&issued),
            Rc::clone(&report),
            payload.clone(),
        );
        tasks.push(tokio::task::spawn_local(async move {
            while issued.get() < spec.calls {
                issued.set(issued.get() + 1);
                let request = crate::protocol::Envelope::request(&*spec.target, &*spec.method, 0)
                    .with_raw_payload(payload.clone());
                let sent = Instant::now();
                let result = client.call_envelope(request, CALL_TIMEOUT).await;
                let ns = u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX);
                let mut report = report.borrow_mut();
                report.1.saturating_record(ns);
                match result {
                    Ok(_) => report.0.ok += 1,
                    Err(_) => report.0.errors += 1,
                }
            }
        }));
    }
    for task in tasks {
        task.await
            .map_err(|e| HandlerError::new(format!("lane failed: {e}")))?;
    }
    let elapsed_ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let (report, histogram) = &*report.borrow();
    Ok(RunReport {
        elapsed_ns,
        latency_ns: Quantiles::of(histogram),
        ..report.clone()
    })
}
