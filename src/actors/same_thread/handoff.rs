//! What a process on the Router's thread hands the Router inside
//! `RegisterProcess`: its link (its way in) and, for a bridge's child, its
//! inbox (the Router's way to it).

use std::rc::Rc;

use super::inbox::Inbox;
use super::link::RouterLink;
use super::on_thread::OnThread;

/// A process's inbox and link, on their way to the Router. Only the thread
/// that made it can take them out; on another thread it yields nothing and
/// they are leaked (a few words per registration), never touched: an `Rc`
/// must not be counted from two threads.
pub struct Handoff(OnThread<Local>);

/// What a [`Handoff`] carries.
pub(crate) struct Local {
    pub(crate) inbox: Option<Rc<Inbox>>,
    pub(crate) link: Rc<RouterLink>,
}

impl Handoff {
    /// A bridge's child: its inbox, and its link.
    pub(crate) fn child(inbox: Rc<Inbox>, link: Rc<RouterLink>) -> Self {
        Self(OnThread::new(Local {
            inbox: Some(inbox),
            link,
        }))
    }

    /// A process without an inbox (an in-process worker): its link.
    pub(crate) fn link(link: Rc<RouterLink>) -> Self {
        Self(OnThread::new(Local { inbox: None, link }))
    }

    /// What it carries, on the thread that made the handoff; `None`
    /// elsewhere.
    pub(crate) fn take(self) -> Option<Local> {
        self.0.take()
    }
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff").finish_non_exhaustive()
    }
}
