//! The restart policy of one process id: whether a child that ended is
//! started again, and after how long. Plain state with the time passed in,
//! so every rule has a unit test; the bridge carries the decision out.
//!
//! - Backoff: the delay starts at `backoff_initial_ms` and doubles after
//!   each restart up to `backoff_max_ms`; a child that was up for
//!   [`BACKOFF_RESET_AFTER`] starts again from the initial delay (so a
//!   crash a day does not wait 30 s).
//! - `max_restarts` (-1 = unlimited): with `window_ms = 0`, restarts over
//!   the process's whole life; with `window_ms > 0`, restarts inside any
//!   window of that length (OTP's intensity and period), so a process that
//!   stays up longer than the window starts afresh.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::protocol::rpc::RestartPolicy;

/// The backoff starts over after a child has been up this long.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);

/// What to do after a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start it again after this delay.
    RestartAfter(Duration),
    /// `max_restarts` is spent: the process is `failed`.
    GiveUp,
}

/// The restart state of one process id, across its incarnations.
#[derive(Debug, Clone)]
pub struct Restarts {
    policy: RestartPolicy,
    /// Restarts so far (crashes and failed starts; a rolling restart
    /// carries the count over and does not add to it).
    count: u32,
    /// The delay before the next restart.
    backoff: Duration,
    /// When recent restarts were decided (only kept with `window_ms > 0`).
    recent: VecDeque<Instant>,
}

impl Restarts {
    /// Fresh state under `policy`, with `count` restarts already made.
    pub fn new(policy: RestartPolicy, count: u32) -> Self {
        Self {
            backoff: Duration::from_millis(policy.backoff_initial_ms),
            policy,
            count,
            recent: VecDeque::new(),
        }
    }

    /// Restarts so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The policy.
    pub fn policy(&self) -> RestartPolicy {
        self.policy
    }

    /// A child that was up for `up` ended at `now`: restart it (after how
    /// long) or give up.
    pub fn after_exit(&mut self, now: Instant, up: Duration) -> Decision {
        let policy = self.policy;
        let counted = if policy.window_ms > 0 {
            let window = Duration::from_millis(policy.window_ms);
            while self
                .recent
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) > window)
            {
                self.recent.pop_front();
            }
            self.recent.len() as i64
        } else {
            i64::from(self.count)
        };
        if policy.max_restarts >= 0 && counted >= policy.max_restarts {
            return Decision::GiveUp;
        }
        if up >= BACKOFF_RESET_AFTER {
            self.backoff = Duration::from_millis(policy.backoff_initial_ms);
        }
        let delay = self.backoff;
        self.backoff = (delay * 2).min(Duration::from_millis(policy.backoff_max_ms));
        if policy.window_ms > 0 {
            self.recent.push_back(now);
        }
        Decision::RestartAfter(delay)
    }

    /// The restart decided by [`after_exit`](Self::after_exit) happens now.
    pub fn restarting(&mut self) {
        self.count = self.count.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_restarts: i64, window_ms: u64) -> RestartPolicy {
        RestartPolicy {
            max_restarts,
            backoff_initial_ms: 100,
            backoff_max_ms: 1_000,
            window_ms,
        }
    }

    const MS: Duration = Duration::from_millis(1);

    /// Exits right after each start, `n` times; the delays decided.
    fn crash(r: &mut Restarts, start: Instant, n: usize) -> Vec<Decision> {
        let mut now = start;
        (0..n)
            .map(|_| {
                let d = r.after_exit(now, MS);
                if let Decision::RestartAfter(delay) = d {
                    r.restarting();
                    now += delay + MS;
                }
                d
            })
            .collect()
    }

    #[test]
    fn the_backoff_doubles_up_to_its_ceiling() {
        let mut r = Restarts::new(policy(-1, 0), 0);
        let delays = crash(&mut r, Instant::now(), 6);
        let ms = |n| Decision::RestartAfter(Duration::from_millis(n));
        assert_eq!(
            delays,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        assert_eq!(r.count(), 6);
    }

    #[test]
    fn a_long_run_starts_the_backoff_over() {
        let mut r = Restarts::new(policy(-1, 0), 0);
        let now = Instant::now();
        crash(&mut r, now, 3);
        let d = r.after_exit(now + Duration::from_secs(120), BACKOFF_RESET_AFTER);
        assert_eq!(d, Decision::RestartAfter(Duration::from_millis(100)));
    }

    #[test]
    fn max_restarts_over_the_whole_life() {
        let mut r = Restarts::new(policy(2, 0), 0);
        let decisions = crash(&mut r, Instant::now(), 3);
        assert!(matches!(decisions[0], Decision::RestartAfter(_)));
        assert!(matches!(decisions[1], Decision::RestartAfter(_)));
        assert_eq!(decisions[2], Decision::GiveUp);
        assert_eq!(r.count(), 2);
        // The count carried over a rolling restart counts too.
        let mut carried = Restarts::new(policy(2, 0), 2);
        assert_eq!(carried.after_exit(Instant::now(), MS), Decision::GiveUp);
        // Zero means no restart at all; -1 never gives up.
        assert_eq!(
            Restarts::new(policy(0, 0), 0).after_exit(Instant::now(), MS),
            Decision::GiveUp
        );
        let mut forever = Restarts::new(policy(-1, 0), u32::MAX);
        assert!(matches!(
            forever.after_exit(Instant::now(), MS),
            Decision::RestartAfter(_)
        ));
    }

    #[test]
    fn with_a_window_only_recent_restarts_count() {
        let mut r = Restarts::new(policy(2, 5_000), 0);
        let start = Instant::now();
        assert!(matches!(r.after_exit(start, MS), Decision::RestartAfter(_)));
        assert!(matches!(
            r.after_exit(start + Duration::from_secs(1), MS),
            Decision::RestartAfter(_)
        ));
        // A third inside the window: failed.
        assert_eq!(
            r.clone().after_exit(start + Duration::from_secs(2), MS),
            Decision::GiveUp
        );
        // The same third once the first has left the window: restarted.
        assert!(matches!(
            r.after_exit(start + Duration::from_millis(5_500), MS),
            Decision::RestartAfter(_)
        ));
    }
}
