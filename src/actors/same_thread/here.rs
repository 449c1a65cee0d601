//! The Routers running on this thread, as the processes and callers there
//! see them: an [`Intake`] each, found by [`RouterKey`].
//!
//! A link reaches its Router through the intake the Router gave it at
//! registration ([`RouterLink::connect`](super::RouterLink::connect)); a
//! Rust caller of the embedding API has only the Router's key, and finds it
//! in this thread's list ([`call_here`]). Either way a method call replaces
//! a message: the mailbox hop and the Router's wake-up are saved (with one
//! request in flight, a fifth of the broker's instructions per call).

use bytestring::ByteString;
use std::cell::RefCell;
use std::rc::Weak;

use crate::actors::envelopes::{Call, Envelopes};

/// The Router, seen from its own thread. Both calls fail (and leave what
/// they were given) when the Router is stopped, or busy with another input:
/// the state is only borrowed on its thread, by one input at a time, and an
/// input never calls back in, so that cannot happen, but it is never a
/// panic.
pub(crate) trait Intake {
    /// Routes `envelopes` from process `from`, as a
    /// [`Route`](crate::actors::envelopes::Route) would, and takes them;
    /// false, leaving them, if it could not.
    fn route(&self, from: &ByteString, envelopes: &mut Envelopes) -> bool;

    /// Takes `call`, as a `Call` message would; leaves it if it could not.
    /// (By reference: a `Call` moved through this dynamic call and back
    /// would be copied twice.)
    fn call(&self, call: &mut Option<Call>);
}

/// Identifies one Router among those of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RouterKey(pub(crate) u64);

thread_local! {
    /// The Routers running on this thread.
    static HERE: RefCell<Vec<(RouterKey, Weak<dyn Intake>)>> = const { RefCell::new(Vec::new()) };
}

/// A Router started on this thread.
pub(crate) fn arrive(key: RouterKey, router: Weak<dyn Intake>) {
    // `try_with`: never a panic, even in a thread's teardown.
    let _ = HERE.try_with(|routers| routers.borrow_mut().push((key, router)));
}

/// A Router on this thread stopped.
pub(crate) fn leave(key: RouterKey) {
    let _ = HERE.try_with(|routers| routers.borrow_mut().retain(|(k, _)| *k != key));
}

/// Hands `call` to Router `key` with a method call if it runs on this
/// thread (the mailbox hop and the Router's wake-up saved); gives it back
/// otherwise, to be sent as a message. Calls are independent requests, so
/// one that overtakes another still in the mailbox changes nothing a caller
/// can rely on.
pub(crate) fn call_here(key: RouterKey, call: Call) -> Option<Call> {
    let mut call = Some(call);
    let _ = HERE.try_with(|routers| {
        let router = routers
            .borrow()
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, router)| router.upgrade());
        if let Some(router) = router {
            router.call(&mut call);
        }
    });
    call
}
