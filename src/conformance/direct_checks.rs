//! The checks on copies of the subject driven directly, the kit playing
//! the broker: u64 correlation ids, a request without a deadline,
//! `shutdown` from another source, the drain at `shutdown` from `broker`,
//! exit at EOF, and (with the broker's own count) nothing but frames on
//! stdout.

use rmpv::Value;
use std::time::{Duration, Instant};

use super::corpus::encode;
use super::direct::{Direct, Received};
use super::frames_only;
use super::probe::ms;
use super::report::{CheckResult, Verdict};
use crate::names::BROKER;
use crate::protocol::{DEFAULT_MAX_FRAME_BYTES, Envelope, MessageType, Payload};

/// The requester the kit plays besides the broker.
const CALLER: &str = "client.0";
/// The process the subject's calls out are addressed to (the kit answers
/// them itself).
const CALLEE: &str = "kit.0";
/// How long a copy may take to say `ready`.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// How long a reply may take.
const REPLY_WITHIN: Duration = Duration::from_secs(5);

/// Correlation ids beyond 2⁵³ (what a float 64 cannot hold).
pub const BIG_IDS: [u64; 3] = [9_007_199_254_740_993, (1 << 63) + 7, u64::MAX];

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

fn value_of(envelope: &Envelope) -> Result<Value, String> {
    match &envelope.payload {
        None => Ok(Value::Nil),
        Some(p) => rmpv::decode::read_value(&mut p.as_bytes().as_ref())
            .map_err(|e| format!("a payload that does not decode: {e}")),
    }
}

/// A copy of the subject, its frames read so far but not yet wanted, and
/// the next correlation id.
pub struct Session {
    direct: Direct,
    stash: Vec<Envelope>,
    next: u64,
}

impl Session {
    /// Starts a copy as process `id` and waits for its `ready`.
    /// When it does not, why, and what it wrote on stdout if it ran.
    pub fn start(
        command: &str,
        args: &[String],
        id: &str,
    ) -> Result<Self, (String, Option<Vec<u8>>)> {
        let direct = Direct::start(command, args, super::probe::SERVICE, id)
            .map_err(|e| (format!("cannot run the subject: {e}"), None))?;
        let mut session = Self {
            direct,
            stash: Vec::new(),
            next: 0,
        };
        match session.direct.recv(READY_WITHIN) {
            Received::Frame(e)
                if e.kind == MessageType::Event && &*e.id == "ready" && &*e.target == BROKER =>
            {
                Ok(session)
            }
            other => {
                let why = format!(
                    "a copy run directly did not send `ready` to broker first: {}",
                    describe(&other, READY_WITHIN)
                );
                Err((why, Some(session.direct.finish())))
            }
        }
    }

    /// A request from the kit's caller, with the next correlation id.
    fn request(&mut self, method: &str, payload: Option<&Value>) -> Envelope {
        self.next += 1;
        let mut request =
            Envelope::request(self.direct.id.clone(), method, self.next).with_source(CALLER);
        request.payload = payload.and_then(|v| Payload::from_msgpack(encode(v)).ok());
        request
    }

    fn send(&mut self, envelope: &Envelope) -> Result<(), String> {
        self.direct.send(envelope)
    }

