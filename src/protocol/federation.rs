//! The wire between brokers of one cluster (DESIGN 11): NATS subjects,
//! headers and the heartbeat. The envelope itself crosses unchanged, in
//! the message body; what routing needs travels beside it.
//!
//! Subjects, for cluster `name` (all under the prefix, so clusters share a
//! NATS server without seeing each other):
//!
//! | subject | what |
//! |---|---|
//! | `name.hb` | every node's [`Heartbeat`], JSON |
//! | `name.NODE.req` | requests to node `NODE` (header [`NODE_HEADER`]: the sender) |
//! | `name.NODE.rep.FROM.CORR.ORIGIN` | the reply to request `CORR` of `ORIGIN` (hex), sent to `FROM` |
//!
//! Why the reply subject names the request: NATS answers a request nobody
//! subscribes to with a "no responders" status on its reply subject, and
//! that status has no body. The subject alone then says which request to
//! fail, with no table of subjects to keep (or leak).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Header of a request: the node that published it. (The time left of
/// its deadline is the envelope's own `timeout_ms`, which the sending
/// broker sets; a reply's subject says everything about it.)
pub const NODE_HEADER: &str = "Procbroker-Node";

/// The heartbeat subject of cluster `name`.
pub fn heartbeat_subject(name: &str) -> String {
    format!("{name}.hb")
}

/// Where requests to `node` are published.
pub fn request_subject(name: &str, node: &str) -> String {
    format!("{name}.{node}.req")
}

/// What node `node` subscribes to for the replies it is sent.
pub fn reply_wildcard(name: &str, node: &str) -> String {
    format!("{name}.{node}.rep.>")
}

/// The reply subject of request `correlation_id` of `origin` (a process
/// id on node `to`), answered by node `from`.
pub fn reply_subject(
    name: &str,
    to: &str,
    from: &str,
    correlation_id: u64,
    origin: &str,
) -> String {
    let mut s = format!("{name}.{to}.rep.{from}.{correlation_id}.");
    for b in origin.bytes() {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// What a reply subject names: the answering node, the correlation id and
/// the origin (its process id on this node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    /// The node that answers.
    pub from: String,
    /// The request's correlation id.
    pub correlation_id: u64,
    /// The process that asked.
    pub origin: String,
}

/// Reads a subject made by [`reply_subject`] (`None` for anything else).
pub fn parse_reply_subject(subject: &str) -> Option<ReplyTo> {
    let mut tokens = subject.rsplitn(4, '.');
    let origin = tokens.next()?;
    let correlation_id = tokens.next()?.parse().ok()?;
    let from = tokens.next()?;
    let rest = tokens.next()?;
    if !rest.ends_with(".rep") || origin.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let bytes = origin
        .as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect::<Option<Vec<u8>>>()?;
    Some(ReplyTo {
        from: from.to_owned(),
        correlation_id,
        origin: String::from_utf8(bytes).ok()?,
    })
}

/// What every node publishes on `name.hb` each `heartbeat_ms`, and once
/// with `leaving` when it stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The node's name.
    pub node: String,
    /// Random per broker start: a node seen with a new instance restarted,
    /// and what was in flight to the old one is lost.
    pub instance: u64,
    /// Its heartbeat interval (3 of them missed: it is gone).
    pub heartbeat_ms: u64,
    /// Exported services and their ready workers.
    pub services: BTreeMap<String, u32>,
    /// It is shutting down: take it out of the rotation now.
    #[serde(default)]
    pub leaving: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_subjects_round_trip() {
        assert_eq!(reply_subject("pb", "a", "b", 0, "x"), "pb.a.rep.b.0.78");
        let max = reply_subject("pb", "a", "b", u64::MAX, "x");
        assert_eq!(
            parse_reply_subject(&max).map(|r| r.correlation_id),
            Some(u64::MAX)
        );
        let s = reply_subject("pb", "a", "b", 42, "py-client.0");
        assert!(s.starts_with("pb.a.rep.b.42."), "{s}");
        assert!(!s["pb.a.rep.b.42.".len()..].contains('.'), "{s}");
        let back = parse_reply_subject(&s).expect("parses");
        assert_eq!(
            back,
            ReplyTo {
                from: "b".into(),
                correlation_id: 42,
                origin: "py-client.0".into(),
            }
        );
        assert_eq!(parse_reply_subject("pb.a.req"), None);
        assert_eq!(parse_reply_subject("pb.a.rep.b.x.00"), None);
        assert_eq!(parse_reply_subject("pb.a.rep.b.1.0"), None);
        assert_eq!(parse_reply_subject("pb.a.rep.b.1.zz"), None);
        assert_eq!(parse_reply_subject("pb.a.xyz.b.1.00"), None);
    }

    #[test]
    fn heartbeat_is_plain_json() {
        let hb = Heartbeat {
            node: "a".into(),
            instance: 7,
            heartbeat_ms: 1000,
            services: [("echo".to_owned(), 2)].into(),
            leaving: false,
        };
        let json = serde_json::to_string(&hb).expect("json");
        assert_eq!(
            json,
            r#"{"node":"a","instance":7,"heartbeat_ms":1000,"services":{"echo":2},"leaving":false}"#
        );
        let back: Heartbeat = serde_json::from_str(
            r#"{"node":"a","instance":7,"heartbeat_ms":1000,"services":{"echo":2}}"#,
        )
        .expect("parse");
        assert_eq!(back, hb);
    }
}
