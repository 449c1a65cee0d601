//! `procbroker worker conformance`: the conformance subject of the Rust SDK.
//!
//! A service that implements the methods a conformance kit calls to check
//! an SDK (PROTOCOL.md lists them), written with the Rust SDK alone, so it
//! also shows that SDK's lifecycle API at work: deadlines, cancellation,
//! streaming replies, calls and events. State is per process.

use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::call::CallError;
use crate::protocol::msgpack::{Reader, kind_name};
use crate::protocol::{CancelReason, Envelope, ErrorCode, MsgpackError, Payload};
use crate::service::{
    Client, Context, DEFAULT_CALL_TIMEOUT, HANDLER, HandlerError, HandlerResult, Methods,
    PartialError, Partials,
};

/// What the subject remembers between requests.
#[derive(Default)]
struct State {
    /// `Sleep` handlers still running.
    sleeping: Cell<u64>,
    /// The last `cancel` from the broker that reached a handler.
    last_cancel: RefCell<Option<LastCancel>>,
    /// The payload of the last `note` event (`Some(None)`: it had none).
    last_note: RefCell<Option<Option<Payload>>>,
}

#[derive(Debug, Clone, Serialize)]
struct LastCancel {
    correlation_id: u64,
    reason: String,
}

impl State {
    /// Remembers the cancel of `ctx`'s request, if it was cancelled.
    fn note_cancel(&self, ctx: &Context) {
        if let Some(reason) = ctx.cancel_reason() {
            self.remember_cancel(ctx, &reason);
        }
    }

    fn remember_cancel(&self, ctx: &Context, reason: &CancelReason) {
        *self.last_cancel.borrow_mut() = Some(LastCancel {
            correlation_id: ctx.correlation_id(),
            reason: reason.as_str().to_owned(),
        });
    }
}

/// Counts a running `Sleep` while it lives.
struct Sleeping(Rc<State>);

impl Sleeping {
    fn new(state: &Rc<State>) -> Self {
        state.sleeping.set(state.sleeping.get() + 1);
        Self(Rc::clone(state))
    }
}

impl Drop for Sleeping {
    fn drop(&mut self) {
        self.0.sleeping.set(self.0.sleeping.get().saturating_sub(1));
    }
}

#[derive(Deserialize)]
struct SleepParams {
    ms: u64,
}

#[derive(Serialize)]
struct SleepReply {
    slept_ms: u64,
    cancelled: bool,
}

#[derive(Serialize)]
struct ActiveReply {
    sleeping: u64,
}

#[derive(Deserialize)]
struct CountParams {
    n: u64,
    #[serde(default)]
    delay_ms: u64,
}

#[derive(Deserialize)]
struct FailParams {
    #[serde(default)]
    code: Option<String>,
    message: String,
}

#[derive(Serialize)]
struct WhoAmI<'a> {
    id: &'a str,
    pid: u32,
}

fn nil() -> Payload {
    Payload::nil()
}

fn encoded<T: Serialize>(value: &T) -> HandlerResult {
    Ok(Some(Payload::encode(value)?))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The subject's methods; `client` makes its calls and events.
pub fn conformance(client: Client) -> Methods {
    let state = Rc::new(State::default());
    let on_note = Rc::clone(&state);
    Methods::new()
        .raw_sync("Echo", |request| Ok(request.payload))
        .method_ctx("Sleep", {
            let state = Rc::clone(&state);
            move |params: SleepParams, ctx: Context| {
                let state = Rc::clone(&state);
                async move {
                    let _sleeping = Sleeping::new(&state);
                    let started = Instant::now();
                    let cancelled = tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(params.ms)) => false,
                        reason = ctx.cancelled() => {
                            state.remember_cancel(&ctx, &reason);
                            true
                        }
                    };
                    Ok(SleepReply {
                        slept_ms: millis(started.elapsed()),
                        cancelled,
                    })
                }
            }
        })
        .raw_sync("Active", {
            let state = Rc::clone(&state);
            move |_| {
                encoded(&ActiveReply {
                    sleeping: state.sleeping.get(),
                })
            }
        })
        .stream("Count", {
            let state = Rc::clone(&state);
            move |params: CountParams, ctx: Context, out: Partials| {
                let state = Rc::clone(&state);
                async move {
                    let result = count(params, &ctx, &out).await;
                    state.note_cancel(&ctx);
                    result
                }
            }
        })
        .method("Fail", |params: FailParams| async move {
            Err::<(), _>(HandlerError::with_code(
                params.code.unwrap_or_else(|| HANDLER.to_owned()),
                params.message,
            ))
        })
        .method_ctx("Deadline", |(): (), ctx: Context| async move {
            Ok(ctx.remaining_ms())
        })
        .raw_sync("WhoAmI", {
            let client = client.clone();
            move |_| {
                encoded(&WhoAmI {
                    id: client.id(),
                    pid: std::process::id(),
                })
            }
        })
        .raw_ctx("Relay", {
            let (client, state) = (client.clone(), Rc::clone(&state));
            move |request: Envelope, ctx: Context| {
                let (client, state) = (client.clone(), Rc::clone(&state));
                async move {
                    let result = relay(&client, &request, &ctx).await;
                    state.note_cancel(&ctx);
                    result
                }
            }
        })
        .raw_sync("Notify", move |request| {
            let [target, event, payload] = fields(&request, ["target", "event", "payload"])?;
            let target: String = required(target, "target")?;
            let event: String = required(event, "event")?;
            let mut note = Envelope::event(target, event);
            note.payload = payload;
            client.send(&note).map_err(HandlerError::from)?;
            Ok(Some(nil()))
        })
        .raw_sync("LastCancel", {
            let state = Rc::clone(&state);
            move |_| match &*state.last_cancel.borrow() {
                Some(last) => encoded(last),
                None => Ok(Some(nil())),
            }
        })
        .raw_sync("LastNote", {
            let state = Rc::clone(&state);
            move |_| {
                Ok(Some(
                    state
                        .last_note
                        .borrow()
                        .clone()
                        .flatten()
                        .unwrap_or_else(nil),
                ))
            }
        })
        .on_event(move |event| {
            if &*event.id == "note" {
                *on_note.last_note.borrow_mut() = Some(event.payload);
            }
        })
}