    /// The first frame (stashed or new) that `wanted` takes, within
    /// `within`; frames it does not take are stashed.
    fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        wanted: impl Fn(&Envelope) -> bool,
    ) -> Result<Envelope, String> {
        if let Some(at) = self.stash.iter().position(&wanted) {
            return Ok(self.stash.remove(at));
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.direct.recv(left) {
                Received::Frame(e) if wanted(&e) => return Ok(*e),
                Received::Frame(e) => self.stash.push(*e),
                other => return Err(format!("waiting for {what}: {}", describe(&other, within))),
            }
        }
    }

    /// The reply to `request`.
    fn reply_to(&mut self, request: &Envelope) -> Result<Envelope, String> {
        let (id, method) = (request.correlation_id, request.id.clone());
        let reply = self.wait_for(&format!("the reply to {method}"), REPLY_WITHIN, |e| {
            matches!(e.kind, MessageType::Response | MessageType::Error)
                && e.correlation_id == id
                && !e.more
        })?;
        if &*reply.target != CALLER {
            return Err(format!(
                "the reply to {method} went to {:?}, want the requester {CALLER}",
                &*reply.target
            ));
        }
        Ok(reply)
    }

    /// Sends `request` and returns its response (an error reply fails).
    fn call(&mut self, request: &Envelope) -> Result<Envelope, String> {
        self.send(request)?;
        let reply = self.reply_to(request)?;
        if reply.kind == MessageType::Error {
            return Err(format!(
                "{} was answered with error {}: {}",
                &*request.id,
                reply.code.as_deref().unwrap_or(""),
                reply.error.as_deref().unwrap_or("")
            ));
        }
        Ok(reply)
    }

    /// The call out that `relay` makes (to the kit's callee); its reply
    /// coming first fails.
    fn call_out(&mut self, relay: &Envelope) -> Result<Envelope, String> {
        let id = relay.correlation_id;
        let got = self.wait_for("the Relay's call out", REPLY_WITHIN, |e| {
            (e.kind == MessageType::Request && &*e.target == CALLEE)
                || (matches!(e.kind, MessageType::Response | MessageType::Error)
                    && e.correlation_id == id)
        })?;
        if got.kind == MessageType::Request {
            return Ok(got);
        }
        Err(format!(
            "the Relay was answered without a call out: {} {} {}",
            got.kind,
            got.code.as_deref().unwrap_or(""),
            got.error.as_deref().unwrap_or("")
        ))
    }

    /// Answers a call out of the subject with its own payload, as `kit.0`.
    fn answer(&mut self, call_out: &Envelope) -> Result<(), String> {
        let reply = call_out
            .response(call_out.payload.clone())
            .with_source(CALLEE);
        self.send(&reply)
    }

    /// Ends the copy: every byte it wrote on stdout.
    pub fn finish(self) -> Vec<u8> {
        self.direct.finish()
    }
}

/// What a wait got, for a detail.
fn describe(received: &Received, within: Duration) -> String {
    match received {
        Received::Frame(e) => format!("got a {} {:?} to {:?}", e.kind, &*e.id, &*e.target),
        Received::Nothing => format!("nothing within {}", ms(within)),
        Received::Closed => "its stdout closed (it exited)".into(),
        Received::Bad(why) => format!("its stdout is not frames: {why}"),
    }
}

/// `correlation-ids`: replies carry back correlation ids up to 2⁶⁴−1.
fn correlation_ids(s: &mut Session) -> Verdict {
    let mut sent = Vec::new();
    for id in BIG_IDS {
        let mut request = s.request("Echo", Some(&Value::from(id)));
        request.correlation_id = id;
        s.send(&request)?;
        sent.push(request);
    }
    for request in &sent {
        let id = request.correlation_id;
        let reply = s.reply_to(request).map_err(|e| {
            let stray = s
                .stash
                .iter()
                .find(|e| matches!(e.kind, MessageType::Response | MessageType::Error))
                .map(|e| format!(" (a reply came with correlation id {})", e.correlation_id))
                .unwrap_or_default();
            format!("correlation id {id}: {e}{stray}")
        })?;
        if reply.payload != request.payload {
            return Err(format!(
                "the Echo with correlation id {id} came back with another payload"
            ));
        }
    }
    Ok(
        "Echo with correlation ids 2^53+1, 2^63+7 and 2^64-1: each reply carried its own back"
            .into(),
    )
}

/// `deadline-absent`: `Deadline` of a request without `timeout_ms`
/// replies nil.
fn deadline_absent(s: &mut Session) -> Verdict {
    let request = s.request("Deadline", None);
    let reply = s.call(&request)?;
    match value_of(&reply)? {
        Value::Nil => Ok("Deadline without timeout_ms replied nil".into()),
        other => Err(format!(
            "Deadline without timeout_ms replied {other}, want nil"
        )),
    }
}

