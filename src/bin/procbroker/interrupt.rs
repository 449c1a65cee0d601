//! Ctrl-C (SIGINT) and SIGTERM while `procbroker bench` runs: stop at once,
//! say what was measured so far, leave no child behind.
//!
//! Why a thread of its own: half of a benchmark (the raw baseline) blocks
//! its thread in plain reads and writes, where no async signal handler
//! would run. The signals are blocked in every thread of the process (the
//! mask is set before any thread starts; children start with a clear mask)
//! and one thread takes them with `sigwait`: it records the signal, wakes
//! the async side, and kills the children of the raw baseline, whose pipes
//! then end and unblock the run.

use nix::sys::signal::{SigSet, Signal, kill};
use nix::unistd::Pid;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// What the signal thread shares with the benchmark.
#[derive(Default)]
pub struct Interrupt {
    signal: Mutex<Option<Signal>>,
    /// Children to kill on a signal (the raw baseline's).
    children: Mutex<Vec<u32>>,
    /// Woken on a signal (a permit is kept if nobody waits yet).
    pub wake: Notify,
}

impl Interrupt {
    /// Blocks SIGINT and SIGTERM in this thread (and so in every thread it
    /// starts) and starts the thread that waits for them.
    pub fn install() -> std::io::Result<Arc<Self>> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGINT);
        set.add(Signal::SIGTERM);
        set.thread_block().map_err(std::io::Error::from)?;
        let shared = Arc::new(Self::default());
        let interrupt = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Ok(signal) = set.wait() {
                    interrupt.fire(signal);
                }
            })?;
        Ok(shared)
    }

    fn fire(&self, signal: Signal) {
        if let Ok(mut slot) = self.signal.lock() {
            *slot = Some(signal);
        }
        self.wake.notify_one();
        let children = self.children.lock().map(|c| c.clone()).unwrap_or_default();
        for pid in children {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    /// The signal that came, if one did.
    pub fn signal(&self) -> Option<Signal> {
        self.signal.lock().ok().and_then(|s| *s)
    }

    /// Kill `pid` if a signal comes (it is reaped by whoever owns it).
    pub fn kill_on_signal(&self, pid: u32) {
        if let Ok(mut children) = self.children.lock() {
            children.push(pid);
        }
        // A signal that came just before this child started.
        if self.signal().is_some()
            && let Ok(pid) = i32::try_from(pid)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}
