//! Checks through the broker of what every request shows: `Ping`, payloads
//! carried byte for byte, errors with their code and message.

use std::time::{Duration, Instant};

use super::corpus::{self, Sample, hex_prefix};
use super::probe::{Probe, failure, ms, request};
use super::report::Verdict;
use crate::call::CallError;

/// `ping`: every worker answers `Ping` with a response.
pub async fn ping(probe: &Probe) -> Verdict {
    let mut answered = Vec::new();
    for id in probe.ids.iter() {
        let started = Instant::now();
        probe
            .call(id, "Ping", None)
            .await
            .map_err(|e| format!("Ping to {id}: {}", failure(&e)))?;
        answered.push(format!("{id} in {}", ms(started.elapsed())));
    }
    Ok(format!("answered by {}", answered.join(", ")))
}

/// Whether a `WhoAmI` reply is `{id, pid}` of process `id` with `pid`.
pub fn judge_who_am_i(reply: &rmpv::Value, id: &str, pid: Option<u32>) -> Result<(), String> {
    let field = |name: &str| {
        reply
            .as_map()
            .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(name)))
            .map(|(_, v)| v)
    };
    let said_id = field("id").and_then(|v| v.as_str());
    let said_pid = field("pid").and_then(|v| v.as_u64());
    match (said_id, said_pid) {
        (Some(i), Some(p)) if i == id && pid.is_none_or(|pid| u64::from(pid) == p) => Ok(()),
        (Some(_), Some(_)) => Err(format!(
            "WhoAmI to {id} replied {reply}, want {{id: {id:?}, pid: {}}}",
            pid.map_or("its pid".to_owned(), |p| p.to_string())
        )),
        _ => Err(format!("WhoAmI to {id} replied {reply}, not {{id, pid}}")),
    }
}

/// `who-am-i`: each worker knows its process id (from the environment)
/// and its pid, as the broker's process table has them.
pub async fn who_am_i(probe: &Probe) -> Verdict {
    let table = probe
        .broker
        .processes()
        .await
        .map_err(|e| format!("the process table: {e}"))?;
    for id in probe.ids.iter() {
        let pid = table.iter().find(|p| &p.id == id).and_then(|p| p.pid);
        let reply = probe.value(id, "WhoAmI", None).await?;
        judge_who_am_i(&reply, id, pid)?;
    }
    Ok(format!(
        "{} each replied its own id and pid",
        probe.ids.join(", ")
    ))
}

/// Whether `Echo` gave `sample` back byte for byte: `None` if it did, else
/// what it gave.
pub fn echo_mismatch(sample: &Sample, got: Result<Option<&[u8]>, String>) -> Option<String> {
    let name = sample.name;
    match got {
        Err(e) => Some(format!("{name}: {e}")),
        Ok(Some(bytes)) if bytes == sample.bytes => None,
        Ok(Some(bytes)) => Some(format!(
            "{name}: sent {} ({} bytes), got {} ({} bytes) back",
            hex_prefix(&sample.bytes, 12),
            sample.bytes.len(),
            hex_prefix(bytes, 12),
            bytes.len()
        )),
        Ok(None) => Some(format!(
            "{name}: sent {}, got a reply without a payload",
            hex_prefix(&sample.bytes, 12)
        )),
    }
}

/// Each sample through `Echo`, over the workers in turn; the first that
/// does not come back as sent fails the check.
async fn echo_all(probe: &Probe, samples: &[Sample], timeout: Duration) -> Result<(), String> {
    for (i, sample) in samples.iter().enumerate() {
        let id = &probe.ids[i % probe.ids.len()];
        let reply = probe
            .broker
            .call_envelope(request(id, "Echo", Some(&sample.bytes), timeout))
            .await;
        let got = match &reply {
            Ok(reply) => Ok(reply.payload().map(|p| p.as_bytes().as_ref())),
            Err(e) => Err(failure(e)),
        };
        if let Some(mismatch) = echo_mismatch(sample, got) {
            return Err(mismatch);
        }
    }
    Ok(())
}

/// `payload-types`: every MessagePack format through `Echo`.
pub async fn payload_types(probe: &Probe) -> Verdict {
    let samples = corpus::types();
    echo_all(probe, &samples, super::probe::CALL_TIMEOUT).await?;
    Ok(format!(
        "{} payloads, every MessagePack format (ext and timestamps too), came back byte for byte",
        samples.len()
    ))
}

/// `payload-noncanonical`: forms longer than needed through `Echo`.
pub async fn payload_noncanonical(probe: &Probe) -> Verdict {
    let samples = corpus::non_canonical();
    echo_all(probe, &samples, super::probe::CALL_TIMEOUT).await?;
    Ok(format!(
        "{} payloads in forms longer than needed came back byte for byte",
        samples.len()
    ))
}

