//! Process ids and service names.
//!
//! A service `name` with N workers runs processes `name.0 … name.{N-1}`.
//! Names use ASCII letters, digits, `_` and `-`; `.` only separates the worker
//! number. `broker` and `*` are reserved, and ids starting with `@` are the
//! broker's own (an embedded Rust caller is `@caller`), so they can never
//! collide with a process.

/// The reserved target of the broker itself.
pub const BROKER: &str = crate::protocol::BROKER;
/// The reserved target of an event to every process.
pub const BROADCAST: &str = "*";
/// The `source` a worker sees on requests from embedded Rust callers.
pub const CALLER: &str = "@caller";

/// The lifecycle event the broker sends a child before closing its stdin.
pub const SHUTDOWN_EVENT: &str = "shutdown";
/// The lifecycle event a child sends the broker when it is ready.
pub const READY_EVENT: &str = "ready";

/// The environment variable that tells a child its process id.
pub const PROCESS_ID_ENV: &str = "PROCBROKER_PROCESS_ID";
/// The environment variable that tells a child its service name.
pub const SERVICE_ENV: &str = "PROCBROKER_SERVICE";

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty, or a character outside `[A-Za-z0-9_-]`.
    #[error("invalid service name {0:?}: use ASCII letters, digits, '_' and '-'")]
    Invalid(String),
    /// `broker` (and `*`, which is not a valid name anyway).
    #[error("{0:?} is reserved")]
    Reserved(String),
}

/// Checks a service name.
pub fn check_service_name(name: &str) -> Result<(), NameError> {
    if name == BROKER {
        return Err(NameError::Reserved(name.into()));
    }
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError::Invalid(name.into()))
    }
}

/// The process id of worker `index` of `service`.
pub fn process_id(service: &str, index: u32) -> String {
    format!("{service}.{index}")
}

/// The service a process id belongs to (`echo.2` → `echo`).
pub fn service_of(process_id: &str) -> &str {
    process_id
        .rsplit_once('.')
        .map_or(process_id, |(service, _)| service)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_service_name("echo_2-x").is_ok());
        for bad in ["", "a.b", "a b", "é", "*", "@caller"] {
            assert!(check_service_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_service_name("broker"),
            Err(NameError::Reserved("broker".into()))
        );
        assert_eq!(process_id("echo", 3), "echo.3");
        assert_eq!(service_of("echo.3"), "echo");
        assert_eq!(service_of("broker"), "broker");
    }
}
