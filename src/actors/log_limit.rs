//! Warnings that cannot flood the log (per process: a few a second, then
//! one line saying how many were left out). Counters stay exact; only the
//! log lines are thinned.
//!
//! Why: a child writing garbage as fast as it can produced one WARN line per
//! frame, hundreds of thousands a second, and the logging itself took the
//! broker's CPU from the healthy services.

use std::time::{Duration, Instant};

/// Warnings allowed per window before lines are suppressed.
pub const WARNINGS_PER_SECOND: u32 = 5;
const WINDOW: Duration = Duration::from_secs(1);

/// A per-process budget of log lines.
#[derive(Debug)]
pub struct LogLimit {
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self {
            window_start: Instant::now(),
            in_window: 0,
            suppressed: 0,
        }
    }
}

/// What to do with one warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLine {
    /// Log it; `suppressed` lines were left out since the last one logged
    /// (say so in the same line, or before it).
    Log {
        /// Lines left out before this one.
        suppressed: u64,
    },
    /// Leave it out (it is counted).
    Suppress,
}

impl LogLimit {
    /// Asks to log one warning at `now`.
    pub fn check(&mut self, now: Instant) -> LogLine {
        if now.saturating_duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.in_window = 0;
        }
        if self.in_window < WARNINGS_PER_SECOND {
            self.in_window += 1;
            LogLine::Log {
                suppressed: std::mem::take(&mut self.suppressed),
            }
        } else {
            self.suppressed += 1;
            LogLine::Suppress
        }
    }

    /// Lines left out that no later line has reported yet.
    pub fn pending(&self) -> u64 {
        self.suppressed
    }
}

/// Bad frames per second from one child, against the limit past which the
/// child is treated as out of sync (killed and restarted).
#[derive(Debug)]
pub struct BadFrameRate {
    limit: u64,
    window_start: Instant,
    in_window: u64,
}

impl BadFrameRate {
    /// At most `limit` bad frames a second (0: no limit).
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            window_start: Instant::now(),
            in_window: 0,
        }
    }

    /// Counts `n` bad frames at `now`; true once the limit is passed.
    pub fn exceeded(&mut self, n: u64, now: Instant) -> bool {
        if now.saturating_duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.in_window = 0;
        }
        self.in_window += n;
        self.limit > 0 && self.in_window > self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_a_second_then_one_line_with_the_count() {
        let t0 = Instant::now();
        let mut limit = LogLimit {
            window_start: t0,
            ..LogLimit::default()
        };
        let verdicts: Vec<LogLine> = (0..8).map(|_| limit.check(t0)).collect();
        assert_eq!(verdicts[..5], [LogLine::Log { suppressed: 0 }; 5]);
        assert_eq!(verdicts[5..], [LogLine::Suppress; 3]);
        assert_eq!(limit.pending(), 3);
        let later = t0 + Duration::from_millis(1001);
        assert_eq!(limit.check(later), LogLine::Log { suppressed: 3 });
        assert_eq!(limit.pending(), 0);
    }

    #[test]
    fn bad_frame_rate_trips_past_the_limit_and_resets_each_second() {
        let t0 = Instant::now();
        let mut rate = BadFrameRate::new(100);
        rate.window_start = t0;
        assert!(!rate.exceeded(100, t0));
        assert!(rate.exceeded(1, t0));
        assert!(!rate.exceeded(50, t0 + Duration::from_secs(1)));
        let mut off = BadFrameRate::new(0);
        assert!(!off.exceeded(1_000_000, t0));
    }
}
