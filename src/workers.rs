//! Built-in workers that `procbroker worker NAME` runs (with `command =
//! "@self"` in a config, a fresh checkout needs no other program).

use bytes::BytesMut;
use std::io::{Read, Write};

use crate::protocol::FrameError;
use crate::protocol::msgpack_rpc::echo_requests;
use crate::service::Methods;

mod conformance;
pub use conformance::conformance;

/// `echo`: answers every request, whatever its method, with its payload
/// verbatim (the bytes are not decoded).
pub fn echo() -> Methods {
    Methods::new().fallback_sync(|request| Ok(request.payload))
}

/// `rpc-echo`: a MessagePack-RPC peer on stdin/stdout that answers every
/// request `[0, msgid, method, params]` with `[1, msgid, nil, params]`,
/// until EOF. Replies to what one read brought go out in one write. For
/// benchmarks of `protocol = "msgpack-rpc"` against the length-prefixed
/// `echo`; anything that is not MessagePack-RPC ends it with an error.
pub fn rpc_echo(mut input: impl Read, mut output: impl Write) -> Result<(), FrameError> {
    let mut pending = Vec::with_capacity(1 << 16);
    let mut chunk = vec![0u8; 1 << 16];
    let mut replies = BytesMut::with_capacity(1 << 16);
    loop {
        let n = match input.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        pending.extend_from_slice(&chunk[..n]);
        let used = echo_requests(&pending, &mut replies)?;
        pending.drain(..used);
        if !replies.is_empty() {
            output.write_all(&replies)?;
            output.flush()?;
            replies.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_echo_answers_each_request_with_its_params_across_reads() {
        let mut input = Vec::new();
        for (msgid, params) in [(1u32, vec![1u8]), (2, vec![])] {
            let value = rmpv::Value::Array(vec![
                0.into(),
                msgid.into(),
                "Echo".into(),
                rmpv::Value::Array(params.into_iter().map(Into::into).collect()),
            ]);
            rmpv::encode::write_value(&mut input, &value).expect("encode");
        }
        // A notification is not answered.
        let note = rmpv::Value::Array(vec![2.into(), "n".into(), rmpv::Value::Array(vec![])]);
        rmpv::encode::write_value(&mut input, &note).expect("encode");
        // Read one byte at a time: values arrive in pieces.
        struct Trickle(std::collections::VecDeque<u8>);
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                match (self.0.pop_front(), buf.first_mut()) {
                    (Some(b), Some(slot)) => {
                        *slot = b;
                        Ok(1)
                    }
                    _ => Ok(0),
                }
            }
        }
        let mut output = Vec::new();
        rpc_echo(Trickle(input.into()), &mut output).expect("clean EOF");
        let mut replies = &output[..];
        let mut got = Vec::new();
        while !replies.is_empty() {
            got.push(rmpv::decode::read_value(&mut replies).expect("reply"));
        }
        let reply = |msgid: u32, params: Vec<rmpv::Value>| {
            rmpv::Value::Array(vec![
                1.into(),
                msgid.into(),
                rmpv::Value::Nil,
                params.into(),
            ])
        };
        assert_eq!(got, [reply(1, vec![1.into()]), reply(2, vec![])]);

        let garbage: &[u8] = &[0xc1];
        assert!(rpc_echo(garbage, Vec::new()).is_err());
    }
}
