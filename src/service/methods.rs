//! A table of handlers by method name, with typed payloads.
//!
//! [`Methods`] is what an in-process worker and a Rust subprocess service
//! run: it decodes the request's payload into the handler's parameter type,
//! runs the handler, and encodes its result. A payload that does not fit is
//! `bad_request`; an unknown method is `unknown_method`; a handler's own
//! failure is `handler` unless it says otherwise; a handler that panics is
//! `internal` (the worker lives on).

use futures_util::FutureExt;
use futures_util::future::LocalBoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use crate::protocol::{Envelope, ErrorCode, MessageType, Payload};
use bytestring::ByteString;

/// The code of a handler's own errors unless it picks another.
pub const HANDLER: &str = "handler";

/// A failed request, as a handler reports it: becomes an `error` reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct HandlerError {
    /// Machine-readable code (`handler` by default).
    pub code: String,
    /// Human-readable message.
    pub message: String,
}

impl HandlerError {
    /// An error with the default code `handler`.
    pub fn new(message: impl Into<String>) -> Self {
        Self::with_code(HANDLER, message)
    }

    /// An error with a code of the handler's choosing.
    pub fn with_code(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }

    /// An error with one of the broker's codes.
    pub fn broker(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::with_code(code.as_str(), message)
    }
}

/// What a handler resolves to: a payload (or none) or an error.
pub type HandlerResult = Result<Option<Payload>, HandlerError>;

/// The method the broker's health checks call by default.
pub const PING: &str = "Ping";

/// A boxed handler future. Local: handlers run on the worker's arbiter.
pub type HandlerFuture = LocalBoxFuture<'static, HandlerResult>;

type EventHandler = Box<dyn Fn(Envelope)>;

/// A handler as stored: one that may wait, or one that answers at once.
/// The second kind exists for the hot path: no future is boxed per request.
enum RawHandler {
    Async(Box<dyn Fn(Envelope) -> HandlerFuture>),
    Sync(Box<dyn Fn(Envelope) -> HandlerResult>),
}

impl RawHandler {
    fn boxed<F, Fut>(handler: F) -> Self
    where
        F: Fn(Envelope) -> Fut + 'static,
        Fut: Future<Output = HandlerResult> + 'static,
    {
        Self::Async(Box::new(move |request| Box::pin(handler(request))))
    }

    /// Calls the handler: a sync handler's result, or an async handler's
    /// future, not yet polled.
    fn call(&self, request: Envelope) -> Called {
        match self {
            Self::Sync(handler) => Called::Done(handler(request)),
            Self::Async(handler) => Called::Waiting(handler(request)),
        }
    }
}

/// What calling a handler gave: its result, or a future that has more to do.
enum Called {
    Done(HandlerResult),
    Waiting(HandlerFuture),
}

/// Handlers by method name, plus an optional event handler.
#[derive(Default)]
pub struct Methods {
    handlers: HashMap<String, RawHandler, foldhash::fast::RandomState>,
    fallback: Option<RawHandler>,
    on_event: Option<EventHandler>,
}

impl Methods {
    /// An empty table (every request is `unknown_method`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `name` with a typed handler: the payload is decoded into `P`
    /// (`bad_request` if it does not fit) and the result `R` is encoded back.
    pub fn method<P, R, F, Fut>(self, name: &str, handler: F) -> Self
    where
        P: DeserializeOwned + 'static,
        R: Serialize + 'static,
        F: Fn(P) -> Fut + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + 'static,
    {
        self.raw(name, move |request: Envelope| {
            let params = request.payload_as::<P>();
            let future = params.map(&handler);
            async move {
                let result = future
                    .map_err(|e| HandlerError::broker(ErrorCode::BadRequest, e.to_string()))?
                    .await?;
                Payload::encode(&result)
                    .map(Some)
                    .map_err(|e| HandlerError::broker(ErrorCode::Internal, e.to_string()))
            }
        })
    }

