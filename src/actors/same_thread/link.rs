//! Process → Router: a process's way in. What it sends goes through its
//! link.
//!
//! The ordering rule: a process's envelopes reach the Router in the order
//! it sent them. A process on the Router's thread (a bridge's child, an
//! in-process worker) hands its envelopes over with a method call
//! ([`Intake::route`]) once the Router has registered it: no mailbox hop, no
//! wake-up of the Router's task. Before that, from another thread, or while
//! any of its batches still waits in the Router's mailbox, they go in a
//! [`Route`] message; a method call then would overtake the mailed batches.
//! So the link counts what it mailed, and the Router tells it when it
//! handled one ([`RouterLink::mail_handled`]).

use actix::Recipient;
use bytestring::ByteString;
use std::cell::{Cell, OnceCell};
use std::rc::Weak;

use super::here::Intake;
use crate::actors::envelopes::{Envelopes, Route};

/// The way in to the Router of one process (one incarnation of a child).
pub(crate) struct RouterLink {
    /// The process id: the `from` of what it routes.
    id: ByteString,
    /// The Router's mailbox.
    routes: Recipient<Route>,
    /// The Router, once it registered this link on its own thread.
    local: OnceCell<Weak<dyn Intake>>,
    /// Batches sent as [`Route`] messages and not yet handled.
    mailed: Cell<usize>,
}

impl RouterLink {
    pub(crate) fn new(id: ByteString, routes: Recipient<Route>) -> Self {
        Self {
            id,
            routes,
            local: OnceCell::new(),
            mailed: Cell::new(0),
        }
    }

    /// Hands what the process sent to the Router: with a method call when
    /// the Router is on this thread and none of the process's batches is
    /// still in its mailbox, in a [`Route`] message otherwise.
    pub(crate) fn route(&self, mut envelopes: Envelopes) {
        if self.mailed.get() == 0
            && let Some(local) = self.local.get()
            && let Some(router) = local.upgrade()
            && router.route(&self.id, &mut envelopes)
        {
            return;
        }
        self.mailed.set(self.mailed.get() + 1);
        self.routes.do_send(Route {
            from: self.id.clone(),
            envelopes,
        });
    }

    /// The Router registered this link on its own thread.
    pub(crate) fn connect(&self, router: Weak<dyn Intake>) {
        let _ = self.local.set(router);
    }

    /// The Router handled one of the mailed batches.
    pub(crate) fn mail_handled(&self) {
        self.mailed.set(self.mailed.get().saturating_sub(1));
    }

    /// Batches mailed and not yet handled (tests of the ordering rule).
    #[cfg(test)]
    pub(crate) fn mailed(&self) -> &Cell<usize> {
        &self.mailed
    }
}
