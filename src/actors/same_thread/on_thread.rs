//! The one `unsafe` of the same-thread fast path: a value that may travel
//! to other threads inside a message but is only ever used or dropped on
//! the thread that made it.
//!
//! actix messages must be `Send`, and what a process on the Router's thread
//! hands it (its inbox, its link: `Rc`s) is not. It travels in an
//! [`OnThread`], which only its own thread can open; anywhere else it is
//! leaked (a few words), never touched: an `Rc` must not be counted from
//! two threads.

use std::mem::ManuallyDrop;
use std::thread::ThreadId;

/// A value that may travel to other threads but is only ever used or
/// dropped on the one it was made on (elsewhere it is leaked).
pub(crate) struct OnThread<T> {
    value: ManuallyDrop<T>,
    thread: ThreadId,
}

// SAFETY: the value is moved out or dropped only on `thread` (checked in
// `take` and `drop`); on any other thread it is not touched at all.
unsafe impl<T> Send for OnThread<T> {}

impl<T> OnThread<T> {
    /// `value`, to be opened on this thread only.
    pub(crate) fn new(value: T) -> Self {
        Self {
            value: ManuallyDrop::new(value),
            thread: std::thread::current().id(),
        }
    }

    /// The value, on the thread that made it; `None` (and the value leaked)
    /// elsewhere.
    pub(crate) fn take(self) -> Option<T> {
        let mut this = ManuallyDrop::new(self);
        if this.thread != std::thread::current().id() {
            return None;
        }
        // SAFETY: on the owning thread, and `this` is never used or dropped
        // again (it is `ManuallyDrop`), so the value is moved out once.
        Some(unsafe { ManuallyDrop::take(&mut this.value) })
    }
}

impl<T> Drop for OnThread<T> {
    fn drop(&mut self) {
        if self.thread == std::thread::current().id() {
            // SAFETY: on the owning thread, and `drop` runs once.
            unsafe { ManuallyDrop::drop(&mut self.value) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn only_the_thread_that_made_it_takes_or_drops_the_value() {
        let value = Rc::new(());
        let here = OnThread::new(Rc::clone(&value));
        assert_eq!(Rc::strong_count(&value), 2);
        assert!(here.take().is_some_and(|v| Rc::ptr_eq(&v, &value)));
        assert_eq!(Rc::strong_count(&value), 1, "taken, then dropped here");

        drop(OnThread::new(Rc::clone(&value)));
        assert_eq!(Rc::strong_count(&value), 1, "dropped on its own thread");

        // Elsewhere it is neither taken nor dropped: its count stays.
        let (taken, dropped) = (
            OnThread::new(Rc::clone(&value)),
            OnThread::new(Rc::clone(&value)),
        );
        let taken_elsewhere = std::thread::spawn(move || {
            let taken = taken.take().is_some();
            drop(dropped);
            taken
        })
        .join()
        .expect("thread");
        assert!(!taken_elsewhere);
        assert_eq!(Rc::strong_count(&value), 3, "both leaked, neither touched");
    }
}
