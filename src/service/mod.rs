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

mod client;
mod methods;
mod reply_slot;
mod serve;

pub use client::Client;
pub use methods::{
    Answer, HANDLER, HandlerError, HandlerFuture, HandlerResult, Methods, ReplyAddress, reply_for,
};
pub use serve::{ServeError, run, serve};
