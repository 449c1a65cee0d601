//! The wire between brokers of one cluster: NATS subjects, headers and
//! the heartbeat. The envelope itself crosses unchanged, in the message
//! body; what routing needs travels beside it.
//!
//! Every broker start is an *instance* with a random id (`INST`: 16
//! lowercase hex digits). Requests and replies are addressed to an instance,
//! not only to a node name, so two brokers that share a name (a
//! misconfiguration, or a restart racing its predecessor) can never receive
//! each other's messages. Subjects, for cluster `name` (all under the
//! prefix, so clusters share a NATS server without seeing each other):
//!
//! | subject | what |
//! |---|---|
//! | `name.hb` | every node's [`Heartbeat`], JSON |
//! | `name.NODE.INST.req` | requests to instance `INST` of node `NODE` (headers [`NODE_HEADER`], [`INSTANCE_HEADER`]: the sender) |
//! | `name.NODE.INST.rep.FROM.FINST.CORR.ORIGIN` | the reply to request `CORR` of `ORIGIN` (hex), sent by instance `FINST` of node `FROM` |
//!
//! Why the reply subject names the request: NATS answers a request nobody
//! subscribes to with a "no responders" status on its reply subject, and
//! that status has no body. The subject alone then says which request to
//! fail, with no table of subjects to keep (or leak).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Header of a request: the node that published it. (The time left of
/// its deadline is the envelope's own `timeout_ms`, which the sending
/// broker sets; a reply's subject says everything about it.)
pub const NODE_HEADER: &str = "Procbroker-Node";

/// Header of a request: the instance of that node that published it
/// ([`instance_token`]).
pub const INSTANCE_HEADER: &str = "Procbroker-Instance";

/// One broker instance of a node: where a message goes or comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop<'a> {
    /// The node's name.
    pub node: &'a str,
    /// The instance's id.
    pub instance: u64,
}

/// An instance id as it appears in subjects and headers: 16 lowercase hex
/// digits.
pub fn instance_token(instance: u64) -> String {
    format!("{instance:016x}")
}

/// Reads an [`instance_token`]; `None` for anything else, and for 0 (no
/// broker uses it).
pub fn parse_instance(token: &str) -> Option<u64> {
    if token.len() != 16 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(token, 16).ok().filter(|i| *i != 0)
}

/// The heartbeat subject of cluster `name`.
pub fn heartbeat_subject(name: &str) -> String {
    format!("{name}.hb")
}

/// Where requests to instance `to` are published.
pub fn request_subject(name: &str, to: Hop<'_>) -> String {
    format!("{name}.{}.{:016x}.req", to.node, to.instance)
}

/// What instance `to` subscribes to for the replies it is sent.
pub fn reply_wildcard(name: &str, to: Hop<'_>) -> String {
    format!("{name}.{}.{:016x}.rep.>", to.node, to.instance)
}

