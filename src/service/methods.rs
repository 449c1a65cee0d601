//! A table of handlers by method name, with typed payloads.
//!
//! [`Methods`] is what an in-process worker and a Rust subprocess service
//! run: it decodes the request's payload into the handler's parameter type,
//! runs the handler, and encodes its result. A payload that does not fit is
//! `bad_request`; an unknown method is `unknown_method`; a handler's own
//! failure is `handler` unless it says otherwise; a handler that panics is
//! `internal` (the worker lives on).
//!
//! Handlers registered with `method_ctx`, `raw_ctx`, `stream` and
//! `raw_stream` also get the request's [`Context`] (deadline and
//! cancellation), and streaming ones a [`Partials`] for partial replies.
//! The others (`method`, `raw`, `raw_sync`) are unchanged and cost nothing
//! more per request.

use futures_util::FutureExt;
use futures_util::future::LocalBoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use super::client::Client;
use super::context::{CancelToken, Context, Partials};
pub use super::reply::{HANDLER, HandlerError, HandlerResult, ReplyAddress};
use crate::protocol::{Envelope, ErrorCode, Payload};
use bytestring::ByteString;

/// The method the broker's health checks call by default.
pub const PING: &str = "Ping";

/// A boxed handler future. Local: handlers run on the worker's arbiter.
pub type HandlerFuture = LocalBoxFuture<'static, HandlerResult>;

type EventHandler = Box<dyn Fn(Envelope)>;

type LifecycleHandler = Box<dyn Fn(Envelope, Context, Partials) -> HandlerFuture>;

/// A handler as stored: one that may wait, one that answers at once, or one
/// that sees its request's lifecycle (deadline, cancellation, partial
/// replies). The second kind exists for the hot path: no future is boxed
/// per request.
enum RawHandler {
    Async(Box<dyn Fn(Envelope) -> HandlerFuture>),
    Sync(Box<dyn Fn(Envelope) -> HandlerResult>),
    Lifecycle(LifecycleHandler),
}

/// What the runner of a request offers its handler: where partial replies
/// go (`None`: nowhere) and whether a `cancel` can reach it.
#[derive(Clone, Copy)]
struct Runner<'a> {
    /// The served pipe's client: partial replies go out through it, and
    /// the serve loop delivers cancels.
    served: Option<&'a Client>,
}

impl Runner<'_> {
    const DETACHED: Runner<'static> = Runner { served: None };
}

impl RawHandler {
    fn boxed<F, Fut>(handler: F) -> Self
    where
        F: Fn(Envelope) -> Fut + 'static,
        Fut: Future<Output = HandlerResult> + 'static,
    {
        Self::Async(Box::new(move |request| Box::pin(handler(request))))
    }

    fn lifecycle<F, Fut>(handler: F) -> Self
    where
        F: Fn(Envelope, Context, Partials) -> Fut + 'static,
        Fut: Future<Output = HandlerResult> + 'static,
    {
        Self::Lifecycle(Box::new(move |request, ctx, partials| {
            Box::pin(handler(request, ctx, partials))
        }))
    }

    /// Calls the handler: a sync handler's result, or an async handler's
    /// future, not yet polled (with the cancellation a lifecycle handler
    /// was given). The request is taken out of `slot` here, where the
    /// handler takes it: passed down by reference, it is copied once.
    fn call(&self, slot: &mut Envelope, runner: Runner<'_>) -> Called {
        match self {
            Self::Sync(handler) => Called::Done(handler(take(slot))),
            Self::Async(handler) => Called::Waiting(handler(take(slot)), None),
            Self::Lifecycle(handler) => {
                let request = take(slot);
                let token = match runner.served {
                    Some(_) => CancelToken::new(),
                    None => CancelToken::never(),
                };
                let ctx = Context::of(&request, Instant::now(), token.clone());
                let out = runner.served.filter(|_| request.stream).cloned();
                let partials = Partials::new(out, ReplyAddress::of(&request), token.clone());
                Called::Waiting(handler(request, ctx, partials), Some(token))
            }
        }
    }
}

/// The request out of `slot`, which keeps a blank envelope (no
/// allocation: its strings are static and empty).
fn take(slot: &mut Envelope) -> Envelope {
    std::mem::replace(slot, Envelope::request("", "", 0))
}

/// What calling a handler gave: its result, or a future that has more to do
/// (and the cancellation its handler watches, if it watches one).
enum Called {
    Done(HandlerResult),
    Waiting(HandlerFuture, Option<CancelToken>),
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
            typed_result(params.map(&handler))
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

