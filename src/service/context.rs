//! What a handler knows of its request besides the payload: its deadline,
//! its cancellation, and (for a streaming handler) where partial replies go.

use bytestring::ByteString;
use serde::Serialize;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

use super::client::Client;
use super::reply::{HandlerError, ReplyAddress};
use crate::call::CallError;
use crate::protocol::{CancelReason, Envelope, ErrorCode, Payload, PayloadError};

/// A request's cancellation, as its handler sees it.
///
/// The serve loop of a subprocess service ([`run`](super::run)) cancels it
/// when the broker sends `cancel` for the request (the deadline passed, the
/// caller cancelled or went away, its stream was cut, or the drain at
/// shutdown expired), and when stdin closes (reason `shutting_down`).
/// Cancellation is cooperative: a handler that never looks at its token
/// runs to its end, as in protocol v1 (its reply is then not sent: the
/// broker no longer waits for it).
///
/// Cheap to clone; local to the service's thread. A token made by
/// [`CancelToken::never`] (requests not served over a pipe, such as those of
/// in-process workers) is never cancelled.
#[derive(Clone, Default)]
pub struct CancelToken(Option<Rc<TokenState>>);

struct TokenState {
    reason: RefCell<Option<CancelReason>>,
    /// The final reply went out: partial replies are refused.
    finished: Cell<bool>,
    cancelled: Notify,
}

impl CancelToken {
    /// A token that can be cancelled (one allocation).
    pub(crate) fn new() -> Self {
        Self(Some(Rc::new(TokenState {
            reason: RefCell::new(None),
            finished: Cell::new(false),
            cancelled: Notify::new(),
        })))
    }

    /// A token that is never cancelled (allocates nothing).
    pub fn never() -> Self {
        Self(None)
    }

    /// Whether the request was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.reason.borrow().is_some())
    }

    /// Why the request was cancelled, if it was.
    pub fn reason(&self) -> Option<CancelReason> {
        self.0.as_ref().and_then(|s| s.reason.borrow().clone())
    }

    /// Resolves once the request is cancelled, with the reason (never, for
    /// a token that cannot be cancelled). Use it in `tokio::select!` beside
    /// the handler's work.
    pub async fn cancelled(&self) -> CancelReason {
        let Some(state) = &self.0 else {
            return std::future::pending().await;
        };
        loop {
            // One thread: nothing can cancel between this check and the
            // wait below registering (its first poll).
            if let Some(reason) = state.reason.borrow().clone() {
                return reason;
            }
            state.cancelled.notified().await;
        }
    }

    /// Cancels with `reason`; false if it was already cancelled (the first
    /// reason stays) or cannot be.
    pub(crate) fn cancel(&self, reason: CancelReason) -> bool {
        let Some(state) = &self.0 else {
            return false;
        };
        {
            let mut slot = state.reason.borrow_mut();
            if slot.is_some() {
                return false;
            }
            *slot = Some(reason);
        }
        state.cancelled.notify_waiters();
        true
    }

    /// The final reply is out: later partial replies are refused.
    pub(crate) fn finish(&self) {
        if let Some(state) = &self.0 {
            state.finished.set(true);
        }
    }

    fn is_finished(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.finished.get())
    }
}

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelToken")
            .field("cancellable", &self.0.is_some())
            .field("reason", &self.reason())
            .finish()
    }
}

/// A request as its handler sees it beyond the payload: who asked, by which
/// method, its deadline and its cancellation. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Context {
    source: ByteString,
    method: ByteString,
    correlation_id: u64,
    deadline: Option<Instant>,
    stream: bool,
    token: CancelToken,
}

impl Context {
    /// The context of `request`, received at `received`: its deadline is
    /// `received + timeout_ms`.
    pub(crate) fn of(request: &Envelope, received: Instant, token: CancelToken) -> Self {
        Self {
            source: request.source.clone(),
            method: request.id.clone(),
            correlation_id: request.correlation_id,
            deadline: request
                .timeout_ms
                .and_then(|ms| received.checked_add(Duration::from_millis(ms))),
            stream: request.stream,
            token,
        }
    }

    /// The requester's process id (`broker` for health checks).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The method called (the request's `id`).
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The request's correlation id (unique among the requester's requests
    /// in flight).
    pub fn correlation_id(&self) -> u64 {
        self.correlation_id
    }

