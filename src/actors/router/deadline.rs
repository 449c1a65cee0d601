//! The Router's clock: one deadline timer and the metrics flush tick.
//!
//! Why tasks beside the Router and not futures in its context: actix polls
//! every future spawned into an actor's context each time the context wakes,
//! so a timer inside the Router would be polled on every message. These run
//! as local tasks on the Router's arbiter and send it a message when due.
//!
//! Why one timer: the pending table keeps its deadlines in a heap, so only
//! the earliest needs a timer ([`Deadline::arm`]); when it fires the Router
//! expires what is due and arms the next.

use actix::prelude::*;
use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

use crate::actors::messages::FlushMetrics;

/// Sent by the deadline task when the armed deadline has passed.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Expire;

#[derive(Default)]
struct Shared {
    /// The deadline the task sleeps until; may be stale (answered), which
    /// only costs one spurious expiry pass.
    armed: Cell<Option<Instant>>,
    /// Wakes the task when `armed` moves earlier, or when the Router stops.
    wake: Notify,
    /// Set when the Router stops; the tasks then end.
    stopped: Cell<bool>,
}

/// The Router's handle on its timer tasks (same arbiter thread).
#[derive(Default, Clone)]
pub(crate) struct Deadline(Rc<Shared>);

impl Deadline {
    /// Starts the deadline task (sends [`Expire`]) and the flush tick (sends
    /// [`FlushMetrics`] every `flush_every`) for `router`.
    pub(crate) fn start<A>(&self, router: Addr<A>, flush_every: Duration)
    where
        A: Actor<Context = Context<A>> + Handler<Expire> + Handler<FlushMetrics>,
    {
        actix::spawn(deadline_task(router.clone(), Rc::clone(&self.0)));
        actix::spawn(flush_task(router, Rc::clone(&self.0), flush_every));
    }

    /// Makes the deadline task wake by `deadline` at the latest.
    #[inline]
    pub(crate) fn arm(&self, deadline: Instant) {
        let shared = &self.0;
        if shared.armed.get().is_none_or(|armed| deadline < armed) {
            shared.armed.set(Some(deadline));
            shared.wake.notify_one();
        }
    }

    /// Ends both tasks.
    pub(crate) fn stop(&self) {
        self.0.stopped.set(true);
        self.0.wake.notify_one();
    }
}

/// Sleeps until the armed deadline and tells the Router; ends with it.
async fn deadline_task<A>(router: Addr<A>, timer: Rc<Shared>)
where
    A: Actor<Context = Context<A>> + Handler<Expire>,
{
    while !timer.stopped.get() {
        match timer.armed.get() {
            None => timer.wake.notified().await,
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {
                        timer.armed.set(None);
                        router.do_send(Expire);
                    }
                    () = timer.wake.notified() => {}
                }
            }
        }
    }
}

/// Asks the Router to ship its metrics every `every`; ends with it.
async fn flush_task<A>(router: Addr<A>, timer: Rc<Shared>, every: Duration)
where
    A: Actor<Context = Context<A>> + Handler<FlushMetrics>,
{
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    while !timer.stopped.get() {
        ticks.tick().await;
        router.do_send(FlushMetrics);
    }
}