    /// [`method`](Self::method) with the request's [`Context`]: its
    /// deadline, and a cancellation that the broker's `cancel` triggers.
    ///
    /// ```no_run
    /// use procbroker::service::{Context, HandlerError, Methods};
    /// use std::time::Duration;
    ///
    /// let methods = Methods::new().method_ctx("Sleep", |ms: u64, ctx: Context| async move {
    ///     tokio::select! {
    ///         () = tokio::time::sleep(Duration::from_millis(ms)) => Ok(ms),
    ///         reason = ctx.cancelled() => Err(HandlerError::new(format!("stopped: {reason}"))),
    ///     }
    /// });
    /// ```
    pub fn method_ctx<P, R, F, Fut>(self, name: &str, handler: F) -> Self
    where
        P: DeserializeOwned + 'static,
        R: Serialize + 'static,
        F: Fn(P, Context) -> Fut + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + 'static,
    {
        self.raw_stream(name, move |request: Envelope, ctx, _partials| {
            let params = request.payload_as::<P>();
            let future = params.map(|params| handler(params, ctx));
            typed_result(future)
        })
    }

    /// [`raw`](Self::raw) with the request's [`Context`].
    pub fn raw_ctx<F, Fut>(self, name: &str, handler: F) -> Self
    where
        F: Fn(Envelope, Context) -> Fut + 'static,
        Fut: Future<Output = HandlerResult> + 'static,
    {
        self.raw_stream(name, move |request, ctx, _partials| handler(request, ctx))
    }

    /// Serves `name` with a streaming handler: it sends partial replies
    /// through its [`Partials`] and returns the final reply's payload.
    ///
    /// Partial replies reach callers that asked `stream = true`; a request
    /// without it gets the final reply only (what the handler sends as
    /// partials is dropped), so the same method serves both.
    ///
    /// ```no_run
    /// use procbroker::service::{Context, HandlerError, Methods, Partials};
    ///
    /// let methods = Methods::new().stream("Count", |n: u32, _ctx: Context, out: Partials| async move {
    ///     for i in 0..n {
    ///         out.send(&i).await?; // fails once the request is cancelled
    ///     }
    ///     Ok::<_, HandlerError>(n)
    /// });
    /// ```
    pub fn stream<P, R, F, Fut>(self, name: &str, handler: F) -> Self
    where
        P: DeserializeOwned + 'static,
        R: Serialize + 'static,
        F: Fn(P, Context, Partials) -> Fut + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + 'static,
    {
        self.raw_stream(name, move |request: Envelope, ctx, partials| {
            let params = request.payload_as::<P>();
            let future = params.map(|params| handler(params, ctx, partials));
            typed_result(future)
        })
    }

