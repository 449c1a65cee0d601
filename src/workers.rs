//! Built-in workers that `procbroker worker NAME` runs (with `command =
//! "@self"` in a config, a fresh checkout needs no other program).

use crate::service::Methods;

/// `echo`: answers every request, whatever its method, with its payload
/// verbatim (the bytes are not decoded).
pub fn echo() -> Methods {
    Methods::new().fallback(|request| async move { Ok(request.payload) })
}