/// `shutdown-source`: a `shutdown` that is not from `broker` changes
/// nothing: requests are answered, calls out still made, no exit.
fn shutdown_source(s: &mut Session) -> Verdict {
    let forged = Envelope::event(s.direct.id.clone(), "shutdown").with_source(CALLER);
    s.send(&forged)?;
    let ping = s.request("Ping", None);
    s.call(&ping)
        .map_err(|e| format!("after a shutdown from {CALLER}: {e}"))?;
    let relay = map(vec![
        ("target", CALLEE.into()),
        ("method", "Echo".into()),
        ("payload", "still calling".into()),
    ]);
    let request = s.request("Relay", Some(&relay)).with_timeout_ms(5000);
    s.send(&request)?;
    let call_out = s.call_out(&request).map_err(|e| {
        format!("after a shutdown from {CALLER}, the subject made no call out: {e}")
    })?;
    s.answer(&call_out)?;
    let reply = s.reply_to(&request)?;
    if value_of(&reply)? != Value::from("still calling") {
        return Err(format!(
            "after a shutdown from {CALLER}, Relay replied {}",
            value_of(&reply)?
        ));
    }
    std::thread::sleep(Duration::from_millis(100));
    if let Some(status) = s.direct.exited() {
        return Err(format!(
            "it exited ({status}) after a shutdown from {CALLER}"
        ));
    }
    Ok(format!(
        "a shutdown from {CALLER} was ignored: Ping answered, calls out still made, still running"
    ))
}

/// What came after `shutdown` from `broker` in the drain check.
#[derive(Debug, Default)]
pub struct Drained {
    /// The in-flight `Sleep` was answered (with its reply's value).
    pub sleep: Option<Envelope>,
    /// The in-flight `Relay` was answered.
    pub relay: Option<Envelope>,
    /// Requests the subject sent after the `shutdown` (none allowed).
    pub new_calls: Vec<Envelope>,
}

/// Whether a drain went as it should: both in-flight requests answered
/// (the `Sleep` undisturbed, the `Relay` with its callee's reply), and no
/// new call.
pub fn judge_drain(drained: &Drained) -> Result<(), String> {
    if let Some(call) = drained.new_calls.first() {
        return Err(format!(
            "after shutdown from broker the subject made a new call: {} to {}",
            &*call.id, &*call.target
        ));
    }
    let sleep = drained
        .sleep
        .as_ref()
        .ok_or("the Sleep in flight at the shutdown was not answered")?;
    let slept = value_of(sleep)?;
    let cancelled = slept
        .as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("cancelled")))
        .map(|(_, v)| v.clone());
    if sleep.kind != MessageType::Response || cancelled != Some(Value::Boolean(false)) {
        return Err(format!(
            "the Sleep in flight at the shutdown was answered {slept} ({}), want {{slept_ms, cancelled: false}}",
            sleep.kind
        ));
    }
    let relay = drained
        .relay
        .as_ref()
        .ok_or("the Relay in flight at the shutdown was not answered")?;
    if relay.kind != MessageType::Response || value_of(relay)? != Value::from("drained") {
        return Err(format!(
            "the Relay in flight at the shutdown was answered {} {} {}, want its call's reply \"drained\"",
            relay.kind,
            relay.code.as_deref().unwrap_or(""),
            value_of(relay)?
        ));
    }
    Ok(())
}

