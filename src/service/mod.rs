//! Writing a service: the handler table, and what a Rust subprocess links to
//! serve it under the broker.
//!
//! ```no_run
//! use procbroker::service::{self, HandlerError, Methods};
//!
//! fn main() -> Result<(), service::ServeError> {
//!     service::run(|broker| {
//!         Methods::new()
//!             .method("Add", |(a, b): (i64, i64)| async move {
//!                 a.checked_add(b).ok_or_else(|| HandlerError::new("overflow"))
//!             })
//!             // Calls to other services go through the broker.
//!             .method("Shout", move |text: String| {
//!                 let broker = broker.clone();
//!                 async move {
//!                     let echoed: String = broker.call("echo", "Echo", &text).await?.payload_as()?;
//!                     Ok(echoed.to_uppercase())
//!                 }
//!             })
//!     })
//! }
//! ```
//!
//! [`run`] reads requests from stdin and writes replies to stdout (so a
//! service must log to stderr, never print to stdout), announces `ready`, and
//! returns at EOF on stdin, or after the `shutdown` event once the requests
//! it is handling are answered. The same [`Methods`] serve in-process workers
//! through [`crate::embed::BrokerHandle::add_service`].
//!
//! The request lifecycle (protocol v1.1): a handler registered with
//! [`Methods::method_ctx`] (or `raw_ctx`, `stream`, `raw_stream`) gets a
//! [`Context`] with the request's deadline and a cancellation that the
//! broker's `cancel` triggers; a streaming handler sends partial replies
//! through [`Partials`]. Calls out take [`CallOptions`] (deadline, routing
//! key), [`Client::call_stream`] reads a stream of partial replies, and a
//! call dropped before its reply is cancelled at the broker.
//!
//! ```no_run
//! use procbroker::service::{self, CallOptions, Context, HandlerError, Methods, Partials};
//! use std::time::Duration;
//!
//! fn main() -> Result<(), service::ServeError> {
//!     service::run(|broker| {
//!         Methods::new()
//!             // Partial replies to callers that asked for a stream, then the final one.
//!             .stream("Count", |n: u32, _ctx: Context, out: Partials| async move {
//!                 for i in 0..n {
//!                     out.send(&i).await?;
//!                 }
//!                 Ok::<_, HandlerError>(n)
//!             })
//!             // The deadline passed on to a call out; a cancel stops the call.
//!             .method_ctx("Lookup", move |key: String, ctx: Context| {
//!                 let broker = broker.clone();
//!                 async move {
//!                     let budget = ctx.remaining().unwrap_or(Duration::from_secs(5));
//!                     let options = CallOptions::new().timeout(budget).key(key.as_str());
//!                     tokio::select! {
//!                         reply = broker.call_with("store", "Get", &key, options) => {
//!                             Ok(reply?.payload_as::<String>()?)
//!                         }
//!                         reason = ctx.cancelled() => Err(HandlerError::new(format!("cancelled: {reason}"))),
//!                     }
//!                 }
//!             })
//!     })
//! }
//! ```

mod client;
mod context;
mod methods;
mod reply;
mod reply_slot;
mod serve;

pub use client::{CallOptions, Client, DEFAULT_CALL_TIMEOUT, ReplyStream, STREAM_BUFFER};
pub use context::{CancelToken, Context, PartialError, Partials};
pub(crate) use methods::BoxedAnswer;
pub use methods::{
    Answer, HANDLER, HandlerError, HandlerFuture, HandlerResult, Methods, ReplyAddress, reply_for,
};
pub use serve::{ServeError, run, serve};