    /// Serves `name` with a handler that sees the whole request envelope and
    /// answers with a raw payload.
    pub fn raw<F, Fut>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Envelope) -> Fut + 'static,
        Fut: Future<Output = HandlerResult> + 'static,
    {
        self.handlers
            .insert(name.to_owned(), RawHandler::boxed(handler));
        self
    }

    /// Serves `name` with a handler that answers without waiting: nothing
    /// is boxed or allocated per request for it, which is what a hot
    /// service (an echo, a lookup) wants.
    pub fn raw_sync<F>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Envelope) -> HandlerResult + 'static,
    {
        self.handlers
            .insert(name.to_owned(), RawHandler::Sync(Box::new(handler)));
        self
    }

    /// Serves every method not in the table with `handler` (instead of
    /// answering `unknown_method`).
    pub fn fallback<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(Envelope) -> Fut + 'static,
        Fut: Future<Output = HandlerResult> + 'static,
    {
        self.fallback = Some(RawHandler::boxed(handler));
        self
    }

    /// [`fallback`](Self::fallback) with a handler that answers without
    /// waiting (see [`raw_sync`](Self::raw_sync)).
    pub fn fallback_sync<F>(mut self, handler: F) -> Self
    where
        F: Fn(Envelope) -> HandlerResult + 'static,
    {
        self.fallback = Some(RawHandler::Sync(Box::new(handler)));
        self
    }

    /// Handles events delivered to the worker (otherwise they are ignored).
    pub fn on_event(mut self, handler: impl Fn(Envelope) + 'static) -> Self {
        self.on_event = Some(Box::new(handler));
        self
    }

    /// Runs the handler for `request.id`.
    pub fn dispatch(&self, request: Envelope) -> HandlerFuture {
        match self.call(request) {
            Called::Done(result) => Box::pin(std::future::ready(result)),
            Called::Waiting(future) => future,
        }
    }

    /// Runs the handler for `request.id` up to its first wait: the result,
    /// or the future that has more to do.
    fn start(&self, request: Envelope) -> Called {
        let mut future = match self.call(request) {
            Called::Waiting(future) => future,
            done => return done,
        };
        match (&mut future).now_or_never() {
            Some(result) => Called::Done(result),
            None => Called::Waiting(future),
        }
    }

    /// Calls the handler for `request.id`: a result now (sync handlers,
    /// `Ping`, unknown methods), or an async handler's unpolled future.
    fn call(&self, request: Envelope) -> Called {
        match self.handlers.get(&*request.id).or(self.fallback.as_ref()) {
            Some(handler) => handler.call(request),
            // The broker's health check (DESIGN 10.3): answered with `{}`
            // unless the service serves `Ping` itself.
            None if &*request.id == PING => Called::Done(
                crate::protocol::Payload::encode(&crate::protocol::rpc::Empty {})
                    .map(Some)
                    .map_err(|e| HandlerError::broker(ErrorCode::Internal, e.to_string())),
            ),
            None => Called::Done(Err(HandlerError::broker(
                ErrorCode::UnknownMethod,
                format!("no method {:?}", &*request.id),
            ))),
        }
    }

    /// Passes an event to the event handler, if there is one.
    pub fn event(&self, event: Envelope) {
        if let Some(handler) = &self.on_event {
            handler(event);
        }
    }

    /// The method names served, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

/// What a reply needs of its request: method, correlation id, requester.
/// Kept instead of the whole request while a handler runs.
#[derive(Debug, Clone)]
pub struct ReplyAddress {
    id: ByteString,
    correlation_id: u64,
    to: ByteString,
}

impl ReplyAddress {
    /// The address of `request`'s reply.
    pub fn of(request: &Envelope) -> Self {
        Self {
            id: request.id.clone(),
            correlation_id: request.correlation_id,
            to: request.source.clone(),
        }
    }

    /// The reply for a handler's result: a response, or an error reply.
    pub fn reply(self, result: HandlerResult) -> Envelope {
        let mut reply = Envelope::request(self.to, self.id, self.correlation_id);
        match result {
            Ok(payload) => {
                reply.kind = MessageType::Response;
                reply.payload = payload;
            }
            Err(e) => {
                reply.kind = MessageType::Error;
                reply.code = Some(e.code.into());
                reply.error = Some(e.message.into());
            }
        }
        reply
    }
}

/// A request's reply: ready now (most handlers), or once a future is done.
// Returned by value and consumed at once; boxing the common `Now` case would
// cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Answer {
    /// The reply.
    Now(Envelope),
    /// A future resolving to the reply.
    Later(LocalBoxFuture<'static, Envelope>),
}