/// `Count`: `0 … n-1` as partial replies (to a caller that asked for a
/// stream), `delay_ms` apart, then `n`.
async fn count(params: CountParams, ctx: &Context, out: &Partials) -> Result<u64, HandlerError> {
    for i in 0..params.n {
        if i > 0 && params.delay_ms > 0 {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(params.delay_ms)) => {}
                reason = ctx.cancelled() => {
                    return Err(PartialError::Cancelled(reason).into());
                }
            }
        }
        out.send(&i).await?;
    }
    Ok(params.n)
}

/// `Relay`: calls `target` with the budget left of this request (a cancel
/// of this request drops the call, which cancels it at the broker), and
/// answers with its reply's payload verbatim or its error's code and
/// message.
async fn relay(client: &Client, request: &Envelope, ctx: &Context) -> HandlerResult {
    let [target, method, payload] = fields(request, ["target", "method", "payload"])?;
    let target: String = required(target, "target")?;
    let method: String = required(method, "method")?;
    let mut call = Envelope::request(target, method, 0);
    call.payload = payload;
    let timeout = ctx.remaining().map_or(DEFAULT_CALL_TIMEOUT, |left| {
        left.max(Duration::from_millis(1))
    });
    let reply = tokio::select! {
        reply = client.call_envelope(call, timeout) => reply,
        reason = ctx.cancelled() => {
            return Err(PartialError::Cancelled(reason).into());
        }
    };
    match reply {
        Ok(reply) => Ok(reply.into_envelope().payload),
        Err(CallError::Remote { code, message, .. }) => Err(HandlerError::with_code(code, message)),
        Err(CallError::NoReply(waited)) => Err(HandlerError::broker(
            ErrorCode::Timeout,
            format!("no reply within {waited:?}"),
        )),
        Err(other) => Err(other.into()),
    }
}

/// The raw values of `names` in a request's map payload (each `None` when
/// absent, each a slice of the payload: carried verbatim); a payload that
/// is not a map is `bad_request`.
fn fields<const N: usize>(
    request: &Envelope,
    names: [&str; N],
) -> Result<[Option<Payload>; N], HandlerError> {
    let bad = |why: String| HandlerError::broker(ErrorCode::BadRequest, why);
    let mut found: [Option<Payload>; N] = std::array::from_fn(|_| None);
    let Some(payload) = &request.payload else {
        return Err(bad("the payload must be a map, found none".into()));
    };
    let bytes = payload.as_bytes();
    let mut reader = Reader::new(bytes);
    let marker = reader.marker().map_err(|e| bad(e.to_string()))?;
    let entries = reader
        .map_len(marker)
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| {
            bad(format!(
                "the payload must be a map, found {}",
                kind_name(marker)
            ))
        })?;
    for _ in 0..entries {
        let (key, value) = map_entry(&mut reader).map_err(|e| bad(e.to_string()))?;
        let wanted = key.and_then(|k| names.iter().position(|n| n.as_bytes() == &bytes[k.clone()]));
        if let Some(i) = wanted {
            found[i] = Some(Payload::from_checked(bytes.slice(value)));
        }
    }
    Ok(found)
}

/// One map entry: the span of its key's text (`None` for a key that is not
/// a str) and of its value.
fn map_entry(
    reader: &mut Reader<'_>,
) -> Result<(Option<Range<usize>>, Range<usize>), MsgpackError> {
    let key_marker = reader.marker()?;
    let key = reader.str_body(key_marker)?;
    if key.is_none() {
        reader.skip_body(key_marker)?;
    }
    Ok((key, reader.value_span()?))
}

/// A field that must be there, decoded.
fn required<T: serde::de::DeserializeOwned>(
    value: Option<Payload>,
    name: &str,
) -> Result<T, HandlerError> {
    let bad = |why: String| HandlerError::broker(ErrorCode::BadRequest, why);
    value
        .ok_or_else(|| bad(format!("{name:?} is missing")))?
        .decode()
        .map_err(|e| bad(format!("{name:?}: {e}")))
}