/// `payload-none`: `Echo` without a payload replies without one.
pub async fn payload_none(probe: &Probe) -> Verdict {
    let reply = probe
        .call(probe.first(), "Echo", None)
        .await
        .map_err(|e| format!("Echo without a payload: {}", failure(&e)))?;
    match reply.payload() {
        None => Ok("Echo without a payload replied without one".into()),
        Some(p) => Err(format!(
            "Echo without a payload replied with one: {}",
            hex_prefix(p.as_bytes(), 12)
        )),
    }
}

/// `payload-8mib`: 8 MiB through `Echo`.
pub async fn payload_8mib(probe: &Probe) -> Verdict {
    let sample = corpus::eight_mib();
    let started = Instant::now();
    echo_all(
        probe,
        std::slice::from_ref(&sample),
        Duration::from_secs(20),
    )
    .await?;
    Ok(format!(
        "8 MiB came back byte for byte in {}",
        ms(started.elapsed())
    ))
}

/// What an error reply should be: `Ok` if `result` is the error `code`
/// with `message`, else what it was.
pub fn expect_error<T>(
    result: &Result<T, CallError>,
    code: &str,
    message: Option<&str>,
) -> Result<(), String> {
    match result {
        Err(CallError::Remote {
            code: got,
            message: said,
            ..
        }) if got == code && message.is_none_or(|m| m == said) => Ok(()),
        Err(e) => Err(format!(
            "{}; want error {code}{}",
            failure(e),
            message.map(|m| format!(": {m:?}")).unwrap_or_default()
        )),
        Ok(_) => Err(format!("a response; want error {code}")),
    }
}

/// `errors`: `Fail` replies its code and message, `handler` by default.
pub async fn errors(probe: &Probe) -> Verdict {
    let id = probe.first();
    let chosen = rmpv::Value::Map(vec![
        ("code".into(), "teapot".into()),
        ("message".into(), "short and stout".into()),
    ]);
    let reply = probe.call(id, "Fail", Some(&corpus::encode(&chosen))).await;
    expect_error(&reply, "teapot", Some("short and stout"))
        .map_err(|e| format!("Fail {{code: teapot}}: {e}"))?;
    let plain = rmpv::Value::Map(vec![("message".into(), "plain".into())]);
    let reply = probe.call(id, "Fail", Some(&corpus::encode(&plain))).await;
    expect_error(&reply, "handler", Some("plain"))
        .map_err(|e| format!("Fail without a code: {e}"))?;
    Ok("Fail replied with its code and message, and `handler` when it chose none".into())
}

/// `unknown-method`: a method the subject does not serve is answered
/// `unknown_method` (every request gets its one reply).
pub async fn unknown_method(probe: &Probe) -> Verdict {
    let reply = probe.call(probe.first(), "NoSuchMethod", None).await;
    expect_error(&reply, "unknown_method", None).map_err(|e| format!("NoSuchMethod: {e}"))?;
    Ok("NoSuchMethod was answered unknown_method".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_am_i_is_the_id_and_the_pid() {
        let reply = |id: &str, pid: u64| {
            rmpv::Value::Map(vec![("id".into(), id.into()), ("pid".into(), pid.into())])
        };
        assert!(judge_who_am_i(&reply("subject.1", 42), "subject.1", Some(42)).is_ok());
        assert!(judge_who_am_i(&reply("standalone", 42), "subject.1", Some(42)).is_err());
        assert!(judge_who_am_i(&reply("subject.1", 43), "subject.1", Some(42)).is_err());
        assert!(judge_who_am_i(&rmpv::Value::Nil, "subject.1", None).is_err());
    }

    #[test]
    fn an_echo_is_judged_by_its_bytes() {
        let sample = Sample {
            name: "1 as uint 8",
            bytes: vec![0xcc, 0x01],
        };
        assert_eq!(echo_mismatch(&sample, Ok(Some(&[0xcc, 0x01]))), None);
        assert_eq!(
            echo_mismatch(&sample, Ok(Some(&[0x01]))).as_deref(),
            Some("1 as uint 8: sent cc 01 (2 bytes), got 01 (1 bytes) back")
        );
        assert!(echo_mismatch(&sample, Ok(None)).is_some());
        assert!(echo_mismatch(&sample, Err("timeout".into())).is_some());
    }

    #[test]
    fn an_error_is_judged_by_its_code_and_message() {
        let remote = |code: &str, message: &str| -> Result<(), CallError> {
            Err(CallError::Remote {
                code: code.into(),
                message: message.into(),
                source_id: "subject.0".into(),
            })
        };
        assert!(expect_error(&remote("teapot", "x"), "teapot", Some("x")).is_ok());
        assert!(expect_error(&remote("teapot", "y"), "teapot", None).is_ok());
        assert_eq!(
            expect_error(&remote("handler", "x"), "teapot", Some("x")),
            Err("error handler from subject.0: \"x\"; want error teapot: \"x\"".into())
        );
        assert!(expect_error(&Ok::<(), CallError>(()), "teapot", None).is_err());
    }
}