/// The reply subject of request `correlation_id` of `origin` (a process
/// id of instance `to`), answered by instance `from`.
pub fn reply_subject(
    name: &str,
    to: Hop<'_>,
    from: Hop<'_>,
    correlation_id: u64,
    origin: &str,
) -> String {
    let mut s =
        String::with_capacity(name.len() + to.node.len() + from.node.len() + 2 * origin.len() + 64);
    let _ = write!(
        s,
        "{name}.{}.{:016x}.rep.{}.{:016x}.{correlation_id}.",
        to.node, to.instance, from.node, from.instance
    );
    for b in origin.bytes() {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// What a reply subject names: the instance it is for, the answering
/// instance, the correlation id and the origin (its process id on the
/// instance it is for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    /// The instance the reply is for (this broker, when it subscribed).
    pub to_instance: u64,
    /// The node that answers.
    pub from: String,
    /// The instance of that node that answers.
    pub from_instance: u64,
    /// The request's correlation id.
    pub correlation_id: u64,
    /// The process that asked.
    pub origin: String,
}

/// Reads a subject made by [`reply_subject`] (`None` for anything else).
pub fn parse_reply_subject(subject: &str) -> Option<ReplyTo> {
    let mut tokens = subject.rsplitn(6, '.');
    let origin = tokens.next()?;
    let correlation_id = tokens.next()?.parse().ok()?;
    let from_instance = parse_instance(tokens.next()?)?;
    let from = tokens.next()?;
    if tokens.next()? != "rep" {
        return None;
    }
    let to_instance = parse_instance(tokens.next()?.rsplit('.').next()?)?;
    if from.is_empty() || origin.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let bytes = origin
        .as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect::<Option<Vec<u8>>>()?;
    Some(ReplyTo {
        to_instance,
        from: from.to_owned(),
        from_instance,
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
    /// Random per broker start (never 0): a node seen with a new instance
    /// restarted, and what was in flight to the old one is lost.
    pub instance: u64,
    /// When this instance began to hold its node name, in milliseconds
    /// since the Unix epoch. Of two live instances claiming one name, the
    /// earlier claim keeps it (equal claims: the smaller instance); `0`
    /// (absent) is the earliest.
    #[serde(default)]
    pub since_ms: u64,
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

    const A: Hop<'static> = Hop {
        node: "a",
        instance: 0xa1,
    };
    const B: Hop<'static> = Hop {
        node: "b",
        instance: 0xb2,
    };

    #[test]
    fn subjects_name_the_instance() {
        assert_eq!(request_subject("pb", B), "pb.b.00000000000000b2.req");
        assert_eq!(reply_wildcard("pb", A), "pb.a.00000000000000a1.rep.>");
        assert_eq!(
            reply_subject("pb", A, B, 0, "x"),
            "pb.a.00000000000000a1.rep.b.00000000000000b2.0.78"
        );
        assert_eq!(instance_token(u64::MAX), "ffffffffffffffff");
        assert_eq!(parse_instance("ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_instance("0000000000000000"), None);
        assert_eq!(parse_instance("ff"), None);
        assert_eq!(parse_instance("fffffffffffffffg"), None);
    }

    #[test]
    fn reply_subjects_round_trip() {
        let max = reply_subject("pb", A, B, u64::MAX, "x");
        assert_eq!(
            parse_reply_subject(&max).map(|r| r.correlation_id),
            Some(u64::MAX)
        );
        let s = reply_subject("pb", A, B, 42, "py-client.0");
        let prefix = "pb.a.00000000000000a1.rep.b.00000000000000b2.42.";
        assert!(s.starts_with(prefix), "{s}");
        assert!(!s[prefix.len()..].contains('.'), "{s}");
        let back = parse_reply_subject(&s).expect("parses");
        assert_eq!(
            back,
            ReplyTo {
                to_instance: 0xa1,
                from: "b".into(),
                from_instance: 0xb2,
                correlation_id: 42,
                origin: "py-client.0".into(),
            }
        );
        let i = "00000000000000b2";
        let j = "00000000000000a1";
        assert_eq!(parse_reply_subject("pb.a.req"), None);
        assert_eq!(
            parse_reply_subject(&format!("pb.a.{j}.rep.b.{i}.x.00")),
            None
        );
        assert_eq!(
            parse_reply_subject(&format!("pb.a.{j}.rep.b.{i}.1.0")),
            None
        );
        assert_eq!(
            parse_reply_subject(&format!("pb.a.{j}.rep.b.{i}.1.zz")),
            None
        );
        assert_eq!(
            parse_reply_subject(&format!("pb.a.{j}.xyz.b.{i}.1.00")),
            None
        );
        assert_eq!(
            parse_reply_subject(&format!("pb.a.{j}.rep.b.12.1.00")),
            None
        );
        assert_eq!(
            parse_reply_subject(&format!("pb.a.nope.rep.b.{i}.1.00")),
            None
        );
        // The subject of the version before instances: refused.
        assert_eq!(parse_reply_subject("pb.a.rep.b.1.78"), None);
    }

    #[test]
    fn heartbeat_is_plain_json() {
        let hb = Heartbeat {
            node: "a".into(),
            instance: 7,
            since_ms: 1_700_000_000_000,
            heartbeat_ms: 1000,
            services: [("echo".to_owned(), 2)].into(),
            leaving: false,
        };
        let json = serde_json::to_string(&hb).expect("json");
        assert_eq!(
            json,
            r#"{"node":"a","instance":7,"since_ms":1700000000000,"heartbeat_ms":1000,"services":{"echo":2},"leaving":false}"#
        );
        // Without since_ms and leaving (an older broker): the earliest claim.
        let back: Heartbeat = serde_json::from_str(
            r#"{"node":"a","instance":7,"heartbeat_ms":1000,"services":{"echo":2}}"#,
        )
        .expect("parse");
        assert_eq!(back, Heartbeat { since_ms: 0, ..hb });
    }
}
