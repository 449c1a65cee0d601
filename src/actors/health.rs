//! Health checks of one child: the bookkeeping, kept apart
//! from the bridge that sends the checks and acts on the verdicts.
//!
//! Why the bridge checks its own child and not the Router: a check must
//! prove that the child's main loop answers, so it goes down the child's
//! stdin like any request, and its reply is taken off the child's stdout by
//! the bridge before routing. Checks therefore never enter the pending
//! table, the queue bound or the message counters; only their failures are
//! counted (`health_failures`).

use bytestring::ByteString;

use crate::config::HealthCheck;
use crate::names::BROKER;
use crate::protocol::{Envelope, MessageType};

/// Correlation ids of health checks have this bit set: the broker sends
/// children no other requests, so a reply carrying it is a check's.
const CHECK_BIT: u64 = 1 << 63;

/// What a reply or a deadline means for the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Answered in time.
    Healthy,
    /// One more failed check; `kill` once `failures` in a row have failed.
    Failed {
        /// Why, for the log.
        reason: String,
        /// Consecutive failures so far.
        in_a_row: u32,
        /// The threshold is reached: kill the worker.
        kill: bool,
    },
}

/// The checks of one incarnation of a child.
#[derive(Debug)]
pub struct Health {
    check: HealthCheck,
    next: u64,
    outstanding: Option<u64>,
    in_a_row: u32,
}

impl Health {
    /// Checks as `check` says.
    pub fn new(check: HealthCheck) -> Self {
        Self {
            check,
            next: 0,
            outstanding: None,
            in_a_row: 0,
        }
    }

    /// The settings.
    pub fn check(&self) -> &HealthCheck {
        &self.check
    }

    /// The next check for process `id`, unless one is still waiting.
    pub fn start(&mut self, id: &ByteString) -> Option<Envelope> {
        if self.outstanding.is_some() {
            return None;
        }
        self.next = self.next.wrapping_add(1);
        let correlation_id = CHECK_BIT | (self.next & !CHECK_BIT);
        self.outstanding = Some(correlation_id);
        Some(
            Envelope::request(id.clone(), self.check.method.as_str(), correlation_id)
                .with_source(BROKER)
                .with_timeout_ms(self.check.timeout_ms),
        )
    }

    /// Whether `envelope` from the child is the reply to a check (then the
    /// bridge keeps it from the Router), and what it means. A late reply to
    /// an earlier check is taken too, and means nothing.
    pub fn reply(&mut self, envelope: &Envelope) -> Option<Option<Verdict>> {
        let is_reply = matches!(envelope.kind, MessageType::Response | MessageType::Error);
        if !is_reply || envelope.correlation_id & CHECK_BIT == 0 || &*envelope.target != BROKER {
            return None;
        }
        if self.outstanding != Some(envelope.correlation_id) {
            return Some(None);
        }
        self.outstanding = None;
        Some(Some(if envelope.kind == MessageType::Response {
            self.in_a_row = 0;
            Verdict::Healthy
        } else {
            let code = envelope.code.as_deref().unwrap_or("?");
            let message = envelope.error.as_deref().unwrap_or("");
            self.failed(format!(
                "{} answered error {code}: {message}",
                self.check.method
            ))
        }))
    }

    /// The deadline of check `correlation_id` passed.
    pub fn timed_out(&mut self, correlation_id: u64) -> Option<Verdict> {
        if self.outstanding != Some(correlation_id) {
            return None;
        }
        self.outstanding = None;
        Some(self.failed(format!(
            "no reply to {} within {} ms",
            self.check.method, self.check.timeout_ms
        )))
    }

    /// The id of the check waiting for its reply.
    pub fn outstanding(&self) -> Option<u64> {
        self.outstanding
    }

    fn failed(&mut self, reason: String) -> Verdict {
        self.in_a_row += 1;
        Verdict::Failed {
            reason,
            in_a_row: self.in_a_row,
            kill: self.in_a_row >= self.check.failures.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_failures_kill_and_a_good_reply_resets() {
        let mut h = Health::new(HealthCheck {
            failures: 2,
            ..HealthCheck::default()
        });
        let id = ByteString::from_static("w.0");
        let first = h.start(&id).expect("a check");
        assert!(h.start(&id).is_none(), "one at a time");
        assert_eq!(&*first.source, BROKER);
        let v = h.timed_out(first.correlation_id).expect("verdict");
        assert!(matches!(
            v,
            Verdict::Failed {
                in_a_row: 1,
                kill: false,
                ..
            }
        ));
        let second = h.start(&id).expect("a check");
        let mut ok = second.response(None);
        assert_eq!(h.reply(&ok), Some(Some(Verdict::Healthy)));
        ok.correlation_id = first.correlation_id;
        assert_eq!(
            h.reply(&ok),
            Some(None),
            "a late reply is taken, meaning nothing"
        );
        let third = h.start(&id).expect("a check");
        assert!(matches!(
            h.timed_out(third.correlation_id),
            Some(Verdict::Failed { kill: false, .. })
        ));
        let fourth = h.start(&id).expect("a check");
        let error = fourth.error_reply("handler", "stuck");
        assert!(matches!(
            h.reply(&error),
            Some(Some(Verdict::Failed {
                in_a_row: 2,
                kill: true,
                ..
            }))
        ));
        // Ordinary traffic is not a check's.
        let mut other = Envelope::request("echo", "Echo", 5).response(None);
        other.target = BROKER.into();
        assert_eq!(h.reply(&other), None);
    }
}
