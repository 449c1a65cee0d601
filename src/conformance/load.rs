//! Checks through the broker of the subject under load, and of how it
//! held up over the whole run.

use std::time::{Duration, Instant};

use super::probe::{Probe, failure, ms, request};
use super::report::Verdict;
use crate::protocol::Payload;
use crate::protocol::rpc::ProcessStatus;
use crate::protocol::stats::MessageStats;

/// Calls of the `pipelined` check.
pub const PIPELINED: u64 = 20_000;

/// What the calls of `pipelined` got: how many came back with their own
/// payload, and the first that did not (its index and what it got).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Answered with their own payload.
    pub right: u64,
    /// Answered otherwise: how many, and the first.
    pub wrong: u64,
    /// The first wrong answer.
    pub first_wrong: Option<String>,
}

impl Tally {
    /// Counts call `i`'s answer: its own payload (`Ok(i)`) or something else.
    pub fn add(&mut self, i: u64, answer: Result<u64, String>) {
        match answer {
            Ok(got) if got == i => self.right += 1,
            other => {
                self.wrong += 1;
                if self.first_wrong.is_none() {
                    self.first_wrong = Some(match other {
                        Ok(got) => format!("call {i} got the payload of call {got}"),
                        Err(e) => format!("call {i}: {e}"),
                    });
                }
            }
        }
    }
}

/// Replies the broker dropped because they matched no request in flight
/// (a second reply to one already answered among them), summed over
/// `ids`. Late replies (to requests that timed out or were cancelled
/// before) are not counted: a subject that ignores `cancel` sends those,
/// and other checks report it.
fn extra_replies(stats: &MessageStats, ids: &[String]) -> u64 {
    ids.iter()
        .filter_map(|id| stats.per_process.get(id))
        .map(|p| p.faults.unmatched_replies)
        .sum()
}

/// `pipelined`: 20 000 `Echo` calls at once to the service, each answered
/// once with its own payload.
pub async fn pipelined(probe: &Probe) -> Verdict {
    let stats = || async {
        probe
            .broker
            .stats()
            .await
            .map_err(|e| format!("stats: {e}"))
    };
    let before = extra_replies(&stats().await?, &probe.ids);
    let started = Instant::now();
    let calls = (0..PIPELINED).map(|i| {
        let payload = Payload::encode(&i).map(|p| p.into_bytes());
        let broker = probe.broker.clone();
        async move {
            let payload = payload.map_err(|e| e.to_string())?;
            let reply = broker
                .call_envelope(request(
                    super::probe::SERVICE,
                    "Echo",
                    Some(&payload[..]),
                    Duration::from_secs(20),
                ))
                .await
                .map_err(|e| failure(&e))?;
            reply
                .payload_as::<u64>()
                .map_err(|e| format!("a reply that is not a u64: {e}"))
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    let took = started.elapsed();
    let mut tally = Tally::default();
    for (i, answer) in (0u64..).zip(answers) {
        tally.add(i, answer);
    }
    if let Some(first) = tally.first_wrong {
        return Err(format!(
            "{} of {PIPELINED} calls were not answered with their own payload; the first: {first}",
            tally.wrong
        ));
    }
    // A second reply to a request is dropped by the broker and counted.
    actix::clock::sleep(Duration::from_millis(50)).await;
    let extra = extra_replies(&stats().await?, &probe.ids) - before;
    if extra > 0 {
        return Err(format!(
            "all {PIPELINED} calls were answered, but the subject sent {extra} replies more (the broker dropped them)"
        ));
    }
    Ok(format!(
        "{PIPELINED} calls in flight at once, each answered once with its own payload, in {}",
        ms(took)
    ))
}

/// `stays-up`: over the run, no worker of the subject exited or was
/// restarted.
pub fn stays_up(stats: &MessageStats, ids: &[String]) -> Verdict {
    for id in ids {
        let Some(p) = stats.per_process.get(id) else {
            return Err(format!("{id} is not in the broker's stats"));
        };
        if p.faults.restarts > 0 {
            return Err(format!(
                "{id} was restarted {} times during the run (it exited, or its stdout went out of sync)",
                p.faults.restarts
            ));
        }
        if p.status != ProcessStatus::Ready {
            return Err(format!(
                "{id} is {} at the end of the run, want ready",
                p.status
            ));
        }
    }
    Ok(format!(
        "{} ready throughout, never restarted",
        ids.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_keeps_the_first_wrong_answer() {
        let mut tally = Tally::default();
        tally.add(0, Ok(0));
        tally.add(1, Ok(2));
        tally.add(2, Err("error timeout".into()));
        assert_eq!(
            tally,
            Tally {
                right: 1,
                wrong: 2,
                first_wrong: Some("call 1 got the payload of call 2".into()),
            }
        );
    }

    #[test]
    fn a_restart_or_a_worker_not_ready_fails_stays_up() {
        let mut stats = MessageStats::default();
        let ids = vec!["subject.0".to_owned()];
        assert!(stays_up(&stats, &ids).is_err());
        let mut p = crate::protocol::stats::ProcessStats {
            counters: Default::default(),
            faults: Default::default(),
            status: ProcessStatus::Ready,
            pid: Some(1),
            queue_depth: 0,
            pending: 0,
            exit_code: None,
            service: "subject".into(),
            uptime_s: Some(1),
        };
        stats.per_process.insert(ids[0].clone(), p.clone());
        assert!(stays_up(&stats, &ids).is_ok());
        p.faults.restarts = 1;
        stats.per_process.insert(ids[0].clone(), p);
        assert!(
            stays_up(&stats, &ids)
                .unwrap_err()
                .contains("restarted 1 times")
        );
    }
}