/// `drain`: at `shutdown` from `broker`, requests in flight are answered
/// (a call out in flight still gets its reply), no new call is made, and
/// the process exits once drained or at EOF.
fn drain(s: &mut Session) -> Verdict {
    let sleep = s.request("Sleep", Some(&map(vec![("ms", 300.into())])));
    s.send(&sleep)?;
    let relay_params = map(vec![
        ("target", CALLEE.into()),
        ("method", "Echo".into()),
        ("payload", "drained".into()),
    ]);
    let relay = s
        .request("Relay", Some(&relay_params))
        .with_timeout_ms(5000);
    s.send(&relay)?;
    let call_out = s.call_out(&relay)?;
    let shutdown = Envelope::event(s.direct.id.clone(), "shutdown").with_source(BROKER);
    s.send(&shutdown)?;
    // A request read after the shutdown: its handler must not call out.
    let late_params = map(vec![
        ("target", CALLEE.into()),
        ("method", "Echo".into()),
        ("payload", "after shutdown".into()),
    ]);
    let late = s.request("Relay", Some(&late_params)).with_timeout_ms(5000);
    // The copy may have exited already, which is no failure of the drain.
    let _ = s.send(&late);
    s.answer(&call_out)?;

    let mut drained = Drained::default();
    let started = Instant::now();
    let mut both_at: Option<Instant> = None;
    let mut late_answered = false;
    for frame in std::mem::take(&mut s.stash) {
        sort(
            &mut drained,
            frame,
            [
                sleep.correlation_id,
                relay.correlation_id,
                late.correlation_id,
            ],
            &mut late_answered,
        );
    }
    loop {
        if drained.sleep.is_some() && drained.relay.is_some() && both_at.is_none() {
            both_at = Some(Instant::now());
        }
        // Both answered: a moment more for the late request's reply (or a
        // call it should not make), then stop reading.
        if both_at.is_some_and(|at| late_answered || at.elapsed() > Duration::from_millis(300)) {
            break;
        }
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
        match s.direct.recv(Duration::from_millis(50)) {
            Received::Frame(e) => sort(
                &mut drained,
                *e,
                [
                    sleep.correlation_id,
                    relay.correlation_id,
                    late.correlation_id,
                ],
                &mut late_answered,
            ),
            Received::Nothing => {}
            Received::Closed => break,
            Received::Bad(why) => {
                return Err(format!("during the drain: its stdout is not frames: {why}"));
            }
        }
    }
    judge_drain(&drained)?;
    let exited = match s.direct.wait_exit(Duration::from_millis(500)) {
        Some(status) => (status, "once drained"),
        None => {
            s.direct.close_stdin();
            match s.direct.wait_exit(Duration::from_secs(1)) {
                Some(status) => (status, "at EOF"),
                None => {
                    return Err(
                        "the in-flight requests were answered, but it was still running 1 s after EOF".into(),
                    );
                }
            }
        }
    };
    if !exited.0.success() {
        return Err(format!("drained, then exited {} ({})", exited.1, exited.0));
    }
    Ok(format!(
        "the Sleep and the Relay in flight were answered (the Relay's call out got its reply), no new call, exited {}",
        exited.1
    ))
}

/// Files a frame that came during the drain.
fn sort(
    drained: &mut Drained,
    frame: Envelope,
    [sleep, relay, late]: [u64; 3],
    late_answered: &mut bool,
) {
    let reply = matches!(frame.kind, MessageType::Response | MessageType::Error) && !frame.more;
    match frame.kind {
        MessageType::Request => drained.new_calls.push(frame),
        _ if reply && frame.correlation_id == sleep => drained.sleep = Some(frame),
        _ if reply && frame.correlation_id == relay => drained.relay = Some(frame),
        _ if reply && frame.correlation_id == late => *late_answered = true,
        _ => {}
    }
}

/// `exit-at-eof`: EOF with a handler still running; exit within 1 s.
fn exit_at_eof(s: &mut Session) -> Verdict {
    let sleep = s.request("Sleep", Some(&map(vec![("ms", 60_000.into())])));
    s.send(&sleep)?;
    // Until the handler runs (if `Active` works; else a moment).
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        let active = s.request("Active", None);
        let running = s
            .call(&active)
            .ok()
            .and_then(|r| value_of(&r).ok())
            .and_then(|v| {
                v.as_map()
                    .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("sleeping")))
                    .and_then(|(_, n)| n.as_u64())
            });
        match running {
            Some(n) if n >= 1 => break,
            Some(_) => std::thread::sleep(Duration::from_millis(5)),
            None => {
                std::thread::sleep(Duration::from_millis(100));
                break;
            }
        }
    }
    s.direct.close_stdin();
    let eof = Instant::now();
    match s.direct.wait_exit(Duration::from_secs(1)) {
        Some(status) if status.success() => Ok(format!(
            "exited {} after EOF with a Sleep 60000 still running",
            ms(eof.elapsed())
        )),
        Some(status) => Err(format!(
            "exited {} after EOF, but {status}",
            ms(eof.elapsed())
        )),
        None => Err("still running 1 s after EOF (with a Sleep 60000 in hand)".into()),
    }
}

