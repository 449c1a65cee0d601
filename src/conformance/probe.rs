//! The kit's client of the subject through the broker: requests with a
//! deadline, replies decoded as MessagePack values, and the subject's
//! state methods (`Active`, `LastCancel`, `LastNote`) polled until they
//! say what a check waits for.

use rmpv::Value;
use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::kit_service::Seen;
use crate::call::{CallError, Reply};
use crate::embed::BrokerHandle;
use crate::protocol::{Envelope, Payload};

/// The subject's service name under the broker.
pub const SERVICE: &str = "subject";

/// How often a state method is asked again while a check waits.
const POLL: Duration = Duration::from_millis(5);

/// The deadline of the kit's ordinary requests.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// What the checks through the broker share.
#[derive(Clone)]
pub struct Probe {
    /// The broker the subject runs under.
    pub broker: BrokerHandle,
    /// What reached the kit's own service.
    pub seen: Rc<Seen>,
    /// The subject's process ids (`subject.0 …`).
    pub ids: Rc<Vec<String>>,
}

/// A request to `target` with `payload` (MessagePack the kit made: one
/// valid value; or none) and a deadline.
pub fn request(target: &str, method: &str, payload: Option<&[u8]>, timeout: Duration) -> Envelope {
    let mut request = Envelope::request(target, method, 0)
        .with_timeout_ms(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
    request.payload = payload.and_then(|bytes| Payload::from_msgpack(bytes.to_vec()).ok());
    request
}

/// A reply's payload as a value (none reads as nil), or why it is not one.
pub fn value_of(reply: &Reply) -> Result<Value, String> {
    match reply.payload() {
        None => Ok(Value::Nil),
        Some(p) => rmpv::decode::read_value(&mut p.as_bytes().as_ref())
            .map_err(|e| format!("a reply payload that does not decode: {e}")),
    }
}

/// A failed call, for a detail.
pub fn failure(e: &CallError) -> String {
    match e {
        CallError::Remote {
            code,
            message,
            source_id,
        } => format!("error {code} from {source_id}: {message:?}"),
        other => other.to_string(),
    }
}

impl Probe {
    /// The first worker (`subject.0`).
    pub fn first(&self) -> &str {
        &self.ids[0]
    }

    /// Another worker than the first when there is one, else the first.
    pub fn second(&self) -> &str {
        &self.ids[1 % self.ids.len()]
    }

    /// Calls `method` of `target` with a raw payload and the kit's deadline.
    pub async fn call(
        &self,
        target: &str,
        method: &str,
        payload: Option<&[u8]>,
    ) -> Result<Reply, CallError> {
        self.broker
            .call_envelope(request(target, method, payload, CALL_TIMEOUT))
            .await
    }

    /// Calls and decodes the reply; any error is a failure's detail.
    pub async fn value(
        &self,
        target: &str,
        method: &str,
        payload: Option<&Value>,
    ) -> Result<Value, String> {
        let bytes = payload.map(super::corpus::encode);
        let reply = self
            .call(target, method, bytes.as_deref())
            .await
            .map_err(|e| format!("{method} to {target}: {}", failure(&e)))?;
        value_of(&reply).map_err(|e| format!("{method} to {target}: {e}"))
    }

    /// `Active` of process `id`: how many `Sleep` handlers run there.
    pub async fn active(&self, id: &str) -> Result<u64, String> {
        let value = self.value(id, "Active", None).await?;
        value
            .as_map()
            .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("sleeping")))
            .and_then(|(_, v)| v.as_u64())
            .ok_or_else(|| format!("Active to {id} replied {value}, not {{sleeping: n}}"))
    }

    /// `LastCancel` of process `id`: `(correlation_id, reason)`, or none.
    pub async fn last_cancel(&self, id: &str) -> Result<Option<(u64, String)>, String> {
        let value = self.value(id, "LastCancel", None).await?;
        if value.is_nil() {
            return Ok(None);
        }
        let field = |name: &str| {
            value
                .as_map()
                .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(name)))
                .map(|(_, v)| v.clone())
        };
        match (
            field("correlation_id").and_then(|v| v.as_u64()),
            field("reason").and_then(|v| v.as_str().map(str::to_owned)),
        ) {
            (Some(id), Some(reason)) => Ok(Some((id, reason))),
            _ => Err(format!(
                "LastCancel to {id} replied {value}, not {{correlation_id, reason}}"
            )),
        }
    }

    /// Asks `ask` every few milliseconds until `done` holds of its answer
    /// or `within` passed: the answer that held and when, or the last one
    /// seen (an error ends it at once).
    pub async fn until<T, F, Fut>(
        &self,
        within: Duration,
        mut ask: F,
        done: impl Fn(&T) -> bool,
    ) -> Result<Waited<T>, String>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        let started = Instant::now();
        loop {
            let answer = ask().await?;
            let after = started.elapsed();
            if done(&answer) {
                return Ok(Waited::Held(answer, after));
            }
            if after >= within {
                return Ok(Waited::Not(answer));
            }
            actix::clock::sleep(POLL).await;
        }
    }
}

/// What [`Probe::until`] found.
#[derive(Debug)]
pub enum Waited<T> {
    /// It held, with this answer, after this long.
    Held(T, Duration),
    /// It did not hold in time; the last answer.
    Not(T),
}

/// Milliseconds, for a detail.
pub fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}
