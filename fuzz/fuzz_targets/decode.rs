//! Any byte stream through the envelope decoder: never a panic, never an
//! allocation sized by an unchecked length, and every envelope it accepts
//! re-encodes to something that decodes to the same envelope.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use procbroker::protocol::{Envelope, EnvelopeCodec};
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    // A small limit so that length prefixes past it are exercised too.
    let mut codec = EnvelopeCodec::new(64 * 1024);
    let mut buf = BytesMut::from(data);
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(Ok(envelope))) => {
                let mut out = BytesMut::new();
                codec.encode(&envelope, &mut out).expect("re-encode");
                let again = codec.decode(&mut out).expect("frame").expect("whole");
                assert_eq!(again.expect("valid"), envelope);
                assert!(out.is_empty());
            }
            Ok(Some(Err(_invalid))) => {}
            Ok(None) | Err(_) => break,
        }
    }
    // The body on its own, as the envelope reader sees it.
    let _ = Envelope::decode(&bytes::Bytes::copy_from_slice(data));
});