    /// When the caller stops waiting: the request's `timeout_ms` counted
    /// from when the service read it. `None` when the request carried none
    /// (a broker of protocol v1.1 always sets it).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The budget left before the deadline (zero once it passed).
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// [`remaining`](Self::remaining) in whole milliseconds (rounded down).
    pub fn remaining_ms(&self) -> Option<u64> {
        self.remaining()
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// Whether the caller asked for partial replies (`stream = true`).
    pub fn is_stream(&self) -> bool {
        self.stream
    }

    /// The request's cancellation.
    pub fn token(&self) -> &CancelToken {
        &self.token
    }

    /// Whether the request was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Why the request was cancelled, if it was.
    pub fn cancel_reason(&self) -> Option<CancelReason> {
        self.token.reason()
    }

    /// Resolves once the request is cancelled, with the reason.
    pub async fn cancelled(&self) -> CancelReason {
        self.token.cancelled().await
    }
}

/// How many frames may wait in the service's own stdout queue before
/// [`Partials::send`] waits for the pipe to take some.
const PARTIALS_HIGH_WATER: usize = 1024;

/// Where a streaming handler's partial replies go.
///
/// A request that asked `stream = true` gets each value sent here as a
/// partial reply (`more = true`), in order, before the handler's final
/// reply. A request that did not ask for a stream gets only the final
/// reply: what is sent here is dropped (and [`is_streaming`](Self::is_streaming)
/// says so), so one handler serves both kinds of caller.
pub struct Partials {
    /// `None` when partial replies are not sent (see above).
    out: Option<Client>,
    address: ReplyAddress,
    token: CancelToken,
}

/// Why a partial reply was not sent.
#[derive(Debug, thiserror::Error)]
pub enum PartialError {
    /// The request was cancelled (its stream cut, its caller gone, …):
    /// stop producing.
    #[error("the request was cancelled ({0})")]
    Cancelled(CancelReason),
    /// The handler's final reply already went out.
    #[error("the final reply was already sent")]
    Finished,
    /// The value could not be encoded.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// The reply could not be written (stdout closed, or the frame is over
    /// the size limit).
    #[error(transparent)]
    Send(#[from] CallError),
}

impl From<PartialError> for HandlerError {
    /// A handler that gives up on a stream with `?` answers with the code
    /// that says why (`cancelled` for a cancelled request: that reply is
    /// not sent anyway).
    fn from(e: PartialError) -> Self {
        let code = match &e {
            PartialError::Cancelled(_) => ErrorCode::Cancelled,
            _ => ErrorCode::Internal,
        };
        Self::broker(code, e.to_string())
    }
}

impl Partials {
    pub(crate) fn new(out: Option<Client>, address: ReplyAddress, token: CancelToken) -> Self {
        Self {
            out,
            address,
            token,
        }
    }

    /// Whether partial replies reach the caller (it asked `stream = true`).
    pub fn is_streaming(&self) -> bool {
        self.out.is_some()
    }

    /// Sends `value` as a partial reply. Waits only when this service's own
    /// stdout queue is long (the broker reads it more slowly than it is
    /// written); fails once the request is cancelled, so a producer stops.
    pub async fn send<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), PartialError> {
        if self.out.is_none() {
            return self.check();
        }
        self.send_raw(Some(Payload::encode(value)?)).await
    }

    /// [`send`](Self::send) with an encoded payload (or none).
    pub async fn send_raw(&self, payload: Option<Payload>) -> Result<(), PartialError> {
        self.check()?;
        let Some(out) = &self.out else {
            return Ok(());
        };
        out.send(&self.address.partial(payload))?;
        if out.outbox().depth() >= PARTIALS_HIGH_WATER {
            tokio::select! {
                () = out.written_below(PARTIALS_HIGH_WATER / 2) => {}
                reason = self.token.cancelled() => return Err(PartialError::Cancelled(reason)),
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), PartialError> {
        if let Some(reason) = self.token.reason() {
            return Err(PartialError::Cancelled(reason));
        }
        if self.token.is_finished() {
            return Err(PartialError::Finished);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn a_token_keeps_its_first_reason_and_wakes_its_waiter() {
        let token = CancelToken::new();
        let mut waiting = Box::pin(token.cancelled());
        assert!((&mut waiting).now_or_never().is_none());
        assert!(token.cancel(CancelReason::Timeout));
        assert!(!token.cancel(CancelReason::Busy));
        assert_eq!(waiting.now_or_never(), Some(CancelReason::Timeout));
        assert_eq!(token.reason(), Some(CancelReason::Timeout));
        assert!(token.clone().is_cancelled());
    }

    #[test]
    fn a_never_token_stays_quiet() {
        let token = CancelToken::never();
        assert!(!token.cancel(CancelReason::Cancelled));
        assert!(!token.is_cancelled());
        assert!(token.cancelled().now_or_never().is_none());
    }

    #[test]
    fn the_deadline_is_counted_from_receipt() {
        let request = Envelope::request("svc", "M", 3)
            .with_source("c.0")
            .with_timeout_ms(1500);
        let received = Instant::now();
        let ctx = Context::of(&request, received, CancelToken::never());
        assert_eq!(ctx.deadline(), Some(received + Duration::from_millis(1500)));
        let left = ctx.remaining_ms().expect("a deadline");
        assert!((1400..=1500).contains(&left), "{left}");
        assert_eq!(
            (ctx.source(), ctx.method(), ctx.correlation_id()),
            ("c.0", "M", 3)
        );
        let none = Context::of(
            &request.clone().response(None),
            received,
            CancelToken::never(),
        );
        assert_eq!(none.remaining(), None);
    }
}