/// The direct checks, in order, and every byte the copies that ran wrote
/// on stdout. `first_id` names the first copy (the next id after the
/// workers under the broker), the second copy the one after it.
pub fn run(
    command: &str,
    args: &[String],
    first_id: &str,
    second_id: &str,
) -> (Vec<CheckResult>, Vec<Vec<u8>>) {
    type Check = (&'static str, fn(&mut Session) -> Verdict);
    let first: [Check; 4] = [
        ("correlation-ids", correlation_ids),
        ("deadline-absent", deadline_absent),
        ("shutdown-source", shutdown_source),
        ("drain", drain),
    ];
    let second: [Check; 1] = [("exit-at-eof", exit_at_eof)];
    let mut results = Vec::new();
    let mut stdouts = Vec::new();
    for (id, checks) in [(first_id, &first[..]), (second_id, &second[..])] {
        match Session::start(command, args, id) {
            Ok(mut session) => {
                for &(name, check) in checks {
                    let started = Instant::now();
                    let verdict = match session.direct.exited() {
                        Some(status) => Err(format!(
                            "not run: this copy of the subject exited ({status}) during an earlier check"
                        )),
                        None => check(&mut session),
                    };
                    results.push(CheckResult::new(name, verdict, started.elapsed()));
                }
                stdouts.push(session.finish());
            }
            Err((why, stdout)) => {
                for &(name, _) in checks {
                    results.push(CheckResult::new(name, Err(why.clone()), Duration::ZERO));
                }
                stdouts.extend(stdout);
            }
        }
    }
    (results, stdouts)
}

/// `stdout-frames-only`: the copies' stdout held frames and nothing else,
/// and the broker found no bad frame from the workers it ran.
pub fn frames_only(stdouts: &[Vec<u8>], bad_frames_under_broker: &[(String, u64)]) -> Verdict {
    if stdouts.is_empty() {
        return Err("no copy of the subject could be run directly".into());
    }
    let mut frames = 0;
    for (i, stdout) in stdouts.iter().enumerate() {
        frames += frames_only::scan(stdout, DEFAULT_MAX_FRAME_BYTES)
            .map_err(|e| format!("the stdout of direct copy {}: {e}", i + 1))?;
    }
    if let Some((id, n)) = bad_frames_under_broker.iter().find(|(_, n)| *n > 0) {
        return Err(format!("under the broker, {id} wrote {n} bad frames"));
    }
    Ok(format!(
        "{frames} frames from the direct copies and nothing else; no bad frame under the broker"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(id: u64, payload: &Value) -> Envelope {
        Envelope::request("subject.2", "X", id)
            .response(Payload::from_msgpack(encode(payload)).ok())
    }

    #[test]
    fn a_drain_needs_both_replies_and_no_new_call() {
        let slept = map(vec![("slept_ms", 300.into()), ("cancelled", false.into())]);
        let mut drained = Drained {
            sleep: Some(reply(1, &slept)),
            relay: Some(reply(2, &"drained".into())),
            new_calls: Vec::new(),
        };
        assert_eq!(judge_drain(&drained), Ok(()));
        drained
            .new_calls
            .push(Envelope::request("kit.0", "Echo", 3));
        assert!(
            judge_drain(&drained)
                .unwrap_err()
                .contains("new call: Echo to kit.0")
        );
        drained.new_calls.clear();
        drained.relay = Some(reply(2, &Value::Nil));
        assert!(judge_drain(&drained).is_err());
        drained.relay = None;
        assert!(judge_drain(&drained).unwrap_err().contains("Relay"));
        drained.sleep = None;
        assert!(judge_drain(&drained).unwrap_err().contains("Sleep"));
    }

    #[test]
    fn frames_only_names_the_copy_and_the_worker() {
        assert!(frames_only(&[Vec::new(), Vec::new()], &[("subject.0".into(), 0)]).is_ok());
        assert!(frames_only(&[], &[]).is_err(), "nothing ran: nothing shown");
        let stray = frames_only(&[Vec::new(), b"bye\n".to_vec()], &[]).unwrap_err();
        assert!(
            stray.starts_with("the stdout of direct copy 2: "),
            "{stray}"
        );
        let bad = frames_only(&[Vec::new()], &[("subject.1".into(), 2)]).unwrap_err();
        assert_eq!(bad, "under the broker, subject.1 wrote 2 bad frames");
    }
}
