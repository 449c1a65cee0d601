//! Whether what a process wrote on stdout is frames and nothing else:
//! each a length prefix within the limit and a body that is a valid
//! envelope, back to back, with nothing left over at the end.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use super::corpus::hex_prefix;
use crate::protocol::EnvelopeCodec;

/// How many frames `stdout` holds, or what is wrong with it: where the
/// first thing that is not a frame starts, and what it looks like.
pub fn scan(stdout: &[u8], max_frame_bytes: usize) -> Result<usize, String> {
    let mut codec = EnvelopeCodec::new(max_frame_bytes);
    let mut rest = BytesMut::from(stdout);
    let mut frames = 0usize;
    loop {
        let offset = stdout.len() - rest.len();
        let at = |what: String| {
            format!(
                "after {frames} frames, at byte {offset}: {what}; the bytes there: {}",
                shown(&stdout[offset..])
            )
        };
        match codec.decode_eof(&mut rest) {
            Ok(Some(Ok(_))) => frames += 1,
            Ok(Some(Err(invalid))) => {
                return Err(at(format!(
                    "a frame that is not an envelope ({})",
                    invalid.error
                )));
            }
            Ok(None) => return Ok(frames),
            Err(e) => return Err(at(e.to_string())),
        }
    }
}

/// The start of `bytes`: as text when it reads as text (a stray `print`),
/// else in hex.
fn shown(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(24)];
    let text = head
        .iter()
        .all(|&b| b == b'\n' || b == b'\t' || (0x20..0x7f).contains(&b));
    if text && !head.is_empty() {
        format!("{:?}", String::from_utf8_lossy(head))
    } else {
        hex_prefix(bytes, 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{DEFAULT_MAX_FRAME_BYTES, Envelope};
    use tokio_util::codec::Encoder;

    fn frames(n: u64) -> Vec<u8> {
        let mut out = BytesMut::new();
        for i in 0..n {
            EnvelopeCodec::default()
                .encode(&Envelope::request("a", "B", i + 1), &mut out)
                .expect("encode");
        }
        out.to_vec()
    }

    #[test]
    fn frames_alone_are_counted() {
        assert_eq!(scan(&frames(3), DEFAULT_MAX_FRAME_BYTES), Ok(3));
        assert_eq!(scan(&[], DEFAULT_MAX_FRAME_BYTES), Ok(0));
    }

    #[test]
    fn a_stray_line_is_shown_as_text_where_it_starts() {
        let mut out = frames(2);
        let at = out.len();
        out.extend_from_slice(b"exiting\n");
        let error = scan(&out, DEFAULT_MAX_FRAME_BYTES).expect_err("not frames");
        assert!(
            error.starts_with(&format!("after 2 frames, at byte {at}: ")),
            "{error}"
        );
        assert!(
            error.ends_with("the bytes there: \"exiting\\n\""),
            "{error}"
        );
    }

    #[test]
    fn a_torn_frame_and_a_bad_body_are_caught() {
        let mut out = frames(1);
        out.truncate(out.len() - 1);
        assert!(scan(&out, DEFAULT_MAX_FRAME_BYTES).is_err());
        let bad = [0u8, 0, 0, 2, 0xc1, 0xc1];
        let error = scan(&bad, DEFAULT_MAX_FRAME_BYTES).expect_err("bad body");
        assert!(error.contains("not an envelope"), "{error}");
        assert!(error.ends_with("00 00 00 02 c1 c1"), "{error}");
    }
}
