//! Logs to stderr with `tracing`: `LOG_LEVEL` (or `RUST_LOG` directives) and
//! `LOG_FORMAT=json|text`.

use anyhow::{Result, bail};
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Stderr that drops what it cannot write. When whoever reads the broker's
/// log goes away, a write fails with EPIPE; tracing-subscriber then reports
/// the failure with `eprintln!`, which panics on the same broken pipe. A
/// daemon must outlive its log reader, so a line that cannot be written is
/// lost, and nothing else.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Installs the subscriber. `RUST_LOG` wins over `LOG_LEVEL`; the default is
/// `default_level`. Children's stderr lines come out as events of target
/// `procbroker::child` with their `process` id. With a plain level, the
/// NATS client says warnings and errors only: the cluster's own lines say
/// what its events mean (`RUST_LOG=async_nats=info` brings them back).
pub fn init(default_level: &str) -> Result<()> {
    let quiet_nats = |level: &str| {
        if level.trim().eq_ignore_ascii_case("off") {
            level.to_owned()
        } else {
            format!("{level},async_nats=warn")
        }
    };
    let filter = match (std::env::var("RUST_LOG"), std::env::var("LOG_LEVEL")) {
        (Ok(directives), _) if !directives.is_empty() => EnvFilter::try_new(directives)?,
        (_, Ok(level)) if !level.is_empty() => EnvFilter::try_new(quiet_nats(&level))?,
        _ => EnvFilter::new(quiet_nats(default_level)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        .with_ansi(std::io::stderr().is_terminal());
    match std::env::var("LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().init(),
        Ok("text") | Err(_) => builder.init(),
        Ok(other) => bail!("LOG_FORMAT={other:?}: expected json or text"),
    }
    Ok(())
}