impl Methods {
    /// Runs the handler for `request` up to its first wait and returns the
    /// reply if it is already there. A panic, now or later, becomes an
    /// `internal` error reply (logged with `worker`, the process id).
    pub fn answer(&self, request: Envelope, worker: &str) -> Answer {
        let address = ReplyAddress::of(&request);
        let started = std::panic::catch_unwind(AssertUnwindSafe(|| self.start(request)));
        match started {
            Ok(Called::Done(result)) => Answer::Now(address.reply(result)),
            Ok(Called::Waiting(future)) => {
                let worker = worker.to_owned();
                Answer::Later(Box::pin(AssertUnwindSafe(future).catch_unwind().map(
                    move |result| address.reply(result.unwrap_or_else(|_| panicked(&worker))),
                )))
            }
            Err(_) => Answer::Now(address.reply(panicked(worker))),
        }
    }
}

fn panicked(worker: &str) -> HandlerResult {
    tracing::error!(process = worker, "handler panicked");
    Err(HandlerError::broker(
        ErrorCode::Internal,
        "the handler panicked",
    ))
}

impl From<crate::call::CallError> for HandlerError {
    /// A failed call inside a handler fails the handler: the callee's code
    /// passes through, other failures are `internal`.
    fn from(e: crate::call::CallError) -> Self {
        match e {
            crate::call::CallError::Remote {
                code,
                message,
                source_id,
            } => Self::with_code(code, format!("{source_id}: {message}")),
            other => Self::broker(ErrorCode::Internal, other.to_string()),
        }
    }
}

impl From<crate::protocol::PayloadError> for HandlerError {
    /// A reply payload that does not decode is the handler's `internal` error.
    fn from(e: crate::protocol::PayloadError) -> Self {
        Self::broker(ErrorCode::Internal, e.to_string())
    }
}

/// The reply to `request` for a handler's result.
pub fn reply_for(request: &Envelope, result: HandlerResult) -> Envelope {
    ReplyAddress::of(request).reply(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str) -> Envelope {
        Envelope::request("svc", method, 7)
            .with_source("client.1")
            .with_payload(&5u8)
            .expect("payload")
    }

    fn now(answer: Answer) -> Envelope {
        match answer {
            Answer::Now(reply) => reply,
            Answer::Later(_) => panic!("a sync handler answers at once"),
        }
    }

    #[test]
    fn sync_handlers_answer_at_once_by_name_then_fallback() {
        let methods = Methods::new()
            .raw_sync("Double", |r| {
                let n: u8 = r.payload_as()?;
                Payload::encode(&(n * 2)).map(Some).map_err(Into::into)
            })
            .fallback_sync(|_| Err(HandlerError::new("no such thing")));
        let reply = now(methods.answer(request("Double"), "svc.1"));
        assert_eq!(reply.kind, MessageType::Response);
        assert_eq!((&*reply.target, reply.correlation_id), ("client.1", 7));
        assert_eq!(reply.payload_as::<u8>().expect("u8"), 10);
        let reply = now(methods.answer(request("Other"), "svc.1"));
        assert_eq!(reply.kind, MessageType::Error);
        assert_eq!(reply.code.as_deref(), Some(HANDLER));
        assert_eq!(reply.error.as_deref(), Some("no such thing"));
    }

    #[test]
    fn a_panicking_sync_handler_is_an_internal_error() {
        let methods = Methods::new().raw_sync("Boom", |_| panic!("boom"));
        let reply = now(methods.answer(request("Boom"), "svc.1"));
        assert_eq!(reply.code.as_deref(), Some(ErrorCode::Internal.as_str()));
    }

    #[test]
    fn dispatch_leaves_an_async_handler_unpolled() {
        let polled = std::rc::Rc::new(std::cell::Cell::new(false));
        let seen = polled.clone();
        let methods = Methods::new().raw("Id", move |r: Envelope| {
            let seen = seen.clone();
            async move {
                seen.set(true);
                Ok(r.payload)
            }
        });
        let future = methods.dispatch(request("Id"));
        assert!(!polled.get(), "dispatch only creates the future");
        assert!(future.now_or_never().expect("ready").is_ok());
        assert!(polled.get());
    }

    #[test]
    fn dispatch_of_a_sync_handler_is_a_ready_future() {
        let methods = Methods::new().raw_sync("Id", |r| Ok(r.payload));
        let result = methods.dispatch(request("Id")).now_or_never();
        let payload = result.expect("ready").expect("ok").expect("payload");
        assert_eq!(payload, request("Id").payload.expect("payload"));
    }
}