    /// [`stream`](Self::stream) with the whole request envelope and raw
    /// payloads.
    pub fn raw_stream<F, Fut>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Envelope, Context, Partials) -> Fut + 'static,
        Fut: Future<Output = HandlerResult> + 'static,
    {
        self.handlers
            .insert(name.to_owned(), RawHandler::lifecycle(handler));
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

    /// Runs the handler for `request.id`. A handler that takes a
    /// [`Context`] gets one that is never cancelled, and its partial
    /// replies are dropped.
    pub fn dispatch(&self, mut request: Envelope) -> HandlerFuture {
        match self.call(&mut request, Runner::DETACHED) {
            Called::Done(result) => Box::pin(std::future::ready(result)),
            Called::Waiting(future, _) => future,
        }
    }

    /// Runs the handler for `request.id` up to its first wait: the result,
    /// or the future that has more to do.
    fn start(&self, request: &mut Envelope, runner: Runner<'_>) -> Called {
        let (mut future, token) = match self.call(request, runner) {
            Called::Waiting(future, token) => (future, token),
            done => return done,
        };
        match (&mut future).now_or_never() {
            Some(result) => Called::Done(result),
            None => Called::Waiting(future, token),
        }
    }

    /// Calls the handler for `request.id`: a result now (sync handlers,
    /// `Ping`, unknown methods), or an async handler's unpolled future.
    fn call(&self, request: &mut Envelope, runner: Runner<'_>) -> Called {
        match self.handlers.get(&*request.id).or(self.fallback.as_ref()) {
            Some(handler) => handler.call(request, runner),
            // The broker's health check: answered with `{}`
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

/// A request run up to its first wait: its handler's result and the
/// address of its reply (whoever answers builds the reply where it wants
/// it), or the future of the whole reply with what names the request and
/// the cancellation its handler watches (if any).
pub(crate) enum Started {
    Now(ReplyAddress, HandlerResult),
    Later {
        reply: LocalBoxFuture<'static, Envelope>,
        /// Who asked and the correlation id: what a `cancel` names.
        request: (ByteString, u64),
        token: Option<CancelToken>,
    },
}

impl Methods {
    /// Runs the handler for `request` up to its first wait and returns the
    /// reply if it is already there. A panic, now or later, becomes an
    /// `internal` error reply (logged with `worker`, the process id).
    ///
    /// A handler that takes a [`Context`] gets one that is never
    /// cancelled, and its partial replies are dropped (the final reply is
    /// the answer).
    pub fn answer(&self, mut request: Envelope, worker: &str) -> Answer {
        match self.run(&mut request, worker, Runner::DETACHED) {
            Started::Now(address, result) => Answer::Now(address.reply(result)),
            Started::Later { reply, .. } => Answer::Later(reply),
        }
    }

    /// [`answer`](Self::answer) of a request that arrives boxed, as the
    /// Router delivers it to an in-process worker: a reply ready at once is
    /// written into the request's box, so it costs no allocation and no
    /// copy of the envelope on its way back.
    pub(crate) fn answer_boxed(&self, mut request: Box<Envelope>, worker: &str) -> BoxedAnswer {
        match self.run(&mut request, worker, Runner::DETACHED) {
            Started::Now(address, result) => {
                address.reply_into(result, &mut request);
                BoxedAnswer::Now(request)
            }
            Started::Later { reply, .. } => BoxedAnswer::Later(reply),
        }
    }

    /// [`answer`](Self::answer) for the serve loop of a subprocess: partial
    /// replies go out through `client`, and a lifecycle handler's token is
    /// one a `cancel` can trigger (the caller registers it).
    pub(crate) fn answer_served(
        &self,
        mut request: Envelope,
        worker: &str,
        client: &Client,
    ) -> Started {
        let runner = Runner {
            served: Some(client),
        };
        self.run(&mut request, worker, runner)
    }

    /// Runs the handler up to its first wait: its result and the address of
    /// the reply (the caller builds the reply where it wants it), or the
    /// future of the whole reply. A panic is an `internal` error. The
    /// handler takes the request out of `request`.
    fn run(&self, request: &mut Envelope, worker: &str, runner: Runner<'_>) -> Started {
        let address = ReplyAddress::of(request);
        let started = std::panic::catch_unwind(AssertUnwindSafe(|| self.start(request, runner)));
        match started {
            Ok(Called::Done(result)) => Started::Now(address, result),
            Ok(Called::Waiting(future, token)) => {
                let worker = worker.to_owned();
                let (to, correlation_id) = address.request();
                let request = (to.clone(), correlation_id);
                Started::Later {
                    reply: Box::pin(AssertUnwindSafe(future).catch_unwind().map(move |result| {
                        address.reply(result.unwrap_or_else(|_| panicked(&worker)))
                    })),
                    request,
                    token,
                }
            }
            Err(_) => Started::Now(address, panicked(worker)),
        }
    }
}

/// [`Answer`] of a boxed request: the reply in the request's box, or the
/// future of a reply.
pub(crate) enum BoxedAnswer {
    Now(Box<Envelope>),
    Later(LocalBoxFuture<'static, Envelope>),
}

/// A typed handler's future as a raw one: a payload that did not decode is
/// `bad_request`, a result that does not encode is `internal`.
async fn typed_result<R, Fut>(started: Result<Fut, crate::protocol::PayloadError>) -> HandlerResult
where
    R: Serialize + 'static,
    Fut: Future<Output = Result<R, HandlerError>> + 'static,
{
    let result = started
        .map_err(|e| HandlerError::broker(ErrorCode::BadRequest, e.to_string()))?
        .await?;
    Payload::encode(&result)
        .map(Some)
        .map_err(|e| HandlerError::broker(ErrorCode::Internal, e.to_string()))
}

fn panicked(worker: &str) -> HandlerResult {
    tracing::error!(process = worker, "handler panicked");
    Err(HandlerError::broker(
        ErrorCode::Internal,
        "the handler panicked",
    ))
}

/// The reply to `request` for a handler's result.
pub fn reply_for(request: &Envelope, result: HandlerResult) -> Envelope {
    ReplyAddress::of(request).reply(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MessageType;

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

    #[test]
    fn a_boxed_request_is_answered_in_its_own_box_as_answer_would() {
        let methods = Methods::new()
            .raw_sync("Id", |r| Ok(r.payload))
            .raw_sync("Boom", |_| panic!("boom"))
            .raw("Later", |r: Envelope| async move {
                // Not ready at the first poll, ready at the next.
                let mut first = true;
                std::future::poll_fn(|_| {
                    if std::mem::take(&mut first) {
                        std::task::Poll::Pending
                    } else {
                        std::task::Poll::Ready(())
                    }
                })
                .await;
                Ok(r.payload)
            });
        for method in ["Id", "Boom", "Unknown", PING] {
            let boxed = Box::new(request(method));
            let at: *const Envelope = &*boxed;
            let BoxedAnswer::Now(reply) = methods.answer_boxed(boxed, "svc.1") else {
                panic!("{method}: answered at once");
            };
            assert!(std::ptr::eq(&*reply, at), "{method}: the request's box");
            assert_eq!(
                *reply,
                now(methods.answer(request(method), "svc.1")),
                "{method}"
            );
        }
        // A handler that waits gives a future; its reply is the same.
        let BoxedAnswer::Later(future) = methods.answer_boxed(Box::new(request("Later")), "svc.1")
        else {
            panic!("a handler that waits is answered later");
        };
        let reply = future.now_or_never().expect("ready");
        assert_eq!(reply.payload, request("Later").payload);
    }
}
