//! The benchmark client service: `Run` makes the calls and times them.

use bytestring::ByteString;
use std::time::Duration;

use super::{RunReport, RunSpec, drive};
use crate::protocol::{Envelope, Payload};
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
    let (client, target, method) = (
        client.clone(),
        ByteString::from(spec.target),
        ByteString::from(spec.method),
    );
    Ok(drive(spec.calls, spec.concurrency, move || {
        let request =
            Envelope::request(target.clone(), method.clone(), 0).with_raw_payload(payload.clone());
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
