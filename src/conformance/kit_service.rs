//! The kit's own in-process service, `kit`: the callee of the subject's
//! calls out (`Relay`) and the target of its events (`Notify`), so the
//! kit sees what arrived, and from whom.
//!
//! - `Echo`: replies with the payload verbatim, and remembers the request
//!   (its `source` and `timeout_ms`).
//! - `Fail {code, message}`: replies an error with that code and message.
//! - every event is remembered (name, source, payload).

use serde::Deserialize;
use std::cell::RefCell;
use std::rc::Rc;

use crate::protocol::{Envelope, Payload};
use crate::service::{HandlerError, Methods};

/// The service's name (its one worker is `kit.0`).
pub const KIT: &str = "kit";

/// What reached the kit's service: the requests to `Echo` and the events,
/// oldest first. Shared with the checks (same thread).
#[derive(Debug, Default)]
pub struct Seen {
    /// Requests to `Echo`.
    pub echoes: RefCell<Vec<Envelope>>,
    /// Events.
    pub events: RefCell<Vec<Envelope>>,
}

#[derive(Deserialize)]
struct FailParams {
    code: String,
    message: String,
}

/// The handler table of `kit`, recording into `seen`.
pub fn methods(seen: &Rc<Seen>) -> Methods {
    let echoes = Rc::clone(seen);
    let events = Rc::clone(seen);
    Methods::new()
        .raw_sync("Echo", move |request| {
            let payload: Option<Payload> = request.payload.clone();
            echoes.echoes.borrow_mut().push(request);
            Ok(payload)
        })
        .method("Fail", |params: FailParams| async move {
            Err::<(), _>(HandlerError::with_code(params.code, params.message))
        })
        .on_event(move |event| events.events.borrow_mut().push(event))
}
